"""Command line: ``contrastiveseg <command>`` or ``python -m ContrastiveSegLib <command>``.

Exit status: 0 on success (also after a cooperative stop), 2 for bad input
(the message says which file, what is wrong and what to do), 1 for any
other failure.  Both are also written as an ``error`` event when a run folder
is involved.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from typing import List, Optional

from .errors import InputError
from .recipes import RECIPES, apply_recipe

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


class _ArgumentsExcept:
    """A parser's ``add_argument`` that skips the flags in ``omit`` (options a command sets itself)."""

    def __init__(self, parser: argparse.ArgumentParser, omit: tuple):
        self.parser, self.omit = parser, omit

    def add_argument(self, flag: str, **options) -> None:
        if flag not in self.omit:
            self.parser.add_argument(flag, **options)


def _add_common_training_arguments(parser: argparse.ArgumentParser, default_steps: int,
                                   steps_help: str = "optimisation steps", omit: tuple = ()) -> None:
    if omit:
        parser = _ArgumentsExcept(parser, omit)
    parser.add_argument("--out", required=True, metavar="RUN", help="run folder to create (or continue with --resume)")
    parser.add_argument("--model", choices=["unetr", "unet"], default="unetr",
                        help="backbone: UNETR (the papers') or a light convolutional U-Net for CPUs (default: unetr)")
    parser.add_argument("--model-size", choices=["tiny", "small", "base"], default="base",
                        help="network width: base = UNETR paper (ViT-B/16); small for CPUs; tiny for tests (default: base)")
    parser.add_argument("--patch", default="96", help="training patch in voxels, multiples of 16: 96 or 96,96,64 (default: 96)")
    parser.add_argument("--spacing", default="1.5,1.5,2.0", metavar="SX,SY,SZ",
                        help="voxel spacing in mm the volumes are resampled to (default: 1.5,1.5,2.0)")
    parser.add_argument("--intensity", choices=["ct_window", "ct_zscore", "percentile"], default="ct_window",
                        help="ct_window: clip to --window HU and scale to [0,1]; ct_zscore: clip to the 0.5-99.5 %% "
                             "of the training cases' labelled HU and z-score (nnU-Net's CT scheme, statistics saved "
                             "in the run); percentile: 0.5-99.5 %% per image (MR) (default: ct_window)")
    parser.add_argument("--window", default="-150,250", metavar="LOW,HIGH", help="CT window in HU (default: -150,250)")
    parser.add_argument("--beyond-scan-ends", choices=["continue", "air"], default="continue",
                        help="what a sliding window sees past the first and last slice of a scan thinner than the "
                             "patch: continue (its end slices repeated: the body goes on) or air (default: continue)")
    parser.add_argument("--max-steps", type=int, default=default_steps, help=f"{steps_help} (default: {default_steps})")
    parser.add_argument("--batch-size", type=int, default=2, help="patches per step and GPU (default: 2)")
    parser.add_argument("--grad-accumulation", type=int, default=1, help="micro-batches per optimisation step (default: 1)")
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW learning rate (default: 1e-4; 3e-3 for the light U-Net with --recipe few-label)")
    parser.add_argument("--weight-decay", type=float, default=1e-5, help="AdamW weight decay (default: 1e-5)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="linear warm-up before the cosine decay (default: 0; 20 for the light U-Net with "
                             "--recipe few-label)")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    parser.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes (default: 2)")
    parser.add_argument("--val-every", type=int, default=200, help="steps between validations (default: 200)")
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints/last.pt writes (default: 200)")
    parser.add_argument("--cache-dir", default=None, help="keep preprocessed volumes here between runs (default: memory only)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    parser.add_argument("--events-stdout", action="store_true",
                        help="also print every event as one JSON line on stdout (progress bar on stderr)")


# The augmentations turned on by a probability: TrainConfig field (its flag, with dashes) -> help text.
AUGMENTATION_PROBABILITIES = {
    "contrast_phase_prob": "contrast-phase augmentation: each labelled organ of a patch, with probability P, moves "
                           "by its own offset of -100..+200 HU, for scans of another contrast phase than the "
                           "training scans (CT only)",
    "hollow_organ_gas_prob": "gas in hollow organs: each stomach, bowel or oesophagus of a patch, with probability "
                             "P, has its front part turned into gas under a flat level, for scans where it holds "
                             "gas and the training scans' does not (CT only)",
    "vessel_contrast_prob": "contrast in vessels: each aorta or other vessel of a patch, with probability P, has the "
                            "blood inside its wall brightened by 50-300 HU, for scans with intravenous contrast "
                            "when the training scans have none (CT only)",
    "thin_scan_prob": "thin scans: each patch, with probability P, keeps a slab of its middle slices and repeats "
                      "the slab's ends, as predict continues a scan thinner than the patch (needs "
                      "--beyond-scan-ends continue)",
    "tissue_enhancement_prob": "enhancing tissue: each patch, with probability P, has its liver, spleen, kidneys, "
                               "... and the walls of its stomach and bowel brightened together by 0-100 HU, for "
                               "scans with intravenous contrast when the training scans have none (CT only)",
    "organ_filling_prob": "organs that fill and empty: each stomach, gallbladder or bladder of a patch, with "
                          "probability P, is enlarged or shrunk about its centre (linear factor 0.9-1.6), its "
                          "neighbours pushed aside, for scans where it holds more or less than in the training "
                          "scans (with --augmentation spatial)",
    "gin_prob": "random intensity networks (GIN): each patch, with probability P, is mapped through a shallow "
                "convolutional network of random weights to new intensities and textures, its edges kept, for "
                "scans from other scanners or contrast phases",
}


def _add_supervised_recipe_arguments(parser: argparse.ArgumentParser, postprocess: bool = True) -> None:
    """Augmentation, loss and weight averaging of supervised training (docs/few-label-accuracy.md), and with
    ``postprocess`` the choice of the largest-component rule (selftrain does not choose one)."""
    parser.add_argument("--recipe", choices=list(RECIPES), default="none",
                        help="few-label: the settings measured best with one labelled scan (spatial augmentation, "
                             "gas in hollow organs and contrast in vessels at 0.5 for CT, patches on organs 80 %% of the "
                             "time, lr 3e-3 with 20 warm-up steps for the light U-Net); flags given with it win "
                             "(default: none)")
    parser.add_argument("--augmentation", choices=["intensity", "spatial"], default=None,
                        help="intensity: intensity scale, shift and noise only; spatial: also rotation, zoom, "
                             "elastic deformation, blur, contrast, gamma and low resolution (default: intensity; "
                             "spatial with --recipe few-label)")
    parser.add_argument("--spatial-prob", type=float, default=None, metavar="P",
                        help="with --augmentation spatial: the probability of a rotation and of a zoom of each "
                             "patch, elastic deformation at half of it (default: 0.2, nnU-Net's)")
    parser.add_argument("--mirror-axes", default="", metavar="AXES",
                        help="axes of the RAS grid to mirror patches along in training, e.g. 1,2 (0 = left-right: "
                             "only if every left/right organ's partner is a target; pairs are swapped); "
                             "predict --tta flips exactly these (default: none)")
    for field_name, text in AUGMENTATION_PROBABILITIES.items():
        parser.add_argument("--" + field_name.replace("_", "-"), type=float, default=None, metavar="P",
                            help=text + " (default: 0, off; 0.5 with --recipe few-label for gas and vessels)")
    parser.add_argument("--dice", choices=["sample", "batch", "tversky"], default="sample",
                        help="the loss's Dice term: per patch with background (sample), nnU-Net's, summed over "
                             "the batch, foreground only (batch), or batch with Tversky's index, false negatives "
                             "weighted 0.7 and false positives 0.3 (tversky) (default: sample)")
    parser.add_argument("--average-weights-from", type=float, default=0.0, metavar="F",
                        help="keep the mean of the network's weights after every step from F x --max-steps on "
                             "(stochastic weight averaging), and save, validate and predict with it, e.g. 0.5 "
                             "(default: 0, off: the last step's weights)")
    if not postprocess:
        return
    parser.add_argument("--postprocess-on", choices=["validation", "training", "off"], default="validation",
                        help="cases that decide, per organ, whether keeping only its largest connected component "
                             "helps; predict applies the decision (default: validation)")


def _add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """How fast a (pre-trained) encoder may change while the rest of the network trains."""
    parser.add_argument("--encoder-lr-scale", type=float, default=None, metavar="S",
                        help="the encoder trains at S x --lr (default: 0.1 with --init, so fine-tuning does not "
                             "erase the pre-training; 1.0 without, and with finetune --recipe few-label on the U-Net)")
    parser.add_argument("--freeze-encoder-steps", type=int, default=0, metavar="K",
                        help="keep the encoder fixed for the first K steps while the decoder adapts (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="contrastiveseg", description=(
        "ContrastiveSeg: contrastive pre-training and few-label fine-tuning of CT organ segmentation."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser("demo", help="fine-tune on the sample CT, predict a held-out patient, report Dice",
                               description="Fine-tune a small network on the shipped sample CT on the CPU, predict "
                                           "a second (held-out) patient, print per-organ Dice and write an overlay PNG.")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (for CI): under 2 minutes on 2 CPU cores")
    demo.add_argument("--out", default="demo-output", help="output folder (default: ./demo-output)")
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    demo.add_argument("--max-steps", type=int, default=None, help="override the number of training steps")
    demo.add_argument("--networks", type=int, default=None,
                      help="networks trained (seeds 0, 1, ...) whose ensemble predicts patient B, their "
                           "probabilities averaged (default: 1)")

    finetune = commands.add_parser("finetune", help="train a segmentation network on labelled scans",
                                   description="Supervised fine-tuning (Dice + CE, AdamW, cosine schedule) from a "
                                               "pre-trained checkpoint (--init) or from scratch (without --init).")
    finetune.add_argument("--data", action="append", required=True, metavar="SPEC",
                          help="a dataset: dataset.json, or a folder with dataset.json or images/ + labels/ (repeatable)")
    finetune.add_argument("--val-data", action="append", default=[], metavar="SPEC",
                          help="dataset(s) used only for validation (default: a held-out share of --data)")
    finetune.add_argument("--labels", required=True, metavar="NAMES",
                          help="target organs by name, comma-separated: liver,spleen (output classes 1..K in this order)")
    finetune.add_argument("--labeled-fraction", type=float, default=1.0,
                          help="share of the training cases to use, whole cases, seeded (default: 1.0)")
    finetune.add_argument("--folds", type=int, default=0, help="k of a k-fold split (0: none)")
    finetune.add_argument("--fold", type=int, default=0, help="which fold validates (0-based)")
    finetune.add_argument("--init", default=None, metavar="CKPT", help="initialise the encoder from this checkpoint")
    _add_common_training_arguments(finetune, default_steps=2000)
    _add_supervised_recipe_arguments(finetune)
    _add_encoder_arguments(finetune)

    pretrain = commands.add_parser("pretrain", help="contrastive pre-training on labelled datasets (MixCL or GCL)",
                                   description="Pre-train the network's encoder with MixCL or GCL on one or more "
                                               "labelled datasets whose label sets may differ (labels are matched "
                                               "by name). The result feeds finetune --init and selftrain --init.")
    pretrain.add_argument("--method", choices=["mixcl", "gcl"], required=True,
                          help="mixcl: identity + label + reconstruction consistency; gcl: meta-label contrast "
                               "with a Gradient Mitigator and a Gradient Filter")
    pretrain.add_argument("--data", action="append", required=True, metavar="SPEC",
                          help="a labelled dataset: dataset.json, or a folder with dataset.json or images/ + labels/ "
                               "(repeatable; label sets may differ)")
    pretrain.add_argument("--labels", default=None, metavar="NAMES",
                          help="only these organs, comma-separated (default: every label of every dataset)")
    pretrain.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                          help="a method setting, e.g. --set alpha=0.01 --set tau=0.1 (an unknown key lists them all)")
    pretrain.add_argument("--meta-labels", default=None, metavar="NAMES",
                          help="gcl: meta labels to contrast, comma-separated from dataset, case, position and the "
                               "--meta-csv columns (default: dataset,case,position)")
    pretrain.add_argument("--meta-csv", default=None, metavar="CSV",
                          help="gcl: per-case attributes (a case column plus e.g. phase, scanner) usable as meta labels")
    pretrain.add_argument("--mitigator", choices=["feature", "param", "off"], default=None,
                          help="gcl: Gradient Mitigator mode (default: feature)")
    _add_common_training_arguments(pretrain, default_steps=1000)

    selftrain = commands.add_parser("selftrain", help="self-training with a local contrastive loss on pseudo-labels",
                                    description="Semi-supervised training: a supervised baseline on the labelled "
                                                "scans (or --init), then rounds of pseudo-labelling the unlabelled "
                                                "scans and joint training with segmentation + local contrastive loss.")
    selftrain.add_argument("--labeled", action="append", required=True, metavar="SPEC",
                           help="a labelled dataset (dataset.json or folder; repeatable)")
    selftrain.add_argument("--unlabeled", action="append", required=True, metavar="SPEC|FOLDER",
                           help="unlabelled scans: a dataset spec or a folder of images / DICOM series (repeatable)")
    selftrain.add_argument("--labels", required=True, metavar="NAMES",
                           help="target organs by name, comma-separated (output classes 1..K in this order)")
    selftrain.add_argument("--val-data", action="append", default=[], metavar="SPEC",
                           help="dataset(s) used only for validation (default: a held-out share of --labeled)")
    selftrain.add_argument("--init", default=None, metavar="CKPT",
                           help="a pretrain checkpoint (encoder loaded, then the baseline is trained) or a finetune "
                                "checkpoint with the same labels (used as the baseline)")
    selftrain.add_argument("--rounds", type=int, default=None, help="pseudo-labelling rounds (default: 3)")
    selftrain.add_argument("--contrastive-weight", type=float, default=None,
                           help="lambda of the local contrastive loss (default: 0.1)")
    selftrain.add_argument("--agreement-threshold", type=float, default=None,
                           help="keep an unlabelled scan only if the Dice between predictions on two augmented "
                                "copies exceeds this (default: off)")
    selftrain.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                           help="any other self-training setting (an unknown key lists them all)")
    _add_common_training_arguments(selftrain, default_steps=1000,
                                   steps_help="optimisation steps of EACH stage: the baseline and every round")
    _add_supervised_recipe_arguments(selftrain, postprocess=False)
    _add_encoder_arguments(selftrain)

    predict = commands.add_parser("predict", help="segment an image with a trained run",
                                  description="Sliding-window prediction, written on the input image's own grid.")
    predict.add_argument("--model", required=True, nargs="+", metavar="RUN",
                         help="a finetune run folder, or a checkpoint file; several: an ensemble, their class "
                              "probabilities averaged (runs for the same organs on the same grid, e.g. seeds)")
    predict.add_argument("--image", required=True, help="NIfTI / NRRD / MetaImage file or DICOM series folder")
    predict.add_argument("--out", required=True, help="labelmap to write: .nii.gz, .nrrd or .seg.nrrd (named, coloured segments)")
    predict.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    predict.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1) (default: 0.5)")
    predict.add_argument("--tta", action="store_true",
                         help="average over copies flipped along the axes the run trained mirrored (left/right "
                              "organs swapped); 2^axes times slower, no change for runs trained without mirroring")
    predict.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which checkpoint of RUN (default: best)")
    predict.add_argument("--background-weight", type=float, default=1.0, metavar="W",
                         help="multiply the background's probability by W before choosing each voxel's class: "
                              "below 1, organs grow into voxels the network was unsure of (default: 1, as trained)")
    predict.add_argument("--events-stdout", action="store_true",
                         help="print progress events as JSON lines on stdout (start, step 1-3, finished)")
    predict.add_argument("--no-body-mask", dest="body_mask", action="store_false",
                         help="keep organs predicted outside the patient's trunk (by default, for CT models, voxels "
                              "outside the largest connected body region, i.e. air, table and separate limbs, are "
                              "background)")

    evaluate = commands.add_parser("evaluate", help="per-organ Dice of a prediction against a reference",
                                   description="Per-organ Dice (and optionally HD95), labels matched by name, on the reference grid.")
    evaluate.add_argument("--pred", required=True, help="predicted labelmap")
    evaluate.add_argument("--ref", required=True, help="reference labelmap (or .seg.nrrd)")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="RUN", help="take the prediction's label names from this run folder")
    source.add_argument("--labels", metavar="JSON", help="a labels.json naming the prediction's values")
    evaluate.add_argument("--ref-labels", metavar="JSON", help="a labels.json / dataset.json naming the reference's values "
                                                                "(default: the same names as the prediction)")
    evaluate.add_argument("--out", default=None, help="write the metrics as JSON here")
    evaluate.add_argument("--hd95", action="store_true", help="also compute the 95th-percentile Hausdorff distance (mm)")

    probe = commands.add_parser("probe", help="linear-probe Dice and position share of a frozen encoder",
                                description="The standard check of a pre-trained encoder: freeze it, fit a linear "
                                            "classifier (logistic regression) on its features of all levels on "
                                            "the training cases, score per-organ Dice on the test cases, and "
                                            "measure how much of each level's feature variance voxel position "
                                            "in the patch explains alone. Writes JSON.")
    probe.add_argument("--init", required=True, metavar="CKPT|none",
                       help="a pretrain, finetune or selftrain checkpoint, or 'none' for a random encoder (--seed)")
    probe.add_argument("--data", action="append", required=True, metavar="SPEC",
                       help="labelled dataset(s) the classifier is fitted on (repeatable)")
    probe.add_argument("--test-data", action="append", required=True, metavar="SPEC",
                       help="labelled dataset(s) Dice is scored on (repeatable)")
    probe.add_argument("--labels", required=True, metavar="NAMES", help="organs by name, comma-separated")
    probe.add_argument("--model", choices=["unetr", "unet"], default=None,
                       help="backbone (default: the checkpoint's; with --init none: unetr)")
    probe.add_argument("--model-size", choices=["tiny", "small", "base"], default=None,
                       help="network width (default: the checkpoint's; with --init none: base)")
    probe.add_argument("--patch", default=None, help="window in voxels, multiples of 16 (default: the checkpoint's, or 96)")
    probe.add_argument("--spacing", default=None, metavar="SX,SY,SZ",
                       help="voxel spacing in mm (default: the checkpoint's, or 1.5,1.5,2.0)")
    probe.add_argument("--intensity", choices=["ct_window", "percentile"], default=None,
                       help="intensity normalisation (default: the checkpoint's, or ct_window)")
    probe.add_argument("--window", default=None, metavar="LOW,HIGH", help="CT window in HU (default: the checkpoint's, or -150,250)")
    probe.add_argument("--seed", type=int, default=0, help="seed of the voxel sample, the patches and --init none (default: 0)")
    probe.add_argument("--voxels-per-class", type=int, default=2000, help="training voxels per class (default: 2000)")
    probe.add_argument("--position-patches", type=int, default=32,
                       help="patches the position share is measured on (default: 32)")
    probe.add_argument("--device", default="cpu", help="cpu, auto, cuda or cuda:N (default: cpu)")
    probe.add_argument("--out", required=True, metavar="JSON", help="write the result here")

    commands.add_parser("info", help="versions, CUDA and devices")

    study = commands.add_parser(
        "study", help="does pre-training help on my data? Dice against the number of labelled scans, paired",
        description="Fine-tune every arm (scratch, pre-trained checkpoints, self-training) on the same subsets "
                    "of n labelled scans for every count n and seed, score each on the --test-data cases at "
                    "several points of training, and write study.json, study.csv, study.png and report.md "
                    "(paired differences to scratch with 95 % bootstrap intervals and a verdict). The study "
                    "does not pre-train: arms that start from a pre-trained model are given as finished "
                    "pretrain runs. Each cell is a run folder under OUT/cells/: run the same command again to "
                    "reuse finished cells and resume an interrupted one.")
    study.add_argument("--data", action="append", required=True, metavar="SPEC",
                       help="the labelled pool the training subsets are drawn from (repeatable)")
    study.add_argument("--test-data", action="append", required=True, metavar="SPEC",
                       help="labelled test scans, never trained on, validated on or used to choose a checkpoint "
                            "(repeatable)")
    study.add_argument("--labels", required=True, metavar="NAMES", help="target organs by name, comma-separated")
    study.add_argument("--counts", default="1,2,4,8", metavar="N,N,...",
                       help="numbers of labelled training scans (default: 1,2,4,8)")
    study.add_argument("--seeds", default="0,1,2", metavar="S,S,...",
                       help="seeds: each draws its own subsets and trains every arm with it (default: 0,1,2)")
    study.add_argument("--arm", action="append", default=[], metavar="ARM",
                       help="scratch | NAME=RUN | NAME=RUN/checkpoints/last.pt | selftrain[:init=RUN][,KEY=VALUE] "
                            "(repeatable; scratch is always included, as the reference)")
    study.add_argument("--unlabeled", action="append", default=[], metavar="SPEC|FOLDER",
                       help="unlabelled scans for selftrain arms (neither training nor test scans)")
    study.add_argument("--budget", default="steps=2000", metavar="steps=N|minutes=M",
                       help="training per cell, the same for every arm (minutes are turned into steps once, "
                            "from a measured step) (default: steps=2000)")
    study.add_argument("--score-at", default="0.25,0.5,1", metavar="FRACTIONS",
                       help="shares of the budget at which the checkpoint is scored; 1 (the end) is always one "
                            "(default: 0.25,0.5,1)")
    study.add_argument("--val-count", type=int, default=0,
                       help="labelled cases per seed set aside for validation, the same for every arm and count "
                            "(default: 0)")
    study.add_argument("--out", required=True, metavar="STUDY", help="study folder (created, or continued)")
    study.add_argument("--dry-run", action="store_true",
                       help="print the cells and a time estimate from a measured step; train nothing")
    study.add_argument("--gpus", default=None, metavar="0,1,...",
                       help="run cells in parallel, one process per GPU (default: one after another on --device)")
    _add_common_training_arguments(study, default_steps=0, omit=STUDY_SETS_ITSELF)
    _add_supervised_recipe_arguments(study)
    _add_encoder_arguments(study)
    return parser


