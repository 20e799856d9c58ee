"""Augmentation of patches: one module for supervised training and for contrastive views.

Spatial transforms are drawn as parameters (:class:`SpatialTransform`) and turned
into a dense map of *source coordinates*: for every voxel of the output patch,
the (fractional) voxel of the input array it samples.  Image and label are
resampled through the same map (linear / nearest), so they stay aligned; two
views drawn from one input each have their own map, so the voxel correspondence
between them is known exactly (a point of the input is at output voxel ``q`` of
a view when that view's map sends ``q`` to it).

The MixCL paper applies a random elastic deformation and a random affine transform
to the 3D patch (each with p = 0.5), then turns it into views with random
intensity shift, gamma, Gaussian smoothing and Gaussian noise (each p = 0.2).
Only the probabilities are the paper's; the ranges are ours.
Views made with :func:`intensity_view` from one patch stay voxel-aligned.
Every function draws from a ``numpy.random.Generator`` (and seeds each MONAI
transform from it), so a sample is reproducible from its ``(seed, index)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31 - 1))


@dataclass(frozen=True)
class SpatialTransform:
    """A drawn spatial transform from an output patch to an input array, in voxel units.

    ``source = matrix @ (out_voxel - out_centre) + input_centre + elastic(out_voxel)``

    Attributes:
        matrix: ``[3, 3]`` output-voxel offset -> input-voxel offset (rotation and 1/scale).
        input_centre: ``[3]`` the input voxel the output patch's centre samples (a crop offset moves it).
        elastic: ``[3, px, py, pz]`` coarse displacement field in input voxels on control points spanning
            the output patch (interpolated trilinearly to every voxel), or None.
    """

    matrix: np.ndarray
    input_centre: np.ndarray
    elastic: Optional[np.ndarray] = None

    @staticmethod
    def identity(input_shape: Sequence[int]) -> "SpatialTransform":
        """The transform that samples the centre of an input of ``input_shape`` unchanged."""
        return SpatialTransform(np.eye(3), np.array([(s - 1) / 2.0 for s in input_shape], dtype=np.float64))

    def source_coordinates(self, output_shape: Sequence[int]):
        """``[X, Y, Z, 3]`` float32 tensor: the input voxel each voxel of an ``output_shape`` patch samples."""
        import torch
        import torch.nn.functional as F

        size = [int(s) for s in output_shape]
        centre = torch.tensor([(s - 1) / 2.0 for s in size], dtype=torch.float32)
        axes = [torch.arange(s, dtype=torch.float32) for s in size]
        offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1) - centre      # [X, Y, Z, 3]
        source = offsets @ torch.from_numpy(np.asarray(self.matrix, dtype=np.float32)).T
        if self.elastic is not None:
            coarse = torch.from_numpy(np.asarray(self.elastic, dtype=np.float32))
            field = F.interpolate(coarse[None], size=size, mode="trilinear", align_corners=True)[0]
            source = source + field.permute(1, 2, 3, 0)
        return source + torch.from_numpy(np.asarray(self.input_centre, dtype=np.float32))


def resample(array: np.ndarray, source, mode: str = "bilinear", fill: float = 0.0) -> np.ndarray:
    """Sample ``array [C, X, Y, Z]`` at ``source [x, y, z, 3]`` input-voxel coordinates (``fill`` outside).

    ``mode`` is ``"bilinear"`` (trilinear, for images) or ``"nearest"`` (for labels; the
    dtype is kept).  Returns ``[C, x, y, z]``.
    """
    if fill:
        # grid_sample pads with zeros: sample the array minus fill, add it back (exact, also at the edge).
        return resample(np.asarray(array, dtype=np.float32) - np.float32(fill), source, mode) + np.float32(fill)
    import torch
    import torch.nn.functional as F

    size = [int(s) for s in array.shape[1:]]
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in size], dtype=torch.float32)
    grid = (source * scale - 1.0).flip(-1)[None]   # grid_sample wants (z, y, x) order = (W, H, D)
    as_float = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    moved = F.grid_sample(as_float, grid, mode=mode, padding_mode="zeros", align_corners=True)[0].numpy()
    if mode == "nearest":
        return moved.round().astype(array.dtype)
    return moved.astype(np.float32)


def draw_spatial_transform(rng: np.random.Generator, input_shape: Sequence[int], *,
                           affine_prob: float = 0.5, elastic_prob: float = 0.5,
                           max_rotation=0.26, scale_range: Tuple[float, float] = (0.9, 1.1),
                           control_points: Optional[Sequence[int]] = None, max_displacement: float = 3.0,
                           output_shape: Optional[Sequence[int]] = None,
                           control_spacing: int = 16) -> SpatialTransform:
    """Draw an affine (rotation about each axis, a scale per axis) and an elastic transform.

    * affine, with ``affine_prob``: rotation about axis ``a`` uniform in ``+-max_rotation[a]`` rad
      (a scalar applies to all three axes) and a zoom per axis uniform in ``scale_range``
      (a zoom above 1 enlarges the anatomy: the output samples a smaller input region);
    * elastic, with ``elastic_prob``: a displacement per axis on control points every
      ``control_spacing`` voxels of the output patch, normal with a standard deviation uniform
      in ``[0, max_displacement]`` voxels.  (MONAI's ``Rand3DElastic`` smooths a
      full-resolution random field instead, about a second per 64x64x32 patch on a CPU core;
      this costs milliseconds and gives the same kind of smooth deformation.)

    The output patch is centred on the centre of ``input_shape``.  The draws are made in a
    fixed order, so one generator state gives one transform.
    """
    elastic, affine = rng.random() < elastic_prob, rng.random() < affine_prob
    matrix = np.eye(3)
    if affine:
        limits = np.broadcast_to(np.asarray(max_rotation, dtype=np.float64), (3,))
        if np.all(limits == limits[0]):
            angles = rng.uniform(-limits[0], limits[0], size=3)
        else:
            angles = rng.uniform(-limits, limits)
        scales = rng.uniform(scale_range[0], scale_range[1], size=3)
        matrix = _rotation(angles) @ np.diag(1.0 / scales)   # output voxel -> input voxel
    field = None
    if elastic:
        shape = [int(s) for s in (output_shape if output_shape is not None else input_shape)]
        points = list(control_points) if control_points is not None else \
            [max(2, int(np.ceil(s / control_spacing)) + 1) for s in shape]
        sigma = rng.uniform(0.0, max_displacement)
        field = rng.normal(0.0, sigma, size=[3] + points)
    centre = np.array([(s - 1) / 2.0 for s in input_shape], dtype=np.float64)
    return SpatialTransform(matrix, centre, field)


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix: about axis 0, then 1, then 2, by ``angles`` radians."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def intensity_view(image: np.ndarray, rng: np.random.Generator, prob: float = 0.2) -> np.ndarray:
    """One view: random intensity shift, gamma, Gaussian smoothing and Gaussian noise, each with ``prob``.

    ``image`` is ``[1, X, Y, Z]`` float32 in about [0, 1]; the view has the same
    shape and stays voxel-aligned with ``image``.
    """
    from monai.transforms import RandAdjustContrast, RandGaussianNoise, RandGaussianSmooth, RandShiftIntensity

    out = image.astype(np.float32, copy=False)
    for transform in (RandShiftIntensity(offsets=0.1, prob=prob),
                      RandAdjustContrast(gamma=(0.7, 1.5), prob=prob),
                      RandGaussianSmooth(sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), sigma_z=(0.25, 1.0), prob=prob),
                      RandGaussianNoise(std=0.05, prob=prob)):
        transform.set_random_state(seed=_seed(rng))
        out = transform(out)
    return np.asarray(out, dtype=np.float32)


# --- paired views: each view its own geometry, with the voxel correspondence between them -----------------
#
# Dense contrastive losses (MixCL's identity term, GCL's pixel InfoNCE) compare a voxel of one view with
# "the same voxel" of the other.  If both views share one spatial transform that is the same array index,
# and a code for where a voxel sits in the patch satisfies the loss (docs/pretraining.md).  Here both views
# are cut from one larger crop, each with its own offset, rotation, scale and elastic field, and a pair of
# positions counts as corresponding when their source coordinates in the crop coincide (PixPro, VADeR and
# DenseCL do the same in 2D).

VIEW_GEOMETRIES = ("independent", "shared")


def view_crop_shape(patch_shape: Sequence[int], max_shift: float = 0.25, slack: float = 1.2) -> Tuple[int, ...]:
    """Shape of the shared crop two views of ``patch_shape`` are cut from.

    Each view's centre moves by up to ``max_shift * patch`` per axis; ``slack`` leaves room for
    rotation and zoom, so the views rarely sample outside the crop (where they would see zeros).
    """
    return tuple(int(np.ceil(p * (1.0 + 2.0 * max_shift) * slack)) for p in patch_shape)


def map_points(transform: SpatialTransform, points, output_shape: Sequence[int]):
    """Source coordinates of fractional output positions: ``points [N, 3]`` -> ``[N, 3]`` float32 tensor.

    At integer voxels this equals :meth:`SpatialTransform.source_coordinates`; between them the
    elastic field is interpolated trilinearly from the same control points.
    """
    import torch

    points = torch.as_tensor(points, dtype=torch.float32)
    size = [int(s) for s in output_shape]
    centre = torch.tensor([(s - 1) / 2.0 for s in size], dtype=torch.float32)
    source = (points - centre) @ torch.from_numpy(np.asarray(transform.matrix, dtype=np.float32)).T
    if transform.elastic is not None:
        source = source + _elastic_at(transform, points, size)
    return source + torch.from_numpy(np.asarray(transform.input_centre, dtype=np.float32))


def _elastic_at(transform: SpatialTransform, points, size: Sequence[int]):
    """The elastic displacement ``[N, 3]`` at fractional output positions ``points [N, 3]``."""
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(np.asarray(transform.elastic, dtype=np.float32))[None]       # [1, 3, px, py, pz]
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in size], dtype=torch.float32)
    grid = (points * scale - 1.0).flip(-1).reshape(1, -1, 1, 1, 3)
    field = F.grid_sample(coarse, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return field.reshape(3, -1).T


def inverse_map_points(transform: SpatialTransform, sources, output_shape: Sequence[int], iterations: int = 8):
    """Output positions that ``transform`` sends to ``sources [N, 3]``: ``[N, 3]`` float32 tensor.

    The affine part is inverted exactly; the elastic part by fixed-point iteration
    ``p <- A^-1 (s - centre - elastic(p))``, which converges because the field is smooth and
    a few voxels at most.  Without an elastic field the answer is exact after one step.
    """
    import torch

    sources = torch.as_tensor(sources, dtype=torch.float32)
    size = [int(s) for s in output_shape]
    centre = torch.tensor([(s - 1) / 2.0 for s in size], dtype=torch.float32)
    inverse = torch.from_numpy(np.linalg.inv(np.asarray(transform.matrix, dtype=np.float64)).astype(np.float32))
    offset = sources - torch.from_numpy(np.asarray(transform.input_centre, dtype=np.float32))
    points = offset @ inverse.T + centre
    if transform.elastic is None:
        return points
    for _ in range(int(iterations)):
        points = (offset - _elastic_at(transform, points, size)) @ inverse.T + centre
    return points


def level_grid_shape(patch_shape: Sequence[int], factor: int) -> Tuple[int, ...]:
    """Grid of a feature level that pools ``factor`` voxels per axis (at least one cell per axis)."""
    return tuple(max(int(p) // int(factor), 1) for p in patch_shape)


def cell_centres(patch_shape: Sequence[int], factor: int):
    """``[prod(grid), 3]`` float32 tensor: the voxel position each cell of the level grid stands for, C order.

    Cell ``k`` covers voxels ``k * factor .. k * factor + factor - 1``, so its centre is
    ``k * factor + (factor - 1) / 2``.
    """
    import torch

    grid = level_grid_shape(patch_shape, factor)
    axes = [torch.arange(g, dtype=torch.float32) * factor + (factor - 1) / 2.0 for g in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def view_correspondence(first: SpatialTransform, second: SpatialTransform, patch_shape: Sequence[int],
                        factor: int = 1, tolerance: float = 0.5,
                        cells: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Corresponding cells of two views on the grid of a level that pools ``factor`` voxels per axis.

    For every cell of view 1, the point of the crop its centre samples is found in view 2
    (:func:`inverse_map_points`); the nearest cell of view 2 is its partner when it lies inside
    view 2's patch and its own centre samples a point at most ``tolerance * factor`` crop voxels
    away (the two source coordinates coincide up to that).  Pairs outside the views' overlap have
    no partner and are left out.

    ``cells`` (flat view-1 cell indices) limits the search to those cells: a fine level has far
    more cells than a loss needs, and the search costs time in the data workers.

    Returns:
        ``(cells1 [n] int64, cells2 [n] int64)``: flat C-order indices into the level grid of
        view 1 and of view 2; ``n`` is the number of corresponding pairs (one per view-1 cell at most).
    """
    import torch

    grid = level_grid_shape(patch_shape, factor)
    centres = cell_centres(patch_shape, factor)
    flat1 = torch.arange(centres.shape[0])
    if cells is not None:
        flat1 = torch.as_tensor(np.asarray(cells, dtype=np.int64))
        centres = centres[flat1]
    sources = map_points(first, centres, patch_shape)
    found = inverse_map_points(second, sources, patch_shape)
    partner = torch.round((found - (factor - 1) / 2.0) / factor).long()                 # [N, 3]
    limits = torch.tensor(grid)
    inside = ((partner >= 0) & (partner < limits)).all(dim=1)
    partner = partner.clamp(min=torch.zeros(3, dtype=torch.long), max=limits - 1)
    partner_centres = partner.float() * factor + (factor - 1) / 2.0
    distance = (map_points(second, partner_centres, patch_shape) - sources).norm(dim=1)
    keep = inside & (distance <= tolerance * factor)
    flat2 = (partner[:, 0] * grid[1] + partner[:, 1]) * grid[2] + partner[:, 2]
    return flat1[keep].numpy().astype(np.int64), flat2[keep].numpy().astype(np.int64)


