"""Reading and writing images and label maps (ContrastiveSegLib.data.io), on real files."""

from __future__ import annotations

import gzip
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY_ARGS, run_cli, write_dataset

from ContrastiveSegLib.data import io as io_module
from ContrastiveSegLib.data.io import (
    check_same_grid,
    describe_geometry,
    read_image,
    read_label_image,
    resample_label_image,
    resample_to_reference,
    same_grid,
    write_image,
    write_labelmap,
)
from ContrastiveSegLib.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = REPO_ROOT / "ContrastiveSegLib" / "sample_data"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
LIVER = 5


def small_image(size_xyz=(6, 5, 4), spacing=(1.5, 2.0, 3.0), origin=(10.0, -20.0, 30.0),
                direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), pixel=sitk.sitkFloat32) -> sitk.Image:
    image = sitk.Image(list(size_xyz), pixel)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection([float(d) for d in direction])
    return image


def only_files(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- sample data

def test_read_sample_ct():
    image = read_image(SAMPLE / "abdomen_ct.nii.gz")
    assert image.GetSize() == (122, 101, 30)
    assert image.GetSpacing() == pytest.approx((3.0, 3.0, 3.0))
    assert image.GetPixelID() == sitk.sitkFloat32
    voxels = sitk.GetArrayViewFromImage(image)
    assert voxels.shape == (30, 101, 122)
    assert voxels.min() == pytest.approx(-1100) and voxels.max() == pytest.approx(1207)


def test_read_sample_labels_are_on_the_ct_grid():
    ct = read_image(SAMPLE / "abdomen_ct.nii.gz")
    labels = read_label_image(SAMPLE / "abdomen_ct_labels.nii.gz")
    assert labels.segments == []
    assert len(labels.layers) == 1
    layer = labels.layers[0]
    assert layer.dtype == np.int32 and layer.shape == (30, 101, 122)
    names = {int(k): v for k, v in json.loads((SAMPLE / "dataset.json").read_text())["labels"].items()}
    assert {1, 2, 3, 5, 6, 7} <= labels.values()
    assert labels.values() <= set(names) - {0}
    assert names[LIVER] == "liver" and np.count_nonzero(layer == LIVER) > 1000
    assert labels.image.GetPixelID() == sitk.sitkInt32
    assert same_grid(ct, labels.image)
    check_same_grid(ct, labels.image, "abdomen_ct.nii.gz", "abdomen_ct_labels.nii.gz")  # no error
    table = labels.segment_table({0: "background", 5: "liver"})
    assert [(s.name, s.label_value) for s in table] == [("liver", 5)]
    assert labels.mask(table[0]).sum() == np.count_nonzero(layer == LIVER)


def test_read_dicom_series_geometry():
    image = read_image(SAMPLE / "heldout" / "ct_dicom")
    assert image.GetSize() == (512, 512, 20)
    assert image.GetSpacing() == pytest.approx((0.977, 0.977, 2.0), abs=1e-3)
    assert image.GetPixelID() == sitk.sitkFloat32
    assert np.asarray(image.GetDirection()) == pytest.approx(np.eye(3).flatten())


def test_flipped_heldout_label_resampled_onto_dicom_grid_keeps_the_liver():
    ct = read_image(SAMPLE / "heldout" / "ct_dicom")
    labels = read_label_image(SAMPLE / "heldout" / "ct_dicom_labels.nii.gz")
    assert not same_grid(ct, labels.image)  # y is flipped
    assert labels.image.GetDirection()[4] == pytest.approx(-1.0)
    before = np.count_nonzero(labels.layers[0] == LIVER)
    moved = resample_to_reference(labels.image, ct, "nearest")
    assert same_grid(moved, ct)
    after = np.count_nonzero(sitk.GetArrayViewFromImage(moved) == LIVER)
    assert before > 10000
    assert abs(after - before) <= 0.01 * before
    # The flip really happened: the resampled array is the original upside down in y.
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(moved), labels.layers[0][:, ::-1, :])
    whole = resample_label_image(labels, ct)
    assert same_grid(whole.image, ct)
    np.testing.assert_array_equal(whole.layers[0], sitk.GetArrayViewFromImage(moved))