# Options of finetune that the study sets per cell, so it does not offer them.
STUDY_SETS_ITSELF = ("--out", "--max-steps", "--seed", "--val-every", "--checkpoint-every", "--resume",
                     "--events-stdout")


def _training_config(args: argparse.Namespace, command: str):
    from .config import RunConfig
    from .data.labels import parse_target_names
    from .finetune import parse_patch, parse_spacing

    config = RunConfig(command=command)
    config.model.architecture = args.model
    config.model.size = args.model_size
    config.model.patch_size = parse_patch(args.patch)
    config.preprocess.spacing = parse_spacing(args.spacing)
    config.preprocess.intensity = args.intensity
    config.preprocess.beyond_scan_ends = args.beyond_scan_ends
    try:
        low, high = (float(v) for v in args.window.split(","))
    except ValueError:
        raise InputError(f"{args.window!r} is not LOW,HIGH", path="--window", fix="write e.g. --window -150,250") from None
    config.preprocess.window = (low, high)
    # The recipe first: every flag the user gave is then set over it.
    apply_recipe(config, getattr(args, "recipe", "none"))
    train = config.train
    for name in ("max_steps", "batch_size", "grad_accumulation", "lr", "weight_decay", "warmup_steps", "seed",
                 "num_workers", "val_every", "checkpoint_every"):
        if getattr(args, name) is not None:  # None (--lr, --warmup-steps): the recipe's, else TrainConfig's
            setattr(train, name, getattr(args, name))
    train.amp = not args.no_amp
    if command in ("finetune", "selftrain"):
        _set_encoder_training(train, args)
    if train.max_steps < 1 or train.batch_size < 1 or train.grad_accumulation < 1:
        raise InputError("--max-steps, --batch-size and --grad-accumulation must be at least 1", path="command line")
    config.device = args.device
    config.data.cache_dir = args.cache_dir
    if command == "finetune":
        config.data.datasets = list(args.data)
        config.data.val_datasets = list(args.val_data)
        config.data.labels = parse_target_names(args.labels)
        if not 0.0 < args.labeled_fraction <= 1.0:
            raise InputError(f"{args.labeled_fraction} is not in (0, 1]", path="--labeled-fraction")
        config.data.labeled_fraction = args.labeled_fraction
        config.data.folds, config.data.fold = args.folds, args.fold
        if args.folds and not 0 <= args.fold < args.folds:
            raise InputError(f"fold {args.fold} does not exist with --folds {args.folds}", path="--fold")
        config.init_checkpoint = args.init
        _supervised_recipe(config, args)
    elif command == "pretrain":
        from .pretrain import method_settings

        config.data.datasets = list(args.data)
        config.data.labels = parse_target_names(args.labels) if args.labels else []
        explicit = {}
        if args.method == "gcl":
            explicit = {"meta_csv": args.meta_csv, "mitigator": args.mitigator,
                        "meta_labels": [m.strip() for m in args.meta_labels.split(",") if m.strip()]
                        if args.meta_labels else None}
        elif args.meta_labels or args.meta_csv or args.mitigator:
            raise InputError("--meta-labels, --meta-csv and --mitigator belong to --method gcl", path="command line")
        config.method = method_settings(args.method, args.settings, **explicit)
    elif command == "selftrain":
        from .selftrain import selftrain_settings

        config.data.datasets = list(args.labeled)
        config.data.unlabeled = list(args.unlabeled)
        config.data.val_datasets = list(args.val_data)
        config.data.labels = parse_target_names(args.labels)
        config.init_checkpoint = args.init
        config.method = selftrain_settings(args.settings, rounds=args.rounds,
                                           contrastive_weight=args.contrastive_weight,
                                           agreement_threshold=args.agreement_threshold)
        _supervised_recipe(config, args)
    return config


