"""Tests of the prototype (local) contrastive loss and its helpers (ContrastiveSegLib/losses/prototype.py)."""

from __future__ import annotations

import math

import pytest
import torch

from ContrastiveSegLib.losses import class_prototypes, prototype_contrastive_loss, sample_anchors

HAND_CASES = [
    pytest.param(
        # Anchor [1, 0] (class 1); prototypes [1, 0] (1) and [0, 1] (2); tau = 0.5, s = 2 cos.
        # One term: -log(e^2 / (e^2 + e^0)) = log(1 + e^-2) = 0.1269280
        [[1.0, 0.0]],
        [1],
        [[1.0, 0.0], [0.0, 1.0]],
        [1, 2],
        0.1269280,
        id="one-positive",
    ),
    pytest.param(
        # Two prototypes of class 1: [1, 0] (s = 2) and [0.6, 0.8] (cos 0.6, s = 1.2), one of
        # class 2: [0, 1] (s = 0).  Denominator e^2 + e^1.2 + 1 = 11.7091730.
        # Terms: -log(e^2 / 11.709173) = 0.4603726 and -log(e^1.2 / 11.709173) = 1.2603726.
        # Mean = 0.8603726
        [[1.0, 0.0]],
        [1],
        [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]],
        [1, 1, 2],
        0.8603726,
        id="two-positives",
    ),
    pytest.param(
        # Anchor 0 as in "one-positive" (term 0.1269280); anchor 1 has class 3, which has no
        # prototype: it adds no term.  Mean = 0.1269280.
        [[1.0, 0.0], [0.0, 1.0]],
        [1, 3],
        [[1.0, 0.0], [0.0, 1.0]],
        [1, 2],
        0.1269280,
        id="missing-class",
    ),
    pytest.param(
        # Lengths do not matter (cosine), and terms of several anchors are averaged:
        # anchor [0, 5] (class 2) vs prototypes [2, 0] (1), [0, 3] (2): -log(e^2/(e^2+1)) = 0.1269280;
        # anchor [4, 0] (class 1): the same.  Mean 0.1269280.
        [[0.0, 5.0], [4.0, 0.0]],
        [2, 1],
        [[2.0, 0.0], [0.0, 3.0]],
        [1, 2],
        0.1269280,
        id="scale-invariant",
    ),
]


@pytest.mark.parametrize(("anchors", "anchor_labels", "prototypes", "prototype_labels", "expected"), HAND_CASES)
def test_hand_computed_values(anchors, anchor_labels, prototypes, prototype_labels, expected):
    loss = prototype_contrastive_loss(
        torch.tensor(anchors), torch.tensor(anchor_labels), torch.tensor(prototypes), torch.tensor(prototype_labels), tau=0.5
    )
    assert loss.ndim == 0
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def reference_prototype_loss(anchors, anchor_labels, prototypes, prototype_labels, tau):
    def cosine(u, v):
        return sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))

    terms = []
    for a, label in zip(anchors.tolist(), anchor_labels.tolist()):
        logits = [cosine(a, p) / tau for p in prototypes.tolist()]
        log_denominator = math.log(sum(math.exp(s) for s in logits))
        terms += [log_denominator - s for s, c in zip(logits, prototype_labels.tolist()) if c == label]
    return sum(terms) / len(terms) if terms else 0.0


@pytest.mark.parametrize(("seed", "tau"), [(0, 0.1), (1, 0.5)])
def test_matches_loop_reference(seed, tau):
    generator = torch.Generator().manual_seed(seed)
    anchors = torch.randn(10, 4, generator=generator, dtype=torch.float64)
    anchor_labels = torch.randint(1, 5, (10,), generator=generator)
    prototypes = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    prototype_labels = torch.tensor([1, 2, 3, 1, 2, 6])  # class 4 missing, class 6 has no anchor
    loss = prototype_contrastive_loss(anchors, anchor_labels, prototypes, prototype_labels, tau)
    expected = reference_prototype_loss(anchors, anchor_labels, prototypes, prototype_labels, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_gradients_are_correct():
    generator = torch.Generator().manual_seed(2)
    anchors = torch.randn(5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    prototypes = torch.randn(3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    anchor_labels = torch.tensor([1, 2, 2, 3, 1])
    prototype_labels = torch.tensor([1, 2, 1])
    assert torch.autograd.gradcheck(
        lambda a, p: prototype_contrastive_loss(a, anchor_labels, p, prototype_labels, 0.5), (anchors, prototypes)
    )


@pytest.mark.parametrize(
    ("anchor_labels", "prototype_labels"),
    [
        pytest.param([1, 2], [3, 4], id="no-shared-class"),
        pytest.param([1, 2], [], id="no-prototype"),
        pytest.param([], [1, 2], id="no-anchor"),
    ],
)
def test_no_term_gives_connected_zero(anchor_labels, prototype_labels):
    anchors = torch.randn(len(anchor_labels), 3, requires_grad=True)
    prototypes = torch.randn(len(prototype_labels), 3, requires_grad=True)
    loss = prototype_contrastive_loss(
        anchors, torch.tensor(anchor_labels, dtype=torch.long), prototypes, torch.tensor(prototype_labels, dtype=torch.long)
    )
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(anchors.grad, torch.zeros_like(anchors))
    assert torch.equal(prototypes.grad, torch.zeros_like(prototypes))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"prototypes": torch.ones(2, 5)}, ValueError),
        ({"anchor_labels": torch.ones(4, dtype=torch.long)}, ValueError),
        ({"prototype_labels": torch.ones(2)}, ValueError),
        ({"tau": 0}, ValueError),
        ({"anchors": None}, TypeError),
    ],
)
def test_bad_arguments_are_rejected(kwargs, error):
    arguments = {
        "anchors": torch.ones(3, 4),
        "anchor_labels": torch.ones(3, dtype=torch.long),
        "prototypes": torch.ones(2, 4),
        "prototype_labels": torch.ones(2, dtype=torch.long),
    }
    arguments.update(kwargs)
    with pytest.raises(error, match="prototype_contrastive_loss"):
        prototype_contrastive_loss(**arguments)


