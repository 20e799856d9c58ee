"""The logic's collaborators inside the Slicer application (see ``ContrastiveSegLogic.services``)."""

import os
import tempfile
from typing import Iterator, MutableMapping

import qt
import slicer
from ContrastiveSegJob.commands import find_engine_parent
from ContrastiveSegJob.treekill import start_watchdog
from ContrastiveSegLogic.services import LogicServices

from .dependencies import SlicerInstaller
from .runners import QtScheduler, default_runner_factory, python_slicer_executable

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SlicerSettings(MutableMapping):
    """Slicer's application settings (``QSettings``) as a mapping of strings."""

    def __getitem__(self, key: str) -> str:
        value = qt.QSettings().value(key)
        if value is None:
            raise KeyError(key)
        return str(value)

    def __setitem__(self, key: str, value: str) -> None:
        qt.QSettings().setValue(key, value)

    def __delitem__(self, key: str) -> None:
        qt.QSettings().remove(key)

    def __iter__(self) -> Iterator[str]:
        return iter(qt.QSettings().allKeys())

    def __len__(self) -> int:
        return len(qt.QSettings().allKeys())


def engine_parent_folder() -> str:
    """The folder holding the ``ContrastiveSegLib`` engine package."""
    folder = find_engine_parent([MODULE_DIR])
    if folder is None:
        raise RuntimeError("The ContrastiveSegLib engine was not found next to the module. "
                           "Reinstall the ContrastiveSeg extension.")
    return folder


def slicer_services(runner_factory=None, scheduler=None) -> LogicServices:
    """Everything the logic needs from the running Slicer."""
    documents = qt.QStandardPaths.writableLocation(qt.QStandardPaths.DocumentsLocation)
    return LogicServices(
        scene=slicer.mrmlScene,
        runner_factory=runner_factory or default_runner_factory(),
        scheduler=scheduler or QtScheduler(),
        python_executable=python_slicer_executable,
        engine_parent=engine_parent_folder,
        settings=SlicerSettings(),
        documents_folder=documents or None,
        temporary_folders=(slicer.app.temporaryPath, tempfile.gettempdir()),
        engine_pythonpath=slicer.util.startupEnvironment().get("PYTHONPATH"),
        pump=slicer.app.processEvents,
        installer=SlicerInstaller(os.path.join(MODULE_DIR, "Resources", "requirements.txt"), python_slicer_executable),
        start_watchdog=lambda pid, grace_s: start_watchdog(pid, grace_s, python_slicer_executable()),
    )
