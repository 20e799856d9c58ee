"""Bring a case to the network's grid: orientation, spacing, intensity, targets.

Volumes are read with SimpleITK (which knows DICOM series and Slicer's
``.seg.nrrd``) and handed to MONAI as ``MetaTensor``s with a RAS affine, so the
MONAI transforms (``Orientationd``, ``Spacingd``, ``ScaleIntensityRanged``,
``SpatialPadd``) do the geometry.  Arrays here are channel-first in MONAI's
voxel order ``[C, X, Y, Z]``; SimpleITK arrays elsewhere are ``(z, y, x)``.

Preprocessed cases are cached in memory for the life of a run (later epochs
neither re-read nor re-resample), and optionally on disk (``cache_dir``),
keyed by the files' paths, sizes and times and by every setting that changes
the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..config import PreprocessConfig
from ..errors import InputError
from .catalog import Case

# SimpleITK works in LPS, MONAI in RAS: the two differ by the sign of x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def affine_from_sitk(image: sitk.Image) -> np.ndarray:
    """The 4x4 RAS affine mapping MONAI voxel indices ``(x, y, z)`` to millimetres."""
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)[None, :]
    affine[:3, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ affine


def reference_from_affine(affine_ras: np.ndarray, shape_xyz: Sequence[int]) -> sitk.Image:
    """An empty SimpleITK image with the grid of a MONAI array (``shape_xyz``, RAS affine)."""
    lps = _LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing[None, :]
    reference = sitk.Image([int(s) for s in shape_xyz], sitk.sitkUInt8)
    reference.SetSpacing([float(s) for s in spacing])
    reference.SetDirection([float(v) for v in direction.reshape(-1)])
    reference.SetOrigin([float(v) for v in lps[:3, 3]])
    return reference


def to_monai_array(array_zyx: np.ndarray) -> np.ndarray:
    """SimpleITK's ``(z, y, x)`` -> MONAI's channel-first ``[1, x, y, z]``."""
    return np.ascontiguousarray(np.transpose(array_zyx, (2, 1, 0))[None])


def from_monai_array(array_cxyz: np.ndarray) -> np.ndarray:
    """MONAI's ``[x, y, z]`` or ``[1, x, y, z]`` -> SimpleITK's ``(z, y, x)``."""
    array = np.asarray(array_cxyz)
    if array.ndim == 4:
        array = array[0]
    return np.ascontiguousarray(np.transpose(array, (2, 1, 0)))


def build_preprocess_transform(config: PreprocessConfig, pad_to: Optional[Sequence[int]] = None,
                               with_label: bool = True):
    """The MONAI chain on ``{"image": MetaTensor, "label": MetaTensor}`` dicts."""
    from monai.transforms import (
        Compose,
        Orientationd,
        ScaleIntensityRanged,
        ScaleIntensityRangePercentilesd,
        Spacingd,
        SpatialPadd,
    )

    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    steps = [
        Orientationd(keys=keys, axcodes=config.orientation),
        Spacingd(keys=keys, pixdim=tuple(float(s) for s in config.spacing), mode=modes),
    ]
    if config.intensity == "ct_window":
        low, high = config.window
        steps.append(ScaleIntensityRanged(keys="image", a_min=float(low), a_max=float(high),
                                          b_min=0.0, b_max=1.0, clip=True))
    elif config.intensity == "percentile":
        low, high = config.percentiles
        steps.append(ScaleIntensityRangePercentilesd(keys="image", lower=float(low), upper=float(high),
                                                     b_min=0.0, b_max=1.0, clip=True))
    else:
        raise ValueError(f"unknown intensity normalisation {config.intensity!r}: 'ct_window' or 'percentile'")
    if pad_to is not None:
        steps.append(SpatialPadd(keys=keys, spatial_size=[int(p) for p in pad_to], mode="constant"))
    return Compose(steps)


def same_voxels_reordered(image: sitk.Image, label: sitk.Image, tolerance: float = 1e-3) -> bool:
    """True if ``label`` covers exactly the voxels of ``image``, only with axes flipped or permuted.

    Such a label (e.g. written with y pointing the other way) can be moved onto
    the image grid by nearest-neighbour resampling without changing a voxel.
    """
    if image.GetDimension() != 3 or label.GetDimension() != 3:
        return False
    # The label's continuous index of each image index: index_label = M @ index_image + t.
    origin = np.array(label.TransformPhysicalPointToContinuousIndex(image.GetOrigin()))
    columns = []
    for axis in range(3):
        unit = [0, 0, 0]
        unit[axis] = 1
        point = image.TransformContinuousIndexToPhysicalPoint(unit)
        columns.append(np.array(label.TransformPhysicalPointToContinuousIndex(point)) - origin)
    matrix = np.stack(columns, axis=1)
    if not np.allclose(np.abs(matrix).sum(axis=0), 1.0, atol=tolerance) or \
            not np.allclose(np.sort(np.abs(matrix), axis=0)[-1], 1.0, atol=tolerance):
        return False
    if not np.allclose(origin, np.rint(origin), atol=tolerance):
        return False
    far_corner = origin + matrix @ (np.array(image.GetSize()) - 1)
    low, high = np.minimum(origin, far_corner), np.maximum(origin, far_corner)
    return bool(np.allclose(low, 0, atol=tolerance) and np.allclose(high, np.array(label.GetSize()) - 1, atol=tolerance))


def target_from_label(case: Case, targets: Sequence[str]) -> tuple:
    """Read ``case.label`` and map it to training classes ``0..len(targets)`` by organ name.

    Returns ``(labels_zyx uint8, label_image)``.  Raises :class:`InputError`
    when the file holds values its label map does not name.
    """
    from .io import read_label_image

    label_image = read_label_image(case.label)
    if label_image.segments:
        from .segnrrd import segmentation_targets

        return segmentation_targets(label_image, case.label_map, targets), label_image
    target = np.zeros(label_image.layers[0].shape, dtype=np.uint8)
    known = {value for values in case.label_map.values() for value in values if isinstance(value, int)}
    present = label_image.values()
    unknown = sorted(present - known)
    if unknown:
        raise InputError(f"holds label value(s) {unknown} that the dataset's label map does not name",
                         path=case.label,
                         details="named values: " + ", ".join(
                             f"{values}={name}" for name, values in sorted(case.label_map.items())),
                         fix="add the missing values to the dataset's labels map, or fix the label file")
    layer = label_image.layers[0]
    for index, name in enumerate(targets, start=1):
        values = [value for value in case.label_map.get(name, []) if isinstance(value, int)]
        if values:
            target[np.isin(layer, values)] = index
    return target, label_image


@dataclass
class PreparedCase:
    """A case on the network's grid: ``image`` float32 ``[1, X, Y, Z]`` in [0, 1], ``label`` uint8 or None."""

    case_id: str
    image: np.ndarray
    label: Optional[np.ndarray]
    affine: np.ndarray


