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
from typing import Optional, Sequence, Tuple

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


def resample(array: np.ndarray, source, mode: str = "bilinear") -> np.ndarray:
    """Sample ``array [C, X, Y, Z]`` at ``source [x, y, z, 3]`` input-voxel coordinates (zeros outside).

    ``mode`` is ``"bilinear"`` (trilinear, for images) or ``"nearest"`` (for labels; the
    dtype is kept).  Returns ``[C, x, y, z]``.
    """
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


def spatial_augment(image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator,
                    prob: float = 0.5, max_rotation: float = 0.26, max_scale: float = 0.1,
                    control_spacing: int = 16, max_displacement: float = 3.0) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Random elastic deformation and random affine transform, each with probability ``prob``.

    Both are composed into one sampling map and applied in a single resampling
    (bilinear for the image, nearest for the label, zeros outside), in voxel
    units so a rotation stays a rotation on anisotropic patches; the output has
    the input's shape.  Rotation about each axis is uniform in ``+-max_rotation``
    rad (15 degrees), the scale per axis in ``1 +- max_scale``.

    Args:
        image: ``[1, X, Y, Z]`` float32.
        label: ``[1, X, Y, Z]`` integer labels moved with the image, or None.

    Returns:
        ``(image, label)`` of the same shapes and dtypes.
    """
    transform = draw_spatial_transform(rng, image.shape[1:], affine_prob=prob, elastic_prob=prob,
                                       max_rotation=max_rotation, scale_range=(1.0 - max_scale, 1.0 + max_scale),
                                       control_spacing=control_spacing, max_displacement=max_displacement)
    if transform.elastic is None and np.array_equal(transform.matrix, np.eye(3)):
        return image, label
    source = transform.source_coordinates(image.shape[1:])
    moved_label = resample(label, source, "nearest") if label is not None else None
    return resample(image, source, "bilinear"), moved_label


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
