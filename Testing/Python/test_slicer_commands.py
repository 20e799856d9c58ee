"""Engine command lines built by the Slicer module (ContrastiveSegJob.commands)."""

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ContrastiveSeg"))

from ContrastiveSegJob.commands import (  # noqa: E402
    EngineRun,
    TrainingRequest,
    engine_argv,
    engine_environment,
    evaluate_run,
    final_run_dir,
    find_engine_parent,
    plan_training,
    predict_run,
)

PY = "/opt/Slicer/bin/PythonSlicer"


def request(tmp_path, **changes):
    values = dict(output_folder=str(tmp_path / "out"), organs="Liver, spleen", datasets=["/data/a", "/data/b"])
    values.update(changes)
    return TrainingRequest(**values)


def test_supervised_finetune_command(tmp_path):
    runs = plan_training(request(tmp_path, model="unet", patch_size=64, max_steps=300, labeled_fraction=0.5,
                                 device="cpu", seed=7, validation_data="/data/val", recipe="few-label"), PY)
    assert len(runs) == 1
    out = str(tmp_path / "out" / "finetune")
    assert runs[0].phase == "finetune"
    assert runs[0].run_dir == out
    assert runs[0].argv == [
        PY, "-m", "ContrastiveSegLib", "finetune",
        "--data", "/data/a", "--data", "/data/b",
        "--labels", "liver,spleen", "--out", out,
        "--model", "unet", "--patch", "64", "--max-steps", "300", "--recipe", "few-label", "--labeled-fraction", "0.5",
        "--device", "cpu", "--seed", "7", "--val-data", "/data/val", "--events-stdout",
    ]
    assert final_run_dir(request(tmp_path)) == out


def test_engine_defaults_are_left_to_the_engine(tmp_path):
    argv = plan_training(request(tmp_path), PY)[0].argv
    for flag in ("--model", "--patch", "--max-steps", "--labeled-fraction", "--seed", "--init", "--val-data",
                 "--resume", "--model-size", "--recipe"):
        assert flag not in argv
    assert argv[argv.index("--device") + 1] == "auto"
    assert argv[-1] == "--events-stdout"


@pytest.mark.parametrize("method", ["mixcl", "gcl"])
def test_pretraining_then_finetuning(tmp_path, method):
    runs = plan_training(request(tmp_path, method=method, pretrain_datasets=["/data/extra", "/data/a"],
                                 pretrain_steps=50, max_steps=20, model="unetr", patch_size=96, model_size="small"), PY)
    assert [run.phase for run in runs] == ["pretrain", "finetune"]
    pretrain_dir = str(tmp_path / "out" / f"pretrain_{method}")
    assert runs[0].argv == [
        PY, "-m", "ContrastiveSegLib", "pretrain", "--method", method,
        "--data", "/data/a", "--data", "/data/b", "--data", "/data/extra",
        "--out", pretrain_dir, "--model", "unetr", "--model-size", "small", "--patch", "96",
        "--max-steps", "50", "--device", "auto", "--events-stdout",
    ]
    finetune = runs[1].argv
    assert finetune[finetune.index("--init") + 1] == os.path.join(pretrain_dir, "checkpoints", "last.pt")
    assert finetune[finetune.index("--max-steps") + 1] == "20"
    assert "--method" not in finetune


def test_selftraining_command(tmp_path):
    runs = plan_training(request(tmp_path, method="selftrain", datasets=["/data/a"], unlabeled_data="/scans",
                                 max_steps=10, device="cuda", init_checkpoint="/runs/x/checkpoints/best.pt"), PY)
    assert len(runs) == 1
    assert runs[0].argv == [
        PY, "-m", "ContrastiveSegLib", "selftrain", "--labeled", "/data/a", "--unlabeled", "/scans",
        "--labels", "liver,spleen", "--out", str(tmp_path / "out" / "selftrain"),
        "--init", "/runs/x/checkpoints/best.pt", "--max-steps", "10", "--device", "cuda", "--events-stdout",
    ]
    # The network, grid, recipe and seed the user chose reach self-training as they reach fine-tuning.
    argv = plan_training(request(tmp_path, method="selftrain", datasets=["/data/a"], unlabeled_data="/scans",
                                 model="unet", model_size="small", patch_size="64,64,32", spacing=3.0, seed=4,
                                 recipe="few-label"), PY)[0].argv
    for flag, value in (("--model", "unet"), ("--model-size", "small"), ("--patch", "64,64,32"),
                        ("--spacing", "3,3,3"), ("--recipe", "few-label"), ("--seed", "4")):
        assert argv[argv.index(flag) + 1] == value, flag


@pytest.mark.parametrize("changes, message", [
    ({"organs": ""}, "at least one organ"),
    ({"organs": "background"}, "at least one organ"),
    ({"datasets": []}, "labelled dataset"),
    ({"output_folder": " "}, "output folder"),
    ({"method": "simclr"}, "Unknown method"),
    ({"recipe": "best"}, "Unknown recipe"),
    ({"patch_size": 100}, "multiple of 16"),
    ({"max_steps": 0}, "at least 1"),
    ({"labeled_fraction": 0.0}, "Label fraction"),
    ({"device": "tpu"}, "Unknown device"),
    ({"model": "resnet"}, "Unknown model"),
    ({"model_size": "huge"}, "Unknown model size"),
    ({"method": "selftrain", "unlabeled_data": "/u"}, "exactly one labelled dataset"),
    ({"method": "selftrain", "datasets": ["/a"]}, "unlabelled images"),
])
def test_invalid_requests_say_what_to_do(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        plan_training(request(tmp_path, **changes), PY)


def _write_events(run_dir: Path, events, checkpoint=False):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "events.jsonl", "w") as file:
        for event in events:
            file.write(json.dumps(event) + "\n")
    if checkpoint:
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        (run_dir / "checkpoints" / "last.pt").write_bytes(b"x")


