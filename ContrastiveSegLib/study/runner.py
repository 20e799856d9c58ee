"""Run a study: every cell a run folder under ``STUDY/cells/``, reused when finished, resumed when not.

Layout of ``STUDY/``::

    study.json                      the settings and every cell (finished ones with their scores),
                                    rewritten atomically after each cell, so an interrupted study
                                    leaves a consistent file
    study.csv, study.png, report.md the results (see :mod:`.report`)
    subsets/n<N>_seed<S>/train/<dataset>/dataset.json   the training cases of (N, S), shared by all arms
    subsets/n<N>_seed<S>/val/<dataset>/dataset.json     its validation cases (``--val-count``)
    cells/<arm>_n<N>_seed<S>/cell.json      what the cell trains and scores (read by the worker)
    cells/<arm>_n<N>_seed<S>/run/           the finetune / selftrain run folder
    cells/<arm>_n<N>_seed<S>/run/checkpoints/step_<K>.pt   the checkpoints that are scored
    cells/<arm>_n<N>_seed<S>/predictions/   the scored label maps, on each test image's grid
    cells/<arm>_n<N>_seed<S>/trained.json   training finished (steps, seconds)
    cells/<arm>_n<N>_seed<S>/result.json    the cell's scores: the cell is finished
    cells/<arm>_n<N>_seed<S>/worker.log     the cell process's output (--gpus only)

On the CPU (or one device) the cells run one after another in this process.
With ``--gpus 0,1,...`` one worker subprocess per GPU takes the next cell when
its previous one is done, so no two processes ever share a device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import RunConfig
from ..data.catalog import Case, check_target_names, load_datasets
from ..engine.checkpoint import load_checkpoint
from ..engine.runfolder import RunFolder, check_writable_folder, write_json_atomic
from ..errors import InputError
from .design import (
    Arm,
    Budget,
    Cell,
    Subset,
    check_no_leak,
    checkpoint_steps,
    draw_subsets,
    study_cells,
)

STUDY_FORMAT = 1
# Settings that do not change what a cell computes, so a study may be continued with others.
FREE_SETTINGS = ("device", "num_workers", "cache_dir")


@dataclass
class StudyPlan:
    """Everything a study needs, checked: what ``contrastiveseg study`` parsed from its command line."""

    out: str
    data: List[str]
    test_data: List[str]
    targets: List[str]
    counts: List[int]
    seeds: List[int]
    arms: List[Arm]
    budget: Budget
    config: RunConfig                           # network, preprocessing and optimisation of every cell
    fractions: List[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    val_count: int = 0
    unlabeled: List[str] = field(default_factory=list)
    gpus: List[int] = field(default_factory=list)


@dataclass
class LoadedData:
    pool: Dict[str, Case]        # labelled cases the subsets are drawn from, by id
    test: List[Case]


def load_study_data(plan: StudyPlan) -> LoadedData:
    """Read ``--data`` and ``--test-data`` (one catalog, so case ids are unique) and check them."""
    if not plan.test_data:
        raise InputError("no test data given", path="--test-data",
                         fix="give --test-data DATASET: labelled scans that are never trained on")
    # Leaks first, from each side read on its own (the joint read below refuses a shared file less helpfully).
    check_no_leak({case.case_id: case.image for dataset in load_datasets(plan.data) for case in dataset.cases},
                  {case.case_id: case.image for dataset in load_datasets(plan.test_data) for case in dataset.cases},
                  plan.unlabeled)
    datasets = load_datasets(list(plan.data) + list(plan.test_data))
    training, testing = datasets[:len(plan.data)], datasets[len(plan.data):]
    check_target_names(training, plan.targets)
    check_target_names(testing, plan.targets)
    pool = {case.case_id: case for dataset in training for case in dataset.cases}
    test = [case for dataset in testing for case in dataset.cases]
    for dataset in training + testing:
        if not dataset.label_map:
            raise InputError("names its organs only inside .seg.nrrd files; a study needs the names in "
                             "dataset.json or labels.json", path=dataset.source,
                             fix="add a labels.json (value -> name) next to the label files")
    return LoadedData(pool, test)


def write_subset_specs(root: str, subset: Subset, pool: Dict[str, Case]) -> Dict[str, List[str]]:
    """Write the subset's cases as dataset.json files (one per source dataset, keeping its name and labels).

    Returns:
        ``{"train": [dataset.json, ...], "val": [...]}``, the specs finetune / selftrain are given.
        The catalog names a case after its dataset and file, so the ids the run sees are the ids
        of the pool.
    """
    specs: Dict[str, List[str]] = {"train": [], "val": []}
    for role, ids in (("train", subset.train_ids), ("val", subset.val_ids)):
        by_dataset: Dict[str, List[Case]] = {}
        for case_id in ids:
            by_dataset.setdefault(pool[case_id].dataset, []).append(pool[case_id])
        for name, cases in sorted(by_dataset.items()):
            folder = os.path.join(root, subset.key, role, name)
            labels = {organ: values for organ, values in cases[0].label_map.items()}
            labels["background"] = 0
            write_json_atomic(os.path.join(folder, "dataset.json"), {
                "name": name, "labels": labels,
                "training": [{"image": os.path.abspath(case.image), "label": os.path.abspath(case.label)}
                             for case in cases]})
            specs[role].append(os.path.join(folder, "dataset.json"))
    return specs


def stage_steps_of(arm: Arm, total_steps: int) -> Tuple[int, int]:
    """``(steps of one training stage, stages)``: the whole budget, or self-training's budget split over its stages.

    Self-training trains a baseline and then ``rounds`` rounds; the budget is shared equally
    between those stages so that every arm gets (up to rounding down) the same number of
    optimisation steps.
    """
    if arm.kind != "selftrain":
        return total_steps, 1
    from ..selftrain import selftrain_settings

    stages = int(selftrain_settings(arm.settings)["rounds"]) + 1
    if total_steps < stages:
        raise InputError(f"{total_steps} steps cannot be split over self-training's {stages} stages", path="--budget",
                         fix="give a larger --budget, or fewer rounds (--arm selftrain:rounds=1)")
    return total_steps // stages, stages


def measure_seconds(config: RunConfig, targets: Sequence[str], steps: int = 3) -> Dict[str, float]:
    """Seconds of one training step and of one sliding-window batch of prediction, measured on random data.

    The network, patch, batch size and device are those of ``config``; one step is run first
    and not counted (allocation, kernel choice).
    """
    from ..engine.device import choose_device
    from ..methods.supervised import SupervisedObjective
    from ..models import build_backbone

    model_config = dataclasses.replace(config.model, out_channels=len(targets) + 1)
    device = choose_device(config.device)
    generator = torch.Generator().manual_seed(0)
    objective = SupervisedObjective(build_backbone(model_config)).to(device)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=config.train.lr)
    shape = (config.train.batch_size, 1, *model_config.patch_size)
    batch = {"image": torch.rand(shape, generator=generator).to(device),
             "label": torch.randint(0, len(targets) + 1, shape, generator=generator).to(device)}

    def one_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for _ in range(config.train.grad_accumulation):
            loss, _ = objective(batch)
            loss.backward()
        optimizer.step()

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    one_step()
    synchronise()
    started = time.perf_counter()
    for _ in range(steps):
        one_step()
    synchronise()
    step_seconds = (time.perf_counter() - started) / steps
    objective.eval()
    window_batch = torch.rand((2, 1, *model_config.patch_size), generator=generator).to(device)
    with torch.no_grad():
        objective.backbone(window_batch)
        synchronise()
        started = time.perf_counter()
        objective.backbone(window_batch)
        synchronise()
    return {"step": step_seconds, "window_pair": time.perf_counter() - started}


def prediction_windows(case: Case, config: RunConfig, overlap: float = 0.5) -> int:
    """Sliding windows ``predict`` runs on a case: its size on the training grid, tiled with ``overlap``."""
    import SimpleITK as sitk

    if os.path.isdir(case.image):
        from ..data.io import read_image

        image = read_image(case.image)
        size, spacing = image.GetSize(), image.GetSpacing()
    else:
        reader = sitk.ImageFileReader()
        reader.SetFileName(case.image)
        reader.ReadImageInformation()
        size, spacing = reader.GetSize(), reader.GetSpacing()
    windows = 1
    for length, mm, target, patch in zip(size, spacing, config.preprocess.spacing, config.model.patch_size):
        voxels = length * mm / target
        stride = max(1, int(patch * (1 - overlap)))
        windows *= 1 if voxels <= patch else int(math.ceil((voxels - patch) / stride)) + 1
    return windows


# --- one cell ----------------------------------------------------------------------------------------------
def run_cell(cell_dir: str, device: Optional[str] = None, listeners: Sequence[Callable[[dict], None]] = ()) -> Dict:
    """Train (or continue) and score the cell described by ``cell_dir/cell.json``; returns its result.

    ``device`` overrides the configured device (the GPU workers give theirs).  ``listeners``
    receive the run's events (tests use them to interrupt a cell).  A cell whose
    ``result.json`` exists is not touched.  Training is resumed from ``run/checkpoints/last.pt``
    when the run was interrupted; the scoring is redone whole (it is the cheap part).
    """
    result_path = os.path.join(cell_dir, "result.json")
    if os.path.exists(result_path):
        with open(result_path, encoding="utf-8") as handle:
            return json.load(handle)
    with open(os.path.join(cell_dir, "cell.json"), encoding="utf-8") as handle:
        spec = json.load(handle)
    arm = Arm(**spec["arm"])
    config = RunConfig.from_dict(spec["config"])
    if device:
        config.device = device
    run = RunFolder(os.path.join(cell_dir, "run"))
    trained_path = os.path.join(cell_dir, "trained.json")
    if not os.path.exists(trained_path):
        summary = _train_cell(spec, arm, config, run, listeners)
        if summary["stopped"]:
            return {"stopped": True}
        write_json_atomic(trained_path, {"steps": summary["step"], "seconds": training_seconds(run.events)})
    with open(trained_path, encoding="utf-8") as handle:
        trained = json.load(handle)

    from ..engine.device import choose_device
    from .scoring import mean_over_cases, score_checkpoint

    test_cases = [Case(**case) for case in spec["test_cases"]]
    targets = list(spec["targets"])
    started = time.time()
    points = []
    wanted = [(f"{int(round(100 * f))}%", f, step) for f, step in zip(spec["fractions"], spec["score_steps"])]
    if spec["val_case_ids"] and os.path.exists(run.best_checkpoint):
        wanted.append(("best on validation", None, None))
    for label, fraction, step in wanted:
        checkpoint = run.best_checkpoint if step is None else os.path.join(run.checkpoints, f"step_{step:06d}.pt")
        if step is None:
            step = int(load_checkpoint(checkpoint, map_location="cpu").get("step", 0))
        folder = os.path.join(cell_dir, "predictions", "best" if fraction is None else f"step_{step:06d}")
        scores = score_checkpoint(checkpoint, test_cases, targets, choose_device(config.device), folder)
        points.append({"point": label, "fraction": fraction, "step": step,
                       "checkpoint": os.path.relpath(checkpoint, cell_dir), "cases": scores,
                       **mean_over_cases(scores, targets)})
    result = {"status": "finished", "arm": arm.name, "n": spec["count"], "seed": spec["seed"],
              "train_case_ids": spec["train_case_ids"], "val_case_ids": spec["val_case_ids"],
              "test_case_ids": [case.case_id for case in test_cases], "steps": trained["steps"],
              "seconds": trained["seconds"], "scoring_seconds": round(time.time() - started, 2),
              "run_dir": os.path.relpath(run.root, os.path.dirname(os.path.dirname(cell_dir))),
              "points": points}
    write_json_atomic(result_path, result)
    return result


def training_seconds(events_path: str) -> float:
    """Wall-clock seconds a run trained, summed over its sessions (an interrupted and resumed run has several).

    Each session runs from its ``start`` event to the last event before the next ``start``.
    """
    from ..engine.events import read_events

    total, began, last = 0.0, None, None
    for event in read_events(events_path):
        if event["event"] == "start":
            if began is not None:
                total += last - began
            began = event["time"]
        last = event["time"]
    if began is not None:
        total += last - began
    return round(total, 2)


def _train_cell(spec: Dict, arm: Arm, config: RunConfig, run: RunFolder,
                listeners: Sequence[Callable[[dict], None]]) -> Dict:
    """Run finetune or selftrain for the cell; every scored step's ``last.pt`` is kept as ``step_<K>.pt``."""
    score_steps = set(int(step) for step in spec["score_steps"])

    def keep_scored_checkpoint(event: dict) -> None:
        if event.get("event") == "checkpoint" and event.get("kind") == "last" and event.get("step") in score_steps:
            target = os.path.join(run.checkpoints, f"step_{int(event['step']):06d}.pt")
            temporary = target + ".tmp"
            shutil.copyfile(run.last_checkpoint, temporary)
            os.replace(temporary, target)

    all_listeners = [keep_scored_checkpoint, *listeners]
    if arm.kind == "selftrain":
        from ..selftrain import run_selftrain

        resume = os.path.exists(run.config)
        return run_selftrain(config, run.root, resume=resume, listeners=all_listeners, progress=False)
    from ..finetune import run_finetune

    resume = os.path.exists(run.last_checkpoint)
    if not resume and os.path.isdir(run.root):
        shutil.rmtree(run.root)  # interrupted before its first checkpoint: nothing to continue
    return run_finetune(config, run.root, resume=resume, listeners=all_listeners, progress=False)


