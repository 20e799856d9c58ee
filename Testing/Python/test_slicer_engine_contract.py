"""The module's logic driving the real engine, without the Slicer GUI.

The path the GUI takes, minus Qt: scene data exported by the MRML glue (slicer-core),
command lines from ContrastiveSegJob.commands, the real engine in a subprocess run by
the job controller (ThreadedPopenRunner stands in for launchConsoleProcess / QProcess,
which only differ in how output lines reach the GUI thread), cancel through the STOP
file, prediction, and the result loaded back as a named segmentation
with a Dice table.  A tiny U-Net on 32^3 patches keeps it to seconds on a CPU.
"""

import json
import sys
import time
from pathlib import Path

import slicer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ContrastiveSeg"))

from ContrastiveSegJob.commands import (  # noqa: E402
    TrainingRequest,
    engine_environment,
    find_engine_parent,
    plan_training,
    predict_run,
)
from ContrastiveSegJob.process import JobController, JobStatus, PollingScheduler, ThreadedPopenRunner  # noqa: E402
from ContrastiveSegJob.runfolder import RunStatus, is_model_folder, read_colors, read_labels, run_status  # noqa: E402
from ContrastiveSegJob.treekill import pid_alive  # noqa: E402
from ContrastiveSegMRML import (  # noqa: E402
    dice_table,
    export_scene_pairs_to_dataset,
    import_labelmap_as_segmentation,
    load_segmentation_file,
    read_dice_table,
    read_volume,
    segment_names,
    write_volume,
)

SAMPLE_CT = REPO / "ContrastiveSegLib" / "sample_data" / "abdomen_ct.nii.gz"
SAMPLE_ORGANS = REPO / "ContrastiveSeg" / "Resources" / "SampleData" / "abdomen_ct_organs.seg.nrrd"


def wait_for_step(controller: JobController, step: int, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while controller.running and (controller.state.phase is None or controller.state.phase.step < step):
        assert time.monotonic() < deadline, f"no training step {step} within {timeout_s:g} s"
        controller.wait(timeout_s=0.05)


def test_train_cancel_predict_and_score_with_the_real_engine(tmp_path):
    scene = slicer.vtkMRMLScene()
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLScene(scene)
    volume = read_volume(scene, str(SAMPLE_CT))
    reference = load_segmentation_file(scene, str(SAMPLE_ORGANS))

    output = tmp_path / "output"
    dataset = export_scene_pairs_to_dataset(scene, [(volume, reference)], str(output / "scene_data"),
                                            ["liver", "spleen"])
    request = TrainingRequest(output_folder=str(output), organs="liver, spleen", datasets=[str(dataset.parent)],
                              model="unet", model_size="tiny", patch_size=32, max_steps=100000, device="cpu", seed=1,
                              recipe="few-label")
    engine_parent = find_engine_parent([str(REPO / "ContrastiveSeg")])
    environment = engine_environment(engine_parent)
    controller = JobController(ThreadedPopenRunner, PollingScheduler(), stop_timeout_s=60.0, poll_interval_s=0.1)
    logs = []
    controller.on_log = logs.append

    # Train, then cancel: the engine sees RUN/STOP, saves checkpoints/last.pt and exits 0.
    controller.start(plan_training(request, sys.executable), cwd=engine_parent, env=environment)
    wait_for_step(controller, 2)
    state = controller.state
    assert state.device == "cpu" and state.organs == ["liver", "spleen"]
    assert state.loss is not None and state.phase.total == 100000 and state.percent() == 0
    pid = controller.pid()
    controller.cancel()
    result = controller.wait(timeout_s=120)
    assert result is not None and result.status == JobStatus.STOPPED, (result, logs[-10:])
    assert controller.cancel_log == [f"wrote {output / 'finetune' / 'STOP'}"], "stopped cooperatively, nothing killed"
    assert not pid_alive(pid)
    run_dir = output / "finetune"
    assert run_status(run_dir) == RunStatus.STOPPED
    assert not (run_dir / "STOP").exists() and is_model_folder(run_dir)
    assert read_labels(run_dir) == {1: "liver", 2: "spleen"}
    trained = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["train"]
    assert (trained["augmentation"], trained["lr"], trained["vessel_contrast_prob"]) == ("spatial", 3e-3, 0.5)

    # Resuming would add --resume (the engine's resume itself is the engine's tests' business).
    request.resume = True
    assert plan_training(request, sys.executable)[0].argv[-1] == "--resume"

    # Predict on the scene volume and load the labelmap as a named, coloured segmentation.
    image = write_volume(volume, str(run_dir / "predictions" / "input.nrrd"))
    prediction_file = run_dir / "predictions" / "segmentation.nrrd"
    controller.start([predict_run(sys.executable, str(run_dir), image, str(prediction_file), "cpu")],
                     cwd=engine_parent, env=environment)
    result = controller.wait(timeout_s=180)
    assert result.status == JobStatus.SUCCEEDED, (result, logs[-10:])
    prediction = import_labelmap_as_segmentation(scene, str(prediction_file), read_labels(run_dir),
                                                 reference_volume=volume, colors=read_colors(run_dir))
    names = set(segment_names(prediction).values())
    assert names <= {"liver", "spleen"}
    table = read_dice_table(dice_table(scene, prediction, reference, reference_volume=volume))
    assert set(table) == {"liver", "spleen"}  # a row for each model organ, Dice 0 if missed (issue 10, defect 5)
    assert all(0.0 <= row["Dice"] <= 1.0 for row in table.values())
    color_logic.SetMRMLScene(None)
