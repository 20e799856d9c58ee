"""Tests of the MixCL label-consistency loss (ContrastiveSegLib/losses/label_contrastive.py)."""

from __future__ import annotations

import math

import pytest
import torch

from ContrastiveSegLib.losses import label_contrastive_loss

SQRT_HALF = math.sqrt(0.5)

# Set 1: a1 = [1, 0] (label 1), a2 = [0, 1] (label 2), a3 = [1, 1] (background 0, left out).
# Set 2: b1 = [1, 0] (1), b2 = [0, 1] (2), b3 = [1, 1]/sqrt2 (1), b4 = [-1, 0] (background).
# tau = 0.5, so s = 2 * cos:  a1.b1 = 2, a1.b2 = 0, a1.b3 = sqrt2; a2.b1 = 0, a2.b2 = 2, a2.b3 = sqrt2.
# Positives: (a1,b1) e^2, (a1,b3) e^sqrt2, (a2,b2) e^2.  Negatives: (a1,b2) e^0, (a2,b1) e^0, (a2,b3) e^sqrt2.
# e^2 = 7.3890561, e^sqrt2 = 4.1132504.
HAND_Z1 = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
HAND_Y1 = [1, 2, 0]
HAND_Z2 = [[1.0, 0.0], [0.0, 1.0], [SQRT_HALF, SQRT_HALF], [-1.0, 0.0]]
HAND_Y2 = [1, 2, 1, 0]

HAND_CASES = [
    pytest.param(
        # paper: -log( (2 e^2 + e^sqrt2) / (2 e^2 + e^sqrt2 + 2 + e^sqrt2) )
        #      = -log( 18.8913626 / 25.0046130 ) = 0.2803555
        {"tau": 0.5, "reduction": "paper"},
        0.2803555,
        id="paper",
    ),
    pytest.param(
        # anchor a1: -log( (e^2 + e^sqrt2) / (e^2 + e^sqrt2 + 1) ) = log(1 + 1/11.5023065) = 0.0833656
        # anchor a2: -log( e^2 / (e^2 + 1 + e^sqrt2) ) = log(12.5023065 / 7.3890561) = 0.5259131
        # mean = 0.3046394
        {"tau": 0.5, "reduction": "anchor"},
        0.3046394,
        id="anchor",
    ),
    pytest.param(
        # background=2: a2 and b2 drop out and label 0 becomes a class.  a3 = [1, 1]/sqrt2.
        # s: a1.b1 = 2, a1.b3 = sqrt2, a1.b4 = -2; a3.b1 = sqrt2, a3.b3 = 2, a3.b4 = -sqrt2.
        # Positives: (a1,b1) e^2, (a1,b3) e^sqrt2, (a3,b4) e^-sqrt2 = 0.2431167 -> sum 11.7454232
        # Negatives: (a1,b4) e^-2 = 0.1353353, (a3,b1) e^sqrt2, (a3,b3) e^2 -> total 23.3830650
        # -log(11.7454232 / 23.3830650) = 0.6885484
        {"tau": 0.5, "background": 2},
        0.6885484,
        id="background-2",
    ),
]


@pytest.mark.parametrize(("kwargs", "expected"), HAND_CASES)
def test_hand_computed_values(kwargs, expected):
    loss = label_contrastive_loss(
        torch.tensor(HAND_Z1), torch.tensor(HAND_Y1), torch.tensor(HAND_Z2), torch.tensor(HAND_Y2), **kwargs
    )
    assert loss.ndim == 0
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def reference_label_loss(z1, y1, z2, y2, tau, background, reduction):
    """Eq. 6 with explicit loops over all cross pairs (float64, log-sum-exp by hand)."""

    def log_sum_exp(values):
        top = max(values)
        return top + math.log(sum(math.exp(v - top) for v in values))

    def cosine(u, v):
        return sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))

    z1, z2, y1, y2 = z1.tolist(), z2.tolist(), y1.tolist(), y2.tolist()
    positives, everything, per_anchor = [], [], []
    for i in range(len(z1)):
        anchor_positives, anchor_all = [], []
        for k in range(len(z2)):
            if y1[i] == background or y2[k] == background:
                continue
            s = cosine(z1[i], z2[k]) / tau
            anchor_all.append(s)
            if y1[i] == y2[k]:
                anchor_positives.append(s)
        positives += anchor_positives
        everything += anchor_all
        if anchor_positives:
            per_anchor.append(log_sum_exp(anchor_all) - log_sum_exp(anchor_positives))
    if not positives:
        return 0.0
    if reduction == "paper":
        return log_sum_exp(everything) - log_sum_exp(positives)
    return sum(per_anchor) / len(per_anchor)


def random_sets(seed, n1=11, n2=9, channels=4, classes=4, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n1, channels, generator=generator, dtype=dtype)
    z2 = torch.randn(n2, channels, generator=generator, dtype=dtype)
    y1 = torch.randint(0, classes, (n1,), generator=generator)
    y2 = torch.randint(0, classes, (n2,), generator=generator)
    return z1, y1, z2, y2