def _supervised_recipe(config, args: argparse.Namespace) -> None:
    """Copy the augmentation, loss, weight-averaging and post-processing flags into ``config``; a flag left
    out (None) keeps what ``--recipe`` set, which ``_training_config`` applied first."""
    if args.augmentation is not None:
        config.train.augmentation = args.augmentation
    try:
        axes = tuple(sorted({int(a) for a in args.mirror_axes.split(",") if a.strip()}))
    except ValueError:
        axes = (-1,)
    if any(a not in (0, 1, 2) for a in axes):
        raise InputError(f"{args.mirror_axes!r} is not a list of axes 0, 1, 2", path="--mirror-axes",
                         fix="write e.g. --mirror-axes 1,2")
    config.train.mirror_axes = axes
    for name in ("spatial_prob",) + tuple(AUGMENTATION_PROBABILITIES):
        value = getattr(args, name)
        if value is None:
            continue
        if not 0.0 <= value <= 1.0:
            raise InputError(f"{value} is not a probability in [0, 1]", path="--" + name.replace("_", "-"))
        setattr(config.train, name, value)
    config.train.dice = args.dice
    if not 0.0 <= args.average_weights_from < 1.0:
        raise InputError(f"{args.average_weights_from} is not a fraction of the steps in [0, 1)",
                         path="--average-weights-from", fix="give e.g. 0.5 to average the second half, or 0 for off")
    config.train.average_weights_from = args.average_weights_from
    if hasattr(args, "postprocess_on"):
        config.postprocess.choose_on = args.postprocess_on


