"""The MRML glue against the real MRML classes of slicer-core: labelmap <-> segmentation, .seg.nrrd.

Ground truth comes from SimpleITK reading the same files, independently of MRML.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer  # slicer-core: MRML and logic classes, no Qt

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ContrastiveSeg"))

from conftest import SAMPLE_IMAGE, SAMPLE_LABEL_TABLE, SAMPLE_LABELS  # noqa: E402
from ContrastiveSegJob.datasets import read_dataset_labels  # noqa: E402
from ContrastiveSegJob.labels import KNOWN_ORGAN_COLORS, normalize_label_table  # noqa: E402
from ContrastiveSegMRML import (  # noqa: E402
    export_scene_pairs_to_dataset,
    export_segmentation_to_labelmap,
    find_segment_id,
    import_labelmap_as_segmentation,
    load_segmentation_file,
    read_volume,
    save_segmentation_file,
    segment_ids,
    segment_names,
    segment_voxel_counts,
)

IMAGE, LABELS, LABEL_TABLE = Path(SAMPLE_IMAGE), Path(SAMPLE_LABELS), SAMPLE_LABEL_TABLE


def make_scene():
    scene = slicer.vtkMRMLScene()
    color_logic = slicer.vtkMRMLColorLogic()  # default colour nodes: volume loading warns without them
    color_logic.SetMRMLScene(scene)
    scene._color_logic = color_logic  # keep it alive with the scene
    return scene


@pytest.fixture(scope="module")
def truth():
    """The sample labelmap as a numpy array, read with SimpleITK (not MRML)."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(LABELS)))


@pytest.fixture(scope="module")
def loaded():
    scene = make_scene()
    image = read_volume(scene, str(IMAGE))
    segmentation = import_labelmap_as_segmentation(scene, str(LABELS), LABEL_TABLE, reference_volume=image)
    return scene, image, segmentation


def test_one_named_segment_per_label_present(loaded, truth):
    _, _, segmentation = loaded
    present = sorted(int(v) for v in np.unique(truth) if v != 0)
    assert len(present) == 41
    names = list(segment_names(segmentation).values())
    assert len(names) == len(present)
    table = normalize_label_table(LABEL_TABLE)
    assert names == [table[v] for v in present]  # ascending label value, names from dataset.json
    labels_of_segments = [segmentation.GetSegmentation().GetSegment(i).GetLabelValue() for i in segment_ids(segmentation)]
    assert labels_of_segments == present


def test_voxel_counts_match_the_file(loaded, truth):
    scene, image, segmentation = loaded
    table = normalize_label_table(LABEL_TABLE)
    counts = segment_voxel_counts(scene, segmentation, image)
    expected = {table[int(v)]: int((truth == v).sum()) for v in np.unique(truth) if v != 0}
    assert counts == expected
    assert counts["liver"] == int((truth == 5).sum()) > 1000


def test_colours_reference_geometry_and_no_leftover_nodes(loaded):
    scene, image, segmentation = loaded
    liver = segmentation.GetSegmentation().GetSegment(find_segment_id(segmentation, "Liver"))
    assert tuple(round(c * 255) for c in liver.GetColor()) == KNOWN_ORGAN_COLORS["liver"]
    role = segmentation.GetReferenceImageGeometryReferenceRole()
    assert segmentation.GetNodeReference(role) is image
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0  # temporary nodes removed
    assert segmentation.GetDisplayNode() is not None


def test_custom_colours_unknown_values_and_reused_node(tmp_path, truth):
    scene = make_scene()
    partial = {"1": "spleen", "5": "liver"}
    segmentation = import_labelmap_as_segmentation(scene, str(LABELS), partial, colors={"Liver": [10, 20, 30]})
    names = segment_names(segmentation)
    assert "liver" in names.values() and "spleen" in names.values()
    assert "label_2" in names.values()  # present in the file, not in the table
    liver = segmentation.GetSegmentation().GetSegment(find_segment_id(segmentation, "liver"))
    assert tuple(round(c * 255) for c in liver.GetColor()) == (10, 20, 30)

    only_liver = np.where(truth == 5, 1, 0).astype(np.uint8)
    image = sitk.GetImageFromArray(only_liver)
    image.CopyInformation(sitk.ReadImage(str(LABELS)))
    sitk.WriteImage(image, str(tmp_path / "liver.nii.gz"))
    reused = import_labelmap_as_segmentation(scene, str(tmp_path / "liver.nii.gz"), ["liver"],
                                             segmentation_node=segmentation)
    assert reused is segmentation
    assert list(segment_names(reused).values()) == ["liver"]


