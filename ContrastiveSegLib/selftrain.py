"""The ``selftrain`` command: pseudo-label self-training with a local contrastive loss (Chaitanya et al.).

Stages, each ``config.train.max_steps`` optimisation steps with its own AdamW
and cosine schedule:

* ``baseline`` (round 0): supervised Dice + CE on the labelled cases, as
  ``finetune`` does (``--init`` with a pre-training checkpoint loads its
  encoder first).  With ``--init`` of a finetune / selftrain checkpoint that
  has the same labels, that model *is* the baseline and this stage trains
  nothing;
* ``round_1`` .. ``round_R``: pseudo-label every unlabelled scan with the
  best model so far (optionally keeping only scans whose predictions on two
  augmented copies agree), then train the joint objective of
  :mod:`ContrastiveSegLib.methods.selftrain` starting from that model.

Order of work (nothing is written before every input has been checked):
settings -> datasets -> unlabelled scans -> split -> ``--init`` -> preprocessing
-> run folder -> stages.

Run folder, besides ``config.json``, ``labels.json``, ``colors.json`` and
``events.jsonl`` (see ``docs/run-folder.md`` and ``docs/selftrain.md``)::

    selftrain.json                  stage plan, finished stages, best stage, per-stage results
    checkpoints/best.pt             the best model so far by validation Dice (kind "selftrain")
    checkpoints/last.pt             the latest model (the end of the last stage when the run is done)
    stages/<stage>/checkpoints/     a stage's own trainer state, for --resume
    stages/<round>/pseudo_labels.npz  the round's pseudo-labels on the network grid, for --resume
                                    (stages/<stage>/ is removed when the stage ends; the run's
                                    checkpoints are hard links to the stage's, so nothing is copied)
    pseudo_labels/round_<r>/        the round's pseudo-labels on each scan's own grid, to look at

The whole command is one run for whoever reads the events: one ``start``
(``total_steps`` = all stages' steps), ``step`` events with one step counter
over all stages, one ``finished``.  Each stage's :class:`Trainer` writes
through :class:`_StageEvents`, which folds its own start / finished away and
offsets its steps.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import RunConfig, software_versions
from .data.catalog import IMAGE_SUFFIXES, Case, Dataset, _safe_name, check_target_names, load_dataset, load_datasets
from .data.labels import output_label_map
from .data.preprocess import CasePreparer, PreparedCase
from .data.sampling import PatchSampler, SupervisedPatches
from .engine.checkpoint import load_checkpoint, load_pretrained_weights, save_checkpoint
from .engine.device import DistributedContext, distributed
from .engine.events import EventLog, read_events
from .engine.runfolder import RunFolder, check_writable_folder, write_json_atomic
from .engine.trainer import Trainer
from .errors import InputError
from .finetune import initialise_encoder, make_validator, split_cases
from .methods.selftrain import DEFAULTS, JointPairs, SelfTrainingObjective, check_settings
from .methods.supervised import SupervisedObjective
from .models import build_backbone

STATE_FILE = "selftrain.json"
STATE_FORMAT = 1


def selftrain_settings(overrides: Iterable[str] = (), **explicit) -> Dict[str, Any]:
    """``DEFAULTS`` updated with ``--set KEY=VALUE`` strings and explicit (typed) values; None keeps the default."""
    from .pretrain import merge_settings

    settings = merge_settings(DEFAULTS, "selftrain", overrides, explicit)
    check_settings(settings)
    return settings


@dataclass
class Stage:
    """One stage of the plan: ``baseline`` (round 0) or ``round_<r>``."""

    name: str
    round: int
    steps: int
    source: str = "trained"   # "init": the baseline is the --init model, nothing is trained


def stage_plan(rounds: int, steps: int, baseline_from_init: bool) -> List[Stage]:
    plan = [Stage("baseline", 0, 0 if baseline_from_init else steps, "init" if baseline_from_init else "trained")]
    plan += [Stage(f"round_{r}", r, steps) for r in range(1, rounds + 1)]
    return plan


def load_unlabeled_cases(specs: Sequence[str], taken_names: Iterable[str]) -> List[Case]:
    """The unlabelled scans of ``--unlabeled`` specs.

    A spec is a dataset (dataset.json, or a folder with one or with images/), a folder of scans
    (image files, or one DICOM series per subfolder), or a folder that is itself one DICOM series.
    Dataset names already used by the labelled or validation data (or an earlier spec) get ``-2``,
    ``-3``, ... so case ids stay unique over the run.
    """
    datasets: List[Dataset] = []
    for spec in specs:
        path = os.path.expanduser(str(spec))
        if _check_unlabeled_folder(path) == "dicom series":
            name = _safe_name(os.path.basename(os.path.abspath(path)))
            datasets.append(Dataset(name, path, {}, [Case(f"{name}/{name}", path, None, name)]))
        else:
            datasets.append(load_dataset(path, require_labels=False))
    used = set(taken_names)
    cases: List[Case] = []
    seen: Dict[str, str] = {}
    for dataset in datasets:
        name, number = dataset.name, 2
        while name in used:
            name, number = f"{dataset.name}-{number}", number + 1
        used.add(name)
        for case in dataset.cases:
            if name != dataset.name:
                case.case_id = name + case.case_id[len(dataset.name):]
                case.dataset = name
            case.label = None  # labels of an unlabelled spec are never read
            image = os.path.realpath(case.image)
            if image in seen:
                raise InputError(f"the same scan is given twice: as {seen[image]} and as {case.case_id}",
                                 path=case.image, fix="list every unlabelled scan once")
            seen[image] = case.case_id
            cases.append(case)
    return cases


def _check_unlabeled_folder(path: str) -> str:
    """``"dicom series"`` for a folder that is one series, ``"spec"`` otherwise; clear errors for the usual mistakes."""
    fix = ("give a folder of scans (NIfTI .nii/.nii.gz, NRRD, MetaImage .mha/.mhd files, or one DICOM series "
           "per subfolder), a DICOM series folder, or a dataset.json")
    if not os.path.exists(path):
        raise InputError("does not exist", path=path, fix=fix)
    if not os.path.isdir(path):
        return "spec"  # a dataset.json: the catalog checks it
    if any(os.path.exists(os.path.join(path, name)) for name in ("dataset.json", "imagesTr", "images")):
        return "spec"
    entries = [entry for entry in sorted(os.listdir(path)) if not entry.startswith(".")]
    if not entries:
        raise InputError("is an empty folder: there are no unlabelled scans in it", path=path, fix=fix)
    if any(os.path.isdir(os.path.join(path, entry)) or entry.lower().endswith(IMAGE_SUFFIXES) for entry in entries):
        return "spec"
    import SimpleITK as sitk

    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(path)
    except RuntimeError:
        series = ()
    if series:
        return "dicom series"
    raise InputError(f"holds no scans, only {len(entries)} other file(s) such as {entries[0]!r}", path=path, fix=fix)


def class_probabilities(backbone: torch.nn.Module, image: np.ndarray, patch_size: Sequence[int],
                        overlap: float = 0.25, use_amp: bool = False) -> torch.Tensor:
    """Softmax ``[C, X, Y, Z]`` of a preprocessed volume ``[1, X, Y, Z]`` (sliding window, as validation does)."""
    from .engine.inference import sliding_window_probabilities

    return sliding_window_probabilities(backbone, torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                                        patch_size, overlap=overlap, use_amp=use_amp)


def augmented_agreement(backbone: torch.nn.Module, image: np.ndarray, num_classes: int, patch_size: Sequence[int],
                        overlap: float, seed_key: Sequence[int], use_amp: bool = False) -> Optional[float]:
    """Mean organ Dice between the arg-max predictions on two intensity-augmented copies of a volume.

    The copies are the volume (``[1, X, Y, Z]``, intensities in [0, 1]) scaled by 1.1 / 0.9 and
    shifted by +0.05 / -0.05, each plus Gaussian noise (sd 0.02) drawn from
    ``default_rng([*seed_key, copy])``.  No flips: left and right organs are different classes,
    and a network trained without flips calls a mirrored left kidney the right one.  Organs
    neither copy shows are left out of the mean; None when neither shows any organ.
    """
    from .engine.metrics import dice_per_label, mean_dice

    predictions = []
    for copy, (scale, shift) in enumerate(((1.1, 0.05), (0.9, -0.05))):
        rng = np.random.default_rng([*[int(k) for k in seed_key], copy])
        noisy = image * scale + shift + rng.normal(0.0, 0.02, image.shape)
        predictions.append(class_probabilities(backbone, noisy, patch_size, overlap, use_amp).argmax(0).cpu().numpy())
    names = {value: f"class_{value}" for value in range(1, num_classes + 1)}
    return mean_dice(dice_per_label(predictions[0], predictions[1], names))


def write_pseudo_label(path: str, probabilities: torch.Tensor, affine: np.ndarray, image_path: str,
                       names: Dict[int, str], colors: Dict[str, Sequence[int]]) -> Dict[str, int]:
    """Write the arg-max of ``probabilities`` (network grid ``affine``) on the scan's own grid; voxels per organ."""
    from .data.io import read_image, write_labelmap
    from .engine.inference import probabilities_to_input_grid

    reference = read_image(image_path)
    labels = probabilities_to_input_grid(probabilities.float().cpu().numpy(), affine, reference)
    write_labelmap(path, labels, reference, names=names, colors=colors)
    counts = np.bincount(labels.reshape(-1), minlength=max(names, default=0) + 1)
    return {name: int(counts[value]) for value, name in sorted(names.items())}