def cell_spec(plan: StudyPlan, cell: Cell, arm: Arm, subset: Subset, specs: Dict[str, List[str]],
              test: Sequence[Case], budget_steps: int) -> Dict:
    """The ``cell.json`` of a cell: its run's settings, its cases and the steps that are scored."""
    stage_steps, stages = stage_steps_of(arm, budget_steps)
    total_steps = stage_steps * stages
    score_steps, interval = checkpoint_steps(total_steps, plan.fractions, stage_steps)
    config = RunConfig.from_dict(plan.config.to_dict())
    config.command = "selftrain" if arm.kind == "selftrain" else "finetune"
    config.data.datasets = list(specs["train"])
    config.data.val_datasets = list(specs["val"])
    config.data.val_fraction = 0.0      # the study sets validation aside itself (--val-count), the same for all arms
    config.data.labels = list(plan.targets)
    config.train.seed = cell.seed
    config.train.max_steps = stage_steps
    config.train.checkpoint_every = interval
    config.train.val_every = interval if subset.val_ids else 0
    config.init_checkpoint = arm.checkpoint
    if arm.kind == "selftrain":
        from ..selftrain import selftrain_settings

        config.data.unlabeled = list(plan.unlabeled)
        config.method = selftrain_settings(arm.settings)
    return {"arm": dataclasses.asdict(arm), "count": cell.count, "seed": cell.seed,
            "train_case_ids": subset.train_ids, "val_case_ids": subset.val_ids,
            "test_cases": [dataclasses.asdict(case) for case in test], "targets": list(plan.targets),
            "fractions": [score / total_steps for score in score_steps], "score_steps": score_steps,
            "config": config.to_dict()}


