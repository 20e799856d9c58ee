"""MixCL boundary-weighted pixel sampling (Eq. 7).

Voxels a few voxels inside an organ's border are the most informative for the
label-consistency loss; the weight map favours them, gives border voxels a
small floor ``eps`` and lets deep interior voxels fade.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _check_mu_eps(func: str, mu: float, eps: float, eps_must_be_positive: bool) -> None:
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not np.isfinite(mu) or mu <= 0:
        raise ValueError(f"{func}: mu must be a finite number > 0, got {mu!r}.")
    low = "> 0" if eps_must_be_positive else ">= 0"
    if (
        isinstance(eps, bool)
        or not isinstance(eps, (int, float))
        or not np.isfinite(eps)
        or eps < 0
        or (eps_must_be_positive and eps == 0)
    ):
        raise ValueError(f"{func}: eps must be a finite number {low}, got {eps!r}.")


def boundary_weight_map(mask: np.ndarray, mu: float = 8.0, eps: float = 0.05) -> np.ndarray:
    """Sampling weight of every voxel of one class mask (MixCL Eq. 7).

    Inside the mask ``W = 0.5 * sqrt(Dist) * exp(-Dist / mu) + eps`` with
    ``Dist = edt(mask) - 1``, where ``edt`` is
    :func:`scipy.ndimage.distance_transform_edt`: the Euclidean distance, in
    voxels, to the nearest voxel outside the mask.  Border voxels have
    ``edt = 1``, so ``Dist = 0`` and ``W = eps``; ``W`` peaks at ``Dist = mu/2``
    (4 voxels inside for ``mu = 8``) and decays deeper in.  Outside the mask ``W = 0``.

    The edge of the array counts as a border (our choice): the mask is padded by
    one voxel of background on every side before the distance transform, so an
    organ cut by the patch edge gets border weights there too (without the
    padding, ``edt`` would treat the outside of the array as more organ).

    Args:
        mask: boolean numpy array ``[D, H, W]`` (any number of dimensions works),
            True inside the class.
        mu: decay length in voxels, > 0 (default 8).
        eps: floor weight of every voxel inside the mask, >= 0 (default 0.05).

    Returns:
        float64 array of the same shape as ``mask``.
    """
    func = "boundary_weight_map"
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise ValueError(
            f"{func}: mask must be a boolean array, got dtype {mask.dtype}; "
            "pass label == value for one class of a label map."
        )
    if mask.ndim == 0:
        raise ValueError(f"{func}: mask must have at least one dimension, got a scalar.")
    _check_mu_eps(func, mu, eps, eps_must_be_positive=False)
    weights = np.zeros(mask.shape, dtype=np.float64)
    if not mask.any():
        return weights
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[(slice(1, -1),) * mask.ndim]
    inside = distance[mask] - 1.0
    weights[mask] = 0.5 * np.sqrt(inside) * np.exp(-inside / mu) + eps
    return weights


def sample_boundary_weighted(
    label: np.ndarray,
    r: int,
    mu: float = 8.0,
    eps: float = 0.05,
    background: int = 0,
    generator: np.random.Generator | int | None = None,
) -> dict[int, np.ndarray]:
    """Draw up to ``r`` voxels of each foreground class, favouring voxels near its border.

    For each label value present other than ``background``, ``min(r, n_voxels)``
    distinct voxels are drawn without replacement, each draw with probability
    proportional to :func:`boundary_weight_map` of that class (among the voxels
    not drawn yet).  A class with at most ``r`` voxels gives all of them.

    Args:
        label: integer numpy array ``[D, H, W]``, one label value per voxel.
        r: voxels per class, >= 1 (MixCL's budget, default 128 in the configs).
        mu, eps: weight-map parameters, see :func:`boundary_weight_map`; here
            ``eps`` must be > 0 so that every voxel can be drawn.
        background: label value that is never sampled (default 0).
        generator: a ``numpy.random.Generator``, an int seed, or None (fresh
            entropy); passed to :func:`numpy.random.default_rng`.

    Returns:
        ``{label value (int): 1-D int64 array of flat (C-order) voxel indices}``,
        indices sorted ascending, one entry per foreground value present, in
        ascending label order; empty dict when there is no foreground.
    """
    func = "sample_boundary_weighted"
    label = np.asarray(label)
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(
            f"{func}: label must be an integer array, got dtype {label.dtype}; "
            "convert it with .astype(np.int64) (after rounding, for a resampled map)."
        )
    if label.ndim == 0:
        raise ValueError(f"{func}: label must have at least one dimension, got a scalar.")
    if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)) or r < 1:
        raise ValueError(f"{func}: r must be an integer >= 1, got {r!r}.")
    _check_mu_eps(func, mu, eps, eps_must_be_positive=True)
    rng = np.random.default_rng(generator)

    samples: dict[int, np.ndarray] = {}
    for value in np.unique(label):
        if value == background:
            continue
        mask = label == value
        coords = np.nonzero(mask)
        if coords[0].size <= r:
            samples[int(value)] = np.sort(np.ravel_multi_index(coords, label.shape).astype(np.int64))
            continue
        # The weight map of the class's bounding box equals the full one: every
        # voxel outside the box is background and the box is padded by one
        # voxel of background, which is never farther than the true nearest one.
        box = tuple(slice(c.min(), c.max() + 1) for c in coords)
        box_weights = boundary_weight_map(mask[box], mu, eps)
        local = np.nonzero(box_weights)
        probabilities = box_weights[local] / box_weights[local].sum()
        chosen = rng.choice(probabilities.size, size=r, replace=False, p=probabilities)
        global_coords = tuple(lc[chosen] + s.start for lc, s in zip(local, box))
        samples[int(value)] = np.sort(np.ravel_multi_index(global_coords, label.shape).astype(np.int64))
    return samples
