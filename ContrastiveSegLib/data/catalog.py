"""Datasets on disk -> a list of cases with their label names.

A dataset *spec* (``--data SPEC``) is one of:

* an MSD / nnU-Net style ``dataset.json`` (or a folder holding one).  MSD
  lists its cases under ``"training": [{"image": ..., "label": ...}]``;
  nnU-Net v2 has no list and uses ``imagesTr/<case>_0000<ending>`` with
  ``labelsTr/<case><ending>``;
  A labels map entry may list label values (for a Slicer ``.seg.nrrd`` label
  they select those values in every layer) and, for ``.seg.nrrd`` labels,
  segment names: ``"lung": [5, 6]`` or ``"lung": ["right lung", "left lung"]``;
* a folder with ``imagesTr/`` + ``labelsTr/`` or ``images/`` + ``labels/``
  subfolders, paired by case id, and a ``labels.json`` with the names (not
  needed when the labels are Slicer ``.seg.nrrd`` files, whose header names
  their segments);
* for unlabelled data (self-training), a folder of images.

Images may be NIfTI, NRRD, MetaImage files or DICOM series folders.  Nothing
here reads voxels except ``.seg.nrrd`` headers; :mod:`.preprocess` does that.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from ..errors import InputError
from .labels import canonical_name, parse_label_map

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class Case:
    """One scan and (optionally) its label file.

    ``label_map`` maps canonical organ names to the label values that mean
    them in this case's label file and, for Slicer ``.seg.nrrd`` labels, to
    segment names (strings); it is empty for ``.seg.nrrd`` labels given
    without a labels map, whose segments then name the organs themselves.
    """

    case_id: str                      # unique across all datasets of a run: "<dataset>/<case>"
    image: str
    label: Optional[str]
    dataset: str
    label_map: Dict[str, List[Union[int, str]]] = field(default_factory=dict)
    attributes: Dict[str, str] = field(default_factory=dict)
    # The imaging modality, from the dataset.json's "modality" (its first channel): "CT" (in HU, the default)
    # or another name such as "MR", whose intensities have no fixed unit (see data.preprocess.ct_units).
    modality: str = "CT"

    def is_ct(self) -> bool:
        return self.modality == "CT"


@dataclass
class Dataset:
    name: str
    source: str
    label_map: Dict[str, List[Union[int, str]]]
    cases: List[Case]

    def label_names(self) -> List[str]:
        return sorted(self.label_map)


def strip_suffix(filename: str) -> str:
    """``"case_01.nii.gz"`` -> ``"case_01"`` (also ``.seg.nrrd`` and friends)."""
    lower = filename.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return filename[: -len(suffix)]
    return filename


def _is_image_entry(path: str) -> bool:
    if os.path.isdir(path):
        return True
    return path.lower().endswith(IMAGE_SUFFIXES)


def _read_json(path: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise InputError("does not exist", path=path) from None
    except (OSError, ValueError) as error:
        raise InputError(f"is not valid JSON ({error})", path=path,
                         fix="check the file in a text editor or a JSON validator") from None


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "dataset"


def load_dataset(spec: str, require_labels: bool = True) -> Dataset:
    """Read one dataset spec (see the module docstring) into a :class:`Dataset`."""
    spec = os.path.expanduser(str(spec))
    if not os.path.exists(spec):
        raise InputError("does not exist", path=spec,
                         fix="give a dataset.json, or a folder with a dataset.json or images/ + labels/")
    if os.path.isfile(spec):
        if not spec.lower().endswith(".json"):
            raise InputError("is a file but not a dataset.json", path=spec,
                             fix="give a dataset.json or the folder that holds the images and labels")
        return _load_dataset_json(spec, require_labels)
    if os.path.isfile(os.path.join(spec, "dataset.json")):
        return _load_dataset_json(os.path.join(spec, "dataset.json"), require_labels)
    return _load_folder(spec, require_labels)


def _load_dataset_json(path: str, require_labels: bool) -> Dataset:
    root = os.path.dirname(os.path.abspath(path))
    meta = _read_json(path)
    if not isinstance(meta, dict):
        raise InputError("does not hold a JSON object", path=path)
    name = _safe_name(str(meta.get("name") or os.path.basename(root)))
    label_map = parse_label_map(meta.get("labels"), path) if (require_labels or "labels" in meta) else {}
    modality = _modality(meta.get("modality", meta.get("channel_names")), path)
    pairs: List[tuple] = []
    if "training" in meta:
        entries = meta["training"]
        if not isinstance(entries, list) or not entries:
            raise InputError("has an empty or malformed 'training' list", path=path,
                             fix='list the cases as "training": [{"image": "...", "label": "..."}]')
        for number, entry in enumerate(entries):
            if not isinstance(entry, dict) or "image" not in entry:
                raise InputError(f"training entry {number} has no 'image'", path=path)
            image = entry["image"]
            if isinstance(image, list):  # multi-channel MSD entries: ContrastiveSeg uses the first channel
                image = image[0]
            image = os.path.normpath(os.path.join(root, image))
            label = entry.get("label")
            label = os.path.normpath(os.path.join(root, label)) if label else None
            pairs.append((image, label, {k: str(v) for k, v in entry.items() if k not in ("image", "label")}))
    else:
        ending = meta.get("file_ending", ".nii.gz")
        images_dir, labels_dir = os.path.join(root, "imagesTr"), os.path.join(root, "labelsTr")
        if not os.path.isdir(images_dir):
            raise InputError("has no 'training' list and no imagesTr/ folder beside it", path=path,
                             fix="add a 'training' list (MSD) or put the images in imagesTr/ (nnU-Net v2)")
        for filename in sorted(os.listdir(images_dir)):
            if not filename.endswith("_0000" + ending):
                continue
            case = filename[: -len("_0000" + ending)]
            label = os.path.join(labels_dir, case + ending)
            pairs.append((os.path.join(images_dir, filename), label if os.path.exists(label) else None, {}))
        if not pairs:
            raise InputError(f"imagesTr/ has no files named <case>_0000{ending}", path=images_dir)
    return _make_dataset(name, path, label_map, pairs, require_labels, modality)


def _modality(value, path: str) -> str:
    """A dataset.json's ``"modality"`` (MSD: ``{"0": "CT"}``) or ``"channel_names"`` (nnU-Net v2): its first
    channel's name, ``"CT"`` in any case spelling or when absent, else the name as written (``"MR"``, ``"T2"``)."""
    if value is None:
        return "CT"
    if isinstance(value, dict) and value:
        value = value[sorted(value, key=str)[0]]
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"has a 'modality' that is not a name ({value!r})", path=path,
                         fix='write "modality": {"0": "CT"} (or "MR")')
    return "CT" if value.strip().upper() == "CT" else value.strip()


