"""nnU-Net v2 on the demo task, for ``few_label_accuracy.py --nnunet`` (or alone, see ``main``).

What a user would pick instead: nnU-Net v2 from PyPI, in a virtual environment of its own (CPU torch
2.13.0 installed together with it, so pip does not pull a CUDA build), trained on patient A for the
demo's four organs and scored on patient B exactly as ContrastiveSeg is (``evaluate`` on B's own grid).

Changed from nnU-Net's defaults, and nothing else: the trainer ``nnUNetTrainerWallclock`` (written into
the environment's nnunetv2 package, where nnU-Net looks trainers up by name) runs 25 training and
2 validation iterations per epoch instead of 250 and 50, and ends training at the first epoch end after
``budget_s`` seconds of training (saving ``checkpoint_final.pth`` as a normal end would); the 3d_fullres
configuration, fold ``all`` (the one scan trains; nnU-Net's validation then reuses it), device ``cpu``.
Planning and preprocessing are timed separately and not counted in the budget.

    python benchmarks/nnunet_baseline.py --out few-label-accuracy --budget-s 600
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

DATASET_ID, DATASET_NAME = 501, "Dataset501_DemoPatientA"

TRAINER = '''import os
import time

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerWallclock(nnUNetTrainer):
    """nnU-Net's trainer with short epochs that stops at a wall-clock budget (WALLCLOCK_BUDGET_S)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_iterations_per_epoch = 25
        self.num_val_iterations_per_epoch = 2
        self.budget_s = float(os.environ["WALLCLOCK_BUDGET_S"])
        self.training_started = None

    def on_train_start(self):
        super().on_train_start()
        self.training_started = time.time()

    def on_epoch_end(self):
        super().on_epoch_end()
        if time.time() - self.training_started > self.budget_s:
            self.on_train_end()
            raise SystemExit(0)