def draw_view_transform(rng: np.random.Generator, crop_shape: Sequence[int], patch_shape: Sequence[int], *,
                        max_shift: float = 0.25, spatial_prob: float = 0.5, max_rotation: float = 0.26,
                        max_scale: float = 0.1, max_displacement: float = 3.0,
                        control_spacing: int = 16) -> SpatialTransform:
    """One view's geometry inside a crop: an offset of its centre (up to ``max_shift * patch`` per axis,
    always drawn), then affine and elastic each with ``spatial_prob`` as in :func:`draw_spatial_transform`."""
    shift = rng.uniform(-1.0, 1.0, size=3) * max_shift * np.asarray(patch_shape, dtype=np.float64)
    drawn = draw_spatial_transform(rng, crop_shape, affine_prob=spatial_prob, elastic_prob=spatial_prob,
                                   max_rotation=max_rotation, scale_range=(1.0 - max_scale, 1.0 + max_scale),
                                   max_displacement=max_displacement, output_shape=patch_shape,
                                   control_spacing=control_spacing)
    return SpatialTransform(drawn.matrix, drawn.input_centre + shift, drawn.elastic)


def render_view(crop: np.ndarray, label: Optional[np.ndarray], transform: SpatialTransform,
                patch_shape: Sequence[int]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Resample ``crop [1, *crop]`` (and its ``label``) through ``transform`` to a ``[1, *patch]`` view."""
    source = transform.source_coordinates(patch_shape)
    image = resample(crop, source, "bilinear")
    return image, (resample(label, source, "nearest") if label is not None else None)


def draw_view_pair(rng: np.random.Generator, crop_shape: Sequence[int], patch_shape: Sequence[int],
                   geometry: str = "independent", **options) -> Tuple[SpatialTransform, SpatialTransform]:
    """The two geometries of a view pair cut from one crop.

    ``geometry="independent"`` (default, ours): each view draws its own transform
    (:func:`draw_view_transform`, ``options`` passed on).  ``"shared"``: the MixCL paper's reading,
    one transform for both views (then every voxel corresponds to itself).
    """
    if geometry not in VIEW_GEOMETRIES:
        raise ValueError(f"geometry must be one of {VIEW_GEOMETRIES}, got {geometry!r}")
    first = draw_view_transform(rng, crop_shape, patch_shape, **options)
    if geometry == "shared":
        return first, first
    return first, draw_view_transform(rng, crop_shape, patch_shape, **options)


# --- Supervised augmentation -----------------------------------------------------------------------------
# Fine-tuning and self-training patches.  The spatial part follows nnU-Net's defaults where the issue
# does not say otherwise (rotation and scaling each with p = 0.2, one zoom for all axes), the intensity
# part nnU-Net's list (noise, blur, brightness, contrast, low resolution, gamma) as MONAI transforms.
# Rotation is about each axis of the preprocessing grid (RAS: x, y, z; z is the patient's long axis,
# so rotation about it is an in-plane, axial rotation and gets the larger range).

SUPERVISED_MAX_ROTATION = (np.deg2rad(15.0), np.deg2rad(15.0), np.deg2rad(30.0))   # about x, y, z
SUPERVISED_SCALE_RANGE = (0.85, 1.25)   # a zoom above 1 enlarges the anatomy


def intensity_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild intensity augmentation: scale, shift and noise (MONAI transforms, seeded from ``rng``).

    The supervised augmentation of runs made before the spatial recipe (``augmentation = "intensity"``);
    ``image`` is ``[1, X, Y, Z]`` float32, the result has its shape.
    """
    from monai.transforms import RandGaussianNoise, RandScaleIntensity, RandShiftIntensity

    out = image
    for transform in (RandScaleIntensity(factors=0.1, prob=0.5), RandShiftIntensity(offsets=0.1, prob=0.5),
                      RandGaussianNoise(prob=0.2, std=0.02)):
        transform.set_random_state(seed=_seed(rng))
        out = transform(out)
    return np.asarray(out, dtype=np.float32)


# Contrast-phase augmentation.  The same organ differs by tens to hundreds of HU between scans with and
# without intravenous contrast, and between its arterial and venous phases (non-contrast liver and aorta
# both about 40-50 HU; portal-venous liver about 90-110, aorta 130-200, arterial aorta above 250).  A
# network trained on one labelled scan of one phase learns each organ's HU and misses it in the other
# phase.  Moving each organ's intensities by its own random offset keeps its shape and surroundings and
# takes away its HU as a cue.
CONTRAST_PHASE_SHIFT_HU = (-100.0, 200.0)


def contrast_phase_shift(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, prob: float,
                         units_per_hu: float, value_range: Tuple[float, float],
                         shift_hu: Tuple[float, float] = CONTRAST_PHASE_SHIFT_HU) -> np.ndarray:
    """Each labelled organ of a patch, with probability ``prob``, shifted by its own offset in ``shift_hu``.

    Args:
        image: ``[1, *patch]`` float32, normalised (``units_per_hu`` normalised units per HU).
        label: ``[1, *patch]`` classes of the patch (0 = background, left as it is).
        value_range: the normalisation's clip (``data.preprocess.normalised_range``); shifted values are
            clipped to it, as a scan of that phase would have been.

    Draws from ``rng`` only when ``prob > 0``, so a run without it samples as before.
    """
    if prob <= 0:
        return image
    out = np.array(image, dtype=np.float32, copy=True)
    for value in np.unique(label):
        if value == 0 or rng.random() >= prob:
            continue
        out[label == value] += np.float32(rng.uniform(*shift_hu) * units_per_hu)
    return np.clip(out, value_range[0], value_range[1], out=out)


def _drawn_interiors(label: np.ndarray, classes: Sequence[int], rng: np.random.Generator, prob: float, draw):
    """``(parameter, inside)`` for each of ``classes`` drawn with probability ``prob``: ``draw(rng)``, then the
    class's label eroded by one voxel (its rim stands for the organ's wall), skipped when nothing is left.

    Per class, one draw decides, and a drawn class then takes ``draw(rng)`` before its erosion: the order
    in which the runs made with these augmentations sampled, kept so that they resume exactly."""
    from scipy.ndimage import binary_erosion

    for value in classes:
        if rng.random() >= prob:
            continue
        parameter = draw(rng)
        inside = binary_erosion(label[0] == value)
        if inside.any():
            yield parameter, inside


# Blood vessels (canonical names, data/labels.py): intravenous contrast brightens the blood inside them.
VESSELS = ("aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "superior_vena_cava",
           "pulmonary_artery", "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right")
# How much brighter contrast makes the blood, in HU: from a late venous phase to an arterial one.
VESSEL_CONTRAST_HU = (50.0, 300.0)


def vessel_lumen_contrast(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, prob: float,
                          classes: Sequence[int], units_per_hu: float, value_range: Tuple[float, float],
                          shift_hu: Tuple[float, float] = VESSEL_CONTRAST_HU) -> np.ndarray:
    """Each vessel of a patch, with probability ``prob``, has the blood inside its wall brightened.

    Contrast brightens the blood, not the vessel's wall: in a contrast-enhanced scan the aorta is a bright
    disc inside a ring of wall at soft-tissue HU, while without contrast wall and blood are one grey disc.
    A network trained on scans without contrast learns the grey disc; shown the bright one, it takes the
    ring for something else.  Here the inside of each vessel (the label eroded by one voxel; the rim, its
    wall at 3 mm, is left as it is) is moved up by an offset drawn from ``shift_hu``, clipped to the
    normalisation's range.  The label does not change.

    Args:
        image: ``[1, *patch]`` float32, normalised (``units_per_hu`` normalised units per HU).
        label: ``[1, *patch]`` classes of the patch.
        classes: the label values of the vessels among the run's targets (:data:`VESSELS`).

    Draws from ``rng`` only when ``prob > 0``, so a run without it samples as before.
    """
    if prob <= 0:
        return image
    out = None
    for shift, lumen in _drawn_interiors(label, classes, rng, prob, lambda r: r.uniform(*shift_hu)):
        offset = shift * units_per_hu
        out = np.array(image, dtype=np.float32, copy=True) if out is None else out
        out[0][lumen] = np.clip(out[0][lumen] + np.float32(offset), value_range[0], value_range[1])
    return image if out is None else out


# Solid organs whose tissue intravenous contrast brightens (canonical names, data/labels.py); vessels
# (VESSELS) and hollow organs' walls (HOLLOW_ORGANS) have their own rules.
ENHANCING_ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "pancreas", "adrenal_gland_left",
                    "adrenal_gland_right", "thyroid_gland")
