"""The job controller: running engine runs in order, following them, and the cancel sequence.

A fake process runner and a fake clock play the cancel sequence step by step;
then real processes (a small stand-in engine that honours the STOP file, and one
that ignores it and starts a child) check the same sequence end to end with the
real tree kill.
"""

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ContrastiveSeg"))

from ContrastiveSegJob.commands import EngineRun  # noqa: E402
from ContrastiveSegJob.process import (  # noqa: E402
    JobController,
    JobStatus,
    PollingScheduler,
    ProcessRunner,
    Scheduler,
    ThreadedPopenRunner,
)
from ContrastiveSegJob.treekill import descendant_pids, kill_process_tree, pid_alive  # noqa: E402


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeScheduler(Scheduler):
    """Timers that fire when the test advances the fake clock."""

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.pending = []

    def call_later(self, delay_s, callback):
        self.pending.append((self.clock.now + delay_s, callback))

    def advance(self, seconds: float, step: float = 0.05):
        end = self.clock.now + seconds
        while self.clock.now < end - 1e-9:
            self.clock.now = min(end, self.clock.now + step)
            due = [item for item in self.pending if item[0] <= self.clock.now + 1e-9]
            self.pending = [item for item in self.pending if item[0] > self.clock.now + 1e-9]
            for _, callback in due:
                callback()


class FakeRunner(ProcessRunner):
    """Stands in for the subprocess: the test decides what it prints and when it exits."""

    instances = []

    def __init__(self):
        self.argv = self.cwd = self.env = None
        self.running = False
        self.number = len(FakeRunner.instances)
        FakeRunner.instances.append(self)

    def start(self, argv, cwd, env, on_line, on_exit):
        self.argv, self.cwd, self.env = list(argv), cwd, env
        self.on_line, self.on_exit = on_line, on_exit
        self.running = True

    def is_running(self):
        return self.running

    def pid(self):
        return 4000 + self.number

    def emit(self, **event):
        self.on_line(json.dumps(event))

    def exit(self, code):
        self.running = False
        self.on_exit(code)


@pytest.fixture
def harness():
    FakeRunner.instances = []
    clock = FakeClock()
    scheduler = FakeScheduler(clock)
    killed = []
    controller = JobController(FakeRunner, scheduler, clock=clock, kill_tree=killed.append,
                               stop_timeout_s=10.0, poll_interval_s=0.25, background=lambda work: work())
    record = {"logs": [], "progress": 0, "finished": []}
    controller.on_log = record["logs"].append
    controller.on_progress = lambda state: record.__setitem__("progress", record["progress"] + 1)
    controller.on_finished = record["finished"].append
    return controller, scheduler, killed, record


def run(tmp_path, phase="finetune", name="finetune"):
    return EngineRun(phase, ["PythonSlicer", "-m", "ContrastiveSegLib", phase, "--out", str(tmp_path / name)],
                     str(tmp_path / name))


def test_lines_become_events_or_log(harness, tmp_path):
    controller, _, _, record = harness
    controller.start([run(tmp_path)], cwd="/engine", env={"PYTHONUNBUFFERED": "1"})
    runner = FakeRunner.instances[0]
    assert runner.argv[-2:] == ["--out", str(tmp_path / "finetune")]
    assert runner.cwd == "/engine" and runner.env == {"PYTHONUNBUFFERED": "1"}
    assert controller.running and controller.pid() == 4000
    runner.emit(event="start", total_steps=10, labels=["liver"], device="cpu")
    runner.on_line("Downloading nothing, just a log line")
    runner.emit(event="step", step=5, total=10, loss=0.5, eta_s=3)
    assert controller.state.percent() == 50
    runner.on_line('finetune:  60%|######    | 6/10 [00:03<00:02]{"event": "step", "step": 6, "total": 10, "loss": 0.4}')
    assert controller.state.percent() == 60 and controller.state.loss == 0.4
    assert not any("60%|" in line for line in record["logs"])
    assert "Downloading nothing, just a log line" in record["logs"]
    runner.emit(event="finished", step=10, stopped=False)
    runner.exit(0)
    assert not controller.running
    result = record["finished"][0]
    assert result.status == JobStatus.SUCCEEDED and result.run_dir == str(tmp_path / "finetune")
    assert result.completed_phases == ["finetune"]


def test_runs_follow_each_other_and_finished_ones_are_skipped(harness, tmp_path):
    controller, _, _, record = harness
    skipped = run(tmp_path, "pretrain", "pretrain_mixcl")
    skipped.skip = True
    controller.start([skipped, run(tmp_path)])
    assert len(FakeRunner.instances) == 1 and FakeRunner.instances[0].argv[3] == "finetune"
    assert any("skipped" in line for line in record["logs"])
    FakeRunner.instances[0].exit(0)
    assert record["finished"][0].status == JobStatus.SUCCEEDED

    controller.start([run(tmp_path, "pretrain", "pretrain_gcl"), run(tmp_path)])
    first = FakeRunner.instances[1]
    first.emit(event="start", total_steps=4)
    first.exit(0)
    second = FakeRunner.instances[2]
    assert second.argv[3] == "finetune" and controller.running
    assert controller.state.phases[0].finished and controller.state.current_phase == 1
    second.exit(0)
    assert record["finished"][1].completed_phases == ["pretrain", "finetune"]


