"""Reading and writing volume nodes with MRML storage nodes, and their voxels as numpy arrays.

Only MRML classes are used (no ``slicer.util`` loaders, no Qt), so the same code
runs inside Slicer and against the ``slicer-core`` package in CI.
"""

import os
from typing import Optional

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

_INTEGER_VTK_TYPES = {
    vtk.VTK_CHAR, vtk.VTK_SIGNED_CHAR, vtk.VTK_UNSIGNED_CHAR, vtk.VTK_SHORT, vtk.VTK_UNSIGNED_SHORT,
    vtk.VTK_INT, vtk.VTK_UNSIGNED_INT, vtk.VTK_LONG, vtk.VTK_UNSIGNED_LONG,
    vtk.VTK_LONG_LONG, vtk.VTK_UNSIGNED_LONG_LONG,
}


def read_volume(scene, path: str, labelmap: bool = False, name: Optional[str] = None):
    """Read an image file (NIfTI, NRRD, MHA, ...) into a new volume node of ``scene``.

    Args:
        scene: the ``vtkMRMLScene``.
        path: the file.
        labelmap: read into a ``vtkMRMLLabelMapVolumeNode`` (integer voxels; float
            files are rounded) instead of a ``vtkMRMLScalarVolumeNode``.
        name: node name; the file name without extension by default.

    Returns:
        The volume node, with a storage node that remembers ``path``.

    Raises:
        FileNotFoundError: the file does not exist.
        RuntimeError: the file could not be read.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    class_name = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    storage_node = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage_node.SetFileName(path)
    scene.AddNode(storage_node)
    volume_node = scene.AddNewNodeByClass(class_name, name or _name_from_path(path))
    volume_node.SetAndObserveStorageNodeID(storage_node.GetID())
    if not storage_node.ReadData(volume_node):
        scene.RemoveNode(volume_node)
        scene.RemoveNode(storage_node)
        raise RuntimeError(f"{path}: could not be read as an image. Check that it is a NIfTI, NRRD or MetaImage file.")
    if labelmap:
        _make_integer(volume_node)
    return volume_node


def write_volume(volume_node, path: str, compress: bool = True) -> str:
    """Write a volume node to ``path`` (format from the extension: .nrrd, .nii.gz, ...).

    The node's own storage node, if any, is left untouched: a temporary storage
    node writes the file, so the scene still points at the user's original file.
    Returns the path written.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    storage_node = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage_node.SetFileName(path)
    storage_node.SetUseCompression(1 if compress else 0)
    if not storage_node.WriteData(volume_node):
        raise RuntimeError(f"{path}: could not write volume '{volume_node.GetName()}'. "
                           "Check that the folder is writable and has free space.")
    return path


ENGINE_READABLE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def engine_readable_file(volume_node) -> Optional[str]:
    """The file the volume was read from, if the engine can read it and the node was not changed since.

    Segmenting such a volume needs no copy: the engine reads the file itself, and
    Slicer's GUI does not wait for a write.  None when the volume must be written.
    """
    storage_node = volume_node.GetStorageNode()
    if storage_node is None or volume_node.GetModifiedSinceRead():
        return None
    path = storage_node.GetFileName()
    if not path or not os.path.isfile(path) or not path.lower().endswith(ENGINE_READABLE_EXTENSIONS):
        return None
    if storage_node.GetNumberOfFileNames() > 1:  # a series of files (e.g. DICOM slices): write a copy
        return None
    return path


def remove_node_and_storage(scene, node) -> None:
    """Remove ``node`` and its storage and display nodes from ``scene`` (temporary nodes)."""
    if node is None or node.GetScene() is None:
        return
    for index in range(node.GetNumberOfStorageNodes() if hasattr(node, "GetNumberOfStorageNodes") else 0):
        storage_node = node.GetNthStorageNode(index)
        if storage_node is not None:
            scene.RemoveNode(storage_node)
    for index in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
        display_node = node.GetNthDisplayNode(index)
        if display_node is not None:
            scene.RemoveNode(display_node)
    scene.RemoveNode(node)


def array_from_volume(volume_node) -> np.ndarray:
    """The voxels of a volume node as a numpy array of shape ``[K, J, I]`` (slice, row, column).

    The array is a view of the node's image data: copy it before changing the node.
    """
    image_data = volume_node.GetImageData()
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise ValueError(f"volume '{volume_node.GetName()}' has no voxels")
    dimensions = image_data.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    components = image_data.GetNumberOfScalarComponents()
    shape = tuple(reversed(dimensions)) + ((components,) if components > 1 else ())
    return scalars.reshape(shape)


def update_volume_from_array(volume_node, array: np.ndarray) -> None:
    """Replace the voxels of ``volume_node`` by ``array`` (shape ``[K, J, I]``), keeping its geometry."""
    array = np.ascontiguousarray(array)
    image_data = volume_node.GetImageData()
    if image_data is None or tuple(reversed(image_data.GetDimensions())) != array.shape:
        raise ValueError(f"array of shape {array.shape} does not fit volume '{volume_node.GetName()}'")
    vtk_array = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image_data.GetPointData().SetScalars(vtk_array)
    image_data.Modified()
    volume_node.Modified()


def voxel_volume_ml(volume_node) -> float:
    """The volume of one voxel in millilitres (spacing is in mm)."""
    spacing = volume_node.GetSpacing()
    return float(spacing[0] * spacing[1] * spacing[2]) / 1000.0


def _make_integer(volume_node) -> None:
    """Round float labelmaps to integers: segmentation import needs integer voxels."""
    image_data = volume_node.GetImageData()
    if image_data is None or image_data.GetScalarType() in _INTEGER_VTK_TYPES:
        return
    values = np.rint(array_from_volume(volume_node))
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"labelmap '{volume_node.GetName()}' has label values outside 0..65535")
    update_volume_from_array(volume_node, values.astype(np.uint16))


def _name_from_path(path: str) -> str:
    name = os.path.basename(path)
    for extension in (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha", ".mhd", ".nhdr"):
        if name.lower().endswith(extension):
            return name[: -len(extension)]
    return os.path.splitext(name)[0]
