"""predict with several runs: their class probabilities are averaged (an ensemble), runs that do not fit
together are refused, and the largest-component rule applies only where every member chose it; and the
background's weight in predict's arg-max."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import run_cli
from torch import nn

from ContrastiveSegLib.config import RunConfig
from ContrastiveSegLib.engine.checkpoint import save_checkpoint
from ContrastiveSegLib.engine.inference import LoadedModel, common_postprocessing, load_ensemble, predict_image
from ContrastiveSegLib.models import build_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LABELS = {0: "background", 1: "liver", 2: "spleen"}


class Constant(nn.Module):
    """A "network" that gives every voxel the same class probabilities."""

    def __init__(self, probabilities):
        super().__init__()
        self.logits = nn.Parameter(torch.log(torch.as_tensor(probabilities, dtype=torch.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.view(1, -1, 1, 1, 1).expand(x.shape[0], -1, *x.shape[2:]).clone()


def _model(probabilities, postprocess=None) -> LoadedModel:
    config = RunConfig()
    config.data.labels = ["liver", "spleen"]
    config.model.patch_size = (16, 16, 16)
    config.preprocess.spacing = (2.0, 2.0, 2.0)
    return LoadedModel(Constant(probabilities).eval(), config, dict(LABELS), "none", postprocess)


def _image() -> sitk.Image:
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 100, (12, 16, 16)).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    return image


def test_the_ensemble_takes_the_mean_of_its_members_probabilities():
    liver_ish, spleen_ish = [0.1, 0.6, 0.3], [0.1, 0.2, 0.7]
    image = _image()

    def predicted(*members):
        labels, _ = predict_image([_model(p) for p in members], "unused", image=image, mask_body=False)
        return set(np.unique(labels).tolist())

    assert predicted(liver_ish) == {1} and predicted(spleen_ish) == {2}
    # mean (0.4 liver, 0.5 spleen) -> spleen; with the liver's member twice (0.47, 0.43) -> liver: a mean,
    # not the first member's word nor a vote of the most confident.
    assert predicted(liver_ish, spleen_ish) == {2}
    assert predicted(liver_ish, liver_ish, spleen_ish) == {1}
    single, _ = predict_image(_model(liver_ish), "unused", image=image, mask_body=False)
    twice, _ = predict_image([_model(liver_ish), _model(liver_ish)], "unused", image=image, mask_body=False)
    np.testing.assert_array_equal(single, twice)


def test_a_background_weight_below_one_lets_an_organ_win_on_less_evidence():
    image = _image()

    def predicted(weight, probabilities=(0.5, 0.3, 0.2)):
        labels, _ = predict_image(_model(list(probabilities)), "unused", image=image, mask_body=False,
                                  background_weight=weight)
        return set(np.unique(labels).tolist())

    # background 0.5 against liver 0.3: the arg-max says background; at weight 0.5 the background counts
    # 0.25 and the liver wins; at 0.7 it counts 0.35 and still wins.  The spleen (0.2) never does.
    assert predicted(1.0) == {0} and predicted(0.7) == {0} and predicted(0.5) == {1} and predicted(0.1) == {1}
    # Above one: the organs need more evidence (liver 0.6 against 0.3 x 2.5 = 0.75).
    assert predicted(1.0, (0.3, 0.6, 0.1)) == {1} and predicted(2.5, (0.3, 0.6, 0.1)) == {0}
    default, _ = predict_image(_model([0.45, 0.35, 0.2]), "unused", image=image, mask_body=False)
    weighted, _ = predict_image(_model([0.45, 0.35, 0.2]), "unused", image=image, mask_body=False,
                                background_weight=1.0)
    np.testing.assert_array_equal(default, weighted)
    with pytest.raises(ValueError, match="positive"):
        predict_image(_model([0.5, 0.3, 0.2]), "unused", image=image, background_weight=0.0)


def test_an_organ_keeps_its_largest_component_only_where_every_member_chose_it():
    both = {"largest_component": ["liver", "spleen"]}
    liver = {"largest_component": ["liver"]}
    assert common_postprocessing([_model([1, 1, 1], both), _model([1, 1, 1], liver)])["largest_component"] == ["liver"]
    assert common_postprocessing([_model([1, 1, 1], both), _model([1, 1, 1], None)]) is None


def _checkpoint(path, labels=("liver", "spleen"), spacing=(4.0, 4.0, 4.0), seed=0) -> str:
    """A real checkpoint file of an (untrained) tiny U-Net, as finetune writes it."""
    config = RunConfig(command="finetune")
    config.data.labels = list(labels)
    config.model.architecture, config.model.size = "unet", "tiny"
    config.model.out_channels = len(labels) + 1
    config.model.patch_size = (32, 32, 16)
    config.preprocess.spacing = spacing
    torch.manual_seed(seed)
    backbone = build_backbone(config.model)
    save_checkpoint(str(path), {"kind": "finetune", "config": config.to_dict(), "model": backbone.state_dict(),
                                "labels": {0: "background", **{i + 1: n for i, n in enumerate(labels)}}})
    return str(path)


def test_runs_that_do_not_fit_together_are_refused(tmp_path):
    first = _checkpoint(tmp_path / "first.pt")
    other_organs = _checkpoint(tmp_path / "organs.pt", labels=("liver", "stomach"))
    other_grid = _checkpoint(tmp_path / "grid.pt", spacing=(3.0, 3.0, 3.0))
    assert len(load_ensemble([first, _checkpoint(tmp_path / "second.pt", seed=1)], torch.device("cpu"))) == 2
    with pytest.raises(Exception, match="same organs"):
        load_ensemble([first, other_organs], torch.device("cpu"))
    with pytest.raises(Exception, match="spacing"):
        load_ensemble([first, other_grid], torch.device("cpu"))


def test_predict_cli_averages_several_checkpoints(tmp_path, sample_dir):
    first, second = _checkpoint(tmp_path / "a.pt", seed=0), _checkpoint(tmp_path / "b.pt", seed=1)
    image = os.path.join(sample_dir, "abdomen_ct.nii.gz")
    out = tmp_path / "ensemble.nii.gz"
    result = run_cli(["predict", "--model", first, second, "--image", image, "--out", str(out), "--device", "cpu",
                      "--no-body-mask"], env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    # The CLI's labels are those of the mean of the two networks' probabilities, computed here in-process
    # (also on one thread).  Untrained networks give near-even odds, where the last bit of a sum can decide a
    # voxel: agreement is required on all but a few voxels in a million, and member 0 alone is far further off.
    members = load_ensemble([first, second], torch.device("cpu"))
    expected, _ = predict_image(members, image, mask_body=False)
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    alone, _ = predict_image(members[0], image, mask_body=False)
    assert (written != expected).mean() < 1e-5
    assert (alone != expected).mean() > 1e-3, "two differently initialised networks should disagree"
    refused = run_cli(["predict", "--model", first, _checkpoint(tmp_path / "c.pt", spacing=(3.0, 3.0, 3.0)),
                       "--image", image, "--out", str(tmp_path / "no.nii.gz"), "--device", "cpu"])
    assert refused.returncode == 2 and "c.pt" in refused.stderr and "--spacing" in refused.stderr
    weightless = run_cli(["predict", "--model", first, "--image", image, "--out", str(tmp_path / "no.nii.gz"),
                          "--background-weight", "0"])
    assert weightless.returncode == 2 and "--background-weight" in weightless.stderr
