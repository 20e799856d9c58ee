"""Labelmap files <-> segmentation nodes, with organ names and colours.

Two directions:

* :func:`import_labelmap_as_segmentation`: a predicted labelmap (or a ``.seg.nrrd``)
  becomes a ``vtkMRMLSegmentationNode`` with one named, coloured segment per
  label present in the file.
* :func:`export_segmentation_to_labelmap`: segments of the scene become a
  labelmap file with the label values of a training label table, so scene data
  can be used as training data.

Facts about the segmentation logic this relies on (checked against slicer-core):
after ``ImportLabelmapToSegmentationNode`` the segments are named after the
labelmap's colour table ("Label_1", ... without one) but keep the original label
value (``vtkSegment.GetLabelValue()``), so names are set here from that value;
exporting segments numbers them 1..n, so each segment is exported on its own and
given its training label value here.
"""

import json
import logging
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import slicer
import vtk
from ContrastiveSegJob.labels import (
    LabelTable,
    canonical_organ_name,
    normalize_label_table,
    organ_color,
)
from ContrastiveSegJob.terminology import organ_from_terminology, terminology_entry

from .volumes import (
    array_from_volume,
    read_volume,
    remove_node_and_storage,
    update_volume_from_array,
    write_volume,
)

_GENERIC_SEGMENT_NAME = re.compile(r"^(segment|label)[_ ]?\d+$", re.IGNORECASE)
# Attribute of a segmentation imported from a model's prediction: the model's organs (JSON list, in
# label order), so a Dice table can list the organs the model missed (they have no segment).
MODEL_ORGANS_ATTRIBUTE = "ContrastiveSeg.ModelOrgans"


def import_labelmap_as_segmentation(scene, labelmap_path: str, label_names: Optional[LabelTable],
                                    reference_volume=None, colors: Optional[Mapping] = None,
                                    segmentation_node=None, name: Optional[str] = None):
    """Load a labelmap file as a segmentation node with one named, coloured segment per label present.

    Args:
        scene: the ``vtkMRMLScene``.
        labelmap_path: a labelmap image (``.nii.gz``, ``.nrrd``, ...) whose voxel
            values are label values, or a Slicer ``.seg.nrrd`` segmentation.
        label_names: label value -> organ name, e.g. a run's ``labels.json``
            (``{"0": "background", "1": "liver"}``), ``{1: "liver"}`` or ``["liver"]``.
            A value present in the file but not in the table becomes ``label_<value>``.
        reference_volume: the image the labels belong to; it becomes the
            segmentation's reference geometry (and parent transform), so editing
            the segments happens on that image's grid.  Without it the
            labelmap's own grid is the reference geometry.
        colors: organ name -> ``[r, g, b]`` (0-255), e.g. a run's ``colors.json``;
            organs not in it get :func:`ContrastiveSegJob.labels.organ_color`.
        segmentation_node: fill this node (its current segments are removed)
            instead of creating a new one.
        name: name of a new segmentation node (default: the file name).

    Returns:
        The ``vtkMRMLSegmentationNode``. Each segment's label value
        (``GetLabelValue()``) is its value in the file; organs with SNOMED CT
        codes carry them as terminology; the table's organs are kept in the
        node's ``ContrastiveSeg.ModelOrgans`` attribute (see :func:`model_organs`).
    """
    labelmap_path = os.fspath(labelmap_path)
    table = normalize_label_table(label_names)
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                    name or _name_from_path(labelmap_path))
    else:
        segmentation_node.GetSegmentation().RemoveAllSegments()
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    transform_id = None
    if reference_volume is not None:
        # The segmentation goes under the volume's parent transform first, so that its reference geometry
        # is the volume's own grid (in the shared frame), not the grid moved by the transform.
        transform_id = reference_volume.GetTransformNodeID()
        segmentation_node.SetAndObserveTransformNodeID(transform_id)
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        segmentation_node.SetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole(),
                                             reference_volume.GetID())
    segmentation_node.SetAttribute(MODEL_ORGANS_ATTRIBUTE, json.dumps(list(table.values())))

    if labelmap_path.lower().endswith(".seg.nrrd"):
        _read_seg_nrrd_into(scene, labelmap_path, segmentation_node)
        segmentation = segmentation_node.GetSegmentation()
        # In a single-layer file label values are unique, so they identify organs; names
        # written by Slicer are kept, generic ones replaced.
        rename = segmentation.GetNumberOfLayers() <= 1
        for segment_id in segment_ids(segmentation_node):
            segment = segmentation.GetSegment(segment_id)
            value = segment.GetLabelValue()
            if rename and value in table and _is_generic_name(segment.GetName(), value):
                segment.SetName(table[value])
            _set_identity(segment, segment.GetName(), colors)
        return segmentation_node

    labelmap_node = read_volume(scene, labelmap_path, labelmap=True, name="ContrastiveSeg import")
    try:
        # The predicted labelmap is on the volume's grid, in the volume's own frame: under the same
        # transform as the segmentation, the import resamples by the identity (else by the inverse transform).
        labelmap_node.SetAndObserveTransformNodeID(transform_id)
        if reference_volume is None:
            # No volume: the labelmap's own grid is the reference geometry (so Dice tables and editing work).
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(labelmap_node)
        before = set(segment_ids(segmentation_node))
        imported = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            labelmap_node, segmentation_node)
        if not imported:
            raise RuntimeError(f"{labelmap_path}: Slicer could not import the labelmap into a segmentation")
        segmentation = segmentation_node.GetSegmentation()
        for segment_id in segment_ids(segmentation_node):
            if segment_id in before:
                continue
            segment = segmentation.GetSegment(segment_id)
            value = segment.GetLabelValue()
            organ = table.get(value)
            if organ is None:
                organ = f"label_{value}"
                logging.warning("%s: label value %d is not in the label table; segment named %s",
                                labelmap_path, value, organ)
            segment.SetName(organ)
            _set_identity(segment, organ, colors)
    finally:
        remove_node_and_storage(scene, labelmap_node)
    return segmentation_node


