"""Score a predicted label map against a reference, organ by organ.

Organs are matched *by name*, never by value: a prediction that calls the
liver 1 is compared with a reference that calls it 5.  Names are compared in
canonical form (``"Kidney Left"`` == ``"kidney_left"``).  The prediction is
brought onto the reference grid (nearest neighbour, physical coordinates)
when the grids differ, so a label on a flipped or resampled grid is scored
correctly.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import numpy as np

from .data.io import (
    LabelImage,
    PathLike,
    SegmentInfo,
    atomic_output,
    describe_geometry,
    read_label_image,
    resample_label_image,
    same_grid,
)
from .data.labels import canonical_name
from .engine.metrics import dice, hd95, mean_dice
from .errors import InputError


def _names_table(labels: LabelImage, names: Optional[Mapping]) -> Dict[str, List[SegmentInfo]]:
    """``{canonical name: [segments]}`` for one side (several segments of one name are united)."""
    table: Dict[str, List[SegmentInfo]] = {}
    clean = {int(value): str(name) for value, name in (names or {}).items()}
    for segment in labels.segment_table(clean):
        key = canonical_name(segment.name)
        if key and key != "background":
            table.setdefault(key, []).append(segment)
    return table


def _mask(labels: LabelImage, segments: List[SegmentInfo]) -> np.ndarray:
    mask = labels.mask(segments[0])
    for segment in segments[1:]:
        mask = mask | labels.mask(segment)
    return mask


def _labelled_volume_mm3(labels: LabelImage) -> float:
    voxel_mm3 = float(np.prod(labels.image.GetSpacing()))
    return voxel_mm3 * sum(int(np.count_nonzero(layer)) for layer in labels.layers)


def _check_overlap(original: LabelImage, resampled: LabelImage, reference: LabelImage,
                   pred_path: PathLike, ref_path: PathLike) -> None:
    """Refuse a prediction that lies outside the reference scan; warn when most of it does."""
    before_mm3, after_mm3 = _labelled_volume_mm3(original), _labelled_volume_mm3(resampled)
    if before_mm3 <= 0:
        return
    if after_mm3 == 0:
        raise InputError("has no labelled voxel inside the reference's grid: the two files do not overlap "
                         f"in space (reference: {ref_path})", path=str(pred_path),
                         details=f"prediction:\n{describe_geometry(original.image)}\n"
                                 f"reference:\n{describe_geometry(reference.image)}",
                         fix="check that the prediction was made on the scan this reference belongs to")
    if after_mm3 < 0.5 * before_mm3:
        warnings.warn(f"{pred_path}: only {100 * after_mm3 / before_mm3:.0f}% of the labelled volume lies inside "
                      f"the reference grid of {ref_path}; check that the two files belong to the same scan",
                      stacklevel=3)


def evaluate_files(pred_path: PathLike, ref_path: PathLike, pred_names: Mapping[int, str],
                   ref_names: Optional[Mapping[int, str]] = None, with_hd95: bool = False) -> dict:
    """Dice (and optionally HD95) per organ of a predicted label file against a reference.

    Args:
        pred_path: predicted label map (NIfTI, NRRD, MetaImage or ``.seg.nrrd``).
        ref_path: reference label map, any grid; the prediction is resampled onto it.
        pred_names: value -> name of the prediction (``labels.json`` of the run).
            A ``.seg.nrrd`` prediction uses its own segment names instead.
        ref_names: value -> name of the reference.  A ``.seg.nrrd`` reference
            uses its own segment names; otherwise ``ref_names``, or
            ``pred_names`` when None.
        with_hd95: also compute the 95th percentile Hausdorff distance (slower).

    Returns:
        ``{"prediction": str, "reference": str,
        "dice": {name: float | None}, "hd95_mm": {name: float | None} (with_hd95 only),
        "mean_dice": float | None, "voxels": {name: {"prediction": int, "reference": int}},
        "only_in_prediction": [names], "only_in_reference": [names], "resampled": bool}``.
        Names are those of the reference, in its order.  An organ named on
        both sides is scored even if absent from the voxels (Dice None when
        absent from both).  ``only_in_*`` list organs named and present on one
        side only: they are not scored.  Voxel counts are on the reference grid.

    Raises:
        InputError: a file is missing or unreadable, or the prediction has
        labels but none of them falls inside the reference grid (files of two
        different scans).  Less than half of the labelled volume inside gives
        a ``UserWarning``.
    """
    prediction = read_label_image(pred_path)
    reference = read_label_image(ref_path)
    resampled = not same_grid(prediction.image, reference.image)
    if resampled:
        original = prediction
        prediction = resample_label_image(original, reference.image)
        _check_overlap(original, prediction, reference, pred_path, ref_path)

    pred_table = _names_table(prediction, pred_names)
    ref_table = _names_table(reference, ref_names if ref_names is not None else pred_names)
    spacing_zyx = tuple(reversed(reference.image.GetSpacing()))

    result: dict = {"prediction": str(pred_path), "reference": str(ref_path), "dice": {}}
    if with_hd95:
        result["hd95_mm"] = {}
    voxels: Dict[str, Dict[str, int]] = {}
    for key, ref_segments in ref_table.items():
        if key not in pred_table:
            continue
        name = ref_segments[0].name
        pred_mask = _mask(prediction, pred_table[key])
        ref_mask = _mask(reference, ref_segments)
        result["dice"][name] = dice(pred_mask, ref_mask)
        if with_hd95:
            result["hd95_mm"][name] = hd95(pred_mask, ref_mask, spacing_zyx)
        voxels[name] = {"prediction": int(np.count_nonzero(pred_mask)),
                        "reference": int(np.count_nonzero(ref_mask))}
    result["mean_dice"] = mean_dice(result["dice"])
    result["voxels"] = voxels
    result["only_in_prediction"] = [segments[0].name for key, segments in pred_table.items()
                                    if key not in ref_table and _mask(prediction, segments).any()]
    result["only_in_reference"] = [segments[0].name for key, segments in ref_table.items()
                                   if key not in pred_table and _mask(reference, segments).any()]
    result["resampled"] = resampled
    return result


def _cell(value: Optional[float], digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_table(metrics: Mapping) -> str:
    """An aligned text table of :func:`evaluate_files`' result: organ, Dice, HD95 (if present), voxels.

    Organs absent from both prediction and reference (Dice None) are left out
    and counted on the last line, which holds the mean Dice.  An HD95 that
    cannot be computed (one side empty) shows ``-``.
    """
    dice_scores: Mapping[str, Optional[float]] = metrics.get("dice", {})
    hd = metrics.get("hd95_mm")
    voxels = metrics.get("voxels", {})
    header = ["organ", "Dice"] + (["HD95 mm"] if hd is not None else []) + ["voxels pred", "voxels ref"]
    rows = []
    absent = 0
    for name, score in dice_scores.items():
        if score is None:
            absent += 1
            continue
        row = [name, _cell(score, 3)]
        if hd is not None:
            row.append(_cell(hd.get(name), 1))
        counts = voxels.get(name, {})
        row += [str(counts.get("prediction", "-")), str(counts.get("reference", "-"))]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    widths[0] = max(widths[0], len("mean"))

    def line(cells: List[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        return "  ".join([first] + [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:])]).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths)]
    lines += [line(r) for r in rows]
    mean = metrics.get("mean_dice")
    note = f"  ({len(rows)} organs" + (f"; {absent} absent from both not shown)" if absent else ")")
    lines.append(f"{'mean':<{widths[0]}}  {_cell(mean, 3):>{widths[1]}}{note}")
    return "\n".join(lines)


def _plain(value):
    """JSON-ready copy: numpy scalars to Python, NaN to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_metrics(path: PathLike, metrics: Mapping) -> Path:
    """Write ``metrics`` as indented JSON, atomically (temporary file, then rename).

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    text = json.dumps(_plain(dict(metrics)), indent=2, allow_nan=False) + "\n"
    with atomic_output(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path