# --- class_prototypes ------------------------------------------------------------------------


def test_class_prototypes_of_a_channel_first_map():
    # C = 2, D = 1, H = 2, W = 2.  Labels [[0, 1], [1, 2]] (0 = background).
    embeddings = torch.tensor([[[[1.0, 2.0], [4.0, 8.0]]], [[[0.0, 1.0], [3.0, -1.0]]]])
    labels = torch.tensor([[[0, 1], [1, 2]]])
    prototypes, prototype_labels = class_prototypes(embeddings, labels)
    # Class 1: voxels (0,0,1) = [2, 1] and (0,1,0) = [4, 3]: mean [3, 2].  Class 2: [8, -1].
    torch.testing.assert_close(prototypes, torch.tensor([[3.0, 2.0], [8.0, -1.0]]))
    assert prototype_labels.tolist() == [1, 2]
    assert prototype_labels.dtype == torch.long


def test_class_prototypes_of_rows_and_other_background():
    rows = torch.tensor([[1.0, 1.0], [3.0, 1.0], [0.0, 2.0]])
    prototypes, prototype_labels = class_prototypes(rows, torch.tensor([5, 5, 0]), background=5)
    torch.testing.assert_close(prototypes, torch.tensor([[0.0, 2.0]]))
    assert prototype_labels.tolist() == [0]


def test_class_prototypes_without_foreground():
    prototypes, prototype_labels = class_prototypes(torch.ones(4, 1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    assert prototypes.shape == (0, 4)
    assert prototype_labels.shape == (0,)


@pytest.mark.parametrize(
    ("embeddings", "labels", "error"),
    [
        (torch.ones(2, 3, 3), torch.zeros(4, 3, dtype=torch.long), ValueError),
        (torch.ones(5, 2), torch.zeros(4, dtype=torch.long), ValueError),
        (torch.ones(5, 2), torch.zeros(5), ValueError),
        (torch.ones(5, 2, dtype=torch.long), torch.zeros(5, dtype=torch.long), ValueError),
    ],
)
def test_class_prototypes_rejects_bad_arguments(embeddings, labels, error):
    with pytest.raises(error, match="class_prototypes"):
        class_prototypes(embeddings, labels)


# --- sample_anchors --------------------------------------------------------------------------


def test_sample_anchors_per_class_counts_and_order():
    labels = torch.zeros(4, 4, 4, dtype=torch.long)
    labels[0] = 1  # 16 voxels
    labels[1, 0, :3] = 2  # 3 voxels
    labels[3, 3, 3] = 7  # 1 voxel
    indices = sample_anchors(labels, 5, generator=torch.Generator().manual_seed(0))
    assert indices.dtype == torch.long
    drawn = labels.reshape(-1)[indices]
    assert drawn.tolist() == [1] * 5 + [2] * 3 + [7]
    assert len(set(indices.tolist())) == indices.numel()
    # Ascending within each class.
    for value in (1, 2, 7):
        chosen = indices[drawn == value]
        assert torch.equal(chosen, chosen.sort().values)


def test_sample_anchors_is_random_and_reproducible():
    labels = torch.ones(50, dtype=torch.long)
    first = sample_anchors(labels, 4, generator=torch.Generator().manual_seed(1))
    again = sample_anchors(labels, 4, generator=torch.Generator().manual_seed(1))
    other = sample_anchors(labels, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_sample_anchors_background_and_empty():
    labels = torch.tensor([0, 0, 3, 3])
    assert sample_anchors(labels, 2, background=3).tolist() == [0, 1]
    empty = sample_anchors(torch.zeros(5, dtype=torch.long), 2)
    assert empty.shape == (0,)
    assert empty.dtype == torch.long


@pytest.mark.parametrize(
    ("labels", "n_per_class"),
    [(torch.zeros(4), 2), (torch.zeros(4, dtype=torch.long), 0), (torch.zeros(4, dtype=torch.long), 1.5)],
)
def test_sample_anchors_rejects_bad_arguments(labels, n_per_class):
    with pytest.raises(ValueError, match="sample_anchors"):
        sample_anchors(labels, n_per_class)