@pytest.mark.parametrize("reduction", ["paper", "anchor"])
@pytest.mark.parametrize(("seed", "tau"), [(0, 0.1), (1, 0.5), (2, 0.01)])
def test_matches_loop_reference(reduction, seed, tau):
    z1, y1, z2, y2 = random_sets(seed)
    loss = label_contrastive_loss(z1, y1, z2, y2, tau=tau, reduction=reduction)
    expected = reference_label_loss(z1, y1, z2, y2, tau, 0, reduction)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("reduction", ["paper", "anchor"])
@pytest.mark.parametrize("checkpoint", [True, False])
@pytest.mark.parametrize("tile_size", [1, 3, 4])
def test_tiles_give_the_untiled_result_and_gradients(reduction, checkpoint, tile_size):
    z1, y1, z2, y2 = random_sets(5)
    results = []
    for size in (tile_size, 1000):
        a = z1.clone().requires_grad_(True)
        b = z2.clone().requires_grad_(True)
        loss = label_contrastive_loss(a, y1, b, y2, tile_size=size, reduction=reduction, checkpoint=checkpoint)
        loss.backward()
        results.append((loss.detach(), a.grad, b.grad))
    (tiled, grad1, grad2), (untiled, grad1_ref, grad2_ref) = results
    torch.testing.assert_close(tiled, untiled, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad1, grad1_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad2, grad2_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["paper", "anchor"])
def test_gradients_are_correct(reduction):
    z1, y1, z2, y2 = random_sets(6, n1=5, n2=4, channels=3, classes=3)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: label_contrastive_loss(a, y1, b, y2, tau=0.3, reduction=reduction, tile_size=2),
        (z1, z2),
    )


def test_is_stable_with_a_tiny_temperature():
    # s/tau reaches 1e4: exp() would overflow without the running log-sum-exp.
    z1, y1, z2, y2 = random_sets(7, dtype=torch.float32)
    loss = label_contrastive_loss(z1, y1, z2, y2, tau=1e-4, tile_size=4)
    expected = reference_label_loss(z1.double(), y1, z2.double(), y2, 1e-4, 0, "paper")
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(expected, rel=1e-3, abs=1e-2)


NO_POSITIVE_CASES = [
    pytest.param([1, 1, 2], [3, 4], id="no-shared-label"),
    pytest.param([0, 0, 0], [0, 0], id="all-background"),
    pytest.param([1, 2, 0], [0, 0], id="set-2-background"),
    pytest.param([], [1, 2], id="empty-set-1"),
]


@pytest.mark.parametrize("reduction", ["paper", "anchor"])
@pytest.mark.parametrize(("y1", "y2"), NO_POSITIVE_CASES)
def test_no_positive_pair_gives_connected_zero(reduction, y1, y2):
    generator = torch.Generator().manual_seed(8)
    z1 = torch.randn(len(y1), 3, generator=generator, requires_grad=True)
    z2 = torch.randn(len(y2), 3, generator=generator, requires_grad=True)
    loss = label_contrastive_loss(z1, torch.tensor(y1, dtype=torch.long), z2, torch.tensor(y2), reduction=reduction)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z1.grad, torch.zeros_like(z1))
    assert torch.equal(z2.grad, torch.zeros_like(z2))


@pytest.mark.parametrize("reduction", ["paper", "anchor"])
def test_single_class_has_no_negative_and_gives_zero(reduction):
    # Every pair is positive: the ratio is 1 and the loss -log(1) = 0, with zero gradient.
    generator = torch.Generator().manual_seed(9)
    z1 = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    loss = label_contrastive_loss(z1, torch.full((4,), 3), z2, torch.full((5,), 3), reduction=reduction)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert z1.grad.abs().max().item() < 1e-10


def test_anchors_with_only_negatives_count_in_the_paper_denominator_only():
    # a1 (label 1) has the positive b1; a2 (label 3) has only the negative b1.
    # tau = 1, cos(a1, b1) = 1, cos(a2, b1) = 0.
    # paper: -log( e^1 / (e^1 + e^0) ) = log(1 + e^-1) = 0.3132617
    # anchor: a2 is not an anchor (no positive); a1 alone: -log(e / e) = 0.
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0]])
    y1, y2 = torch.tensor([1, 3]), torch.tensor([1])
    assert label_contrastive_loss(z1, y1, z2, y2, tau=1.0).item() == pytest.approx(0.3132617, abs=1e-6)
    assert label_contrastive_loss(z1, y1, z2, y2, tau=1.0, reduction="anchor").item() == pytest.approx(0.0, abs=1e-7)


def test_low_precision_input_is_computed_in_float32():
    z1, y1, z2, y2 = random_sets(10, dtype=torch.float32)
    loss = label_contrastive_loss(z1.half(), y1, z2.bfloat16(), y2)
    expected = label_contrastive_loss(z1.half().float(), y1, z2.bfloat16().float(), y2)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)


