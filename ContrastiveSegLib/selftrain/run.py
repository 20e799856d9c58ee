"""Stage 3 and the whole run: joint training rounds, the stage loop, state, checkpoints and resume."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import asdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import RunConfig, software_versions
from ..data.catalog import Case, check_target_names, load_datasets
from ..data.labels import output_label_map
from ..data.preprocess import CasePreparer, PreparedCase
from ..data.sampling import PatchAugmenter, PatchSampler, SupervisedPatches
from ..engine.checkpoint import load_checkpoint, load_pretrained_weights
from ..engine.device import DistributedContext, distributed
from ..engine.events import EventLog, read_events
from ..engine.runfolder import RunFolder, check_writable_folder, write_json_atomic
from ..engine.trainer import Trainer
from ..errors import InputError
from ..finetune import augmentation_options, make_validator, prepare_intensity_statistics, report_init, split_cases
from ..methods.selftrain import DEFAULTS, JointPairs, SelfTrainingObjective, check_settings
from ..methods.supervised import SupervisedObjective
from ..models import build_backbone
from .baseline import BaselineStage
from .pseudo_labels import PseudoLabelStage
from .stages import STATE_FILE, STATE_FORMAT, Stage, _StageEvents, _StageFolder, stage_plan
from .unlabeled import load_unlabeled_cases


def selftrain_settings(overrides: Iterable[str] = (), **explicit) -> Dict[str, Any]:
    """``DEFAULTS`` updated with ``--set KEY=VALUE`` strings and explicit (typed) values; None keeps the default."""
    from ..pretrain import merge_settings

    settings = merge_settings(DEFAULTS, "selftrain", overrides, explicit)
    check_settings(settings)
    return settings


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


class _SelfTraining(BaselineStage, PseudoLabelStage):
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

    def _prepare(self) -> None:
        config, show = self.config, self.progress and self.context.is_main
        # ct_zscore: the labelled cases' foreground statistics, once per run (kept on resume).
        prepare_intensity_statistics(config, self.train_cases, self.targets)
        preparer = CasePreparer(config.preprocess, self.targets, pad_to=config.model.patch_size,
                                cache_dir=config.data.cache_dir)
        self.prepared_train = preparer.prepare_all(self.train_cases, progress=show)
        if not self.prepared_train:
            raise InputError("no labelled training case labels any of the chosen organs", path="--labeled",
                             fix="check --labels against the datasets' label names")
        # Every rank holds the validation cases so all agree on whether there is validation (only rank 0 runs it).
        # Unpadded, as finetune's: the sliding window meets a thin case's ends as predict's does.
        self.prepared_val = CasePreparer(config.preprocess, self.targets,
                                         cache_dir=config.data.cache_dir).prepare_all(self.val_cases, progress=show)
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
            from ..report.colors import colors_for

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
            report = load_pretrained_weights(backbone, config.init_checkpoint, encoder_only=True)
            report_init(config.init_checkpoint, report, self.run, self.events, self.context.is_main)
        elif fresh and stage.round > 0:
            backbone.load_state_dict(self._best_so_far())
        length = config.train.max_steps * config.train.batch_size * config.train.grad_accumulation
        length *= self.context.world_size
        labeled = PatchSampler(self.prepared_train, config.model.patch_size, config.train.foreground_ratio)
        if stage.round == 0:
            objective = SupervisedObjective(backbone, dice=config.train.dice)
            dataset = SupervisedPatches(labeled, config.train.seed, length, augment=True,
                                        **augmentation_options(config, self.targets))
        else:
            kept = pseudo[0]
            objective = SelfTrainingObjective(backbone, contrastive_weight=settings["contrastive_weight"],
                                              tau=settings["tau"], matching=settings["matching"],
                                              embedding_dim=settings["embedding_dim"])
            unlabeled = PatchSampler(kept, config.model.patch_size, config.train.foreground_ratio) if kept else None
            dataset = JointPairs(labeled, unlabeled, config.train.seed, length, len(self.targets),
                                 settings["anchors_per_class"], stream=stage.round,
                                 augmenter=PatchAugmenter(**augmentation_options(config, self.targets)))
        validate = None
        if self.has_validation:
            validate = make_validator(self.prepared_val, self.targets, config.model.patch_size, config.train.sw_overlap)
        events = _StageEvents(self, stage, offset, folder.root)
        self.events.emit("stage", stage=stage.name, round=stage.round, step=offset, steps=stage.steps,
                         resumed=not fresh)
        # Only the baseline starts from an --init encoder alone; a round starts from a whole trained model.
        encoder_initialised = stage.round == 0 and self.init_mode == "encoder"
        return Trainer(folder, config, objective, dataset, self.context, events, kind="selftrain",
                       labels=self.labels, validate=validate, encoder_initialised=encoder_initialised)

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
