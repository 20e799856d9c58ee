"""Self-training's unlabelled scans: dataset specs, folders of scans, DICOM series; clear errors otherwise."""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Sequence

from ..data.catalog import IMAGE_SUFFIXES, Case, Dataset, _safe_name, load_dataset
from ..errors import InputError


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
