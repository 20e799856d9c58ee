"""Augmented views for contrastive pre-training: alignment, label transport, reproducibility."""

from __future__ import annotations

import numpy as np
from conftest import dice

from ContrastiveSegLib.data.views import (
    SpatialTransform,
    draw_spatial_transform,
    draw_view_pair,
    draw_view_transform,
    intensity_view,
    inverse_map_points,
    map_points,
    render_view,
    resample,
    view_correspondence,
    view_crop_shape,
)


def _box():
    image = np.zeros((1, 32, 32, 16), dtype=np.float32)
    image[0, 8:20, 10:24, 4:12] = 1.0
    return image, (image > 0).astype(np.uint8)


def _moved(image, label, transform):
    source = transform.source_coordinates(image.shape[1:])
    return resample(image, source, "bilinear"), resample(label, source, "nearest")


def test_the_identity_transform_leaves_the_patch_unchanged():
    image, label = _box()
    moved, moved_label = _moved(image, label, SpatialTransform.identity(image.shape[1:]))
    np.testing.assert_allclose(moved, image, atol=1e-5)
    assert (moved_label == label).all() and moved_label.dtype == label.dtype


def test_zero_ranges_draw_the_identity():
    image, _ = _box()
    transform = draw_spatial_transform(np.random.default_rng(0), image.shape[1:], affine_prob=1.0,
                                       elastic_prob=1.0, max_rotation=0.0, scale_range=(1.0, 1.0),
                                       max_displacement=0.0)
    np.testing.assert_allclose(transform.source_coordinates(image.shape[1:]),
                               SpatialTransform.identity(image.shape[1:]).source_coordinates(image.shape[1:]),
                               atol=1e-5)


def test_label_moves_with_the_image():
    image, label = _box()
    for seed in range(5):
        transform = draw_spatial_transform(np.random.default_rng(seed), image.shape[1:], affine_prob=1.0,
                                           elastic_prob=1.0, scale_range=(0.9, 1.1))
        moved, moved_label = _moved(image, label, transform)
        assert moved.shape == image.shape and moved_label.shape == label.shape
        assert set(np.unique(moved_label)) <= {0, 1}
        assert not np.array_equal(moved_label, label)                # it did move
        assert dice(moved_label[0] > 0, moved[0] > 0.5) > 0.95       # ... and the image moved the same way
        assert 0.7 < moved_label.sum() / label.sum() < 1.4           # scale within +-10 % per axis


def test_a_quarter_turn_in_the_plane_is_a_rotation_not_a_shear():
    """Rotation is done in voxel units: on a 32x32 plane a 90-degree turn maps the box onto its rotated self."""
    image, label = _box()
    turn = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    centre = SpatialTransform.identity(image.shape[1:]).input_centre
    _, moved_label = _moved(image, label, SpatialTransform(turn, centre))
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


# --- paired views with their own geometry ----------------------------------------------------------------

PATCH = (16, 16, 12)


def _labelled_cube(shape, block=6):
    """A crop whose label numbers every ``block^3`` cube: anatomy that tells voxels apart."""
    index = np.indices(shape) // block
    counts = [int(np.ceil(s / block)) for s in shape]
    label = (index[0] * counts[1] + index[1]) * counts[2] + index[2] + 1
    return label[None].astype(np.int64)


def _distance_to_block_faces(points: np.ndarray, block=6) -> np.ndarray:
    """Distance of crop points to the nearest face between two cubes (faces at k * block - 0.5)."""
    offset = (points + 0.5) % block
    return np.minimum(offset, block - offset).min(axis=1)


def test_map_points_agrees_with_the_dense_map_and_inverts():
    crop = view_crop_shape(PATCH)
    transform = draw_view_transform(np.random.default_rng(5), crop, PATCH, spatial_prob=1.0)
    assert transform.elastic is not None and not np.allclose(transform.matrix, np.eye(3))
    dense = transform.source_coordinates(PATCH).reshape(-1, 3)
    voxels = np.stack(np.meshgrid(*[np.arange(p) for p in PATCH], indexing="ij"), axis=-1).reshape(-1, 3)
    np.testing.assert_allclose(map_points(transform, voxels, PATCH).numpy(), dense.numpy(), atol=1e-4)
    back = inverse_map_points(transform, dense, PATCH).numpy()
    np.testing.assert_allclose(back, voxels, atol=1e-3)