def test_shared_dcmqi_labelmaps():
    folder = SHARED_DATA / "dcmqi"
    if not folder.is_dir():
        pytest.skip(f"shared test data not found at {folder}")
    both = read_label_image(folder / "liver_spine_seg.nrrd")
    liver = read_label_image(folder / "liver_seg.nrrd")
    assert both.values() == {1, 2} and liver.values() == {1}
    assert both.image.GetSize() == (512, 512, 3)
    assert both.image.GetSpacing() == pytest.approx((0.810547, 0.810547, 1.0))
    assert same_grid(both.image, liver.image)
    np.testing.assert_array_equal(both.layers[0] == 1, liver.layers[0] == 1)


# --------------------------------------------------------------------------- DICOM folders

def write_dicom_series(folder: Path, series_uid: str, slices: int, first_instance: int) -> None:
    for k in range(slices):
        image = sitk.GetImageFromArray(np.full((8, 8), 100 + k, dtype=np.int16))
        image.SetSpacing((0.5, 0.5))
        tags = {
            "0008|0060": "CT",
            "0010|0020": "TEST",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": f"0\\0\\{2.0 * k}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": "0.5\\0.5",
            "0008|0018": f"1.2.826.0.1.3680043.2.1125.9.{first_instance + k}",
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{first_instance + k:03d}.dcm"))
        writer.Execute(image)


def test_dicom_folder_with_two_series_reads_the_largest_and_warns(tmp_path):
    write_dicom_series(tmp_path, "1.2.826.0.1.3680043.2.1125.2", slices=4, first_instance=0)
    write_dicom_series(tmp_path, "1.2.826.0.1.3680043.2.1125.3", slices=3, first_instance=100)
    with pytest.warns(UserWarning, match="2 DICOM series"):
        image = read_image(tmp_path)
    assert image.GetSize() == (8, 8, 4)
    assert image.GetSpacing() == pytest.approx((0.5, 0.5, 2.0))


def test_folder_without_dicom_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="without a DICOM series") as caught:
        read_image(tmp_path)
    assert str(tmp_path) in str(caught.value)


# --------------------------------------------------------------------------- read errors

def test_missing_file(tmp_path):
    missing = tmp_path / "nope.nii.gz"
    for reader in (read_image, read_label_image):
        with pytest.raises(InputError, match="does not exist") as caught:
            reader(missing)
        assert str(missing) in str(caught.value)


def test_garbage_file_is_unreadable_and_lists_the_formats(tmp_path):
    garbage = tmp_path / "broken.nii.gz"
    garbage.write_bytes(gzip.compress(os.urandom(300)))
    with pytest.raises(InputError, match="could not be read") as caught:
        read_image(garbage)
    message = str(caught.value)
    assert str(garbage) in message and "NIfTI" in message and "DICOM" in message
    with pytest.raises(InputError, match="could not be read"):
        read_label_image(garbage)


def test_2d_image_is_an_error(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16), np.int16)), str(path))
    with pytest.raises(InputError, match="is 2D; ContrastiveSeg needs 3D volumes") as caught:
        read_image(path)
    assert str(path) in str(caught.value)


def test_single_slice_is_an_error_that_mentions_dicom_folders(tmp_path):
    path = tmp_path / "one.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 16, 16), np.int16)), str(path))
    with pytest.raises(InputError, match="single slice") as caught:
        read_image(path)
    assert "folder" in str(caught.value)


def test_4d_image_with_several_volumes_is_an_error_but_one_volume_is_fine(tmp_path):
    many = tmp_path / "many.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([small_image()] * 3), str(many))
    with pytest.raises(InputError, match="4D with 3 volumes"):
        read_image(many)
    one = tmp_path / "one.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([small_image()]), str(one))
    image = read_image(one)
    assert image.GetDimension() == 3 and image.GetSize() == (6, 5, 4)


def test_multi_component_image_is_an_error(tmp_path):
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True), str(path))
    with pytest.raises(InputError, match="3 values per voxel"):
        read_image(path)


def test_nan_voxels_are_counted(tmp_path):
    array = np.zeros((4, 5, 6), np.float32)
    array[0, 0, :3] = np.nan
    array[1, 1, 1] = np.inf
    # NRRD keeps NaN; ITK's NIfTI reader already turns NaN into 0 on reading.
    path = tmp_path / "nan.nrrd"
    image = sitk.GetImageFromArray(array)
    sitk.WriteImage(image, str(path))
    with pytest.raises(InputError, match="4 of 120 voxels that are NaN or infinite") as caught:
        read_image(path)
    assert "What to do" in str(caught.value)


