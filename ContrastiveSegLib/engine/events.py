"""The run's event stream: one JSON object per line in ``RUN/events.jsonl``.

The schema is documented in ``docs/run-folder.md``; the Slicer module and any
other driver read only this file (or the same lines on stdout with
``--events-stdout``) while a run goes on.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, List, Optional


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class EventLog:
    """Appends events to ``path`` (and stdout, and listeners); a no-op writer on non-zero ranks.

    Args:
        path: the events.jsonl file, or None to keep no file.
        to_stdout: also print every line on standard output.
        enabled: False on DDP ranks other than 0, which must not write.
    """

    def __init__(self, path: Optional[str], to_stdout: bool = False, enabled: bool = True):
        self.path = path
        self.to_stdout = to_stdout
        self.enabled = enabled
        self.listeners: List[Callable[[dict], None]] = []

    def emit(self, event: str, **fields: Any) -> dict:
        record = {"event": event, "time": round(time.time(), 3)}
        record.update(_clean(fields))
        if not self.enabled:
            return record
        line = json.dumps(record, separators=(",", ":"))
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        if self.to_stdout:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        for listener in list(self.listeners):
            listener(record)
        return record

    def message(self, text: str, level: str = "info") -> None:
        self.emit("message", level=level, text=text)


def read_events(path: str) -> List[dict]:
    """All complete events of a file (a half-written last line is ignored)."""
    events = []
    if not os.path.exists(path):
        return events
    with open(path, "r", encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events