# --- the study ---------------------------------------------------------------------------------------------
def _settings_record(plan: StudyPlan, budget_steps: int, data: LoadedData) -> Dict:
    config = json.loads(json.dumps(plan.config.to_dict()))  # as study.json will hold it (tuples become lists)
    return {"labels": plan.targets, "counts": plan.counts, "seeds": plan.seeds,
            "arms": [dataclasses.asdict(arm) for arm in plan.arms], "budget": dataclasses.asdict(plan.budget),
            "budget_steps": budget_steps, "score_at": plan.fractions, "val_count": plan.val_count,
            "data": plan.data, "test_data": plan.test_data, "unlabeled": plan.unlabeled,
            "pool_case_ids": sorted(data.pool), "test_case_ids": [case.case_id for case in data.test],
            "model": config["model"], "preprocess": config["preprocess"],
            "train": {k: v for k, v in config["train"].items()
                      if k not in ("max_steps", "seed", "checkpoint_every", "val_every") + FREE_SETTINGS}}


def _check_continuation(previous: Dict, current: Dict, path: str) -> None:
    """A study folder may be continued (more counts, seeds or arms) but not with other cell settings."""
    for key in ("labels", "budget_steps", "score_at", "val_count", "model", "preprocess", "train",
                "pool_case_ids", "test_case_ids"):
        if previous.get(key) != current.get(key):
            raise InputError(f"was started with another {key!r} ({previous.get(key)!r}, now {current.get(key)!r})",
                             path=path, fix="give the same settings to continue this study, or a new --out")