def test_integral_float_labels_are_accepted_and_fractional_ones_refused(tmp_path):
    array = np.zeros((4, 5, 6), np.float32)
    array[1, 1:3, 1:4] = 2.0
    good = tmp_path / "float_labels.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(good))
    labels = read_label_image(good)
    assert labels.layers[0].dtype == np.int32 and labels.values() == {2}

    array[0, 0, 0] = 0.5
    bad = tmp_path / "probabilities.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(bad))
    with pytest.raises(InputError, match="1 voxels with fractional values") as caught:
        read_label_image(bad)
    assert "nearest-neighbour" in str(caught.value)


def test_negative_labels_are_refused(tmp_path):
    path = tmp_path / "negative.nii.gz"
    array = np.zeros((4, 5, 6), np.int16)
    array[0, 0, 0] = -1
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    with pytest.raises(InputError, match="negative"):
        read_label_image(path)


def test_label_folder_is_an_error(tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        read_label_image(tmp_path)


# --------------------------------------------------------------------------- geometry

def test_describe_geometry():
    text = describe_geometry(small_image(direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)))
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("size:") and "6 x 5 x 4 voxels" in lines[0]
    assert "1.5 x 2 x 3 mm" in lines[1]
    assert "(10, -20, 30) mm" in lines[2]
    assert "(-1, 0, 0) (0, -1, 0) (0, 0, 1)" in lines[3] and "R, A, S" in lines[3]


def test_same_grid_tolerance():
    a = small_image()
    b = small_image(origin=(10.0004, -20.0, 30.0))
    c = small_image(origin=(10.1, -20.0, 30.0))
    assert same_grid(a, b) and not same_grid(a, c)
    assert not same_grid(a, small_image(size_xyz=(6, 5, 5)))
    assert not same_grid(a, small_image(direction=(1, 0, 0, 0, -1, 0, 0, 0, 1)))


def test_grid_mismatch_prints_both_geometries():
    image = small_image()
    label = small_image(spacing=(1.5, 2.0, 2.5))
    with pytest.raises(InputError) as caught:
        check_same_grid(image, label, "/data/ct.nii.gz", "/data/ct_labels.nii.gz")
    error = caught.value
    assert error.path == "/data/ct_labels.nii.gz"
    assert "ct.nii.gz" in error.problem
    details = error.details.splitlines()
    assert "image: ct.nii.gz" in details[0] and "label: ct_labels.nii.gz" in details[0]
    spacing_line = next(line for line in details if line.startswith("spacing"))
    assert "1.5 x 2 x 3 mm" in spacing_line and "1.5 x 2 x 2.5 mm" in spacing_line
    assert spacing_line.endswith("<- differs")
    assert not next(line for line in details if line.startswith("size")).endswith("<- differs")
    assert "Resample Scalar/Vector/DWI Volume" in str(error)


# --------------------------------------------------------------------------- writing