class CasePreparer:
    """Reads, checks and preprocesses cases; remembers the results.

    Args:
        config: the preprocessing settings.
        targets: canonical organ names, class 1..K in this order.
        pad_to: pad every volume to at least this size (the training patch).
        cache_dir: optional folder for an on-disk cache shared between runs.
    """

    def __init__(self, config: PreprocessConfig, targets: Sequence[str], pad_to: Optional[Sequence[int]] = None,
                 cache_dir: Optional[str] = None):
        self.config = config
        self.targets = list(targets)
        self.pad_to = None if pad_to is None else [int(p) for p in pad_to]
        self.cache_dir = cache_dir
        self._memory: Dict[str, PreparedCase] = {}

    def prepare(self, case: Case, with_label: bool = True) -> Optional[PreparedCase]:
        """The preprocessed case, or None (with a warning) if its label has none of the targets."""
        key = f"{case.case_id}|{with_label}"
        if key not in self._memory:
            prepared = self._load_from_disk(case, with_label)
            if prepared is None:
                prepared = self._compute(case, with_label)
                if prepared is not None:
                    self._save_to_disk(case, with_label, prepared)
            if prepared is None:
                return None
            self._memory[key] = prepared
        return self._memory[key]

    def prepare_all(self, cases: Sequence[Case], with_label: bool = True, progress: bool = True) -> List[PreparedCase]:
        from tqdm.auto import tqdm

        prepared = []
        for case in tqdm(cases, desc="preprocessing", unit="case", disable=not progress, leave=False):
            result = self.prepare(case, with_label)
            if result is not None:
                prepared.append(result)
        return prepared

    def _compute(self, case: Case, with_label: bool) -> Optional[PreparedCase]:
        from monai.data import MetaTensor

        from .io import check_same_grid, read_image, resample_to_reference, same_grid

        image = read_image(case.image)
        data = {"image": MetaTensor(to_monai_array(sitk.GetArrayViewFromImage(image).astype(np.float32)),
                                    affine=affine_from_sitk(image))}
        if with_label:
            target, label_image = target_from_label(case, self.targets)
            label_grid = label_image.image
            if same_voxels_reordered(image, label_grid) and not same_grid(image, label_grid):
                moved = sitk.GetImageFromArray(target)
                moved.CopyInformation(label_grid)
                target = sitk.GetArrayFromImage(resample_to_reference(moved, image, "nearest"))
                label_grid = image
            check_same_grid(image, label_grid, case.image, case.label)
            if not target.any():
                warnings.warn(f"{case.label}: none of {', '.join(self.targets)} is labelled in this case; "
                              "it is skipped")
                return None
            data["label"] = MetaTensor(to_monai_array(target), affine=affine_from_sitk(label_grid))
        transform = build_preprocess_transform(self.config, self.pad_to, with_label)
        out = transform(data)
        image_array = np.asarray(out["image"].numpy(), dtype=np.float32)
        label_array = None
        if with_label:
            label_array = np.rint(np.asarray(out["label"].numpy())).astype(np.uint8)
        affine = np.asarray(out["image"].affine, dtype=np.float64)
        return PreparedCase(case.case_id, image_array, label_array, affine)

    # --- optional disk cache -------------------------------------------------------------------------
    def _cache_path(self, case: Case, with_label: bool) -> Optional[str]:
        if not self.cache_dir:
            return None
        stamp = []
        for path in (case.image, case.label if with_label else None):
            if path:
                info = os.stat(path)
                stamp.append([os.path.abspath(path), info.st_size, info.st_mtime_ns])
        key = json.dumps([stamp, asdict(self.config), self.targets, self.pad_to, with_label,
                          case.label_map], sort_keys=True, default=str)
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:20]
        return os.path.join(self.cache_dir, f"{digest}.npz")

    def _load_from_disk(self, case: Case, with_label: bool) -> Optional[PreparedCase]:
        path = self._cache_path(case, with_label)
        if not path or not os.path.exists(path):
            return None
        with np.load(path) as stored:
            label = stored["label"] if "label" in stored.files else None
            return PreparedCase(case.case_id, stored["image"], label, stored["affine"])

    def _save_to_disk(self, case: Case, with_label: bool, prepared: PreparedCase) -> None:
        path = self._cache_path(case, with_label)
        if not path:
            return
        os.makedirs(self.cache_dir, exist_ok=True)
        arrays = {"image": prepared.image, "affine": prepared.affine}
        if prepared.label is not None:
            arrays["label"] = prepared.label
        temporary = path + f".tmp{os.getpid()}.npz"
        np.savez(temporary, **arrays)
        os.replace(temporary, path)
