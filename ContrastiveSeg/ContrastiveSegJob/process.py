"""Running a job (one or more engine processes) without blocking, following it, stopping it.

:class:`JobController` is the part CI tests for real.  It talks to processes
only through a :class:`ProcessRunner` (injected: ``launchConsoleProcess`` or
``QProcess`` inside Slicer, :class:`ThreadedPopenRunner` from plain Python, a
fake in tests) and to time only through a :class:`Scheduler` and a clock, so
the cancel sequence can be played step by step:

1. write ``RUN/STOP`` (the trainer checks it after every step, writes
   ``checkpoints/last.pt`` and exits with status 0);
2. wait up to ``stop_timeout_s`` for the process to exit;
3. if it has not, end the whole process tree (children, then the parent);
4. remove a leftover ``STOP`` file so a later ``--resume`` does not stop at once.
"""

import enum
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Sequence

from .commands import EngineRun
from .events import ProgressState, is_progress_bar, split_event_line
from .runfolder import clear_stop, request_stop
from .treekill import kill_process_tree

LineCallback = Callable[[str], None]
ExitCallback = Callable[[int], None]


class ProcessRunner(Protocol):
    """Interface of a process runner (a structural type: subclassing is optional).

    ``start`` launches ``argv`` and returns at once; ``on_line`` is called with
    each line of merged stdout/stderr and ``on_exit`` once with the exit code,
    both on the caller's (GUI) thread.
    """

    def start(self, argv: Sequence[str], cwd: Optional[str], env: Optional[Dict[str, str]],
              on_line: LineCallback, on_exit: ExitCallback) -> None: ...

    def is_running(self) -> bool: ...

    def pid(self) -> Optional[int]: ...

    def poll(self) -> None:
        """Deliver pending callbacks on the calling thread (runners driven by Qt do nothing)."""


class Scheduler(Protocol):
    """Interface of a timer: call ``callback`` once after ``delay_s`` seconds, on the GUI thread."""

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> None: ...

    def run_due(self) -> None:
        """Run the callbacks that are due (timers driven by Qt do nothing)."""


class PollingScheduler(Scheduler):
    """A scheduler for plain Python: callbacks run when :meth:`run_due` is called."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._pending: List[tuple] = []

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> None:
        self._pending.append((self._clock() + delay_s, callback))

    def run_due(self) -> None:
        now = self._clock()
        due = [item for item in self._pending if item[0] <= now]
        self._pending = [item for item in self._pending if item[0] > now]
        for _, callback in sorted(due, key=lambda item: item[0]):
            callback()


class ThreadedPopenRunner(ProcessRunner):
    """A runner on ``subprocess.Popen``: a thread reads the output, :meth:`poll` delivers it.

    Works without Qt (CI, scripts, ``PythonSlicer``).  Inside the Slicer GUI the
    module uses ``slicer.util.launchConsoleProcess`` or ``qt.QProcess`` instead,
    whose callbacks arrive through the Qt event loop.
    """

    def __init__(self):
        self._process: Optional[subprocess.Popen] = None
        self._queue: "queue.Queue[tuple]" = queue.Queue()
        self._on_line: Optional[LineCallback] = None
        self._on_exit: Optional[ExitCallback] = None
        self._exit_delivered = False

    def start(self, argv, cwd, env, on_line, on_exit) -> None:
        self._on_line, self._on_exit = on_line, on_exit
        environment = dict(os.environ)
        environment.update(env or {})
        creation_flags = 0x08000000 if sys.platform == "win32" else 0  # CREATE_NO_WINDOW
        self._process = subprocess.Popen(
            list(argv), cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace", bufsize=1,
            creationflags=creation_flags)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        process = self._process
        for line in process.stdout:
            self._queue.put(("line", line.rstrip("\r\n")))
        process.wait()
        self._queue.put(("exit", process.returncode))

    def is_running(self) -> bool:
        return self._process is not None and not self._exit_delivered

    def pid(self) -> Optional[int]:
        return None if self._process is None else self._process.pid

    def poll(self) -> None:
        while True:
            try:
                kind, value = self._queue.get_nowait()
            except queue.Empty:
                return
            if kind == "line" and self._on_line:
                self._on_line(value)
            elif kind == "exit":
                self._exit_delivered = True
                if self._on_exit:
                    self._on_exit(value)


def _in_daemon_thread(work: Callable[[], None]) -> None:
    threading.Thread(target=work, daemon=True, name="ContrastiveSeg tree kill").start()


class JobStatus(enum.Enum):
    """How a job ended (or that it has not)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    STOPPED = "stopped"      # cooperative stop: checkpoint written, resumable
    KILLED = "killed"        # did not stop in time: process tree ended
    FAILED = "failed"        # an engine run exited with an error