def test_write_image_round_trip(tmp_path):
    reference = small_image(direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    array = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    for name in ("ct.nii.gz", "ct.nrrd", "ct.mha", "ct.nii"):
        path = write_image(tmp_path / name, array, reference)
        back = sitk.ReadImage(str(path))
        assert same_grid(back, reference)
        np.testing.assert_allclose(sitk.GetArrayViewFromImage(back), array)
    assert only_files(tmp_path) == ["ct.mha", "ct.nii", "ct.nii.gz", "ct.nrrd"]


def test_write_image_checks_shape_and_extension(tmp_path):
    reference = small_image()
    with pytest.raises(ValueError, match="shape"):
        write_image(tmp_path / "x.nii.gz", np.zeros((5, 5, 6), np.float32), reference)
    with pytest.raises(InputError, match="unsupported extension '.png'"):
        write_image(tmp_path / "x.png", np.zeros((4, 5, 6), np.float32), reference)


def test_write_labelmap_round_trip_is_atomic(tmp_path):
    reference = small_image(direction=(0, 1, 0, 1, 0, 0, 0, 0, -1))
    labels = np.zeros((4, 5, 6), np.int64)
    labels[1:3, 2:4, 1:5] = 3
    labels[0, 0, 0] = 200
    out = tmp_path / "nested" / "pred.nii.gz"
    write_labelmap(out, labels, reference, names={3: "liver"})
    assert only_files(out.parent) == ["pred.nii.gz"]
    back = read_label_image(out)
    assert same_grid(back.image, reference)
    np.testing.assert_array_equal(back.layers[0], labels)
    assert sitk.ReadImage(str(out)).GetPixelID() == sitk.sitkUInt8
    # Overwriting leaves no temporary file either.
    write_labelmap(out, labels * 0, reference)
    assert only_files(out.parent) == ["pred.nii.gz"]
    assert read_label_image(out).values() == set()


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    reference = small_image()
    out = tmp_path / "pred.nii.gz"
    write_labelmap(out, np.ones((4, 5, 6), np.uint8), reference)
    before = out.read_bytes()

    def half_write(image, filename, useCompression=False):
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError("Description: disk full")

    monkeypatch.setattr(io_module.sitk, "WriteImage", half_write)
    with pytest.raises(InputError, match="could not be written") as caught:
        write_labelmap(out, np.zeros((4, 5, 6), np.uint8), reference)
    assert "disk full" in str(caught.value)
    assert out.read_bytes() == before
    assert only_files(tmp_path) == ["pred.nii.gz"]


def test_unwritable_folder_names_the_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    target = blocker / "sub" / "pred.nii.gz"
    with pytest.raises(InputError) as caught:
        write_labelmap(target, np.zeros((4, 5, 6), np.uint8), small_image())
    assert str(blocker) in str(caught.value)
    assert "folder" in str(caught.value)
    with pytest.raises(InputError, match="folder"):
        write_image(blocker / "ct.nii.gz", np.zeros((4, 5, 6), np.float32), small_image())
    assert only_files(tmp_path) == ["a_file"]


def test_resample_linear_and_bad_interpolator():
    source = small_image()
    source += 5.0
    target = small_image(spacing=(0.75, 1.0, 1.5), size_xyz=(12, 10, 8))
    moved = resample_to_reference(source, target, "linear", default_value=-1)
    assert same_grid(moved, target)
    values = sitk.GetArrayViewFromImage(moved)
    assert set(np.unique(values)) <= {-1.0, 5.0} and (values == 5.0).any()
    with pytest.raises(ValueError, match="interpolator"):
        resample_to_reference(source, target, "cubic")


def test_read_image_does_not_warn_for_a_single_series():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_image(SAMPLE / "heldout" / "ct_dicom")


# --------------------------------------------------------------------------- damaged files (data/integrity.py)

def truncated_copy(source: Path, target: Path, keep: float = 0.5) -> Path:
    """The first ``keep`` share of the bytes of ``source``, as a half-finished copy would leave."""
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def test_truncated_nifti_image_is_refused_though_simpleitk_reads_it(tmp_path):
    broken = truncated_copy(SAMPLE / "abdomen_ct.nii.gz", tmp_path / "half.nii.gz")
    zeros = float(np.mean(sitk.GetArrayFromImage(sitk.ReadImage(str(broken))) == 0))
    assert zeros > 0.4  # what goes wrong without the check: the missing half reads as zeros, silently
    with pytest.raises(InputError, match="truncated compressed NIfTI image") as caught:
        read_image(broken)
    assert str(broken) in str(caught.value) and "What to do" in str(caught.value)
    uncompressed = tmp_path / "full.nii"
    sitk.WriteImage(sitk.ReadImage(str(SAMPLE / "abdomen_ct.nii.gz")), str(uncompressed))
    with pytest.raises(InputError, match="50 % of the voxels are missing"):
        read_image(truncated_copy(uncompressed, tmp_path / "half.nii"))


def test_truncated_nifti_label_map_is_refused(tmp_path):
    broken = truncated_copy(SAMPLE / "abdomen_ct_labels.nii.gz", tmp_path / "labels.nii.gz", keep=0.8)
    with pytest.raises(InputError, match="truncated compressed NIfTI label map") as caught:
        read_label_image(broken)
    assert str(broken) in str(caught.value)


def test_complete_nifti_in_two_gzip_members_is_accepted(tmp_path):
    """A complete file whose gzip trailer does not state the whole size (concatenated members) is read."""
    raw = gzip.decompress((SAMPLE / "abdomen_ct.nii.gz").read_bytes())
    two_members = tmp_path / "two.nii.gz"
    two_members.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    expected = sitk.GetArrayFromImage(read_image(SAMPLE / "abdomen_ct.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(two_members)), expected)


def _sample_ct_piece_with(values: dict, pixel_type=sitk.sitkFloat32) -> sitk.Image:
    image = sitk.ReadImage(str(SAMPLE / "abdomen_ct.nii.gz"), pixel_type)[:, :, :6]
    array = sitk.GetArrayFromImage(image)
    for index, value in values.items():
        array[index] = value
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(image)
    return result


def test_nan_and_infinite_voxels_in_nifti_image_and_label_are_refused(tmp_path):
    image_path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(_sample_ct_piece_with({(1, 2, 3): np.nan, (4, 5, 6): np.inf}), str(image_path))
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(image_path)))).all()  # ITK zero-fills them
    with pytest.raises(InputError, match="2 of 73932 voxels that are NaN or infinite") as caught:
        read_image(image_path)
    assert str(image_path) in str(caught.value)
    label = sitk.ReadImage(str(SAMPLE / "abdomen_ct_labels.nii.gz"), sitk.sitkFloat32)[:, :, :6]
    array = sitk.GetArrayFromImage(label)
    array[2, 50, 60] = -np.inf
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(label)
    label_path = tmp_path / "labels.nii"
    sitk.WriteImage(broken, str(label_path))
    with pytest.raises(InputError, match="1 of 73932 voxels that are NaN or infinite") as caught:
        read_label_image(label_path)
    assert str(label_path) in str(caught.value)


