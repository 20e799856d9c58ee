"""Reading an engine run folder (``docs/run-folder.md``), asking it to stop, deleting it.

    RUN/labels.json  colors.json  events.jsonl  config.json  metrics.json
    RUN/checkpoints/last.pt, best.pt
    RUN/STOP         created here to ask the trainer for a cooperative stop
"""

import enum
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from .events import parse_event_line
from .labels import normalize_label_table

PathLike = Union[str, "os.PathLike[str]"]

STOP_FILE = "STOP"
EVENTS_FILE = "events.jsonl"
LABELS_FILE = "labels.json"
COLORS_FILE = "colors.json"
CONFIG_FILE = "config.json"
CHECKPOINT_FOLDER = "checkpoints"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"

# Files and folders that mark a folder as written by ContrastiveSeg: only such
# folders are deleted by delete_output_folder, never an arbitrary user folder.
_RUN_MARKERS = (EVENTS_FILE, CONFIG_FILE, LABELS_FILE, CHECKPOINT_FOLDER)


class RunStatus(enum.Enum):
    """Where a run folder stands."""

    NONE = "none"                # no run here yet
    INCOMPLETE = "incomplete"    # started, but no checkpoint was written
    INTERRUPTED = "interrupted"  # has a checkpoint but no "finished" event (killed, crashed, power cut)
    STOPPED = "stopped"          # ended by a STOP file; continue with --resume
    FINISHED = "finished"        # trained to the end


def read_events(run_dir: PathLike) -> List[Dict[str, Any]]:
    """All events of ``RUN/events.jsonl`` (lines that are not events are skipped)."""
    path = Path(run_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    events = []
    with open(path, encoding="utf-8", errors="replace") as file:
        for line in file:
            event = parse_event_line(line)
            if event is not None:
                events.append(event)
    return events


def run_status(run_dir: PathLike) -> RunStatus:
    """The :class:`RunStatus` of a run folder, from its last engine start on."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return RunStatus.NONE
    events = read_events(run_dir)
    starts = [index for index, event in enumerate(events) if event.get("event") == "start"]
    since_start = events[starts[-1]:] if starts else events
    finished = [event for event in since_start if event.get("event") == "finished"]
    if finished:
        return RunStatus.STOPPED if finished[-1].get("stopped") else RunStatus.FINISHED
    if (run_dir / CHECKPOINT_FOLDER / LAST_CHECKPOINT).is_file():
        return RunStatus.INTERRUPTED
    if events or (run_dir / CONFIG_FILE).is_file():
        return RunStatus.INCOMPLETE
    return RunStatus.NONE


def read_labels(run_dir: PathLike) -> Dict[int, str]:
    """The model's output classes ``{value: organ}`` from ``RUN/labels.json`` (background left out)."""
    path = Path(run_dir) / LABELS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found. Is {run_dir} a ContrastiveSeg training folder "
                                "(finetune/ or selftrain/ inside the output folder)?")
    with open(path, encoding="utf-8") as file:
        return normalize_label_table(json.load(file))


def read_colors(run_dir: PathLike) -> Dict[str, Tuple[int, int, int]]:
    """Organ colours ``{organ: (r, g, b)}`` (0-255) from ``RUN/colors.json``; empty if absent."""
    path = Path(run_dir) / COLORS_FILE
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as file:
        content = json.load(file)
    colors = {}
    for name, rgb in content.items() if isinstance(content, dict) else []:
        if isinstance(rgb, (list, tuple)) and len(rgb) >= 3:
            colors[str(name)] = tuple(int(c) for c in rgb[:3])
    return colors


def model_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """The weights a prediction would use: ``best.pt`` if present, else ``last.pt``, else None."""
    folder = Path(run_dir) / CHECKPOINT_FOLDER
    for name in (BEST_CHECKPOINT, LAST_CHECKPOINT):
        if (folder / name).is_file():
            return folder / name
    return None


def is_model_folder(run_dir: PathLike) -> bool:
    """Whether ``run_dir`` holds a model to predict with (labels.json and a checkpoint)."""
    return (Path(run_dir) / LABELS_FILE).is_file() and model_checkpoint(run_dir) is not None


def stop_file(run_dir: PathLike) -> Path:
    """``RUN/STOP``."""
    return Path(run_dir) / STOP_FILE


def request_stop(run_dir: PathLike) -> Path:
    """Create ``RUN/STOP`` to ask the trainer for a cooperative stop; returns its path."""
    path = stop_file(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("stop requested by the ContrastiveSeg Slicer module\n", encoding="utf-8")
    return path


def clear_stop(run_dir: PathLike) -> bool:
    """Remove a leftover ``RUN/STOP`` (else the next ``--resume`` would stop at once)."""
    path = stop_file(run_dir)
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def folder_size_bytes(folder: PathLike) -> int:
    """Total size of the files under ``folder`` (0 if it does not exist)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def format_size(size_bytes: int) -> str:
    """``1536`` -> ``"1.5 kB"``."""
    size = float(size_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000.0 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000.0
    return f"{size:.1f} TB"


def looks_like_output_folder(folder: PathLike) -> bool:
    """Whether ``folder`` is a ContrastiveSeg output folder or run folder (safe to delete)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    if any((folder / marker).exists() for marker in _RUN_MARKERS):
        return True
    children = [child for child in folder.iterdir()]
    return bool(children) and all(
        child.is_dir() and any((child / marker).exists() for marker in _RUN_MARKERS + ("dataset.json",))
        for child in children)


def delete_output_folder(folder: PathLike) -> int:
    """Delete a ContrastiveSeg output (or run) folder and everything in it; returns the bytes freed.

    Refuses (ValueError) a folder that does not look like one, so a wrong click
    cannot delete unrelated data.
    """
    if not looks_like_output_folder(folder):
        raise ValueError(f"{folder} does not look like a ContrastiveSeg output folder; not deleting it. "
                         "Delete it with your file manager if you are sure.")
    size = folder_size_bytes(folder)
    shutil.rmtree(folder)
    return size
