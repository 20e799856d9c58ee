"""How long each logic action keeps Slicer's GUI thread busy, on the sample CT (developer tool, not shipped).

Runs the module's logic on slicer-core (real MRML classes; a fake process runner,
so no engine runs) and times, with ``time.perf_counter``, every piece of work the
GUI thread does between two returns to the event loop:

* starting a training with a scene pair: the longest single export step, and the
  whole export as one block (what the module did before exporting stepwise);
* starting a prediction: handing over the volume (its own file, or an uncompressed
  copy, or a compressed copy as before);
* loading the predicted labelmap as a segmentation, and the Dice table of all organs;
* cancel (the tree kill runs on a thread now: the call itself), scene close and
  application quit (no waiting now).

Usage: ``python ContrastiveSeg/Scripts/measure_gui_blocking.py [REPEATS]`` from the
repository top, with slicer-core installed.  Prints one line per action: the worst
of REPEATS runs (default 3) in milliseconds.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ContrastiveSeg"))
sys.path.insert(0, str(REPO))

import slicer  # noqa: E402
from ContrastiveSegJob.commands import TrainingRequest  # noqa: E402
from ContrastiveSegJob.process import PollingScheduler, ProcessRunner  # noqa: E402
from ContrastiveSegLogic.logic import JobLogic  # noqa: E402
from ContrastiveSegLogic.services import LogicServices  # noqa: E402
from ContrastiveSegMRML import (  # noqa: E402
    dice_table,
    engine_readable_file,
    export_scene_pairs_to_dataset,
    import_labelmap_as_segmentation,
    read_volume,
    write_volume,
)

SAMPLE = REPO / "ContrastiveSegLib" / "sample_data"
LABEL_TABLE = json.loads((SAMPLE / "dataset.json").read_text())["labels"]


class IdleRunner(ProcessRunner):
    def start(self, argv, cwd, env, on_line, on_exit):
        self.argv, self.on_exit, self.running = argv, on_exit, True

    def is_running(self):
        return self.running

    def pid(self):
        return None

    def poll(self):
        pass


def timed(action):
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def measure_once(folder: Path) -> dict:
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    runners = []
    scheduler = PollingScheduler()

    def runner_factory():
        runners.append(IdleRunner())
        return runners[-1]

    logic = JobLogic(LogicServices(scene=scene, runner_factory=runner_factory, scheduler=scheduler,
                                   python_executable=lambda: sys.executable, engine_parent=lambda: str(REPO),
                                   settings={}, documents_folder=str(folder), kill_tree=lambda pid: None,
                                   start_watchdog=lambda pid, grace: 0))
    volume = read_volume(scene, str(SAMPLE / "abdomen_ct.nii.gz"))
    segmentation = import_labelmap_as_segmentation(scene, str(SAMPLE / "abdomen_ct_labels.nii.gz"), LABEL_TABLE,
                                                   reference_volume=volume)
    organs = sorted(set(LABEL_TABLE.values()) - {"background"})
    present = [name for name in organs if name in {segmentation.GetSegmentation().GetNthSegment(i).GetName()
                                                   for i in range(segmentation.GetSegmentation().GetNumberOfSegments())}]
    times = {}
    # training start with a scene pair of all 41 organs: the call, then each export step
    request = TrainingRequest(output_folder=str(folder / "out"), organs=present, model="unet", device="cpu")
    times["train: start call"], _ = timed(lambda: logic.trainRequest(request, [(volume, segmentation)],
                                                                      checkDependencies=False))
    steps = []
    while not runners:
        elapsed, _ = timed(scheduler.run_due)
        steps.append(elapsed)
    times["train: longest export step (of %d)" % len(steps)] = max(steps)
    times["train: whole export as one block (before)"], _ = timed(
        lambda: export_scene_pairs_to_dataset(scene, [(volume, segmentation)], str(folder / "old_export"), present))
    runners[-1].running = False
    runners[-1].on_exit(1)
    # prediction start: the volume handed over
    times["predict: input = the volume's own file"], _ = timed(lambda: engine_readable_file(volume))
    times["predict: input = uncompressed copy"], _ = timed(lambda: write_volume(volume, str(folder / "a.nrrd"),
                                                                                compress=False))
    times["predict: input = compressed copy (before)"], _ = timed(lambda: write_volume(volume, str(folder / "b.nrrd")))
    # results
    times["load result: 41-organ labelmap as segmentation"], loaded = timed(
        lambda: import_labelmap_as_segmentation(scene, str(SAMPLE / "abdomen_ct_labels.nii.gz"), LABEL_TABLE,
                                                reference_volume=volume))
    times["Dice table: 41 organs"], _ = timed(lambda: dice_table(scene, loaded, segmentation, reference_volume=volume))
    # stopping
    logic.trainRequest(TrainingRequest(output_folder=str(folder / "out"), organs=["liver"],
                                       datasets=[str(SAMPLE)], device="cpu"), checkDependencies=False)
    times["cancel (STOP file; tree kill on a thread)"], _ = timed(logic.cancel)
    times["scene close during training"], _ = timed(logic.onSceneClosing)
    times["application quit during training"], _ = timed(logic.onApplicationQuit)
    colors.SetMRMLScene(None)
    return times


def main() -> int:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    worst = {}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            for name, seconds in measure_once(Path(folder)).items():
                worst[name] = max(worst.get(name, 0.0), seconds)
    for name, seconds in worst.items():
        print(f"{seconds * 1000:9.1f} ms  {name}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