# How much intravenous contrast brightens enhancing tissue, in HU: none (a scan without contrast) to
# about a portal-venous phase's liver and spleen (each some 40-60 HU above its unenhanced value).
ENHANCEMENT_HU = (0.0, 100.0)


def tissue_enhancement(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, prob: float,
                       solid: Sequence[int], hollow: Sequence[int], units_per_hu: float,
                       value_range: Tuple[float, float], shift_hu: Tuple[float, float] = ENHANCEMENT_HU) -> np.ndarray:
    """With probability ``prob``, the patch's enhancing tissue brightened by one offset, as contrast does.

    Intravenous contrast brightens the perfused organs together: the liver and the spleen by some 40-60 HU
    each in a portal-venous phase, the stomach's and bowel's wall (not what they hold), while fat and
    muscle stay nearly as they were.  One offset drawn from ``shift_hu`` is added to every voxel of the
    ``solid`` organs' labels and to the wall (the one-voxel rim of the label) of the ``hollow`` ones, and
    clipped to the normalisation's range: the organs keep their differences from one another and change
    against their surroundings.  Unlike :func:`contrast_phase_shift`, whose organs move each by its own
    offset, this keeps what one phase has in common.  The label does not change.

    Args:
        image: ``[1, *patch]`` float32, normalised (``units_per_hu`` normalised units per HU).
        label: ``[1, *patch]`` classes of the patch.
        solid, hollow: label values of the enhancing solid organs and of the hollow organs among the targets.

    Draws from ``rng`` only when ``prob > 0``, so a run without it samples as before.
    """
    from scipy.ndimage import binary_erosion

    if prob <= 0 or rng.random() >= prob:
        return image
    offset = np.float32(rng.uniform(*shift_hu) * units_per_hu)
    tissue = np.isin(label[0], list(solid))
    for value in hollow:
        organ = label[0] == value
        tissue |= organ & ~binary_erosion(organ)
    if not tissue.any():
        return image
    out = np.array(image, dtype=np.float32, copy=True)
    out[0][tissue] = np.clip(out[0][tissue] + offset, value_range[0], value_range[1])
    return out


