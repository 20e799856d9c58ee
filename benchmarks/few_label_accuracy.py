"""Few-label accuracy: the demo task with the recipe before and after each of its changes.

    python benchmarks/few_label_accuracy.py [--steps 400] [--seeds 0,1,2] [--variants old,zscore,spatial,new]
                                            [--out few-label-accuracy] [--nnunet]

The demo task (``contrastiveseg demo``): a small U-Net at 3 mm trained on patient A (the shipped
``abdomen_ct``, one labelled scan) for liver, spleen, stomach and aorta, scored on patient B (the
held-out DICOM series, never trained on) with ``evaluate`` on B's own grid, using the *last*
checkpoint.  Nothing is chosen on B: the benchmark does not validate on it at all, and the
post-processing rule is chosen on the training scan.

Training variants (each trained once per seed, same steps, same seeds, same machine, one after another):

* ``old``: the recipe before issue 11: CT window [-150, 250] HU -> [0, 1], intensity-only augmentation;
* ``zscore``: ``old`` with ``--intensity ct_zscore`` (change 1 alone);
* ``spatial``: ``old`` with the spatial augmentation (change 2 alone);
* ``new``: both; ``new_mirror``: both, plus mirroring along every axis (so that TTA has axes to flip);
* ``phase``: ``old`` with contrast-phase augmentation (``--contrast-phase-prob 0.5``), also with the
  spatial augmentation (``phase_spatial``) or ``ct_zscore`` (``phase_zscore``);
* ``thin``: ``old`` with a 96 x 96 x 16 patch instead of 64 x 64 x 32 (``thin_phase``: and ``phase``);
* ``gas``: ``old`` with gas in hollow organs (``--hollow-organ-gas-prob 0.5``; ``phase_gas``: and ``phase``;
  ``gas_spatial``: and the spatial augmentation; ``gas_batchdice``: and nnU-Net's batch Dice, ``--dice batch``;
  ``gas_wide``: with a 128 x 128 x 16 patch, the trunk's whole width);
* ``gas_spatial_thin``: ``gas_spatial`` with thin scans simulated (``--thin-scan-prob 0.5``; it needs the
  ends continued, so its ``plain`` and ``+pp`` rows already continue them); ``gas_spatial_vessel``: with
  contrast in vessels (``--vessel-contrast-prob 0.5``), the demo's recipe; ``gas_spatial_vessel_gin``: that
  and random intensity networks (``--gin-prob 0.5``); ``gas_spatial_vessel_enhance``: that and enhancing
  tissue (``--tissue-enhancement-prob 0.5``); ``gas_spatial_vessel_tversky``: the demo's recipe with
  Tversky's index for the Dice term (``--dice tversky``); ``gas_spatial_vessel_swa``: the demo's recipe with
  the weights averaged over the second half of training (``--average-weights-from 0.5``);
  ``gas_spatial_vessel_base``: the demo's recipe on the U-Net of size ``base`` (twice the channels, about
  3.7 x the CPU time a step; ``_tiny``: a quarter of the small one's channels); ``gas_spatial_vessel_lr1e3``
  and ``_lr1e2``: the demo's recipe at lr 1e-3 or 1e-2 instead of its 3e-3; ``gas_spatial_vessel_batch4``: four
  patches a step instead of two (``--steps 400`` sees as many patches as the recipe's 800);
  ``slicer_cpu_before``: what the Slicer module trained on a CPU before its settings took ``--recipe
  few-label`` (the demo's network and grid with ``finetune``'s defaults; its 400 steps are ``--steps 400``).
* ``gas_spatial_vessel_mr``: the demo's recipe trained on patient A and the sample MR (``sample_data/mr``, a
  third patient, brought onto A's HU scale by ``finetune``); ``gas_spatial_vessel_oracle_b``: its positive
  control, A and patient B itself, a leak by construction that shows what a second scan can be worth, never
  a result.

``--init CKPT`` starts every run from a pre-training checkpoint (``finetune --init``), its encoder at
``--encoder-lr-scale S`` x lr (default: ``finetune``'s 0.1, as every earlier ``--init`` run; ``--recipe
few-label`` now trains it at 1.0, docs/few-label-accuracy.md section 23).

Every variant but ``gas_spatial_thin`` predicts with the scan's ends as air (``--beyond-scan-ends air``,
what every run did before the setting existed); the rows ``+continue`` and ``+pp+continue`` score the same networks with the ends
continued, today's default.  ``--rescore OUT ...`` scores runs trained by an earlier invocation again;
with ``--ensemble K``, also ensembles of K of an arm's networks (``predict --model RUN RUN ...``); with
``--background-weights W,...``, also the rows ``+pp+continue bg W``: the background's probability multiplied
by W before the arg-max (``predict --background-weight W``), written to ``RESCORED_BACKGROUND.json``.

Rows scored from each trained model (no retraining): ``plain``; ``+pp``, the largest-component rule
chosen on patient A; ``+pp+tta``, that and ``predict --tta`` (flips along the trained mirror axes:
none unless mirrored); and for ``old`` also ``+tta_all_axes``, the previous TTA (8 flips, left-right
included) on a network never trained mirrored.

Each training runs in its own process, which reports its train and predict seconds and peak resident
memory.  Seconds are comparable only within one invocation on one machine.  Writes ``RESULTS.json``
and ``dice.png`` into ``--out``.

``--selftrain-from OUT --unlabeled-root DATA`` self-trains each network an earlier invocation trained into
``OUT`` (``selftrain --init RUN/checkpoints/last.pt``: the network is the baseline) for one round of
``--steps`` steps, with the network's own recipe (augmentation, gas, vessels) and one pair of patches a step,
the same two patches a step as the recipe's batch; two arms, paired: ``selftrain``, with the three LIDC chest
CTs of ``DATA/lidc`` (three further patients, neither A nor B) as unlabelled scans, and ``selftrain_none``,
the same round with every unlabelled scan filtered out (``agreement_threshold`` 1: labelled pairs only), so
that the difference is what the unlabelled scans bring.  Rows as above; ``RESULTS.json`` in ``--out``.

``--nnunet`` additionally trains nnU-Net v2 on the same scan for the wall-clock of the slowest
training of the invocation (see ``nnunet_baseline``) in a virtual environment of its own, and scores it the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# The patch before issue 11's measurements (64 x 64 x 32, the demo's until then) is written out, so that a
# variant does not change when the demo's own settings do.
OLD_PATCH = (64, 64, 32)
THIN_PATCH = (96, 96, 16)
WIDE_PATCH = (128, 128, 16)   # 384 mm across at 3 mm: the whole trunk's width in one window
# Every variant below trains as before the scan-end setting existed and predicts with its ends as air; the
# rows "+continue" score the same networks with the ends continued (an inference-time setting).
# The demo's recipe (``--recipe few-label`` on the demo's network): the variants that change one thing of it
# are written as RECIPE plus that change.
RECIPE = {"intensity": "ct_window", "augmentation": "spatial", "mirror_axes": (), "patch": OLD_PATCH,
          "hollow_organ_gas_prob": 0.5, "vessel_contrast_prob": 0.5}
VARIANTS = {
    "old": {"intensity": "ct_window", "augmentation": "intensity", "mirror_axes": (), "patch": OLD_PATCH},
    "zscore": {"intensity": "ct_zscore", "augmentation": "intensity", "mirror_axes": (), "patch": OLD_PATCH},
    "spatial": {"intensity": "ct_window", "augmentation": "spatial", "mirror_axes": (), "patch": OLD_PATCH},
    "new": {"intensity": "ct_zscore", "augmentation": "spatial", "mirror_axes": (), "patch": OLD_PATCH},
    "new_mirror": {"intensity": "ct_zscore", "augmentation": "spatial", "mirror_axes": (0, 1, 2), "patch": OLD_PATCH},
    "phase": {"intensity": "ct_window", "augmentation": "intensity", "mirror_axes": (), "patch": OLD_PATCH,
              "contrast_phase_prob": 0.5},
    "phase_spatial": {"intensity": "ct_window", "augmentation": "spatial", "mirror_axes": (), "patch": OLD_PATCH,
                      "contrast_phase_prob": 0.5},
    "phase_zscore": {"intensity": "ct_zscore", "augmentation": "intensity", "mirror_axes": (), "patch": OLD_PATCH,
                     "contrast_phase_prob": 0.5},
    "thin": {"intensity": "ct_window", "augmentation": "intensity", "mirror_axes": (), "patch": THIN_PATCH},
    "thin_phase": {"intensity": "ct_window", "augmentation": "intensity", "mirror_axes": (), "patch": THIN_PATCH,
                   "contrast_phase_prob": 0.5},
    "gas": {"intensity": "ct_window", "augmentation": "intensity", "mirror_axes": (), "patch": OLD_PATCH,
            "hollow_organ_gas_prob": 0.5},
    "gas_spatial": {"intensity": "ct_window", "augmentation": "spatial", "mirror_axes": (), "patch": OLD_PATCH,
                    "hollow_organ_gas_prob": 0.5},
    "gas_batchdice": {"intensity": "ct_window", "augmentation": "intensity", "mirror_axes": (), "patch": OLD_PATCH,
                      "hollow_organ_gas_prob": 0.5, "dice": "batch"},
    "gas_wide": {"intensity": "ct_window", "augmentation": "intensity", "mirror_axes": (), "patch": WIDE_PATCH,
                 "hollow_organ_gas_prob": 0.5},
    "gas_spatial_thin": {"intensity": "ct_window", "augmentation": "spatial", "mirror_axes": (), "patch": OLD_PATCH,
                         "hollow_organ_gas_prob": 0.5, "thin_scan_prob": 0.5, "beyond_scan_ends": "continue"},
    "gas_spatial_vessel": RECIPE,
    "gas_spatial_vessel_gin": dict(RECIPE, gin_prob=0.5),
    "gas_spatial_vessel_enhance": dict(RECIPE, tissue_enhancement_prob=0.5),
    "gas_spatial_vessel_tversky": dict(RECIPE, dice="tversky"),
    "gas_spatial_vessel_swa": dict(RECIPE, average_weights_from=0.5),
    "gas_spatial_vessel_base": dict(RECIPE, model_size="base"),
    "gas_spatial_vessel_tiny": dict(RECIPE, model_size="tiny"),
    "gas_spatial_vessel_lr1e3": dict(RECIPE, lr=1e-3),
    "gas_spatial_vessel_lr1e2": dict(RECIPE, lr=1e-2),
    "gas_spatial_vessel_batch4": dict(RECIPE, batch_size=4),
    # Each patch rotated and, apart, zoomed with probability 0.5 (elastic at half), not nnU-Net's 0.2.
    "gas_spatial_vessel_spatialprob05": dict(RECIPE, spatial_prob=0.5),
    # The stomach enlarged or shrunk about its centre (linear 0.9-1.6) in half the patches.
    "gas_spatial_vessel_filling": dict(RECIPE, organ_filling_prob=0.5),
    # A second labelled patient: the sample MR (a third patient), brought onto patient A's HU scale by finetune
    # (its dataset says "modality": MR; data.preprocess.ct_units).
    "gas_spatial_vessel_mr": dict(RECIPE, second_scan="mr"),
    # The positive control of a second scan, not a result: patient B itself, the test patient, trained on with
    # A. A benchmark that cannot turn a second scan into Dice on B would show no gain here either.
    "gas_spatial_vessel_oracle_b": dict(RECIPE, second_scan="patient_b"),
    # What the Slicer module's CPU settings trained before they took --recipe few-label: the demo's network and
    # grid with finetune's defaults (lr 1e-4, no warm-up, intensity augmentation, 67 % of patches on organs).
    "slicer_cpu_before": {"intensity": "ct_window", "augmentation": "intensity", "mirror_axes": (), "patch": OLD_PATCH,
                          "lr": 1e-4, "warmup_steps": 0, "foreground_ratio": 0.67},
    "phase_gas": {"intensity": "ct_window", "augmentation": "intensity", "mirror_axes": (), "patch": OLD_PATCH,
                  "contrast_phase_prob": 0.5, "hollow_organ_gas_prob": 0.5},
}


SAMPLE_DATA = os.path.join(ROOT, "ContrastiveSegLib", "sample_data")
# What a variant's "second_scan" trains on with patient A.
SECOND_SCANS = {"mr": os.path.join(SAMPLE_DATA, "mr", "dataset.json"),
                "patient_b": os.path.join(SAMPLE_DATA, "heldout", "dataset.json")}


def variant_config(variant: str, seed: int, steps: int, init: str = "", encoder_lr_scale=None):
    """The demo's settings with ``variant``'s recipe, no validation on patient B, the rule chosen on A.

    A variant with a ``second_scan`` also trains on that dataset (``SECOND_SCANS``).

    ``init``: a pre-training checkpoint to start from (``finetune --init``; the encoder at
    ``encoder_lr_scale`` x lr; None: ``finetune``'s default of 0.1, which every ``--init`` run of the docs
    before section 23 trained with, so that their commands still reproduce them; ``--recipe few-label``
    now sets 1.0, given here as ``--encoder-lr-scale 1.0``).
    """
    from ContrastiveSegLib.demo import demo_config

    config = demo_config(quick=False, device="cpu", max_steps=steps)
    settings = VARIANTS[variant]
    config.preprocess.intensity = settings["intensity"]
    config.preprocess.intensity_stats = None
    config.train.augmentation = settings["augmentation"]
    config.train.mirror_axes = tuple(settings["mirror_axes"])
    config.model.patch_size = tuple(settings["patch"])
    config.model.size = settings.get("model_size", config.model.size)
    config.train.contrast_phase_prob = settings.get("contrast_phase_prob", 0.0)
    config.train.hollow_organ_gas_prob = settings.get("hollow_organ_gas_prob", 0.0)
    config.train.dice = settings.get("dice", "sample")
    config.train.thin_scan_prob = settings.get("thin_scan_prob", 0.0)
    config.train.vessel_contrast_prob = settings.get("vessel_contrast_prob", 0.0)
    config.train.gin_prob = settings.get("gin_prob", 0.0)
    config.train.tissue_enhancement_prob = settings.get("tissue_enhancement_prob", 0.0)
    config.train.average_weights_from = settings.get("average_weights_from", 0.0)
    for name in ("lr", "warmup_steps", "foreground_ratio", "batch_size", "spatial_prob", "organ_filling_prob"):   # the demo's unless the variant says otherwise
        if name in settings:
            setattr(config.train, name, settings[name])
    config.preprocess.beyond_scan_ends = settings.get("beyond_scan_ends", "air")
    config.init_checkpoint = init or None
    config.train.encoder_lr_scale = encoder_lr_scale   # None: finetune's 0.1 with --init, as every earlier run
    config.train.seed = seed
    config.train.val_every = 0
    config.train.checkpoint_every = 0
    config.data.val_datasets = []
    if "second_scan" in settings:
        config.data.datasets = list(config.data.datasets) + [SECOND_SCANS[settings["second_scan"]]]
    config.postprocess.choose_on = "training"
    return config


def run_one(variant: str, seed: int, steps: int, out: str, threads: int = 0, init: str = "",
            encoder_lr_scale=None) -> dict:
    """Train one variant with one seed into ``out``, score every row; the result as a dict."""
    import warnings

    import torch

    from ContrastiveSegLib.engine.inference import load_model
    from ContrastiveSegLib.finetune import run_finetune

    warnings.filterwarnings("ignore")
    if threads:
        torch.set_num_threads(threads)
    run_dir = os.path.join(out, "run")
    started = time.perf_counter()
    run_finetune(variant_config(variant, seed, steps, init, encoder_lr_scale), run_dir, progress=False)
    train_seconds = time.perf_counter() - started
    model = load_model(run_dir, torch.device("cpu"), checkpoint="last")
    rows = score_rows(model, variant, out)
    return {"variant": variant, "seed": seed, "steps": steps, "init": init or None,
            "encoder_lr_scale": model.config.train.encoder_lr_scale,
            "train_seconds": round(train_seconds, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "postprocess": model.postprocess, "rows": rows,
            "intensity_stats": model.config.preprocess.intensity_stats}


def score_rows(model, variant: str, out: str, background_weights=()) -> dict:
    """Every row of one trained model on patient B: {row: {"dice", "mean_dice", "predict_seconds"}}.

    ``plain`` and ``+pp`` (the largest-component rule chosen on A); ``+pp+tta`` when the run trained
    mirrored; ``+continue`` and ``+pp+continue`` when it predicts with the scan's ends as air (the same
    network, the ends continued); ``+tta_all_axes`` for ``old``; ``+pp+continue bg W`` for each of
    ``background_weights`` (the background's probability times W before the arg-max).
    """
    from ContrastiveSegLib.demo import score_heldout

    decision, preprocess = model.postprocess, model.config.preprocess
    rows = {}

    def score(row: str, tta: bool = False, postprocess=None, mirror_axes=None, ends=None, background_weight=1.0):
        model.postprocess = postprocess
        saved_axes, saved_ends = model.config.train.mirror_axes, preprocess.beyond_scan_ends
        if mirror_axes is not None:
            model.config.train.mirror_axes = mirror_axes
        if ends is not None:
            preprocess.beyond_scan_ends = ends
        # A weighted row writes its prediction into a folder of its own: the run's heldout_prediction stays
        # that of a row scored as trained.
        folder = out if background_weight == 1.0 else os.path.join(out, f"background-weight-{background_weight:g}")
        os.makedirs(folder, exist_ok=True)
        begin = time.perf_counter()
        metrics = score_heldout(model, folder, flip_tta=tta, background_weight=background_weight)[0]
        model.config.train.mirror_axes, preprocess.beyond_scan_ends = saved_axes, saved_ends
        rows[row] = {"dice": metrics["dice"], "mean_dice": metrics["mean_dice"],
                     "predict_seconds": round(time.perf_counter() - begin, 2)}

    score("plain")
    score("+pp", postprocess=decision)
    if tuple(model.config.train.mirror_axes):
        score("+pp+tta", tta=True, postprocess=decision)
    if preprocess.beyond_scan_ends == "air":
        score("+continue", ends="continue")
        score("+pp+continue", postprocess=decision, ends="continue")
    if variant == "old":
        score("+tta_all_axes", tta=True, mirror_axes=(0, 1, 2))
    for weight in background_weights:
        score(f"+pp+continue bg {weight:g}", postprocess=decision, ends="continue", background_weight=weight)
    model.postprocess = decision
    return rows


SELFTRAIN_ARMS = {"selftrain": None, "selftrain_none": 1.0}   # arm -> agreement threshold (1: none kept)
UNLABELED_SCANS = ("lidc_0001.nii.gz", "lidc_0002.nii.gz", "lidc_0003.nii.gz")


def selftrain_one(baseline_run: str, arm: str, steps: int, out: str, unlabeled_root: str, threads: int = 0) -> dict:
    """Self-train one network of an earlier invocation (its run folder ``baseline_run``) into ``out``; the
    result as a dict, rows as ``run_one``'s."""
    import warnings

    import torch

    from ContrastiveSegLib.config import RunConfig
    from ContrastiveSegLib.engine.inference import load_model
    from ContrastiveSegLib.selftrain import run_selftrain, selftrain_settings

    warnings.filterwarnings("ignore")
    if threads:
        torch.set_num_threads(threads)
    with open(os.path.join(baseline_run, "config.json"), encoding="utf-8") as handle:
        config = RunConfig.from_dict(json.load(handle))
    # A folder of the unlabelled scans alone (lidc/ also holds lung masks, which are not scans).
    scans = os.path.join(out, "unlabeled")
    os.makedirs(scans, exist_ok=True)
    for name in UNLABELED_SCANS:
        link = os.path.join(scans, name)
        if not os.path.exists(link):
            os.symlink(os.path.abspath(os.path.join(unlabeled_root, "lidc", name)), link)
    config.command = "selftrain"
    config.data.datasets = [os.path.join(ROOT, "ContrastiveSegLib", "sample_data", "dataset.json")]   # patient A
    config.data.unlabeled = [scans]
    config.data.val_datasets = []
    config.init_checkpoint = os.path.join(baseline_run, "checkpoints", "last.pt")
    config.method = selftrain_settings(rounds=1, agreement_threshold=SELFTRAIN_ARMS[arm])
    config.train.max_steps = steps
    config.train.batch_size = 1   # one pair = two patches a step, as the recipe's batch of two
    run_dir = os.path.join(out, "run")
    started = time.perf_counter()
    run_selftrain(config, run_dir, progress=False)
    train_seconds = time.perf_counter() - started
    model = load_model(run_dir, torch.device("cpu"), checkpoint="last")
    rows = score_rows(model, arm, out)
    with open(os.path.join(run_dir, "selftrain.json"), encoding="utf-8") as handle:
        plan = json.load(handle)
    return {"variant": arm, "seed": int(config.train.seed), "steps": steps, "baseline": baseline_run,
            "train_seconds": round(train_seconds, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "postprocess": model.postprocess, "rows": rows, "selftrain": plan}


def rescore(folder: str, background_weights=()) -> list:
    """Score every trained run under ``folder`` (``VARIANT-seedS/run``, as this benchmark writes them) again,
    with today's rows; the runs' training is not repeated (train seconds are kept from RESULTS.json)."""
    import glob

    import torch

    from ContrastiveSegLib.engine.inference import load_model

    results = []
    for run_dir in sorted(glob.glob(os.path.join(folder, "*-seed*", "run"))):
        name = os.path.basename(os.path.dirname(run_dir))
        variant, seed = name.rsplit("-seed", 1)
        model = load_model(run_dir, torch.device("cpu"), checkpoint="last")
        rows = score_rows(model, variant, os.path.dirname(run_dir), background_weights)
        init = model.config.init_checkpoint
        # A run started from pre-training is its own arm: its rows are not averaged with scratch's.
        label = f"{variant} from {os.path.basename(os.path.dirname(os.path.dirname(init)))}" if init else variant
        results.append({"variant": label, "seed": int(seed), "run": run_dir, "init": init, "train_seconds": 0.0,
                        "rows": rows})
        print(f"{name}: " + ", ".join(f"{row} {values['mean_dice']:.3f}" for row, values in rows.items()),
              file=sys.stderr, flush=True)
    return results


def score_ensembles(results: list, size: int) -> list:
    """Ensembles of ``size`` networks of one arm (``rescore``'s results): disjoint groups of consecutive
    seeds, each scored with the ends continued as ``+continue`` (probabilities averaged) and
    ``+pp+continue`` (the largest-component rule where every member chose it).  An ensemble costs its
    size in training time: compare it with single networks trained ``size`` times as long."""
    import torch

    from ContrastiveSegLib.demo import score_heldout
    from ContrastiveSegLib.engine.inference import common_postprocessing, load_ensemble

    arms = {}
    for result in sorted(results, key=lambda r: (r["variant"], r["seed"])):
        arms.setdefault(result["variant"], []).append(result)
    ensembles = []
    for arm, members in arms.items():
        for start in range(0, len(members) - size + 1, size):
            group = members[start:start + size]
            models = load_ensemble([m["run"] for m in group], torch.device("cpu"), checkpoint="last")
            for model in models:
                model.config.preprocess.beyond_scan_ends = "continue"
            decision = common_postprocessing(models)
            seeds = [m["seed"] for m in group]
            # Its own folder beside the members': score_heldout writes the prediction there, and a member's
            # folder would have its own prediction overwritten.
            out = os.path.join(os.path.dirname(os.path.dirname(group[0]["run"])),
                               f"{arm.replace(' ', '-')}-ensemble-seeds{'-'.join(str(s) for s in seeds)}")
            os.makedirs(out, exist_ok=True)
            rows = {}
            for row, postprocess in (("+continue", None), ("+pp+continue", decision)):
                for model in models:
                    model.postprocess = postprocess
                begin = time.perf_counter()
                metrics = score_heldout(models, out)[0]
                rows[row] = {"dice": metrics["dice"], "mean_dice": metrics["mean_dice"],
                             "predict_seconds": round(time.perf_counter() - begin, 2)}
            ensembles.append({"variant": f"{arm} ensemble of {size}", "seed": seeds[0], "seeds": seeds,
                              "runs": [m["run"] for m in group], "train_seconds": 0.0, "rows": rows})
            print(f"{arm} seeds {seeds}: " + ", ".join(f"{row} {values['mean_dice']:.3f}"
                                                      for row, values in rows.items()), file=sys.stderr, flush=True)
    return ensembles


def summarise(results: list) -> dict:
    """Per (variant, row): per-organ and mean Dice as mean and standard deviation over seeds."""
    import numpy as np

    table = {}
    for result in results:
        for row, values in result["rows"].items():
            entry = table.setdefault(f"{result['variant']} {row}", {"dice": {}, "mean_dice": [], "train_seconds": [],
                                                                     "predict_seconds": []})
            for organ, value in values["dice"].items():
                entry["dice"].setdefault(organ, []).append(value)
            entry["mean_dice"].append(values["mean_dice"])
            entry["train_seconds"].append(result["train_seconds"])
            entry["predict_seconds"].append(values["predict_seconds"])
    summary = {}
    for key, entry in table.items():
        summary[key] = {
            "seeds": len(entry["mean_dice"]),
            "mean_dice": [round(float(np.mean(entry["mean_dice"])), 3), round(float(np.std(entry["mean_dice"])), 3)],
            "dice": {organ: [round(float(np.mean(v)), 3), round(float(np.std(v)), 3)]
                     for organ, v in entry["dice"].items()},
            "min_organ": round(float(min(np.mean(v) for v in entry["dice"].values())), 3),
            "train_seconds": round(float(np.mean(entry["train_seconds"])), 1),
            "predict_seconds": round(float(np.mean(entry["predict_seconds"])), 2),
        }
    return summary


def markdown_table(summary: dict) -> str:
    """The summary as a Markdown table: Dice mean +- sd over seeds per organ, the mean, the worst organ."""
    organs = list(next(iter(summary.values()))["dice"])
    lines = ["| recipe, row | " + " | ".join(organs) + " | mean | worst organ | train s | predict s |",
             "|---" * (len(organs) + 5) + "|"]
    for key, entry in summary.items():
        cells = [f"{entry['dice'][o][0]:.3f} +- {entry['dice'][o][1]:.3f}" for o in organs]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | **{entry['mean_dice'][0]:.3f}** +- "
                     f"{entry['mean_dice'][1]:.3f} | {entry['min_organ']:.3f} | {entry['train_seconds']:.0f} | "
                     f"{entry['predict_seconds']:.0f} |")
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(summary)
    organs = list(next(iter(summary.values()))["dice"])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(keys)), 4))
    width = 0.8 / (len(organs) + 1)
    for index, organ in enumerate(organs + ["mean"]):
        values = [summary[k]["mean_dice"] if organ == "mean" else summary[k]["dice"][organ] for k in keys]
        ax.bar([i + index * width for i in range(len(keys))], [v[0] for v in values], width,
               yerr=[v[1] for v in values], label=organ, capsize=2)
    ax.set_xticks([i + 0.4 for i in range(len(keys))])
    ax.set_xticklabels(keys, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Dice on patient B (mean +- sd over seeds)")
    ax.set_ylim(0, 1)
    ax.axhline(0.7, color="grey", linewidth=0.5)
    ax.legend(fontsize=7, ncol=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="training steps of every run (default: the demo's 400)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="old,zscore,spatial,new")
    parser.add_argument("--out", default="few-label-accuracy")
    parser.add_argument("--nnunet", action="store_true", help="also train and score nnU-Net v2 (see nnunet_baseline)")
    parser.add_argument("--parallel", type=int, default=1, help="seeds trained at the same time (default: 1)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per training process (0: torch's default; 1 is faster on a busy CPU)")
    parser.add_argument("--init", default="", metavar="CKPT",
                        help="start every run from this pre-training checkpoint (finetune --init; default: scratch)")
    parser.add_argument("--encoder-lr-scale", type=float, default=None, metavar="S",
                        help="the encoder trains at S x lr (finetune --encoder-lr-scale; default: finetune's, "
                             "0.1 with --init, 1.0 without)")
    parser.add_argument("--table", metavar="RESULTS_JSON", help="print a RESULTS.json's summary as Markdown and stop")
    parser.add_argument("--rescore", nargs="+", metavar="OUT",
                        help="score the runs an earlier invocation trained into OUT again, with every row; writes "
                             "RESCORED.json and prints the table (no training)")
    parser.add_argument("--ensemble", type=int, default=0, metavar="K",
                        help="with --rescore: also score ensembles of K networks of each arm (disjoint groups of "
                             "consecutive seeds, their probabilities averaged)")
    parser.add_argument("--background-weights", default="", metavar="W,W,...",
                        help="with --rescore: also score each network with the background's probability times W "
                             "before the arg-max, for each W (predict --background-weight); writes "
                             "RESCORED_BACKGROUND.json")
    parser.add_argument("--selftrain-from", metavar="OUT",
                        help="self-train each network trained into OUT by an earlier invocation for one round of "
                             "--steps steps, with and without the unlabelled LIDC scans (arms selftrain, "
                             "selftrain_none); needs --unlabeled-root")
    parser.add_argument("--unlabeled-root", metavar="DATA",
                        help="with --selftrain-from: the data folder whose lidc/ holds lidc_0001-0003.nii.gz")
    parser.add_argument("--one-selftrain", nargs=2, metavar=("RUN", "ARM"), help=argparse.SUPPRESS)
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    if args.table:
        with open(args.table, encoding="utf-8") as handle:
            print(markdown_table(json.load(handle)["summary"]))
        return 0
    if args.rescore:
        import warnings

        warnings.filterwarnings("ignore")
        weights = [float(w) for w in args.background_weights.split(",") if w]
        results = [result for folder in args.rescore for result in rescore(os.path.abspath(folder), weights)]
        if args.ensemble > 1:
            results += score_ensembles(results, args.ensemble)
        summary = summarise(results)
        name = "RESCORED_BACKGROUND.json" if weights else "RESCORED.json"
        with open(os.path.join(os.path.abspath(args.rescore[0]), name), "w", encoding="utf-8") as handle:
            json.dump({"command": "python benchmarks/few_label_accuracy.py " + " ".join(sys.argv[1:]),
                       "results": results, "summary": summary}, handle, indent=1)
        print(markdown_table(summary))
        return 0
    if args.one_selftrain:
        baseline_run, arm = args.one_selftrain
        seed = os.path.basename(os.path.dirname(baseline_run)).rsplit("-seed", 1)[1]
        folder = os.path.join(out, f"{arm}-seed{seed}")
        os.makedirs(folder, exist_ok=True)
        print(json.dumps(selftrain_one(baseline_run, arm, args.steps, folder, args.unlabeled_root, args.threads)))
        return 0
    if args.one:
        variant, seed = args.one[0], int(args.one[1])
        folder = os.path.join(out, f"{variant}-seed{seed}")
        os.makedirs(folder, exist_ok=True)
        print(json.dumps(run_one(variant, seed, args.steps, folder, args.threads, args.init, args.encoder_lr_scale)))
        return 0
    os.makedirs(out, exist_ok=True)
    results = []
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    baselines = {}
    if args.selftrain_from:
        import glob

        if not args.unlabeled_root or not all(os.path.exists(os.path.join(args.unlabeled_root, "lidc", name))
                                              for name in UNLABELED_SCANS):
            parser.error(f"--unlabeled-root must be a folder whose lidc/ holds {', '.join(UNLABELED_SCANS)}")
        for run_dir in sorted(glob.glob(os.path.join(os.path.abspath(args.selftrain_from), "*-seed*", "run"))):
            baselines[int(os.path.basename(os.path.dirname(run_dir)).rsplit("-seed", 1)[1])] = run_dir
        seeds = [seed for seed in seeds if seed in baselines]
        variants = list(SELFTRAIN_ARMS)
    lock = threading.Lock()
    report = {}

    def one_seed(seed: int) -> None:
        # Variants of one seed run one after another; --parallel runs several seeds at once.
        for variant in variants:
            command = [sys.executable, os.path.abspath(__file__), "--one", variant, str(seed), "--steps",
                       str(args.steps), "--out", out, "--threads", str(args.threads), "--init", args.init]
            if args.encoder_lr_scale is not None:
                command += ["--encoder-lr-scale", str(args.encoder_lr_scale)]
            if baselines:
                command = [sys.executable, os.path.abspath(__file__), "--one-selftrain", baselines[seed], variant,
                           "--steps", str(args.steps), "--out", out, "--threads", str(args.threads),
                           "--unlabeled-root", os.path.abspath(args.unlabeled_root)]
            completed = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
            if completed.returncode != 0:
                raise RuntimeError(f"{variant} seed {seed} failed:\n{completed.stderr[-3000:]}")
            result = json.loads(completed.stdout.strip().splitlines()[-1])
            with lock:
                results.append(result)
                print(f"{variant} seed {seed}: " + ", ".join(f"{row} {values['mean_dice']:.3f}"
                                                            for row, values in result["rows"].items()),
                      file=sys.stderr, flush=True)
                report.update({"command": "python benchmarks/few_label_accuracy.py " + " ".join(sys.argv[1:]),
                               "task": "train on patient A (sample abdomen_ct), score patient B (held-out DICOM) on "
                                       "B's grid, last checkpoint, nothing chosen on B",
                               "steps": args.steps, "seeds": seeds, "parallel": args.parallel,
                               "threads_per_run": args.threads,
                               "summary": summarise(sorted(results, key=lambda r: (r["variant"], r["seed"]))),
                               "runs": results})
                with open(os.path.join(out, "RESULTS.json"), "w", encoding="utf-8") as handle:
                    json.dump(report, handle, indent=1)

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        for future in [pool.submit(one_seed, seed) for seed in seeds]:
            future.result()
    plot(summarise(results), os.path.join(out, "dice.png"))
    if args.nnunet:
        from nnunet_baseline import run_nnunet_comparison

        # nnU-Net gets the training time of the slowest run of this invocation (every variant trains the
        # demo's budget of steps; the slowest is the fairest to nnU-Net).
        budget = max(r["train_seconds"] for r in results)
        report["nnunet"] = run_nnunet_comparison(out, budget)
        with open(os.path.join(out, "RESULTS.json"), "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