def run_study(plan: StudyPlan, dry_run: bool = False, log: Callable[[str], None] = print,
              cell_listeners: Sequence[Callable[[dict], None]] = ()) -> Dict:
    """Plan, run (or, with ``dry_run``, only print) and report a study; returns the content of study.json."""
    data = load_study_data(plan)
    if any(arm.kind == "selftrain" for arm in plan.arms) and not plan.unlabeled:
        raise InputError("a selftrain arm needs unlabelled scans", path="--unlabeled",
                         fix="give --unlabeled FOLDER (scans that are neither training nor test cases)")
    for arm in plan.arms:
        if arm.kind == "selftrain" and arm.checkpoint:
            kind = load_checkpoint(arm.checkpoint).get("kind")
            if kind != "pretrain":
                # A finetune model as init would replace self-training's baseline stage, so the arm
                # would train fewer steps than the others and miss the scored points.
                raise InputError(f"is a {kind!r} checkpoint; a selftrain arm starts from a pretrain run",
                                 path=arm.checkpoint, fix="give --arm selftrain:init=PRETRAIN_RUN")
    subsets = draw_subsets(list(data.pool), plan.counts, plan.seeds, plan.val_count)
    cells = study_cells(plan.arms, plan.counts, plan.seeds)
    arms = {arm.name: arm for arm in plan.arms}
    study_path = os.path.join(plan.out, "study.json")
    previous = None
    if os.path.exists(study_path):
        with open(study_path, encoding="utf-8") as handle:
            previous = json.load(handle)

    measured = None
    if plan.budget.kind == "steps":
        budget_steps = int(plan.budget.value)
    elif previous is not None:
        budget_steps = int(previous["settings"]["budget_steps"])   # a minutes budget is fixed once, when started
    else:
        measured = measure_seconds(plan.config, plan.targets)
        budget_steps = max(1, int(plan.budget.value * 60 / measured["step"]))
    settings = _settings_record(plan, budget_steps, data)
    if previous is not None:
        _check_continuation(previous["settings"], settings, study_path)

    if dry_run:
        measured = measured or measure_seconds(plan.config, plan.targets)
        _print_plan(plan, cells, subsets, data, budget_steps, measured, log)
        return {"settings": settings, "cells": []}

    check_writable_folder(plan.out, what="study folder")
    if plan.config.data.cache_dir is None:
        plan.config.data.cache_dir = os.path.join(plan.out, "cache")  # each case is preprocessed once per study
    cell_dirs: Dict[str, str] = {}
    for cell in cells:
        subset = subsets[(cell.count, cell.seed)]
        specs = write_subset_specs(os.path.join(plan.out, "subsets"), subset, data.pool)
        cell_dir = os.path.join(plan.out, "cells", cell.key)
        os.makedirs(cell_dir, exist_ok=True)
        spec = cell_spec(plan, cell, arms[cell.arm], subset, specs, data.test, budget_steps)
        spec_path = os.path.join(cell_dir, "cell.json")
        if not os.path.exists(os.path.join(cell_dir, "result.json")):
            write_json_atomic(spec_path, spec)
        cell_dirs[cell.key] = cell_dir

    todo_before = [cell for cell in cells if not os.path.exists(os.path.join(cell_dirs[cell.key], "result.json"))]
    if todo_before:
        check_label_files(plan, data, log)

    results: Dict[str, Dict] = {}
    lock = threading.Lock()

    def record(cell: Cell, result: Optional[Dict]) -> None:
        with lock:
            if result and result.get("status") == "finished":
                results[cell.key] = result
            _write_study(plan, settings, cells, subsets, results, cell_dirs)

    for cell in cells:
        if os.path.exists(os.path.join(cell_dirs[cell.key], "result.json")):
            record(cell, run_cell(cell_dirs[cell.key]))
    todo = [cell for cell in cells if cell.key not in results]
    log(f"study: {len(cells)} cell(s), {len(cells) - len(todo)} already finished, {len(todo)} to run; "
        f"{budget_steps} steps each")
    stopped = False
    try:
        if plan.gpus:
            failures = _run_on_gpus(todo, cell_dirs, plan.gpus, record, log)
            if failures:
                raise RuntimeError("cell(s) failed: " + "; ".join(failures))
        else:
            for number, cell in enumerate(todo, start=1):
                log(f"cell {number}/{len(todo)}: {cell.key}")
                result = run_cell(cell_dirs[cell.key], listeners=cell_listeners)
                if result.get("stopped"):
                    stopped = True
                    log(f"cell {cell.key} stopped by its STOP file; run the same command again to continue")
                    break
                record(cell, result)
    finally:
        with lock:  # study.json as it stands, also after Ctrl-C or a failure
            study = _write_study(plan, settings, cells, subsets, results, cell_dirs)
    if results and not stopped:
        from .report import write_report

        write_report(plan.out, study)
    return study