# Organs that hold gas in some patients and not in others (canonical names, data/labels.py).
HOLLOW_ORGANS = ("stomach", "duodenum", "small_bowel", "colon", "esophagus")
# Share of a hollow organ's voxels (the most anterior ones) that hollow_organ_gas turns into gas.
GAS_SHARE = (0.1, 0.9)


def hollow_organ_gas(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, prob: float,
                     classes: Sequence[int], air: float, anterior_axis: int, anterior_sign: int = 1,
                     share: Tuple[float, float] = GAS_SHARE) -> np.ndarray:
    """Each hollow organ of a patch, with probability ``prob``, part filled with gas above a level.

    A stomach or bowel holds fluid in one scan and gas in another; a network trained on a scan whose
    stomach is full of fluid has never seen a stomach of gas, which at a CT window looks like the air
    outside the body.  In a supine patient gas rises to the front, under a flat gas-fluid level: the most
    anterior voxels of the organ (a share drawn from ``share``), inside its one-voxel wall (the label's
    rim, left as it is), become ``air`` (the normalisation's lowest value: what gas becomes).  The label
    does not change: the gas is still stomach.

    Args:
        image: ``[1, *patch]`` float32, normalised.
        label: ``[1, *patch]`` classes of the patch.
        classes: the label values of the hollow organs among the run's targets.
        anterior_axis, anterior_sign: the array axis that runs front-back and whether the front is at
            higher indices (+1, ``"A"`` in the orientation) or lower (-1, ``"P"``).

    Draws from ``rng`` only when ``prob > 0``, so a run without it samples as before.
    """
    if prob <= 0:
        return image
    out = None
    for fraction, inside in _drawn_interiors(label, classes, rng, prob, lambda r: r.uniform(*share)):
        front = np.nonzero(inside)[anterior_axis] * int(anterior_sign)
        level = np.quantile(front, 1.0 - fraction)
        gas = np.zeros_like(inside)
        gas[inside] = front >= level
        out = np.array(image, dtype=np.float32, copy=True) if out is None else out
        out[0][gas] = np.float32(air)
    return image if out is None else out


