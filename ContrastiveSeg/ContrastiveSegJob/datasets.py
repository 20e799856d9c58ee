"""MSD-style ``dataset.json`` files: the engine's input format.

A dataset *spec* is a folder holding a ``dataset.json`` or the path of such a
file.  The module writes one when the user trains on images and segmentations
from the scene (see ``ContrastiveSegMRML.datasets``), and reads one to offer the
organs it labels.
"""

import json
import os
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple, Union

from .labels import normalize_label_table

DATASET_FILE_NAME = "dataset.json"

PathLike = Union[str, "os.PathLike[str]"]


def dataset_json_path(spec: PathLike) -> Path:
    """The ``dataset.json`` a spec names: the file itself, or ``<folder>/dataset.json``.

    Raises FileNotFoundError with what to do when neither exists.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / DATASET_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{spec}: no {DATASET_FILE_NAME} found. Choose a dataset folder that contains a "
            f"{DATASET_FILE_NAME} (MSD / nnU-Net style) or the {DATASET_FILE_NAME} file itself.")
    return path


def read_dataset_labels(spec: PathLike) -> Dict[int, str]:
    """The organs a dataset labels, as ``{label value: name}`` (background left out)."""
    path = dataset_json_path(spec)
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}). Fix the file or choose another dataset.") from error
    if not isinstance(content, dict) or "labels" not in content:
        raise ValueError(f'{path}: has no "labels" map. Add e.g. "labels": {{"0": "background", "1": "liver"}}.')
    return normalize_label_table(content["labels"])


def write_dataset_json(folder: PathLike, cases: Sequence[Tuple[str, str]], label_names: Mapping,
                       name: str = "ContrastiveSeg scene export", description: str = "") -> Path:
    """Write ``<folder>/dataset.json`` listing ``cases`` and return its path.

    Args:
        folder: the dataset folder; image and label paths are written relative to it.
        cases: ``(image path, label path)`` pairs, absolute or relative to ``folder``.
        label_names: the label table of every label file (any form accepted by
            :func:`normalize_label_table`); background is added as value 0.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = {"0": "background"}
    labels.update({str(value): name_ for value, name_ in normalize_label_table(label_names).items()})
    training: List[Dict[str, str]] = []
    for image, label in cases:
        training.append({"image": _relative(image, folder), "label": _relative(label, folder)})
    content = {
        "name": name,
        "description": description,
        "modality": {"0": "CT"},
        "labels": labels,
        "numTraining": len(training),
        "training": training,
    }
    path = folder / DATASET_FILE_NAME
    temporary = path.with_suffix(".json.tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(content, file, indent=1)
        file.write("\n")
    os.replace(temporary, path)
    return path


def _relative(path: PathLike, folder: Path) -> str:
    """``./name`` for files inside ``folder`` (relative paths are taken as relative to it),
    the absolute path otherwise."""
    path = Path(path)
    if not path.is_absolute():
        path = folder / path
    try:
        return "./" + path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()