class _StageFolder(RunFolder):
    """A stage's own folder for its Trainer; the STOP file stays the run's (``RUN/STOP``)."""

    def __init__(self, root: str, stop_file: str):
        super().__init__(root)
        self._stop_file = stop_file

    @property
    def stop_file(self) -> str:
        return self._stop_file


class _StageEvents:
    """The event log a stage's Trainer writes to.

    Its ``start`` and ``finished`` are dropped (the run emits one of each), ``step`` events get
    the run's step counter, total and ETA, ``validation`` events say whether the run's best
    improved (not only the stage's), and the stage's checkpoints are mirrored into
    ``RUN/checkpoints`` (``last.pt`` always, ``best.pt`` when the run's best improved), which is
    what the ``checkpoint`` events then report.
    """

    def __init__(self, owner: "_SelfTraining", stage: Stage, offset: int, stage_root: str):
        self.owner = owner
        self.stage = stage
        self.offset = offset
        self.stage_root = stage_root
        self.to_stdout = owner.events.to_stdout
        self.enabled = owner.events.enabled
        self.listeners = owner.events.listeners
        self._new_best: Optional[float] = None

    def message(self, text: str, level: str = "info") -> None:
        self.owner.events.message(text, level=level)

    def emit(self, event: str, **fields: Any) -> dict:
        owner = self.owner
        if event in ("start", "finished"):
            return {"event": event, **fields}
        if isinstance(fields.get("step"), int):
            fields["step"] += self.offset
        fields["stage"], fields["round"] = self.stage.name, self.stage.round
        if event == "step":
            fields["total"] = owner.total_steps
            rate = fields.get("steps_per_s")
            fields["eta_s"] = (owner.total_steps - fields["step"]) / rate if rate else None
        elif event == "validation":
            mean = fields.get("mean_dice")
            better = mean is not None and (owner.best_mean_dice is None or mean > owner.best_mean_dice)
            fields["best"] = bool(better)
            self._new_best = float(mean) if better else None
        elif event == "checkpoint":
            source = os.path.join(self.stage_root, fields["path"])
            if fields.get("kind") == "last":
                return owner.mirror(source, "last", fields["step"], self.stage)
            if fields.get("kind") == "best" and self._new_best is not None:
                value, self._new_best = self._new_best, None
                owner.set_best(self.stage, value)
                return owner.mirror(source, "best", fields["step"], self.stage)
            return {"event": event, **fields}  # a stage best that is not the run's best stays private
        return owner.events.emit(event, **fields)


