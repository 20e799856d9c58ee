"""Training patches, drawn so that a run can be resumed exactly.

Sample ``i`` of a run is drawn from a generator seeded with ``(seed, i)``: it
does not depend on what was drawn before, on the number of data-loader
workers, or on whether the run was stopped and resumed.  Under DDP, rank
``r`` of ``W`` takes samples ``(step * W + r) * batch + j``, so ranks never
see the same sample.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .preprocess import PreparedCase
from .views import (
    FILLING_SIZE,
    contrast_phase_shift,
    draw_organ_sizes,
    hollow_organ_gas,
    intensity_augment,
    organ_geometry,
    random_intensity_network,
    supervised_augment,
    thin_scan_slab,
    tissue_enhancement,
    vessel_lumen_contrast,
)


def crop_or_pad(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float = 0) -> np.ndarray:
    """``array[:, start:start+size]`` on the three spatial axes, ``fill`` where it leaves the volume."""
    channels = array.shape[0]
    out = np.full((channels,) + tuple(int(s) for s in size), fill, dtype=array.dtype)
    source, target = [], []
    for axis, (begin, length) in enumerate(zip(start, size)):
        limit = array.shape[axis + 1]
        lo, hi = max(begin, 0), min(begin + length, limit)
        if hi <= lo:
            return out
        source.append(slice(lo, hi))
        target.append(slice(lo - begin, hi - begin))
    out[(slice(None),) + tuple(target)] = array[(slice(None),) + tuple(source)]
    return out


class PatchSampler:
    """Draws ``(image, label)`` patches from prepared cases.

    With probability ``foreground_ratio`` a patch is centred on a voxel of a
    randomly chosen foreground class present in the case (so small organs are
    seen as often as large ones); otherwise its centre is uniform.
    """

    def __init__(self, cases: Sequence[PreparedCase], patch_size: Sequence[int], foreground_ratio: float = 0.67):
        if not cases:
            raise ValueError("no cases to sample from")
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.foreground_ratio = float(foreground_ratio)
        # Flat indices of each class per case, computed once: a patch draw is then O(1).
        self._foreground: List[Dict[int, np.ndarray]] = []
        for case in self.cases:
            classes: Dict[int, np.ndarray] = {}
            if case.label is not None:
                flat = case.label.reshape(-1)
                for value in np.unique(flat):
                    if value != 0:
                        classes[int(value)] = np.flatnonzero(flat == value)
            self._foreground.append(classes)

    def centre(self, case_index: int, rng: np.random.Generator,
               prefer: Optional[Sequence[int]] = None) -> Tuple[int, int, int]:
        """A patch centre; foreground centres go to one of the ``prefer`` classes when the case has any."""
        shape = self.cases[case_index].image.shape[1:]
        classes = self._foreground[case_index]
        if classes and rng.random() < self.foreground_ratio:
            values = [v for v in classes if prefer is None or v in prefer] or list(classes)
            value = values[int(rng.integers(len(values)))]
            flat = classes[value][int(rng.integers(len(classes[value])))]
            return tuple(int(c) for c in np.unravel_index(flat, shape))
        return tuple(int(rng.integers(s)) for s in shape)

    def window(self, rng: np.random.Generator, case_index: int = -1,
               prefer: Optional[Sequence[int]] = None) -> Tuple[int, List[int]]:
        """``(case_index, start)``: where the next patch lies, kept inside the volume where it is large enough."""
        if case_index < 0:
            case_index = int(rng.integers(len(self.cases)))
        case = self.cases[case_index]
        centre = self.centre(case_index, rng, prefer)
        start = [c - p // 2 for c, p in zip(centre, self.patch_size)]
        start = [min(max(s, 0), max(dim - p, 0)) for s, dim, p in zip(start, case.image.shape[1:], self.patch_size)]
        return case_index, start

    def sample(self, rng: np.random.Generator, case_index: int = -1, prefer: Optional[Sequence[int]] = None):
        """One patch: ``(image [1, *patch] float32, label [1, *patch] int64 or None, case_index)``."""
        case_index, start = self.window(rng, case_index, prefer)
        case = self.cases[case_index]
        image = crop_or_pad(case.image, start, self.patch_size, fill=case.fill)
        label = None if case.label is None else crop_or_pad(case.label, start, self.patch_size).astype(np.int64)
        return image, label, case_index


class PatchAugmenter:
    """Draws one augmented training patch (image, label) from a :class:`PatchSampler`.

    The one augmentation pipeline of supervised training: fine-tuning's :class:`SupervisedPatches` and
    self-training's pairs (``methods.selftrain.JointPairs``, labelled and pseudo-labelled patches alike)
    draw their patches with it.

    ``augmentation`` (data/views.py): ``"intensity"`` crops the patch and varies its intensities only;
    ``"spatial"`` draws rotation, zoom, elastic deformation and mirrors along ``mirror_axes`` around the
    patch centre, resamples the patch from the whole case (so no padding enters where the case goes on),
    then applies nnU-Net's intensity augmentations.  ``swap`` relabels left/right organs when the
    ``lateral_axis`` is mirrored (:func:`~.views.lateral_swap`).  ``contrast_phase``: ``{"prob",
    "units_per_hu", "value_range"}`` for :func:`~.views.contrast_phase_shift` (None: off), applied first;
    ``gas``: ``{"prob", "classes", "air", "anterior_axis", "anterior_sign"}`` for
    :func:`~.views.hollow_organ_gas` (None: off), applied after it; ``vessels``: ``{"prob", "classes",
    "units_per_hu", "value_range"}`` for :func:`~.views.vessel_lumen_contrast` (None: off), between the two;
    ``thin_scan``: ``{"prob", "axis"}`` for :func:`~.views.thin_scan_slab` (None: off), applied last, to image
    and label.  ``enhancement``: ``{"prob", "solid", "hollow", "units_per_hu", "value_range"}`` for
    :func:`~.views.tissue_enhancement` (None: off), after the vessels and before the gas.  ``gin_prob``:
    the probability of :func:`~.views.random_intensity_network` (GIN), after the intensity augmentations
    and before the thin-scan slab.  ``spatial_prob``: the probability of a rotation and of a zoom in
    ``"spatial"`` (elastic deformation at half of it).  ``filling``: ``{"prob", "classes"}`` (and optionally
    ``"size_range"``) for :func:`~.views.draw_organ_sizes` (None: off), ``"spatial"`` only: each organ that
    fills and empties, with ``prob``, resized about its centre in the patch's sampling map.
    """

    def __init__(self, augmentation: str = "intensity", mirror_axes: Sequence[int] = (),
                 swap: Optional[np.ndarray] = None, lateral_axis: int = 0,
                 contrast_phase: Optional[dict] = None, gas: Optional[dict] = None,
                 thin_scan: Optional[dict] = None, vessels: Optional[dict] = None, gin_prob: float = 0.0,
                 enhancement: Optional[dict] = None, spatial_prob: float = 0.2, filling: Optional[dict] = None):
        if augmentation not in ("intensity", "spatial"):
            raise ValueError(f"unknown augmentation {augmentation!r}: 'intensity' or 'spatial'")
        self.augmentation = augmentation
        self.mirror_axes = tuple(int(a) for a in mirror_axes)
        self.swap = swap
        self.lateral_axis = int(lateral_axis)
        self.contrast_phase = contrast_phase if contrast_phase and contrast_phase.get("prob", 0) > 0 else None
        self.gas = gas if gas and gas.get("prob", 0) > 0 and gas.get("classes") else None
        self.vessels = vessels if vessels and vessels.get("prob", 0) > 0 and vessels.get("classes") else None
        self.thin_scan = thin_scan if thin_scan and thin_scan.get("prob", 0) > 0 else None
        self.gin_prob = float(gin_prob)
        self.enhancement = enhancement if enhancement and enhancement.get("prob", 0) > 0 else None
        self.spatial_prob = float(spatial_prob)
        self.filling = filling if filling and filling.get("prob", 0) > 0 and filling.get("classes") else None
        self._geometry: Dict[int, Dict[int, tuple]] = {}   # case index -> organ_geometry of its filling organs

    def draw(self, sampler: PatchSampler, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """A patch of ``sampler``'s cases and its label, augmented; every draw comes from ``rng``."""
        if self.augmentation == "spatial":
            case_index, start = sampler.window(rng)
            case = sampler.cases[case_index]
            centre = [s + (p - 1) / 2.0 for s, p in zip(start, sampler.patch_size)]
            volume = self._organ_intensities(case.image, case.label, rng)
            resizes, spacing = (), (1.0, 1.0, 1.0)
            if self.filling is not None and case.label is not None:
                spacing = tuple(float(v) for v in np.linalg.norm(np.asarray(case.affine)[:3, :3], axis=0))
                if case_index not in self._geometry:
                    self._geometry[case_index] = organ_geometry(case.label, self.filling["classes"], spacing)
                resizes = draw_organ_sizes(rng, self._geometry[case_index], self.filling["classes"],
                                           self.filling["prob"], self.filling.get("size_range", FILLING_SIZE))
            image, label = supervised_augment(volume, case.label, centre, sampler.patch_size, rng,
                                              self.mirror_axes, self.swap, self.lateral_axis, fill=case.fill,
                                              spatial_prob=self.spatial_prob, resizes=resizes, spacing=spacing)
        else:
            image, label, _ = sampler.sample(rng)
            image = intensity_augment(self._organ_intensities(image, label, rng), rng)
        # Drawn only when on, so that runs without it sample as before.
        if self.gin_prob > 0 and rng.random() < self.gin_prob:
            image = random_intensity_network(image, rng)
        if self.thin_scan is not None:
            image, label = thin_scan_slab(image, label, rng, **self.thin_scan)
        return image, label

    def _organ_intensities(self, image: np.ndarray, label: Optional[np.ndarray],
                           rng: np.random.Generator) -> np.ndarray:
        """The organ-wise intensity augmentations: contrast phase, contrast in vessels, gas in hollow organs."""
        if label is None:
            return image
        if self.contrast_phase is not None:
            image = contrast_phase_shift(image, label, rng, **self.contrast_phase)
        if self.vessels is not None:
            image = vessel_lumen_contrast(image, label, rng, **self.vessels)
        if self.enhancement is not None:
            image = tissue_enhancement(image, label, rng, **self.enhancement)
        if self.gas is not None:
            image = hollow_organ_gas(image, label, rng, **self.gas)
        return image


