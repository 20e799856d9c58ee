"""Augmented views of a patch for contrastive pre-training (MixCL paper, "Augmentation").

The paper applies a random elastic deformation and a random affine transform
to the 3D patch (each with p = 0.5), then turns it into views with random
intensity shift, gamma, Gaussian smoothing and Gaussian noise (each p = 0.2).
Only the probabilities are the paper's; the ranges are ours.
Views made with :func:`intensity_view` from one patch stay voxel-aligned,
which the pixel-level losses rely on (a voxel's positive is the same voxel in
the other view).  Every function draws from a ``numpy.random.Generator`` (and seeds each MONAI
transform from it), so a sample is reproducible from its ``(seed, index)``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31 - 1))


def spatial_augment(image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator,
                    prob: float = 0.5, max_rotation: float = 0.26, max_scale: float = 0.1,
                    control_spacing: int = 16, max_displacement: float = 3.0) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Random elastic deformation and random affine transform, each with probability ``prob``.

    Both are composed into one sampling grid and applied in a single resampling
    (bilinear for the image, nearest for the label, zeros outside), in voxel
    units so a rotation stays a rotation on anisotropic patches.

    * affine (ours: the paper gives no ranges): rotation about each axis uniform
      in ``+-max_rotation`` rad (15 degrees) and a scale per axis in ``1 +- max_scale``;
    * elastic (ours): a displacement per axis drawn on control points every
      ``control_spacing`` voxels, normal with a standard deviation uniform in
      ``[0, max_displacement]`` voxels, interpolated trilinearly to every voxel.
      (MONAI's ``Rand3DElastic`` smooths a full-resolution random field instead,
      which costs about a second per 64x64x32 patch on a CPU core; this costs a
      few milliseconds and gives the same kind of smooth deformation.)

    Args:
        image: ``[1, X, Y, Z]`` float32.
        label: ``[1, X, Y, Z]`` integer labels moved with the image, or None.

    Returns:
        ``(image, label)`` of the same shapes and dtypes.
    """
    import torch
    import torch.nn.functional as F

    elastic, affine = rng.random() < prob, rng.random() < prob
    if not (elastic or affine):
        return image, label
    size = [int(s) for s in image.shape[1:]]
    centre = torch.tensor([(s - 1) / 2.0 for s in size], dtype=torch.float32)
    axes = [torch.arange(s, dtype=torch.float32) for s in size]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1) - centre      # [X, Y, Z, 3]
    source = offsets
    if affine:
        angles = rng.uniform(-max_rotation, max_rotation, size=3)
        scales = rng.uniform(1.0 - max_scale, 1.0 + max_scale, size=3)
        matrix = torch.from_numpy((_rotation(angles) @ np.diag(1.0 / scales)).astype(np.float32))   # output voxel -> input voxel
        source = offsets @ matrix.T
    if elastic:
        points = [max(2, int(np.ceil(s / control_spacing)) + 1) for s in size]
        sigma = rng.uniform(0.0, max_displacement)
        coarse = torch.from_numpy(rng.normal(0.0, sigma, size=[3] + points).astype(np.float32))
        field = F.interpolate(coarse[None], size=size, mode="trilinear", align_corners=True)[0]
        source = source + field.permute(1, 2, 3, 0)
    source = source + centre
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in size], dtype=torch.float32)
    grid = (source * scale - 1.0).flip(-1)[None]   # grid_sample wants (z, y, x) order = (W, H, D)
    moved = F.grid_sample(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None], grid,
                          mode="bilinear", padding_mode="zeros", align_corners=True)[0].numpy()
    moved_label = None
    if label is not None:
        as_float = torch.from_numpy(np.ascontiguousarray(label).astype(np.float32))[None]
        moved_label = F.grid_sample(as_float, grid, mode="nearest", padding_mode="zeros",
                                    align_corners=True)[0].numpy().round().astype(label.dtype)
    return moved.astype(np.float32), moved_label


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