# Organs that fill and empty.  How much a stomach, gallbladder or bladder holds changes from scan to scan,
# and their size with it (a stomach from a collapsed hundred millilitres to a distended litre); a network
# trained on one scan sees each of them at one size only.  A linear factor drawn from FILLING_SIZE enlarges
# (or shrinks) the organ about its centre and pushes its neighbours aside, in the image and the label alike.
FILLING_ORGANS = ("stomach", "gallbladder", "urinary_bladder")
FILLING_SIZE = (0.9, 1.6)


def organ_geometry(label: np.ndarray, classes: Sequence[int], spacing: Sequence[float]) -> Dict[int, Tuple[np.ndarray, float]]:
    """``{class: (centre, radius)}`` of each of ``classes`` present in a case's ``label [1, X, Y, Z]``: its
    centre of mass in voxels and the radius in mm of the sphere of its volume (``spacing``: mm per voxel)."""
    geometry = {}
    for value in classes:
        voxels = np.argwhere(label[0] == value)
        if len(voxels):
            volume = len(voxels) * float(np.prod(np.asarray(spacing, dtype=np.float64)))
            geometry[int(value)] = (voxels.mean(axis=0), float((3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0)))
    return geometry


def draw_organ_sizes(rng: np.random.Generator, geometry: Dict[int, Tuple[np.ndarray, float]], classes: Sequence[int],
                     prob: float, size_range: Tuple[float, float] = FILLING_SIZE) -> list:
    """``[(centre, radius, factor)]`` for the organs of ``geometry`` resized in this patch.

    Each of ``classes``, in their order, draws a coin and a factor whether present or not (one generator
    state gives one result); it is resized when present and the coin falls below ``prob``.
    """
    resizes = []
    for value in classes:
        coin, factor = rng.random(), rng.uniform(*size_range)
        if int(value) in geometry and coin < prob:
            centre, radius = geometry[int(value)]
            resizes.append((centre, radius, float(factor)))
    return resizes


