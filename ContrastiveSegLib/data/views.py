"""Augmented views of a patch for contrastive pre-training (MixCL paper, "Augmentation").

The paper applies a random elastic deformation and a random affine transform
to the 3D patch (each with p = 0.5), then turns it into views with random
intensity shift, gamma, Gaussian smoothing and Gaussian noise (each p = 0.2).
Views made with :func:`intensity_view` from one patch stay voxel-aligned,
which the pixel-level losses rely on (a voxel's positive is the same voxel in
the other view).  The magnitudes are not printed in the paper; the ones below
are ours (MONAI's usual ranges for CT scaled to [0, 1]).

Every function takes a ``numpy.random.Generator`` and seeds each MONAI
transform from it, so a sample is reproducible from its ``(seed, index)``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31 - 1))


def spatial_augment(image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator,
                    prob: float = 0.5) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Random elastic deformation then random affine transform, each with probability ``prob``.

    Args:
        image: ``[1, X, Y, Z]`` float32.
        label: ``[1, X, Y, Z]`` integer labels moved with the image (nearest neighbour), or None.

    Returns:
        ``(image, label)`` of the same shapes and dtypes.
    """
    from monai.transforms import Rand3DElasticd, RandAffined

    keys = ["image"] + (["label"] if label is not None else [])
    modes = ["bilinear"] + (["nearest"] if label is not None else [])
    data = {"image": image.astype(np.float32, copy=False)}
    if label is not None:
        data["label"] = label.astype(np.float32)
    size = image.shape[1:]
    # Elastic: sigma and magnitude in voxels, as MONAI's examples for 96^3 CT patches.
    elastic = Rand3DElasticd(keys=keys, sigma_range=(5, 8), magnitude_range=(50, 150), prob=prob, mode=modes,
                             padding_mode="zeros", spatial_size=size)
    affine = RandAffined(keys=keys, prob=prob, rotate_range=(0.26, 0.26, 0.26), scale_range=(0.1, 0.1, 0.1),
                         mode=modes, padding_mode="zeros", spatial_size=size)
    for transform in (elastic, affine):
        transform.set_random_state(seed=_seed(rng))
        data = transform(data)
    out_image = np.asarray(data["image"], dtype=np.float32)
    out_label = None
    if label is not None:
        out_label = np.rint(np.asarray(data["label"])).astype(label.dtype)
    return out_image, out_label


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