def test_resume_skips_finished_runs_and_continues_stopped_ones(tmp_path):
    out = tmp_path / "out"
    _write_events(out / "pretrain_mixcl", [{"event": "start"}, {"event": "finished", "stopped": False}], True)
    _write_events(out / "finetune", [{"event": "start"}, {"event": "finished", "stopped": True}], True)
    runs = plan_training(request(tmp_path, method="mixcl", resume=True), PY)
    assert runs[0].skip and "--resume" not in runs[0].argv
    assert not runs[1].skip and runs[1].argv[-1] == "--resume"


def test_resume_after_a_crash_and_fresh_start(tmp_path):
    out = tmp_path / "out"
    _write_events(out / "finetune", [{"event": "start"}, {"event": "step", "step": 3}], True)
    assert plan_training(request(tmp_path, resume=True), PY)[0].argv[-1] == "--resume"
    assert "--resume" not in plan_training(request(tmp_path, resume=False), PY)[0].argv
    fresh = tmp_path / "fresh"
    run = plan_training(request(tmp_path, output_folder=str(fresh), resume=True), PY)[0]
    assert "--resume" not in run.argv and not run.skip


def test_predict_and_evaluate_commands():
    run = predict_run(PY, "/out/finetune", "/tmp/ct.nrrd", "/tmp/ct_seg.nrrd", device="cpu")
    assert run.argv == [PY, "-m", "ContrastiveSegLib", "predict", "--model", "/out/finetune", "--image",
                        "/tmp/ct.nrrd", "--out", "/tmp/ct_seg.nrrd", "--device", "cpu", "--events-stdout"]
    assert run.run_dir is None and run.phase == "predict"
    # progress of a prediction comes as events, like training's (issue 10, defect 9)
    assert predict_run(PY, "m", "i.nii.gz", "o.seg.nrrd").argv[-2:] == ["auto", "--events-stdout"]
    assert predict_run(PY, "m", "i.nii.gz", "o.seg.nrrd", body_mask=False).argv[-4:] == [
        "--device", "auto", "--no-body-mask", "--events-stdout"]
    with pytest.raises(ValueError, match="must end with"):
        predict_run(PY, "m", "i.nii.gz", "o.png")
    with pytest.raises(ValueError, match="Unknown device"):
        predict_run(PY, "m", "i.nii.gz", "o.nrrd", device="gpu")
    assert evaluate_run(PY, "p.nrrd", "r.nii.gz", "/m", "/m/metrics.json").argv == [
        PY, "-m", "ContrastiveSegLib", "evaluate", "--pred", "p.nrrd", "--ref", "r.nii.gz", "--model", "/m",
        "--out", "/m/metrics.json"]
    assert "--out" not in evaluate_run(PY, "p", "r", "m").argv


def test_environment_and_engine_location():
    environment = engine_environment("/ext/lib", "/other")
    assert environment["PYTHONUNBUFFERED"] == "1"
    assert environment["PYTHONPATH"] == os.pathsep.join(["/ext/lib", "/other"])
    assert "PYTHONPATH" not in engine_environment(None)
    # Source checkout: the engine is one level above the module folder.
    assert find_engine_parent([str(REPO / "ContrastiveSeg")]) == str(REPO)
    assert find_engine_parent(["/nonexistent/folder"]) is None


def test_describe_quotes_what_a_shell_needs():
    run = EngineRun("finetune", engine_argv("/My Programs/PythonSlicer", "finetune", ["--labels", "liver,spleen"]))
    assert run.describe() == '"/My Programs/PythonSlicer" -m ContrastiveSegLib finetune --labels liver,spleen'


def test_every_command_parses_with_the_engines_own_parser(tmp_path):
    """The contract: what the module builds, the engine accepts, for every subcommand."""
    sys.path.insert(0, str(REPO))
    from ContrastiveSegLib.cli import build_parser

    parser = build_parser()
    subcommands = set(parser._subparsers._group_actions[0].choices)  # argparse keeps them here
    commands = []
    commands += plan_training(request(tmp_path, model="unet", patch_size=32, max_steps=5, labeled_fraction=0.5,
                                      device="cpu", seed=3, validation_data="/v", init_checkpoint="/c.pt",
                                      model_size="tiny", recipe="few-label"), PY)
    commands += plan_training(request(tmp_path, method="mixcl", pretrain_steps=5), PY)
    commands += plan_training(request(tmp_path, method="gcl"), PY)
    commands += plan_training(request(tmp_path, method="selftrain", datasets=["/a"], unlabeled_data="/u"), PY)
    commands += plan_training(request(tmp_path, method="selftrain", datasets=["/a"], unlabeled_data="/u", model="unet",
                                      patch_size="64,64,32", spacing=3.0, seed=2, recipe="few-label"), PY)
    commands.append(predict_run(PY, "/m", "/i.nrrd", "/o.nrrd", "cuda"))
    commands.append(predict_run(PY, "/m", "/i.nrrd", "/o.nrrd", "cpu", body_mask=False))
    commands.append(evaluate_run(PY, "/p.nrrd", "/r.nrrd", "/m", "/x.json"))
    checked = set()
    for run in commands:
        subcommand = run.argv[3]
        if subcommand not in subcommands:
            continue
        try:
            parser.parse_args(run.argv[3:])
        except SystemExit as error:  # argparse exits on an unknown or missing flag
            pytest.fail(f"the engine rejects: {run.describe()} (exit {error.code})")
        checked.add(subcommand)
    assert {"pretrain", "finetune", "selftrain", "predict", "evaluate"} <= checked, sorted(subcommands)
