"""Overlap and surface-distance metrics on label maps (numpy, CPU).

Masks are boolean arrays of any dimension (``(z, y, x)`` for volumes); the
two masks of one comparison must have the same shape, i.e. lie on one grid.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}; "
                         "resample onto one grid first")


def dice(pred_mask: np.ndarray, ref_mask: np.ndarray) -> Optional[float]:
    """Dice coefficient ``2 |P & R| / (|P| + |R|)`` of two masks of equal shape.

    Returns:
        A float in [0, 1]; ``0.0`` when exactly one mask is empty; ``None``
        when both are empty (the organ is absent and correctly not predicted:
        undefined, and left out of means).
    """
    pred = np.asarray(pred_mask, dtype=bool)
    ref = np.asarray(ref_mask, dtype=bool)
    _check_pair(pred, ref)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    if total == 0:
        return None
    return 2.0 * int(np.count_nonzero(pred & ref)) / total


def dice_per_label(pred: np.ndarray, ref: np.ndarray, labels: Mapping[int, str]) -> Dict[str, Optional[float]]:
    """Dice of every named label of two label maps that share values.

    Args:
        pred: integer label map, e.g. ``(z, y, x)``.
        ref: integer label map of the same shape and the same value -> name convention.
        labels: value -> name; value 0 (background) is skipped; values sharing
            one name are scored as their union.

    Returns:
        ``{name: dice or None}`` in the order of ``labels``.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    _check_pair(pred, ref)
    values_by_name: Dict[str, list] = {}
    for value, name in labels.items():
        if int(value) != 0:
            values_by_name.setdefault(str(name), []).append(int(value))
    return {name: dice(np.isin(pred, values), np.isin(ref, values)) for name, values in values_by_name.items()}


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the array border counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing_zyx: Sequence[float]) -> Optional[float]:
    """95th percentile Hausdorff distance in mm.

    The distances from every surface voxel of each mask to the nearest surface
    voxel of the other are pooled (both directions together) and their 95th
    percentile taken (numpy's linear interpolation), as in medpy's ``hd95``.
    Surfaces are voxels with a face neighbour outside the mask.

    Args:
        pred_mask, ref_mask: boolean masks of equal shape, e.g. ``(z, y, x)``.
        spacing_zyx: voxel size in mm per array axis (``image.GetSpacing()[::-1]``).

    Returns:
        Distance in mm; ``None`` if either mask is empty.
    """
    pred = np.asarray(pred_mask, dtype=bool)
    ref = np.asarray(ref_mask, dtype=bool)
    _check_pair(pred, ref)
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing_zyx has {len(spacing)} values for {pred.ndim}-D masks")
    if not pred.any() or not ref.any():
        return None
    # Work in the bounding box of both masks, one voxel wider: every surface
    # voxel lies inside it, so the distances are exact and much cheaper.
    union = pred | ref
    box = []
    for axis in range(union.ndim):
        other_axes = tuple(a for a in range(union.ndim) if a != axis)
        present = np.flatnonzero(union.any(axis=other_axes))
        box.append(slice(max(int(present[0]) - 1, 0), min(int(present[-1]) + 2, union.shape[axis])))
    pred, ref = pred[tuple(box)], ref[tuple(box)]
    pred_surface, ref_surface = _surface(pred), _surface(ref)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[ref_surface]
    return float(np.percentile(np.concatenate([to_ref, to_pred]), 95))


def mean_dice(scores: Mapping[str, Optional[float]]) -> Optional[float]:
    """Mean of the non-None values of ``{name: dice}``; None if there are none."""
    values = [float(v) for v in scores.values() if v is not None]
    return float(np.mean(values)) if values else None