def test_an_integer_shift_pairs_every_overlapping_cell_exactly():
    """View 2 sits 4 voxels further along x: cell (x, y, z) of view 1 is cell (x - 4 / f, y, z) of view 2."""
    first = SpatialTransform(np.eye(3), np.array([20.0, 20.0, 15.0]))
    second = SpatialTransform(np.eye(3), np.array([24.0, 20.0, 15.0]))
    for factor in (1, 2, 4):
        cells1, cells2 = view_correspondence(first, second, PATCH, factor)
        grid = [p // factor for p in PATCH]
        x1, rest1 = np.unravel_index(cells1, grid)[0], np.stack(np.unravel_index(cells1, grid)[1:])
        x2, rest2 = np.unravel_index(cells2, grid)[0], np.stack(np.unravel_index(cells2, grid)[1:])
        np.testing.assert_array_equal(x2, x1 - 4 // factor)
        np.testing.assert_array_equal(rest1, rest2)
        assert cells1.size == (grid[0] - 4 // factor) * grid[1] * grid[2]   # the whole overlap, nothing outside


def test_corresponding_voxels_show_the_same_anatomy_in_both_views():
    """On a labelled cube, every pair of corresponding voxels (away from the cubes' faces) has one label."""
    crop = view_crop_shape(PATCH)
    label = _labelled_cube(crop)
    image = label.astype(np.float32)
    checked = 0
    for seed in range(6):
        first, second = draw_view_pair(np.random.default_rng(seed), crop, PATCH, spatial_prob=1.0)
        _, label1 = render_view(image, label, first, PATCH)
        _, label2 = render_view(image, label, second, PATCH)
        cells1, cells2 = view_correspondence(first, second, PATCH, factor=1)
        assert cells1.size > 0.1 * np.prod(PATCH)
        where = np.stack(np.unravel_index(cells1, PATCH), axis=1).astype(np.float32)
        sources = map_points(first, where, PATCH).numpy()
        clear = _distance_to_block_faces(sources) > 1.0
        values1 = label1.reshape(-1)[cells1][clear]
        values2 = label2.reshape(-1)[cells2][clear]
        np.testing.assert_array_equal(values1, values2)
        checked += int(clear.sum())
        # ... and the pairs are not trivial: the two views put that anatomy at different voxels.
        assert (cells1 != cells2).mean() > 0.9
    assert checked > 1000


def test_coarse_levels_pair_cells_whose_centres_coincide():
    crop = view_crop_shape(PATCH)
    for factor in (2, 4):
        first, second = draw_view_pair(np.random.default_rng(2), crop, PATCH, spatial_prob=1.0)
        cells1, cells2 = view_correspondence(first, second, PATCH, factor=factor, tolerance=0.5)
        grid = [p // factor for p in PATCH]
        centre = lambda cells: np.stack(np.unravel_index(cells, grid), axis=1) * factor + (factor - 1) / 2  # noqa
        gap = (map_points(first, centre(cells1), PATCH) - map_points(second, centre(cells2), PATCH)).norm(dim=1)
        assert cells1.size > 0 and float(gap.max()) <= 0.5 * factor + 1e-4


def test_shared_geometry_pairs_every_cell_with_itself():
    crop = view_crop_shape(PATCH)
    first, second = draw_view_pair(np.random.default_rng(0), crop, PATCH, geometry="shared", spatial_prob=1.0)
    assert first is second
    cells1, cells2 = view_correspondence(first, second, PATCH, factor=2)
    np.testing.assert_array_equal(cells1, np.arange(8 * 8 * 6))
    np.testing.assert_array_equal(cells1, cells2)