def test_bad_input_and_crashes_are_reported(harness, tmp_path):
    controller, _, _, record = harness
    controller.start([run(tmp_path, "pretrain", "p"), run(tmp_path)])
    FakeRunner.instances[0].emit(event="error", message="data/a: no dataset.json found", kind="input")
    FakeRunner.instances[0].exit(2)
    result = record["finished"][0]
    assert result.status == JobStatus.FAILED and result.error_kind == "input"
    assert result.message == "data/a: no dataset.json found"
    assert len(FakeRunner.instances) == 1  # fine-tuning does not start after a failed pre-training

    controller.start([run(tmp_path)])
    FakeRunner.instances[1].on_line("Traceback (most recent call last):")
    FakeRunner.instances[1].on_line("RuntimeError: CUDA out of memory")
    FakeRunner.instances[1].exit(1)
    result = record["finished"][1]
    assert result.error_kind == "internal" and "CUDA out of memory" in result.message


def test_cooperative_cancel(harness, tmp_path):
    controller, scheduler, killed, record = harness
    controller.start([run(tmp_path)])
    runner = FakeRunner.instances[0]
    runner.emit(event="start", total_steps=1000)
    runner.emit(event="step", step=3, total=1000, loss=1.0)
    controller.cancel()
    stop = tmp_path / "finetune" / "STOP"
    assert stop.is_file(), "cancel must first write RUN/STOP"
    assert controller.stopping and killed == []
    scheduler.advance(2.0)  # the trainer finishes its step and saves the checkpoint
    assert killed == []
    runner.emit(event="checkpoint", step=4, path="checkpoints/last.pt", kind="last")
    runner.emit(event="finished", step=4, stopped=True)
    stop.unlink()  # the engine deletes STOP itself
    runner.exit(0)
    result = record["finished"][0]
    assert result.status == JobStatus.STOPPED and killed == []
    scheduler.advance(20.0)  # the stop timer finds the job ended: nothing is killed later
    assert killed == [] and not controller.running


def test_cancel_kills_the_tree_when_the_trainer_does_not_stop(harness, tmp_path):
    controller, scheduler, killed, record = harness
    controller.start([run(tmp_path)])
    runner = FakeRunner.instances[0]
    controller.cancel()
    scheduler.advance(9.5)
    assert killed == [], "must wait stop_timeout_s for the checkpoint before killing"
    scheduler.advance(1.0)
    assert killed == [4000], "then the whole tree of the engine process is ended"
    assert controller.cancel_log[0].startswith("wrote ") and controller.cancel_log[1].startswith("kill tree 4000")
    runner.exit(-15)
    result = record["finished"][0]
    assert result.status == JobStatus.KILLED
    assert not (tmp_path / "finetune" / "STOP").exists(), "a leftover STOP would stop the next --resume at once"


def test_second_cancel_kills_at_once_and_predict_is_killed_directly(harness, tmp_path):
    controller, scheduler, killed, record = harness
    controller.start([run(tmp_path)])
    controller.cancel()
    controller.cancel()
    assert killed == [4000]
    FakeRunner.instances[0].exit(-9)
    assert record["finished"][0].status == JobStatus.KILLED

    controller.start([EngineRun("predict", ["PythonSlicer", "-m", "ContrastiveSegLib", "predict"])])
    controller.cancel()
    assert killed == [4000, 4001]  # no run folder, no checkpoint to wait for
    FakeRunner.instances[1].exit(-9)
    controller.cancel()  # not running any more: nothing happens
    assert killed == [4000, 4001]


def test_stale_stop_file_is_removed_before_a_run(harness, tmp_path):
    controller, _, _, _ = harness
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "STOP").write_text("left by a killed run")
    controller.start([run(tmp_path)])
    assert not (tmp_path / "finetune" / "STOP").exists()
    with pytest.raises(RuntimeError, match="already running"):
        controller.start([run(tmp_path)])


def test_stop_and_wait_for_scene_close(harness, tmp_path):
    controller, scheduler, killed, record = harness
    controller.start([run(tmp_path)])
    runner = FakeRunner.instances[0]

    def pump():  # what slicer.app.processEvents does in Slicer: time passes, timers fire
        scheduler.advance(0.5)
        if killed and runner.running:
            runner.exit(-15)

    result = controller.stop_and_wait(timeout_s=3.0, pump=pump)
    assert result.status == JobStatus.KILLED and killed == [4000]