def test_float_labelmap_is_accepted(tmp_path, truth):
    scene = make_scene()
    image = sitk.Cast(sitk.ReadImage(str(LABELS)), sitk.sitkFloat32)
    sitk.WriteImage(image, str(tmp_path / "float_labels.nii.gz"))
    reference = read_volume(scene, str(IMAGE))
    segmentation = import_labelmap_as_segmentation(scene, str(tmp_path / "float_labels.nii.gz"), LABEL_TABLE)
    counts = segment_voxel_counts(scene, segmentation, reference)
    assert counts["spleen"] == int((truth == 1).sum())


def test_seg_nrrd_round_trip(loaded, tmp_path):
    scene, image, segmentation = loaded
    path = save_segmentation_file(segmentation, str(tmp_path / "organs.seg.nrrd"))
    header = Path(path).read_bytes()[:20000].decode("latin-1")
    assert "Segment0_Name:=spleen" in header
    assert "Segment0_LabelValue:=1" in header

    scene2 = make_scene()
    image2 = read_volume(scene2, str(IMAGE))
    reloaded = load_segmentation_file(scene2, path)
    assert list(segment_names(reloaded).values()) == list(segment_names(segmentation).values())
    assert segment_voxel_counts(scene2, reloaded, image2) == segment_voxel_counts(scene, segmentation, image)
    values = [reloaded.GetSegmentation().GetSegment(i).GetLabelValue() for i in segment_ids(reloaded)]
    assert values == [segmentation.GetSegmentation().GetSegment(i).GetLabelValue() for i in segment_ids(segmentation)]


def test_seg_nrrd_with_generic_names_is_renamed_by_label_value(tmp_path):
    scene = make_scene()
    labelmap = read_volume(scene, str(LABELS), labelmap=True)
    generic = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "generic")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, generic)
    assert list(segment_names(generic).values())[0] == "Label_1"  # what Slicer does without a colour table
    path = save_segmentation_file(generic, str(tmp_path / "generic.seg.nrrd"))
    named = import_labelmap_as_segmentation(scene, path, LABEL_TABLE)
    assert list(segment_names(named).values())[:3] == ["spleen", "kidney_right", "kidney_left"]


def test_the_shipped_sample_segmentation_matches_the_labelmap(truth):
    scene = make_scene()
    image = read_volume(scene, str(IMAGE))
    shipped = load_segmentation_file(scene, str(REPO / "ContrastiveSeg/Resources/SampleData/abdomen_ct_organs.seg.nrrd"))
    table = normalize_label_table(LABEL_TABLE)
    expected = {table[int(v)]: int((truth == v).sum()) for v in np.unique(truth) if v != 0}
    assert segment_voxel_counts(scene, shipped, image) == expected, (
        "Resources/SampleData/abdomen_ct_organs.seg.nrrd is out of date: run "
        "python ContrastiveSeg/Scripts/update_engine_file_list.py --rebuild-sample-segmentation")


def test_export_to_training_labelmap(loaded, truth, tmp_path):
    scene, image, segmentation = loaded
    path = tmp_path / "train_labels.nrrd"
    written = export_segmentation_to_labelmap(scene, segmentation, image, str(path), ["Liver", "spleen", "heart"])
    assert written == {1: "Liver", 2: "spleen"}  # no heart in this scan: left out, not an error
    exported = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(exported)
    assert set(np.unique(array)) == {0, 1, 2}
    np.testing.assert_array_equal(array == 1, truth == 5)  # liver is 5 in the sample, 1 in the training table
    np.testing.assert_array_equal(array == 2, truth == 1)
    reference = sitk.ReadImage(str(IMAGE))
    assert exported.GetSize() == reference.GetSize()
    np.testing.assert_allclose(exported.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(exported.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(exported.GetDirection(), reference.GetDirection(), atol=1e-6)


def test_export_without_matching_segments_says_what_to_do(loaded, tmp_path):
    scene, image, segmentation = loaded
    with pytest.raises(ValueError, match="Rename the segments"):
        export_segmentation_to_labelmap(scene, segmentation, image, str(tmp_path / "x.nrrd"), ["brain"])


def test_scene_pairs_become_an_engine_dataset(loaded, truth, tmp_path):
    scene, image, segmentation = loaded
    dataset_json = export_scene_pairs_to_dataset(scene, [(image, segmentation)], str(tmp_path / "scene_data"),
                                                 ["liver", "spleen"])
    content = json.loads(dataset_json.read_text())
    assert content["labels"] == {"0": "background", "1": "liver", "2": "spleen"}
    assert len(content["training"]) == 1
    case = content["training"][0]
    image_file = dataset_json.parent / case["image"]
    label_file = dataset_json.parent / case["label"]
    assert case["image"].startswith("./") and image_file.is_file() and label_file.is_file()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(image_file))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(IMAGE))))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))
    np.testing.assert_array_equal(labels == 1, truth == 5)
    assert read_dataset_labels(dataset_json.parent) == {1: "liver", 2: "spleen"}
