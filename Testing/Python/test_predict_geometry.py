"""Prediction lands on the input's own grid, whatever its orientation or spacing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY_ARGS, dice, run_cli, tiny_config

from ContrastiveSegLib.data.io import read_label_image
from ContrastiveSegLib.engine.inference import load_model, predict_image
from ContrastiveSegLib.finetune import run_finetune


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, sample_dir):
    """A tiny U-Net fitted to the sample CT's liver and spleen for long enough to give stable organs."""
    run = tmp_path_factory.mktemp("geometry") / "run"
    config = tiny_config([sample_dir], ["liver", "spleen"], max_steps=80, batch_size=2)
    config.model.size = "small"
    config.preprocess.spacing = (4.0, 4.0, 4.0)
    run_finetune(config, str(run), progress=False)
    return str(run)


def _copies(image: sitk.Image) -> dict:
    """Re-oriented, flipped and re-sampled copies of ``image`` (same anatomy, other grids).

    The re-sampled copy has half the spacing on the same origin: its linear
    interpolation reproduces the original's trilinear intensity function
    exactly, so any difference in the prediction comes from geometry handling,
    not from a changed input.
    """
    flipped = sitk.Flip(image, [True, False, True])
    permuted = sitk.PermuteAxes(image, [2, 0, 1])
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(image)
    resampler.SetOutputSpacing([s / 2 for s in image.GetSpacing()])
    resampler.SetSize([2 * n - 1 for n in image.GetSize()])
    resampler.SetInterpolator(sitk.sitkLinear)
    return {"flipped": flipped, "permuted": permuted, "resampled": resampler.Execute(image)}


def test_predictions_agree_across_grids(trained_run, sample_dir, tmp_path):
    import torch

    model = load_model(trained_run, torch.device("cpu"))
    original = sitk.ReadImage(f"{sample_dir}/abdomen_ct.nii.gz", sitk.sitkFloat32)
    reference_labels, _ = predict_image(model, "original", image=original)
    assert (reference_labels == 1).sum() > 1000, "the fixture model should find the liver"
    scores = {}
    for name, copy in _copies(original).items():
        path = tmp_path / f"{name}.nrrd"
        sitk.WriteImage(copy, str(path))
        labels, grid = predict_image(model, str(path))
        assert labels.shape == sitk.GetArrayViewFromImage(copy).shape  # on the copy's own grid
        predicted = sitk.GetImageFromArray(labels)
        predicted.CopyInformation(grid)
        back = sitk.GetArrayFromImage(sitk.Resample(predicted, original, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        for value, organ in ((1, "liver"), (2, "spleen")):
            scores[f"{name} {organ}"] = round(dice(back == value, reference_labels == value), 4)
    assert min(scores.values()) >= 0.95, scores


def test_predict_and_evaluate_commands(trained_run, sample_dir, tmp_path, sample_label_map):
    out = tmp_path / "pred.seg.nrrd"
    result = run_cli(["predict", "--model", trained_run, "--image", f"{sample_dir}/abdomen_ct.nii.gz", "--out", out])
    assert result.returncode == 0, result.stderr
    segmentation = read_label_image(str(out))
    assert {s.name for s in segmentation.segments} <= {"liver", "spleen"}
    assert all(s.color is not None for s in segmentation.segments)
    image = sitk.ReadImage(f"{sample_dir}/abdomen_ct.nii.gz")
    assert segmentation.image.GetSize() == image.GetSize()
    np.testing.assert_allclose(segmentation.image.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(segmentation.image.GetDirection(), image.GetDirection(), atol=1e-6)

    nifti = tmp_path / "pred.nii.gz"
    assert run_cli(["predict", "--model", trained_run, "--image", f"{sample_dir}/abdomen_ct.nii.gz",
                    "--out", nifti]).returncode == 0
    ref_labels = tmp_path / "ref_labels.json"
    ref_labels.write_text(json.dumps({"labels": sample_label_map}))
    metrics_path = tmp_path / "metrics.json"
    result = run_cli(["evaluate", "--pred", nifti, "--ref", f"{sample_dir}/abdomen_ct_labels.nii.gz",
                      "--model", trained_run, "--ref-labels", ref_labels, "--out", metrics_path])
    assert result.returncode == 0, result.stderr
    assert "liver" in result.stdout and "mean" in result.stdout.lower()
    metrics = json.loads(metrics_path.read_text())
    assert metrics["dice"]["liver"] > 0.5  # the model was fitted to this very scan


def test_predict_errors(trained_run, tmp_path, sample_dir):
    result = run_cli(["predict", "--model", tmp_path / "nothing", "--image", f"{sample_dir}/abdomen_ct.nii.gz",
                      "--out", tmp_path / "p.nii.gz"])
    assert result.returncode == 2 and "nothing" in result.stderr
    result = run_cli(["predict", "--model", trained_run, "--image", tmp_path / "missing.nii.gz",
                      "--out", tmp_path / "p.nii.gz"])
    assert result.returncode == 2 and "missing.nii.gz" in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "p.nii.gz").exists()
    flat = sitk.Image([20, 20], sitk.sitkFloat32)
    sitk.WriteImage(flat, str(tmp_path / "flat.nrrd"))
    result = run_cli(["predict", "--model", trained_run, "--image", tmp_path / "flat.nrrd", "--out", tmp_path / "p.nii.gz"])
    assert result.returncode == 2 and "2D" in result.stderr


def test_damaged_images_stop_predict_before_anything_is_written(trained_run, sample_dir, tmp_path):
    from test_io import truncated_copy, write_ct_series

    half = truncated_copy(Path(sample_dir) / "abdomen_ct.nii.gz", tmp_path / "half.nii.gz")
    slices = write_ct_series(tmp_path / "series", [3.0 * k for k in range(8)])
    truncated_copy(slices[5], slices[5])
    write_ct_series(tmp_path / "gap", [0.0, 3.0, 6.0, 12.0, 15.0, 18.0])
    for image, message in ((half, "truncated"), (tmp_path / "series", "slice005.dcm"),
                           (tmp_path / "gap", "6 mm apart")):
        out = tmp_path / "prediction.seg.nrrd"
        result = run_cli(["predict", "--model", trained_run, "--image", image, "--out", out])
        assert result.returncode == 2, result.stderr[-2000:]
        assert str(image) in result.stderr and message in result.stderr
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".prediction")]


