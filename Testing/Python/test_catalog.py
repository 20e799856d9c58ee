"""Dataset specs, label names across datasets, and their errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from ContrastiveSegLib.data.catalog import check_target_names, load_dataset, load_datasets
from ContrastiveSegLib.data.labels import canonical_name, parse_label_map, parse_target_names
from ContrastiveSegLib.errors import InputError


def test_label_map_both_directions_and_regions():
    msd = parse_label_map({"0": "background", "1": "Liver", "2": "left kidney"}, "x.json")
    nnunet = parse_label_map({"background": 0, "liver": 1, "lung": [10, 11, 12], "left-kidney": 2}, "y.json")
    # "left kidney" is TotalSegmentator's kidney_left (issue 10, defect 9: one organ, one name)
    assert msd == {"liver": [1], "kidney_left": [2]}
    assert nnunet == {"liver": [1], "lung": [10, 11, 12], "kidney_left": [2]}


def test_label_map_rejects_nonsense():
    with pytest.raises(InputError, match="x.json.*expected label values"):
        parse_label_map({"liver": [1.5]}, "x.json")
    with pytest.raises(InputError, match="x.json.*expected label values"):
        parse_label_map({"liver": []}, "x.json")
    with pytest.raises(InputError, match="no usable 'labels'"):
        parse_label_map({}, "x.json")


def test_target_names_are_canonical_and_unique():
    assert parse_target_names(" Liver, spleen ,liver,Kidney Left") == ["liver", "spleen", "kidney_left"]
    assert canonical_name("Inferior-Vena  Cava") == "inferior_vena_cava"
    with pytest.raises(InputError, match="background"):
        parse_target_names("background,liver")


def test_msd_dataset_json(sample_dir):
    dataset = load_dataset(os.path.join(sample_dir, "dataset.json"))
    assert len(dataset.cases) == 1
    case = dataset.cases[0]
    assert case.case_id.endswith("/abdomen_ct_labels")
    assert os.path.exists(case.image) and os.path.exists(case.label)
    assert dataset.label_map["liver"] == [5] and dataset.label_map["spleen"] == [1]


def test_dicom_folder_case(sample_dir):
    dataset = load_dataset(os.path.join(sample_dir, "heldout"))
    assert os.path.isdir(dataset.cases[0].image)


def test_nnunet_v2_layout(tmp_path, sample_pieces):
    root = tmp_path / "Dataset001_Test"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for name in ("upper", "lower"):
        image, label = sample_pieces[name]
        sitk.WriteImage(image, str(root / "imagesTr" / f"{name}_0000.nii.gz"))
        sitk.WriteImage(label, str(root / "labelsTr" / f"{name}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 5}, "file_ending": ".nii.gz",
                                                   "channel_names": {"0": "CT"}}))
    dataset = load_dataset(str(root))
    assert sorted(c.case_id for c in dataset.cases) == ["Dataset001_Test/lower", "Dataset001_Test/upper"]


def test_folder_of_images_and_labels(tmp_path, sample_pieces):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    image, label = sample_pieces["upper"]
    sitk.WriteImage(image, str(tmp_path / "images" / "a.nrrd"))
    sitk.WriteImage(label, str(tmp_path / "labels" / "a.nrrd"))
    with pytest.raises(InputError, match="no labels.json"):
        load_dataset(str(tmp_path))
    (tmp_path / "labels.json").write_text(json.dumps({"5": "liver"}))
    dataset = load_dataset(str(tmp_path))
    assert dataset.label_map == {"liver": [5]} and len(dataset.cases) == 1


def test_duplicate_case_ids_are_an_error(tmp_path, sample_pieces):
    image, label = sample_pieces["upper"]
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        sitk.WriteImage(image, str(tmp_path / sub / "img.nii.gz"))
        sitk.WriteImage(label, str(tmp_path / sub / "case1.nii.gz"))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"5": "liver"}, "training": [
        {"image": "a/img.nii.gz", "label": "a/case1.nii.gz"}, {"image": "b/img.nii.gz", "label": "b/case1.nii.gz"}]}))
    with pytest.raises(InputError) as error:
        load_dataset(str(tmp_path))
    assert "duplicate case id 'case1'" in str(error.value)
    assert "unique file name" in str(error.value)


def test_same_dataset_twice_gets_distinct_names_but_same_image_is_refused(tiny_dataset):
    with pytest.raises(InputError, match="the same image is used twice"):
        load_datasets([tiny_dataset, tiny_dataset])


def test_missing_and_broken_specs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_dataset(str(tmp_path / "nope"))
    bad = tmp_path / "dataset.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_dataset(str(bad))


def test_unknown_label_name_lists_what_exists(tiny_dataset, sample_dir):
    datasets = load_datasets([tiny_dataset, os.path.join(sample_dir, "heldout")])
    with pytest.raises(InputError) as error:
        check_target_names(datasets, ["liver", "livr"])
    message = str(error.value)
    assert "--labels: unknown label name(s): livr" in message
    assert "pieces" in message and "spleen" in message  # lists each dataset's names


def test_target_missing_from_one_dataset_warns(tmp_path, tiny_dataset, sample_pieces):
    other = tmp_path / "liver_only"
    other.mkdir()
    image, label = sample_pieces["upper"]
    sitk.WriteImage(image, str(other / "img.nii.gz"))
    sitk.WriteImage(label, str(other / "lab.nii.gz"))
    (other / "dataset.json").write_text(json.dumps({"labels": {"5": "liver"},
                                                    "training": [{"image": "img.nii.gz", "label": "lab.nii.gz"}]}))
    with pytest.warns(UserWarning, match="does not label spleen"):
        check_target_names(load_datasets([tiny_dataset, str(other)]), ["liver", "spleen"])


def test_values_missing_from_label_map_are_an_error(tmp_path, sample_pieces):
    from ContrastiveSegLib.config import PreprocessConfig
    from ContrastiveSegLib.data.preprocess import CasePreparer

    image, label = sample_pieces["upper"]
    sitk.WriteImage(image, str(tmp_path / "img.nii.gz"))
    sitk.WriteImage(label, str(tmp_path / "lab.nii.gz"))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"5": "liver", "1": "spleen"},
                                                       "training": [{"image": "img.nii.gz", "label": "lab.nii.gz"}]}))
    case = load_dataset(str(tmp_path)).cases[0]
    with pytest.raises(InputError) as error:
        CasePreparer(PreprocessConfig(spacing=(6, 6, 6)), ["liver"]).prepare(case)
    assert "lab.nii.gz" in str(error.value) and "does not name" in str(error.value)
    assert "2, 3" in str(error.value)  # the unnamed values are listed


def test_case_without_target_organs_is_skipped_with_a_warning(tmp_path, sample_pieces):
    from ContrastiveSegLib.config import PreprocessConfig
    from ContrastiveSegLib.data.preprocess import CasePreparer

    image, label = sample_pieces["upper"]
    empty = sitk.Image(label.GetSize(), label.GetPixelID())
    empty.CopyInformation(label)
    sitk.WriteImage(image, str(tmp_path / "img.nii.gz"))
    sitk.WriteImage(empty, str(tmp_path / "lab.nii.gz"))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"5": "liver"},
                                                       "training": [{"image": "img.nii.gz", "label": "lab.nii.gz"}]}))
    case = load_dataset(str(tmp_path)).cases[0]
    with pytest.warns(UserWarning, match="it is skipped"):
        assert CasePreparer(PreprocessConfig(spacing=(6, 6, 6)), ["liver"]).prepare(case) is None


def test_flipped_label_grid_is_realigned_but_a_shifted_one_is_refused(tmp_path, sample_pieces, sample_label_map):
    from ContrastiveSegLib.config import PreprocessConfig
    from ContrastiveSegLib.data.preprocess import CasePreparer, same_voxels_reordered

    image, label = sample_pieces["upper"]
    flipped = sitk.Flip(label, [False, True, False], flipAboutOrigin=False)  # same voxels, y axis reversed
    assert same_voxels_reordered(image, flipped)
    shifted = sitk.Image(label)
    shifted.SetOrigin([o + 1.5 for o in label.GetOrigin()])
    assert not same_voxels_reordered(image, shifted)

    def prepared_with(label_image, folder):
        folder.mkdir()
        sitk.WriteImage(image, str(folder / "img.nii.gz"))
        sitk.WriteImage(label_image, str(folder / "lab.nii.gz"))
        (folder / "dataset.json").write_text(json.dumps({"labels": sample_label_map,
                                                         "training": [{"image": "img.nii.gz", "label": "lab.nii.gz"}]}))
        return CasePreparer(PreprocessConfig(spacing=(3, 3, 3)), ["liver"]).prepare(load_dataset(str(folder)).cases[0])

    original = prepared_with(label, tmp_path / "a")
    realigned = prepared_with(flipped, tmp_path / "b")
    np.testing.assert_array_equal(original.label, realigned.label)
    with pytest.raises(InputError) as error:
        prepared_with(shifted, tmp_path / "c")
    message = str(error.value)
    assert "not on the same voxel grid" in message and "origin" in message and "differs" in message


def test_shipped_sample_has_its_license():
    from conftest import SAMPLE_DIR

    assert os.path.exists(os.path.join(SAMPLE_DIR, "LICENSE"))
    assert "Apache" in open(os.path.join(SAMPLE_DIR, "LICENSE"), encoding="utf-8").read()
