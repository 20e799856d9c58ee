"""``contrastiveseg demo``: the whole pipeline on the shipped sample CT, on a CPU, in minutes.

1. fine-tune a light U-Net on patient A (``sample_data/abdomen_ct.nii.gz``) for
   four organs (``--networks N``: one per seed 0..N-1); patient B is validated
   on along the way, by the first only, so that the training curves show how it
   generalises (the largest-component rule of docs/few-label-accuracy.md is
   chosen on patient A);
2. predict patient B (a DICOM series the network never trained on) onto its
   own grid with the *last* checkpoint (of several networks: their ensemble,
   class probabilities averaged): choosing the best validation checkpoint
   would select the model on the very patient it is scored on;
3. compare with patient B's labels (per-organ Dice; the label grid has its y
   axis flipped, so this also exercises the geometry handling);
4. write the prediction (.nii.gz and Slicer .seg.nrrd), an overlay PNG and a
   training-curve PNG.

The labels of both patients are TotalSegmentator predictions, not manual
ground truth (see sample_data/README.md): the Dice figures show the pipeline
works and how far one training scan gets, not clinical accuracy.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

from .errors import InputError

SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data")
DEMO_ORGANS = ["liver", "spleen", "stomach", "aorta"]
# Networks the demo trains (seeds 0, 1, ...) and predicts patient B with, their probabilities averaged.
# One: an ensemble of three was higher than its members' mean in each of three groups of seeds, but by
# +0.02 on average, for three times the training (docs/few-label-accuracy.md, section 10).
DEMO_NETWORKS = 1


def sample_paths() -> dict:
    return {
        "train_dataset": os.path.join(SAMPLE_DIR, "dataset.json"),
        "heldout_dataset": os.path.join(SAMPLE_DIR, "heldout", "dataset.json"),
        "heldout_image": os.path.join(SAMPLE_DIR, "heldout", "ct_dicom"),
        "heldout_labels": os.path.join(SAMPLE_DIR, "heldout", "ct_dicom_labels.nii.gz"),
    }


def demo_config(quick: bool, device: str, max_steps: Optional[int] = None, seed: int = 0):
    """The demo's settings: a small U-Net at the scans' own 3 mm, sized for two CPU cores."""
    from .config import RunConfig
    from .recipes import apply_recipe

    paths = sample_paths()
    config = RunConfig(command="finetune", device=device)
    config.model.architecture = "unet"
    config.model.size = "small"
    config.model.patch_size = (64, 64, 32)
    config.preprocess.spacing = (3.0, 3.0, 3.0)
    config.data.datasets = [paths["train_dataset"]]
    config.data.val_datasets = [paths["heldout_dataset"]]
    config.data.labels = list(DEMO_ORGANS)
    train = config.train
    train.max_steps = max_steps or (40 if quick else 800)
    train.batch_size = 2
    train.val_every = train.max_steps if quick else 100
    train.checkpoint_every = 100
    train.num_workers = 0   # patches are cheap crops of a cached volume; workers would only compete for 2 cores
    train.seed = seed
    # The few-label recipe (recipes.py; what a user gets with finetune --recipe few-label) as far as it was
    # measured to help on this task (docs/few-label-accuracy.md): gas in the stomach (patient A's holds
    # fluid, B's gas); the spatial augmentation with 800 steps (section 12: 0.577 +- 0.029 over six seeds
    # against 0.514 for intensity-only augmentation at 400 steps); and contrast in the aorta's blood
    # (section 13: 0.674 +- 0.050 over the same six seeds against 0.577, higher in five, level in one;
    # patient A has no contrast, B has).  ct_zscore lowered patient B's Dice; contrast-phase augmentation
    # of whole organs, thin scans simulated, a 96 x 96 x 16 or 128 x 128 x 16 patch, batch Dice and
    # enhancing tissue showed no detectable difference; random intensity networks (GIN), Tversky's index
    # and other structures learnt as classes lowered it (sections 15-18).
    config.preprocess.intensity = "ct_window"
    apply_recipe(config, "few-label")
    if quick:
        train.warmup_steps = 10
    # The largest-component rule is chosen on the training scan, because patient B, the only validation
    # case, is the one scored.  The ends of a scan thinner than the patch are continued (every new run's
    # default).
    config.postprocess.choose_on = "training"
    return config


def heldout_reference_names(names) -> dict:
    """Value -> name of patient B's reference labels, for the organs in ``names`` (the model's table)."""
    import json

    reference_names = {}
    with open(sample_paths()["heldout_dataset"], "r", encoding="utf-8") as handle:
        for key, value in json.load(handle)["labels"].items():
            if key != "0" and value in names.values():
                reference_names[int(key)] = value
    return reference_names


def score_heldout(model, out: str, flip_tta: bool = False, mask_body: bool = True, background_weight: float = 1.0):
    """Predict patient B onto its own grid with ``model`` (or a list of models: their ensemble), write the
    labelmaps into ``out`` and score them.

    Returns ``(metrics, labels_zyx, image, names, reference_names)``; the metrics are ``evaluate``'s,
    on patient B's own grid.
    """
    from .data.io import read_image, write_labelmap
    from .engine.inference import LoadedModel, predict_image
    from .evaluate import evaluate_files
    from .report.colors import colors_for

    paths = sample_paths()
    image = read_image(paths["heldout_image"], as_float32=False)
    labels, _ = predict_image(model, paths["heldout_image"], overlap=0.5, image=image, flip_tta=flip_tta,
                              mask_body=mask_body, background_weight=background_weight)
    first = model if isinstance(model, LoadedModel) else model[0]
    names = {value: name for value, name in first.labels.items() if value != 0}
    colors = colors_for(list(names.values()))
    prediction = os.path.join(out, "heldout_prediction.nii.gz")
    write_labelmap(prediction, labels, image, names=names, colors=colors)
    write_labelmap(os.path.join(out, "heldout_prediction.seg.nrrd"), labels, image, names=names, colors=colors)
    reference_names = heldout_reference_names(names)
    metrics = evaluate_files(prediction, paths["heldout_labels"], names, reference_names)
    return metrics, labels, image, names, reference_names


def demo_run_folders(out: str, networks: int) -> list:
    """The run folder of each network of the demo's ensemble: ``run/`` (seed 0), ``run-seed1/``, ..."""
    return [os.path.join(out, "run" if seed == 0 else f"run-seed{seed}") for seed in range(networks)]