def test_integer_label_dtypes_may_differ():
    z1, y1, z2, y2 = random_sets(11)
    expected = label_contrastive_loss(z1, y1, z2, y2)
    torch.testing.assert_close(label_contrastive_loss(z1, y1.int(), z2, y2.to(torch.uint8)), expected)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"z2": torch.ones(3, 5)}, ValueError),
        ({"y1": torch.ones(4, dtype=torch.long)}, ValueError),
        ({"y1": torch.ones(3)}, ValueError),
        ({"tau": 0.0}, ValueError),
        ({"reduction": "mean"}, ValueError),
        ({"tile_size": 0}, ValueError),
        ({"z1": [[1.0, 0.0]] * 3}, TypeError),
    ],
)
def test_bad_arguments_are_rejected(kwargs, error):
    arguments = {
        "z1": torch.ones(3, 4),
        "y1": torch.ones(3, dtype=torch.long),
        "z2": torch.ones(2, 4),
        "y2": torch.ones(2, dtype=torch.long),
    }
    arguments.update(kwargs)
    with pytest.raises(error, match="label_contrastive_loss"):
        label_contrastive_loss(**arguments)


def reference_with_background_negatives(z1, y1, g1, z2, y2, g2, tau, reduction):
    """Loop reference: background (0) is a negative of a foreground pixel of the same group, never an anchor."""
    a = torch.nn.functional.normalize(z1, dim=1)
    b = torch.nn.functional.normalize(z2, dim=1)
    positives, every, per_anchor = [], [], []
    for i in range(len(y1)):
        mine_positive, mine_all = [], []
        for k in range(len(y2)):
            s = float(a[i] @ b[k]) / tau
            foreground_i, foreground_k = int(y1[i]) != 0, int(y2[k]) != 0
            if foreground_i and foreground_k:
                mine_all.append(s)
                if int(y1[i]) == int(y2[k]):
                    mine_positive.append(s)
            elif (foreground_i or foreground_k) and int(g1[i]) == int(g2[k]):
                mine_all.append(s)
        positives += mine_positive
        every += mine_all
        if mine_positive:
            per_anchor.append(math.log(sum(math.exp(v) for v in mine_all))
                              - math.log(sum(math.exp(v) for v in mine_positive)))
    if reduction == "paper":
        return math.log(sum(math.exp(v) for v in every)) - math.log(sum(math.exp(v) for v in positives))
    return sum(per_anchor) / len(per_anchor)


# One organ in both sets: without background negatives every pair is positive and the loss is exactly 0.
# a1 = [1, 0] (organ 1, group 0), a2 = [0, 1] (background, group 0); b1 = [1, 0] (organ 1, group 0),
# b2 = [0, 1] (background, group 0), b3 = [-1, 0] (background, group 1).  tau = 0.5, s = 2 cos.
# Pairs with background negatives: (a1,b1) positive e^2, (a1,b2) negative e^0, (a2,b1) negative e^0;
# (a1,b3) is another group's background: left out.  paper: -log(e^2 / (e^2 + 2)) = log(1 + 2 e^-2) = 0.2395879
SINGLE_Z1 = [[1.0, 0.0], [0.0, 1.0]]
SINGLE_Z2 = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]


def test_one_organ_has_a_gradient_only_with_background_negatives():
    z1 = torch.tensor(SINGLE_Z1, dtype=torch.float64, requires_grad=True)
    z2 = torch.tensor(SINGLE_Z2, dtype=torch.float64)
    y1, y2 = torch.tensor([1, 0]), torch.tensor([1, 0, 0])
    g1, g2 = torch.tensor([0, 0]), torch.tensor([0, 0, 1])
    assert label_contrastive_loss(z1, y1, z2, y2, tau=0.5).item() == 0.0
    loss = label_contrastive_loss(z1, y1, z2, y2, tau=0.5, background_negatives=True, groups1=g1, groups2=g2)
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-12)
    loss.backward()
    assert z1.grad.abs().sum() > 0
    # Another dataset's background is not a negative: with b2 moved to group 1 only (a2, b1) is left.
    other = label_contrastive_loss(z1.detach(), y1, z2, y2, tau=0.5, background_negatives=True, groups1=g1,
                                   groups2=torch.tensor([0, 1, 1]))
    assert other.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-12)


@pytest.mark.parametrize("reduction", ["paper", "anchor"])
@pytest.mark.parametrize("tile_size", [2, 4096])
def test_background_negatives_match_loop_reference_and_gradcheck(reduction, tile_size):
    z1, y1, z2, y2 = random_sets(11, n1=9, n2=8, channels=3, classes=3)
    generator = torch.Generator().manual_seed(4)
    g1, g2 = torch.randint(0, 2, (9,), generator=generator), torch.randint(0, 2, (8,), generator=generator)
    loss = label_contrastive_loss(z1, y1, z2, y2, tau=0.3, reduction=reduction, tile_size=tile_size,
                                  background_negatives=True, groups1=g1, groups2=g2)
    expected = reference_with_background_negatives(z1, y1, g1, z2, y2, g2, 0.3, reduction)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda p, q: label_contrastive_loss(p, y1, q, y2, tau=0.3, reduction=reduction, tile_size=tile_size,
                                            background_negatives=True, groups1=g1, groups2=g2), (a, b))