def test_nan_image_is_refused_by_finetune(tmp_path, sample_pieces, sample_label_map):
    image, label = sample_pieces["upper"]
    array = sitk.GetArrayFromImage(image)
    array[5, 5, 5] = np.nan
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    folder = tmp_path / "nan"
    folder.mkdir()
    sitk.WriteImage(broken, str(folder / "img.nrrd"))  # NIfTI readers turn NaN into 0; NRRD keeps it
    sitk.WriteImage(label, str(folder / "lab.nrrd"))
    (folder / "dataset.json").write_text(json.dumps({"labels": sample_label_map,
                                                     "training": [{"image": "img.nrrd", "label": "lab.nrrd"}]}))
    result = run_cli(["finetune", "--data", folder, "--labels", "liver", "--out", tmp_path / "run"] + TINY_ARGS)
    assert result.returncode == 2
    assert "img.nrrd" in result.stderr and "NaN" in result.stderr


def _with_a_detached_copy(image: sitk.Image) -> sitk.Image:
    """``image`` padded with air along x, with a block of its own tissue pasted into that air,
    detached from the body: organ-like tissue outside the patient, as a limb or a phantom would be."""
    hu = sitk.GetArrayFromImage(image)                          # (z, y, x)
    width = hu.shape[2]
    padded = np.full((hu.shape[0], hu.shape[1], 2 * width), -1000.0, dtype=np.float32)
    padded[:, :, :width] = hu
    block = hu[:, 20:-20, width // 4: width // 2]               # liver-side tissue, without the skin
    padded[:, 20:-20, width + 10: width + 10 + block.shape[2]] = block
    result = sitk.GetImageFromArray(padded)
    result.SetSpacing(image.GetSpacing())
    result.SetOrigin(image.GetOrigin())
    result.SetDirection(image.GetDirection())
    return result


def test_organs_predicted_outside_the_body_are_background_unless_asked(trained_run, sample_dir, tmp_path):
    import torch

    from ContrastiveSegLib.engine.body import body_mask

    model = load_model(trained_run, torch.device("cpu"))
    image = _with_a_detached_copy(sitk.ReadImage(f"{sample_dir}/abdomen_ct.nii.gz", sitk.sitkFloat32))
    path = tmp_path / "with_copy.nii.gz"
    sitk.WriteImage(image, str(path))
    inside = body_mask(image)
    assert not inside[:, :, image.GetSize()[0] // 2:].any(), "the pasted copy must not be part of the body"
    masked, _ = predict_image(model, str(path))
    unmasked, _ = predict_image(model, str(path), mask_body=False)
    assert (unmasked[~inside] > 0).sum() > 500, "the model should find organs in the pasted tissue"
    assert (masked[~inside] == 0).all()
    np.testing.assert_array_equal(masked[inside], unmasked[inside])

    out = tmp_path / "unmasked.nii.gz"
    result = run_cli(["predict", "--model", trained_run, "--image", path, "--out", out, "--no-body-mask"])
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), unmasked)


