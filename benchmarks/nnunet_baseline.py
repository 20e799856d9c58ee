"""nnU-Net v2 on the demo task, for ``few_label_accuracy.py --nnunet`` (or alone, see ``main``).

What a user would pick instead: nnU-Net v2 from PyPI, in a virtual environment of its own, trained on
patient A for the demo's four organs and scored on patient B exactly as ContrastiveSeg is (``evaluate``
on B's own grid).

The environment differs from ``pip install nnunetv2`` in two ways (see ``install``): CPU torch 2.13.0 is
installed first, so pip does not pull a CUDA build; and ``timm`` (with it ``torchvision``) is left out.
timm is needed only by the transformer networks of dynamic-network-architectures, which the default
U-Net does not use, and PyPI's torchvision does not load next to the CPU torch. So ``nnunetv2`` and
``dynamic-network-architectures`` are installed with ``--no-deps`` and their declared dependencies,
minus timm, in one further ``pip install``.

Changed from nnU-Net's defaults, and nothing else: the trainer ``nnUNetTrainerWallclock`` (written into
the environment's nnunetv2 package, in ``training/nnUNetTrainer/`` where nnU-Net looks trainers up by
name before importing the subpackages that need timm) runs 25 training and
2 validation iterations per epoch instead of 250 and 50, ends training after the first training
iteration that passes ``budget_s`` seconds of training (that epoch's validation iterations and end still
run, then ``checkpoint_final.pth`` is saved as a normal end would), and skips the final validation (with
fold ``all`` it would only predict the training scan again); the 3d_fullres
configuration, fold ``all`` (the one scan trains; nnU-Net's validation then reuses it), device ``cpu``.
Planning and preprocessing are timed separately and not counted in the budget.

    python benchmarks/nnunet_baseline.py --out few-label-accuracy --budget-s 600
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

DATASET_ID, DATASET_NAME = 501, "Dataset501_DemoPatientA"

TRAINER = '''import json
import os
import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerWallclock(nnUNetTrainer):
    """nnU-Net's trainer with short epochs that stops at a wall-clock budget (WALLCLOCK_BUDGET_S)."""

    # nnU-Net records its trainer's arguments by inspecting this signature, so it repeats the parent's
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = 25
        self.num_val_iterations_per_epoch = 2
        self.budget_s = float(os.environ["WALLCLOCK_BUDGET_S"])

    def run_training(self):
        # nnUNetTrainer.run_training, plus a look at the clock after every training iteration: on a
        # loaded CPU an epoch of 25 iterations can outlast the whole budget, so an epoch-end check
        # would overshoot it several times over
        self.on_train_start()
        started, iterations, over = time.time(), 0, False
        for epoch in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = []
            for batch_id in range(self.num_iterations_per_epoch):
                train_outputs.append(self.train_step(next(self.dataloader_train)))
                iterations += 1
                over = time.time() - started > self.budget_s
                if over:
                    break
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = []
                for batch_id in range(self.num_val_iterations_per_epoch):
                    val_outputs.append(self.validation_step(next(self.dataloader_val)))
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
            if over:
                break
        seconds = time.time() - started
        self.on_train_end()
        with open(os.path.join(self.output_folder, "wallclock.json"), "w") as handle:
            json.dump({"epochs": self.current_epoch, "iterations": iterations,
                       "training_seconds": round(seconds, 1)}, handle)

    def perform_actual_validation(self, *args, **kwargs):
        # with fold "all" nnU-Net's final validation would only predict the training scan again
        pass
'''

# timm is required by dynamic-network-architectures only for its transformer networks (Primus, EVA), which
# the default 3d_fullres U-Net never imports; timm in turn pulls torchvision, and PyPI's torchvision is
# built against PyPI's CUDA torch, so with the CPU torch its compiled operators do not load and importing
# it fails ("operator torchvision::nms does not exist"). These two packages are therefore installed
# without their dependencies, and their dependencies are installed from their metadata minus LEFT_OUT.
WITHOUT_DEPS = ("nnunetv2", "dynamic-network-architectures")
LEFT_OUT = ("timm",)
TORCH = "torch==2.13.0"

_REQUIRES = "import importlib.metadata as m, json, sys; print(json.dumps(m.requires(sys.argv[1]) or []))"


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


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


def install(python: str, stage) -> bool:
    """The CPU torch, nnunetv2 and its dependencies without LEFT_OUT (see WITHOUT_DEPS)."""
    pip = [python, "-m", "pip", "install", "--quiet"]
    # torch first and alone: left to nnunetv2's requirement, pip would pull a multi-GB CUDA build
    if not stage("install torch", pip + [TORCH]):
        return False
    pending, others = ["nnunetv2"], []
    while pending:
        requirement = pending.pop(0)
        if not stage(f"install {_name(requirement)} without dependencies", pip + ["--no-deps", requirement]):
            return False
        listed = subprocess.run([python, "-c", _REQUIRES, _name(requirement)], capture_output=True, text=True)
        for dependency in json.loads(listed.stdout or "[]"):
            if "extra ==" in dependency or _name(dependency) in LEFT_OUT:
                continue
            if _name(dependency) in WITHOUT_DEPS:
                pending.append(dependency)
            elif dependency not in others:
                others.append(dependency)
    return stage("install dependencies", pip + [TORCH] + others)


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
              "stops after the first training iteration past budget_s of training; no final validation; "
              "everything else nnU-Net's defaults"}

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
        if not install(python, stage):
            return report
    versions = subprocess.run([python, "-c", "import importlib.metadata as m, json; print(json.dumps({n: m.version(n) "
                               "for n in ('nnunetv2', 'torch', 'dynamic_network_architectures')}))"],
                              capture_output=True, text=True).stdout.strip()
    report["versions"] = json.loads(versions or "{}")
    package = subprocess.run([python, "-c", "import nnunetv2, os; print(os.path.dirname(nnunetv2.__file__))"],
                             capture_output=True, text=True).stdout.strip()
    # nnU-Net finds a trainer by importing the modules of nnUNetTrainer/ before descending into its
    # subpackages; placed there, the trainer is found before primus/ (which imports timm) is imported
    trainer_dir = os.path.join(package, "training", "nnUNetTrainer")
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
    # the machine's load at the start of training: the budget is wall-clock, so a busy machine buys fewer iterations
    report["load_average_1min_at_train_start"] = round(os.getloadavg()[0], 2)
    if not stage("train", [os.path.join(bin_dir, "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "all",
                           "-tr", "nnUNetTrainerWallclock", "-device", "cpu"], env):
        return report
    trained = os.path.join(results, DATASET_NAME, "nnUNetTrainerWallclock__nnUNetPlans__3d_fullres", "fold_all")
    with open(os.path.join(trained, "wallclock.json"), encoding="utf-8") as handle:
        report["training"] = json.load(handle)
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
