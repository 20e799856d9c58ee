"""What a study trains: its arms, its budget, and the paired subsets of labelled cases.

A study crosses label counts ``n``, seeds ``s`` and arms.  For each seed one
permutation of the labelled pool is drawn; the first ``n`` cases of it are the
training subset of ``(n, s)`` (so the subsets of one seed are nested: the one
of n = 2 holds the one of n = 1), and the last ``val_count`` cases are that
seed's validation cases, the same for every count.  Every arm of ``(n, s)``
trains on exactly that subset: the arms differ only by where they start,
which is what makes the comparison paired.  Test cases come from their own
datasets and are checked never to be in the pool.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError

# Mixed into the permutation's seed so that a study's subsets do not coincide with the
# seed-driven choices of finetune (its validation hold-out uses the bare seed).
SUBSET_STREAM = 20250613

ARM_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


@dataclass
class Arm:
    """One start of the comparison.

    ``kind`` is ``"scratch"`` (random initial weights), ``"pretrained"`` (the
    encoder of ``checkpoint``) or ``"selftrain"`` (self-training on the
    unlabelled scans, from ``checkpoint`` when given).  ``settings`` are
    ``KEY=VALUE`` self-training settings.
    """

    name: str
    kind: str
    checkpoint: Optional[str] = None
    settings: List[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.kind == "scratch":
            return "random initial weights"
        if self.kind == "pretrained":
            return f"encoder of {self.checkpoint}"
        start = f"encoder of {self.checkpoint}" if self.checkpoint else "random initial weights"
        return f"self-training from {start}" + (f" ({', '.join(self.settings)})" if self.settings else "")


def resolve_checkpoint(path: str, option: str) -> str:
    """A run folder's ``checkpoints/last.pt``, or the checkpoint file itself."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        candidate = os.path.join(path, "checkpoints", "last.pt")
        if not os.path.isfile(candidate):
            raise InputError("is a folder without checkpoints/last.pt", path=path,
                             fix=f"give a finished pretrain run folder or a checkpoint file in {option}")
        return candidate
    if not os.path.isfile(path):
        raise InputError("does not exist", path=path, fix=f"give a finished pretrain run folder or .pt file in {option}")
    return path


def parse_arm(text: str) -> Arm:
    """``scratch`` | ``NAME=RUN`` | ``NAME=RUN/checkpoints/last.pt`` | ``selftrain[:init=RUN][,KEY=VALUE...]``."""
    text = text.strip()
    option = f"--arm {text}"
    if text == "scratch":
        return Arm("scratch", "scratch")
    if text == "selftrain" or text.startswith("selftrain:"):
        init, settings = None, []
        for part in [p.strip() for p in text[len("selftrain:"):].split(",") if p.strip()] if ":" in text else []:
            key, _, value = part.partition("=")
            if not value:
                raise InputError(f"{part!r} is not KEY=VALUE", path=option,
                                 fix="write e.g. --arm selftrain:init=runs/mixcl,rounds=1")
            if key.strip() == "init":
                init = resolve_checkpoint(value.strip(), option)
            else:
                settings.append(f"{key.strip()}={value.strip()}")
        return Arm("selftrain", "selftrain", init, settings)
    name, separator, run = text.partition("=")
    if not separator or not run.strip():
        raise InputError("is not scratch, NAME=RUN or selftrain[:init=RUN]", path=option,
                         fix="write e.g. --arm scratch --arm mixcl=runs/mixcl --arm selftrain:init=runs/mixcl")
    name = name.strip()
    if not ARM_NAME.match(name) or name in ("scratch", "selftrain"):
        raise InputError(f"{name!r} cannot name an arm", path=option,
                         fix="use a short name of letters, digits, - and _ (not scratch or selftrain), e.g. mixcl")
    return Arm(name, "pretrained", resolve_checkpoint(run.strip(), option))


def parse_arms(texts: Sequence[str]) -> List[Arm]:
    """The arms in the order given; ``scratch`` is added first when missing (the reference of every difference)."""
    arms = [parse_arm(text) for text in texts] if texts else []
    names = [arm.name for arm in arms]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise InputError(f"arm name(s) given twice: {', '.join(duplicated)}", path="--arm",
                         fix="give each arm once, or name them differently (NAME=RUN)")
    if "scratch" not in names:
        arms.insert(0, Arm("scratch", "scratch"))
    return arms


def parse_int_list(text: str, option: str, minimum: int) -> List[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < minimum for v in values) or len(set(values)) != len(values):
        raise InputError(f"{text!r} is not a comma-separated list of distinct integers >= {minimum}", path=option,
                         fix=f"write e.g. {option} 1,2,4")
    return values


@dataclass
class Budget:
    """``steps=N`` or ``minutes=M`` of training per cell (turned into steps once, from a measured step)."""

    kind: str
    value: float

    def describe(self) -> str:
        return f"{int(self.value)} steps" if self.kind == "steps" else f"{self.value:g} minutes"


def parse_budget(text: str) -> Budget:
    key, _, value = str(text).partition("=")
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if key.strip() not in ("steps", "minutes") or number <= 0 or (key.strip() == "steps" and number != int(number)):
        raise InputError(f"{text!r} is not steps=N or minutes=M", path="--budget",
                         fix="write e.g. --budget steps=2000 or --budget minutes=20")
    return Budget(key.strip(), number)


