"""The ``finetune`` command: supervised training of a segmentation network on labelled CT.

Order of work (nothing is written before every input has been checked):
datasets -> target names -> train / validation split -> label fraction ->
preprocessing (the slow part, which also checks every file) -> run folder ->
network (optionally initialised from a pre-trained checkpoint) -> trainer.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, Iterable, Optional, Sequence

import numpy as np
import torch

from .config import RunConfig, resumed_config, software_versions
from .data.catalog import Case, check_target_names, load_datasets
from .data.labels import output_label_map
from .data.preprocess import CasePreparer, PreparedCase
from .data.sampling import PatchSampler, SupervisedPatches, kfold_split, select_labeled_fraction
from .engine.checkpoint import InitReport, load_pretrained_weights
from .engine.device import DistributedContext, distributed
from .engine.events import EventLog
from .engine.inference import sliding_window_probabilities
from .engine.runfolder import RunFolder, check_writable_folder, write_json_atomic
from .engine.trainer import Trainer
from .errors import InputError
from .methods.supervised import SupervisedObjective
from .models import build_backbone


def split_cases(config: RunConfig, cases: Sequence[Case], val_cases: Sequence[Case]) -> tuple:
    """``(train, validation)`` cases: validation datasets, else a k-fold split, else a held-out share."""
    data = config.data
    seed = config.train.seed
    by_id = {case.case_id: case for case in cases}
    if val_cases:
        train_ids, val_ids = list(by_id), []
    elif data.folds:
        train_ids, val_ids = kfold_split(list(by_id), data.folds, data.fold, seed)
    elif len(by_id) >= 3 and data.val_fraction > 0:  # val_fraction 0: the caller chose its validation itself
        count = max(1, int(round(data.val_fraction * len(by_id))))
        order = np.random.default_rng([seed, 15485863]).permutation(len(by_id))
        held = {list(by_id)[i] for i in order[:count]}
        train_ids, val_ids = [c for c in by_id if c not in held], [c for c in by_id if c in held]
    else:
        train_ids, val_ids = list(by_id), []
    if data.labeled_fraction < 1.0:
        train_ids = select_labeled_fraction(train_ids, data.labeled_fraction, seed)
    return [by_id[c] for c in train_ids], list(val_cases) + [by_id[c] for c in val_ids]


def predict_prepared(backbone: torch.nn.Module, case: PreparedCase, patch_size: Sequence[int],
                     overlap: float) -> np.ndarray:
    """Arg-max classes ``[X, Y, Z]`` uint8 of a prepared case, background outside its body (as ``predict`` does)."""
    from .data.preprocess import mask_outside_prepared_body

    probabilities = sliding_window_probabilities(backbone, torch.from_numpy(case.image), patch_size, overlap=overlap,
                                                 fill=case.fill, continue_axes=case.continued_axes)
    return mask_outside_prepared_body(probabilities.argmax(0).cpu().numpy().astype(np.uint8), case)


def make_validator(cases: Sequence[PreparedCase], targets: Sequence[str], patch_size: Sequence[int],
                   overlap: float) -> Callable:
    """Per-organ Dice on the preprocessing grid of every validation case; the mean over cases.

    The predictions of the latest validation are kept in ``validate.predictions`` ({case_id: [X, Y, Z]}),
    for the post-processing choice at the end of training.
    """
    from .engine.metrics import dice_per_label, mean_dice

    names = {index: name for index, name in enumerate(targets, start=1)}

    def validate(backbone: torch.nn.Module, step: int) -> Dict:
        per_case: Dict[str, Dict] = {}
        for case in cases:
            prediction = predict_prepared(backbone, case, patch_size, overlap)
            validate.predictions[case.case_id] = prediction
            per_case[case.case_id] = dice_per_label(prediction, case.label[0], names)
        dice: Dict[str, Optional[float]] = {}
        for name in targets:
            values = [d[name] for d in per_case.values() if d.get(name) is not None]
            dice[name] = float(np.mean(values)) if values else None
        return {"dice": dice, "mean_dice": mean_dice(dice), "cases": per_case}

    validate.predictions = {}
    return validate


def prepare_intensity_statistics(config: RunConfig, train_cases: Sequence[Case], targets: Sequence[str]) -> None:
    """Compute, once, the CT training cases' foreground HU statistics a run needs and keep them in ``config``.

    ``ct_zscore`` normalises with them; in a CT run with training cases of another modality (MR), those
    cases are brought onto the CT cases' HU scale (``preprocess.ct_units_reference``,
    ``data.preprocess.ct_units``).  Only CT cases count: an MR's intensities are not HU.  A resumed run
    already has them in its saved config and keeps those.
    """
    from .data.preprocess import intensity_statistics

    preprocess = config.preprocess
    ct_cases = [case for case in train_cases if case.is_ct()]
    other = sorted({case.modality for case in train_cases if not case.is_ct()})
    if preprocess.is_ct() and other and not ct_cases:
        raise InputError(f"every training case is {' or '.join(other)}, and --intensity {preprocess.intensity} "
                         "is for CT", path="--data",
                         fix="add a labelled CT to bring them onto its HU scale, or use --intensity percentile")
    if preprocess.intensity == "ct_zscore" and not preprocess.intensity_stats:
        preprocess.intensity_stats = intensity_statistics(ct_cases, targets,
                                                          percentiles=preprocess.zscore_percentiles,
                                                          seed=config.train.seed)
    if preprocess.is_ct() and other and not preprocess.ct_units_reference:
        stats = intensity_statistics(ct_cases, targets, seed=config.train.seed)
        preprocess.ct_units_reference = {key: stats[key] for key in ("mean", "std", "voxels")}


def augmentation_options(config: RunConfig, targets: Sequence[str]) -> dict:
    """``SupervisedPatches`` arguments for the run's augmentation.

    An InputError if a left/right pair would break under the mirror axes, if an augmentation that works
    in HU (contrast phase, contrast in vessels) or on CT's air (gas) is asked of a normalisation that is
    not, if thin scans are asked of a run that fills a scan's ends with air, or organs resized without the
    spatial augmentation.
    """
    from .data.preprocess import continued_axes, normalised_range, units_per_hu
    from .data.views import (
        ENHANCING_ORGANS,
        FILLING_ORGANS,
        HOLLOW_ORGANS,
        VESSELS,
        anterior_axis,
        check_mirror_axes,
        lateral_swap,
        left_right_axis,
    )

    axes = tuple(config.train.mirror_axes)
    try:
        check_mirror_axes(axes, targets, config.preprocess.orientation)
    except ValueError as error:
        raise InputError(str(error), path="--mirror-axes", fix="leave out the left-right axis (0)") from None
    lateral = left_right_axis(config.preprocess.orientation)

    def hu_scale(what: str, flag: str) -> float:
        """Normalised units per HU, or an InputError for an augmentation ``what`` that works in HU."""
        scale = units_per_hu(config.preprocess)
        if scale is None:
            raise InputError(f"{what} in HU, and intensity {config.preprocess.intensity!r} is not in HU", path=flag,
                             fix="use it with --intensity ct_window or ct_zscore, or leave it at 0")
        return scale

    contrast_phase = None
    if config.train.contrast_phase_prob > 0:
        contrast_phase = {"prob": float(config.train.contrast_phase_prob),
                          "units_per_hu": hu_scale("contrast-phase augmentation shifts organs", "--contrast-phase-prob"),
                          "value_range": normalised_range(config.preprocess)}
    gas = None
    if config.train.hollow_organ_gas_prob > 0:
        if not config.preprocess.is_ct():
            raise InputError(f"gas in hollow organs is CT's air, and intensity {config.preprocess.intensity!r} is "
                             "not a CT normalisation", path="--hollow-organ-gas-prob",
                             fix="use it with --intensity ct_window or ct_zscore, or leave it at 0")
        axis, sign = anterior_axis(config.preprocess.orientation)
        gas = {"prob": float(config.train.hollow_organ_gas_prob),
               "classes": [number for number, name in enumerate(targets, start=1) if name in HOLLOW_ORGANS],
               "air": normalised_range(config.preprocess)[0], "anterior_axis": axis, "anterior_sign": sign}
    vessels = None
    if config.train.vessel_contrast_prob > 0:
        vessels = {"prob": float(config.train.vessel_contrast_prob),
                   "classes": [number for number, name in enumerate(targets, start=1) if name in VESSELS],
                   "units_per_hu": hu_scale("contrast in vessels brightens their blood", "--vessel-contrast-prob"),
                   "value_range": normalised_range(config.preprocess)}
    enhancement = None
    if config.train.tissue_enhancement_prob > 0:
        enhancement = {"prob": float(config.train.tissue_enhancement_prob),
                       "solid": [number for number, name in enumerate(targets, start=1) if name in ENHANCING_ORGANS],
                       "hollow": [number for number, name in enumerate(targets, start=1) if name in HOLLOW_ORGANS],
                       "units_per_hu": hu_scale("enhancing tissue is brightened", "--tissue-enhancement-prob"),
                       "value_range": normalised_range(config.preprocess)}
    thin_scan = None
    if config.train.thin_scan_prob > 0:
        ends = continued_axes(config.preprocess)
        if not ends:
            raise InputError("thin-scan augmentation shows the network a thin scan as predict continues its ends, "
                             "and this run fills them with air", path="--thin-scan-prob",
                             fix="use it with --beyond-scan-ends continue, or leave it at 0")
        thin_scan = {"prob": float(config.train.thin_scan_prob), "axis": ends[0]}
    filling = None
    if config.train.organ_filling_prob > 0:
        if config.train.augmentation != "spatial":
            raise InputError("organs are resized in the spatial augmentation's sampling map, and this run's "
                             f"augmentation is {config.train.augmentation!r}", path="--organ-filling-prob",
                             fix="use it with --augmentation spatial (or --recipe few-label), or leave it at 0")
        filling = {"prob": float(config.train.organ_filling_prob),
                   "classes": [number for number, name in enumerate(targets, start=1) if name in FILLING_ORGANS]}
    return {"augmentation": config.train.augmentation, "mirror_axes": axes,
            "swap": lateral_swap(targets) if lateral in axes else None, "lateral_axis": lateral,
            "contrast_phase": contrast_phase, "gas": gas, "thin_scan": thin_scan, "vessels": vessels,
            "gin_prob": float(config.train.gin_prob), "enhancement": enhancement,
            "spatial_prob": float(config.train.spatial_prob), "filling": filling}


def choose_run_postprocessing(config: RunConfig, run: RunFolder, backbone: torch.nn.Module, validate,
                              prepared_val: Sequence[PreparedCase], prepared_train: Sequence[PreparedCase],
                              targets: Sequence[str]) -> Optional[Dict]:
    """Decide the largest-component rule on the cases ``config.postprocess.choose_on`` names; save it in the run.

    ``"validation"`` uses the final validation's predictions; ``"training"`` predicts the training cases
    (for runs whose only validation case is also the one scored, like the demo's).
    """
    from .engine.postprocess import POSTPROCESS_FILE, choose_postprocessing

    choose_on = config.postprocess.choose_on
    if choose_on == "off":
        return None
    if choose_on == "validation":
        if validate is None or not validate.predictions:
            return None
        predictions = [validate.predictions[case.case_id] for case in prepared_val]
        cases = prepared_val
    elif choose_on == "training":
        backbone.eval()
        with torch.no_grad():
            predictions = [predict_prepared(backbone, case, config.model.patch_size, config.train.sw_overlap)
                           for case in prepared_train]
        cases = prepared_train
    else:
        raise ValueError(f"unknown postprocess.choose_on {choose_on!r}: 'validation', 'training' or 'off'")
    names = {index: name for index, name in enumerate(targets, start=1)}
    decision = choose_postprocessing(predictions, [case.label[0] for case in cases], names, chosen_on=choose_on)
    # Written after the trainer's "finished" event, which stays the run's last event: the decision is
    # this file, which predict reads.
    write_json_atomic(os.path.join(run.root, POSTPROCESS_FILE), decision)
    return decision


def report_init(checkpoint: str, report: InitReport, run: RunFolder, events: EventLog, is_main: bool) -> None:
    """Say what ``--init`` loaded: a message event and ``RUN/init_report.json``."""
    events.message(f"--init {checkpoint}: {report.summary()}")
    if is_main:
        write_json_atomic(os.path.join(run.root, "init_report.json"), {"checkpoint": checkpoint, **report.to_dict()})


def run_finetune(config: RunConfig, out: str, resume: bool = False, events_stdout: bool = False,
                 listeners: Iterable[Callable[[dict], None]] = (), progress: bool = True) -> Dict:
    """Fine-tune (or train from scratch) as ``config`` says, into the run folder ``out``."""
    run = RunFolder(out)
    if resume:
        config = resumed_config(run.read_json(run.config), config)
    with distributed(config.device) as context:
        return _finetune(config, run, context, resume, events_stdout, listeners, progress)


def _finetune(config: RunConfig, run: RunFolder, context: DistributedContext, resume: bool, events_stdout: bool,
              listeners, progress: bool) -> Dict:
    config.command = "finetune"
    config.versions = software_versions()
    targets = list(config.data.labels)
    if not config.data.datasets:
        raise InputError("no training data given", path="--data", fix="give --data DATASET (a dataset.json or folder)")
    datasets = load_datasets(config.data.datasets)
    val_datasets = load_datasets(config.data.val_datasets) if config.data.val_datasets else []
    check_target_names(datasets, targets)
    cases = [case for dataset in datasets for case in dataset.cases]
    val_cases = [case for dataset in val_datasets for case in dataset.cases]
    train_cases, val_cases = split_cases(config, cases, val_cases)
    if context.is_main:
        check_writable_folder(run.root, what="run folder")

    config.model.out_channels = len(targets) + 1
    config.model.validate()
    prepare_intensity_statistics(config, train_cases, targets)
    augmentation = augmentation_options(config, targets)
    # Stored resolved, so config.json says at which rate the encoder trained.
    config.train.encoder_lr_scale = config.train.resolved_encoder_lr_scale(bool(config.init_checkpoint))
    preparer = CasePreparer(config.preprocess, targets, pad_to=config.model.patch_size,
                            cache_dir=config.data.cache_dir)
    prepared_train = preparer.prepare_all(train_cases, progress=progress and context.is_main)
    if not prepared_train:
        raise InputError("no training case labels any of the chosen organs", path="--data",
                         fix="check --labels against the datasets' label names")
    # Validation cases are not padded to the patch: the sliding window meets their ends as predict's does
    # (continued along the body's axis, PreprocessConfig.beyond_scan_ends), and Dice counts only the scan.
    val_preparer = CasePreparer(config.preprocess, targets, cache_dir=config.data.cache_dir)
    prepared_val = val_preparer.prepare_all(val_cases, progress=progress and context.is_main) if context.is_main else []
    if context.is_main and not prepared_val:
        warnings.warn("no validation cases (a single labelled case, or none held out): best.pt is not written and "
                      "prediction uses the last checkpoint. Give --val-data or more cases to validate.")

    torch.manual_seed(config.train.seed)  # the initial weights are part of what a seed reproduces
    backbone = build_backbone(config.model)
    init_report = None
    if config.init_checkpoint and not resume:  # before the run folder: a checkpoint that does not fit writes nothing
        init_report = load_pretrained_weights(backbone, config.init_checkpoint, encoder_only=True)

    run.create()
    events = EventLog(run.events, to_stdout=events_stdout, enabled=context.is_main)
    for listener in listeners:
        events.listeners.append(listener)
    labels = output_label_map(targets)
    if init_report is not None:
        report_init(config.init_checkpoint, init_report, run, events, context.is_main)
    if context.is_main:
        from .report.colors import colors_for

        write_json_atomic(run.config, config.to_dict())
        write_json_atomic(run.labels, labels)
        write_json_atomic(run.colors, {k: list(v) for k, v in colors_for(targets).items()})
        events.message(f"{len(prepared_train)} training case(s), {len(prepared_val)} validation case(s)")

    sampler = PatchSampler(prepared_train, config.model.patch_size, config.train.foreground_ratio)
    length = config.train.max_steps * config.train.batch_size * config.train.grad_accumulation * context.world_size
    dataset = SupervisedPatches(sampler, config.train.seed, length, augment=True, **augmentation)
    validate = None
    if prepared_val:
        validate = make_validator(prepared_val, targets, config.model.patch_size, config.train.sw_overlap)
    trainer = Trainer(run, config, SupervisedObjective(backbone, dice=config.train.dice), dataset, context, events, kind="finetune",
                      labels=labels, validate=validate, encoder_initialised=bool(config.init_checkpoint))
    summary = trainer.fit(resume=resume)
    if context.is_main and not summary["stopped"]:
        choose_run_postprocessing(config, run, trainer.network(), validate, prepared_val, prepared_train, targets)
    summary["run_dir"] = run.root
    return summary


def parse_spacing(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or any(v <= 0 for v in values):
        raise InputError(f"{text!r} is not three positive numbers", path="--spacing", fix="write e.g. --spacing 1.5,1.5,2.0")
    return values


def parse_patch(text: str) -> tuple:
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or any(v <= 0 or v % 16 for v in values):
        raise InputError(f"{text!r} is not a patch size of multiples of 16", path="--patch",
                         fix="write e.g. --patch 96 or --patch 96,96,64")
    return tuple(values)
