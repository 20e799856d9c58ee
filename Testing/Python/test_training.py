"""Fine-tuning end to end on real CT pieces: events, checkpoints, exact resume, --init, DDP."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import TINY_ARGS, run_cli, run_torchrun, tiny_config

from ContrastiveSegLib.engine.checkpoint import load_checkpoint
from ContrastiveSegLib.engine.events import read_events
from ContrastiveSegLib.errors import InputError
from ContrastiveSegLib.finetune import run_finetune


def test_finetune_cli_writes_a_complete_run_folder(tmp_path, tiny_dataset):
    run = tmp_path / "run"
    result = run_cli(["finetune", "--data", tiny_dataset, "--labels", "liver,spleen", "--out", run, "--max-steps", "4",
                      "--val-every", "2", "--events-stdout"] + TINY_ARGS)
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "labels.json", "colors.json", "events.jsonl", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).exists(), name
    assert json.loads((run / "labels.json").read_text()) == {"0": "background", "1": "liver", "2": "spleen"}
    events = read_events(str(run / "events.jsonl"))
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 1 and kinds[-1] == "finished"
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    for key in ("total", "loss", "lr", "steps_per_s", "eta_s"):
        assert key in steps[0]
    validations = [e for e in events if e["event"] == "validation"]
    assert validations and set(validations[0]["dice"]) == {"liver", "spleen"}
    # --events-stdout prints exactly the file's lines on stdout.
    stdout_events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert [e["event"] for e in stdout_events] == kinds
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["labels"] == ["liver", "spleen"] and config["versions"]["torch"]


def _weights(path):
    return load_checkpoint(path)["model"]


def test_stop_file_then_resume_continues_exactly(tmp_path, tiny_dataset):
    straight = tmp_path / "straight"
    run_finetune(tiny_config([tiny_dataset], ["liver", "spleen"], max_steps=6), str(straight), progress=False)

    stopped = tmp_path / "stopped"

    def stop_at_three(event):
        if event["event"] == "step" and event["step"] == 3:
            (stopped / "STOP").write_text("")

    summary = run_finetune(tiny_config([tiny_dataset], ["liver", "spleen"], max_steps=6), str(stopped),
                           listeners=[stop_at_three], progress=False)
    assert summary["stopped"] and summary["step"] == 3
    assert not (stopped / "STOP").exists()
    finished = [e for e in read_events(str(stopped / "events.jsonl")) if e["event"] == "finished"]
    assert finished[-1]["stopped"] is True
    assert load_checkpoint(str(stopped / "checkpoints" / "last.pt"))["step"] == 3

    summary = run_finetune(tiny_config([tiny_dataset], ["liver", "spleen"], max_steps=6), str(stopped), resume=True,
                           progress=False)
    assert summary["step"] == 6 and not summary["stopped"]
    a, b = _weights(str(straight / "checkpoints" / "last.pt")), _weights(str(stopped / "checkpoints" / "last.pt"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    resumed_state = load_checkpoint(str(stopped / "checkpoints" / "last.pt"))
    straight_state = load_checkpoint(str(straight / "checkpoints" / "last.pt"))
    assert set(resumed_state) == set(straight_state)  # the same checkpoint format
    starts = [e for e in read_events(str(stopped / "events.jsonl")) if e["event"] == "start"]
    assert [s["start_step"] for s in starts] == [0, 3]


def _stop_at(folder, step):
    def listener(event):
        if event["event"] == "step" and event["step"] == step:
            (folder / "STOP").write_text("")
    return listener


def test_weight_averaging_keeps_the_mean_of_the_weights_after_each_step_and_resumes_exactly(tmp_path, tiny_dataset):
    labels = ["liver", "spleen"]
    # The weights after steps 3, 4, 5 and 6 of a run without averaging: stopped after each, then resumed.
    plain = tmp_path / "plain"
    snapshots = []
    for stop in (3, 4, 5, None):
        listeners = [_stop_at(plain, stop)] if stop else []
        run_finetune(tiny_config([tiny_dataset], labels, max_steps=6), str(plain), resume=bool(snapshots),
                     listeners=listeners, progress=False)
        snapshots.append(_weights(str(plain / "checkpoints" / "last.pt")))
    assert "averaged_steps" not in load_checkpoint(str(plain / "checkpoints" / "last.pt"))

    # Averaging from 0.5 x 6 steps: the steps 3 to 6, the mean of the four snapshots.
    averaged = tmp_path / "averaged"
    run_finetune(tiny_config([tiny_dataset], labels, max_steps=6, average_weights_from=0.5), str(averaged),
                 progress=False)
    state = load_checkpoint(str(averaged / "checkpoints" / "last.pt"))
    assert state["averaged_steps"] == 4
    for key in snapshots[-1]:
        # The optimiser trains the same weights as without averaging ...
        torch.testing.assert_close(state["trained_model"][key], snapshots[-1][key], rtol=1e-5, atol=1e-6, msg=key)
        # ... and the network saved is their mean over the averaged steps.
        mean = sum(snapshot[key].double() for snapshot in snapshots) / 4
        torch.testing.assert_close(state["model"][key].double(), mean, rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(state["model"][key], snapshots[-1][key]) for key in state["model"])

    # Stopped after step 4 (two steps averaged), then resumed: the same mean and the same trained weights.
    stopped = tmp_path / "stopped"
    run_finetune(tiny_config([tiny_dataset], labels, max_steps=6, average_weights_from=0.5), str(stopped),
                 listeners=[_stop_at(stopped, 4)], progress=False)
    assert load_checkpoint(str(stopped / "checkpoints" / "last.pt"))["averaged_steps"] == 2
    run_finetune(tiny_config([tiny_dataset], labels, max_steps=6, average_weights_from=0.5), str(stopped),
                 resume=True, progress=False)
    resumed = load_checkpoint(str(stopped / "checkpoints" / "last.pt"))
    assert resumed["averaged_steps"] == 4
    for part in ("model", "trained_model"):
        for key in state[part]:
            torch.testing.assert_close(resumed[part][key], state[part][key], rtol=1e-5, atol=1e-6, msg=key)


def test_weight_averaging_cli_option_is_a_fraction_of_the_steps():
    from ContrastiveSegLib.cli import _training_config, build_parser

    parser = build_parser()
    base = ["finetune", "--data", "x", "--labels", "liver", "--out", "y"]
    assert _training_config(parser.parse_args(base), "finetune").train.average_weights_from == 0.0
    config = _training_config(parser.parse_args(base + ["--average-weights-from", "0.5"]), "finetune")
    assert config.train.average_weights_from == 0.5
    for bad in ("1", "-0.1"):
        with pytest.raises(InputError, match="fraction") as raised:
            _training_config(parser.parse_args(base + ["--average-weights-from", bad]), "finetune")
        assert raised.value.path == "--average-weights-from"


def test_resume_without_a_checkpoint_is_an_error(tmp_path, tiny_dataset):
    result = run_cli(["finetune", "--data", tiny_dataset, "--labels", "liver", "--out", tmp_path / "new", "--resume"]
                     + TINY_ARGS)
    assert result.returncode == 2
    assert "config.json: does not exist" in result.stderr


def test_init_loads_encoder_and_reports_it(tmp_path, tiny_dataset):
    source = tmp_path / "source"
    run_finetune(tiny_config([tiny_dataset], ["liver"], max_steps=2), str(source), progress=False)
    target = tmp_path / "target"
    config = tiny_config([tiny_dataset], ["liver", "spleen"], max_steps=1)
    config.init_checkpoint = str(source / "checkpoints" / "last.pt")
    run_finetune(config, str(target), progress=False)
    report = json.loads((target / "init_report.json").read_text())
    assert report["loaded"] and all(key.startswith("net.conv_0.") or key.startswith("net.down_") for key in report["loaded"])
    assert any("not part of the encoder" in key for key in report["not_loaded"])
    messages = [e["text"] for e in read_events(str(target / "events.jsonl")) if e["event"] == "message"]
    assert any("loaded" in m and "encoder tensors" in m for m in messages)


def test_checkpoint_of_another_architecture_is_refused(tmp_path, tiny_dataset):
    source = tmp_path / "source"
    run_finetune(tiny_config([tiny_dataset], ["liver"], max_steps=1), str(source), progress=False)
    args = ["finetune", "--data", tiny_dataset, "--labels", "liver", "--out", tmp_path / "unetr", "--model", "unetr",
            "--model-size", "tiny", "--patch", "32,32,16", "--spacing", "6,6,6", "--max-steps", "1",
            "--num-workers", "0", "--init", source / "checkpoints" / "last.pt"]
    result = run_cli(args)
    assert result.returncode == 2
    assert "holds a 'unet' network, but this run builds 'unetr'" in result.stderr
    assert "--model unet" in result.stderr


def test_foreign_pickle_is_not_loaded(tmp_path):
    path = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    torch.save({"format": "contrastiveseg", "x": Payload()}, str(path))
    with pytest.raises(InputError, match="cannot be read as a checkpoint"):
        load_checkpoint(str(path))


def test_unwritable_output_folder_is_an_error_and_nothing_is_written(tmp_path, tiny_dataset):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_cli(["finetune", "--data", tiny_dataset, "--labels", "liver", "--out", blocker / "run"] + TINY_ARGS)
    assert result.returncode == 2
    assert "cannot be used as the run folder" in result.stderr and "choose a folder you can write to" in result.stderr


def test_bad_input_leaves_no_run_folder(tmp_path, tiny_dataset):
    run = tmp_path / "run"
    result = run_cli(["finetune", "--data", tiny_dataset, "--labels", "livr", "--out", run] + TINY_ARGS)
    assert result.returncode == 2 and "unknown label name(s): livr" in result.stderr
    assert not run.exists()


@pytest.mark.slow
def test_torchrun_two_cpu_processes_only_rank_zero_writes(tmp_path, tiny_dataset):
    run = tmp_path / "ddp"
    result = run_torchrun(["finetune", "--data", tiny_dataset, "--labels", "liver", "--out", run,
                           "--max-steps", "3", "--val-every", "3", "--device", "cpu"] + TINY_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(str(run / "events.jsonl"))
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2  # one writer, though two processes trained
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    assert sorted(os.listdir(run / "checkpoints")) == ["best.pt", "last.pt"]
    assert load_checkpoint(str(run / "checkpoints" / "last.pt"))["step"] == 3
    shutil.rmtree(run)


# Each rank trains one DDP step inside the engine's distributed context, then lists its native threads.
_TEARDOWN_SCRIPT = """
import os
import torch
from ContrastiveSegLib.engine.device import distributed

def train_one_step():
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))
    model(torch.ones(2, 3)).sum().backward()

with distributed("cpu") as context:
    assert context.world_size == 2
    train_one_step()
task_folder = f"/proc/{os.getpid()}/task"
names = sorted(open(os.path.join(task_folder, task, "comm")).read().strip() for task in os.listdir(task_folder))
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"threads_{context.rank}.txt"), "w") as handle:
    handle.write(" ".join(names))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through /proc (Linux)")
def test_torchrun_teardown_joins_the_process_group_threads(tmp_path):
    """After the distributed context ends, no gloo thread may be left running into interpreter exit.

    A group left alive (DDP imports torch._dynamo after init_process_group) keeps three gloo threads
    that can abort a finished rank at exit ("terminate called without an active exception").
    """
    script = tmp_path / "teardown.py"
    script.write_text(_TEARDOWN_SCRIPT, encoding="utf-8")
    result = run_torchrun([], script=script, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        threads = (tmp_path / f"threads_{rank}.txt").read_text(encoding="utf-8").split()
        assert "python" in threads and not [name for name in threads if "gloo" in name], (rank, threads)
