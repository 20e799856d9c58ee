"""Process runners and timers that need the Slicer application (Qt event loop).

They implement the interfaces of ``ContrastiveSegJob.process`` so the job
controller, tested in CI with a fake runner, drives real processes here:

* :class:`LaunchConsoleProcessRunner`: ``slicer.util.launchConsoleProcess(...,
  blocking=False, logCallback=..., completedCallback=...)`` (Slicer 5.12 and later);
* :class:`QProcessRunner`: ``qt.QProcess`` with merged output (older Slicer).

Both deliver output lines and the exit code on the GUI thread, so the GUI is
never blocked and never touched from another thread.
"""

import inspect
import logging
import os
import shutil
import sys
from typing import Callable, Dict, Optional, Sequence

import qt
import slicer
from ContrastiveSegJob.process import ProcessRunner, Scheduler


def launch_console_process_supports_async() -> bool:
    """Whether this Slicer's ``launchConsoleProcess`` has the non-blocking mode (5.12+)."""
    try:
        parameters = inspect.signature(slicer.util.launchConsoleProcess).parameters
    except (TypeError, ValueError):
        return False
    return all(name in parameters for name in ("blocking", "logCallback", "completedCallback"))


def default_runner_factory() -> Callable[[], ProcessRunner]:
    """The best runner this Slicer offers."""
    if launch_console_process_supports_async():
        return LaunchConsoleProcessRunner
    return QProcessRunner


def python_slicer_executable() -> str:
    """The ``PythonSlicer`` executable: Slicer's Python without the GUI, to run the engine."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    candidate = os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
    if os.path.isfile(candidate):
        return candidate
    raise RuntimeError("PythonSlicer was not found next to Slicer. Reinstall Slicer, or run the engine "
                       "from a terminal with: PythonSlicer -m ContrastiveSegLib --help")


class LaunchConsoleProcessRunner(ProcessRunner):
    """Runs a process with ``slicer.util.launchConsoleProcess(blocking=False)`` (Slicer >= 5.12)."""

    def __init__(self):
        self._process = None
        self._exited = False
        self._on_line: Optional[Callable[[str], None]] = None
        self._on_exit: Optional[Callable[[int], None]] = None

    def start(self, argv: Sequence[str], cwd: Optional[str], env: Optional[Dict[str, str]],
              on_line: Callable[[str], None], on_exit: Callable[[int], None]) -> None:
        self._on_line, self._on_exit = on_line, on_exit
        self._process = slicer.util.launchConsoleProcess(
            list(argv), useStartupEnvironment=True, updateEnvironment=dict(env or {}), cwd=cwd,
            blocking=False, logCallback=self._line, completedCallback=self._completed)

    def _line(self, line: str) -> None:
        if self._on_line:
            self._on_line(line)

    def _completed(self, return_code: int) -> None:
        self._exited = True
        if self._on_exit:
            self._on_exit(return_code)

    def is_running(self) -> bool:
        return self._process is not None and not self._exited and self._process.poll() is None

    def pid(self) -> Optional[int]:
        return None if self._process is None else self._process.pid


class QProcessRunner(ProcessRunner):
    """Runs a process with ``qt.QProcess``, stdout and stderr merged (any Slicer version)."""

    def __init__(self):
        self._process = None
        self._buffer = ""
        self._exited = False
        self._on_line: Optional[Callable[[str], None]] = None
        self._on_exit: Optional[Callable[[int], None]] = None

    def start(self, argv, cwd, env, on_line, on_exit) -> None:
        self._on_line, self._on_exit = on_line, on_exit
        process = qt.QProcess()
        process.setProcessChannelMode(qt.QProcess.MergedChannels)
        # Like launchConsoleProcess: the environment Slicer was started with (PythonSlicer is a
        # launcher that sets up its own paths), plus ours.
        environment = qt.QProcessEnvironment()
        startup = slicer.util.startupEnvironment()
        startup.update(env or {})
        for key, value in startup.items():
            environment.insert(key, value)
        process.setProcessEnvironment(environment)
        if cwd:
            process.setWorkingDirectory(cwd)
        process.readyReadStandardOutput.connect(self._read)
        process.finished.connect(self._finished)
        process.errorOccurred.connect(self._error)
        self._process = process
        process.start(argv[0], list(argv[1:]))

    def _read(self) -> None:
        data = self._process.readAllStandardOutput()
        self._buffer += bytes(data.data()).decode("utf-8", errors="replace")
        # progress bars end their lines with "\r": treat it as a line end too
        text = self._buffer.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        self._buffer = lines.pop()
        for line in lines:
            if self._on_line:
                self._on_line(line)

    def _finished(self, exit_code=0, exit_status=None) -> None:
        if self._exited:
            return
        self._read()
        if self._buffer and self._on_line:
            self._on_line(self._buffer)
        self._buffer = ""
        self._exited = True
        crashed = exit_status is not None and exit_status == qt.QProcess.CrashExit
        if self._on_exit:
            self._on_exit(int(exit_code) if not crashed else -1)

    def _error(self, error=None) -> None:
        if error == qt.QProcess.FailedToStart and not self._exited:
            logging.error("ContrastiveSeg: the engine process failed to start")
            if self._on_line:
                self._on_line("The engine process failed to start: is PythonSlicer installed?")
            self._exited = True
            if self._on_exit:
                self._on_exit(-1)

    def is_running(self) -> bool:
        return self._process is not None and not self._exited and \
            self._process.state() != qt.QProcess.NotRunning

    def pid(self) -> Optional[int]:
        if self._process is None:
            return None
        pid = self._process.processId()
        return int(pid) if pid else None


class QtScheduler(Scheduler):
    """Timers on the Qt event loop (``qt.QTimer.singleShot``)."""

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> None:
        qt.QTimer.singleShot(int(max(0.0, delay_s) * 1000), callback)