class SupervisedPatches(Dataset):
    """Map-style dataset: item ``i`` is sample ``i`` of the run (see the module docstring).

    ``augment``: draw each patch through a :class:`PatchAugmenter` built from ``augmentation`` (its
    arguments); False: plain crops (validation-like patches).
    """

    def __init__(self, sampler: PatchSampler, seed: int, length: int, augment: bool = True, **augmentation):
        self.sampler = sampler
        self.seed = int(seed)
        self.length = int(length)
        self.augmenter = PatchAugmenter(**augmentation) if augment else None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, int(index)])
        if self.augmenter is not None:
            image, label = self.augmenter.draw(self.sampler, rng)
        else:
            image, label, _ = self.sampler.sample(rng)
        return {"image": torch.from_numpy(np.ascontiguousarray(image)),
                "label": torch.from_numpy(np.ascontiguousarray(label))}


class StepSampler(Sampler):
    """Yields the sample indices of steps ``start_step .. total_steps-1`` for one rank."""

    def __init__(self, start_step: int, total_steps: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.start_step, self.total_steps = int(start_step), int(total_steps)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start_step, self.total_steps):
            first = (step * self.world_size + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0) * self.batch_size


def select_labeled_fraction(case_ids: Sequence[str], fraction: float, seed: int) -> List[str]:
    """Keep ``ceil(fraction * n)`` whole cases (at least one), chosen with ``seed``; order kept."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"labeled fraction must be in (0, 1], got {fraction}")
    ids = list(case_ids)
    keep = max(1, int(math.ceil(fraction * len(ids) - 1e-9)))
    chosen = set(np.random.default_rng([seed, 7919]).permutation(len(ids))[:keep].tolist())
    return [case for index, case in enumerate(ids) if index in chosen]


def kfold_split(case_ids: Sequence[str], folds: int, fold: int, seed: int) -> Tuple[List[str], List[str]]:
    """``(train, validation)`` ids of fold ``fold`` of ``folds`` (a seeded shuffle, then contiguous chunks)."""
    ids = list(case_ids)
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"need folds >= 2 and 0 <= fold < folds, got folds={folds}, fold={fold}")
    if len(ids) < folds:
        raise ValueError(f"{len(ids)} case(s) cannot be split into {folds} folds")
    order = np.random.default_rng([seed, 104729]).permutation(len(ids))
    chunks = np.array_split(order, folds)
    validation = set(chunks[fold].tolist())
    return ([c for i, c in enumerate(ids) if i not in validation], [c for i, c in enumerate(ids) if i in validation])