def _per_channel_reference(probabilities: np.ndarray, affine: np.ndarray, reference: sitk.Image) -> np.ndarray:
    """The plain definition: every class channel resampled linearly onto ``reference``, then the arg-max."""
    from ContrastiveSegLib.data.preprocess import from_monai_array, reference_from_affine

    grid = reference_from_affine(affine, probabilities.shape[1:])
    channels = []
    for label in range(probabilities.shape[0]):
        channel = sitk.GetImageFromArray(from_monai_array(probabilities[label]))
        channel.CopyInformation(grid)
        channels.append(sitk.GetArrayFromImage(sitk.Resample(channel, reference, sitk.Transform(), sitk.sitkLinear,
                                                             1.0 if label == 0 else 0.0, sitk.sitkFloat32)))
    return np.argmax(np.stack(channels), axis=0).astype(np.uint8)


def test_labels_on_the_input_grid_equal_resampling_every_probability_channel():
    """Copying labels inside cells whose corners agree, and interpolating only the rest, changes no voxel."""
    from scipy import ndimage

    from ContrastiveSegLib.engine.inference import probabilities_to_input_grid

    rng = np.random.default_rng(0)
    logits = ndimage.gaussian_filter(rng.normal(size=(4, 30, 26, 20)), sigma=(0, 3, 3, 3)) * 40
    probabilities = np.exp(logits - logits.max(0))
    probabilities = (probabilities / probabilities.sum(0)).astype(np.float32)
    turn = 0.3   # an oblique network grid, 3 x 3 x 4 mm
    affine = np.array([[-3 * np.cos(turn), 3 * np.sin(turn), 0, 40], [3 * np.sin(turn), 3 * np.cos(turn), 0, -20],
                       [0, 0, 4, 5], [0, 0, 0, 1.0]])
    reference = sitk.Image([70, 64, 50], sitk.sitkUInt8)   # finer, axes swapped and z flipped, reaching outside
    reference.SetSpacing((1.3, 1.1, 1.7))
    reference.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    reference.SetOrigin((-60, -70, 80))
    expected = _per_channel_reference(probabilities, affine, reference)
    assert min(np.bincount(expected.ravel(), minlength=4)) > 30000   # every class, and background outside
    np.testing.assert_array_equal(probabilities_to_input_grid(probabilities, affine, reference), expected)


@pytest.mark.parametrize("spacing", [(3.0, 3.0, 3.0), (2.2, 1.7, 3.5)])
def test_network_grid_is_the_grid_monai_preprocessing_makes(sample_dir, spacing):
    from monai.data import MetaTensor

    from ContrastiveSegLib.config import PreprocessConfig
    from ContrastiveSegLib.data.preprocess import affine_from_sitk, build_preprocess_transform, to_monai_array
    from ContrastiveSegLib.engine.inference import resample_to_network_grid

    config = PreprocessConfig()
    config.spacing = spacing
    image = sitk.ReadImage(f"{sample_dir}/abdomen_ct.nii.gz", sitk.sitkFloat32)[:, :, 5:25]
    for copy in (image, sitk.Flip(image, [True, False, True]), sitk.PermuteAxes(image, [2, 0, 1])):
        full = {"image": MetaTensor(to_monai_array(sitk.GetArrayViewFromImage(copy)), affine=affine_from_sitk(copy))}
        expected = build_preprocess_transform(config, with_label=False)(full)["image"]
        on_grid = resample_to_network_grid(copy, config)
        small = {"image": MetaTensor(to_monai_array(sitk.GetArrayViewFromImage(on_grid)),
                                     affine=affine_from_sitk(on_grid))}
        result = build_preprocess_transform(config, with_label=False)(small)["image"]
        assert tuple(result.shape) == tuple(expected.shape)
        np.testing.assert_allclose(np.asarray(result.affine), np.asarray(expected.affine), atol=1e-6)
        np.testing.assert_allclose(result.numpy(), expected.numpy(), atol=1e-5)
