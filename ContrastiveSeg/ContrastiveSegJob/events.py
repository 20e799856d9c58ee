"""The engine's JSON-lines events turned into a progress state the GUI draws.

The engine prints one JSON object per line on standard output (``--events-stdout``),
mixed with ordinary log lines (its progress bar goes to standard error, which
the module merges in).  :func:`parse_event_line` tells them apart and
:class:`ProgressState` folds the events of a job (one or more engine runs, e.g.
pre-training then fine-tuning) into what the GUI shows: a progress fraction,
ETA, current loss, per-organ validation Dice, checkpoints, the outcome.

The schema is ``docs/run-folder.md``; unknown keys and events are ignored, as it
asks.
"""

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

KNOWN_EVENTS = ("start", "step", "validation", "checkpoint", "finished", "error", "message")


def parse_event_line(line: str) -> Optional[Dict[str, Any]]:
    """The event a line of engine output holds, or None for an ordinary log line.

    An event is a JSON object with a string ``event`` key that ends the line.  It
    may be preceded by other text: standard error is merged into standard output,
    and a progress bar redraws its line with a carriage return but no newline, so
    the next event is glued to the bar's text (see :func:`split_event_line`).
    """
    return split_event_line(line)[1]


def split_event_line(line: str) -> Tuple[str, Optional[Dict[str, Any]]]:
    """``(text before the event, event)``; ``(line, None)`` when the line holds no event."""
    text = line.rstrip()
    if not text.endswith("}"):
        return line, None
    start = text.find("{")
    while start != -1:
        try:
            value = json.loads(text[start:])
        except ValueError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("event"), str):
            return text[:start].strip(), value
        start = text.find("{", start + 1)
    return line, None


_PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d*|\[\d+:\d\d(:\d\d)?(<|, )")


def is_progress_bar(text: str) -> bool:
    """Whether a log line is a redraw of a console progress bar (``finetune:  33%|###   | 1/3 [...]``)."""
    return bool(_PROGRESS_BAR.search(text))


def format_duration(seconds: Optional[float]) -> str:
    """``3725`` -> ``"1 h 02 min"``, ``95`` -> ``"1 min 35 s"``, ``None`` -> ``"unknown"``."""
    if seconds is None or not isinstance(seconds, (int, float)) or math.isnan(seconds) or seconds < 0:
        return "unknown"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


@dataclass
class PhaseProgress:
    """One engine run of a job (``pretrain``, ``finetune``, ``selftrain``, ``predict``)."""

    name: str
    run_dir: Optional[str] = None
    step: int = 0
    start_step: int = 0
    total: Optional[int] = None
    finished: bool = False

    def fraction(self) -> float:
        """Share of this phase done, 0..1."""
        if self.finished:
            return 1.0
        if not self.total:
            return 0.0
        return min(1.0, max(0.0, self.step / float(self.total)))


@dataclass
class ProgressState:
    """Everything the GUI shows about a running job, updated event by event.

    Create it with the job's phase names (in run order), then call
    :meth:`begin_phase` when each engine run starts and :meth:`apply` for each
    event.  All fields are plain data, so the state can be printed or tested.
    """

    phases: List[PhaseProgress] = field(default_factory=list)
    current_phase: int = -1
    device: Optional[str] = None
    organs: List[str] = field(default_factory=list)
    loss: Optional[float] = None
    losses: Dict[str, float] = field(default_factory=dict)
    learning_rate: Optional[float] = None
    steps_per_second: Optional[float] = None
    eta_seconds: Optional[float] = None
    dice: Dict[str, Optional[float]] = field(default_factory=dict)
    mean_dice: Optional[float] = None
    best_mean_dice: Optional[float] = None
    best_step: Optional[int] = None
    validation_step: Optional[int] = None
    checkpoints: Dict[str, str] = field(default_factory=dict)
    finished: bool = False
    stopped: bool = False
    error_message: Optional[str] = None
    error_kind: Optional[str] = None
    warnings: List[str] = field(default_factory=list)
    events_seen: int = 0

    @classmethod
    def for_phases(cls, names: List[str], run_dirs: Optional[List[Optional[str]]] = None) -> "ProgressState":
        """A fresh state for a job made of the given engine runs."""
        run_dirs = run_dirs or [None] * len(names)
        return cls(phases=[PhaseProgress(name, run_dir) for name, run_dir in zip(names, run_dirs)])

    @property
    def phase(self) -> Optional[PhaseProgress]:
        """The engine run going on now (None before the first starts)."""
        if 0 <= self.current_phase < len(self.phases):
            return self.phases[self.current_phase]
        return None

    def begin_phase(self, index: int) -> None:
        """Mark engine run ``index`` as started; per-run values (loss, ETA) are reset."""
        self.current_phase = index
        self.loss = None
        self.losses = {}
        self.eta_seconds = None
        self.steps_per_second = None
        self.finished = False

    def end_phase(self) -> None:
        """Mark the current engine run as done (its process exited successfully)."""
        if self.phase is not None:
            self.phase.finished = True

    def apply(self, event: Dict[str, Any]) -> bool:
        """Fold one event into the state. Returns True if anything the GUI shows changed."""
        kind = event.get("event")
        if kind not in KNOWN_EVENTS:
            return False
        self.events_seen += 1
        phase = self.phase
        if kind == "start":
            self.device = _as_str(event.get("device")) or self.device
            labels = event.get("labels")
            if isinstance(labels, list):
                self.organs = [str(name) for name in labels]
            if phase is not None:
                phase.total = _as_int(event.get("total_steps")) or phase.total
                phase.start_step = _as_int(event.get("start_step")) or 0
                phase.step = phase.start_step
                phase.run_dir = _as_str(event.get("run_dir")) or phase.run_dir
            return True
        if kind == "step":
            if phase is not None:
                phase.step = _as_int(event.get("step")) or phase.step
                phase.total = _as_int(event.get("total")) or phase.total
            self.loss = _as_float(event.get("loss"))
            self.learning_rate = _as_float(event.get("lr"))
            self.steps_per_second = _as_float(event.get("steps_per_s"))
            self.eta_seconds = _as_float(event.get("eta_s"))
            losses = event.get("losses")
            if isinstance(losses, dict):
                self.losses = {str(k): v for k, v in ((k, _as_float(v)) for k, v in losses.items()) if v is not None}
            return True
        if kind == "validation":
            dice = event.get("dice")
            if isinstance(dice, dict):
                self.dice = {str(organ): _as_float(value) for organ, value in dice.items()}
            self.mean_dice = _as_float(event.get("mean_dice"))
            self.validation_step = _as_int(event.get("step"))
            best_flag = event.get("best")
            better = self.mean_dice is not None and (self.best_mean_dice is None or self.mean_dice > self.best_mean_dice)
            if best_flag is True or (best_flag is None and better):
                self.best_mean_dice = self.mean_dice
                self.best_step = self.validation_step
            return True
        if kind == "checkpoint":
            checkpoint_kind = _as_str(event.get("kind")) or "last"
            path = _as_str(event.get("path"))
            if path:
                self.checkpoints[checkpoint_kind] = path
            return True
        if kind == "finished":
            self.stopped = bool(event.get("stopped"))
            best = _as_float(event.get("best_mean_dice"))
            if best is not None:
                self.best_mean_dice = best
            if phase is not None:
                phase.step = _as_int(event.get("step")) or phase.step
                if not self.stopped:
                    phase.finished = True
            self.finished = True
            self.eta_seconds = 0.0 if not self.stopped else self.eta_seconds
            return True
        if kind == "error":
            self.error_message = _as_str(event.get("message")) or "the engine reported an error"
            self.error_kind = _as_str(event.get("kind")) or "internal"
            return True
        if kind == "message":
            if event.get("level") == "warning" and event.get("text"):
                self.warnings.append(str(event.get("text")))
                return True
            return False
        return False

    def fraction(self) -> float:
        """Share of the whole job done, 0..1, weighting each engine run by its number of steps."""
        if not self.phases:
            return 0.0
        known_totals = [p.total for p in self.phases if p.total]
        default_total = (sum(known_totals) / len(known_totals)) if known_totals else 1.0
        weights = [float(p.total or default_total) for p in self.phases]
        done = sum(weight * p.fraction() for weight, p in zip(weights, self.phases))
        return min(1.0, done / sum(weights))

    def percent(self) -> int:
        """:meth:`fraction` as a whole percentage for a progress bar."""
        return int(math.floor(self.fraction() * 100.0 + 1e-9))

    def status_text(self) -> str:
        """One line for the status label, e.g. ``"finetune: step 120 / 2000 · loss 0.412 · ETA 3 min 05 s"``."""
        phase = self.phase
        if phase is None:
            return "Starting..."
        parts = []
        name = phase.name
        if len(self.phases) > 1:
            name = f"{phase.name} ({self.current_phase + 1}/{len(self.phases)})"
        if phase.total:
            parts.append(f"{name}: step {phase.step} / {phase.total}")
        else:
            parts.append(f"{name}: starting")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        if self.eta_seconds is not None and not self.finished:
            parts.append(f"ETA {format_duration(self.eta_seconds)}")
        if self.device:
            parts.append(self.device)
        return " \u00b7 ".join(parts)

    def dice_rows(self) -> List[Dict[str, Any]]:
        """Rows for the live validation table: ``{"organ", "dice"}``, organs in model order."""
        order = list(self.organs) + [organ for organ in self.dice if organ not in self.organs]
        return [{"organ": organ, "dice": self.dice.get(organ)} for organ in order if organ in self.dice]


def _as_float(value) -> Optional[float]:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _as_int(value) -> Optional[int]:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _as_str(value) -> Optional[str]:
    return None if value is None else str(value)