def model_organs(segmentation_node) -> List[str]:
    """The organs of the model a segmentation was predicted by (empty when it was not)."""
    text = segmentation_node.GetAttribute(MODEL_ORGANS_ATTRIBUTE)
    if not text:
        return []
    try:
        return [str(name) for name in json.loads(text)]
    except ValueError:
        return []


def segment_organ(segmentation_node, segment_id: str) -> str:
    """The canonical organ a segment is: from its terminology (SNOMED CT codes) when known, else its name."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    return organ_from_terminology(segment.GetTerminology()) or canonical_organ_name(segment.GetName())


def _set_identity(segment, organ: str, colors: Optional[Mapping]) -> None:
    """Colour and, for organs with SNOMED CT codes, the terminology Slicer and TotalSegmentator use."""
    segment.SetColor(*[c / 255.0 for c in organ_color(organ, colors)])
    entry = terminology_entry(canonical_organ_name(organ))
    if entry is not None:
        segment.SetTerminology(entry)


def export_segmentation_to_labelmap(scene, segmentation_node, reference_volume, path: str,
                                    label_names: LabelTable) -> Dict[int, str]:
    """Write the segments named in ``label_names`` as one labelmap file on ``reference_volume``'s grid.

    Segments are matched to the table by organ (terminology codes, else canonical
    name: "Left kidney" matches ``kidney_left``); each matched segment's voxels
    get its table value, segments not in the table are left out, and where
    segments overlap the later one in the table wins.

    Args:
        scene: the ``vtkMRMLScene``.
        segmentation_node: the segmentation to export.
        reference_volume: the image the labelmap must align with voxel for voxel
            (training pairs an image with its labelmap on the same grid).
        path: the labelmap file to write (``.nrrd`` or ``.nii.gz``).
        label_names: the training label table (value -> organ name).

    Returns:
        ``{label value: organ name}`` of the organs written (may be fewer than
        the table when the segmentation lacks some organs).

    Raises:
        ValueError: no segment matches any organ of the table; the message lists both.
    """
    steps = labelmap_export_steps(scene, segmentation_node, reference_volume, path, label_names)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def labelmap_export_steps(scene, segmentation_node, reference_volume, path: str, label_names: LabelTable):
    """:func:`export_segmentation_to_labelmap` one organ at a time: a generator yielding a short description
    after each organ (so a GUI can let its event loop run in between); its return value is the same dict."""
    table = normalize_label_table(label_names)
    if reference_volume is None:
        raise ValueError("a reference volume is needed: the labelmap must be on the image's grid")
    matched: List[tuple] = []
    for value, organ in table.items():
        segment_id = find_segment_id(segmentation_node, organ)
        if segment_id is not None:
            matched.append((value, organ, segment_id))
    if not matched:
        raise ValueError(
            f"segmentation '{segmentation_node.GetName()}' has no segment named like the organs to train "
            f"({', '.join(table.values())}); its segments are: {', '.join(segment_names(segmentation_node).values())}. "
            "Rename the segments (Segment Editor) or choose other organs.")
    labels = None
    written: Dict[int, str] = {}
    for value, organ, segment_id in matched:
        mask = segment_mask(scene, segmentation_node, segment_id, reference_volume)
        if labels is None:
            dtype = np.uint8 if max(table) < 256 else np.uint16
            labels = np.zeros(mask.shape, dtype=dtype)
        labels[mask] = value
        written[value] = organ
        yield f"{segmentation_node.GetName()}: {organ}"
    missing = [organ for value, organ in table.items() if value not in written]
    if missing:
        logging.info("segmentation '%s' has no segment for: %s", segmentation_node.GetName(), ", ".join(missing))
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "ContrastiveSeg export")
    try:
        labelmap_node.CopyOrientation(reference_volume)
        image_data = vtk.vtkImageData()
        image_data.SetDimensions(reference_volume.GetImageData().GetDimensions())
        image_data.AllocateScalars(vtk.VTK_UNSIGNED_CHAR if labels.dtype == np.uint8 else vtk.VTK_UNSIGNED_SHORT, 1)
        labelmap_node.SetAndObserveImageData(image_data)
        update_volume_from_array(labelmap_node, labels)
        write_volume(labelmap_node, path)
    finally:
        remove_node_and_storage(scene, labelmap_node)
    return written


def segment_mask(scene, segmentation_node, segment_id: str, reference_volume) -> np.ndarray:
    """One segment as a boolean array ``[K, J, I]`` on ``reference_volume``'s grid.

    ``reference_volume`` may be any volume node (its grid is used, not its voxels).
    """
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "ContrastiveSeg mask")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap_node, reference_volume)
        if not exported:
            raise RuntimeError(f"could not export segment '{segment_id}' of '{segmentation_node.GetName()}'")
        return array_from_volume(labelmap_node) > 0
    finally:
        remove_node_and_storage(scene, labelmap_node)


def reference_geometry_volume(scene, segmentation_node, name: str = "ContrastiveSeg geometry"):
    """A temporary empty labelmap node on the segmentation's reference image geometry.

    Used as the common grid when comparing two segmentations without a volume;
    remove it with :func:`ContrastiveSegMRML.volumes.remove_node_and_storage`.
    """
    segmentation = segmentation_node.GetSegmentation()
    geometry = segmentation.GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    image = slicer.vtkOrientedImageData()
    if not geometry or not slicer.vtkSegmentationConverter.DeserializeImageGeometry(
            geometry, image, True, vtk.VTK_UNSIGNED_CHAR, 1):
        raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no reference geometry; "
                         "choose a reference volume")
    volume_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    slicer.vtkSlicerSegmentationsModuleLogic.CreateLabelmapVolumeFromOrientedImageData(image, volume_node)
    return volume_node


def segment_ids(segmentation_node) -> List[str]:
    """The segment IDs of a segmentation node, in display order."""
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(index) for index in range(segmentation.GetNumberOfSegments())]


def segment_names(segmentation_node) -> Dict[str, str]:
    """``{segment ID: segment name}`` in display order."""
    segmentation = segmentation_node.GetSegmentation()
    return {segment_id: segmentation.GetSegment(segment_id).GetName() for segment_id in segment_ids(segmentation_node)}


def find_segment_id(segmentation_node, organ: str) -> Optional[str]:
    """The ID of the first segment that is ``organ`` (by terminology, else canonical name), or None."""
    wanted = canonical_organ_name(organ)
    for segment_id in segment_ids(segmentation_node):
        if segment_organ(segmentation_node, segment_id) == wanted:
            return segment_id
    return None


def load_segmentation_file(scene, path: str, name: Optional[str] = None):
    """Read a ``.seg.nrrd`` (names, colours, label values and layers from its header) into a new node."""
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or _name_from_path(path))
    segmentation_node.CreateDefaultDisplayNodes()
    _read_seg_nrrd_into(scene, os.fspath(path), segmentation_node)
    return segmentation_node


def save_segmentation_file(segmentation_node, path: str) -> str:
    """Write a segmentation node as a ``.seg.nrrd`` file and return the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    storage_node = slicer.vtkMRMLSegmentationStorageNode()
    storage_node.SetFileName(path)
    if not storage_node.WriteData(segmentation_node):
        raise RuntimeError(f"{path}: could not write segmentation '{segmentation_node.GetName()}'")
    return path