def run_selftrain(config: RunConfig, out: str, resume: bool = False, events_stdout: bool = False,
                  listeners: Iterable[Callable[[dict], None]] = (), progress: bool = True) -> Dict:
    """Self-train as ``config`` says into the run folder ``out``; ``resume`` continues it where it stopped.

    Returns ``{"step", "stopped", "best_mean_dice", "seconds", "run_dir", "best_stage", "stages"}``
    (``step`` over all stages, ``stages`` the finished ones).
    """
    run = RunFolder(out)
    if resume:
        # The stage plan depends on the settings: a resumed run keeps the ones it was started with.
        config = RunConfig.from_dict(run.read_json(run.config))
    with distributed(config.device) as context:
        return _SelfTraining(config, run, context, events_stdout, listeners, progress).execute(resume)


class _SelfTraining:
    def __init__(self, config: RunConfig, run: RunFolder, context: DistributedContext, events_stdout: bool,
                 listeners, progress: bool):
        self.config = config
        self.run = run
        self.context = context
        self.events_stdout = events_stdout
        self.listeners = list(listeners)
        self.progress = progress
        self.best_mean_dice: Optional[float] = None
        self.best_stage: Optional[str] = None
        self.total_steps = 0
        self.global_step = 0
        self.init_note = ""
        self.saved_state: Optional[Dict[str, Any]] = None

    # --- inputs -----------------------------------------------------------------------------------------
    def _check_inputs(self) -> None:
        config = self.config
        config.command = "selftrain"
        config.versions = software_versions()
        settings = dict(DEFAULTS)
        settings.update({k: v for k, v in config.method.items() if k != "name"})
        check_settings(settings)
        settings["name"] = "selftrain"
        config.method = settings
        self.settings = settings
        self.targets = list(config.data.labels)
        if not config.data.datasets:
            raise InputError("no labelled data given", path="--labeled",
                             fix="give --labeled DATASET (a dataset.json or a folder with images/ + labels/)")
        if not config.data.unlabeled:
            raise InputError("no unlabelled scans given", path="--unlabeled",
                             fix="give --unlabeled FOLDER (a folder of scans) or a dataset spec")
        datasets = load_datasets(config.data.datasets)
        val_datasets = load_datasets(config.data.val_datasets) if config.data.val_datasets else []
        check_target_names(datasets, self.targets)
        cases = [case for dataset in datasets for case in dataset.cases]
        val_cases = [case for dataset in val_datasets for case in dataset.cases]
        self.train_cases, self.val_cases = split_cases(config, cases, val_cases)
        unlabeled = load_unlabeled_cases(config.data.unlabeled, {d.name for d in datasets + val_datasets})
        self.unlabeled_cases, self.skipped_notes = self._without_labelled_scans(unlabeled)
        if not self.unlabeled_cases:
            raise InputError("every unlabelled scan is also a labelled or validation case", path="--unlabeled",
                             details="\n".join(self.skipped_notes[:10]),
                             fix="give scans that are not already labelled")
        config.model.out_channels = len(self.targets) + 1
        config.model.validate()
        self.labels = output_label_map(self.targets)
        saved = self.saved_state
        if saved is not None and "baseline" in saved.get("finished", []):
            # The baseline is done: --init is not needed again (its file may even be gone).
            self.init_mode = ("baseline" if saved["stages"][0].get("source") == "init"
                              else "encoder" if config.init_checkpoint else None)
            self.init_weights = None
        else:
            self.init_mode, self.init_weights = self._inspect_init()

    def _without_labelled_scans(self, unlabeled: Sequence[Case]) -> Tuple[List[Case], List[str]]:
        """Scans that are also labelled training cases add nothing; validation scans would leak into training."""
        training = {os.path.realpath(case.image) for case in self.train_cases}
        validation = {os.path.realpath(case.image) for case in self.val_cases}
        kept, notes = [], []
        for case in unlabeled:
            path = os.path.realpath(case.image)
            if path in validation:
                notes.append(f"{case.image}: a validation case, left out of the unlabelled scans")
            elif path in training:
                notes.append(f"{case.image}: already a labelled training case, not pseudo-labelled")
            else:
                kept.append(case)
        return kept, notes

    def _inspect_init(self) -> Tuple[Optional[str], Optional[Dict[str, torch.Tensor]]]:
        """``("encoder" | "baseline" | None, weights of a baseline)`` for ``--init``."""
        path = self.config.init_checkpoint
        if not path:
            return None, None
        state = load_checkpoint(path)
        kind = state.get("kind")
        if kind in ("finetune", "selftrain") and dict(state.get("labels", {})) == self.labels:
            backbone = build_backbone(self.config.model)
            source = state.get("model_config", {})
            try:
                backbone.load_state_dict(state["model"])
            except RuntimeError:
                raise InputError(
                    f"holds a {source.get('architecture')} {source.get('size')} network for patches of "
                    f"{source.get('patch_size')}, which does not fit this run's {self.config.model.architecture} "
                    f"{self.config.model.size} for {tuple(self.config.model.patch_size)}", path=path,
                    fix="give --model, --model-size and --patch of the run that wrote the checkpoint") from None
            self.init_note = (f"--init {path}: a {kind} model with the same labels; it is the baseline "
                              "(no baseline training)")
            saved = RunConfig.from_dict(state.get("config", {})).preprocess
            if asdict(saved) != asdict(self.config.preprocess):
                self.init_note += ("; note: it was trained with other preprocessing settings "
                                   f"({asdict(saved)}) than this run's ({asdict(self.config.preprocess)})")
            return "baseline", backbone.state_dict()
        # A dry run now, so a checkpoint of another network stops the command before anything is written.
        load_pretrained_weights(build_backbone(self.config.model), path, encoder_only=True)
        if kind in ("finetune", "selftrain"):
            self.init_note = (f"--init {path}: a {kind} model with other labels "
                              f"({', '.join(v for k, v in sorted(state.get('labels', {}).items()) if k != '0')}); "
                              "only its encoder is loaded and a baseline is trained")
        else:
            self.init_note = f"--init {path}: a {kind} checkpoint; its encoder is loaded and a baseline is trained"
        return "encoder", None

    def _prepare(self) -> None:
        config, show = self.config, self.progress and self.context.is_main
        preparer = CasePreparer(config.preprocess, self.targets, pad_to=config.model.patch_size,
                                cache_dir=config.data.cache_dir)
        self.prepared_train = preparer.prepare_all(self.train_cases, progress=show)
        if not self.prepared_train:
            raise InputError("no labelled training case labels any of the chosen organs", path="--labeled",
                             fix="check --labels against the datasets' label names")
        # Every rank holds the validation cases so all agree on whether there is validation (only rank 0 runs it).
        self.prepared_val = preparer.prepare_all(self.val_cases, progress=show)
        self.prepared_unlabeled = preparer.prepare_all(self.unlabeled_cases, with_label=False, progress=show)
        self.has_validation = bool(self.prepared_val)
        names = [case.case_id.split("/", 1)[-1] for case in self.unlabeled_cases]
        unique = len(set(names)) == len(names)
        self.pseudo_names = [name if unique else case.case_id.replace("/", "__")
                             for name, case in zip(names, self.unlabeled_cases)]

    # --- state ------------------------------------------------------------------------------------------
    @property
    def state_path(self) -> str:
        return os.path.join(self.run.root, STATE_FILE)

    def _write_state(self) -> None:
        if self.context.is_main:
            self.state["best_stage"], self.state["best_mean_dice"] = self.best_stage, self.best_mean_dice
            write_json_atomic(self.state_path, self.state)

    def _start_over(self) -> None:
        """A run started without --resume in a folder that holds one: its stages and models are replaced."""
        leftovers = [os.path.join(self.run.root, name) for name in (STATE_FILE, "stages", "pseudo_labels")]
        leftovers += [self.run.best_checkpoint, self.run.last_checkpoint]
        found = [path for path in leftovers if os.path.exists(path)]
        if not found or not self.context.is_main:
            return
        self.events.message(f"{self.run.root} held an earlier run; starting over (its stages, pseudo-labels and "
                            "checkpoints are replaced). Use --resume to continue a run instead.", level="warning")
        for path in found:
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)

    def _stage_folder(self, stage: Stage) -> _StageFolder:
        return _StageFolder(os.path.join(self.run.root, "stages", stage.name), self.run.stop_file)

    def _barrier(self) -> None:
        if self.context.distributed:
            import torch.distributed as dist

            dist.barrier()

    def _stop_requested(self) -> bool:
        flag = self.context.stop_file_seen(self.run.stop_file)
        if flag and self.context.is_main and os.path.exists(self.run.stop_file):
            os.remove(self.run.stop_file)
        return flag

    # --- checkpoints ------------------------------------------------------------------------------------
    def mirror(self, source: str, kind: str, step: int, stage: Stage) -> dict:
        """Make ``RUN/checkpoints/<kind>.pt`` the stage checkpoint ``source`` (a hard link: no copy)."""
        target = self.run.best_checkpoint if kind == "best" else self.run.last_checkpoint
        if self.context.is_main:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            temporary = target + ".tmp-link"
            if os.path.exists(temporary):
                os.remove(temporary)
            try:
                os.link(source, temporary)
            except OSError:  # file systems without hard links
                shutil.copyfile(source, temporary)
            os.replace(temporary, target)
        return self.events.emit("checkpoint", step=step, path=os.path.relpath(target, self.run.root), kind=kind,
                                stage=stage.name, round=stage.round)

    def set_best(self, stage: Stage, value: Optional[float]) -> None:
        self.best_mean_dice, self.best_stage = value, stage.name
        self._write_state()

    def _model_state(self, weights: Dict[str, torch.Tensor], best_metric: Optional[float]) -> Dict[str, Any]:
        """A checkpoint of this run (its config, labels, kind) holding ``weights`` (no optimiser)."""
        return {"kind": "selftrain", "model_config": self.config.to_dict()["model"], "labels": dict(self.labels),
                "model": weights, "extra": {}, "step": 0, "best_metric": best_metric, "config": self.config.to_dict()}

    def _best_so_far(self) -> Dict[str, torch.Tensor]:
        """The weights each round starts from and pseudo-labels with: best.pt, else (no validation) last.pt."""
        path = self.run.best_checkpoint
        if not (self.has_validation and os.path.exists(path)):
            path = self.run.last_checkpoint
        return load_checkpoint(path, map_location="cpu")["model"]

    # --- the run ----------------------------------------------------------------------------------------
    def execute(self, resume: bool) -> Dict[str, Any]:
        started = time.time()
        config, context, run = self.config, self.context, self.run
        if resume and os.path.exists(self.state_path):
            self.saved_state = run.read_json(self.state_path)
        self._check_inputs()
        if context.is_main:
            check_writable_folder(run.root, what="run folder")
        self._prepare()

        run.create()
        self.events = EventLog(run.events, to_stdout=self.events_stdout, enabled=context.is_main)
        self.events.listeners.extend(self.listeners)
        saved_state = self.saved_state
        if not resume:
            self._start_over()
        self._barrier()
        if saved_state is not None:
            self.plan = [Stage(**entry) for entry in saved_state["stages"]]
            self.state = saved_state
            self.best_stage = saved_state.get("best_stage")
            self.best_mean_dice = saved_state.get("best_mean_dice")
            if self.has_validation and os.path.exists(run.best_checkpoint):
                # best.pt is the truth: it may be newer than the state file (a run killed in between).
                self.best_mean_dice = load_checkpoint(run.best_checkpoint).get("best_metric", self.best_mean_dice)
        else:
            self.plan = stage_plan(self.settings["rounds"], config.train.max_steps, self.init_mode == "baseline")
            self.state = {"format": STATE_FORMAT, "stages": [asdict(stage) for stage in self.plan], "finished": [],
                          "best_stage": None, "best_mean_dice": None, "results": {}}
        self.total_steps = sum(stage.steps for stage in self.plan)
        offsets = np.cumsum([0] + [stage.steps for stage in self.plan]).tolist()
        finished = set(self.state["finished"])
        self.global_step = self._start_step(offsets, finished)

        if context.is_main:
            from .report.colors import colors_for

            write_json_atomic(run.config, config.to_dict())
            write_json_atomic(run.labels, self.labels)
            write_json_atomic(run.colors, {k: list(v) for k, v in colors_for(self.targets).items()})
            self._write_state()
        self._announce(resume, finished)
        self.events.emit("start", command="selftrain", run_dir=run.root, total_steps=self.total_steps,
                         start_step=self.global_step, device=str(context.device), world_size=context.world_size,
                         labels=list(self.targets), stages=[stage.name for stage in self.plan])
        stopped = False
        for index, stage in enumerate(self.plan):
            if stage.name in finished:
                continue
            if self._stop_requested():
                stopped = True
                break
            stopped = self._run_stage(stage, int(offsets[index]))
            if stopped:
                break
            finished.add(stage.name)
        summary = {"step": self.global_step, "stopped": stopped, "best_mean_dice": self.best_mean_dice,
                   "seconds": round(time.time() - started, 2), "best_stage": self.best_stage}
        self.events.emit("finished", **summary)
        summary.update(run_dir=run.root, stages=list(self.state["finished"]))
        return summary

    def _start_step(self, offsets: Sequence[int], finished: set) -> int:
        for index, stage in enumerate(self.plan):
            if stage.name not in finished:
                last = self._stage_folder(stage).last_checkpoint
                step = int(load_checkpoint(last).get("step", 0)) if os.path.exists(last) else 0
                return int(offsets[index]) + step
        return int(offsets[-1])

    def _announce(self, resume: bool, finished: set) -> None:
        events = self.events
        events.message(f"{len(self.prepared_train)} labelled training case(s), {len(self.prepared_val)} validation "
                       f"case(s), {len(self.unlabeled_cases)} unlabelled scan(s)")
        for note in self.skipped_notes:
            events.message(note)
        if self.init_mode and not finished:
            events.message(self.init_note)
        if not self.has_validation:
            text = ("no validation cases (fewer than three labelled cases and no --val-data): every round starts "
                    "from the previous stage, the final model is the last round's (checkpoints/last.pt) and no "
                    "best.pt is written. Give --val-data to keep the best round.")
            warnings.warn(text)
            events.message(text, level="warning")
        events.message("self-training settings: " + ", ".join(
            f"{key}={value}" for key, value in self.settings.items() if key != "name")
            + f"; {len(self.plan)} stage(s) of {self.config.train.max_steps} step(s)"
            + ("; resuming after " + ", ".join(sorted(finished)) if resume and finished else ""))

    def _run_stage(self, stage: Stage, offset: int) -> bool:
        """Run one stage to its end (True: a STOP file ended it early)."""
        summary = None
        if stage.name == "baseline" and stage.source == "init":
            self._baseline_from_init(stage)
            stage_best = self.best_mean_dice
        else:
            pseudo = None
            if stage.round > 0:
                pseudo = self._pseudo_labels(stage)
                if pseudo is None or self._stop_requested():
                    return True
            trainer = self._trainer(stage, offset, pseudo)
            summary = trainer.fit(resume=os.path.exists(trainer.run.last_checkpoint))
            self.global_step = offset + trainer.step
            if summary["stopped"]:
                return True
            stage_best = trainer.best_metric
        self._finish_stage(stage, stage_best)
        return False

    def _trainer(self, stage: Stage, offset: int, pseudo: Optional[Tuple[List[PreparedCase], Dict]]) -> Trainer:
        config, settings = self.config, self.settings
        folder = self._stage_folder(stage)
        fresh = not os.path.exists(folder.last_checkpoint)
        if stage.round == 0:
            torch.manual_seed(config.train.seed)  # as finetune: the baseline is a finetune run
        else:
            torch.manual_seed(int(np.random.default_rng([config.train.seed, 7, stage.round]).integers(2**62)))
        backbone = build_backbone(config.model)
        if fresh and stage.round == 0 and self.init_mode == "encoder":
            initialise_encoder(backbone, config.init_checkpoint, self.run, self.events, self.context.is_main)
        elif fresh and stage.round > 0:
            backbone.load_state_dict(self._best_so_far())
        length = config.train.max_steps * config.train.batch_size * config.train.grad_accumulation
        length *= self.context.world_size
        labeled = PatchSampler(self.prepared_train, config.model.patch_size, config.train.foreground_ratio)
        if stage.round == 0:
            objective = SupervisedObjective(backbone)
            dataset = SupervisedPatches(labeled, config.train.seed, length, augment=True)
        else:
            kept = pseudo[0]
            objective = SelfTrainingObjective(backbone, contrastive_weight=settings["contrastive_weight"],
                                              tau=settings["tau"], matching=settings["matching"],
                                              embedding_dim=settings["embedding_dim"])
            unlabeled = PatchSampler(kept, config.model.patch_size, config.train.foreground_ratio) if kept else None
            dataset = JointPairs(labeled, unlabeled, config.train.seed, length, len(self.targets),
                                 settings["anchors_per_class"], stream=stage.round, augment=True)
        validate = None
        if self.has_validation:
            validate = make_validator(self.prepared_val, self.targets, config.model.patch_size, config.train.sw_overlap)
        events = _StageEvents(self, stage, offset, folder.root)
        self.events.emit("stage", stage=stage.name, round=stage.round, step=offset, steps=stage.steps,
                         resumed=not fresh)
        return Trainer(folder, config, objective, dataset, self.context, events, kind="selftrain",
                       labels=self.labels, validate=validate)

    def _baseline_from_init(self, stage: Stage) -> None:
        """The --init model is the baseline: validate it, and make it the run's first best / last model."""
        self.events.emit("stage", stage=stage.name, round=0, step=self.global_step, steps=0, resumed=False)
        mean = None
        if self.context.is_main:
            backbone = build_backbone(self.config.model)
            backbone.load_state_dict(self.init_weights)
            if self.has_validation:
                backbone = backbone.to(self.context.device).eval()
                validate = make_validator(self.prepared_val, self.targets, self.config.model.patch_size,
                                          self.config.train.sw_overlap)
                with torch.no_grad():
                    result = validate(backbone, 0)
                mean = result.get("mean_dice")
                self.events.emit("validation", step=self.global_step, dice=result.get("dice", {}), mean_dice=mean,
                                 best=mean is not None, stage=stage.name, round=0)
            weights = {k: v.detach().cpu() for k, v in self.init_weights.items()}
            save_checkpoint(self.run.last_checkpoint, self._model_state(weights, mean))
            self.events.emit("checkpoint", step=self.global_step, path="checkpoints/last.pt", kind="last",
                             stage=stage.name, round=0)
            if mean is not None:
                save_checkpoint(self.run.best_checkpoint, self._model_state(weights, mean))
                self.events.emit("checkpoint", step=self.global_step, path="checkpoints/best.pt", kind="best",
                                 stage=stage.name, round=0)
        if mean is not None:
            self.best_mean_dice, self.best_stage = float(mean), stage.name
        self._barrier()

    def _finish_stage(self, stage: Stage, stage_best: Optional[float]) -> None:
        if not self.has_validation:
            self.best_stage = stage.name  # without validation the latest stage is the model
        result: Dict[str, Any] = {
            "round": stage.round, "stage": stage.name, "source": stage.source, "step": self.global_step,
            "mean_dice": stage_best, "dice": self._stage_dice(stage, stage_best),
            "best": self.best_stage == stage.name, "best_mean_dice": self.best_mean_dice,
            "best_stage": self.best_stage}
        pseudo = self.state["results"].get(stage.name, {}).get("pseudo_labels")
        if pseudo:
            result["pseudo_labels"] = pseudo
        self.events.emit("round", **result)
        self.state["results"][stage.name] = result
        self.state["finished"].append(stage.name)
        self._write_state()
        if self.context.is_main and not self.settings["keep_stage_folders"]:
            # Only --resume of an unfinished stage needs its folder; RUN/checkpoints holds hard links to the
            # models still needed and RUN/pseudo_labels the pseudo-labels to look at.
            shutil.rmtree(self._stage_folder(stage).root, ignore_errors=True)
            stages = os.path.dirname(self._stage_folder(stage).root)
            if os.path.isdir(stages) and not os.listdir(stages):
                os.rmdir(stages)
        self._barrier()

    def _stage_dice(self, stage: Stage, stage_best: Optional[float]) -> Dict[str, Optional[float]]:
        """Per-organ Dice of the stage's best validation, from the events (which survive a resume)."""
        if stage_best is None or not self.context.is_main:
            return {}
        for event in reversed(read_events(self.run.events)):
            if event.get("event") == "validation" and event.get("stage") == stage.name \
                    and event.get("mean_dice") == stage_best:
                return dict(event.get("dice") or {})
        return {}

    # --- pseudo-labels ----------------------------------------------------------------------------------
    def _pseudo_labels(self, stage: Stage) -> Optional[Tuple[List[PreparedCase], Dict]]:
        """The kept unlabelled cases with their pseudo-labels (network grid) and the round's summary.

        None when a STOP file interrupted the labelling.
        """
        cache = os.path.join(self._stage_folder(stage).root, "pseudo_labels.npz")
        case_ids = [case.case_id for case in self.unlabeled_cases]
        summary_path = os.path.join(self.run.root, "pseudo_labels", f"round_{stage.round}", "summary.json")
        if os.path.exists(cache) and os.path.exists(summary_path):
            with np.load(cache) as stored:
                if [str(c) for c in stored["case_ids"]] == case_ids:
                    kept = [PreparedCase(prepared.case_id, prepared.image, stored[f"label_{index}"][None],
                                         prepared.affine)
                            for index, prepared in enumerate(self.prepared_unlabeled) if bool(stored["kept"][index])]
                    summary = self.run.read_json(summary_path)
                    short = {key: value for key, value in summary.items() if key != "cases"}
                    self.state["results"][stage.name] = {"pseudo_labels": short}
                    return kept, short
        return self._predict_pseudo_labels(stage, cache)

    def _predict_pseudo_labels(self, stage: Stage, cache: str) -> Optional[Tuple[List[PreparedCase], Dict]]:
        from tqdm.auto import tqdm

        from .report.colors import colors_for

        config, settings, is_main = self.config, self.settings, self.context.is_main
        use_amp = bool(config.train.amp) and self.context.device.type == "cuda"
        threshold = settings["agreement_threshold"]
        backbone = build_backbone(config.model)
        backbone.load_state_dict(self._best_so_far())
        backbone = backbone.to(self.context.device).eval()
        folder = os.path.join(self.run.root, "pseudo_labels", f"round_{stage.round}")
        names = {int(value): name for value, name in self.labels.items() if value != "0"}
        colors = colors_for(self.targets)
        if is_main:
            if os.path.isdir(folder):
                shutil.rmtree(folder)  # a half-written round from an interrupted run
            os.makedirs(folder)
            write_json_atomic(os.path.join(folder, "labels.json"), self.labels)
            write_json_atomic(os.path.join(folder, "colors.json"), {k: list(v) for k, v in colors.items()})
        self.events.message(f"round {stage.round}: pseudo-labelling {len(self.unlabeled_cases)} scan(s) with the "
                            f"model of stage {self.best_stage or 'baseline'}")
        entries, kept, grids = [], [], {}
        totals = {name: 0 for name in self.targets}
        bar = tqdm(total=len(self.unlabeled_cases), desc=f"pseudo-labels round {stage.round}", unit="scan",
                   disable=not (self.progress and is_main) or self.events.to_stdout, leave=False)
        for index, (case, prepared) in enumerate(zip(self.unlabeled_cases, self.prepared_unlabeled)):
            if self._stop_requested():
                bar.close()
                return None
            probabilities = class_probabilities(backbone, prepared.image, config.model.patch_size,
                                                config.train.sw_overlap, use_amp)
            grid_labels = probabilities.argmax(0).to(torch.uint8).cpu().numpy()
            agreement = None
            if threshold is not None:
                agreement = augmented_agreement(backbone, prepared.image, len(self.targets), config.model.patch_size,
                                                config.train.sw_overlap, [config.train.seed, stage.round, index],
                                                use_amp)
            keep = threshold is None or (agreement is not None and agreement > threshold)
            entry = {"case": case.case_id, "image": case.image, "agreement": agreement, "kept": keep}
            if is_main:
                filename = f"{self.pseudo_names[index]}.{settings['pseudo_label_format']}"
                entry["file"] = filename
                entry["voxels"] = write_pseudo_label(os.path.join(folder, filename), probabilities, prepared.affine,
                                                     case.image, names, colors)
                if keep:
                    for name, count in entry["voxels"].items():
                        totals[name] += count
            entries.append(entry)
            grids[f"label_{index}"] = grid_labels
            if keep:
                kept.append(PreparedCase(prepared.case_id, prepared.image, grid_labels[None], prepared.affine))
            bar.update(1)
        bar.close()
        summary = {"round": stage.round, "folder": os.path.relpath(folder, self.run.root),
                   "model_stage": self.best_stage or "baseline", "agreement_threshold": threshold,
                   "volumes": len(entries), "kept": len(kept), "filtered": len(entries) - len(kept),
                   "voxels": totals, "cases": entries}
        short = {key: value for key, value in summary.items() if key != "cases"}
        if is_main:
            write_json_atomic(os.path.join(folder, "summary.json"), summary)
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            temporary = cache + ".tmp.npz"
            np.savez_compressed(temporary, case_ids=np.array([case.case_id for case in self.unlabeled_cases]),
                                kept=np.array([entry["kept"] for entry in entries], dtype=bool), **grids)
            os.replace(temporary, cache)
        self.state["results"][stage.name] = {"pseudo_labels": short}
        self._write_state()
        self.events.emit("pseudo_labels", stage=stage.name, step=self.global_step, **short)
        if not kept:
            self.events.message(f"round {stage.round}: no unlabelled scan passed the agreement filter "
                                f"(threshold {threshold}); this round trains on the labelled cases only",
                                level="warning")
        self._barrier()
        return kept, short