'''


def _run(stage: str, command, env=None, log=None) -> dict:
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if log:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"### {stage}: {' '.join(map(str, command))}\n{completed.stdout}\n{completed.stderr}\n")
    result = {"stage": stage, "seconds": round(time.perf_counter() - started, 1), "returncode": completed.returncode}
    if completed.returncode != 0:
        result["message"] = (completed.stderr or completed.stdout)[-1500:]
    return result


def write_raw_dataset(raw: str) -> tuple:
    """Patient A for liver, spleen, stomach, aorta in nnU-Net's raw layout; patient B as one NIfTI to predict."""
    import numpy as np
    import SimpleITK as sitk

    from ContrastiveSegLib.data.io import read_image
    from ContrastiveSegLib.demo import DEMO_ORGANS, SAMPLE_DIR, sample_paths

    folder = os.path.join(raw, DATASET_NAME)
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
    with open(os.path.join(SAMPLE_DIR, "dataset.json"), encoding="utf-8") as handle:
        source = {name: int(value) for value, name in json.load(handle)["labels"].items()}
    image = sitk.ReadImage(os.path.join(SAMPLE_DIR, "abdomen_ct.nii.gz"))
    label = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(SAMPLE_DIR, "abdomen_ct_labels.nii.gz")))
    target = np.zeros(label.shape, dtype=np.uint8)
    for index, name in enumerate(DEMO_ORGANS, start=1):
        target[label == source[name]] = index
    target_image = sitk.GetImageFromArray(target)
    target_image.CopyInformation(image)
    sitk.WriteImage(image, os.path.join(folder, "imagesTr", "patientA_0000.nii.gz"))
    sitk.WriteImage(target_image, os.path.join(folder, "labelsTr", "patientA.nii.gz"))
    labels = {"background": 0}
    labels.update({name: index for index, name in enumerate(DEMO_ORGANS, start=1)})
    with open(os.path.join(folder, "dataset.json"), "w", encoding="utf-8") as handle:
        json.dump({"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"},
                  handle, indent=1)
    test_folder = os.path.join(raw, "patientB")
    os.makedirs(test_folder, exist_ok=True)
    sitk.WriteImage(read_image(sample_paths()["heldout_image"]), os.path.join(test_folder, "patientB_0000.nii.gz"))
    return folder, test_folder


def run_nnunet_comparison(out: str, budget_s: float, venv: str = "") -> dict:
    """Install, plan, train for ``budget_s`` seconds, predict and score; every stage's seconds, or where it failed."""
    from ContrastiveSegLib.demo import heldout_reference_names, sample_paths
    from ContrastiveSegLib.evaluate import evaluate_files

    work = os.path.join(out, "nnunet")
    venv = venv or os.path.join(work, "venv")
    log = os.path.join(work, "nnunet.log")
    os.makedirs(work, exist_ok=True)
    python = os.path.join(venv, "bin", "python")
    report = {"budget_s": budget_s, "stages": [], "trainer_changes": "25 train / 2 validation iterations per epoch; "
              "stops at the first epoch end after budget_s of training; everything else nnU-Net's defaults"}

    def stage(name, command, env=None) -> bool:
        result = _run(name, command, env, log)
        report["stages"].append(result)
        if result["returncode"] != 0:
            report["status"] = f"failed at {name}"
            return False
        return True

    if not os.path.exists(python):
        if not stage("venv", [sys.executable, "-m", "venv", venv]):
            return report
        # torch first (together): alone, nnunetv2 would pull a multi-GB CUDA torch
        if not stage("install", [python, "-m", "pip", "install", "--quiet", "torch==2.13.0", "nnunetv2"]):
            return report
    version = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('nnunetv2'))"],
                             capture_output=True, text=True).stdout.strip()
    report["nnunetv2"] = version
    package = subprocess.run([python, "-c", "import nnunetv2, os; print(os.path.dirname(nnunetv2.__file__))"],
                             capture_output=True, text=True).stdout.strip()
    trainer_dir = os.path.join(package, "training", "nnUNetTrainer", "variants", "benchmark")
    os.makedirs(trainer_dir, exist_ok=True)
    with open(os.path.join(trainer_dir, "nnUNetTrainerWallclock.py"), "w", encoding="utf-8") as handle:
        handle.write(TRAINER)
    raw, preprocessed, results = (os.path.join(work, n) for n in ("raw", "preprocessed", "results"))
    _, test_folder = write_raw_dataset(raw)
    env = dict(os.environ, nnUNet_raw=raw, nnUNet_preprocessed=preprocessed, nnUNet_results=results,
               nnUNet_n_proc_DA="1", nnUNet_compile="false", WALLCLOCK_BUDGET_S=str(budget_s))
    bin_dir = os.path.join(venv, "bin")
    if not stage("plan_and_preprocess", [os.path.join(bin_dir, "nnUNetv2_plan_and_preprocess"), "-d",
                                         str(DATASET_ID), "-c", "3d_fullres", "-np", "1",
                                         "--verify_dataset_integrity"], env):
        return report
    if not stage("train", [os.path.join(bin_dir, "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "all",
                           "-tr", "nnUNetTrainerWallclock", "-device", "cpu"], env):
        return report
    prediction_folder = os.path.join(work, "prediction")
    if not stage("predict", [os.path.join(bin_dir, "nnUNetv2_predict"), "-i", test_folder, "-o", prediction_folder,
                             "-d", str(DATASET_ID), "-c", "3d_fullres", "-f", "all", "-tr", "nnUNetTrainerWallclock",
                             "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", "1", "-nps", "1"], env):
        return report
    from ContrastiveSegLib.demo import DEMO_ORGANS

    names = {index: name for index, name in enumerate(DEMO_ORGANS, start=1)}
    metrics = evaluate_files(os.path.join(prediction_folder, "patientB.nii.gz"), sample_paths()["heldout_labels"],
                             names, heldout_reference_names(names))
    report.update(status="scored", dice=metrics["dice"], mean_dice=metrics["mean_dice"])
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="few-label-accuracy")
    parser.add_argument("--budget-s", type=float, required=True, help="training wall-clock in seconds")
    parser.add_argument("--venv", default="", help="an existing environment with nnunetv2 (default: make one)")
    args = parser.parse_args()
    report = run_nnunet_comparison(os.path.abspath(args.out), args.budget_s, args.venv)
    print(json.dumps(report, indent=1))
    return 0 if report.get("status") == "scored" else 1


if __name__ == "__main__":
    sys.exit(main())
