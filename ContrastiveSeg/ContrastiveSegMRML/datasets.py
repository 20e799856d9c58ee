"""Scene data -> a training dataset folder the engine can read.

Each (volume, segmentation) pair becomes ``imageNNN.nrrd`` + ``labelNNN.nrrd``
(the segments named like the target organs, on the volume's grid), and a
``dataset.json`` lists them with the label names.
"""

import os
import re
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from ContrastiveSegJob.datasets import write_dataset_json
from ContrastiveSegJob.labels import LabelTable, normalize_label_table

from .segmentations import labelmap_export_steps
from .volumes import write_volume


def export_scene_pairs_to_dataset(scene, pairs: Sequence[Tuple[object, object]], folder: str,
                                  label_names: LabelTable) -> Path:
    """Write scene (volume, segmentation) pairs as an MSD-style dataset folder.

    Args:
        scene: the ``vtkMRMLScene``.
        pairs: ``(vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode)`` pairs.
        folder: the dataset folder (created; files of an earlier export are replaced).
        label_names: the training label table, e.g. ``["liver", "spleen"]``
            (value 1 = liver, 2 = spleen).  Segments are matched by organ.

    Returns:
        The path of the written ``dataset.json`` (a dataset spec for ``--data``).

    Raises:
        ValueError: no pair given, or a segmentation has none of the organs.
    """
    steps = scene_pair_export_steps(scene, pairs, folder, label_names)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def scene_pair_export_steps(scene, pairs: Sequence[Tuple[object, object]], folder: str, label_names: LabelTable):
    """:func:`export_scene_pairs_to_dataset` in small steps: a generator yielding a description after each
    image and each organ, so the module can run one step per timer tick and keep the GUI responsive.
    Its return value is the ``dataset.json`` path.  Images are written uncompressed: compressing a CT
    takes seconds, and the engine reads them once."""
    if not pairs:
        raise ValueError("no (volume, segmentation) pair to export")
    table = normalize_label_table(label_names)
    folder_path = Path(folder)
    folder_path.mkdir(parents=True, exist_ok=True)
    cases: List[Tuple[str, str]] = []
    found: Dict[int, str] = {}
    for index, (volume_node, segmentation_node) in enumerate(pairs):
        if volume_node is None or segmentation_node is None:
            raise ValueError(f"pair {index + 1} lacks its volume or its segmentation")
        stem = f"{index:03d}_{_safe_name(volume_node.GetName())}"
        image_path = folder_path / f"image_{stem}.nrrd"
        label_path = folder_path / f"label_{stem}.nrrd"
        write_volume(volume_node, os.fspath(image_path), compress=False)
        yield f"{volume_node.GetName()}: image"
        written = yield from labelmap_export_steps(scene, segmentation_node, volume_node, os.fspath(label_path), table)
        found.update(written)
        cases.append((os.fspath(image_path), os.fspath(label_path)))
    return write_dataset_json(folder_path, cases, table, name="ContrastiveSeg scene export",
                              description="Volumes and segmentations exported from the 3D Slicer scene")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name or "volume").strip("_")[:60] or "volume"