def run_demo(out: str = "demo-output", quick: bool = False, device: str = "auto",
             max_steps: Optional[int] = None, networks: Optional[int] = None) -> dict:
    """Run the demo into ``out``; returns the held-out metrics.

    ``networks`` (default :data:`DEMO_NETWORKS`) networks are trained, with seeds 0, 1, ..., and
    patient B is predicted with their ensemble (probabilities averaged).  Only the first validates on
    patient B, for its training curves.
    """
    import shutil

    from .data.io import read_label_image
    from .engine.device import choose_device
    from .engine.inference import load_ensemble
    from .engine.runfolder import check_writable_folder, write_json_atomic
    from .evaluate import format_table
    from .finetune import run_finetune
    from .report.colors import colors_for
    from .report.curves import save_training_curves
    from .report.overlay import save_overlay_png

    started = time.time()
    out = os.path.abspath(out)
    check_writable_folder(out)
    networks = DEMO_NETWORKS if networks is None else networks
    if networks < 1:
        raise InputError(f"{networks} networks: the demo trains at least one", path="--networks")
    run_dirs = demo_run_folders(out, networks)
    for stale in [os.path.join(out, name) for name in os.listdir(out) if name == "run" or name.startswith("run-seed")]:
        if os.path.exists(os.path.join(stale, "events.jsonl")):
            shutil.rmtree(stale)  # the demo always starts afresh; these folders hold nothing else of the user's
    paths = sample_paths()
    for seed, run_dir in enumerate(run_dirs):
        config = demo_config(quick, device, max_steps, seed=seed)
        if seed > 0:   # patient B's curves come from the first network; the others spend no time on them
            config.data.val_datasets, config.train.val_every = [], 0
        print(f"ContrastiveSeg demo: training small U-Net {seed + 1} of {networks} for {', '.join(DEMO_ORGANS)} "
              f"on one CT ({config.train.max_steps} steps, seed {seed}, device {choose_device(device)})",
              file=sys.stderr)
        run_finetune(config, run_dir)

    models = load_ensemble(run_dirs, choose_device(device), checkpoint="last")
    metrics, labels, image, names, reference_names = score_heldout(models, out)
    metrics["note"] = ("patient B was never trained on and no checkpoint was chosen on it (the last one is scored); "
                       "labels of both patients are TotalSegmentator predictions, not manual ground truth")
    metrics["checkpoint"] = os.path.relpath(models[0].checkpoint, out).replace(os.sep, "/")
    # Every network of the ensemble that was scored (their class probabilities averaged).
    metrics["checkpoints"] = [os.path.relpath(model.checkpoint, out).replace(os.sep, "/") for model in models]
    metrics["training_steps"] = config.train.max_steps
    metrics["seconds"] = round(time.time() - started, 1)
    write_json_atomic(os.path.join(out, "metrics.json"), metrics)

    # The reference on the prediction's grid, for a side-by-side picture.
    import numpy as np
    import SimpleITK as sitk

    from .data.io import resample_label_image

    reference = resample_label_image(read_label_image(paths["heldout_labels"]), image).layers[0]
    by_name = {name: value for value, name in names.items()}
    reference_mapped = np.zeros_like(labels)
    for value, name in reference_names.items():
        reference_mapped[reference == value] = by_name[name]
    spacing_zyx = tuple(reversed(image.GetSpacing()))
    colors = colors_for(list(names.values()))
    save_overlay_png(os.path.join(out, "overlay.png"), sitk.GetArrayFromImage(image), labels, spacing_zyx, names,
                     colors=colors, title="held-out patient: prediction (top) and reference (bottom)",
                     reference_zyx=reference_mapped)
    save_training_curves(os.path.join(run_dirs[0], "events.jsonl"), os.path.join(out, "training_curves.png"))

    print("\nPer-organ Dice on the held-out patient (never trained on; last checkpoint):", file=sys.stderr)
    print(format_table(metrics))
    print(f"\nwrote {out}/: heldout_prediction.nii.gz, heldout_prediction.seg.nrrd, overlay.png, "
          f"training_curves.png, metrics.json, "
          f"{', '.join(os.path.basename(d) + '/' for d in run_dirs)}  ({metrics['seconds']:.0f} s)", file=sys.stderr)
    return metrics
