"""What the logic is given instead of reaching for the Slicer application itself.

Inside Slicer ``ContrastiveSegSlicer.wiring.slicer_services()`` fills these
with the real things (``launchConsoleProcess`` / ``QProcess`` runners, ``QTimer``,
``QSettings``, ``PythonSlicer``, the install dialog); tests fill them with fakes.
"""

from dataclasses import dataclass, field
from typing import Callable, MutableMapping, Optional, Sequence

from ContrastiveSegJob.commands import EngineRun
from ContrastiveSegJob.process import ProcessRunner, Scheduler

# Settings keys (stored by Slicer in its application settings, prefixed as Slicer asks).
OUTPUT_FOLDER_KEY = "ContrastiveSeg/OutputFolder"
LAST_MODEL_KEY = "ContrastiveSeg/LastModelFolder"


class NoInstaller:
    """Installs nothing: for scripts and tests where the packages are present."""

    def prepare(self, folder: str, ask: bool) -> Optional[EngineRun]:
        return None


@dataclass
class LogicServices:
    """The collaborators of :class:`ContrastiveSegLogic.logic.JobLogic`.

    Attributes:
        scene: the ``vtkMRMLScene``.
        runner_factory: makes a process runner for each engine process.
        scheduler: one-shot timers on the GUI thread (the cancel sequence, stepwise export).
        python_executable: returns the Python that runs the engine (``PythonSlicer``).
        engine_parent: returns the folder holding the ``ContrastiveSegLib`` package.
        settings: persistent key -> value store (``QSettings`` inside Slicer).
        documents_folder: the user's documents folder (the default output root goes there).
        temporary_folders: folders never used as output root (Slicer's temporary folder, the system's).
        engine_pythonpath: ``PYTHONPATH`` Slicer was started with, kept for the engine.
        pump: lets the event loop run while :meth:`wait` blocks (``slicer.app.processEvents``).
        installer: ``prepare(folder, ask) -> EngineRun or None``: asks once and returns the pip run to do
            first (None: nothing to install); raises when the user declines.
        kill_tree: ends a process tree (root pid).
        start_watchdog: ``(pid, grace_s) -> watchdog pid``: ends the tree after ``grace_s`` unless it exited.
    """

    scene: object
    runner_factory: Callable[[], ProcessRunner]
    scheduler: Scheduler
    python_executable: Callable[[], str]
    engine_parent: Callable[[], str]
    settings: MutableMapping[str, str] = field(default_factory=dict)
    documents_folder: Optional[str] = None
    temporary_folders: Sequence[str] = ()
    engine_pythonpath: Optional[str] = None
    pump: Optional[Callable[[], None]] = None
    installer: object = field(default_factory=NoInstaller)
    kill_tree: Optional[Callable[[int], object]] = None
    start_watchdog: Optional[Callable[[int, float], int]] = None
