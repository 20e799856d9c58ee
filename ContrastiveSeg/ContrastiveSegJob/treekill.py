"""Ending a whole process tree: the engine process and every process it started.

Inside Slicer, ``PythonSlicer`` is a launcher that starts ``python-real``, and
data loaders may start workers, so killing the launcher's pid alone would leave
the training running.  psutil is used when it can be imported (Slicer does not
ship it: only when the user or another extension installed it); otherwise the
children are found from the operating system (``/proc`` or ``ps`` on Linux and
macOS, ``taskkill /T`` on Windows, without opening a console window).

Order: children first (deepest first) get a polite terminate, then the parent;
whatever is still alive after ``timeout_s`` is killed.

Run as a script (``python treekill.py --after SECONDS PID``) it is the watchdog
the module leaves behind when Slicer quits during a training: the trainer has
been asked to stop (STOP file) and gets ``SECONDS`` to save its checkpoint and
exit; if it has not, its process tree is ended.  Slicer itself quits at once.
"""

import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

# Windows: run taskkill, tasklist and the watchdog without flashing a console window.
NO_WINDOW = 0x08000000 if sys.platform == "win32" else 0  # CREATE_NO_WINDOW


def kill_process_tree(pid: int, timeout_s: float = 3.0) -> List[int]:
    """Terminate ``pid`` and all its descendants; returns the pids that were signalled."""
    try:
        import psutil  # noqa: F401  (optional: not part of Slicer)
    except ImportError:
        return _kill_tree_without_psutil(pid, timeout_s)
    return _kill_tree_with_psutil(pid, timeout_s)


def descendant_pids(pid: int) -> List[int]:
    """The pids of all processes below ``pid``, deepest first."""
    try:
        import psutil
    except ImportError:
        return _descendants_from_table(pid)
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [child.pid for child in reversed(children)]


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    if sys.platform == "win32":
        try:
            output = subprocess.run(["tasklist", "/FI", f"PID eq {pid}", "/NH"], capture_output=True,
                                    text=True, timeout=10, creationflags=NO_WINDOW).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return str(pid) in output
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state_file = f"/proc/{pid}/stat"
    if os.path.exists(state_file):
        try:
            with open(state_file) as file:
                return file.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    return True


def _kill_tree_with_psutil(pid: int, timeout_s: float) -> List[int]:
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    try:
        children = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    signalled = []
    for child in reversed(children):
        try:
            child.terminate()
            signalled.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        parent.terminate()
        signalled.append(parent.pid)
        parent.wait(timeout=timeout_s)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        try:
            parent.kill()
        except psutil.NoSuchProcess:
            pass
    return signalled


def _kill_tree_without_psutil(pid: int, timeout_s: float) -> List[int]:
    if sys.platform == "win32":
        subprocess.run(["taskkill", "/PID", str(pid), "/T", "/F"], capture_output=True, timeout=30,
                       creationflags=NO_WINDOW)
        return [pid]
    children = _descendants_from_table(pid)
    signalled = []
    for child in children + [pid]:
        try:
            os.kill(child, signal.SIGTERM)
            signalled.append(child)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in signalled):
        time.sleep(0.05)
    for survivor in [p for p in signalled if pid_alive(p)]:
        try:
            os.kill(survivor, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return signalled


def _descendants_from_table(pid: int) -> List[int]:
    """Descendants of ``pid`` (deepest first) from the process table, without psutil."""
    children_of: Dict[int, List[int]] = {}
    for child, parent in _process_table():
        children_of.setdefault(parent, []).append(child)
    ordered: List[int] = []
    stack = [(pid, 0)]
    depth_of: Dict[int, int] = {}
    while stack:
        current, depth = stack.pop()
        for child in children_of.get(current, []):
            if child not in depth_of:
                depth_of[child] = depth + 1
                ordered.append(child)
                stack.append((child, depth + 1))
    return sorted(ordered, key=lambda p: -depth_of[p])


def _process_table() -> List[tuple]:
    """``(pid, parent pid)`` of every process, from /proc (Linux) or ``ps`` (macOS, other Unix)."""
    table = []
    if os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as file:
                    fields = file.read().rsplit(")", 1)[1].split()
                table.append((int(entry), int(fields[1])))
            except (OSError, IndexError, ValueError):
                continue
        if table:
            return table
    try:
        output = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True,
                                timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            table.append((int(parts[0]), int(parts[1])))
    return table


def wait_then_kill(pid: int, grace_s: float, poll_s: float = 0.2) -> bool:
    """Wait up to ``grace_s`` for ``pid`` to exit by itself, then end its tree; True if it had to be ended."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return False
        time.sleep(poll_s)
    if not pid_alive(pid):
        return False
    kill_process_tree(pid)
    return True


def start_watchdog(pid: int, grace_s: float, python_executable: Optional[str] = None) -> int:
    """Start this file as a detached watchdog process for ``pid``; returns the watchdog's pid.

    Used when Slicer quits: the watchdog outlives Slicer, so Slicer need not wait for the trainer.
    """
    argv = [python_executable or sys.executable, os.path.abspath(__file__), "--after", str(grace_s), str(pid)]
    options = {"creationflags": NO_WINDOW | 0x00000008} if sys.platform == "win32" else {"start_new_session": True}
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               close_fds=True, **options)  # 0x8: DETACHED_PROCESS
    return process.pid


def main(argv: Optional[Sequence[str]] = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if len(arguments) != 3 or arguments[0] != "--after":
        print("usage: treekill.py --after SECONDS PID", file=sys.stderr)
        return 2
    wait_then_kill(int(arguments[2]), float(arguments[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
