"""Per-organ Dice tables (vtkMRMLTableNode) against an independent numpy computation."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ContrastiveSeg"))

from conftest import SAMPLE_IMAGE, SAMPLE_LABEL_TABLE, SAMPLE_LABELS, make_scene  # noqa: E402
from ContrastiveSegJob.labels import normalize_label_table  # noqa: E402
from ContrastiveSegMRML import (  # noqa: E402
    DICE_TABLE_COLUMNS,
    dice_coefficient,
    dice_rows,
    dice_table,
    format_dice,
    import_labelmap_as_segmentation,
    read_dice_table,
    read_volume,
)

IMAGE, LABELS, LABEL_TABLE = Path(SAMPLE_IMAGE), Path(SAMPLE_LABELS), SAMPLE_LABEL_TABLE
VOXEL_ML = 3.0 * 3.0 * 3.0 / 1000.0  # the sample CT is 3 mm isotropic


def shifted(array: np.ndarray, dz: int, dy: int, dx: int) -> np.ndarray:
    """``array`` moved by whole voxels (zeros shifted in, no wrap-around)."""
    out = np.zeros_like(array)
    source = tuple(slice(max(0, -d), array.shape[a] - max(0, d)) for a, d in enumerate((dz, dy, dx)))
    target = tuple(slice(max(0, d), array.shape[a] - max(0, -d)) for a, d in enumerate((dz, dy, dx)))
    out[target] = array[source]
    return out


def numpy_dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dice")
    reference_image = sitk.ReadImage(str(LABELS))
    truth = sitk.GetArrayFromImage(reference_image)
    moved = shifted(truth, 1, 2, -3)
    moved_image = sitk.GetImageFromArray(moved)
    moved_image.CopyInformation(reference_image)
    sitk.WriteImage(moved_image, str(folder / "shifted.nii.gz"))
    scene = make_scene()
    image = read_volume(scene, str(IMAGE))
    reference = import_labelmap_as_segmentation(scene, str(LABELS), LABEL_TABLE, reference_volume=image, name="reference")
    prediction = import_labelmap_as_segmentation(scene, str(folder / "shifted.nii.gz"), LABEL_TABLE,
                                                 reference_volume=image, name="shifted")
    return scene, image, reference, prediction, truth, moved


def test_dice_of_a_segmentation_against_itself_is_one(setup):
    scene, image, reference, _, truth, _ = setup
    table = dice_table(scene, reference, reference)
    assert table.IsA("vtkMRMLTableNode")
    assert table.GetScene() is scene
    values = read_dice_table(table)
    assert len(values) == 41
    for organ, row in values.items():
        assert row["Dice"] == 1.0, organ
        assert row["Volume (mL)"] == pytest.approx(row["Reference volume (mL)"])
    liver_ml = (truth == 5).sum() * VOXEL_ML
    assert values["liver"]["Volume (mL)"] == pytest.approx(liver_ml)


def test_dice_against_a_shifted_copy_matches_numpy(setup):
    scene, image, reference, prediction, truth, moved = setup
    table = dice_table(scene, prediction, reference, reference_volume=image)
    values = read_dice_table(table)
    names = normalize_label_table(LABEL_TABLE)
    expected = {}
    # Every organ of the model that the reference has: the shift pushed one out of the scan, and it
    # must be listed with Dice 0 (issue 10, defect 5), not left out.
    for value in np.unique(truth):
        if value == 0:
            continue
        expected[names[int(value)]] = numpy_dice(moved == value, truth == value) if (moved == value).any() else 0.0
    assert set(values) == set(expected)
    missed = [names[int(v)] for v in np.unique(truth) if v and not (moved == v).any()]
    assert missed == ["lung_middle_lobe_right"] and values["lung_middle_lobe_right"]["Dice"] == 0.0
    for organ, dice in expected.items():
        assert values[organ]["Dice"] == pytest.approx(dice, abs=1e-12), organ
        value = [v for v, n in names.items() if n == organ][0]
        assert values[organ]["Volume (mL)"] == pytest.approx((moved == value).sum() * VOXEL_ML)
        assert values[organ]["Reference volume (mL)"] == pytest.approx((truth == value).sum() * VOXEL_ML)
    assert 0.0 < values["liver"]["Dice"] < 1.0


def test_the_default_grid_is_the_reference_geometry(setup):
    scene, image, reference, prediction, _, _ = setup
    on_image = {row["organ"]: row["dice"] for row in dice_rows(scene, prediction, reference, reference_volume=image)}
    on_geometry = {row["organ"]: row["dice"] for row in dice_rows(scene, prediction, reference)}
    assert on_image == on_geometry
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0


def test_table_columns_and_refill(setup):
    scene, image, reference, prediction, _, _ = setup
    table = dice_table(scene, prediction, reference, reference_volume=image)
    columns = [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]
    assert columns == list(DICE_TABLE_COLUMNS)
    assert table.GetColumnUnitLabel("Volume (mL)") == "mL"
    rows_before = table.GetNumberOfRows()
    again = dice_table(scene, reference, reference, table_node=table)
    assert again is table
    assert table.GetNumberOfColumns() == 4
    assert table.GetNumberOfRows() >= rows_before


def test_organs_are_matched_by_name_and_unmatched_ones_listed_on_request(setup, tmp_path):
    scene, image, reference, _, truth, _ = setup
    only = np.where(truth == 5, 1, np.where(truth == 1, 2, 0)).astype(np.uint8)
    partial = sitk.GetImageFromArray(only)
    partial.CopyInformation(sitk.ReadImage(str(LABELS)))
    sitk.WriteImage(partial, str(tmp_path / "two.nii.gz"))
    two = import_labelmap_as_segmentation(scene, str(tmp_path / "two.nii.gz"), {"1": "Liver", "2": "Spleen"})
    rows = dice_rows(scene, two, reference, reference_volume=image)
    assert [(row["organ"], row["dice"]) for row in rows] == [("Liver", 1.0), ("Spleen", 1.0)]
    with_unmatched = dice_rows(scene, two, reference, reference_volume=image, include_unmatched=True)
    assert len(with_unmatched) == 41
    assert {row["organ"]: row["dice"] for row in with_unmatched}["stomach"] == 0.0


def test_dice_coefficient_edge_cases():
    empty = np.zeros((2, 2, 2), dtype=bool)
    full = np.ones((2, 2, 2), dtype=bool)
    assert math.isnan(dice_coefficient(empty, empty))
    assert dice_coefficient(full, empty) == 0.0
    assert dice_coefficient(full, full) == 1.0
    assert format_dice(float("nan")) == "n/a"
    assert format_dice(0.91234) == "0.912"