def parse_fractions(text: str) -> List[float]:
    """``"0.25,0.5,1"`` -> sorted fractions of the budget at which a checkpoint is scored; 1 is always one."""
    try:
        values = sorted({float(v) for v in str(text).split(",") if v.strip()} | {1.0})
    except ValueError:
        values = []
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise InputError(f"{text!r} is not a list of fractions in (0, 1]", path="--score-at",
                         fix="write e.g. --score-at 0.25,0.5,1")
    return values


def checkpoint_steps(total_steps: int, fractions: Sequence[float], stage_steps: int) -> Tuple[List[int], int]:
    """The steps at which the scored checkpoints are taken, and the checkpoint interval that reaches them.

    Args:
        total_steps: optimisation steps of the whole cell.
        fractions: shares of ``total_steps`` (see :func:`parse_fractions`).
        stage_steps: steps of one training stage (``total_steps`` for finetune; self-training
            restarts its step counter at every stage, so the interval must divide a stage too).

    Returns:
        ``(steps, interval)``: distinct steps ``round(f * total)`` (at least 1), and their
        greatest common divisor with ``stage_steps``, the ``checkpoint_every`` of the run.
    """
    steps = sorted({max(1, int(round(f * total_steps))) for f in fractions})
    interval = stage_steps
    for step in steps:
        interval = math.gcd(interval, step)
    return steps, max(interval, 1)


@dataclass
class Subset:
    """The cases of one ``(n, seed)``: who trains, who validates (ids as the catalog names them)."""

    count: int
    seed: int
    train_ids: List[str]
    val_ids: List[str]

    @property
    def key(self) -> str:
        return f"n{self.count}_seed{self.seed}"


def draw_subsets(pool_ids: Sequence[str], counts: Sequence[int], seeds: Sequence[int],
                 val_count: int = 0) -> Dict[Tuple[int, int], Subset]:
    """The training and validation case ids of every ``(n, seed)``, shared by every arm.

    The pool is sorted first, so the draw depends on the case ids and the seed only, not on
    the order the datasets were given in.  For each seed one permutation of the pool is drawn
    from ``default_rng([seed, SUBSET_STREAM])``; validation = its last ``val_count`` cases,
    training subset of n = its first n cases.
    """
    pool = sorted(set(pool_ids))
    largest = max(counts)
    if largest + val_count > len(pool):
        raise InputError(f"{len(pool)} labelled case(s) cannot give {largest} training case(s)"
                         + (f" plus {val_count} validation case(s)" if val_count else ""), path="--counts",
                         fix="lower --counts (or --val-count), or give more --data")
    subsets: Dict[Tuple[int, int], Subset] = {}
    for seed in seeds:
        order = [pool[i] for i in np.random.default_rng([int(seed), SUBSET_STREAM]).permutation(len(pool))]
        val_ids = sorted(order[len(order) - val_count:]) if val_count else []
        for count in counts:
            subsets[(count, seed)] = Subset(count, seed, sorted(order[:count]), val_ids)
    return subsets


@dataclass
class Cell:
    """One training run of the study: an arm on the subset of ``(count, seed)``."""

    arm: str
    count: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.arm}_n{self.count}_seed{self.seed}"


def study_cells(arms: Sequence[Arm], counts: Sequence[int], seeds: Sequence[int]) -> List[Cell]:
    """Every cell, ordered so that the few-label, first-seed cells (the cheap ones) finish first."""
    return [Cell(arm.name, count, seed) for count in sorted(counts) for seed in seeds for arm in arms]


def check_no_leak(pool_images: Dict[str, str], test_images: Dict[str, str],
                  unlabeled_specs: Sequence[str] = ()) -> None:
    """Refuse a test case that is also labelled training data, or also an ``--unlabeled`` scan.

    Args:
        pool_images: ``{case id: image path}`` of the labelled pool (``--data``).
        test_images: ``{case id: image path}`` of ``--test-data``.
        unlabeled_specs: the ``--unlabeled`` specs; a test image listed by one of their
            dataset.json files, or lying in one of their plain folders, counts as used.
    Files are compared by their real path; the same patient in two different files cannot be
    seen from here, which is why ``docs/study.md`` asks the user to check it.
    """
    pool = {os.path.realpath(path): case for case, path in pool_images.items()}
    folders, unlabeled_files = [], set()
    for spec in unlabeled_specs:
        real = os.path.realpath(os.path.expanduser(spec))
        if os.path.isdir(real) and not os.path.isfile(os.path.join(real, "dataset.json")):
            folders.append(real)
        elif os.path.exists(real):
            from ..data.catalog import load_dataset

            unlabeled_files |= {os.path.realpath(case.image) for case in load_dataset(real, require_labels=False).cases}
    for case, path in test_images.items():
        real = os.path.realpath(path)
        if real in pool:
            raise InputError(f"test case {case} is also labelled training case {pool[real]}", path=path,
                             fix="give every scan either to --data or to --test-data, never to both")
        if real in unlabeled_files:
            raise InputError(f"test case {case} is also an --unlabeled scan", path=path,
                             fix="leave the test scans out of --unlabeled")
        for folder in folders:
            if real == folder or real.startswith(folder + os.sep):
                raise InputError(f"test case {case} lies in the --unlabeled folder {folder}", path=path,
                                 fix="keep the test scans out of the folders given to --unlabeled")
