"""The patient's body in a CT scan, to keep predicted organs out of the air around it.

A network fine-tuned on a few scans has seen little of what lies outside the
patient: air, the table, blankets, the arms.  Its mistakes there are the most
visible ones (an "aorta" floating above the patient) and cost the most Dice,
because they are far from any real organ.  The organs this tool segments lie
inside the trunk, so ``predict`` masks out everything outside it, on the
network's grid, before the labels go back to the input's grid:

1. voxels above ``-500 HU`` are tissue (fat is about -100 HU, lung about -800);
2. an opening of one voxel within each axial slice detaches thin contacts
   such as the table or a blanket;
3. the largest connected tissue region is the trunk (arms lying beside the
   body in an abdominal scan are separate regions, and are masked);
4. holes are filled slice by slice along the axis nearest the patient's long
   axis, so air inside the body (lungs, bowel gas, trachea) stays inside.

It needs Hounsfield units, so it applies to models with the CT intensity
window only.  ``predict --no-body-mask`` turns it off (for limbs, or scans
whose trunk is not the largest region).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

BODY_THRESHOLD_HU = -500.0


def long_axis(image: sitk.Image) -> int:
    """The numpy axis of ``GetArrayFromImage(image)`` (z, y, x) that runs closest to inferior-superior."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(image.GetDimension(), image.GetDimension())
    index_axis = int(np.argmax(np.abs(direction[2, :])))   # row 2: the S component of each index axis (LPS)
    return image.GetDimension() - 1 - index_axis


def body_mask(image: sitk.Image, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Boolean ``(z, y, x)`` mask of the trunk of a CT ``image`` in HU (see the module docstring).

    An image with no voxel above the threshold gives an all-true mask: there is
    nothing to tell the body from, so nothing is masked.
    """
    from scipy import ndimage

    tissue = sitk.GetArrayViewFromImage(image) > threshold_hu
    axis = long_axis(image)
    in_plane = np.ones((3, 3, 3), dtype=bool)
    in_plane[tuple(slice(None) if a != axis else slice(0, 1) for a in range(3))] = False
    in_plane[tuple(slice(None) if a != axis else slice(2, 3) for a in range(3))] = False
    opened = ndimage.binary_opening(tissue, structure=in_plane)
    components, count = ndimage.label(opened)
    if count == 0:
        return np.ones(tissue.shape, dtype=bool)
    sizes = np.bincount(components.reshape(-1))
    sizes[0] = 0
    body = components == int(np.argmax(sizes))
    for index in range(body.shape[axis]):
        plane = [slice(None)] * 3
        plane[axis] = index
        body[tuple(plane)] = ndimage.binary_fill_holes(body[tuple(plane)])
    return body


def mask_probabilities_outside_body(probabilities: np.ndarray, image_on_grid: sitk.Image) -> np.ndarray:
    """Make every voxel outside the body certain background, in place; returns ``probabilities``.

    Args:
        probabilities: class probabilities ``[C, X, Y, Z]`` (MONAI order, class 0
            the background) on the grid of ``image_on_grid``.
        image_on_grid: the CT in HU on the network's grid.

    The body is found on the network's grid rather than the full-size image
    (about 1/14 of the voxels for a 0.8 mm CT and a 3 mm network): the organs
    lie well inside the skin, and the mask then follows the labels back to the
    input grid with them.
    """
    outside = ~body_mask(image_on_grid).transpose(2, 1, 0)
    probabilities[:, outside] = 0.0
    probabilities[0, outside] = 1.0
    return probabilities
