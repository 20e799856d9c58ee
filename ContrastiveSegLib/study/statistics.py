"""Paired differences between two arms: a bootstrap confidence interval, a verdict, a study size.

The unit of a difference is a ``(seed, test case)`` pair: both arms trained on
the same subset with the same seed and were scored on the same test case, so
their difference removes what the subset and the case do to Dice.
"""

from __future__ import annotations

import math
import warnings
from statistics import NormalDist
from typing import Dict, Optional

import numpy as np

BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no detectable difference at this size"

# The fewest paired units that can show a difference at two-sided 5 %: an exact sign-flip test of U
# pairs whose differences all share one sign has p = 2 / 2^U, which is 0.0625 for 5 pairs and
# 0.031 for 6.  Below that a percentile bootstrap interval can still exclude 0 (with 2 pairs it is
# just their range), so no verdict other than "no detectable difference" is given.
MIN_PAIRED_UNITS = 6


def paired_bootstrap_ci(differences: np.ndarray, level: float = 0.95, resamples: int = 10000,
                        seed: int = 0) -> Dict[str, float]:
    """Percentile bootstrap interval of the mean paired difference, resampling seeds and test cases.

    Args:
        differences: ``[S, T]`` arm-minus-reference Dice, one row per seed, one column per
            test case; NaN where a value is missing (left out of the means).
        level: coverage of the interval, e.g. 0.95.
        resamples: bootstrap replicates.
        seed: seed of the resampling generator (the interval is a deterministic function of
            the data and this seed).

    Returns:
        ``{"mean", "low", "high", "sd", "units"}``: the observed mean difference, the interval,
        the standard deviation over the ``units`` observed ``(seed, case)`` pairs.

    Seeds and test cases are resampled independently (rows with replacement, columns with
    replacement; a two-way bootstrap), so both the luck of the subset and the luck of the test
    case widen the interval.  With few units a percentile bootstrap is too narrow rather than
    too wide; the report says how many units an interval rests on.
    """
    values = np.asarray(differences, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"differences must be [seeds, test cases], got shape {values.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    observed = np.isfinite(values)
    units = int(observed.sum())
    if units == 0:
        nan = float("nan")
        return {"mean": nan, "low": nan, "high": nan, "sd": nan, "units": 0}
    mean = float(values[observed].mean())
    sd = float(values[observed].std(ddof=1)) if units > 1 else float("nan")
    rng = np.random.default_rng(seed)
    seeds, cases = values.shape
    rows = rng.integers(0, seeds, size=(resamples, seeds))
    columns = rng.integers(0, cases, size=(resamples, cases))
    picked = values[rows[:, :, None], columns[:, None, :]]             # [B, S, T]
    with warnings.catch_warnings():  # a replicate made only of missing values is dropped below
        warnings.simplefilter("ignore", RuntimeWarning)
        replicate_means = np.nanmean(picked.reshape(resamples, -1), axis=1)
    replicate_means = replicate_means[np.isfinite(replicate_means)]
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(replicate_means, [tail, 1.0 - tail])
    return {"mean": mean, "low": float(low), "high": float(high), "sd": sd, "units": units}


def verdict(low: float, high: float, units: int) -> str:
    """``better`` when the whole interval is above 0, ``worse`` when below, otherwise no detectable difference.

    With fewer than :data:`MIN_PAIRED_UNITS` paired units no difference is detectable at 5 %,
    whatever the interval says.
    """
    if units < MIN_PAIRED_UNITS:
        return NO_DIFFERENCE
    if math.isfinite(low) and low > 0.0:
        return BETTER
    if math.isfinite(high) and high < 0.0:
        return WORSE
    return NO_DIFFERENCE


def units_needed(sd: float, gain: float = 0.02, alpha: float = 0.05, power: float = 0.8) -> Optional[int]:
    """Paired units needed to detect a mean difference of ``gain`` (two-sided ``alpha``, with ``power``).

    The normal approximation ``n = ((z_{1-alpha/2} + z_{power}) * sd / gain)^2`` for a paired
    difference whose per-unit standard deviation is ``sd``; it treats the ``(seed, case)``
    units as independent, so it is a lower bound when seeds or cases are correlated; and never
    fewer than :data:`MIN_PAIRED_UNITS`, below which no verdict is given.  None when ``sd`` is
    not known (fewer than two units).
    """
    if not math.isfinite(sd) or gain <= 0:
        return None
    z = NormalDist().inv_cdf(1.0 - alpha / 2.0) + NormalDist().inv_cdf(power)
    return max(MIN_PAIRED_UNITS, int(math.ceil((z * sd / gain) ** 2)))
