"""The study's paired bootstrap interval, verdict and study size, on hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ContrastiveSegLib.study.statistics import (
    BETTER,
    NO_DIFFERENCE,
    WORSE,
    paired_bootstrap_ci,
    units_needed,
    verdict,
)

# A fixed [4 seeds, 3 test cases] pattern with mean exactly 0 and sd about 0.03.
ZERO_MEAN = np.array([[0.03, -0.02, 0.01],
                      [-0.04, 0.02, 0.00],
                      [0.05, -0.01, -0.03],
                      [-0.02, 0.04, -0.03]])


def test_a_known_difference_is_inside_its_interval_and_called_better():
    differences = 0.10 + ZERO_MEAN
    interval = paired_bootstrap_ci(differences, seed=0)
    assert interval["mean"] == pytest.approx(0.10)
    assert interval["low"] < 0.10 < interval["high"]
    assert interval["low"] > 0.0 and interval["units"] == 12
    assert verdict(interval["low"], interval["high"], interval["units"]) == BETTER


def test_a_known_loss_is_called_worse():
    interval = paired_bootstrap_ci(-0.10 + ZERO_MEAN, seed=0)
    assert interval["high"] < 0.0
    assert verdict(interval["low"], interval["high"], interval["units"]) == WORSE


def test_zero_difference_gives_an_interval_that_covers_zero():
    interval = paired_bootstrap_ci(ZERO_MEAN, seed=0)
    assert interval["mean"] == pytest.approx(0.0, abs=1e-12)
    assert interval["low"] < 0.0 < interval["high"]
    assert verdict(interval["low"], interval["high"], interval["units"]) == NO_DIFFERENCE


def test_the_interval_is_a_deterministic_function_of_data_and_seed():
    first = paired_bootstrap_ci(0.01 + ZERO_MEAN, seed=7)
    assert paired_bootstrap_ci(0.01 + ZERO_MEAN, seed=7) == first
    assert paired_bootstrap_ci(0.01 + ZERO_MEAN, seed=8) != first


def test_a_wider_spread_gives_a_wider_interval():
    narrow = paired_bootstrap_ci(0.05 + ZERO_MEAN, seed=0)
    wide = paired_bootstrap_ci(0.05 + 4 * ZERO_MEAN, seed=0)
    assert wide["high"] - wide["low"] > 3 * (narrow["high"] - narrow["low"])


def test_missing_values_are_left_out():
    differences = 0.10 + ZERO_MEAN
    differences[0, 0] = np.nan
    interval = paired_bootstrap_ci(differences, seed=0)
    assert interval["units"] == 11
    assert interval["mean"] == pytest.approx(np.nanmean(differences))
    assert math.isfinite(interval["low"]) and math.isfinite(interval["high"])


def test_one_seed_and_one_case_gives_no_spread():
    interval = paired_bootstrap_ci(np.array([[0.2]]))
    assert interval["low"] == interval["high"] == pytest.approx(0.2)
    assert math.isnan(interval["sd"])
    assert units_needed(interval["sd"]) is None


def test_units_needed_follows_the_normal_approximation():
    # ((1.959964 + 0.841621) * 0.02 / 0.02)^2 = 7.849 -> 8 pairs; four times the sd -> 16 times the pairs.
    assert units_needed(0.02, gain=0.02) == 8
    assert units_needed(0.08, gain=0.02) == 126
    assert units_needed(0.02, gain=0.04) == 6  # 1.96 by the formula; never below the fewest pairs that can show anything


def test_fewer_than_six_pairs_never_give_a_verdict():
    """Two seeds that both gain: the bootstrap interval is their range and excludes 0, yet 2 pairs prove nothing."""
    differences = np.array([[0.004], [0.008]])
    interval = paired_bootstrap_ci(differences)
    assert interval["low"] > 0.0
    assert verdict(interval["low"], interval["high"], interval["units"]) == NO_DIFFERENCE
    six = np.array([[0.004], [0.008], [0.005], [0.007], [0.006], [0.006]])
    interval = paired_bootstrap_ci(six)
    assert verdict(interval["low"], interval["high"], interval["units"]) == BETTER
