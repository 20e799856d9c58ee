"""Augmented views for contrastive pre-training: alignment, label transport, reproducibility."""

from __future__ import annotations

import numpy as np
from conftest import dice

from ContrastiveSegLib.data.views import intensity_view, spatial_augment


def _box():
    image = np.zeros((1, 32, 32, 16), dtype=np.float32)
    image[0, 8:20, 10:24, 4:12] = 1.0
    return image, (image > 0).astype(np.uint8)


def test_zero_ranges_leave_the_patch_unchanged():
    image, label = _box()
    moved, moved_label = spatial_augment(image, label, np.random.default_rng(0), prob=1.0, max_rotation=0.0,
                                         max_scale=0.0, max_displacement=0.0)
    np.testing.assert_allclose(moved, image, atol=1e-5)
    assert (moved_label == label).all() and moved_label.dtype == label.dtype


def test_probability_zero_returns_the_input():
    image, label = _box()
    moved, moved_label = spatial_augment(image, label, np.random.default_rng(0), prob=0.0)
    assert moved is image and moved_label is label


def test_label_moves_with_the_image():
    image, label = _box()
    for seed in range(5):
        moved, moved_label = spatial_augment(image, label, np.random.default_rng(seed), prob=1.0)
        assert moved.shape == image.shape and moved_label.shape == label.shape
        assert set(np.unique(moved_label)) <= {0, 1}
        assert not np.array_equal(moved_label, label)                # it did move
        assert dice(moved_label[0] > 0, moved[0] > 0.5) > 0.95       # ... and the image moved the same way
        assert 0.7 < moved_label.sum() / label.sum() < 1.4           # scale within +-10 % per axis


def test_a_quarter_turn_in_the_plane_is_a_rotation_not_a_shear():
    """Rotation is done in voxel units: on a 32x32 plane a 90-degree turn maps the box onto its rotated self."""
    image, label = _box()

    class Fixed:  # a generator whose draws give: elastic off, affine on, angles (0, 0, pi/2), scales 1
        def random(self):
            return Fixed.flags.pop(0)

        def uniform(self, low, high, size=None):
            return np.array([0.0, 0.0, np.pi / 2]) if low < 0 and high < 1 else np.ones(3)

    Fixed.flags = [1.0, 0.0]
    moved, moved_label = spatial_augment(image, label, Fixed(), prob=0.5)
    turned = [np.rot90(label[0], k=k, axes=(0, 1)) for k in (1, -1)]   # the sense does not matter here
    assert max(dice(moved_label[0] > 0, t > 0) for t in turned) > 0.9


def test_views_are_reproducible_and_aligned():
    image, _ = _box()
    a = intensity_view(image, np.random.default_rng(3), prob=1.0)
    b = intensity_view(image, np.random.default_rng(3), prob=1.0)
    c = intensity_view(image, np.random.default_rng(4), prob=1.0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Intensity only: the bright box is still where it was.
    assert a[0, 8:20, 10:24, 4:12].mean() > a[0, :4].mean() + 0.3