def resize_organs(source, resizes: Sequence[Tuple[np.ndarray, float, float]], spacing: Sequence[float]):
    """The sampling map ``source [X, Y, Z, 3]`` (input voxels) with each of ``resizes`` applied.

    For an organ of centre ``c``, radius ``R`` (mm) and factor ``f``, a point at distance ``r`` (mm) from
    ``c`` samples the point ``c + (q - c) / k(r)``: ``k = f`` within ``f R`` (the organ, zoomed by ``f``),
    falling smoothly (half a cosine) to 1 at ``2 f R``, and 1 beyond (nothing moves there).  ``r / k(r)``
    grows with ``r`` for the factors used here, so the map never folds: the neighbours are pushed aside, not
    torn.  Distances are in mm, so an organ grows alike along every axis of an anisotropic grid.
    """
    import torch

    scale = torch.tensor([float(v) for v in spacing], dtype=source.dtype)
    for centre, radius, factor in resizes:
        c = torch.tensor(np.asarray(centre, dtype=np.float32), dtype=source.dtype)
        inner, outer = factor * radius, 2.0 * factor * radius
        r = torch.linalg.vector_norm((source - c) * scale, dim=-1, keepdim=True)
        weight = 0.5 * (1.0 + torch.cos(np.pi * ((r - inner) / (outer - inner)).clamp(0.0, 1.0)))
        source = c + (source - c) / (1.0 + (factor - 1.0) * weight)
    return source


# The thinnest scan thin_scan_slab simulates, as a share of the patch along the body's long axis.
THIN_SCAN_MIN_SHARE = 0.125


def thin_scan_slab(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, prob: float,
                   axis: int, min_share: float = THIN_SCAN_MIN_SHARE) -> Tuple[np.ndarray, np.ndarray]:
    """With probability ``prob``, the patch as ``predict`` shows a scan thinner than the patch.

    A scan with fewer slices than the patch along the body's long axis is predicted with its first and
    last slices repeated to the patch's length (``engine/inference.py``, ``continue_to_patch``: half the
    missing slices before, the rest after).  A network trained only on patches of a longer scan has never
    seen that: each window of such a scan is a few real slices inside many copies of its end slices.  Here
    the patch keeps ``k`` slices around its middle (``k`` drawn uniformly from ``min_share`` of the patch's
    length to one slice less than it), placed as ``continue_to_patch`` places a ``k``-slice scan, and its
    end slices are repeated outwards, in the image and in the label alike (a repeated slice is the same
    anatomy).

    Args:
        image, label: ``[1, *patch]`` arrays, after every other augmentation (a scan's own noise is
            repeated with its slices, too).
        axis: the patch axis of the body's long axis (``data.preprocess.continued_axes``).

    Returns ``(image, label)``; the inputs when the draw says no.  Draws from ``rng`` only when
    ``prob > 0``, so a run without it samples as before.
    """
    if prob <= 0:
        return image, label
    length = image.shape[axis + 1]
    if rng.random() >= prob or length < 3:
        return image, label
    slices = int(rng.integers(max(1, int(round(min_share * length))), length))
    low = (length - slices) // 2
    # The slab's index along the axis for every position of the patch: its ends repeated outwards.
    source = np.clip(np.arange(length), low, low + slices - 1)
    return np.take(image, source, axis=axis + 1), np.take(label, source, axis=axis + 1)


_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
_AXIS_NAMES = {"R": "left-right", "A": "anterior-posterior", "S": "superior-inferior"}


def orientation_axis(orientation: str, toward: str) -> Tuple[int, int]:
    """``(axis, sign)``: the array axis of a grid in ``orientation`` (e.g. ``"RAS"``) that runs toward
    ``toward`` (``"R"``, ``"A"`` or ``"S"``), and +1 when higher indices lie that way, -1 when lower."""
    for axis, code in enumerate(orientation.upper()):
        if code in (toward, _OPPOSITE[toward]):
            return axis, (1 if code == toward else -1)
    raise ValueError(f"orientation {orientation!r} has no {_AXIS_NAMES[toward]} axis")


def anterior_axis(orientation: str) -> Tuple[int, int]:
    """``(axis, sign)`` of the front-back axis (``"RAS"`` -> ``(1, 1)``, ``"LPS"`` -> ``(1, -1)``)."""
    return orientation_axis(orientation, "A")


def lateral_swap(targets: Sequence[str]) -> Optional[np.ndarray]:
    """The class permutation a left-right mirror needs, or None if no such permutation is right.

    Classes are ``0`` (background) and ``1..K`` = ``targets``.  A name containing ``left`` (``right``)
    pairs with the same name with ``right`` (``left``), e.g. ``kidney_left`` / ``kidney_right``.  The
    result maps each class to the class it becomes in the mirror image (identity for unpaired names);
    it is None when a lateral name's partner is not among the targets, since then a mirrored
    ``adrenal_gland_left`` would lie on the right with no right label to give it.
    """
    index = {name: number for number, name in enumerate(targets, start=1)}
    mapping = np.arange(len(targets) + 1)
    for name, number in index.items():
        parts = name.split("_")
        if "left" not in parts and "right" not in parts:
            continue
        partner = "_".join({"left": "right", "right": "left"}.get(part, part) for part in parts)
        if partner not in index:
            return None
        mapping[number] = index[partner]
    return mapping


