"""The supervised loss (Dice + cross-entropy) against values computed by hand, for both Dice modes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ContrastiveSegLib.methods.supervised import SupervisedObjective


class Fixed(nn.Module):
    """A "network" that returns the logits it was given, whatever the image."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def _loss(logits, label, dice):
    batch = {"image": torch.zeros(label.shape), "label": label}
    return SupervisedObjective(Fixed(logits), dice=dice)(batch)[0].item()


# Two patches of two voxels, classes background (0) and organ (1); the organ is in voxel 0 of the first
# patch and absent from the second.
LABEL = torch.tensor([[1, 0], [0, 0]]).view(2, 1, 2, 1, 1)


def test_both_modes_match_hand_computed_values_at_even_odds():
    logits = torch.zeros(2, 2, 2, 1, 1)          # p = 0.5 for both classes everywhere
    cross_entropy = math.log(2.0)                # -log 0.5 at every voxel
    # Per patch and class, background included: organ 1/2 and 1/2 (patch 1), organ absent ~0 (patch 2:
    # 0 overlap, 1.0 predicted), background 1/2 (patch 1) and 2/3 (patch 2: overlap 1, sizes 1 + 2).
    sample_dice_loss = ((1 - 0.5) + (1 - 0.5) + (1 - 0.0) + (1 - 2 / 3)) / 4
    assert _loss(logits, LABEL, "sample") == pytest.approx(sample_dice_loss + cross_entropy, abs=1e-4)
    # Over the batch, organ only: overlap 0.5, predicted 2.0, reference 1 -> Dice 2 * 0.5 / 3.
    assert _loss(logits, LABEL, "batch") == pytest.approx((1 - 1 / 3) + cross_entropy, abs=1e-4)


def test_an_absent_organ_costs_a_whole_dice_point_per_patch_only_in_sample_mode():
    """Patch 1 predicted right with confidence; patch 2, where the organ is absent, given organ
    probability q.  Per patch, the absent organ's Dice is ~0 for any q much above the smoothing: its
    term stays 1 whether q is 0.3 or 0.01.  Over the batch, the cost falls with q."""
    def logits(q: float) -> torch.Tensor:
        first = torch.tensor([[-9.0, 9.0], [9.0, -9.0]])            # voxel 0 organ, voxel 1 background
        second = torch.log(torch.tensor([[1 - q, q], [1 - q, q]]))   # organ probability q at both voxels
        return torch.stack([first.T, second.T]).view(2, 2, 2, 1, 1)

    def dice_part(q: float, dice: str) -> float:
        p = torch.softmax(logits(q), dim=1)
        cross_entropy = -torch.log(torch.gather(p, 1, LABEL)).mean().item()
        return _loss(logits(q), LABEL, dice) - cross_entropy

    for q in (0.3, 0.01):
        # Per patch: patch 1's two terms ~0; patch 2's organ term 1 - 0 (overlap 0) for either q; its
        # background term 1 - 2 * 2(1 - q) / (2(1 - q) + 2).
        background = 1 - 2 * 2 * (1 - q) / (2 * (1 - q) + 2)
        assert dice_part(q, "sample") == pytest.approx((1.0 + background) / 4, abs=1e-3)
    assert dice_part(0.3, "batch") == pytest.approx(1 - 2 * 1.0 / (1.0 + 0.6 + 1.0), abs=1e-3)
    assert dice_part(0.01, "batch") == pytest.approx(1 - 2 * 1.0 / (1.0 + 0.02 + 1.0), abs=1e-3)


def test_tversky_mode_matches_hand_computed_values():
    """Over the batch, organ only: TP = sum p g, FP = sum p (1 - g), FN = sum (1 - p) g; index
    TP / (TP + 0.3 FP + 0.7 FN); plus the cross-entropy."""
    cross_entropy = math.log(2.0)
    even = torch.zeros(2, 2, 2, 1, 1)                       # p = 0.5 everywhere
    # TP 0.5, FP 0.5 + 1.0 (three background voxels at 0.5), FN 0.5
    index = 0.5 / (0.5 + 0.3 * 1.5 + 0.7 * 0.5)
    assert _loss(even, LABEL, "tversky") == pytest.approx((1 - index) + cross_entropy, abs=1e-4)
    # Missing the organ costs more than a false alarm of the same size: organ probability 0.2 on the
    # organ's voxel (FN 0.8) against 0.8 on one background voxel (FP 0.8), the rest confident.
    def logits(organ_at_organ: float, organ_at_background: float) -> torch.Tensor:
        p = torch.tensor([[organ_at_organ, organ_at_background], [1e-6, 1e-6]]).view(2, 1, 2, 1, 1)
        return torch.log(torch.cat([1 - p, p], dim=1))

    def overlap_part(a: float, b: float, dice: str) -> float:
        probabilities = torch.softmax(logits(a, b), dim=1)
        ce = -torch.log(torch.gather(probabilities, 1, LABEL)).mean().item()
        return _loss(logits(a, b), LABEL, dice) - ce

    missed = overlap_part(0.2, 0.0, "tversky")
    false_alarm = overlap_part(1.0, 0.8, "tversky")
    assert missed == pytest.approx(1 - 0.2 / (0.2 + 0.7 * 0.8), abs=1e-3)
    assert false_alarm == pytest.approx(1 - 1.0 / (1.0 + 0.3 * 0.8), abs=1e-3)
    assert missed > false_alarm
    # The batch Dice of the miss, for comparison: 2 TP / (2 TP + FP + FN).
    assert overlap_part(0.2, 0.0, "batch") == pytest.approx(1 - 0.4 / (0.4 + 0.8), abs=1e-3)


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="dice"):
        SupervisedObjective(nn.Identity(), dice="voxel")


def test_the_cli_option_reaches_the_run_config_and_old_runs_read_as_sample():
    from ContrastiveSegLib.cli import _training_config, build_parser
    from ContrastiveSegLib.config import RunConfig

    parser = build_parser()
    for given, expected in (([], "sample"), (["--dice", "batch"], "batch"), (["--dice", "tversky"], "tversky")):
        args = parser.parse_args(["finetune", "--data", "x", "--labels", "liver", "--out", "y"] + given)
        assert _training_config(args, "finetune").train.dice == expected
    saved = RunConfig().to_dict()
    del saved["train"]["dice"]                       # a config.json written before the option existed
    assert RunConfig.from_dict(saved).train.dice == "sample"
