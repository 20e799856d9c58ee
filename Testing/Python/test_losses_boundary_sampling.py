"""Tests of MixCL's boundary-weighted sampling (ContrastiveSegLib/losses/boundary_sampling.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ContrastiveSegLib.losses import boundary_weight_map, sample_boundary_weighted

# W = 0.5 * sqrt(Dist) * exp(-Dist / mu) + eps with Dist = edt - 1.
BORDER = 0.05  # Dist 0: eps
DEPTH_1 = 0.5 * 1.0 * np.exp(-1 / 8) + 0.05  # Dist 1: 0.5 * 0.8824969 + 0.05 = 0.4912485
DEPTH_2 = 0.5 * np.sqrt(2) * np.exp(-2 / 8) + 0.05  # Dist 2: 0.5 * 1.4142136 * 0.7788008 + 0.05 = 0.6006953


def cube_in_volume():
    """A 5x5x5 cube inside a 7x7x7 volume: 98 border voxels, 26 at depth 1, 1 at depth 2."""
    mask = np.zeros((7, 7, 7), dtype=bool)
    mask[1:6, 1:6, 1:6] = True
    return mask


def test_hand_values_of_a_cube():
    weights = boundary_weight_map(cube_in_volume())
    assert weights.dtype == np.float64
    assert weights[3, 3, 3] == pytest.approx(0.6006953, abs=1e-7)
    assert weights[2, 3, 3] == pytest.approx(0.4912485, abs=1e-7)
    assert weights[1, 3, 3] == pytest.approx(0.05)
    assert weights[0, 3, 3] == 0.0
    values, counts = np.unique(np.round(weights, 7), return_counts=True)
    assert values.tolist() == pytest.approx([0.0, BORDER, DEPTH_1, DEPTH_2], abs=1e-7)
    assert counts.tolist() == [7**3 - 125, 98, 26, 1]


@pytest.mark.parametrize(
    ("mu", "eps", "centre", "border"),
    [
        # mu = 1: Dist 2 -> 0.5 * sqrt2 * e^-2 + 0.05 = 0.5 * 1.4142136 * 0.1353353 + 0.05 = 0.1456965
        (1.0, 0.05, 0.1456965, 0.05),
        # eps = 0: border voxels get 0; centre 0.6006953 - 0.05 = 0.5506953
        (8.0, 0.0, 0.5506953, 0.0),
    ],
)
def test_parameters(mu, eps, centre, border):
    weights = boundary_weight_map(cube_in_volume(), mu=mu, eps=eps)
    assert weights[3, 3, 3] == pytest.approx(centre, abs=1e-7)
    assert weights[1, 1, 1] == pytest.approx(border, abs=1e-12)


def test_the_array_edge_counts_as_a_border():
    # The cube filling the whole 5x5x5 array must get the same weights as the cube inside
    # a larger volume: the array is padded with background before the distance transform.
    whole = boundary_weight_map(np.ones((5, 5, 5), dtype=bool))
    np.testing.assert_allclose(whole, boundary_weight_map(cube_in_volume())[1:6, 1:6, 1:6])


def test_weight_peaks_at_half_mu_inside():
    # A 1-D run of 31 voxels: edt(i) = min(i + 1, 31 - i), Dist = min(i, 30 - i); with mu = 8
    # sqrt(D) exp(-D/8) is largest at D = mu/2 = 4, i.e. voxels 4 and 26.
    weights = boundary_weight_map(np.ones(31, dtype=bool))
    assert set(np.flatnonzero(weights == weights.max()).tolist()) == {4, 26}
    assert weights[4] == pytest.approx(0.5 * 2 * np.exp(-0.5) + 0.05)  # 0.6565307


@pytest.mark.parametrize(
    "mask",
    [
        pytest.param(np.pad(np.ones((1, 1, 1), dtype=bool), 2), id="one-voxel"),
        pytest.param(np.ones((1, 1, 1), dtype=bool), id="one-voxel-volume"),
        pytest.param(np.ones((1, 1, 7), dtype=bool), id="thin-line"),
        pytest.param(np.ones((2, 6, 6), dtype=bool), id="two-thick-slab"),
    ],
)
def test_thin_masks_are_all_border(mask):
    weights = boundary_weight_map(mask)
    np.testing.assert_allclose(weights[mask], 0.05)
    assert (weights[~mask] == 0).all()


def test_empty_mask_gives_zeros():
    weights = boundary_weight_map(np.zeros((3, 4, 5), dtype=bool))
    assert weights.shape == (3, 4, 5)
    assert not weights.any()


@pytest.mark.parametrize(
    ("mask", "kwargs"),
    [
        (np.ones((3, 3, 3), dtype=np.uint8), {}),
        (np.array(True), {}),
        (np.ones((3, 3, 3), dtype=bool), {"mu": 0.0}),
        (np.ones((3, 3, 3), dtype=bool), {"eps": -0.1}),
    ],
)
def test_weight_map_rejects_bad_arguments(mask, kwargs):
    with pytest.raises(ValueError, match="boundary_weight_map"):
        boundary_weight_map(mask, **kwargs)


def small_label_map():
    label = np.zeros((8, 8, 8), dtype=np.int16)
    label[1:6, 1:6, 1:6] = 1  # 125 voxels
    label[7, 7, 5:8] = 2  # 3 voxels, touching the edge
    label[7, 0, 0] = 5  # 1 voxel in a corner
    return label


def test_sampler_returns_up_to_r_distinct_voxels_per_class():
    label = small_label_map()
    samples = sample_boundary_weighted(label, r=10, generator=0)
    assert list(samples) == [1, 2, 5]
    for value, indices in samples.items():
        assert indices.dtype == np.int64
        assert indices.ndim == 1
        assert (np.diff(indices) > 0).all()  # sorted and without repeats
        assert (label.reshape(-1)[indices] == value).all()
    assert samples[1].size == 10
    # Classes with fewer than r voxels give all of them.
    np.testing.assert_array_equal(samples[2], np.flatnonzero(label == 2))
    np.testing.assert_array_equal(samples[5], [np.ravel_multi_index((7, 0, 0), label.shape)])


def test_sampler_takes_whole_class_when_r_equals_its_size():
    label = small_label_map()
    samples = sample_boundary_weighted(label, r=125, generator=1)
    np.testing.assert_array_equal(samples[1], np.flatnonzero(label == 1))


def test_sampler_background_and_empty_cases():
    label = small_label_map()
    assert sample_boundary_weighted(np.zeros((4, 4, 4), dtype=np.int64), r=3, generator=0) == {}
    samples = sample_boundary_weighted(label, r=4, background=1, generator=0)
    assert list(samples) == [0, 2, 5]
    assert (label.reshape(-1)[samples[0]] == 0).all()


def test_sampler_is_reproducible_with_a_seed():
    label = small_label_map()
    first = sample_boundary_weighted(label, r=20, generator=123)
    second = sample_boundary_weighted(label, r=20, generator=np.random.default_rng(123))
    assert first.keys() == second.keys()
    for value in first:
        np.testing.assert_array_equal(first[value], second[value])


def test_sampler_frequencies_follow_the_weight_map():
    # An irregular class cut by the volume edge (so the sampler's bounding-box crop and the
    # edge padding both matter), and a second class that must not disturb it.
    label = np.zeros((6, 7, 7), dtype=np.int64)
    label[0:5, 0:5, 0:5] = 3
    label[2:4, 5:7, 1:3] = 3
    label[5, 6, 6] = 4
    expected = boundary_weight_map(label == 3).reshape(-1)
    expected = expected / expected.sum()
    cells = np.flatnonzero(expected)

    draws = 6000
    rng = np.random.default_rng(2024)
    counts = np.zeros(label.size, dtype=np.int64)
    for _ in range(draws):
        counts[sample_boundary_weighted(label, r=1, generator=rng)[3]] += 1
    assert counts.sum() == draws
    assert counts[expected == 0].sum() == 0

    # Pearson chi-square over the class's voxels: every expected count is at least
    # 6000 * 0.05 / sum(W) ~ 13 (>= 5, so the chi-square approximation holds).  With the
    # fixed seed the outcome is deterministic; a correct sampler gives p ~ U(0, 1), a
    # sampler that ignores the weights gives p ~ 0.
    expected_counts = draws * expected[cells]
    assert expected_counts.min() >= 5
    statistic = ((counts[cells] - expected_counts) ** 2 / expected_counts).sum()
    assert stats.chi2.sf(statistic, df=cells.size - 1) > 1e-3

    # Grouped by weight value (border / depth 1 / depth 2 ...), each group's frequency is a
    # binomial proportion: within 4 standard deviations sqrt(p (1 - p) / draws).
    weights = np.round(boundary_weight_map(label == 3).reshape(-1), 9)
    for level in np.unique(weights[cells]):
        group = weights == level
        p = expected[group].sum()
        observed = counts[group].sum() / draws
        assert abs(observed - p) <= 4 * np.sqrt(p * (1 - p) / draws) + 1e-12, level


@pytest.mark.parametrize(
    ("label", "kwargs"),
    [
        (np.ones((3, 3, 3), dtype=np.float32), {"r": 1}),
        (np.ones((3, 3, 3), dtype=bool), {"r": 1}),
        (np.ones((3, 3, 3), dtype=np.int64), {"r": 0}),
        (np.ones((3, 3, 3), dtype=np.int64), {"r": 2.5}),
        (np.ones((3, 3, 3), dtype=np.int64), {"r": 1, "eps": 0.0}),
        (np.ones((3, 3, 3), dtype=np.int64), {"r": 1, "mu": -1.0}),
    ],
)
def test_sampler_rejects_bad_arguments(label, kwargs):
    with pytest.raises(ValueError, match="sample_boundary_weighted"):
        sample_boundary_weighted(label, **kwargs)
