"""Tests of the supervised contrastive loss (ContrastiveSegLib/losses/supcon.py)."""

from __future__ import annotations

import math

import pytest
import torch

from ContrastiveSegLib.losses import supcon_loss

HAND_CASES = [
    pytest.param(
        # z0 = z1 = [1, 0] (label 0), z2 = [0, 1] (label 1); tau = 1.
        # Anchor 0: positive z1 (s = 1), denominator over {z1, z2}: e^1 + e^0.
        #   -log(e / (e + 1)) = log(1 + e^-1) = 0.3132617.  Anchor 1: the same.
        # Anchor 2: no positive, skipped.  Mean = 0.3132617.
        [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],
        [0, 0, 1],
        1.0,
        0.3132617,
        id="one-positive",
    ),
    pytest.param(
        # Same vectors scaled: the loss normalises, so lengths do not matter.
        [[3.0, 0.0], [0.5, 0.0], [0.0, 7.0]],
        [4, 4, 9],
        1.0,
        0.3132617,
        id="scale-invariant",
    ),
    pytest.param(
        # z0 = [1, 0], z1 = [0, 1], z2 = [-1, 0], all label 5; tau = 0.5, s = 2 cos.
        # Anchor 0: s01 = 0, s02 = -2; denominator e^0 + e^-2 = 1.1353353.
        #   -1/2 [ (0 - log 1.1353353) + (-2 - log 1.1353353) ] = 1 + 0.1269280 = 1.1269280
        # Anchor 2: symmetric to anchor 0 -> 1.1269280.
        # Anchor 1: s10 = 0, s12 = 0; denominator 2; -1/2 [2 (0 - log 2)] = log 2 = 0.6931472
        # Mean = (2 * 1.1269280 + 0.6931472) / 3 = 0.9823344
        [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]],
        [5, 5, 5],
        0.5,
        0.9823344,
        id="two-positives",
    ),
]


@pytest.mark.parametrize(("z", "labels", "tau", "expected"), HAND_CASES)
def test_hand_computed_values(z, labels, tau, expected):
    loss = supcon_loss(torch.tensor(z), torch.tensor(labels), tau=tau)
    assert loss.ndim == 0
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def reference_supcon(z, labels, tau):
    """Khosla et al.'s L_out with explicit loops."""
    z = torch.nn.functional.normalize(z, dim=1).tolist()
    labels = labels.tolist()
    size = len(z)

    def s(i, j):
        return sum(x * y for x, y in zip(z[i], z[j])) / tau

    losses = []
    for i in range(size):
        positives = [p for p in range(size) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        log_denominator = math.log(sum(math.exp(s(i, a)) for a in range(size) if a != i))
        losses.append(-sum(s(i, p) - log_denominator for p in positives) / len(positives))
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize(("seed", "tau"), [(0, 0.1), (1, 0.5), (2, 1.0)])
def test_matches_loop_reference(seed, tau):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(9, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (9,), generator=generator)
    assert supcon_loss(z, labels, tau).item() == pytest.approx(reference_supcon(z, labels, tau), rel=1e-10)


def test_gradients_are_correct():
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(6, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    assert torch.autograd.gradcheck(lambda x: supcon_loss(x, labels, 0.5), (z,))


@pytest.mark.parametrize(
    "labels",
    [pytest.param([0, 1, 2, 3], id="all-distinct"), pytest.param([7], id="single-sample")],
)
def test_no_positive_gives_connected_zero(labels):
    z = torch.randn(len(labels), 3, requires_grad=True)
    loss = supcon_loss(z, torch.tensor(labels))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8])
def test_any_integer_label_dtype(dtype):
    generator = torch.Generator().manual_seed(4)
    z = torch.randn(6, 3, generator=generator)
    labels = torch.tensor([1, 1, 2, 2, 3, 1])
    torch.testing.assert_close(supcon_loss(z, labels.to(dtype)), supcon_loss(z, labels))


def test_half_precision_input_is_computed_in_float32():
    generator = torch.Generator().manual_seed(5)
    z = torch.randn(8, 4, generator=generator).half()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss = supcon_loss(z, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, supcon_loss(z.float(), labels))


@pytest.mark.parametrize(
    ("z", "labels", "tau", "error"),
    [
        (torch.ones(3, 2), torch.ones(4, dtype=torch.long), 0.1, ValueError),
        (torch.ones(3, 2), torch.ones(3), 0.1, ValueError),
        (torch.ones(3), torch.ones(3, dtype=torch.long), 0.1, ValueError),
        (torch.ones(3, 2), torch.ones(3, dtype=torch.long), -1.0, ValueError),
        (torch.ones(3, 2), [0, 0, 1], 0.1, TypeError),
    ],
)
def test_bad_arguments_are_rejected(z, labels, tau, error):
    with pytest.raises(error, match="supcon_loss"):
        supcon_loss(z, labels, tau)