def left_right_axis(orientation: str) -> int:
    """The array axis of the preprocessing grid that runs left-right (``"RAS"`` -> 0)."""
    return orientation_axis(orientation, "R")[0]


def check_mirror_axes(mirror_axes: Sequence[int], targets: Sequence[str], orientation: str = "RAS") -> None:
    """Raise ValueError when mirroring along ``mirror_axes`` could mislabel a left/right organ."""
    axes = [int(a) for a in mirror_axes]
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"mirror axes {tuple(axes)} must be among 0, 1, 2")
    if left_right_axis(orientation) in axes and lateral_swap(targets) is None:
        raise ValueError("the left-right axis cannot be mirrored: a left or right organ among the targets "
                         "has no partner to swap with (add the pair, or leave that axis out)")


@dataclass(frozen=True)
class SupervisedDraw:
    """One drawn spatial augmentation: the transform and the axes it mirrors."""

    transform: SpatialTransform
    mirrored: Tuple[int, ...]


def draw_supervised_transform(rng: np.random.Generator, centre: Sequence[float], output_shape: Sequence[int], *,
                              mirror_axes: Sequence[int] = (), rotation_prob: float = 0.2, scale_prob: float = 0.2,
                              elastic_prob: float = 0.1, max_rotation: Sequence[float] = SUPERVISED_MAX_ROTATION,
                              scale_range: Tuple[float, float] = SUPERVISED_SCALE_RANGE,
                              max_displacement: float = 2.0, control_spacing: int = 16) -> SupervisedDraw:
    """Draw rotation, zoom, elastic deformation and mirrors for a patch centred on input voxel ``centre``.

    * rotation, with ``rotation_prob``: about axis ``a`` uniform in ``+-max_rotation[a]`` rad;
    * zoom, with ``scale_prob``: one factor for all axes, uniform in ``scale_range``;
    * elastic, with ``elastic_prob``: see :func:`draw_spatial_transform`;
    * mirror of each of ``mirror_axes`` with p = 0.5 (a sign flip of that output axis).

    The draws are made in a fixed order (every number is drawn whether used or not), so one generator
    state gives one transform.
    """
    rotate, zoom, deform = rng.random() < rotation_prob, rng.random() < scale_prob, rng.random() < elastic_prob
    angles = rng.uniform(-np.asarray(max_rotation, dtype=np.float64), np.asarray(max_rotation, dtype=np.float64))
    factor = rng.uniform(scale_range[0], scale_range[1])
    flips = rng.random(3) < 0.5
    sigma = rng.uniform(0.0, max_displacement)
    matrix = np.eye(3)
    if rotate:
        matrix = _rotation(angles)
    if zoom:
        matrix = matrix / factor
    mirrored = tuple(a for a in sorted({int(a) for a in mirror_axes}) if flips[a])
    for axis in mirrored:
        matrix = matrix @ np.diag([-1.0 if a == axis else 1.0 for a in range(3)])
    field = None
    if deform:
        points = [max(2, int(np.ceil(int(s) / control_spacing)) + 1) for s in output_shape]
        field = rng.normal(0.0, sigma, size=[3] + points)
    return SupervisedDraw(SpatialTransform(matrix, np.asarray(centre, dtype=np.float64), field), mirrored)


def resample_region(volume: np.ndarray, source, mode: str, fill: float = 0) -> np.ndarray:
    """Like :func:`resample`, but reads only the box of ``volume`` that ``source`` touches.

    The box is cut from the whole volume before resampling, so a rotated or zoomed-out patch takes its
    corners from real neighbouring tissue; ``fill`` enters only where the map leaves the volume itself.
    """
    import torch

    low = torch.floor(source.reshape(-1, 3).min(0).values).to(torch.int64) - 1
    high = torch.ceil(source.reshape(-1, 3).max(0).values).to(torch.int64) + 2
    size = (high - low).tolist()
    region = np.full((volume.shape[0],) + tuple(size), fill, dtype=volume.dtype)
    inside_source, inside_region = [], []
    for axis in range(3):
        lo, hi = max(int(low[axis]), 0), min(int(high[axis]), volume.shape[axis + 1])
        if hi <= lo:
            return resample(region, source - low.to(source.dtype), mode, fill)
        inside_source.append(slice(lo, hi))
        inside_region.append(slice(lo - int(low[axis]), hi - int(low[axis])))
    region[(slice(None),) + tuple(inside_region)] = volume[(slice(None),) + tuple(inside_source)]
    return resample(region, source - low.to(source.dtype), mode, fill)


