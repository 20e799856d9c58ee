"""Paths and small files of a run folder (see ``docs/run-folder.md``)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict

from ..errors import InputError


class RunFolder:
    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(str(root)))

    @property
    def config(self) -> str:
        return os.path.join(self.root, "config.json")

    @property
    def events(self) -> str:
        return os.path.join(self.root, "events.jsonl")

    @property
    def labels(self) -> str:
        return os.path.join(self.root, "labels.json")

    @property
    def colors(self) -> str:
        return os.path.join(self.root, "colors.json")

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.root, "checkpoints")

    @property
    def last_checkpoint(self) -> str:
        return os.path.join(self.checkpoints, "last.pt")

    @property
    def best_checkpoint(self) -> str:
        return os.path.join(self.checkpoints, "best.pt")

    @property
    def stop_file(self) -> str:
        return os.path.join(self.root, "STOP")

    @property
    def metrics(self) -> str:
        return os.path.join(self.root, "metrics.json")

    def create(self) -> None:
        """Make the folder (and checkpoints/), with a clear error when that is impossible."""
        check_writable_folder(self.root, what="run folder")
        os.makedirs(self.checkpoints, exist_ok=True)

    def read_json(self, path: str) -> Any:
        try:
            with open(path, "r", encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            raise InputError("does not exist: is this a ContrastiveSeg run folder?", path=path,
                             fix="give the --out folder of a finetune or pretrain run") from None


def write_json_atomic(path: str, data: Any) -> None:
    """Write JSON through a temporary file in the same folder and rename it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=2)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def check_writable_folder(folder: str, what: str = "output folder") -> None:
    """Create ``folder`` if needed and prove it can be written; InputError otherwise."""
    folder = os.path.abspath(os.path.expanduser(folder))
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise InputError(f"cannot be used as the {what}: {error.strerror or error}", path=folder,
                         fix="choose a folder you can write to (check the path and its permissions)") from None


def load_label_table(path: str) -> Dict[int, str]:
    """``labels.json`` -> ``{value: name}`` (values as ints)."""
    try:
        with open(path, "r", encoding="utf-8") as handle:
            raw = json.load(handle)
    except FileNotFoundError:
        raise InputError("does not exist", path=path) from None
    except ValueError as error:
        raise InputError(f"is not valid JSON ({error})", path=path) from None
    table: Dict[int, str] = {}
    for key, value in raw.items():
        try:
            table[int(key)] = str(value)
        except ValueError:
            try:
                table[int(value)] = str(key)
            except (TypeError, ValueError):
                raise InputError(f"entry {key!r}: {value!r} is neither 'value: name' nor 'name: value'",
                                 path=path) from None
    return table
