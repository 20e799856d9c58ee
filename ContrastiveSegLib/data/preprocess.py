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
from typing import Dict, List, Optional, Sequence, Tuple

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
    elif config.intensity == "ct_zscore":
        steps.append(ScaleIntensityRanged(keys="image", **zscore_range(config)))
    elif config.intensity == "percentile":
        low, high = config.percentiles
        steps.append(ScaleIntensityRangePercentilesd(keys="image", lower=float(low), upper=float(high),
                                                     b_min=0.0, b_max=1.0, clip=True))
    else:
        raise ValueError(f"unknown intensity normalisation {config.intensity!r}: "
                         "'ct_window', 'ct_zscore' or 'percentile'")
    if pad_to is not None:
        size = [int(p) for p in pad_to]
        steps.append(SpatialPadd(keys="image", spatial_size=size, mode="constant", value=padding_value(config)))
        if with_label:
            steps.append(SpatialPadd(keys="label", spatial_size=size, mode="constant"))
    return Compose(steps)


def padding_value(config: PreprocessConfig) -> float:
    """The normalised intensity that stands for "outside the scan": the bottom of the intensity range.

    Patches that reach past a scan's edge (training crops, sliding windows over a thin scan) are filled
    with it, so that what lies beyond the scan looks like air, as the clipped air around the patient
    does.  0 for ``ct_window`` and ``percentile`` (their range starts at 0); for ``ct_zscore`` the
    z-score of the clip's lower bound, since 0 there is the organs' mean, soft tissue.
    """
    return normalised_range(config)[0]


def continued_axes(config: PreprocessConfig) -> tuple:
    """Axes of the preprocessing grid along which a scan thinner than the patch is continued, not padded.

    ``(2,)`` for ``"RAS"`` and ``beyond_scan_ends == "continue"``: a CT covers a slab of a longer body,
    so past its first and last slice lies more body, not air; a sliding window shown air there sees an
    end of the body that no training patch had (the demo's patient B: 13 slices at 3 mm in a 32-slice
    window).  ``()`` for ``"air"``.
    """
    if config.beyond_scan_ends == "air":
        return ()
    if config.beyond_scan_ends != "continue":
        raise ValueError(f"unknown beyond_scan_ends {config.beyond_scan_ends!r}: 'continue' or 'air'")
    from .views import orientation_axis

    return (orientation_axis(config.orientation, "S")[0],)


def normalised_range(config: PreprocessConfig) -> tuple:
    """``(low, high)``: the values the run's normalisation clips intensities to."""
    if config.intensity == "ct_zscore":
        scaling = zscore_range(config)
        return float(scaling["b_min"]), float(scaling["b_max"])
    return 0.0, 1.0


def units_per_hu(config: PreprocessConfig) -> Optional[float]:
    """How much one Hounsfield unit moves a normalised intensity (None: not a CT normalisation)."""
    if config.intensity == "ct_window":
        low, high = config.window
        return 1.0 / (float(high) - float(low))
    if config.intensity == "ct_zscore":
        if not config.intensity_stats:
            raise ValueError("intensity 'ct_zscore' needs the run's intensity statistics, and this config has none")
        return 1.0 / max(float(config.intensity_stats["std"]), 1e-8)
    return None


def zscore_range(config: PreprocessConfig) -> dict:
    """``ScaleIntensityRange`` arguments for ct_zscore: clip to the run's HU range, then ``(HU - mean) / std``.

    Clipping and z-scoring is one linear map of the clipped range, so MONAI's range scaling does both.
    """
    stats = config.intensity_stats
    if not stats:
        raise ValueError("intensity 'ct_zscore' needs the run's intensity statistics "
                         "(data.preprocess.intensity_statistics), and this config has none")
    low, high = float(stats["clip_low"]), float(stats["clip_high"])
    mean, std = float(stats["mean"]), max(float(stats["std"]), 1e-8)
    return {"a_min": low, "a_max": high, "b_min": (low - mean) / std, "b_max": (high - mean) / std, "clip": True}


