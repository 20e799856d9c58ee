"""Training curves (loss and validation Dice against steps) from a run's events.jsonl."""

from __future__ import annotations

import os
import tempfile
from typing import Optional

from ..engine.events import read_events


def save_training_curves(events_path: str, png_path: str, title: Optional[str] = None) -> Optional[str]:
    """Plot the loss (and per-organ validation Dice, if any) of a run; returns the PNG path or None if no steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = read_events(events_path)
    steps = [e for e in events if e.get("event") == "step" and e.get("loss") is not None]
    if not steps:
        return None
    validations = [e for e in events if e.get("event") == "validation"]
    columns = 2 if validations else 1
    figure, axes = plt.subplots(1, columns, figsize=(5.5 * columns, 3.8), squeeze=False)
    loss_axis = axes[0][0]
    loss_axis.plot([e["step"] for e in steps], [e["loss"] for e in steps], lw=0.8, color="#1f77b4")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss")
    loss_axis.grid(alpha=0.3)
    if validations:
        dice_axis = axes[0][1]
        organs = sorted({name for e in validations for name in (e.get("dice") or {})})
        for organ in organs:
            points = [(e["step"], e["dice"][organ]) for e in validations if (e.get("dice") or {}).get(organ) is not None]
            if points:
                dice_axis.plot(*zip(*points), marker="o", ms=3, label=organ)
        means = [(e["step"], e["mean_dice"]) for e in validations if e.get("mean_dice") is not None]
        if means:
            dice_axis.plot(*zip(*means), color="black", lw=2, label="mean")
        dice_axis.set_ylim(0, 1)
        dice_axis.set_xlabel("step")
        dice_axis.set_ylabel("validation Dice")
        dice_axis.grid(alpha=0.3)
        dice_axis.legend(fontsize=8, loc="lower right")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    folder = os.path.dirname(os.path.abspath(png_path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    os.close(handle)
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    os.replace(temporary, png_path)
    return png_path