def supervised_intensity_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """nnU-Net's intensity augmentations as MONAI transforms, on a z-scored (or [0, 1]) ``[1, X, Y, Z]`` patch.

    Gaussian noise (p 0.1), Gaussian blur (p 0.2, sigma 0.5-1 voxel), brightness x0.75-1.25 (p 0.15),
    contrast x0.75-1.25 about the mean with the range kept (p 0.15), low-resolution simulation (p 0.25,
    zoom 0.5-1), gamma 0.7-1.5 on the min-max range (p 0.3).
    """
    from monai.transforms import (
        RandAdjustContrast,
        RandGaussianNoise,
        RandGaussianSmooth,
        RandScaleIntensity,
        RandScaleIntensityFixedMean,
        RandSimulateLowResolution,
    )

    out = image.astype(np.float32, copy=False)
    for transform in (RandGaussianNoise(prob=0.1, std=0.1),
                      RandGaussianSmooth(sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
                      RandScaleIntensity(factors=0.25, prob=0.15),
                      RandScaleIntensityFixedMean(factors=0.25, preserve_range=True, prob=0.15),
                      RandSimulateLowResolution(prob=0.25, zoom_range=(0.5, 1.0)),
                      RandAdjustContrast(gamma=(0.7, 1.5), prob=0.3)):
        transform.set_random_state(seed=_seed(rng))
        out = transform(out)
    return np.asarray(out, dtype=np.float32)


# Random intensity networks (GIN: Ouyang et al., "Causality-inspired single-source domain generalization
# for medical image segmentation", IEEE TMI 2022).  One labelled scan shows each organ with one texture
# and one contrast against its neighbours; a scan from another scanner or contrast phase changes both.
# A shallow convolutional network with freshly drawn random weights maps the patch to new, non-linear
# intensities and textures while every edge stays where it was, so the shapes and their arrangement
# are what stays constant for the network to learn.  The paper's settings: four layers, two channels
# between them, kernels of 1 or 3 voxels, weights and biases from N(0, 1), leaky ReLU between the
# layers, the result blended with the input by a uniform alpha and scaled back to the input's norm.
GIN_LAYERS = 4
GIN_CHANNELS = 2
GIN_KERNELS = (1, 3)


def random_intensity_network(image: np.ndarray, rng: np.random.Generator, layers: int = GIN_LAYERS,
                             channels: int = GIN_CHANNELS, kernels: Sequence[int] = GIN_KERNELS) -> np.ndarray:
    """``image`` ``[1, X, Y, Z]`` through a shallow network of random weights drawn from ``rng`` (GIN, see above).

    The output ``alpha * net(image) + (1 - alpha) * image``, alpha uniform in [0, 1], is scaled to the
    Frobenius norm of ``image``.  The patch's edges are replicated for the convolutions, so that no
    border of zeros becomes an edge inside the patch.
    """
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]   # [1, 1, X, Y, Z]
    in_channels = image.shape[0]
    for layer in range(layers):
        out_channels = image.shape[0] if layer == layers - 1 else channels
        size = int(kernels[int(rng.integers(len(kernels)))])
        weight = torch.from_numpy(rng.standard_normal((out_channels, in_channels, size, size, size)).astype(np.float32))
        bias = torch.from_numpy(rng.standard_normal(out_channels).astype(np.float32))
        if size > 1:
            x = F.pad(x, (size // 2,) * 6, mode="replicate")
        x = F.conv3d(x, weight, bias)
        if layer < layers - 1:
            x = F.leaky_relu(x)
        in_channels = out_channels
    alpha = np.float32(rng.uniform(0.0, 1.0))
    out = alpha * x[0].numpy() + (np.float32(1.0) - alpha) * image.astype(np.float32)
    norm, target = float(np.linalg.norm(out)), float(np.linalg.norm(image))
    if norm > 0:
        out *= np.float32(target / norm)
    return out.astype(np.float32)


def supervised_augment(image: np.ndarray, label: np.ndarray, centre: Sequence[float], patch_size: Sequence[int],
                       rng: np.random.Generator, mirror_axes: Sequence[int] = (),
                       swap: Optional[np.ndarray] = None, lateral_axis: int = 0,
                       fill: float = 0.0, spatial_prob: float = 0.2, resizes: Sequence = (),
                       spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Tuple[np.ndarray, np.ndarray]:
    """An augmented training patch of ``patch_size`` centred on voxel ``centre`` of a whole case.

    Args:
        image: the case's ``[1, X, Y, Z]`` float32 volume.
        label: its ``[1, X, Y, Z]`` integer classes; moved with the image (nearest) and, when the
            ``lateral_axis`` is mirrored, relabelled with ``swap`` (see :func:`lateral_swap`).
        centre: the input voxel at the patch centre (may be fractional).
        mirror_axes: axes that may be mirrored (each with p = 0.5); must pass :func:`check_mirror_axes`.
        swap: the class permutation of a left-right mirror (None: the identity).
        lateral_axis: the left-right axis of the grid (:func:`left_right_axis`).
        fill: the image value beyond the case's edge (``PreparedCase.fill``).
        spatial_prob: the probability of a rotation and of a zoom, each; of an elastic deformation, half of it.
        resizes: organs resized about their centres (:func:`draw_organ_sizes`), on a grid of ``spacing`` mm.

    Returns:
        ``(image [1, *patch] float32, label [1, *patch] int64)``.
    """
    draw = draw_supervised_transform(rng, centre, patch_size, mirror_axes=mirror_axes, rotation_prob=spatial_prob,
                                     scale_prob=spatial_prob, elastic_prob=spatial_prob / 2.0)
    transform = draw.transform
    start = np.asarray(centre, dtype=np.float64) - (np.asarray(patch_size) - 1) / 2.0
    unchanged = transform.elastic is None and np.array_equal(transform.matrix, np.eye(3)) and not resizes
    inside = np.all(start >= 0) and np.all(start + np.asarray(patch_size) <= np.asarray(image.shape[1:]))
    if unchanged and inside and np.allclose(start, np.rint(start)):
        # No spatial change: a plain crop is exact and cheaper than resampling.
        box = (slice(None),) + tuple(slice(int(round(b)), int(round(b)) + int(p)) for b, p in zip(start, patch_size))
        patch_image, patch_label = image[box].astype(np.float32), label[box]
    else:
        source = resize_organs(transform.source_coordinates(patch_size), resizes, spacing)
        patch_image = resample_region(image, source, "bilinear", fill)
        patch_label = resample_region(label, source, "nearest")
    patch_label = patch_label.astype(np.int64)
    if swap is not None and lateral_axis in draw.mirrored:
        patch_label = np.asarray(swap, dtype=np.int64)[patch_label]
    return supervised_intensity_augment(np.ascontiguousarray(patch_image), rng), np.ascontiguousarray(patch_label)