def segment_voxel_counts(scene, segmentation_node, reference_volume) -> Dict[str, int]:
    """``{segment name: number of voxels}`` on ``reference_volume``'s grid."""
    return {segment_name: int(segment_mask(scene, segmentation_node, segment_id, reference_volume).sum())
            for segment_id, segment_name in segment_names(segmentation_node).items()}


def _read_seg_nrrd_into(scene, path: str, segmentation_node) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    storage_node = slicer.vtkMRMLSegmentationStorageNode()
    storage_node.SetFileName(path)
    scene.AddNode(storage_node)
    segmentation_node.SetAndObserveStorageNodeID(storage_node.GetID())
    if not storage_node.ReadData(segmentation_node):
        raise RuntimeError(f"{path}: could not be read as a Slicer segmentation (.seg.nrrd)")


def _is_generic_name(name: str, value: int) -> bool:
    return not name or name == str(value) or bool(_GENERIC_SEGMENT_NAME.match(name))


def _name_from_path(path: str) -> str:
    base = os.path.basename(os.fspath(path))
    for extension in (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha"):
        if base.lower().endswith(extension):
            return base[: -len(extension)]
    return os.path.splitext(base)[0]


__all__: Sequence[str] = (
    "import_labelmap_as_segmentation",
    "model_organs",
    "segment_organ",
    "export_segmentation_to_labelmap",
    "labelmap_export_steps",
    "segment_mask",
    "reference_geometry_volume",
    "segment_ids",
    "segment_names",
    "find_segment_id",
    "load_segmentation_file",
    "save_segmentation_file",
    "segment_voxel_counts",
)
