"""The module's logic (ContrastiveSegLogic.logic.JobLogic) for real on slicer-core, with a fake process runner.

Only the Slicer application is faked (process runner, timers, settings); the MRML
scene, volumes and segmentations are slicer-core's.  Issue 10, defects 2, 3, 6-10.
"""

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ContrastiveSeg"))

from conftest import SAMPLE_IMAGE, SAMPLE_LABEL_TABLE, SAMPLE_LABELS, make_scene  # noqa: E402
from ContrastiveSegJob.commands import EngineRun, TrainingRequest  # noqa: E402
from ContrastiveSegJob.devices import CPU_SETTINGS, DeviceInfo, estimate_seconds, recommended_settings  # noqa: E402
from ContrastiveSegJob.jobfolders import new_job_folder  # noqa: E402
from ContrastiveSegJob.process import (  # noqa: E402
    JobController,
    JobStatus,
    PollingScheduler,
    ProcessRunner,
    ThreadedPopenRunner,
)
from ContrastiveSegJob.treekill import pid_alive, start_watchdog  # noqa: E402
from ContrastiveSegLogic.logic import JobLogic, finished_message  # noqa: E402
from ContrastiveSegLogic.services import LAST_MODEL_KEY, OUTPUT_FOLDER_KEY, LogicServices  # noqa: E402
from ContrastiveSegMRML import import_labelmap_as_segmentation, read_volume, segment_names  # noqa: E402

SAMPLE = REPO / "ContrastiveSegLib" / "sample_data"
IMAGE, LABELS, LABEL_TABLE = Path(SAMPLE_IMAGE), Path(SAMPLE_LABELS), SAMPLE_LABEL_TABLE
PY = "/opt/Slicer/bin/PythonSlicer"


class FakeRunner(ProcessRunner):
    """Stands in for an engine process: the test decides what it prints and when it exits."""

    instances = []

    def __init__(self):
        self.argv = None
        self.running = False
        FakeRunner.instances.append(self)

    def start(self, argv, cwd, env, on_line, on_exit):
        self.argv, self.on_line, self.on_exit, self.running = list(argv), on_line, on_exit, True

    def is_running(self):
        return self.running

    def pid(self):
        return 5000 + FakeRunner.instances.index(self)

    def poll(self):
        pass

    def exit(self, code=0):
        self.running = False
        self.on_exit(code)

    def option(self, flag):
        return self.argv[self.argv.index(flag) + 1]


@pytest.fixture
def harness(tmp_path):
    FakeRunner.instances = []
    killed, watchdogs, finished = [], [], []
    services = LogicServices(scene=make_scene(), runner_factory=FakeRunner, scheduler=PollingScheduler(),
                             python_executable=lambda: PY, engine_parent=lambda: str(REPO), settings={},
                             documents_folder=str(tmp_path / "Documents"), temporary_folders=[str(tmp_path / "tmp")],
                             kill_tree=killed.append, start_watchdog=lambda pid, grace: watchdogs.append((pid, grace)))
    logic = JobLogic(services)
    logic.controller._background = lambda work: work()  # the tree kill runs inline in these tests
    logic.finishedCallback = finished.append
    return logic, killed, watchdogs, finished


def make_finished_job(root: Path, organs, status="finished") -> Path:
    """A job folder whose finetune run trained ``organs`` (engine config.json, events, checkpoint)."""
    job = Path(new_job_folder(str(root), organs))
    run = job / "finetune"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    (run / "labels.json").write_text(json.dumps({"0": "background", **{str(i + 1): o for i, o in enumerate(organs)}}))
    config = {"model": {"architecture": "unet", "size": "small", "patch_size": [64, 64, 32]},
              "preprocess": {"spacing": [3.0, 3.0, 3.0]}, "data": {"datasets": [str(SAMPLE)], "labels": list(organs)}}
    (run / "config.json").write_text(json.dumps(config))
    events = [{"event": "start", "total_steps": 10}]
    events.append({"event": "finished", "step": 10 if status == "finished" else 4, "stopped": status == "stopped"})
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return job


def request(root, organs, **changes):
    values = dict(output_folder=str(root), organs=organs, datasets=[str(SAMPLE)], model="unet", model_size="small",
                  patch_size="64,64,32", spacing=3.0, max_steps=10, device="cpu")
    values.update(changes)
    return TrainingRequest(**values)


def model_folder(folder: Path, organs=("liver", "spleen")) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "best.pt").write_bytes(b"")
    (folder / "labels.json").write_text(json.dumps({"0": "background", **{str(i + 1): o for i, o in enumerate(organs)}}))
    return folder


# -- defect 2: a new folder per request; resume only explicitly and only when it matches ------------------

