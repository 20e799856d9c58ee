"""Shared fixtures: the shipped sample CT, small real datasets cut from it, tiny training settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE_DIR = os.path.join(REPO_ROOT, "ContrastiveSegLib", "sample_data")
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
# The sample CT, its labels and their label table, as the MRML and Slicer-logic tests use them.
SAMPLE_IMAGE = os.path.join(SAMPLE_DIR, "abdomen_ct.nii.gz")
SAMPLE_LABELS = os.path.join(SAMPLE_DIR, "abdomen_ct_labels.nii.gz")
with open(os.path.join(SAMPLE_DIR, "dataset.json"), encoding="utf-8") as _handle:
    SAMPLE_LABEL_TABLE = json.load(_handle)["labels"]


@pytest.fixture(scope="session")
def sample_dir() -> str:
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def sample_label_map() -> dict:
    with open(os.path.join(SAMPLE_DIR, "dataset.json"), encoding="utf-8") as handle:
        return json.load(handle)["labels"]


def write_dataset(folder: str, cases: dict, labels: dict) -> str:
    """Write ``{case_id: (image sitk, label sitk)}`` as an MSD-style dataset; returns the folder."""
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
    training = []
    for case_id, (image, label) in cases.items():
        sitk.WriteImage(image, os.path.join(folder, "imagesTr", f"{case_id}.nii.gz"))
        sitk.WriteImage(label, os.path.join(folder, "labelsTr", f"{case_id}.nii.gz"))
        training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    with open(os.path.join(folder, "dataset.json"), "w", encoding="utf-8") as handle:
        json.dump({"name": os.path.basename(folder), "labels": labels, "training": training}, handle)
    return folder


@pytest.fixture(scope="session")
def sample_pieces():
    """The sample CT and its labels cut into three overlapping real cases (sitk images)."""
    image = sitk.ReadImage(os.path.join(SAMPLE_DIR, "abdomen_ct.nii.gz"), sitk.sitkFloat32)
    label = sitk.ReadImage(os.path.join(SAMPLE_DIR, "abdomen_ct_labels.nii.gz"))
    pieces = {}
    for name, (x0, x1, z0, z1) in {"upper": (0, 122, 10, 30), "lower": (0, 122, 0, 20),
                                   "right": (0, 90, 0, 30)}.items():
        pieces[name] = (image[x0:x1, :, z0:z1], label[x0:x1, :, z0:z1])
    return pieces


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, sample_pieces, sample_label_map) -> str:
    """A three-case dataset.json made of real CT pieces with the TotalSegmentator label names."""
    return write_dataset(str(tmp_path_factory.mktemp("data") / "pieces"), sample_pieces, sample_label_map)


TINY_ARGS = ["--model", "unet", "--model-size", "tiny", "--patch", "32,32,16", "--spacing", "6,6,6",
             "--batch-size", "1", "--num-workers", "0", "--lr", "3e-3"]


def run_cli(args, cwd=None, env=None, timeout=600):
    """Run ``python -m ContrastiveSegLib ARGS``; returns the CompletedProcess (text)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", "ContrastiveSegLib"] + [str(a) for a in args], cwd=cwd or REPO_ROOT,
                          env=full_env, capture_output=True, encoding="utf-8", errors="replace",
                          timeout=timeout)


def run_torchrun(args, processes=2, timeout=600, script=None):
    """``torchrun --standalone --nproc_per_node N -m ContrastiveSegLib ARGS`` on the CPU (gloo), one thread a rank.

    ``script``: run this Python file in every rank instead of the command line.
    """
    entry = [str(script)] if script else ["-m", "ContrastiveSegLib"]
    command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] + entry + \
        [str(a) for a in args]
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    return subprocess.run([sys.executable] + command, cwd=REPO_ROOT, env=full_env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=timeout)


def assert_pretrain_stop_and_resume_match(make_config, tmp_path, total_steps: int, stop_at: int = 2) -> None:
    """A run stopped (STOP file) at ``stop_at`` and resumed ends with the same weights as a straight run."""
    import torch

    from ContrastiveSegLib.engine.checkpoint import load_checkpoint
    from ContrastiveSegLib.pretrain import run_pretrain

    run_pretrain(make_config(), str(tmp_path / "straight"), progress=False)
    stopped = tmp_path / "stopped"

    def stop(event):
        if event["event"] == "step" and event["step"] == stop_at:
            (stopped / "STOP").write_text("")

    assert run_pretrain(make_config(), str(stopped), listeners=[stop], progress=False)["step"] == stop_at
    assert run_pretrain(make_config(), str(stopped), resume=True, progress=False)["step"] == total_steps
    straight = load_checkpoint(str(tmp_path / "straight" / "checkpoints" / "last.pt"))
    resumed = load_checkpoint(str(stopped / "checkpoints" / "last.pt"))
    for part in ("model", "extra"):
        for key in straight[part]:
            torch.testing.assert_close(straight[part][key], resumed[part][key], rtol=1e-5, atol=1e-6, msg=key)


def tiny_config(datasets, labels, max_steps=4, val_datasets=(), **train):
    """A RunConfig for in-process runs: tiny U-Net, coarse 6 mm grid, single-threaded loading."""
    from ContrastiveSegLib.config import RunConfig

    config = RunConfig(command="finetune", device="cpu")
    config.model.architecture, config.model.size, config.model.patch_size = "unet", "tiny", (32, 32, 16)
    config.preprocess.spacing = (6.0, 6.0, 6.0)
    config.data.datasets = list(datasets)
    config.data.val_datasets = list(val_datasets)
    config.data.labels = list(labels)
    config.train.max_steps, config.train.batch_size, config.train.num_workers = max_steps, 1, 0
    config.train.lr, config.train.val_every, config.train.checkpoint_every = 3e-3, 0, 0
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


def make_scene():
    """An empty MRML scene (slicer-core) with a colour logic, as Slicer's application gives one."""
    import slicer

    scene = slicer.vtkMRMLScene()
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLScene(scene)
    scene._color_logic = color_logic   # the logic must live as long as the scene
    return scene


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


# Tests of tiny tensors: one thread per process is faster than two that spin against each other
# (and against anything else running on a two-core machine).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's in-process tests on one torch thread (use with ``pytest.mark.usefixtures``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