def _set_encoder_training(train, args: argparse.Namespace) -> None:
    if args.encoder_lr_scale is not None and args.encoder_lr_scale < 0:
        raise InputError(f"{args.encoder_lr_scale} is negative", path="--encoder-lr-scale",
                         fix="give a factor of 0 or more (0 keeps the encoder fixed for the whole run)")
    if args.freeze_encoder_steps < 0:
        raise InputError(f"{args.freeze_encoder_steps} is negative", path="--freeze-encoder-steps")
    if args.encoder_lr_scale is not None:   # else the recipe's, or finetune's default (config.py)
        train.encoder_lr_scale = args.encoder_lr_scale
    train.freeze_encoder_steps = args.freeze_encoder_steps


def _cmd_finetune(args) -> int:
    from .finetune import run_finetune

    config = _training_config(args, "finetune")
    _report_training(run_finetune(config, args.out, resume=args.resume, events_stdout=args.events_stdout))
    return EXIT_OK


def _report_training(summary: dict) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    state = "stopped" if summary["stopped"] else "finished"
    best = summary.get("best_mean_dice")
    print(f"{state} at step {summary['step']} in {summary['seconds']:.0f} s"
          + (f"; best validation mean Dice {best:.4f}" if best is not None else ""), file=sys.stderr)
    print(f"run folder: {summary['run_dir']}", file=sys.stderr)


