"""Post-processing chosen on cases with known labels: keep only an organ's largest connected component.

A network trained on one or two scans often finds a second, smaller island of an organ somewhere it
does not belong (a "spleen" in the liver's tip, an "aorta" in a bowel loop).  nnU-Net's rule: for each
organ, keep only its largest connected component if, and only if, doing so raised that organ's mean
Dice on the cases the decision is made on; otherwise leave it as predicted (an organ may legitimately
appear in pieces, such as a bowel or a kidney cut by the scan's edge).

The decision is stored in the run folder (``postprocess.json``) and ``predict`` applies it.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

POSTPROCESS_FILE = "postprocess.json"


def largest_component(labels: np.ndarray, value: int) -> np.ndarray:
    """``labels`` with every voxel of class ``value`` outside its largest 26-connected component set to 0.

    Works on any 3D integer array (``(z, y, x)`` or ``[X, Y, Z]``); returns a new array of its dtype.
    """
    out = np.array(labels, copy=True)
    mask = out == value
    if not mask.any():
        return out
    components, count = label_regions(mask, structure=np.ones((3, 3, 3), dtype=bool))
    del mask
    if count <= 1:
        return out
    sizes = value_counts(components, count)
    sizes[0] = 0
    dropped = np.ones(count + 1, dtype=bool)   # per region number: set to background?
    dropped[[0, int(np.argmax(sizes))]] = False
    out[dropped[components]] = 0
    return out


def value_counts(values: np.ndarray, largest: int, chunk: int = 1 << 22) -> np.ndarray:
    """Voxels per value ``0..largest`` of a non-negative integer array (a label map, region numbers).

    ``np.bincount`` of the whole array would first convert it to int64 (600 MiB
    for a 512 x 512 x 300 volume); counted chunk by chunk, it costs 32 MiB.
    """
    flat = values.reshape(-1)
    counts = np.zeros(int(largest) + 1, dtype=np.int64)
    for start in range(0, flat.size, chunk):
        counts += np.bincount(flat[start:start + chunk], minlength=int(largest) + 1)[:int(largest) + 1]
    return counts


def label_regions(mask: np.ndarray, structure: Optional[np.ndarray] = None):
    """``scipy.ndimage.label`` into uint16 when the regions fit (half the memory of int32), else int32.

    ``(regions, count)``; ``structure`` as scipy's (default: face neighbours).
    """
    from scipy import ndimage

    try:
        return ndimage.label(mask, structure=structure, output=np.uint16)
    except RuntimeError:   # more regions than uint16 holds
        return ndimage.label(mask, structure=structure)


def apply_postprocessing(labels: np.ndarray, decision: Optional[Mapping], names: Mapping[int, str]) -> np.ndarray:
    """Apply a stored ``decision`` (``{"largest_component": [organ names]}``) to a labelmap.

    ``names`` maps the labelmap's values to organ names; organs not in the decision are left alone.
    """
    if not decision:
        return labels
    chosen = set(decision.get("largest_component", []))
    out = labels
    for value, name in names.items():
        if int(value) != 0 and name in chosen:
            out = largest_component(out, int(value))
    return out


def choose_postprocessing(predictions: Sequence[np.ndarray], references: Sequence[np.ndarray],
                          names: Mapping[int, str], chosen_on: str = "validation") -> Dict:
    """Per organ, keep the largest component only where that raised the organ's mean Dice over the cases.

    Args:
        predictions: predicted labelmaps, one per case (any 3D layout).
        references: the reference labelmaps on the same grids, with the same values.
        names: value -> organ name (background excluded or ignored).
        chosen_on: which cases these are, recorded in the decision.

    Returns:
        ``{"largest_component": [names], "dice_before": {name: mean}, "dice_after": {name: mean},
        "chosen_on": chosen_on, "cases": n}``; an organ absent from every reference is left out.
    """
    from .metrics import dice_per_label

    organs = {int(v): n for v, n in names.items() if int(v) != 0}
    before: Dict[str, list] = {n: [] for n in organs.values()}
    after: Dict[str, list] = {n: [] for n in organs.values()}
    for prediction, reference in zip(predictions, references):
        plain = dice_per_label(prediction, reference, organs)
        for value, name in organs.items():
            if plain.get(name) is None:
                continue
            kept = dice_per_label(largest_component(prediction, value), reference, {value: name})
            before[name].append(plain[name])
            after[name].append(kept[name])
    dice_before = {n: float(np.mean(v)) for n, v in before.items() if v}
    dice_after = {n: float(np.mean(after[n])) for n in dice_before}
    chosen = [n for n in dice_before if dice_after[n] > dice_before[n]]
    return {"largest_component": chosen, "dice_before": dice_before, "dice_after": dice_after,
            "chosen_on": chosen_on, "cases": len(predictions)}


def load_postprocessing(run_dir: str) -> Optional[Dict]:
    """The decision stored in a run folder, or None (runs without one predict unchanged)."""
    import json

    path = os.path.join(run_dir, POSTPROCESS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as handle:
        return json.load(handle)