@dataclass
class JobResult:
    """The outcome of a job, passed to ``on_finished``."""

    status: JobStatus
    exit_code: Optional[int] = None
    message: str = ""
    error_kind: Optional[str] = None
    run_dir: Optional[str] = None
    completed_phases: List[str] = field(default_factory=list)
    job: Optional[str] = None  # "training" or "prediction", set by the module's logic


class JobController:
    """Runs the engine runs of a job one after another and reports on them.

    Args:
        runner_factory: makes a new :class:`ProcessRunner` for each engine run.
        scheduler: timers for the cancel sequence.
        clock: monotonic seconds (injected so tests control time).
        kill_tree: ends a process tree given its root pid.
        background: runs a function off the GUI thread (default: a daemon thread), so ending a
            process tree, which waits up to seconds for the processes to exit, never freezes the GUI.
        stop_timeout_s: how long a cooperative stop may take before the tree is killed.
        poll_interval_s: how often the cancel sequence looks at the process.

    Callbacks (set as attributes): ``on_progress(state)`` after each event,
    ``on_log(line)`` for each output line that is not an event, ``on_finished(result)``.
    """

    def __init__(self, runner_factory: Callable[[], ProcessRunner], scheduler: Scheduler,
                 clock: Callable[[], float] = time.monotonic,
                 kill_tree: Callable[[int], object] = kill_process_tree,
                 stop_timeout_s: float = 30.0, poll_interval_s: float = 0.25,
                 background: Optional[Callable[[Callable[[], None]], None]] = None):
        self._runner_factory = runner_factory
        self._scheduler = scheduler
        self._clock = clock
        self._kill_tree = kill_tree
        self._background = background or _in_daemon_thread
        self.stop_timeout_s = stop_timeout_s
        self.poll_interval_s = poll_interval_s
        self.on_progress: Callable[[ProgressState], None] = lambda state: None
        self.on_log: Callable[[str], None] = lambda line: None
        self.on_finished: Callable[[JobResult], None] = lambda result: None
        self.state = ProgressState()
        self.result: Optional[JobResult] = None
        self._runs: List[EngineRun] = []
        self._index = -1
        self._runner: Optional[ProcessRunner] = None
        self._cwd: Optional[str] = None
        self._env: Optional[Dict[str, str]] = None
        self._stop_requested = False
        self._stop_deadline: Optional[float] = None
        self._killed = False
        self._output_tail: List[str] = []
        self.cancel_log: List[str] = []

    # -- starting ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether a job is going on (including while it is being stopped)."""
        return self.result is None and self._index >= 0

    @property
    def stopping(self) -> bool:
        """Whether a stop was asked for and the job has not ended yet."""
        return self.running and self._stop_requested

    def pid(self) -> Optional[int]:
        """The process id of the engine process running now (None if none)."""
        return None if self._runner is None else self._runner.pid()

    @property
    def current_run(self) -> Optional[EngineRun]:
        return self._runs[self._index] if 0 <= self._index < len(self._runs) else None

    def start(self, runs: Sequence[EngineRun], cwd: Optional[str] = None,
              env: Optional[Dict[str, str]] = None) -> None:
        """Start the job: its engine runs, in order (runs marked ``skip`` are not started)."""
        if self.running:
            raise RuntimeError("a job is already running; cancel it first")
        self._runs = list(runs)
        if not self._runs:
            raise ValueError("nothing to run")
        self._cwd, self._env = cwd, env
        self.state = ProgressState.for_phases([run.phase for run in self._runs], [run.run_dir for run in self._runs])
        self.result = None
        self._stop_requested = False
        self._stop_deadline = None
        self._killed = False
        self.cancel_log = []
        self._index = -1
        self._start_next()

    def _start_next(self) -> None:
        self._index += 1
        while self._index < len(self._runs) and self._runs[self._index].skip:
            self.state.begin_phase(self._index)
            self.state.end_phase()
            self.on_log(f"[ContrastiveSeg] {self._runs[self._index].phase}: already finished in "
                        f"{self._runs[self._index].run_dir}, skipped")
            self._index += 1
        if self._index >= len(self._runs):
            self._finish(JobResult(JobStatus.SUCCEEDED, 0, "Done.", run_dir=self._final_run_dir(),
                                   completed_phases=[run.phase for run in self._runs]))
            return
        run = self._runs[self._index]
        if run.run_dir:
            clear_stop(run.run_dir)  # a STOP left by a killed run would stop this one at once
        self.state.begin_phase(self._index)
        self._output_tail = []
        self.on_log(f"[ContrastiveSeg] running: {run.describe()}")
        self._runner = self._runner_factory()
        index = self._index
        self._runner.start(run.argv, self._cwd, self._env,
                           lambda line: self._on_line(index, line), lambda code: self._on_exit(index, code))
        self.on_progress(self.state)

    # -- following --------------------------------------------------------------------------
    def _on_line(self, index: int, line: str) -> None:
        if index != self._index:
            return
        text, event = split_event_line(line)
        text = text.strip()
        if text and not is_progress_bar(text):
            # the progress bar redraws itself many times a second: the events already carry progress
            self._output_tail = (self._output_tail + [text])[-20:]
            self.on_log(text)
        if event is None:
            return
        if self.state.apply(event):
            self.on_progress(self.state)
        if event.get("event") == "error":
            self.on_log(f"[engine error] {event.get('message', '')}")

    def _on_exit(self, index: int, exit_code: int) -> None:
        if index != self._index or self.result is not None:
            return
        run = self._runs[index]
        if run.run_dir and (self._stop_requested or self._killed):
            clear_stop(run.run_dir)
        if self._killed:
            self._finish(JobResult(JobStatus.KILLED, exit_code,
                                   f"Stopped by ending the process (it did not stop within {self.stop_timeout_s:g} s). "
                                   "The last checkpoint written before, if any, can be resumed.",
                                   run_dir=run.run_dir, completed_phases=self._completed()))
            return
        if self._stop_requested:
            self._finish(JobResult(JobStatus.STOPPED, exit_code,
                                   "Stopped. A checkpoint was saved: press 'Resume a run...' and choose this run to continue.",
                                   run_dir=run.run_dir, completed_phases=self._completed()))
            return
        if exit_code != 0:
            kind = self.state.error_kind or ("input" if exit_code == 2 else "internal")
            message = self.state.error_message or "\n".join(self._output_tail[-8:]) or f"exit code {exit_code}"
            self._finish(JobResult(JobStatus.FAILED, exit_code, message, error_kind=kind, run_dir=run.run_dir,
                                   completed_phases=self._completed()))
            return
        if self.state.stopped:
            # The user (or a script) created STOP by hand: the engine stopped cooperatively.
            self._finish(JobResult(JobStatus.STOPPED, 0, "Stopped by a STOP file; resumable.", run_dir=run.run_dir,
                                   completed_phases=self._completed()))
            return
        self.state.end_phase()
        self.on_progress(self.state)
        self._start_next()

    def _completed(self) -> List[str]:
        return [phase.name for phase in self.state.phases if phase.finished]

    def _final_run_dir(self) -> Optional[str]:
        run_dirs = [run.run_dir for run in self._runs if run.run_dir]
        return run_dirs[-1] if run_dirs else None

    def _finish(self, result: JobResult) -> None:
        self.result = result
        self._runner = None
        self.on_progress(self.state)
        self.on_finished(result)

    # -- stopping ---------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the job to stop: STOP file first, process tree ended after ``stop_timeout_s``.

        Returns at once; the job ends (``on_finished``) when the process exits.
        Calling it again while stopping ends the process tree at once.
        """
        if not self.running:
            return
        if self._stop_requested:
            self._kill_now("second cancel")
            return
        self._stop_requested = True
        run = self.current_run
        if run is not None and run.run_dir:
            path = request_stop(run.run_dir)
            self.cancel_log.append(f"wrote {path}")
            self.on_log(f"[ContrastiveSeg] stop requested: waiting up to {self.stop_timeout_s:g} s "
                        "for the checkpoint to be saved")
            self._stop_deadline = self._clock() + self.stop_timeout_s
            self._scheduler.call_later(self.poll_interval_s, self._check_stop)
        else:
            # predict / evaluate have no checkpoint to wait for
            self._kill_now("no run folder to stop cooperatively")

    def _check_stop(self) -> None:
        if not self.running:
            return
        if self._runner is not None and not self._runner.is_running():
            return  # exited; _on_exit finishes the job
        if self._stop_deadline is not None and self._clock() >= self._stop_deadline:
            self._kill_now("timeout")
            return
        self._scheduler.call_later(self.poll_interval_s, self._check_stop)

    def _kill_now(self, reason: str) -> None:
        if self._killed or self._runner is None:
            return
        pid = self._runner.pid()
        self._killed = True
        self._stop_requested = True
        self.cancel_log.append(f"kill tree {pid} ({reason})")
        self.on_log(f"[ContrastiveSeg] ending process tree {pid} ({reason})")
        if pid is not None:
            self._background(lambda: self._end_tree(pid))

    def _end_tree(self, pid: int) -> None:
        try:
            self._kill_tree(pid)
        except Exception as error:  # report and go on: the GUI must never hang on a failed kill
            logging.error("could not end process tree %s: %s", pid, error)

    def poll(self) -> None:
        """Deliver pending output and due timers (plain Python; inside Slicer the Qt event loop does it)."""
        if self._runner is not None:
            self._runner.poll()
        self._scheduler.run_due()

    def wait(self, timeout_s: Optional[float] = None, pump: Optional[Callable[[], None]] = None,
             sleep_s: float = 0.05) -> Optional[JobResult]:
        """Block until the job ends (headless use); returns its result, or None on timeout.

        ``pump`` keeps events flowing while waiting: by default it polls the
        runner and the scheduler; inside Slicer pass ``slicer.app.processEvents``.
        """
        deadline = None if timeout_s is None else self._clock() + timeout_s
        while self.running:
            if pump is not None:
                pump()
            else:
                self.poll()
            if not self.running:
                break
            if deadline is not None and self._clock() >= deadline:
                return None
            time.sleep(sleep_s)
        return self.result

    def stop_and_wait(self, timeout_s: float = 30.0, pump: Optional[Callable[[], None]] = None) -> Optional[JobResult]:
        """Cancel and block until the job has ended (scene close, module close, application exit)."""
        if not self.running:
            return self.result
        self.stop_timeout_s = min(self.stop_timeout_s, timeout_s)
        self.cancel()
        result = self.wait(timeout_s + 5.0, pump)
        if result is None and self.running:
            self._kill_now("did not end while closing")
            result = self.wait(5.0, pump)
        return result