def _cmd_pretrain(args) -> int:
    from .pretrain import run_pretrain

    config = _training_config(args, "pretrain")
    _report_training(run_pretrain(config, args.out, resume=args.resume, events_stdout=args.events_stdout))
    return EXIT_OK


def _cmd_selftrain(args) -> int:
    from .selftrain import run_selftrain

    config = _training_config(args, "selftrain")
    _report_training(run_selftrain(config, args.out, resume=args.resume, events_stdout=args.events_stdout))
    return EXIT_OK


def _cmd_predict(args) -> int:
    import numpy as np

    from .data.io import write_labelmap
    from .engine.device import choose_device
    from .engine.events import EventLog
    from .engine.inference import load_ensemble, predict_image
    from .engine.postprocess import value_counts
    from .engine.runfolder import check_writable_folder
    from .report.colors import colors_for

    if not 0.0 <= args.overlap < 1.0:
        raise InputError(f"{args.overlap} is not in [0, 1)", path="--overlap")
    if not args.background_weight > 0:
        raise InputError(f"{args.background_weight} is not a positive weight", path="--background-weight",
                         fix="give a number above 0; 1 predicts as trained")
    check_writable_folder(os.path.dirname(os.path.abspath(args.out)))
    events = EventLog(None, to_stdout=args.events_stdout)  # three steps: model loaded, predicted, written
    device = choose_device(args.device)
    events.emit("start", total_steps=3, start_step=0, device=str(device))
    models = load_ensemble(args.model, device, checkpoint=args.checkpoint)
    events.emit("step", step=1, total=3)
    labels, image = predict_image(models, args.image, overlap=args.overlap, flip_tta=args.tta,
                                  mask_body=args.body_mask, background_weight=args.background_weight)
    events.emit("step", step=2, total=3)
    names = {value: name for value, name in models[0].labels.items() if value != 0}
    write_labelmap(args.out, labels, image, names=names, colors=colors_for(list(names.values())))
    events.emit("step", step=3, total=3)
    events.emit("finished", step=3, stopped=False)
    present = np.flatnonzero(value_counts(labels, int(labels.max(initial=0)))[1:]) + 1
    print(f"wrote {args.out} ({', '.join(names.get(int(v), str(v)) for v in present) or 'no organ found'})",
          file=sys.stderr)
    return EXIT_OK


