"""A study's results as ``study.csv``, ``study.png`` and ``report.md`` (from the content of ``study.json``).

Every number here is read from the finished cells; nothing is re-measured.  The
verdict of an arm compares it with ``scratch`` at the end of training (the
point fixed before the study ran); the earlier points are shown, not judged,
so that looking at several points does not turn into choosing the best one.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data.io import atomic_output
from .statistics import MIN_PAIRED_UNITS, paired_bootstrap_ci, units_needed, verdict

END = "100%"
GAIN = 0.02


def finished_cells(study: Dict) -> List[Dict]:
    return [cell for cell in study["cells"] if cell.get("status") == "finished"]


def _point(cell: Dict, name: str) -> Optional[Dict]:
    for point in cell["points"]:
        if point["point"] == name:
            return point
    return None


def point_names(cells: Sequence[Dict]) -> List[str]:
    """The scored points in budget order (``25%``, ``50%``, ``100%``), then ``best on validation`` if any."""
    names: Dict[str, float] = {}
    for cell in cells:
        for point in cell["points"]:
            names[point["point"]] = point["fraction"] if point["fraction"] is not None else 2.0
    return sorted(names, key=lambda name: names[name])


def case_scores(cells: Sequence[Dict], arm: str, count: int, point: str, organ: Optional[str] = None
                ) -> Tuple[List[int], List[str], np.ndarray]:
    """``(seeds, test case ids, [S, T] Dice)`` of one arm and count at one point; NaN where missing.

    ``organ`` None: each case's mean Dice over the organs; else that organ's Dice.
    """
    chosen = [c for c in cells if c["arm"] == arm and c["n"] == count and _point(c, point)]
    seeds = sorted({c["seed"] for c in chosen})
    cases = sorted({case for c in chosen for case in _point(c, point)["cases"]})
    values = np.full((len(seeds), len(cases)), np.nan)
    for c in chosen:
        for case, score in _point(c, point)["cases"].items():
            value = score["mean_dice"] if organ is None else score["dice"].get(organ)
            if value is not None:
                values[seeds.index(c["seed"]), cases.index(case)] = value
    return seeds, cases, values


def paired_differences(cells: Sequence[Dict], arm: str, count: int, point: str = END,
                       reference: str = "scratch") -> np.ndarray:
    """``[S, T]`` Dice of ``arm`` minus ``reference`` over the seeds and test cases both have."""
    seeds_a, cases_a, a = case_scores(cells, arm, count, point)
    seeds_r, cases_r, r = case_scores(cells, reference, count, point)
    seeds = [s for s in seeds_a if s in seeds_r]
    cases = [c for c in cases_a if c in cases_r]
    out = np.full((len(seeds), len(cases)), np.nan)
    for i, seed in enumerate(seeds):
        for j, case in enumerate(cases):
            out[i, j] = a[seeds_a.index(seed), cases_a.index(case)] - r[seeds_r.index(seed), cases_r.index(case)]
    return out


def _mean(values: np.ndarray) -> Optional[float]:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _fmt(value: Optional[float], signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def write_csv(path: str, cells: Sequence[Dict]) -> None:
    """One row per cell, scored point, test case and organ (organ ``mean`` = the case's mean Dice)."""
    with atomic_output(path) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(["arm", "n", "seed", "point", "step", "test_case", "organ", "dice"])
            for cell in cells:
                for point in cell["points"]:
                    for case, score in point["cases"].items():
                        rows = list(score["dice"].items()) + [("mean", score["mean_dice"])]
                        for organ, value in rows:
                            writer.writerow([cell["arm"], cell["n"], cell["seed"], point["point"], point["step"],
                                             case, organ, "" if value is None else f"{value:.6f}"])


def write_plot(path: str, cells: Sequence[Dict], arms: Sequence[str], organs: Sequence[str]) -> None:
    """Mean Dice at the end of training against n (log axis): a line per arm, the seeds' range as a band.

    The first panel is the mean over organs; then one small panel per organ (with a single organ,
    only its panel).  A seed's value is its mean over the test cases.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({cell["n"] for cell in cells})
    panels = [None] + list(organs) if len(organs) > 1 else list(organs)  # one organ: its panel is the mean
    columns = min(len(panels), 4)
    rows = int(math.ceil(len(panels) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.0 * rows), squeeze=False)
    for index, organ in enumerate(panels):
        axis = axes[index // columns][index % columns]
        for arm in arms:
            centre, low, high, shown = [], [], [], []
            for count in counts:
                _, _, values = case_scores(cells, arm, count, END, organ)
                with np.errstate(all="ignore"):
                    per_seed = np.nanmean(values, axis=1) if values.size else np.array([])
                per_seed = per_seed[np.isfinite(per_seed)]
                if per_seed.size:
                    shown.append(count)
                    centre.append(per_seed.mean())
                    low.append(per_seed.min())
                    high.append(per_seed.max())
            if shown:
                line, = axis.plot(shown, centre, marker="o", label=arm)
                axis.fill_between(shown, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        axis.set_xscale("log")
        axis.set_xticks(counts)
        axis.set_xticklabels([str(c) for c in counts])
        axis.minorticks_off()
        axis.set_ylim(0.0, 1.0)
        axis.set_title("mean over organs" if organ is None else organ, fontsize=10)
        axis.set_xlabel("labelled training scans (n)")
        if index % columns == 0:
            axis.set_ylabel("Dice (test cases)")
        axis.grid(alpha=0.3)
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].axis("off")
    axes[0][0].legend(fontsize=8, title="band: range over seeds", title_fontsize=7)
    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)


def report_text(study: Dict) -> str:
    """The Markdown of ``report.md``."""
    settings = study["settings"]
    cells = finished_cells(study)
    arms = [arm["name"] for arm in settings["arms"] if any(c["arm"] == arm["name"] for c in cells)]
    organs = list(settings["labels"])
    counts = sorted({c["n"] for c in cells})
    points = point_names(cells)
    lines = [f"# Study: {', '.join(organs)}", ""]
    lines += [f"- arms: {', '.join(arms)}; label counts n: {', '.join(str(c) for c in counts)}; "
              f"seeds: {', '.join(str(s) for s in settings['seeds'])}",
              f"- {settings['budget_steps']} training steps per cell; scored at {', '.join(points)}",
              f"- test cases (never trained on or validated on): {', '.join(settings['test_case_ids'])}",
              f"- labelled pool: {len(settings['pool_case_ids'])} case(s); "
              f"{settings['val_count']} set aside for validation per seed",
              f"- finished cells: {len(cells)} of {len(study['cells'])}", ""]
    lines += ["## Mean Dice over seeds and test cases, and the paired difference to scratch", "",
              "The difference is the arm's Dice minus scratch's on the same subset, seed and test case, at the "
              "end of training; its 95 % interval is a two-way bootstrap over seeds and test cases "
              "(10 000 resamples).", ""]
    header = ["n", "arm"] + [f"Dice {p}" for p in points] + ["difference at end [95 % CI]", "pairs", "verdict"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    verdicts, sizes = [], []
    for count in counts:
        for arm in arms:
            row = [str(count), arm]
            for point in points:
                row.append(_fmt(_mean(case_scores(cells, arm, count, point)[2])))
            if arm == "scratch":
                row += ["(reference)", "", ""]
            else:
                interval = paired_bootstrap_ci(paired_differences(cells, arm, count))
                word = verdict(interval["low"], interval["high"], interval["units"]) if interval["units"] \
                    else "no paired cells yet"
                row += [f"{_fmt(interval['mean'], True)} [{_fmt(interval['low'], True)}, "
                        f"{_fmt(interval['high'], True)}]", str(interval["units"]), word]
                verdicts.append(f"- n = {count}, {arm} vs scratch: **{word}** (difference "
                                f"{_fmt(interval['mean'], True)}, 95 % CI {_fmt(interval['low'], True)} to "
                                f"{_fmt(interval['high'], True)}, {interval['units']} paired (seed, test case) units)")
                needed = units_needed(interval["sd"], GAIN)
                if needed is not None:
                    sizes.append(f"- n = {count}, {arm}: the paired differences spread with sd "
                                 f"{interval['sd']:.3f}; detecting a {GAIN} gain (two-sided 5 %, power 80 %) "
                                 f"needs about {needed} (seed, test case) pairs; this study has {interval['units']}")
                else:
                    sizes.append(f"- n = {count}, {arm}: one paired unit only, so the spread (and the study "
                                 "size a 0.02 gain needs) cannot be estimated")
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Verdicts (end of training)", ""] + (verdicts or ["- only scratch was run: nothing to compare"])
    lines += ["", "A verdict says no more than its interval: \"better\" or \"worse\" only when the whole 95 % "
              f"interval lies on one side of 0 and it rests on at least {MIN_PAIRED_UNITS} paired units (with "
              "fewer, even differences that all share one sign are not significant at 5 % in an exact "
              "sign-flip test, while a percentile bootstrap interval can still exclude 0). With few units a "
              "percentile bootstrap is too narrow rather than too wide: read a verdict on fewer than about 10 "
              "units as a hint.", ""]
    lines += ["## Study size for a 0.02 Dice gain", ""] + (sizes or ["- no comparison"])
    lines += ["", "The size is the normal approximation N = ((1.96 + 0.84) sd / 0.02)^2, treating the (seed, test "
              "case) pairs as independent; pairs that share a seed or a test case are not, so it is a lower "
              "bound. More test cases and more seeds both add pairs; only more test cases (and more distinct "
              "subsets) widen what the result says about new patients.", ""]
    lines += ["## Per organ at the end of training (mean over seeds and test cases)", "",
              "| n | arm | " + " | ".join(organs) + " |", "|" + "---|" * (len(organs) + 2)]
    for count in counts:
        for arm in arms:
            values = [_fmt(_mean(case_scores(cells, arm, count, END, organ)[2])) for organ in organs]
            lines.append(f"| {count} | {arm} | " + " | ".join(values) + " |")
    lines += ["", "![Dice against the number of labelled scans](study.png)", ""]
    return "\n".join(lines)


def write_report(out: str, study: Dict) -> Dict[str, str]:
    """Write ``study.csv``, ``study.png`` and ``report.md`` into ``out``; returns their paths."""
    cells = finished_cells(study)
    arms = [arm["name"] for arm in study["settings"]["arms"]]
    paths = {"csv": os.path.join(out, "study.csv"), "png": os.path.join(out, "study.png"),
             "md": os.path.join(out, "report.md")}
    write_csv(paths["csv"], cells)
    write_plot(paths["png"], cells, arms, study["settings"]["labels"])
    text = report_text(study)
    with atomic_output(paths["md"]) as temporary:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)
    return paths
