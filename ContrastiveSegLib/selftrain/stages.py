"""The stage plan of a self-training run, and how each stage's Trainer reports into the one run.

A stage is the baseline (round 0) or a round; each has its own folder
(``RUN/stages/<stage>/``) for its Trainer's checkpoints, while the run keeps one
STOP file, one event stream and one pair of ``RUN/checkpoints``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional

from ..engine.runfolder import RunFolder

if TYPE_CHECKING:
    from .run import _SelfTraining

STATE_FILE = "selftrain.json"
STATE_FORMAT = 1


@dataclass
class Stage:
    """One stage of the plan: ``baseline`` (round 0) or ``round_<r>``."""

    name: str
    round: int
    steps: int
    source: str = "trained"   # "init": the baseline is the --init model, nothing is trained


def stage_plan(rounds: int, steps: int, baseline_from_init: bool) -> List[Stage]:
    plan = [Stage("baseline", 0, 0 if baseline_from_init else steps, "init" if baseline_from_init else "trained")]
    plan += [Stage(f"round_{r}", r, steps) for r in range(1, rounds + 1)]
    return plan


class _StageFolder(RunFolder):
    """A stage's own folder for its Trainer; the STOP file stays the run's (``RUN/STOP``)."""

    def __init__(self, root: str, stop_file: str):
        super().__init__(root)
        self._stop_file = stop_file

    @property
    def stop_file(self) -> str:
        return self._stop_file


class _StageEvents:
    """The event log a stage's Trainer writes to.

    Its ``start`` and ``finished`` are dropped (the run emits one of each), ``step`` events get
    the run's step counter, total and ETA, ``validation`` events say whether the run's best
    improved (not only the stage's), and the stage's checkpoints are mirrored into
    ``RUN/checkpoints`` (``last.pt`` always, ``best.pt`` when the run's best improved), which is
    what the ``checkpoint`` events then report.
    """

    def __init__(self, owner: "_SelfTraining", stage: Stage, offset: int, stage_root: str):
        self.owner = owner
        self.stage = stage
        self.offset = offset
        self.stage_root = stage_root
        self.to_stdout = owner.events.to_stdout
        self.enabled = owner.events.enabled
        self.listeners = owner.events.listeners
        self._new_best: Optional[float] = None

    def message(self, text: str, level: str = "info") -> None:
        self.owner.events.message(text, level=level)

    def emit(self, event: str, **fields: Any) -> dict:
        owner = self.owner
        if event in ("start", "finished"):
            return {"event": event, **fields}
        if isinstance(fields.get("step"), int):
            fields["step"] += self.offset
        fields["stage"], fields["round"] = self.stage.name, self.stage.round
        if event == "step":
            fields["total"] = owner.total_steps
            rate = fields.get("steps_per_s")
            fields["eta_s"] = (owner.total_steps - fields["step"]) / rate if rate else None
        elif event == "validation":
            mean = fields.get("mean_dice")
            better = mean is not None and (owner.best_mean_dice is None or mean > owner.best_mean_dice)
            fields["best"] = bool(better)
            self._new_best = float(mean) if better else None
        elif event == "checkpoint":
            source = os.path.join(self.stage_root, fields["path"])
            if fields.get("kind") == "last":
                return owner.mirror(source, "last", fields["step"], self.stage)
            if fields.get("kind") == "best" and self._new_best is not None:
                value, self._new_best = self._new_best, None
                owner.set_best(self.stage, value)
                return owner.mirror(source, "best", fields["step"], self.stage)
            return {"event": event, **fields}  # a stage best that is not the run's best stays private
        return owner.events.emit(event, **fields)