def _cmd_evaluate(args) -> int:
    from .engine.runfolder import RunFolder, load_label_table, write_json_atomic
    from .evaluate import evaluate_files, format_table

    if args.model:
        pred_names = load_label_table(RunFolder(args.model).labels)
    else:
        pred_names = load_label_table(args.labels)
    ref_names = None
    if args.ref_labels:
        ref_names = _label_table_from_any(args.ref_labels)
    metrics = evaluate_files(args.pred, args.ref, pred_names, ref_names, with_hd95=args.hd95)
    print(format_table(metrics))
    if args.out:
        write_json_atomic(args.out, metrics)
    return EXIT_OK


def _label_table_from_any(path: str):
    """A labels.json, or a dataset.json's "labels" (either direction)."""
    from .engine.runfolder import load_label_table

    with open(path, "r", encoding="utf-8") as handle:
        raw = json.load(handle)
    if isinstance(raw, dict) and isinstance(raw.get("labels"), dict):
        from .data.labels import parse_label_map

        table = {}
        for name, values in parse_label_map(raw["labels"], path).items():
            for value in values:
                if isinstance(value, int):  # segment names do not name a label map's values
                    table[value] = name
        return table
    return load_label_table(path)


def _cmd_probe(args) -> int:
    from .data.labels import parse_target_names
    from .engine.runfolder import check_writable_folder, write_json_atomic
    from .finetune import parse_patch, parse_spacing
    from .probe import ProbeSettings, run_probe

    check_writable_folder(os.path.dirname(os.path.abspath(args.out)))
    window = None
    if args.window is not None:
        try:
            window = tuple(float(v) for v in args.window.split(","))
        except ValueError:
            window = ()
        if len(window) != 2:
            raise InputError(f"{args.window!r} is not LOW,HIGH", path="--window", fix="write e.g. --window -150,250")
    model = {"architecture": args.model, "size": args.model_size,
             "patch_size": parse_patch(args.patch) if args.patch else None}
    preprocess = {"spacing": parse_spacing(args.spacing) if args.spacing else None, "intensity": args.intensity,
                  "window": window}
    settings = ProbeSettings(seed=args.seed, voxels_per_class=args.voxels_per_class,
                             position_patches=args.position_patches)
    result = run_probe(args.init, args.data, args.test_data, parse_target_names(args.labels), model=model,
                       preprocess=preprocess, settings=settings, device=args.device)
    write_json_atomic(args.out, result)
    shares = ", ".join(f"{k} {v:.3f}" for k, v in result["position_share"].items() if v is not None)
    print(f"probe Dice: mean {result['dice']['mean']:.4f} ("
          + ", ".join(f"{k} {v:.3f}" for k, v in result["dice"].items() if k != "mean" and v is not None)
          + f"); position share: {shares}", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return EXIT_OK


def _cmd_info(args) -> int:
    import torch

    from .config import software_versions

    for key, value in software_versions().items():
        print(f"{key:12s} {value}")
    print(f"{'cuda ok':12s} {torch.cuda.is_available()}")
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        print(f"{'gpu ' + str(index):12s} {props.name}, {props.total_memory / 2**30:.1f} GiB")
    print(f"{'cpu threads':12s} {torch.get_num_threads()}")
    return EXIT_OK


def study_plan_from_args(args: argparse.Namespace):
    """The checked :class:`~ContrastiveSegLib.study.runner.StudyPlan` of ``contrastiveseg study`` ARGS."""
    from .data.labels import parse_target_names
    from .study.design import parse_arms, parse_budget, parse_fractions, parse_int_list
    from .study.runner import StudyPlan

    passed = argparse.Namespace(**vars(args))
    passed.max_steps, passed.seed, passed.val_every, passed.checkpoint_every = 1, 0, 0, 0
    passed.data, passed.val_data, passed.labeled_fraction, passed.folds, passed.fold = [], [], 1.0, 0, 0
    passed.init = None
    config = _training_config(passed, "finetune")
    gpus = parse_int_list(args.gpus, "--gpus", 0) if args.gpus else []
    if gpus:
        import torch

        if not torch.cuda.is_available() or max(gpus) >= torch.cuda.device_count():
            raise InputError(f"GPU(s) {args.gpus} asked for, PyTorch sees {torch.cuda.device_count()}", path="--gpus",
                             fix="list GPUs that exist (see contrastiveseg info), or leave --gpus out")
    if args.val_count < 0:
        raise InputError(f"{args.val_count} is negative", path="--val-count")
    plan = StudyPlan(out=os.path.abspath(args.out), data=list(args.data), test_data=list(args.test_data),
                     targets=parse_target_names(args.labels), counts=parse_int_list(args.counts, "--counts", 1),
                     seeds=parse_int_list(args.seeds, "--seeds", 0), arms=parse_arms(args.arm),
                     budget=parse_budget(args.budget), config=config, fractions=parse_fractions(args.score_at),
                     val_count=args.val_count, unlabeled=list(args.unlabeled), gpus=gpus)
    return plan


def _cmd_study(args) -> int:
    from .study.runner import run_study

    plan = study_plan_from_args(args)
    study = run_study(plan, dry_run=args.dry_run, log=lambda text: print(text, file=sys.stderr))
    if not args.dry_run:
        print(f"study folder: {plan.out} ({sum(c.get('status') == 'finished' for c in study['cells'])} of "
              f"{len(study['cells'])} cells finished)", file=sys.stderr)
    return EXIT_OK


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, quick=args.quick, device=args.device, max_steps=args.max_steps, networks=args.networks)
    return EXIT_OK