def write_ct_series(folder: Path, heights_mm) -> list:
    """Slices of the sample CT as a DICOM series, slice k at height ``heights_mm[k]``; returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    ct = sitk.ReadImage(str(SAMPLE / "abdomen_ct.nii.gz"))
    hu = sitk.GetArrayFromImage(ct).astype(np.int16)
    spacing = ct.GetSpacing()
    files = []
    for k, height in enumerate(heights_mm):
        image = sitk.GetImageFromArray(hu[k])
        image.SetSpacing(spacing[:2])
        tags = {
            "0008|0060": "CT", "0010|0020": "TEST", "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.7", "0020|0013": str(k + 1),
            "0020|0032": f"0\\0\\{height:g}", "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{spacing[1]:g}\\{spacing[0]:g}", "0008|0018": f"1.2.826.0.1.3680043.2.1125.8.{k}",
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        path = folder / f"slice{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(image)
        files.append(path)
    return files


def test_dicom_series_with_a_truncated_slice_is_refused(tmp_path):
    files = write_ct_series(tmp_path / "series", [3.0 * k for k in range(8)])
    assert read_image(tmp_path / "series").GetSize() == (122, 101, 8)
    truncated_copy(files[4], files[4])
    with pytest.raises(InputError, match=r"1 DICOM file\(s\) that could not be read .*slice004.dcm") as caught:
        read_image(tmp_path / "series")
    assert str(tmp_path / "series") in str(caught.value)


def test_dicom_series_with_uneven_slice_spacing_names_the_gap(tmp_path):
    write_ct_series(tmp_path / "gap", [0.0, 3.0, 6.0, 9.0, 15.0, 18.0, 21.0, 24.0])
    with pytest.raises(InputError, match=r"most slices are 3 mm apart, but slice003.dcm \(at 9 mm\) and "
                                         r"slice004.dcm \(at 15 mm\) are 6 mm apart") as caught:
        read_image(tmp_path / "gap")
    assert str(tmp_path / "gap") in str(caught.value)
    write_ct_series(tmp_path / "rounded", [0.0, 3.0, 6.01, 9.0, 12.0])  # scanner rounding is not a gap
    assert read_image(tmp_path / "rounded").GetSize() == (122, 101, 5)


def _damage(kind: str, path: Path) -> None:
    """Make the NIfTI file at ``path`` truncated or give it a NaN voxel (as float32)."""
    if kind == "truncated":
        truncated_copy(path, path, keep=0.6)
        return
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[3, 40, 40] = np.nan
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    sitk.WriteImage(broken, str(path))


@pytest.mark.parametrize("damaged", ["image", "label"])
@pytest.mark.parametrize("kind", ["truncated", "nan"])
def test_damaged_training_file_stops_finetune_before_anything_is_written(tmp_path, sample_pieces,
                                                                         sample_label_map, damaged, kind):
    folder = Path(write_dataset(str(tmp_path / "data"), {"upper": sample_pieces["upper"],
                                                         "lower": sample_pieces["lower"]}, sample_label_map))
    broken = folder / ("imagesTr" if damaged == "image" else "labelsTr") / "lower.nii.gz"
    _damage(kind, broken)
    run = tmp_path / "run"
    result = run_cli(["finetune", "--data", folder, "--labels", "liver", "--out", run, "--max-steps", "1"]
                     + TINY_ARGS)
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(broken) in result.stderr
    assert ("truncated" if kind == "truncated" else "NaN or infinite") in result.stderr
    # Refused while reading the cases: no config, weights or labels; at most the error event is recorded.
    assert (sorted(p.name for p in run.iterdir()) if run.exists() else []) in ([], ["events.jsonl"])
