"""Loading a prediction into the scene (issue 10, defects 4, 5 and 9), on real slicer-core MRML classes.

* a volume under a translated and rotated parent transform: the result lands on the volume voxel for voxel;
* a result loaded without a reference volume works with ``dice_table``, and an organ the model missed
  has a Dice 0 row;
* organs are matched by terminology and synonyms ("Left kidney" is ``kidney_left``), and result segments
  carry SNOMED CT terminology and the model's colours.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ContrastiveSeg"))

from conftest import SAMPLE_IMAGE, SAMPLE_LABEL_TABLE, SAMPLE_LABELS, make_scene  # noqa: E402
from ContrastiveSegJob.terminology import organ_from_terminology, terminology_entry  # noqa: E402
from ContrastiveSegMRML import (  # noqa: E402
    dice_table,
    find_segment_id,
    import_labelmap_as_segmentation,
    read_dice_table,
    read_volume,
    segment_mask,
)

IMAGE, LABELS, LABEL_TABLE = Path(SAMPLE_IMAGE), Path(SAMPLE_LABELS), SAMPLE_LABEL_TABLE
LIVER, SPLEEN = 5, 1


def truth() -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(LABELS)))


def write_labels(path: Path, array: np.ndarray) -> str:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(sitk.ReadImage(str(LABELS)))
    sitk.WriteImage(image, str(path))
    return str(path)


def test_prediction_lands_on_a_volume_with_a_rotated_and_translated_parent_transform():
    scene = make_scene()
    volume = read_volume(scene, str(IMAGE))
    matrix = vtk.vtkTransform()
    matrix.Translate(12.0, -7.0, 25.0)
    matrix.RotateZ(30.0)
    matrix.RotateX(10.0)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "patient position")
    transform.SetMatrixTransformToParent(matrix.GetMatrix())
    volume.SetAndObserveTransformNodeID(transform.GetID())
    segmentation = import_labelmap_as_segmentation(scene, str(LABELS), LABEL_TABLE, reference_volume=volume)
    assert segmentation.GetTransformNodeID() == transform.GetID()
    expected = truth()
    for organ, value in (("liver", LIVER), ("spleen", SPLEEN)):
        mask = segment_mask(scene, segmentation, find_segment_id(segmentation, organ), volume)
        assert mask.shape == expected.shape
        assert np.array_equal(mask, expected == value), f"{organ}: {int((mask != (expected == value)).sum())} voxels off"


def test_result_without_reference_volume_works_with_dice_table_and_lists_missed_organs(tmp_path):
    scene = make_scene()
    labels = truth()
    liver_only = write_labels(tmp_path / "prediction.nii.gz", np.where(labels == LIVER, 1, 0))
    both = write_labels(tmp_path / "reference.nii.gz", np.where(labels == LIVER, 1, np.where(labels == SPLEEN, 2, 0)))
    names = {"0": "background", "1": "liver", "2": "spleen"}
    prediction = import_labelmap_as_segmentation(scene, liver_only, names)
    reference = import_labelmap_as_segmentation(scene, both, names)
    table = dice_table(scene, prediction, reference)
    values = read_dice_table(table)
    assert list(values) == ["liver", "spleen"]
    assert values["liver"]["Dice"] == 1.0
    assert values["spleen"]["Dice"] == 0.0 and values["spleen"]["Volume (mL)"] == 0.0
    assert values["spleen"]["Reference volume (mL)"] == pytest.approx((labels == SPLEEN).sum() * 27.0 / 1000.0)


def test_organs_match_by_synonym_and_terminology_and_results_carry_terminology(tmp_path):
    scene = make_scene()
    labels = truth()
    kidney_left = [int(v) for v, n in LABEL_TABLE.items() if n == "kidney_left"][0]
    path = write_labels(tmp_path / "kidney.nii.gz", np.where(labels == kidney_left, 1, np.where(labels == LIVER, 2, 0)))
    prediction = import_labelmap_as_segmentation(scene, path, ["kidney_left", "liver"],
                                                 colors={"liver": [221, 130, 101]})
    liver = prediction.GetSegmentation().GetSegment(find_segment_id(prediction, "liver"))
    assert "SCT^10200004^Liver" in liver.GetTerminology()
    assert [round(c * 255) for c in liver.GetColor()] == [221, 130, 101]
    assert organ_from_terminology(terminology_entry("kidney_left")) == "kidney_left"
    # A reference as TotalSegmentator names it: display names, one segment coded only by terminology.
    reference = import_labelmap_as_segmentation(scene, path, {"1": "Left kidney", "2": "Segment_2"})
    coded = reference.GetSegmentation().GetSegment(find_segment_id(reference, "Segment_2"))
    coded.SetTerminology(terminology_entry("liver"))
    assert find_segment_id(reference, "kidney_left") is not None
    assert find_segment_id(reference, "liver") is not None
    values = read_dice_table(dice_table(scene, prediction, reference))
    assert {organ: row["Dice"] for organ, row in values.items()} == {"kidney_left": 1.0, "liver": 1.0}
