"""CT normalisation: ct_zscore statistics from the labelled foreground, saved once, reused at predict;
runs written before ct_zscore existed predict exactly as they did."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO_ROOT, SAMPLE_DIR, tiny_config

from ContrastiveSegLib.config import PreprocessConfig
from ContrastiveSegLib.data.catalog import load_datasets
from ContrastiveSegLib.data.preprocess import build_preprocess_transform, intensity_statistics
from ContrastiveSegLib.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OLD_RUN = os.path.join(REPO_ROOT, "Testing", "Data", "old_run")


def test_statistics_come_from_the_labelled_foreground_only():
    rng = np.random.default_rng(0)
    image = np.full((20, 20, 20), -1000.0, dtype=np.float32)      # air everywhere ...
    label = np.zeros(image.shape, dtype=np.uint8)
    label[5:15, 5:15, 5:15] = 1
    image[label > 0] = rng.normal(60.0, 20.0, size=int(label.sum()))   # ... soft tissue where labelled
    stats = intensity_statistics([(image, label)])
    foreground = image[label > 0].astype(np.float64)
    low, high = np.percentile(foreground, [0.5, 99.5])
    assert stats["clip_low"] == pytest.approx(low) and stats["clip_high"] == pytest.approx(high)
    assert stats["mean"] == pytest.approx(np.clip(foreground, low, high).mean())
    assert stats["std"] == pytest.approx(np.clip(foreground, low, high).std())
    assert stats["voxels"] == 1000
    # Whatever lies outside the labels (air, bone, the table) does not move the statistics.
    other = image.copy()
    other[label == 0] = 3000.0
    assert intensity_statistics([(other, label)]) == stats


def test_statistics_of_cases_read_the_targets_voxels(sample_dir):
    case = load_datasets([sample_dir])[0].cases[0]
    stats = intensity_statistics([case], ["liver", "spleen"])
    image = sitk.GetArrayFromImage(sitk.ReadImage(case.image))
    label = sitk.GetArrayFromImage(sitk.ReadImage(case.label))
    with open(os.path.join(sample_dir, "dataset.json"), encoding="utf-8") as handle:
        values = [int(k) for k, v in json.load(handle)["labels"].items() if v in ("liver", "spleen")]
    assert stats == intensity_statistics([(image, np.isin(label, values))])
    assert -200 < stats["mean"] < 200 and stats["clip_low"] > -1000   # organ tissue, not air


def test_zscore_maps_the_clipped_range_to_standard_scores():
    config = PreprocessConfig(spacing=(1.0, 1.0, 1.0), intensity="ct_zscore",
                              intensity_stats={"clip_low": -100.0, "clip_high": 200.0, "mean": 50.0, "std": 25.0})
    from monai.data import MetaTensor

    values = np.array([-1000.0, -100.0, 50.0, 100.0, 200.0, 900.0], dtype=np.float32).reshape(1, 6, 1, 1)
    out = build_preprocess_transform(config, with_label=False)({"image": MetaTensor(values, affine=np.eye(4))})
    np.testing.assert_allclose(out["image"].numpy().reshape(-1), [-6.0, -6.0, 0.0, 2.0, 6.0, 6.0], atol=1e-5)
    with pytest.raises(ValueError, match="statistics"):
        build_preprocess_transform(PreprocessConfig(intensity="ct_zscore"), with_label=False)


def test_statistics_are_saved_once_and_reused_by_predict(tmp_path, tiny_dataset):
    import torch

    from ContrastiveSegLib.data.preprocess import CasePreparer
    from ContrastiveSegLib.engine.inference import load_model
    from ContrastiveSegLib.finetune import run_finetune, split_cases

    config = tiny_config([tiny_dataset], ["liver", "spleen"], max_steps=2)
    config.preprocess.intensity = "ct_zscore"
    run = tmp_path / "run"
    run_finetune(config, str(run), progress=False)
    saved = json.loads((run / "config.json").read_text())["preprocess"]["intensity_stats"]
    train_cases, _ = split_cases(config, load_datasets([tiny_dataset])[0].cases, [])
    assert saved == intensity_statistics(train_cases, ["liver", "spleen"])   # the training cases only
    model = load_model(str(run), torch.device("cpu"), checkpoint="last")
    assert model.config.preprocess.intensity_stats == saved
    # Validation and predict normalise with the saved numbers: a prepared liver has mean about 0.
    prepared = CasePreparer(model.config.preprocess, ["liver"]).prepare(train_cases[0])
    liver = prepared.image[prepared.label > 0]
    assert abs(float(np.mean(liver))) < 0.5 and 0.3 < float(np.std(liver)) < 2.0
    # A resumed run keeps its statistics instead of computing new ones.
    again = tiny_config([tiny_dataset], ["liver", "spleen"], max_steps=3)
    again.preprocess.intensity = "ct_zscore"
    run_finetune(again, str(run), resume=True, progress=False)
    assert json.loads((run / "config.json").read_text())["preprocess"]["intensity_stats"] == saved


def _old_run(tmp_path) -> str:
    """The run folder of ``Testing/Data/old_run`` with its network (see its README)."""
    import torch

    from ContrastiveSegLib.config import RunConfig
    from ContrastiveSegLib.engine.checkpoint import save_checkpoint
    from ContrastiveSegLib.models import build_backbone

    run = tmp_path / "old_run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "labels.json"):
        shutil.copy(os.path.join(OLD_RUN, name), run / name)
    saved = json.loads((run / "config.json").read_text())
    config = RunConfig.from_dict(saved)
    torch.manual_seed(20240611)
    backbone = build_backbone(config.model)
    with torch.no_grad():
        backbone.net.final_conv.weight.mul_(50.0)
        backbone.net.final_conv.bias.zero_()
    save_checkpoint(str(run / "checkpoints" / "last.pt"),
                    {"kind": "finetune", "model_config": saved["model"], "model": backbone.state_dict(),
                     "labels": json.loads((run / "labels.json").read_text()), "step": 40, "best_metric": None,
                     "config": saved})
    return str(run)


def test_a_run_written_before_the_recipe_predicts_identically(tmp_path):
    import torch

    from ContrastiveSegLib.engine.inference import load_model, predict_image

    model = load_model(_old_run(tmp_path), torch.device("cpu"), checkpoint="last")
    assert model.config.preprocess.intensity == "ct_window" and model.postprocess is None
    labels, _ = predict_image(model, os.path.join(SAMPLE_DIR, "abdomen_ct.nii.gz"), overlap=0.5)
    expected = np.load(os.path.join(OLD_RUN, "expected_prediction.npz"))["labels"]
    assert (expected > 0).sum() > 10000   # the fixture's network does label tissue
    np.testing.assert_array_equal(labels, expected)
    # The sample CT has 15 slices on this 6 mm grid, one fewer than the patch: the saved config, which
    # predates the setting, keeps air beyond the scan's ends; continuing them would change the labels.
    assert model.config.preprocess.beyond_scan_ends == "air"
    model.config.preprocess.beyond_scan_ends = "continue"
    continued, _ = predict_image(model, os.path.join(SAMPLE_DIR, "abdomen_ct.nii.gz"), overlap=0.5)
    assert (continued != expected).sum() > 0


def test_beyond_the_scan_looks_like_air_after_ct_zscore():
    """A patch or sliding window that reaches past a scan is filled with the normalised air value, not 0.

    With ct_zscore, 0 is the organs' mean (soft tissue); a thin scan padded with it shows the network a
    slab of tissue that was never there.  The fill is the clip's lower bound: what air becomes.
    """
    import torch

    from ContrastiveSegLib.data.preprocess import PreparedCase, padding_value
    from ContrastiveSegLib.data.sampling import PatchSampler, SupervisedPatches
    from ContrastiveSegLib.engine.inference import sliding_window_probabilities

    stats = {"clip_low": -100.0, "clip_high": 200.0, "mean": 50.0, "std": 25.0}
    zscore = PreprocessConfig(spacing=(1.0, 1.0, 1.0), intensity="ct_zscore", intensity_stats=stats)
    air = (-100.0 - 50.0) / 25.0
    assert padding_value(zscore) == pytest.approx(air)
    assert padding_value(PreprocessConfig(spacing=(1.0, 1.0, 1.0))) == 0.0   # ct_window: 0 is already air

    # Preprocessing pads a scan thinner than the patch with air, its label with background.
    from monai.data import MetaTensor

    thin = np.full((1, 8, 8, 3), 50.0, dtype=np.float32)
    out = build_preprocess_transform(zscore, pad_to=(8, 8, 6))({"image": MetaTensor(thin, affine=np.eye(4)),
                                                               "label": MetaTensor(np.ones_like(thin),
                                                                                   affine=np.eye(4))})
    image, label = np.asarray(out["image"]), np.asarray(out["label"])
    assert image.shape == (1, 8, 8, 6)
    assert np.allclose(image[label > 0], 0.0) and np.allclose(image[label == 0], air)

    # Training patches (plain crops and spatially augmented ones) take the case's fill beyond its edge.
    case = PreparedCase("thin", np.zeros((1, 12, 12, 4), dtype=np.float32), np.ones((1, 12, 12, 4), dtype=np.uint8),
                        np.eye(4), fill=air)
    for augmentation in ("intensity", "spatial"):
        patches = SupervisedPatches(PatchSampler([case], (8, 8, 8), foreground_ratio=1.0), seed=0, length=4,
                                    augment=False, augmentation=augmentation)
        for index in range(4):
            item = patches[index]
            outside = item["label"].numpy() == 0
            assert outside.any() and np.allclose(item["image"].numpy()[outside], air)
    # The spatial path resamples (rotation, zoom) from a region of the case filled with air beyond it.
    from ContrastiveSegLib.data.views import resample_region, supervised_augment

    source = torch.stack(torch.meshgrid(*[torch.arange(8, dtype=torch.float32)] * 3, indexing="ij"), -1) - 2.0
    moved = resample_region(case.image, source, "bilinear", air)
    assert np.allclose(moved[0, :2], air) and np.allclose(moved[0, 2:, 2:, 2:6], 0.0)
    for index in range(8):   # augmented patches: intensities vary, but beyond the scan stays far below tissue
        image, label = supervised_augment(case.image, case.label, (6.0, 6.0, 1.5), (8, 8, 8),
                                          np.random.default_rng([0, index]), fill=air)
        assert np.median(image[label == 0]) < air / 2 < np.median(image[label > 0])

    # The sliding window over a scan thinner than the patch pads with the fill it is given.
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros((x.shape[0], 2) + tuple(x.shape[2:]))

    sliding_window_probabilities(Recorder(), torch.zeros(1, 8, 8, 3), (8, 8, 6), fill=air)
    window = seen[0][0, 0].numpy()
    assert np.isclose(window, air).sum() == 8 * 8 * 3 and (window == 0.0).sum() == 8 * 8 * 3


# --- a training case of another modality (MR) in a CT run --------------------------------------------------

SAMPLE_MR = os.path.join(SAMPLE_DIR, "mr")


def test_ct_units_give_the_organs_the_reference_mean_and_spread_by_hand():
    from ContrastiveSegLib.data.preprocess import ct_units

    # Organ voxels at 10 and 30 (mean 20, standard deviation 10; the percentile clip keeps both), air at 0.
    values = np.array([[[0.0, 10.0, 30.0, 10.0, 30.0, 50.0]]], dtype=np.float32)
    target = np.array([[[0, 1, 2, 1, 2, 0]]], dtype=np.uint8)
    mapped = ct_units(values, target, {"mean": 40.0, "std": 35.0})
    # (v - 20) / 10 * 35 + 40, rounded: 0 -> -30, 10 -> 5, 30 -> 75, 50 -> 145.
    np.testing.assert_array_equal(mapped, np.array([[[-30.0, 5.0, 75.0, 5.0, 75.0, 145.0]]], dtype=np.float32))
    with pytest.raises(InputError, match="one intensity"):
        ct_units(values, (values == 10.0).astype(np.uint8), {"mean": 40.0, "std": 35.0})


def test_dataset_modality_is_read_from_msd_and_nnunet_keys(tmp_path):
    from ContrastiveSegLib.data.catalog import load_dataset

    assert load_dataset(SAMPLE_DIR).cases[0].modality == "CT"
    mr = load_dataset(SAMPLE_MR).cases[0]
    assert mr.modality == "MR" and not mr.is_ct()
    with open(os.path.join(SAMPLE_MR, "dataset.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    for key, value, expected in (("modality", {"0": "ct"}, "CT"), ("channel_names", {"0": "T2"}, "T2"),
                                 ("modality", "MRI", "MRI"), ("modality", {"0": ""}, None)):
        written = {k: v for k, v in meta.items() if k != "modality"}
        written[key] = value
        written["training"] = [{"image": os.path.join(SAMPLE_MR, e["image"]),
                                "label": os.path.join(SAMPLE_MR, e["label"])} for e in meta["training"]]
        path = tmp_path / f"{key}-{expected}.json"
        path.write_text(json.dumps(written), encoding="utf-8")
        if expected is None:
            with pytest.raises(InputError, match="modality"):
                load_dataset(str(path))
        else:
            assert load_dataset(str(path)).cases[0].modality == expected


def _mr_and_ct_cases():
    return [case for dataset in load_datasets([SAMPLE_DIR, SAMPLE_MR]) for case in dataset.cases]


def test_an_mr_case_is_brought_onto_the_ct_cases_hu_scale():
    from ContrastiveSegLib.config import RunConfig
    from ContrastiveSegLib.data.preprocess import CasePreparer
    from ContrastiveSegLib.finetune import prepare_intensity_statistics

    ct, mr = _mr_and_ct_cases()
    organs = ["liver", "spleen", "stomach", "aorta"]
    config = RunConfig()
    config.preprocess.spacing = (3.0, 3.0, 3.0)
    prepare_intensity_statistics(config, [ct, mr], organs)
    reference = config.preprocess.ct_units_reference
    # From the CT case alone: the MR's intensities are not HU.
    expected = intensity_statistics([ct], organs)
    assert reference == {"mean": expected["mean"], "std": expected["std"], "voxels": expected["voxels"]}
    prepared = CasePreparer(config.preprocess, organs).prepare(mr)
    # On the 3 mm grid of the MR itself nothing is resampled, so the organs' values are the mapped ones.
    window_low, window_high = config.preprocess.window
    hu = prepared.image[0] * (window_high - window_low) + window_low
    organ_hu = hu[prepared.label[0] > 0]
    inside = (organ_hu > window_low) & (organ_hu < window_high)
    assert inside.mean() > 0.95
    assert abs(float(np.median(organ_hu)) - reference["mean"]) < reference["std"]
    # The raw MR read as HU would be another scale altogether (its liver at about 97, its fat at several hundred).
    raw = CasePreparer(config.preprocess, organs).prepare(
        type(mr)(**{**mr.__dict__, "case_id": "raw", "modality": "CT"}))
    assert not np.array_equal(raw.image, prepared.image)


def test_ct_zscore_statistics_count_the_ct_cases_only():
    from ContrastiveSegLib.config import RunConfig
    from ContrastiveSegLib.finetune import prepare_intensity_statistics

    ct, mr = _mr_and_ct_cases()
    config = RunConfig()
    config.preprocess.intensity = "ct_zscore"
    prepare_intensity_statistics(config, [ct, mr], ["liver", "spleen"])
    assert config.preprocess.intensity_stats == intensity_statistics([ct], ["liver", "spleen"])
    plain = RunConfig()
    prepare_intensity_statistics(plain, [ct], ["liver"])
    assert plain.preprocess.ct_units_reference is None   # no MR case: nothing to map, nothing stored


def test_mr_cases_that_cannot_be_mapped_are_refused_with_the_file_named():
    from ContrastiveSegLib.config import RunConfig
    from ContrastiveSegLib.data.preprocess import CasePreparer
    from ContrastiveSegLib.finetune import prepare_intensity_statistics

    ct, mr = _mr_and_ct_cases()
    with pytest.raises(InputError, match="every training case is MR"):
        prepare_intensity_statistics(RunConfig(), [mr], ["liver"])
    config = RunConfig()
    with pytest.raises(InputError, match="only a labelled MR") as raised:     # no reference: no CT case given
        CasePreparer(config.preprocess, ["liver"]).prepare(mr)
    assert raised.value.path == mr.image
    prepare_intensity_statistics(config, [ct, mr], ["liver"])
    with pytest.raises(InputError, match="only a labelled MR"):               # unlabelled: nothing to map by
        CasePreparer(config.preprocess, ["liver"]).prepare(mr, with_label=False)
    # An MR run (percentile normalisation) reads its MR as it is.
    mr_run = RunConfig()
    mr_run.preprocess.intensity = "percentile"
    assert CasePreparer(mr_run.preprocess, ["liver"]).prepare(mr) is not None


def test_finetune_on_a_ct_and_an_mr_saves_the_reference_and_predicts_ct_as_before(tmp_path):
    from ContrastiveSegLib.finetune import run_finetune

    config = tiny_config([SAMPLE_DIR, SAMPLE_MR], ["liver", "spleen"], max_steps=2)
    run = tmp_path / "run"
    run_finetune(config, str(run), progress=False)
    with open(run / "config.json", encoding="utf-8") as handle:
        saved = json.load(handle)["preprocess"]
    ct = load_datasets([SAMPLE_DIR])[0].cases
    stats = intensity_statistics(ct, ["liver", "spleen"])
    assert saved["ct_units_reference"] == {"mean": stats["mean"], "std": stats["std"], "voxels": stats["voxels"]}
    assert saved["intensity"] == "ct_window"   # the network still reads CT as every CT run does