def _load_folder(folder: str, require_labels: bool) -> Dataset:
    name = _safe_name(os.path.basename(os.path.abspath(folder)))
    for images_name, labels_name in (("imagesTr", "labelsTr"), ("images", "labels")):
        images_dir = os.path.join(folder, images_name)
        labels_dir = os.path.join(folder, labels_name)
        if os.path.isdir(images_dir):
            break
    else:
        images_dir, labels_dir = folder, None
    images = {}
    for entry in sorted(os.listdir(images_dir)):
        full = os.path.join(images_dir, entry)
        if entry.startswith(".") or not _is_image_entry(full) or entry.endswith(".json"):
            continue
        case = re.sub(r"_0000$", "", strip_suffix(entry))
        if case in images:
            raise InputError(f"two images have the case id {case!r}: {images[case]} and {full}",
                             path=images_dir, fix="give every case a unique file name")
        images[case] = full
    if not images:
        raise InputError("holds no images (NIfTI, NRRD, MetaImage or DICOM folders)", path=images_dir)
    labels = {}
    if labels_dir and os.path.isdir(labels_dir):
        for entry in sorted(os.listdir(labels_dir)):
            full = os.path.join(labels_dir, entry)
            if _is_image_entry(full) and not entry.startswith("."):
                labels[strip_suffix(entry)] = full
    if require_labels and not labels:
        raise InputError("has no labels: expected a labels/ (or labelsTr/) folder beside images/", path=folder,
                         fix="put one label file per image in labels/, named like the image")
    labels_json = os.path.join(folder, "labels.json")
    if os.path.isfile(labels_json):
        label_map = parse_label_map(_read_json(labels_json), labels_json)
    elif labels and all(path.lower().endswith(".seg.nrrd") for path in labels.values()):
        label_map = {}  # filled from the segment names below
    elif require_labels:
        raise InputError("has label files but no labels.json naming their values", path=folder,
                         fix='add labels.json, e.g. {"0": "background", "1": "liver"}')
    else:
        label_map = {}
    pairs = [(image, labels.get(case), {}) for case, image in images.items()]
    if require_labels:
        missing = [case for case, image in images.items() if case not in labels]
        if missing:
            warnings.warn(f"{folder}: {len(missing)} image(s) have no label and are left out: "
                          f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
            pairs = [pair for pair in pairs if pair[1] is not None]
    dataset = _make_dataset(name, folder, label_map, pairs, require_labels)
    if require_labels and not label_map:
        dataset.label_map = _segment_names_of(dataset.cases)
    return dataset


def _segment_names_of(cases: Sequence[Case]) -> Dict[str, List[int]]:
    """The union of segment names over the ``.seg.nrrd`` labels of ``cases``."""
    from .io import read_label_image

    names: Dict[str, List[int]] = {}
    for case in cases:
        for segment in read_label_image(case.label).segments:
            names.setdefault(canonical_name(segment.name), [])
    return names


def case_id_from_paths(image: str, label: Optional[str]) -> str:
    base = label if label else image
    return re.sub(r"_0000$", "", strip_suffix(os.path.basename(os.path.normpath(base))))


def _make_dataset(name: str, source: str, label_map: Dict[str, List[int]], pairs, require_labels: bool,
                  modality: str = "CT") -> Dataset:
    cases: List[Case] = []
    seen: Dict[str, str] = {}
    for image, label, attributes in pairs:
        if require_labels and not label:
            raise InputError(f"case {image} has no label file", path=source,
                             fix="give every training case a label, or use it as unlabelled data")
        case = case_id_from_paths(image, label)
        if case in seen:
            raise InputError(f"duplicate case id {case!r}: {seen[case]} and {label or image}", path=source,
                             fix="give every case a unique file name; ContrastiveSeg names cases after their files")
        seen[case] = label or image
        cases.append(Case(case_id=f"{name}/{case}", image=image, label=label, dataset=name,
                          label_map=dict(label_map), attributes=dict(attributes), modality=modality))
    _check_segment_names(label_map, cases, source)
    return Dataset(name=name, source=source, label_map=label_map, cases=cases)


def _check_segment_names(label_map: Dict[str, List[Union[int, str]]], cases: Sequence[Case], source: str) -> None:
    """Segment names in a labels map need ``.seg.nrrd`` labels, and each must be a segment of at least one.

    Reads the label files' headers only.  A name missing from some files is
    fine (that case lacks the structure); a name no file has is a typo.
    """
    wanted = {entry: name for name, entries in label_map.items() for entry in entries if isinstance(entry, str)}
    if not wanted:
        return
    from .io import _is_seg_nrrd
    from .segnrrd import segment_names_in_header

    names_by_file: Dict[str, List[str]] = {}
    for case in cases:
        if not case.label:
            continue
        if not _is_seg_nrrd(Path(case.label)):
            raise InputError(f"is a plain label map without segment names, but the labels map of {source} names "
                             f"segments ({', '.join(repr(e) for e in wanted)})", path=case.label,
                             fix="map that organ to label values instead, e.g. \"lung\": [10, 11], or give "
                                 "Slicer .seg.nrrd label files")
        names_by_file[case.label] = segment_names_in_header(case.label)
    found = {canonical_name(n) for names in names_by_file.values() for n in names}
    missing = [entry for entry in wanted if canonical_name(entry) not in found]
    if missing:
        shown = list(names_by_file.items())[:5]
        lines = [f"{os.path.basename(path)}: {', '.join(names) or '(no segments)'}" for path, names in shown]
        if len(names_by_file) > len(shown):
            lines.append(f"... and {len(names_by_file) - len(shown)} more label file(s)")
        raise InputError(f"labels map names segment(s) that none of its {len(names_by_file)} label file(s) has: "
                         + ", ".join(f"{entry!r} (for {wanted[entry]})" for entry in missing), path=source,
                         details="segment names in the label files:\n" + "\n".join(lines),
                         fix="use segment names from the list above (case, spaces and dashes do not matter)")


def load_datasets(specs: Sequence[str], require_labels: bool = True) -> List[Dataset]:
    """Several specs; datasets with the same name get ``-2``, ``-3``, ... so case ids stay unique."""
    datasets: List[Dataset] = []
    used: Dict[str, int] = {}
    for spec in specs:
        dataset = load_dataset(spec, require_labels=require_labels)
        if dataset.name in used:
            used[dataset.name] += 1
            new_name = f"{dataset.name}-{used[dataset.name]}"
            for case in dataset.cases:
                case.case_id = new_name + case.case_id[len(dataset.name):]
                case.dataset = new_name
            dataset.name = new_name
        else:
            used[dataset.name] = 1
        datasets.append(dataset)
    seen: Dict[str, str] = {}
    for dataset in datasets:
        for case in dataset.cases:
            if case.image in seen:
                raise InputError(f"the same image is used twice: by {seen[case.image]} and {case.case_id}",
                                 path=case.image, fix="list every scan once")
            seen[case.image] = case.case_id
    return datasets


def check_target_names(datasets: Sequence[Dataset], targets: Sequence[str]) -> None:
    """Every target must be labelled by at least one dataset; warn where one is missing."""
    available = {name for dataset in datasets for name in dataset.label_map}
    unknown = [name for name in targets if name not in available]
    if unknown:
        lines = [f"{dataset.name} ({dataset.source}): {', '.join(dataset.label_names()) or '(none)'}"
                 for dataset in datasets]
        raise InputError(f"unknown label name(s): {', '.join(unknown)}", path="--labels",
                         details="label names of the datasets:\n" + "\n".join(lines),
                         fix="use names from the lists above (case, spaces and dashes do not matter), "
                             "or add a region to dataset.json, e.g. \"lung\": [10, 11, 12, 13, 14]")
    for dataset in datasets:
        missing = [name for name in targets if name not in dataset.label_map]
        if missing:
            warnings.warn(f"dataset {dataset.name} does not label {', '.join(missing)}: in its cases those "
                          "organs count as background. Leave that dataset out, or choose labels it has.")
