"""evaluate_files: labels matched by name, predictions resampled onto the reference grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ContrastiveSegLib.data.io import SegmentInfo, read_label_image, write_labelmap
from ContrastiveSegLib.data.segnrrd import write_seg_nrrd
from ContrastiveSegLib.errors import InputError
from ContrastiveSegLib.evaluate import evaluate_files, format_table, write_metrics

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = REPO_ROOT / "ContrastiveSegLib" / "sample_data"
SAMPLE_NAMES = {int(k): v for k, v in json.loads((SAMPLE / "dataset.json").read_text())["labels"].items()}


def grid(size_xyz=(8, 7, 6)) -> sitk.Image:
    image = sitk.Image(list(size_xyz), sitk.sitkInt16)
    image.SetSpacing((1.0, 1.0, 2.0))
    image.SetOrigin((5.0, -3.0, 12.0))
    return image


def test_labels_are_matched_by_name_not_value(tmp_path):
    reference = grid()
    pred = np.zeros((6, 7, 8), np.uint8)
    pred[1:4, 1:4, 1:4] = 1          # liver
    pred[4:6, 4:7, 4:8] = 2          # spleen
    pred[0, 0, 0:2] = 3              # heart: the reference does not name it
    ref = np.zeros((6, 7, 8), np.uint8)
    ref[1:4, 1:4, 1:4] = 5           # liver, same voxels, other value
    ref[4:6, 4:7, 6:8] = 7           # spleen, half of the predicted one
    ref[0, 6, 7] = 3                 # kidney_left: the prediction does not name it
    write_labelmap(tmp_path / "pred.nii.gz", pred, reference)
    write_labelmap(tmp_path / "ref.nii.gz", ref, reference)

    metrics = evaluate_files(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz",
                             pred_names={0: "background", 1: "liver", 2: "spleen", 3: "heart"},
                             ref_names={0: "background", 5: "Liver", 7: "spleen", 3: "kidney left"})
    assert metrics["dice"] == {"Liver": pytest.approx(1.0), "spleen": pytest.approx(2 * 12 / (24 + 12))}
    assert metrics["mean_dice"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert metrics["voxels"]["spleen"] == {"prediction": 24, "reference": 12}
    assert metrics["only_in_prediction"] == ["heart"]
    assert metrics["only_in_reference"] == ["kidney left"]
    assert metrics["resampled"] is False
    assert "hd95_mm" not in metrics
    assert metrics["prediction"].endswith("pred.nii.gz") and metrics["reference"].endswith("ref.nii.gz")


def test_reference_names_default_to_prediction_names(tmp_path):
    reference = grid()
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[2:4, 2:4, 2:4] = 1
    write_labelmap(tmp_path / "a.nii.gz", labels, reference)
    metrics = evaluate_files(tmp_path / "a.nii.gz", tmp_path / "a.nii.gz", {1: "liver", 2: "spleen"},
                             with_hd95=True)
    assert metrics["dice"] == {"liver": 1.0, "spleen": None}
    assert metrics["hd95_mm"] == {"liver": 0.0, "spleen": None}
    assert metrics["mean_dice"] == 1.0
    assert metrics["only_in_prediction"] == [] and metrics["only_in_reference"] == []


def test_seg_nrrd_reference_brings_its_own_names(tmp_path):
    reference = grid()
    organs = np.zeros((6, 7, 8), np.uint8)
    organs[1:3, 1:3, 1:3] = 4
    tumour = np.zeros((6, 7, 8), np.uint8)
    tumour[1, 1, 1:3] = 1
    write_seg_nrrd(tmp_path / "ref.seg.nrrd", [organs, tumour], reference,
                   [SegmentInfo("liver", 4, 0), SegmentInfo("tumour", 1, 1)])
    pred = np.zeros((6, 7, 8), np.uint8)
    pred[1:3, 1:3, 1:3] = 1
    pred[1, 1, 1:3] = 2  # overwrites liver voxels: a plain label map cannot overlap
    write_labelmap(tmp_path / "pred.nii.gz", pred, reference)
    metrics = evaluate_files(tmp_path / "pred.nii.gz", tmp_path / "ref.seg.nrrd", {1: "liver", 2: "tumour"},
                             ref_names={9: "ignored because the file names its segments"})
    assert metrics["dice"]["tumour"] == pytest.approx(1.0)
    assert metrics["dice"]["liver"] == pytest.approx(2 * 6 / (6 + 8))
    assert metrics["voxels"]["liver"] == {"prediction": 6, "reference": 8}


def write_permuted_flipped_copy(source: Path, target: Path) -> None:
    """The same labels in the same physical place, stored with x and y swapped and x flipped."""
    image = sitk.ReadImage(str(source))
    array = sitk.GetArrayFromImage(image)                       # (z, y, x)
    moved = np.ascontiguousarray(np.flip(array, axis=2).transpose(0, 2, 1))  # new (z, y', x') = (z, x_flipped, y)
    copy = sitk.GetImageFromArray(moved)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    new_direction = np.stack([direction[:, 1], -direction[:, 0], direction[:, 2]], axis=1)
    copy.SetDirection(new_direction.flatten().tolist())
    spacing = image.GetSpacing()
    copy.SetSpacing((spacing[1], spacing[0], spacing[2]))
    copy.SetOrigin(image.TransformIndexToPhysicalPoint((image.GetSize()[0] - 1, 0, 0)))
    sitk.WriteImage(copy, str(target))


def test_prediction_on_another_grid_is_resampled(tmp_path):
    source = SAMPLE / "abdomen_ct_labels.nii.gz"
    moved = tmp_path / "moved_labels.nii.gz"
    write_permuted_flipped_copy(source, moved)
    original, copy = read_label_image(source), read_label_image(moved)
    assert copy.image.GetSize() == (101, 122, 30)
    assert not np.allclose(copy.image.GetDirection(), original.image.GetDirection())

    metrics = evaluate_files(moved, source, SAMPLE_NAMES)
    assert metrics["resampled"] is True
    present = {SAMPLE_NAMES[v] for v in original.values()}
    assert {name for name, score in metrics["dice"].items() if score is not None} == present
    assert all(metrics["dice"][name] == pytest.approx(1.0) for name in present)
    assert metrics["mean_dice"] == pytest.approx(1.0)
    assert metrics["voxels"]["liver"]["prediction"] == metrics["voxels"]["liver"]["reference"] > 1000


def test_flipped_heldout_label_against_itself_on_the_dicom_grid(tmp_path):
    from ContrastiveSegLib.data.io import read_image, resample_label_image

    ct = read_image(SAMPLE / "heldout" / "ct_dicom")
    labels = read_label_image(SAMPLE / "heldout" / "ct_dicom_labels.nii.gz")
    on_ct = resample_label_image(labels, ct)
    write_labelmap(tmp_path / "on_ct.nii.gz", on_ct.layers[0], ct)
    metrics = evaluate_files(SAMPLE / "heldout" / "ct_dicom_labels.nii.gz", tmp_path / "on_ct.nii.gz",
                             SAMPLE_NAMES, with_hd95=True)
    assert metrics["resampled"] is True
    assert metrics["dice"]["liver"] == pytest.approx(1.0)
    assert metrics["hd95_mm"]["liver"] == pytest.approx(0.0)


def test_files_of_two_different_scans_are_refused(tmp_path):
    with pytest.raises(InputError, match="do not overlap in space") as caught:
        evaluate_files(SAMPLE / "heldout" / "ct_dicom_labels.nii.gz", SAMPLE / "abdomen_ct_labels.nii.gz",
                       SAMPLE_NAMES)
    assert "prediction:" in caught.value.details and "reference:" in caught.value.details


def test_prediction_mostly_outside_the_reference_warns(tmp_path):
    big = grid((8, 7, 6))
    small = sitk.Image([8, 7, 2], sitk.sitkInt16)
    small.SetSpacing(big.GetSpacing())
    small.SetOrigin(big.GetOrigin())
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[:, 2:5, 2:5] = 1  # all 6 slices; the reference grid holds the first 2
    write_labelmap(tmp_path / "pred.nii.gz", labels, big)
    write_labelmap(tmp_path / "ref.nii.gz", labels[:2], small)
    with pytest.warns(UserWarning, match="only 33% of the labelled volume"):
        metrics = evaluate_files(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", {1: "liver"})
    assert metrics["dice"]["liver"] == pytest.approx(1.0)


def test_format_table_and_write_metrics(tmp_path):
    metrics = {
        "prediction": "p.nii.gz", "reference": "r.nii.gz",
        "dice": {"liver": 0.9512, "inferior_vena_cava": None, "spleen": np.float64(0.5)},
        "hd95_mm": {"liver": 3.25, "inferior_vena_cava": None, "spleen": 12.0},
        "mean_dice": 0.7256,
        "voxels": {"liver": {"prediction": 1200, "reference": 1187},
                   "inferior_vena_cava": {"prediction": 0, "reference": 0},
                   "spleen": {"prediction": 10, "reference": 30}},
        "only_in_prediction": [], "only_in_reference": ["heart"],
    }
    table = format_table(metrics)
    lines = table.splitlines()
    assert lines[0].split() == ["organ", "Dice", "HD95", "mm", "voxels", "pred", "voxels", "ref"]
    assert lines[2].split() == ["liver", "0.951", "3.2", "1200", "1187"] or \
        lines[2].split() == ["liver", "0.951", "3.3", "1200", "1187"]
    assert lines[3].split() == ["spleen", "0.500", "12.0", "10", "30"]
    assert "inferior_vena_cava" not in table  # absent from both: counted, not listed
    assert lines[-1].startswith("mean") and "0.726" in lines[-1] and "1 absent from both" in lines[-1]
    # Columns line up: the Dice column ends at the same place on every organ line.
    ends = {line.index(line.split()[1]) + len(line.split()[1]) for line in lines[2:-1]}
    assert len(ends) == 1
    assert "HD95" not in format_table({k: v for k, v in metrics.items() if k != "hd95_mm"})

    out = write_metrics(tmp_path / "run" / "metrics.json", metrics)
    assert sorted(p.name for p in out.parent.iterdir()) == ["metrics.json"]
    back = json.loads(out.read_text())
    assert back["dice"] == {"liver": 0.9512, "inferior_vena_cava": None, "spleen": 0.5}
    assert back["only_in_reference"] == ["heart"]