# ---------------------------------------------------------------------------------------------
# Real processes
# ---------------------------------------------------------------------------------------------

FAKE_ENGINE = textwrap.dedent('''
    """Stands in for "python -m ContrastiveSegLib finetune": events on stdout, honours RUN/STOP."""
    import json, os, sys, time
    run_dir, steps, honour_stop = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "yes"
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    def emit(**event):
        event["time"] = time.time()
        print(json.dumps(event), flush=True)
    emit(event="start", total_steps=steps, start_step=0, device="cpu", labels=["liver"])
    print("a log line on stderr", file=sys.stderr, flush=True)
    if len(sys.argv) > 4:  # start a child that must die with us
        import subprocess
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        emit(event="message", level="info", text="child %d" % child.pid)
    for step in range(1, steps + 1):
        time.sleep(0.02)
        # like tqdm on stderr: redraw with a carriage return and no newline, so the event is glued to it
        sys.stderr.write("\\rfinetune: %3d%%|##        | %d/%d [00:00<00:00]" % (100 * step // steps, step, steps))
        sys.stderr.flush()
        emit(event="step", step=step, total=steps, loss=1.0 / step, eta_s=(steps - step) * 0.02)
        if honour_stop and os.path.exists(os.path.join(run_dir, "STOP")):
            open(os.path.join(run_dir, "checkpoints", "last.pt"), "wb").close()
            emit(event="checkpoint", step=step, path="checkpoints/last.pt", kind="last")
            emit(event="finished", step=step, stopped=True, best_mean_dice=None, seconds=0.1)
            os.remove(os.path.join(run_dir, "STOP"))
            sys.exit(0)
    emit(event="finished", step=steps, stopped=False, best_mean_dice=0.5, seconds=0.1)
''')


def real_controller(stop_timeout_s=5.0):
    return JobController(ThreadedPopenRunner, PollingScheduler(), stop_timeout_s=stop_timeout_s, poll_interval_s=0.05)


def fake_engine_run(tmp_path, steps, honour_stop, with_child=False):
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    run_dir = tmp_path / "run"
    argv = [sys.executable, str(script), str(run_dir), str(steps), "yes" if honour_stop else "no"]
    if with_child:
        argv.append("child")
    return EngineRun("finetune", argv, str(run_dir))


def test_real_process_runs_to_the_end(tmp_path):
    controller = real_controller()
    logs = []
    controller.on_log = logs.append
    controller.start([fake_engine_run(tmp_path, steps=5, honour_stop=True)], env={"PYTHONUNBUFFERED": "1"})
    result = controller.wait(timeout_s=30)
    assert result is not None and result.status == JobStatus.SUCCEEDED
    assert controller.state.phase.step == 5 and controller.state.finished
    assert controller.state.loss == pytest.approx(1.0 / 5)  # step events after a progress bar are not lost
    assert "a log line on stderr" in logs  # stderr is merged into the log
    assert not any("%|" in line for line in logs)  # progress-bar redraws are kept out of the log


def test_real_cooperative_cancel(tmp_path):
    controller = real_controller()
    controller.start([fake_engine_run(tmp_path, steps=100000, honour_stop=True)])
    deadline = time.monotonic() + 30
    while controller.state.phase.step < 3 and time.monotonic() < deadline:
        controller.wait(timeout_s=0.05)
    pid = controller.pid()
    controller.cancel()
    result = controller.wait(timeout_s=30)
    assert result.status == JobStatus.STOPPED
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "run" / "STOP").exists()
    assert controller.state.stopped and not pid_alive(pid)


def test_real_cancel_kills_a_process_tree_that_ignores_stop(tmp_path):
    controller = real_controller(stop_timeout_s=1.0)
    controller.start([fake_engine_run(tmp_path, steps=100000, honour_stop=False, with_child=True)])
    deadline = time.monotonic() + 30
    while not descendant_pids(controller.pid()) and time.monotonic() < deadline:
        controller.wait(timeout_s=0.05)
    parent = controller.pid()
    children = descendant_pids(parent)
    assert children, "the stand-in engine should have started a child"
    started = time.monotonic()
    controller.cancel()
    result = controller.wait(timeout_s=30)
    assert result.status == JobStatus.KILLED
    assert time.monotonic() - started >= 0.9, "the tree is killed only after the stop timeout"
    assert not pid_alive(parent)
    deadline = time.monotonic() + 5
    while any(pid_alive(child) for child in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(child) for child in children), "children of the engine must not survive a cancel"
    assert not (tmp_path / "run" / "STOP").exists()


def test_kill_process_tree_on_a_finished_process_is_harmless(tmp_path):
    import subprocess

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    kill_process_tree(process.pid, timeout_s=0.5)  # must not raise
    assert not pid_alive(process.pid) or os.name == "nt"