def intensity_statistics(prepared_or_cases, targets: Sequence[str] = (), percentiles: Sequence[float] = (0.5, 99.5),
                         max_voxels_per_case: int = 200_000, seed: int = 0) -> Dict[str, float]:
    """CT statistics for ct_zscore, from the HU values inside the labelled foreground of training cases.

    nnU-Net's CT scheme: the foreground voxels of all training cases give the clipping range (the
    ``percentiles`` of their HU values) and, after clipping, the mean and standard deviation.  Air, the
    table and everything unlabelled do not count, so the statistics describe the tissue that is segmented.

    Args:
        prepared_or_cases: catalog :class:`Case` objects (image and label files are read; a label is
            mapped to ``targets`` by name), or ``(image_hu, label)`` array pairs of one shape, any layout.
        targets: the organs whose voxels are foreground (for ``Case`` inputs).
        percentiles: lower and upper percentile of the clipping range.
        max_voxels_per_case: a larger foreground is subsampled to this many voxels, with a generator
            seeded by ``(seed, case number)``, so big datasets stay cheap and the result reproducible.

    Returns:
        ``{"clip_low", "clip_high", "mean", "std"}`` in HU and ``"voxels"``, the number of values used.
    """
    values = []
    for number, item in enumerate(prepared_or_cases):
        if isinstance(item, Case):
            image, target, _ = _read_image_and_target(item, targets)
            hu = sitk.GetArrayViewFromImage(image)
        else:
            hu, target = (np.asarray(a) for a in item)
        foreground = np.asarray(hu, dtype=np.float32)[np.asarray(target) > 0]
        if foreground.size > max_voxels_per_case:
            pick = np.random.default_rng([int(seed), number]).choice(foreground.size, max_voxels_per_case,
                                                                     replace=False)
            foreground = foreground[np.sort(pick)]
        values.append(foreground)
    pooled = np.concatenate(values) if values else np.zeros(0, dtype=np.float32)
    if pooled.size == 0:
        raise InputError("no labelled foreground voxel to compute the CT intensity statistics from",
                         path="--data", fix="check --labels against the datasets' label names, or use "
                                            "--intensity ct_window")
    low, high = np.percentile(pooled.astype(np.float64), [float(percentiles[0]), float(percentiles[1])])
    clipped = np.clip(pooled.astype(np.float64), low, high)
    return {"clip_low": float(low), "clip_high": float(high), "mean": float(clipped.mean()),
            "std": float(clipped.std()), "voxels": int(pooled.size)}


def ct_units(values: np.ndarray, target: np.ndarray, reference: Dict[str, float]) -> np.ndarray:
    """A scan of another modality (MR) in CT-like units: linear, so that its labelled organs get ``reference``.

    nnU-Net normalises each modality by its own statistics; a CT run's network reads HU, so an MR training
    case is brought onto the CT cases' scale instead: the values inside ``target`` (> 0), clipped to their
    0.5-99.5 percentiles, have mean m and standard deviation s, and every voxel becomes
    ``(v - m) / s * reference["std"] + reference["mean"]``, rounded to whole units as CT's HU are.  Only the
    scale moves: the organs keep the MR's contrast (an MR liver brighter than its spleen stays so, and fat
    that is bright in MR becomes bright), so the case adds an anatomy, not a CT.  HU rules (the body mask,
    gas, vessels) then act on these values.
    """
    stats = intensity_statistics([(values, target)])
    if stats["std"] <= 0:
        raise InputError("its labelled organs all have one intensity, so it cannot be brought onto CT units",
                         fix="check that the image and the label belong together")
    scaled = (np.asarray(values, dtype=np.float32) - stats["mean"]) / stats["std"] * reference["std"] + reference["mean"]
    return np.round(scaled).astype(np.float32)


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


def _read_image_and_target(case: Case, targets: Sequence[str]) -> tuple:
    """``(image sitk in HU, target (z, y, x) uint8, the target's grid)`` of a labelled case.

    A label written on the same voxels with axes flipped or permuted is moved onto the image grid;
    any other grid mismatch is an :class:`InputError`.
    """
    from .io import check_same_grid, read_image, resample_to_reference, same_grid

    image = read_image(case.image)
    target, label_image = target_from_label(case, targets)
    label_grid = label_image.image
    if same_voxels_reordered(image, label_grid) and not same_grid(image, label_grid):
        moved = sitk.GetImageFromArray(target)
        moved.CopyInformation(label_grid)
        target = sitk.GetArrayFromImage(resample_to_reference(moved, image, "nearest"))
        label_grid = image
    check_same_grid(image, label_grid, case.image, case.label)
    return image, target, label_grid


def prepared_body_mask(image: sitk.Image, config: PreprocessConfig,
                       pad_to: Optional[Sequence[int]] = None) -> np.ndarray:
    """The patient's trunk (engine/body.py) of a CT ``image`` in HU, on the preprocessing grid.

    Returns a bool ``[1, X, Y, Z]`` array aligned with the prepared image, so validation and
    pseudo-labels can be masked exactly as ``predict`` masks its labelmaps.
    """
    from monai.data import MetaTensor
    from monai.transforms import Compose, Orientationd, Spacingd, SpatialPadd

    from ..engine.body import body_mask

    steps = [Orientationd(keys=["body"], axcodes=config.orientation),
             Spacingd(keys=["body"], pixdim=tuple(float(s) for s in config.spacing), mode="nearest")]
    if pad_to is not None:
        steps.append(SpatialPadd(keys=["body"], spatial_size=[int(p) for p in pad_to], mode="constant"))
    mask = to_monai_array(body_mask(image).astype(np.uint8))
    out = Compose(steps)({"body": MetaTensor(mask, affine=affine_from_sitk(image))})
    return np.rint(np.asarray(out["body"].numpy())) > 0