COMMANDS = {"pretrain": _cmd_pretrain, "finetune": _cmd_finetune, "selftrain": _cmd_selftrain,
            "predict": _cmd_predict, "evaluate": _cmd_evaluate, "info": _cmd_info,
            "demo": _cmd_demo, "study": _cmd_study, "probe": _cmd_probe}


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def _record_error(args, message: str, kind: str) -> None:
    """Append an ``error`` event to the run folder, if this command has one that exists."""
    out = getattr(args, "out", None)
    if args.command not in ("finetune", "pretrain", "selftrain") or not out or int(os.environ.get("RANK", "0")) != 0:
        return
    if not os.path.isdir(out):
        return
    from .engine.events import EventLog

    EventLog(os.path.join(out, "events.jsonl"), to_stdout=getattr(args, "events_stdout", False)).emit(
        "error", message=message, kind=kind)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .engine.allocator import tune_glibc_malloc

    tune_glibc_malloc()
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="monai")
    try:
        return COMMANDS[args.command](args)
    except InputError as error:
        message = error.format()
        print(f"error: {message}", file=sys.stderr)
        _record_error(args, message, "input")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _record_error(args, "interrupted", "internal")
        return EXIT_FAILURE
    except Exception as error:  # the traceback is for bug reports; the event carries the message
        traceback.print_exc()
        _record_error(args, f"{type(error).__name__}: {error}", "internal")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
