"""The patient's body in a CT scan, to keep predicted organs out of the air around it.

A network fine-tuned on a few scans has seen little of what lies outside the
patient: air, the table, blankets, the arms.  Its mistakes there are the most
visible ones (an "aorta" floating above the patient) and cost the most Dice,
because they are far from any real organ.  The organs this tool segments lie
inside the trunk, so ``predict`` masks out everything outside it:

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

from .postprocess import label_regions, value_counts

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

    Memory: one boolean volume, reused for every step, and the uint16 region
    numbers; the opening and the hole filling work one slice at a time (on a
    512 x 512 x 300 CT the full-volume temporaries they used to make were
    about 450 MiB of ``predict``'s peak).
    """
    from scipy import ndimage

    mask = sitk.GetArrayViewFromImage(image) > threshold_hu
    axis = long_axis(image)
    for index in range(mask.shape[axis]):
        plane = _plane(axis, index)
        mask[plane] = _dilate_3x3(_erode_3x3(mask[plane]))
    components, count = label_regions(mask)
    if count == 0:
        mask[...] = True
        return mask
    sizes = value_counts(components, count)
    sizes[0] = 0
    np.equal(components, int(np.argmax(sizes)), out=mask)
    del components
    for index in range(mask.shape[axis]):
        plane = _plane(axis, index)
        mask[plane] = ndimage.binary_fill_holes(mask[plane])
    return mask


def _plane(axis: int, index: int) -> tuple:
    """The index expression of slice ``index`` along ``axis`` of a 3D array."""
    plane = [slice(None)] * 3
    plane[axis] = index
    return tuple(plane)


def _erode_3x3(plane: np.ndarray) -> np.ndarray:
    """Binary erosion of a 2D mask by a 3 x 3 square, pixels beyond the border counting as empty.

    The same result as ``scipy.ndimage.binary_erosion`` with that structure, done as two separable
    passes of shifted ANDs (about a third of its time).
    """
    for axis in (0, 1):
        out = np.zeros_like(plane)
        inner = [slice(None)] * 2
        inner[axis] = slice(1, -1)
        before, after = list(inner), list(inner)
        before[axis], after[axis] = slice(0, -2), slice(2, None)
        np.logical_and(plane[tuple(before)], plane[tuple(inner)], out=out[tuple(inner)])
        out[tuple(inner)] &= plane[tuple(after)]
        plane = out
    return plane


def _dilate_3x3(plane: np.ndarray) -> np.ndarray:
    """Binary dilation of a 2D mask by a 3 x 3 square (``scipy.ndimage.binary_dilation``'s result)."""
    for axis in (0, 1):
        out = plane.copy()
        lower, upper = [slice(None)] * 2, [slice(None)] * 2
        lower[axis], upper[axis] = slice(0, -1), slice(1, None)
        out[tuple(lower)] |= plane[tuple(upper)]
        out[tuple(upper)] |= plane[tuple(lower)]
        plane = out
    return plane


def mask_outside_body(labels_zyx: np.ndarray, image: sitk.Image) -> np.ndarray:
    """``labels_zyx`` (on ``image``'s grid) with every voxel outside the body set to background."""
    outside = body_mask(image)
    np.logical_not(outside, out=outside)
    masked = np.array(labels_zyx, copy=True)
    masked[outside] = 0
    return masked