def mask_outside_prepared_body(labels: np.ndarray, case: "PreparedCase") -> np.ndarray:
    """``labels`` (``[X, Y, Z]`` or ``[1, X, Y, Z]``) with background outside ``case.body``; unchanged without one."""
    if case.body is None:
        return labels
    body = case.body if labels.ndim == case.body.ndim else case.body[0]
    return np.where(body, labels, np.zeros_like(labels))


@dataclass
class PreparedCase:
    """A case on the network's grid.

    ``image`` float32 ``[1, X, Y, Z]`` (intensities as the run's normalisation makes them), ``label``
    uint8 ``[1, X, Y, Z]`` or None, ``body`` bool ``[1, X, Y, Z]`` (the trunk, CT only) or None.
    """

    case_id: str
    image: np.ndarray
    label: Optional[np.ndarray]
    affine: np.ndarray
    body: Optional[np.ndarray] = None
    fill: float = 0.0   # the image value beyond the scan's edge (:func:`padding_value`)
    continued_axes: Tuple[int, ...] = ()   # axes a sliding window continues the scan along (:func:`continued_axes`)


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

        if with_label:
            image, target, label_grid = _read_image_and_target(case, self.targets)
            if not target.any():
                warnings.warn(f"{case.label}: none of {', '.join(self.targets)} is labelled in this case; "
                              "it is skipped")
                return None
        else:
            from .io import read_image

            image = read_image(case.image)
        if not case.is_ct() and self.config.is_ct():
            image = self._in_ct_units(case, image, target if with_label else None)
        data = {"image": MetaTensor(to_monai_array(sitk.GetArrayViewFromImage(image).astype(np.float32)),
                                    affine=affine_from_sitk(image))}
        if with_label:
            data["label"] = MetaTensor(to_monai_array(target), affine=affine_from_sitk(label_grid))
        transform = build_preprocess_transform(self.config, self.pad_to, with_label)
        out = transform(data)
        image_array = np.asarray(out["image"].numpy(), dtype=np.float32)
        label_array = None
        if with_label:
            label_array = np.rint(np.asarray(out["label"].numpy())).astype(np.uint8)
        body = None
        if self.config.is_ct():
            body = prepared_body_mask(image, self.config, self.pad_to)
        return PreparedCase(case.case_id, image_array, label_array, np.asarray(out["image"].affine, dtype=np.float64),
                            body, padding_value(self.config), continued_axes(self.config))

    def _in_ct_units(self, case: Case, image: sitk.Image, target: Optional[np.ndarray]) -> sitk.Image:
        """A labelled training case of another modality in a CT run, mapped onto HU (:func:`ct_units`)."""
        if target is None or not self.config.ct_units_reference:
            raise InputError(f"is {case.modality}, and this run's network reads CT in HU; only a labelled "
                             f"{case.modality} training case can be brought onto HU (from its organs' intensities)",
                             path=case.image,
                             fix="train on it together with at least one labelled CT, or leave it out; "
                                 "predict reads CT only")
        try:
            values = ct_units(sitk.GetArrayViewFromImage(image), target, self.config.ct_units_reference)
        except InputError as error:
            raise InputError(error.problem, path=case.image, fix=error.fix) from None
        mapped = sitk.GetImageFromArray(values)
        mapped.CopyInformation(image)
        return mapped

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
                          case.label_map, "body"] + ([] if case.is_ct() else [case.modality]),
                         sort_keys=True, default=str)
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:20]
        return os.path.join(self.cache_dir, f"{digest}.npz")

    def _load_from_disk(self, case: Case, with_label: bool) -> Optional[PreparedCase]:
        path = self._cache_path(case, with_label)
        if not path or not os.path.exists(path):
            return None
        with np.load(path) as stored:
            label = stored["label"] if "label" in stored.files else None
            body = stored["body"] if "body" in stored.files else None
            return PreparedCase(case.case_id, stored["image"], label, stored["affine"], body,
                                padding_value(self.config), continued_axes(self.config))

    def _save_to_disk(self, case: Case, with_label: bool, prepared: PreparedCase) -> None:
        path = self._cache_path(case, with_label)
        if not path:
            return
        os.makedirs(self.cache_dir, exist_ok=True)
        arrays = {"image": prepared.image, "affine": prepared.affine}
        if prepared.label is not None:
            arrays["label"] = prepared.label
        if prepared.body is not None:
            arrays["body"] = prepared.body
        temporary = path + f".tmp{os.getpid()}.npz"
        np.savez(temporary, **arrays)
        os.replace(temporary, path)