def test_a_second_training_never_returns_the_first_model(harness, tmp_path):
    """Reproduces the report: a finished liver-only run, then liver + pancreas, must train, not say 'Done.'."""
    logic, _, _, finished = harness
    root = Path(logic.outputRoot())
    first = make_finished_job(root, ["liver"])
    job = logic.trainRequest(request(root, "liver, pancreas"), checkDependencies=False)
    assert Path(job).parent == root and Path(job) != first and "liver-pancreas" in Path(job).name
    runner = FakeRunner.instances[-1]
    assert runner.option("--out") == os.path.join(job, "finetune")
    assert "--resume" not in runner.argv and runner.option("--labels") == "liver,pancreas"
    assert finished == [] and logic.isRunning()


def test_resume_is_explicit_and_needs_matching_settings(harness):
    logic, _, _, _ = harness
    root = Path(logic.outputRoot())
    stopped = make_finished_job(root, ["liver"], status="stopped")
    with pytest.raises(ValueError, match="organs: the job trained liver, the request asks for liver, pancreas"):
        logic.trainRequest(request(root, "liver, pancreas"), resumeFolder=str(stopped), checkDependencies=False)
    with pytest.raises(ValueError, match="patch"):
        logic.trainRequest(request(root, "liver", patch_size=96), resumeFolder=str(stopped), checkDependencies=False)
    assert FakeRunner.instances == []
    job = logic.trainRequest(request(root, "liver"), resumeFolder=str(stopped), checkDependencies=False)
    assert job == str(stopped)
    runner = FakeRunner.instances[-1]
    assert runner.option("--out") == str(stopped / "finetune") and "--resume" in runner.argv
    runner.exit(0)
    finished = make_finished_job(root, ["liver"])
    with pytest.raises(ValueError, match="already finished"):
        logic.trainRequest(request(root, "liver"), resumeFolder=str(finished), checkDependencies=False)


# -- defect 3: a persistent output folder, remembered, with disk use -------------------------------------

def test_output_root_is_persistent_and_remembered(harness, tmp_path):
    logic, _, _, _ = harness
    assert logic.outputRoot() == str(tmp_path / "Documents" / "ContrastiveSeg")
    with pytest.raises(ValueError, match="temporary folder"):
        logic.setOutputRoot(str(tmp_path / "tmp" / "ContrastiveSeg"))
    logic.services.settings[OUTPUT_FOLDER_KEY] = str(tmp_path / "tmp" / "old")  # left by an older version
    assert logic.outputRoot() == str(tmp_path / "Documents" / "ContrastiveSeg")
    logic.setOutputRoot(str(tmp_path / "data" / "cs"))
    assert logic.outputRoot() == str(tmp_path / "data" / "cs")
    job = make_finished_job(Path(logic.outputRoot()), ["liver"])
    assert logic.outputRootUsage() == sum(f.stat().st_size for f in job.rglob("*") if f.is_file()) > 0
    assert logic.deleteFolder(str(job)) > 0 and not job.exists()
    with pytest.raises(ValueError, match="does not look like"):
        (tmp_path / "data" / "cs" / "mine").mkdir(parents=True)
        (tmp_path / "data" / "cs" / "mine" / "notes.txt").write_text("not ours")
        logic.deleteFolder(str(tmp_path / "data" / "cs" / "mine"))


# -- defect 7: the GUI thread never waits long ----------------------------------------------------------------

def test_scene_pairs_are_exported_one_step_at_a_time(harness):
    logic, _, _, _ = harness
    scene = logic.scene
    volume = read_volume(scene, str(IMAGE))
    segmentation = import_labelmap_as_segmentation(scene, str(LABELS), LABEL_TABLE, reference_volume=volume)
    job = logic.trainRequest(request(logic.outputRoot(), "liver, spleen, stomach", datasets=[]),
                             scenePairs=[(volume, segmentation)], checkDependencies=False)
    assert logic.isRunning() and FakeRunner.instances == []  # returned before exporting anything
    steps = 0
    while not FakeRunner.instances:
        logic.services.scheduler.run_due()
        steps += 1
        assert steps < 50
    assert steps == 1 + 3 + 1  # the image, one step per organ, then the job starts
    scene_data = os.path.join(job, "scene_data")
    assert FakeRunner.instances[0].option("--data") == scene_data
    dataset = json.loads(Path(scene_data, "dataset.json").read_text())
    assert dataset["labels"] == {"0": "background", "1": "liver", "2": "spleen", "3": "stomach"}


