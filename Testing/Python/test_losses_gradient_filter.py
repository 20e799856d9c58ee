"""Tests of the GCL Gradient Filter mask (ContrastiveSegLib/losses/gradient_filter.py)."""

from __future__ import annotations

import math

import pytest
import torch

from ContrastiveSegLib.losses import gradient_filter_mask


def logits_from_probabilities(probabilities):
    # softmax(log p) = p when p sums to 1 per row.
    return torch.log(torch.tensor(probabilities, dtype=torch.float64))


HAND_CASES = [
    pytest.param(
        # p = [0.1, 0.2, 0.3, 0.4], positive at 0: scores |p - y| = [0.9, 0.2, 0.3, 0.4].
        # k = ceil(0.5 * 4) = 2: the positive + the best other (index 3, score 0.4).
        [[0.1, 0.2, 0.3, 0.4]],
        [[1, 0, 0, 0]],
        0.5,
        [[True, False, False, True]],
        id="positive-plus-hardest-negative",
    ),
    pytest.param(
        # A well-predicted positive (score |0.97 - 1| = 0.03) is still kept.
        # k = ceil(0.25 * 4) = 1 = #pos: nothing else.
        [[0.97, 0.01, 0.01, 0.01]],
        [[1, 0, 0, 0]],
        0.25,
        [[True, False, False, False]],
        id="easy-positive-kept",
    ),
    pytest.param(
        # Two positives, k = ceil(0.25 * 4) = 1 < 2: both positives, no negative (total max(k, #pos) = 2).
        [[0.4, 0.3, 0.2, 0.1]],
        [[0, 0, 1, 1]],
        0.25,
        [[False, False, True, True]],
        id="more-positives-than-budget",
    ),
    pytest.param(
        # Row 0: no positive; k = ceil(0.5 * 4) = 2: the two largest p (0.4 at 3, 0.3 at 2).
        # Row 1: p = [0.25] * 4, positive at 1; k = 2: positive + the tie broken by the lower
        #        index (0).
        [[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]],
        [[0, 0, 0, 0], [0, 1, 0, 0]],
        0.5,
        [[False, False, True, True], [True, True, False, False]],
        id="no-positive-and-ties",
    ),
    pytest.param(
        # keep_fraction = 1 keeps everything.
        [[0.1, 0.2, 0.3, 0.4]],
        [[0, 1, 0, 0]],
        1.0,
        [[True, True, True, True]],
        id="keep-all",
    ),
]


@pytest.mark.parametrize(("probabilities", "targets", "keep_fraction", "expected"), HAND_CASES)
def test_hand_examples(probabilities, targets, keep_fraction, expected):
    mask = gradient_filter_mask(logits_from_probabilities(probabilities), torch.tensor(targets), keep_fraction)
    assert mask.dtype == torch.bool
    assert mask.tolist() == expected


def test_budget_rounding_and_minimum():
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    targets = torch.zeros(2, 10)
    # 0.3 * 10 is 3.0000000000000004 in floating point: the budget is still 3.
    assert gradient_filter_mask(logits, targets, 0.3).sum(dim=1).tolist() == [3, 3]
    # A tiny fraction keeps at least one pair per anchor.
    assert gradient_filter_mask(logits, targets, 1e-6).sum(dim=1).tolist() == [1, 1]
    # 0.25 * 10 = 2.5 -> 3.
    assert gradient_filter_mask(logits, targets, 0.25).sum(dim=1).tolist() == [3, 3]


def test_valid_mask_excludes_padding_from_scores_and_budget():
    # Row 0: valid pairs 0, 1, 2 with logits [0, log 2, log 3] -> softmax over them
    # [1/6, 2/6, 3/6]; pair 3 (padded) has a huge logit that must be ignored.
    # Positive at 0; k = ceil(0.5 * 3) = 2: the positive + pair 2 (p = 0.5).
    # Row 1: only pair 3 valid: k = 1, it is kept.
    logits = torch.tensor([[0.0, math.log(2), math.log(3), 50.0], [0.0, 0.0, 0.0, 0.0]])
    targets = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]])
    valid = torch.tensor([[True, True, True, False], [False, False, False, True]])
    mask = gradient_filter_mask(logits, targets, 0.5, valid=valid)
    assert mask.tolist() == [[True, False, True, False], [False, False, False, True]]


def test_row_without_valid_pairs_keeps_nothing():
    logits = torch.zeros(2, 3)
    valid = torch.tensor([[False, False, False], [True, True, True]])
    targets = torch.tensor([[1, 0, 0], [1, 0, 0]])
    mask = gradient_filter_mask(logits, targets, 0.5, valid=valid)
    assert mask.tolist() == [[False, False, False], [True, True, False]]


def reference_mask(logits, targets, keep_fraction):
    """The documented rule written per anchor with Python lists."""
    mask = []
    for row_logits, row_targets in zip(logits.tolist(), targets.tolist()):
        top = max(row_logits)
        exps = [math.exp(v - top) for v in row_logits]
        probabilities = [e / sum(exps) for e in exps]
        budget = max(1, math.ceil(round(keep_fraction * len(row_logits), 9)))
        positives = [i for i, t in enumerate(row_targets) if t == 1]
        others = sorted(
            (i for i, t in enumerate(row_targets) if t != 1), key=lambda i: (-probabilities[i], i)
        )
        kept = set(positives) | set(others[: max(budget - len(positives), 0)])
        mask.append([i in kept for i in range(len(row_logits))])
    return mask


@pytest.mark.parametrize(("seed", "keep_fraction"), [(0, 0.25), (1, 0.1), (2, 0.6)])
def test_matches_reference_rule(seed, keep_fraction):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 12, generator=generator, dtype=torch.float64)
    targets = (torch.rand(6, 12, generator=generator) < 0.15).long()
    mask = gradient_filter_mask(logits, targets, keep_fraction)
    assert mask.tolist() == reference_mask(logits, targets, keep_fraction)


def test_builds_no_graph_and_accepts_bool_and_float_targets():
    logits = torch.randn(3, 5, requires_grad=True)
    targets = torch.zeros(3, 5, dtype=torch.bool)
    targets[:, 0] = True
    mask = gradient_filter_mask(logits, targets, 0.4)
    assert not mask.requires_grad
    assert torch.equal(mask, gradient_filter_mask(logits, targets.float(), 0.4))
    assert mask[:, 0].all()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"keep_fraction": 0.0}, ValueError),
        ({"keep_fraction": 1.5}, ValueError),
        ({"targets": torch.full((2, 3), 2)}, ValueError),
        ({"targets": torch.zeros(3, 2)}, ValueError),
        ({"valid": torch.ones(2, 3)}, ValueError),
        ({"logits": torch.zeros(6)}, ValueError),
    ],
)
def test_bad_arguments_are_rejected(kwargs, error):
    arguments = {"logits": torch.zeros(2, 3), "targets": torch.zeros(2, 3), "keep_fraction": 0.5}
    arguments.update(kwargs)
    with pytest.raises(error, match="gradient_filter_mask"):
        gradient_filter_mask(**arguments)