def check_label_files(plan: StudyPlan, data: LoadedData, log: Callable[[str], None]) -> None:
    """Preprocess every labelled case once, before any cell trains, so a bad label file stops the study at once.

    The training cases go to the study's cache, where the cells find them; the test cases are
    only checked here (they are scored from their files).
    """
    from ..data.preprocess import CasePreparer

    log(f"checking and preprocessing {len(data.pool)} labelled and {len(data.test)} test case(s)")
    preprocess = plan.config.preprocess
    if preprocess.intensity == "ct_zscore" and not preprocess.intensity_stats:
        # Each cell computes ct_zscore statistics from its own training subset; reading and checking
        # every file does not depend on them.
        preprocess = dataclasses.replace(preprocess, intensity="ct_window")
    preparer = CasePreparer(preprocess, plan.targets, pad_to=plan.config.model.patch_size,
                            cache_dir=plan.config.data.cache_dir)
    for case in list(data.pool.values()) + list(data.test):
        preparer.prepare(case)


def _write_study(plan: StudyPlan, settings: Dict, cells: Sequence[Cell], subsets, results: Dict,
                 cell_dirs: Dict[str, str]) -> Dict:
    entries = []
    for cell in cells:
        if cell.key in results:
            entries.append(results[cell.key])
            continue
        subset = subsets[(cell.count, cell.seed)]
        entries.append({"status": "pending", "arm": cell.arm, "n": cell.count, "seed": cell.seed,
                        "train_case_ids": subset.train_ids, "val_case_ids": subset.val_ids,
                        "test_case_ids": settings["test_case_ids"],
                        "run_dir": os.path.relpath(os.path.join(cell_dirs[cell.key], "run"), plan.out)})
    study = {"format": STUDY_FORMAT, "settings": settings, "cells": entries}
    write_json_atomic(os.path.join(plan.out, "study.json"), study)
    return study


