"""``contrastiveseg study`` end to end on a tiny study: paired subsets, no leak, resume, plot and report.

The cases are pieces of the shipped sample CT (patient A) cut into regions:
fine for checking the design and the files, meaningless as a measurement.
Two counts x two seeds x two arms, four steps a cell, a tiny U-Net.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import SimpleITK as sitk
import torch
from conftest import TINY_ARGS, run_cli, write_dataset

LABELS = "liver,spleen"


def _pieces(sample_dir: str) -> dict:
    image = sitk.ReadImage(os.path.join(sample_dir, "abdomen_ct.nii.gz"), sitk.sitkFloat32)
    label = sitk.ReadImage(os.path.join(sample_dir, "abdomen_ct_labels.nii.gz"))
    boxes = {"a": (0, 70, 0, 30), "b": (30, 100, 0, 30), "c": (50, 122, 0, 30), "d": (0, 122, 0, 16),
             "t1": (0, 122, 14, 30), "t2": (20, 110, 5, 25)}
    return {name: (image[x0:x1, :, z0:z1], label[x0:x1, :, z0:z1]) for name, (x0, x1, z0, z1) in boxes.items()}


@pytest.fixture(scope="module")
def study_data(tmp_path_factory, sample_dir, sample_label_map):
    """A four-case labelled pool, a two-case test set, and a 'pre-trained' checkpoint (a random tiny U-Net)."""
    root = tmp_path_factory.mktemp("study_data")
    pieces = _pieces(sample_dir)
    pool = write_dataset(str(root / "pool"), {k: pieces[k] for k in ("a", "b", "c", "d")}, sample_label_map)
    test = write_dataset(str(root / "test"), {k: pieces[k] for k in ("t1", "t2")}, sample_label_map)
    from ContrastiveSegLib.config import ModelConfig
    from ContrastiveSegLib.engine.checkpoint import save_checkpoint
    from ContrastiveSegLib.models import build_backbone

    model = ModelConfig(architecture="unet", size="tiny", out_channels=5, patch_size=(32, 32, 16))
    torch.manual_seed(123)
    checkpoint = str(root / "pretrained.pt")
    save_checkpoint(checkpoint, {"kind": "pretrain", "model_config": dataclasses.asdict(model),
                                 "labels": {}, "model": build_backbone(model).state_dict()})
    return {"pool": pool, "test": test, "checkpoint": checkpoint}


def _study_args(data: dict, out: str) -> list:
    return ["study", "--data", data["pool"], "--test-data", data["test"], "--labels", LABELS, "--counts", "1,2",
            "--seeds", "0,1", "--arm", "scratch", "--arm", f"warm={data['checkpoint']}", "--budget", "steps=4",
            "--out", out, "--device", "cpu"] + TINY_ARGS


def _build_plan(args):
    """The StudyPlan ``contrastiveseg study ARGS`` runs, parsed exactly as the command line does."""
    from ContrastiveSegLib.cli import build_parser, study_plan_from_args

    return study_plan_from_args(build_parser().parse_args(args))


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, study_data):
    out = str(tmp_path_factory.mktemp("study") / "study")
    result = run_cli(_study_args(study_data, out))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out, "study.json"), encoding="utf-8") as handle:
        return out, json.load(handle), result.stderr


@pytest.mark.slow  # shares the tiny study (8 cells, about a minute on 2 cores)
def test_every_arm_of_a_count_and_seed_trains_on_the_same_cases(finished_study):
    _, study, _ = finished_study
    cells = study["cells"]
    assert len(cells) == 8 and all(cell["status"] == "finished" for cell in cells)
    by_pair = {}
    for cell in cells:
        by_pair.setdefault((cell["n"], cell["seed"]), []).append(cell)
    for (count, seed), pair in by_pair.items():
        assert sorted(cell["arm"] for cell in pair) == ["scratch", "warm"]
        assert pair[0]["train_case_ids"] == pair[1]["train_case_ids"]
        assert len(pair[0]["train_case_ids"]) == count
    assert {tuple(c["train_case_ids"]) for c in cells if c["n"] == 1} != {None}


@pytest.mark.slow  # shares the tiny study (8 cells, about a minute on 2 cores)
def test_the_runs_trained_on_exactly_the_recorded_cases(finished_study):
    """What each run was given (its config's dataset files) is what study.json says, and no test case."""
    out, study, _ = finished_study
    test_ids = set(study["settings"]["test_case_ids"])
    assert len(test_ids) == 2
    from ContrastiveSegLib.data.catalog import load_datasets

    for cell in study["cells"]:
        with open(os.path.join(out, cell["run_dir"], "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
        trained = [c.case_id for d in load_datasets(config["data"]["datasets"]) for c in d.cases]
        assert sorted(trained) == cell["train_case_ids"]
        assert config["data"]["val_datasets"] == [] and config["data"]["val_fraction"] == 0.0
        assert not test_ids & set(trained) and not test_ids & set(cell["val_case_ids"])
        assert set(cell["test_case_ids"]) == test_ids


@pytest.mark.slow  # shares the tiny study (8 cells, about a minute on 2 cores)
def test_scores_at_several_points_and_the_outputs_are_written(finished_study):
    out, study, _ = finished_study
    cell = study["cells"][0]
    assert [p["point"] for p in cell["points"]] == ["25%", "50%", "100%"]
    assert [p["step"] for p in cell["points"]] == [1, 2, 4]
    for point in cell["points"]:
        assert set(point["cases"]) == set(study["settings"]["test_case_ids"])
        for score in point["cases"].values():
            assert set(score["dice"]) == {"liver", "spleen"}
    assert os.path.exists(os.path.join(out, cell["run_dir"], "checkpoints", "step_000001.pt"))
    with open(os.path.join(out, "study.csv"), encoding="utf-8") as handle:
        rows = handle.read().splitlines()
    assert rows[0] == "arm,n,seed,point,step,test_case,organ,dice"
    assert len(rows) == 1 + 8 * 3 * 2 * 3  # cells x points x test cases x (2 organs + mean)
    with open(os.path.join(out, "study.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "report.md"), encoding="utf-8") as handle:
        report = handle.read()
    assert "n = 1, warm vs scratch: **" in report and "n = 2, warm vs scratch: **" in report
    assert "0.02" in report


@pytest.mark.slow  # shares the tiny study (8 cells, about a minute on 2 cores)
def test_a_second_run_reuses_every_finished_cell(finished_study, study_data):
    out, study, _ = finished_study
    stamps = {c["arm"] + str(c["n"]) + str(c["seed"]): os.path.getmtime(os.path.join(out, c["run_dir"], "events.jsonl"))
              for c in study["cells"]}
    result = run_cli(_study_args(study_data, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 already finished, 0 to run" in result.stderr
    for cell in study["cells"]:
        path = os.path.join(out, cell["run_dir"], "events.jsonl")
        assert os.path.getmtime(path) == stamps[cell["arm"] + str(cell["n"]) + str(cell["seed"])]


def test_an_interrupted_study_keeps_a_consistent_json_and_resumes_the_cell(tmp_path, study_data):
    """Ctrl-C during a cell: study.json lists the finished cells; the next run continues that cell's training."""
    from ContrastiveSegLib.engine.events import read_events
    from ContrastiveSegLib.study.runner import run_study

    out = str(tmp_path / "study")
    args = _study_args(study_data, out)
    args[args.index("steps=4")] = "steps=8"
    args[args.index("1,2")] = "1"      # one count and one seed: two cells, scratch then warm
    args[args.index("0,1")] = "0"
    plan = _build_plan(args)
    calls = {"cells": 0}

    def interrupt_second_cell(event):
        if event["event"] == "start":
            calls["cells"] += 1
        if calls["cells"] == 2 and event["event"] == "checkpoint" and event["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(plan, log=lambda text: None, cell_listeners=[interrupt_second_cell])
    with open(os.path.join(out, "study.json"), encoding="utf-8") as handle:
        study = json.load(handle)
    assert [c["status"] for c in study["cells"]] == ["finished", "pending"]
    assert all(c["train_case_ids"] for c in study["cells"])
    interrupted = study["cells"][1]
    assert interrupted["status"] == "pending"

    study = run_study(_build_plan(args), log=lambda text: None)
    assert all(c["status"] == "finished" for c in study["cells"])
    starts = [e for e in read_events(os.path.join(out, interrupted["run_dir"], "events.jsonl")) if e["event"] == "start"]
    assert [e["start_step"] for e in starts] == [0, 4]
    first_session = starts[1]["time"] - starts[0]["time"]   # an upper bound of the first session's time
    events = read_events(os.path.join(out, interrupted["run_dir"], "events.jsonl"))
    second_session = events[-1]["time"] - starts[1]["time"]
    assert second_session < study["cells"][1]["seconds"] <= second_session + first_session


def test_dry_run_prints_the_cells_and_an_estimate(tmp_path, study_data):
    out = str(tmp_path / "study")
    result = run_cli(_study_args(study_data, out) + ["--dry-run"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 cells: 2 arm(s) x 2 count(s) x 2 seed(s); 4 training steps each" in result.stderr
    assert "s per training step" in result.stderr and "estimate:" in result.stderr
    assert not os.path.exists(os.path.join(out, "cells"))


def test_a_test_case_in_the_training_pool_is_refused(tmp_path, study_data):
    result = run_cli(["study", "--data", study_data["pool"], "--test-data", study_data["pool"], "--labels", LABELS,
                      "--counts", "1", "--seeds", "0", "--out", str(tmp_path / "s"), "--dry-run"] + TINY_ARGS)
    assert result.returncode == 2
    assert "never to both" in result.stderr


def test_help_says_the_study_does_not_pretrain():
    result = run_cli(["study", "--help"])
    assert result.returncode == 0
    assert "does not pre-train" in " ".join(result.stdout.split())


def test_gpu_workers_never_share_a_device(tmp_path, monkeypatch):
    """--gpus: one worker per GPU, each running one cell process at a time with only its GPU visible."""
    import subprocess
    import threading
    import time

    from ContrastiveSegLib.study import runner
    from ContrastiveSegLib.study.design import Cell

    cells = [Cell("scratch", 1, seed) for seed in range(6)]
    cell_dirs = {cell.key: str(tmp_path / cell.key) for cell in cells}
    busy, seen, lock = {}, [], threading.Lock()

    def fake_run(command, env, stdout, stderr):
        gpu = env["CUDA_VISIBLE_DEVICES"]
        with lock:
            assert not busy.get(gpu), f"two cell processes on GPU {gpu}"
            busy[gpu] = True
            seen.append((gpu, command[-3]))
        time.sleep(0.05)
        with open(os.path.join(command[-3], "result.json"), "w", encoding="utf-8") as handle:
            json.dump({"status": "finished"}, handle)
        with lock:
            busy[gpu] = False
        return subprocess.CompletedProcess(command, 0)

    for folder in cell_dirs.values():
        os.makedirs(folder)
    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    recorded = []
    failures = runner._run_on_gpus(cells, cell_dirs, [0, 3], lambda cell, result: recorded.append(cell.key),
                                   log=lambda text: None)
    assert failures == [] and sorted(recorded) == sorted(cell.key for cell in cells)
    assert {gpu for gpu, _ in seen} == {"0", "3"} and len(seen) == 6


def test_a_minutes_budget_becomes_steps_from_a_measured_step(tmp_path, study_data):
    args = _study_args(study_data, str(tmp_path / "study"))
    args[args.index("steps=4")] = "minutes=0.05"
    result = run_cli(args + ["--dry-run"])
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(text for text in result.stderr.splitlines() if text.startswith("8 cells"))
    steps = int(line.split("; ")[1].split()[0])
    assert steps >= 1


def test_a_selftrain_arm_refuses_a_finetune_checkpoint_as_its_start(tmp_path, study_data):
    from ContrastiveSegLib.engine.checkpoint import save_checkpoint

    finetuned = str(tmp_path / "finetuned.pt")
    save_checkpoint(finetuned, {"kind": "finetune", "model_config": {}, "labels": {}, "model": {}})
    result = run_cli(["study", "--data", study_data["pool"], "--test-data", study_data["test"], "--labels", LABELS,
                      "--counts", "1", "--seeds", "0", "--arm", f"selftrain:init={finetuned}", "--unlabeled",
                      study_data["pool"], "--out", str(tmp_path / "s"), "--dry-run"] + TINY_ARGS)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "a selftrain arm starts from a pretrain run" in result.stderr


def test_a_label_file_with_unnamed_values_stops_the_study_before_any_training(tmp_path, study_data, sample_dir):
    """Every labelled case is checked up front, not when the first cell that trains on it starts.

    The bad case only enters the subsets of seed 1, so checking cell by cell would first train seed 0's cells.
    """
    image, label = _pieces(sample_dir)["a"]
    bad = write_dataset(str(tmp_path / "bad"), {"e": (image, label)}, {"0": "background", "1": "spleen", "5": "liver"})
    args = _study_args(study_data, str(tmp_path / "study"))
    args[args.index("--data") + 1:args.index("--data") + 1] = [bad, "--data"]
    result = run_cli(args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "does not name" in result.stderr
    assert not any(os.path.exists(tmp_path / "study" / "cells" / cell / "run")
                   for cell in ("scratch_n1_seed0", "warm_n1_seed0"))


@pytest.mark.slow  # shares the tiny study
def test_the_gpu_worker_entry_point_rescores_a_cell_whose_result_is_missing(finished_study):
    """``python -m ContrastiveSegLib.study.runner CELL`` (what each GPU worker runs), here on the CPU."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    out, study, _ = finished_study
    cell_dir = os.path.join(out, "cells", "warm_n2_seed1")
    with open(os.path.join(cell_dir, "result.json"), encoding="utf-8") as handle:
        before = json.load(handle)
    os.remove(os.path.join(cell_dir, "result.json"))
    environment = dict(os.environ, PYTHONPATH=REPO_ROOT)
    completed = subprocess.run([sys.executable, "-m", "ContrastiveSegLib.study.runner", cell_dir, "--device", "cpu"],
                               env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    with open(os.path.join(cell_dir, "result.json"), encoding="utf-8") as handle:
        after = json.load(handle)
    assert after["points"] == before["points"] and after["train_case_ids"] == before["train_case_ids"]
