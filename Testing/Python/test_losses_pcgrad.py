"""Tests of PCGrad gradient surgery (ContrastiveSegLib/losses/pcgrad.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from ContrastiveSegLib.losses import pcgrad, pcgrad_per_sample

HAND_CASES = [
    pytest.param(
        # g1 . g2 = -1 < 0: conflict both ways.
        # g1' = g1 - (-1 / |g2|^2) g2 = [1, 0] + 0.5 [-1, 1] = [0.5, 0.5]
        # g2' = g2 - (-1 / |g1|^2) g1 = [-1, 1] + [1, 0] = [0, 1]
        # sum = [0.5, 1.5]
        [[1.0, 0.0], [-1.0, 1.0]],
        [0.5, 1.5],
        id="conflict",
    ),
    pytest.param(
        # g1 . g2 = 1 >= 0: no projection, plain sum [2, 1].
        [[1.0, 0.0], [1.0, 1.0]],
        [2.0, 1.0],
        id="no-conflict",
    ),
    pytest.param(
        # Orthogonal (dot 0) is not a conflict: plain sum.
        [[1.0, 0.0], [0.0, 2.0]],
        [1.0, 2.0],
        id="orthogonal",
    ),
    pytest.param(
        # Opposite: g1' = g1 - (-4/4) g2 = [2, 0] + [-2, 0] = 0, and the same for g2'.
        [[2.0, 0.0], [-2.0, 0.0]],
        [0.0, 0.0],
        id="opposite",
    ),
    pytest.param(
        # A zero gradient is skipped and never conflicts: [0, 0] + [3, -1].
        [[0.0, 0.0], [3.0, -1.0]],
        [3.0, -1.0],
        id="zero-gradient",
    ),
    pytest.param(
        # K = 1: nothing to project.
        [[1.0, -2.0, 3.0]],
        [1.0, -2.0, 3.0],
        id="single-task",
    ),
]


@pytest.mark.parametrize(("grads", "expected"), HAND_CASES)
def test_hand_computed_values(grads, expected):
    combined = pcgrad([torch.tensor(g) for g in grads], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(combined, torch.tensor(expected))


def reference_project(g_k, others):
    """Yu et al.: project g_k (as it is so far) against each ORIGINAL g_j it conflicts with."""
    projected = list(g_k)
    for g_j in others:
        dot = sum(a * b for a, b in zip(projected, g_j))
        norm2 = sum(b * b for b in g_j)
        if dot < 0 and norm2 > 0:
            projected = [a - dot / norm2 * b for a, b in zip(projected, g_j)]
    return projected


def all_reference_results(grads):
    """The PCGrad result for every combination of per-task orders."""
    grads = [g.tolist() for g in grads]
    tasks = range(len(grads))
    per_task = []
    for k in tasks:
        others = [j for j in tasks if j != k]
        per_task.append([reference_project(grads[k], [grads[j] for j in order]) for order in itertools.permutations(others)])
    return [
        torch.tensor([sum(values) for values in zip(*choice)], dtype=torch.float64)
        for choice in itertools.product(*per_task)
    ]


def three_conflicting_gradients():
    # Pairwise conflicting, so the order of projections changes the result.
    return [
        torch.tensor([1.0, 0.2, 0.0], dtype=torch.float64),
        torch.tensor([-0.8, 1.0, 0.3], dtype=torch.float64),
        torch.tensor([-0.5, -0.9, 1.0], dtype=torch.float64),
    ]


def test_three_tasks_match_the_loop_reference_for_the_drawn_orders():
    grads = three_conflicting_gradients()
    candidates = all_reference_results(grads)
    assert len(candidates) == 8
    # The example is one where order matters.
    assert len({tuple(round(v, 9) for v in c.tolist()) for c in candidates}) > 1
    matched = set()
    for seed in range(20):
        combined = pcgrad(grads, generator=torch.Generator().manual_seed(seed))
        distances = [float((combined - c).abs().max()) for c in candidates]
        assert min(distances) < 1e-12
        matched.add(distances.index(min(distances)))
    # Different seeds draw different orders.
    assert len(matched) > 1


def test_documented_order_draws():
    # For k = 0..K-1: torch.randperm(K - 1, generator) applied to the other indices.
    grads = three_conflicting_gradients()
    generator = torch.Generator().manual_seed(11)
    expected = torch.zeros(3, dtype=torch.float64)
    for k in range(3):
        others = [j for j in range(3) if j != k]
        order = [others[i] for i in torch.randperm(2, generator=generator).tolist()]
        expected += torch.tensor(reference_project(grads[k].tolist(), [grads[j].tolist() for j in order]), dtype=torch.float64)
    torch.testing.assert_close(pcgrad(grads, generator=torch.Generator().manual_seed(11)), expected)


def test_global_rng_is_used_without_generator():
    grads = three_conflicting_gradients()
    torch.manual_seed(5)
    first = pcgrad(grads)
    torch.manual_seed(5)
    torch.testing.assert_close(pcgrad(grads), first)


def test_keeps_shape_and_dtype():
    grads = [torch.randn(2, 3, dtype=torch.float16) for _ in range(3)]
    combined = pcgrad(grads, generator=torch.Generator().manual_seed(0))
    assert combined.shape == (2, 3)
    assert combined.dtype == torch.float16
    expected = pcgrad([g.float().reshape(-1) for g in grads], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(combined.float().reshape(-1), expected.half().float())


def test_per_sample_equals_looping_pcgrad_over_samples():
    generator = torch.Generator().manual_seed(2)
    grads = torch.randn(3, 6, 5, generator=generator, dtype=torch.float64)
    combined = pcgrad_per_sample(grads, generator=torch.Generator().manual_seed(9))
    assert combined.shape == (6, 5)
    for sample in range(6):
        expected = pcgrad(list(grads[:, sample]), generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(combined[sample], expected, rtol=1e-12, atol=1e-12)


def test_per_sample_takes_feature_maps_and_handles_zero_gradients():
    generator = torch.Generator().manual_seed(3)
    grads = torch.randn(2, 3, 2, 1, 2, 2, generator=generator)
    grads[1, 0] = 0.0  # sample 0 has no gradient from task 1
    combined = pcgrad_per_sample(grads, generator=torch.Generator().manual_seed(1))
    assert combined.shape == (3, 2, 1, 2, 2)
    torch.testing.assert_close(combined[0], grads[0, 0])
    for sample in range(3):
        expected = pcgrad([grads[0, sample], grads[1, sample]], generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(combined[sample], expected)


def test_per_sample_hand_values():
    # Sample 0 is the conflict example ([0.5, 1.5]), sample 1 the no-conflict one ([2, 1]).
    grads = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[-1.0, 1.0], [1.0, 1.0]]])
    torch.testing.assert_close(pcgrad_per_sample(grads), torch.tensor([[0.5, 1.5], [2.0, 1.0]]))


@pytest.mark.parametrize(
    ("grads", "error"),
    [
        ([], ValueError),
        (torch.ones(2, 3), ValueError),
        ([torch.ones(3), torch.ones(4)], ValueError),
        ([torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long)], ValueError),
    ],
)
def test_pcgrad_rejects_bad_arguments(grads, error):
    with pytest.raises(error, match="pcgrad"):
        pcgrad(grads)


@pytest.mark.parametrize("grads", [torch.ones(3), torch.ones(2, 3, dtype=torch.long), torch.ones(0, 3)])
def test_per_sample_rejects_bad_arguments(grads):
    with pytest.raises(ValueError, match="pcgrad_per_sample"):
        pcgrad_per_sample(grads)
