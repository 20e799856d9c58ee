"""Pre-training sources: labelled cases of several datasets whose label sets differ.

Every case is preprocessed onto the network's grid with one shared class
vocabulary (the canonical organ names of all datasets, class ``i + 1`` =
``class_names[i]``), so a label is compared across datasets only through its
name.  Value 0 means "not labelled as any of these organs in this dataset":
an organ a dataset does not annotate is 0 there, which is why the methods
never use 0 as a negative.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .catalog import Dataset
from .preprocess import CasePreparer, PreparedCase


@dataclass
class SourceCase:
    """One preprocessed case with what the methods need to know about where it comes from."""

    prepared: PreparedCase                 # image [1, X, Y, Z] float32; label [1, X, Y, Z] uint8 (vocabulary ids)
    dataset_index: int                     # index into PretrainSources.dataset_names
    case_index: int                        # index into PretrainSources.cases
    attributes: Dict[str, str] = field(default_factory=dict)   # per-case meta data (e.g. from a CSV)
    z_extent: Tuple[int, int] = (0, 0)     # first and last slice (axis 3) that hold the body, for "position"


@dataclass
class PretrainSources:
    """All pre-training cases, grouped by dataset."""

    dataset_names: List[str]
    class_names: List[str]                 # the shared vocabulary; class id i + 1 is class_names[i]
    cases: List[SourceCase]
    by_dataset: List[List[int]]            # case indices of each dataset (datasets without a usable case: [])

    def dataset_labels(self, dataset_index: int) -> List[str]:
        """The vocabulary names present in at least one case of that dataset."""
        present = set()
        for index in self.by_dataset[dataset_index]:
            label = self.cases[index].prepared.label
            if label is not None:
                present.update(int(v) for v in np.unique(label) if v)
        return [self.class_names[v - 1] for v in sorted(present)]


def vocabulary(datasets: Sequence[Dataset], chosen: Sequence[str] = ()) -> List[str]:
    """The shared class names: ``chosen`` if given, else every dataset's names in order of first appearance."""
    if chosen:
        return list(chosen)
    names: List[str] = []
    for dataset in datasets:
        for name in dataset.label_names():
            if name not in names:
                names.append(name)
    return names


def body_extent(image: np.ndarray, threshold: float = 0.0) -> Tuple[int, int]:
    """First and last index along the last axis of ``image [1, X, Y, Z]`` with any voxel above ``threshold``.

    After the CT window, air and padding are 0; the body's axial extent is a
    steadier reference for "position" than the volume's, which includes padding.
    """
    occupied = np.flatnonzero((image[0] > threshold).any(axis=(0, 1)))
    if occupied.size == 0:
        return 0, image.shape[-1] - 1
    return int(occupied[0]), int(occupied[-1])


def prepare_sources(datasets: Sequence[Dataset], preparer: CasePreparer, progress: bool = True) -> PretrainSources:
    """Preprocess every labelled case of ``datasets`` with ``preparer`` (whose targets are the vocabulary)."""
    cases: List[SourceCase] = []
    by_dataset: List[List[int]] = []
    for dataset_index, dataset in enumerate(datasets):
        indices = []
        for prepared, case in zip(*_prepared_with_cases(dataset, preparer, progress)):
            index = len(cases)
            cases.append(SourceCase(prepared, dataset_index, index, dict(case.attributes),
                                    body_extent(prepared.image)))
            indices.append(index)
        by_dataset.append(indices)
    return PretrainSources([d.name for d in datasets], list(preparer.targets), cases, by_dataset)


def _prepared_with_cases(dataset: Dataset, preparer: CasePreparer, progress: bool):
    from tqdm.auto import tqdm

    prepared, kept = [], []
    for case in tqdm(dataset.cases, desc=f"preprocessing {dataset.name}", unit="case", disable=not progress,
                     leave=False):
        result = preparer.prepare(case)
        if result is not None:
            prepared.append(result)
            kept.append(case)
    return prepared, kept
