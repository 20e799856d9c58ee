"""Dice and HD95 against values computed by hand on tiny arrays."""

from __future__ import annotations

import numpy as np
import pytest

from ContrastiveSegLib.engine.metrics import dice, dice_per_label, hd95, mean_dice


def line_mask(start: int, stop: int, length: int = 12) -> np.ndarray:
    """A (1, 1, length) mask: voxels start..stop-1 along x."""
    mask = np.zeros((1, 1, length), bool)
    mask[0, 0, start:stop] = True
    return mask


def box_mask(shape, z, y, x) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = True
    return mask


def brute_force_hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """Definition, spelled out: surfaces by face neighbours, all pairwise distances."""
    def surface(mask):
        padded = np.pad(mask, 1)
        inner = padded.copy()
        for axis in range(mask.ndim):
            inner &= np.roll(padded, 1, axis) & np.roll(padded, -1, axis)
        return np.argwhere(mask & ~inner[tuple(slice(1, -1) for _ in range(mask.ndim))]) * np.asarray(spacing)

    a, b = surface(pred), surface(ref)
    distances = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([distances.min(1), distances.min(0)]), 95))


@pytest.mark.parametrize("pred, ref, expected", [
    (line_mask(0, 4), line_mask(2, 6), 0.5),          # overlap 2, sizes 4 + 4
    (line_mask(0, 3), line_mask(0, 9), 2 * 3 / 12),   # prediction inside reference
    (line_mask(0, 4), line_mask(0, 4), 1.0),
    (line_mask(0, 4), line_mask(6, 9), 0.0),          # disjoint
    (line_mask(0, 4), line_mask(0, 0), 0.0),          # reference empty
    (line_mask(0, 0), line_mask(0, 4), 0.0),          # prediction empty
    (line_mask(0, 0), line_mask(0, 0), None),         # both empty: undefined
])
def test_dice(pred, ref, expected):
    result = dice(pred, ref)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


def test_dice_of_boxes():
    pred = box_mask((4, 4, 4), (0, 2), (0, 2), (0, 2))  # 8 voxels
    ref = box_mask((4, 4, 4), (0, 2), (0, 2), (1, 3))   # 8 voxels, 4 shared
    assert dice(pred, ref) == pytest.approx(0.5)


def test_dice_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool))


def test_dice_per_label():
    pred = np.array([[[0, 1, 1, 2, 2, 3]]])
    ref = np.array([[[0, 1, 1, 1, 2, 0]]])
    scores = dice_per_label(pred, ref, {0: "background", 1: "liver", 2: "spleen", 4: "heart", 3: "aorta"})
    assert list(scores) == ["liver", "spleen", "heart", "aorta"]
    assert scores["liver"] == pytest.approx(2 * 2 / 5)
    assert scores["spleen"] == pytest.approx(2 * 1 / 3)
    assert scores["heart"] is None          # absent from both
    assert scores["aorta"] == 0.0           # predicted, not in reference
    # Two values of one name are scored as their union.
    union = dice_per_label(pred, ref, {1: "abdomen", 2: "abdomen"})
    assert union == {"abdomen": pytest.approx(2 * 4 / 8)}


@pytest.mark.parametrize("pred, ref, spacing, expected", [
    # A line shifted by 2 voxels of 1.5 mm: the ends are 3 mm from the other line.
    (line_mask(2, 8), line_mask(4, 10), (1.0, 1.0, 1.5), 3.0),
    (line_mask(2, 8), line_mask(2, 8), (1.0, 1.0, 1.5), 0.0),
    # 6x6x6 box shifted 2 voxels along x (1.5 mm): the front and back faces are 3 mm off.
    (box_mask((10, 10, 12), (2, 8), (2, 8), (2, 8)), box_mask((10, 10, 12), (2, 8), (2, 8), (4, 10)),
     (1.0, 1.0, 1.5), 3.0),
    # Same shift along y with 2 mm voxels there: 4 mm.
    (box_mask((10, 12, 10), (2, 8), (2, 8), (2, 8)), box_mask((10, 12, 10), (2, 8), (4, 10), (2, 8)),
     (1.0, 2.0, 1.0), 4.0),
])
def test_hd95_hand_computed(pred, ref, spacing, expected):
    assert hd95(pred, ref, spacing) == pytest.approx(expected)
    assert hd95(ref, pred, spacing) == pytest.approx(expected)  # symmetric
    assert brute_force_hd95(pred, ref, spacing) == pytest.approx(expected)


def test_hd95_matches_the_definition_on_irregular_shapes():
    rng = np.random.default_rng(3)
    from scipy import ndimage

    shape = (12, 14, 16)
    pred = ndimage.binary_dilation(rng.random(shape) > 0.97, iterations=2)
    ref = ndimage.binary_dilation(rng.random(shape) > 0.97, iterations=2)
    spacing = (2.5, 0.8, 1.2)
    assert hd95(pred, ref, spacing) == pytest.approx(brute_force_hd95(pred, ref, spacing))


def test_hd95_masks_touching_the_array_border():
    pred = box_mask((5, 6, 7), (0, 5), (0, 3), (0, 7))
    ref = box_mask((5, 6, 7), (0, 5), (1, 4), (0, 7))
    assert hd95(pred, ref, (1.0, 1.0, 1.0)) == pytest.approx(brute_force_hd95(pred, ref, (1.0, 1.0, 1.0)))


def test_hd95_empty_masks():
    assert hd95(line_mask(0, 0), line_mask(2, 4), (1, 1, 1)) is None
    assert hd95(line_mask(2, 4), line_mask(0, 0), (1, 1, 1)) is None
    assert hd95(line_mask(0, 0), line_mask(0, 0), (1, 1, 1)) is None


def test_hd95_spacing_must_match_dimensions():
    with pytest.raises(ValueError, match="spacing"):
        hd95(line_mask(0, 2), line_mask(0, 2), (1.0, 1.0))


def test_mean_dice_ignores_none():
    assert mean_dice({"liver": 0.8, "spleen": None, "kidney": 0.6}) == pytest.approx(0.7)
    assert mean_dice({"liver": None}) is None
    assert mean_dice({}) is None