def test_ending_a_process_tree_does_not_block_the_caller(tmp_path):
    release, calls = threading.Event(), []

    def slow_kill(pid):  # psutil's wait_procs can take seconds
        calls.append(pid)
        release.wait(30)

    FakeRunner.instances = []
    controller = JobController(FakeRunner, PollingScheduler(), kill_tree=slow_kill)
    controller.start([EngineRun("predict", ["PythonSlicer", "-m", "ContrastiveSegLib", "predict"])])
    controller.cancel()  # no run folder: the tree is ended at once, on another thread
    assert not release.is_set() and controller.stopping  # returned while the kill is still going on
    release.set()
    FakeRunner.instances[0].exit(-9)
    assert controller.result.status == JobStatus.KILLED


def test_prediction_reads_the_volume_file_itself_and_writes_outside_the_model_folder(harness, tmp_path):
    logic, _, _, finished = harness
    volume = read_volume(logic.scene, str(IMAGE))
    model = model_folder(tmp_path / "shared_model")
    os.chmod(model, stat.S_IRUSR | stat.S_IXUSR)  # a read-only shared model
    try:
        logic.predict(volume, str(model), wait=False, checkDependencies=False)
        runner = FakeRunner.instances[-1]
        assert runner.option("--image") == str(IMAGE)  # no copy written on the GUI thread
        out = Path(runner.option("--out"))
        assert Path(logic.outputRoot()) in out.parents and model not in out.parents
        assert runner.argv[-1] == "--events-stdout"
        truth = sitk.ReadImage(str(LABELS))
        labels = sitk.GetArrayFromImage(truth)
        two = sitk.GetImageFromArray(np.where(labels == 5, 1, np.where(labels == 1, 2, 0)).astype(np.uint8))
        two.CopyInformation(truth)
        sitk.WriteImage(two, str(out))
        runner.exit(0)
    finally:
        os.chmod(model, stat.S_IRWXU)
    result = finished[-1]
    assert result.status == JobStatus.SUCCEEDED and result.job == "prediction"
    assert result.message.startswith("Loaded ") and result.message.endswith(": liver, spleen")  # defect 9
    assert finished_message(result) == (result.message, None)
    volume.Modified()  # changed in the scene: the engine must get a copy
    volume.SetModifiedSinceRead(True) if hasattr(volume, "SetModifiedSinceRead") else None
    image_data = volume.GetImageData()
    image_data.Modified()
    logic.predict(volume, str(model), wait=False, checkDependencies=False)
    copy = FakeRunner.instances[-1].option("--image")
    assert copy != str(IMAGE) and copy.endswith("_input.nrrd") and os.path.isfile(copy)
    FakeRunner.instances[-1].exit(1)
    assert not os.path.exists(copy)
    assert finished_message(finished[-1])[1] == "Segmentation failed"  # not "Training failed" (defect 9)


# -- defect 8: closing the scene stops predictions only; the model is remembered --------------------------------

def test_closing_the_scene_keeps_training_and_stops_a_prediction(harness, tmp_path):
    logic, killed, _, finished = harness
    logic.trainRequest(request(logic.outputRoot(), "liver"), checkDependencies=False)
    training = FakeRunner.instances[-1]
    logic.onSceneClosing()
    assert killed == [] and training.running and logic.isRunning()
    run_dir = Path(training.option("--out"))
    model_folder(run_dir, ["liver"])
    training.exit(0)
    assert finished[-1].status == JobStatus.SUCCEEDED and finished[-1].message == f"Done. Model: {run_dir}"
    assert logic.services.settings[LAST_MODEL_KEY] == str(run_dir) == logic.lastModelFolder()

    volume = read_volume(logic.scene, str(IMAGE))
    logic.predict(volume, str(run_dir), wait=False, checkDependencies=False)
    prediction = FakeRunner.instances[-1]
    logic.onSceneClosing()
    assert killed == [prediction.pid()]
    prediction.exit(-15)
    assert finished[-1].status == JobStatus.KILLED
    assert logic.scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


# -- defect 10: quitting Slicer does not wait; a watchdog ends the trainer if it does not stop --------------------

def test_application_quit_asks_for_a_stop_and_leaves_a_watchdog(harness):
    logic, killed, watchdogs, finished = harness
    logic.trainRequest(request(logic.outputRoot(), "liver"), checkDependencies=False)
    runner = FakeRunner.instances[-1]
    logic.onApplicationQuit()
    assert (Path(runner.option("--out")) / "STOP").is_file()
    assert watchdogs == [(runner.pid(), 30.0)] and killed == [] and finished == []
    logic.onApplicationQuit()  # the module's cleanup after aboutToQuit: one watchdog is enough
    assert watchdogs == [(runner.pid(), 30.0)]


