"""The body mask that keeps predicted organs out of the air, the table and separate limbs."""

from __future__ import annotations

import json
import os

import numpy as np
import SimpleITK as sitk
from conftest import SAMPLE_DIR

from ContrastiveSegLib.data.io import read_image, read_label_image, resample_label_image
from ContrastiveSegLib.engine.body import body_mask, long_axis, mask_outside_body


def _phantom() -> sitk.Image:
    """(z, y, x) = (6, 40, 40) in HU: a trunk with a lung, an arm beside it, a table under it."""
    hu = np.full((6, 40, 40), -1000.0, dtype=np.float32)
    hu[:, 5:30, 5:30] = 0.0          # trunk
    hu[:, 12:19, 10:17] = -800.0     # lung: air inside the body, closed in every axial slice
    hu[:, 10:21, 34:39] = 40.0       # arm: tissue, but a region of its own
    hu[:, 33, 2:38] = 100.0          # table, one voxel thick ...
    hu[:, 30:33, 20] = 100.0         # ... touching the trunk through a one-voxel bridge
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.0, 1.0, 2.5))
    return image


def _expected() -> np.ndarray:
    expected = np.zeros((6, 40, 40), dtype=bool)
    expected[:, 5:30, 5:30] = True
    return expected


def test_trunk_and_its_air_are_body_while_air_table_and_arm_are_not():
    mask = body_mask(_phantom())
    np.testing.assert_array_equal(mask, _expected())


def test_the_mask_follows_the_patient_axis_not_the_array_axis():
    image = _phantom()
    assert long_axis(image) == 0   # identity direction: array axis 0 is z, the patient's long axis
    # The same voxels with the index axes permuted: z becomes the last index axis, array axis 0 becomes x.
    permuted = sitk.PermuteAxes(image, [2, 0, 1])
    assert long_axis(permuted) == 2
    expected = sitk.GetImageFromArray(_expected().astype(np.uint8))
    expected.CopyInformation(image)
    np.testing.assert_array_equal(body_mask(permuted),
                                  sitk.GetArrayFromImage(sitk.PermuteAxes(expected, [2, 0, 1])).astype(bool))


def test_labels_outside_the_body_become_background_and_nothing_else_changes():
    image = _phantom()
    labels = np.zeros((6, 40, 40), dtype=np.uint8)
    labels[2, 14, 12] = 1     # in the lung: kept
    labels[2, 20, 20] = 2     # in the trunk: kept
    labels[2, 15, 36] = 1     # in the arm: removed
    labels[2, 2, 2] = 3       # in the air: removed
    masked = mask_outside_body(labels, image)
    assert masked[2, 14, 12] == 1 and masked[2, 20, 20] == 2
    assert masked[2, 15, 36] == 0 and masked[2, 2, 2] == 0
    assert labels[2, 15, 36] == 1   # the input is not modified


def test_an_image_with_no_tissue_masks_nothing():
    air = sitk.GetImageFromArray(np.full((3, 8, 8), -1000.0, dtype=np.float32))
    assert body_mask(air).all()


def test_every_organ_of_both_sample_patients_lies_in_the_body():
    """TotalSegmentator's labels of the shipped CTs: only the arm bones lie outside the trunk."""
    cases = [("abdomen_ct.nii.gz", "abdomen_ct_labels.nii.gz", "dataset.json"),
             (os.path.join("heldout", "ct_dicom"), os.path.join("heldout", "ct_dicom_labels.nii.gz"),
              os.path.join("heldout", "dataset.json"))]
    for image_name, label_name, dataset_name in cases:
        image = read_image(os.path.join(SAMPLE_DIR, image_name))
        labels = resample_label_image(read_label_image(os.path.join(SAMPLE_DIR, label_name)), image).layers[0]
        with open(os.path.join(SAMPLE_DIR, dataset_name), encoding="utf-8") as handle:
            names = {int(k): v for k, v in json.load(handle)["labels"].items()}
        outside = labels[~body_mask(image)]
        outside_names = {names[int(v)] for v in np.unique(outside) if v}
        assert outside_names <= {"humerus_left", "humerus_right"}, (image_name, outside_names)
        assert (labels > 0).sum() > 100_000