def _run_on_gpus(todo: Sequence[Cell], cell_dirs: Dict[str, str], gpus: Sequence[int], record, log) -> List[str]:
    """One worker thread per GPU, each running one cell subprocess at a time on its own device."""
    work: "queue.Queue[Cell]" = queue.Queue()
    for cell in todo:
        work.put(cell)
    failures: List[str] = []
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def worker(gpu: int) -> None:
        environment = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu),
                           PYTHONPATH=package_parent + os.pathsep + os.environ.get("PYTHONPATH", ""))
        while True:
            try:
                cell = work.get_nowait()
            except queue.Empty:
                return
            log(f"gpu {gpu}: {cell.key}")
            log_path = os.path.join(cell_dirs[cell.key], "worker.log")
            with open(log_path, "a", encoding="utf-8") as stream:
                code = subprocess.run([sys.executable, "-m", "ContrastiveSegLib.study.runner", cell_dirs[cell.key],
                                       "--device", "cuda"], env=environment, stdout=stream,
                                      stderr=subprocess.STDOUT).returncode
            result_path = os.path.join(cell_dirs[cell.key], "result.json")
            if code != 0 or not os.path.exists(result_path):
                failures.append(f"{cell.key} (exit status {code}, see {log_path})")
                continue
            with open(result_path, encoding="utf-8") as handle:
                record(cell, json.load(handle))

    threads = [threading.Thread(target=worker, args=(gpu,), daemon=True) for gpu in gpus]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(timeout=0.5)   # a short wait keeps Ctrl-C responsive in the main thread
    return failures