def test_the_watchdog_ends_a_process_that_does_not_stop(tmp_path):
    stubborn = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        watchdog = start_watchdog(stubborn.pid, 0.2)
        assert stubborn.wait(timeout=60) != 0
        assert not pid_alive(stubborn.pid)
        for _ in range(600):
            if not pid_alive(watchdog):
                break
            threading.Event().wait(0.1)
    finally:
        if stubborn.poll() is None:
            stubborn.kill()


# -- defect 6: CPU-sized first-run settings and an estimate from a measured step ----------------------------------

@pytest.mark.slow  # imports torch and MONAI in a new process: about 25 s on two busy cores
def test_device_probe_and_first_run_settings(harness):
    """The probe runs as its own process (Slicer never imports torch) and measures a training step."""
    logic, _, _, _ = harness
    found, created = [], []

    def runner_factory():
        created.append(ThreadedPopenRunner())
        return created[-1]

    logic.services.runner_factory = runner_factory
    logic.services.python_executable = lambda: sys.executable
    logic.detectDevice(found.append, benchmark={"model": "unet", "modelSize": "tiny", "patch": "32,32,16"})
    for _ in range(3000):  # up to 5 minutes on a loaded machine; it ends when the probe exits
        if found:
            break
        created[0].poll()
        threading.Event().wait(0.1)
    info = found[0]
    assert info.error is None and info.torch_version and info.cuda is False and info.seconds_per_step > 0
    assert "torch" not in sys.modules or "deviceprobe" not in sys.modules  # the probe ran elsewhere
    assert recommended_settings(DeviceInfo(torch_version="2.4.0", cuda=False)) == CPU_SETTINGS
    assert CPU_SETTINGS == {"model": "unet", "modelSize": "small", "patchSize": 64, "patchDepth": 32, "spacing": 3.0,
                            "maxSteps": 800, "recipe": "few-label"}
    assert recommended_settings(DeviceInfo(torch_version="2.4.0", cuda=True))["model"] == "unetr"
    assert estimate_seconds(DeviceInfo(seconds_per_step=0.5), 400) == 200.0
    assert estimate_seconds(DeviceInfo(), 400) is None
    assert "PyTorch is not installed" in DeviceInfo().describe()


def test_organs_offered_from_scene_segmentations(harness):
    logic, _, _, _ = harness
    volume = read_volume(logic.scene, str(IMAGE))
    segmentation = import_labelmap_as_segmentation(logic.scene, str(LABELS), LABEL_TABLE, reference_volume=volume)
    segment = segmentation.GetSegmentation().GetSegment(
        [i for i, n in segment_names(segmentation).items() if n == "kidney_left"][0])
    segment.SetName("Left kidney")  # as TotalSegmentator's Slicer extension names it
    organs = logic.availableOrgans([], [(volume, segmentation)])
    assert "kidney_left" in organs and "left_kidney" not in organs and len(organs) == 41


def test_job_folder_names_are_unique_and_say_when_and_what(tmp_path):
    import datetime

    from ContrastiveSegJob.jobfolders import is_inside, job_folder_name

    moment = datetime.datetime(2026, 1, 30, 14, 15, 2)
    assert job_folder_name(["liver", "kidney_left"], moment) == "20260130-141502_liver-kidney_left"
    first = new_job_folder(str(tmp_path), ["liver"], moment)
    second = new_job_folder(str(tmp_path), ["liver"], moment)
    assert first != second and second.endswith("_2") and os.path.isdir(first) and os.path.isdir(second)
    assert is_inside(str(tmp_path / "a" / "b"), [str(tmp_path / "a")]) and not is_inside(str(tmp_path / "ab"),
                                                                                         [str(tmp_path / "a")])


def test_packages_install_first_in_the_background_and_declining_leaves_nothing(harness):
    logic, _, _, finished = harness
    root = Path(logic.outputRoot())

    class Declined:
        def prepare(self, folder, ask):
            raise RuntimeError("Nothing was installed.")

    logic.services.installer = Declined()
    with pytest.raises(RuntimeError, match="Nothing was installed"):
        logic.trainRequest(request(root, "liver"))
    assert not root.exists() and FakeRunner.instances == []

    class Pip:
        def prepare(self, folder, ask):
            return EngineRun("install", [PY, "-m", "pip", "install", "--constraint", str(Path(folder) / "c.txt")])

    logic.services.installer = Pip()
    logic.trainRequest(request(root, "liver"))
    assert FakeRunner.instances[0].argv[1:4] == ["-m", "pip", "install"]  # a process, not a wait on the GUI
    FakeRunner.instances[0].exit(0)
    assert FakeRunner.instances[1].argv[3] == "finetune" and finished == []