def _print_plan(plan: StudyPlan, cells: Sequence[Cell], subsets, data: LoadedData, budget_steps: int,
                measured: Dict[str, float], log: Callable[[str], None]) -> None:
    windows = sum(prediction_windows(case, plan.config) for case in data.test)
    points = len(plan.fractions)
    per_cell = budget_steps * measured["step"] + points * math.ceil(windows / 2) * measured["window_pair"]
    log(f"{len(cells)} cells: {len(plan.arms)} arm(s) x {len(plan.counts)} count(s) x {len(plan.seeds)} seed(s); "
        f"{budget_steps} training steps each; {len(data.pool)} labelled case(s) in the pool, "
        f"{len(data.test)} test case(s)")
    for arm in plan.arms:
        log(f"  arm {arm.name}: {arm.describe()}")
    for (count, seed), subset in sorted(subsets.items()):
        log(f"  n={count} seed={seed}: train {', '.join(subset.train_ids)}"
            + (f"; validate {', '.join(subset.val_ids)}" if subset.val_ids else ""))
    log(f"  test: {', '.join(case.case_id for case in data.test)}")
    log(f"measured on {plan.config.device}: {measured['step']:.3f} s per training step, "
        f"{measured['window_pair']:.3f} s per 2 prediction windows ({windows} windows per scoring of the test set)")
    hours = len(cells) * per_cell / 3600
    log(f"estimate: {per_cell / 60:.1f} min per cell, {hours:.2f} h for the study"
        + (f" ({hours / len(plan.gpus):.2f} h on {len(plan.gpus)} GPUs)" if plan.gpus else "")
        + ", without data loading and preprocessing"
        + (" and self-training's pseudo-labelling" if any(a.kind == "selftrain" for a in plan.arms) else ""))


def _worker_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ContrastiveSegLib.study.runner CELL_DIR [--device D]``: one cell, for the GPU workers."""
    import argparse

    parser = argparse.ArgumentParser(prog="contrastiveseg-study-cell")
    parser.add_argument("cell_dir")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    result = run_cell(args.cell_dir, device=args.device)
    return 0 if result.get("status") == "finished" else 1


if __name__ == "__main__":
    sys.exit(_worker_main())
