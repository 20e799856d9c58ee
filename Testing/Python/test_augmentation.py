"""Supervised augmentation (data/views.py, supervised section): aligned, reproducible, left/right-safe."""

from __future__ import annotations

import numpy as np
import pytest

from ContrastiveSegLib.data.preprocess import PreparedCase
from ContrastiveSegLib.data.sampling import PatchSampler, SupervisedPatches
from ContrastiveSegLib.data.views import (
    check_mirror_axes,
    draw_supervised_transform,
    lateral_swap,
    random_intensity_network,
    resample_region,
    supervised_augment,
    tissue_enhancement,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cube_case(shape=(48, 48, 40), low=(16, 14, 12), high=(32, 34, 28)):
    image = np.zeros((1,) + shape, dtype=np.float32)
    label = np.zeros((1,) + shape, dtype=np.uint8)
    box = (slice(None),) + tuple(slice(a, b) for a, b in zip(low, high))
    image[box], label[box] = 1.0, 1
    return image, label


def test_a_labelled_cube_stays_on_its_label_after_rotation_and_scaling():
    image, label = _cube_case()
    for index in range(6):
        rng = np.random.default_rng([5, index])
        draw = draw_supervised_transform(rng, (23.5, 23.5, 19.5), (32, 32, 32), rotation_prob=1.0, scale_prob=1.0)
        assert not np.allclose(draw.transform.matrix, np.eye(3))
        source = draw.transform.source_coordinates((32, 32, 32))
        moved_image = resample_region(image, source, "bilinear")
        moved_label = resample_region(label, source, "nearest")
        on_label = moved_label[0] == 1
        assert on_label.sum() > 1000
        # Nearest-neighbour labels and linear intensities agree up to the half-voxel rim of the cube.
        assert (moved_image[0][on_label] >= 0.5 - 1e-4).mean() > 0.99
        assert (moved_image[0][~on_label] <= 0.5 + 1e-4).mean() > 0.99


def test_rotated_and_zoomed_patches_take_no_padding_from_inside_the_volume():
    """The patch is read from the whole case, so its corners are tissue, not zeros (a pre-cut patch has zeros)."""
    volume = np.ones((1, 90, 90, 70), dtype=np.float32)
    for index in range(5):
        rng = np.random.default_rng([9, index])
        draw = draw_supervised_transform(rng, (44.5, 44.5, 34.5), (48, 48, 32), rotation_prob=1.0,
                                         scale_prob=1.0, scale_range=(0.85, 0.9))
        patch = resample_region(volume, draw.transform.source_coordinates((48, 48, 32)), "bilinear")
        np.testing.assert_allclose(patch, 1.0, atol=1e-5)


def _dataset(cases, seed=3, length=12, **kwargs):
    sampler = PatchSampler(cases, (32, 32, 16), foreground_ratio=0.8)
    return SupervisedPatches(sampler, seed, length, augmentation="spatial", **kwargs)


def test_augmented_samples_are_deterministic_per_seed_and_index():
    image, label = _cube_case()
    cases = [PreparedCase("cube", image, label, np.eye(4))]
    first, second = _dataset(cases), _dataset(cases)
    for index in (7, 0, 3):   # any order: a sample depends only on (seed, index)
        a, b = first[index], second[index]
        np.testing.assert_array_equal(a["image"].numpy(), b["image"].numpy())
        np.testing.assert_array_equal(a["label"].numpy(), b["label"].numpy())
        assert a["image"].shape == (1, 32, 32, 16) and a["label"].dtype.is_floating_point is False
    other = _dataset(cases, seed=4)
    assert any(not np.array_equal(first[i]["image"].numpy(), other[i]["image"].numpy()) for i in range(4))


def test_lateral_swap_table():
    assert lateral_swap(["liver", "spleen"]).tolist() == [0, 1, 2]
    assert lateral_swap(["kidney_left", "liver", "kidney_right"]).tolist() == [0, 3, 2, 1]
    assert lateral_swap(["adrenal_gland_left", "liver"]) is None
    check_mirror_axes((0, 1, 2), ["liver", "spleen"])
    check_mirror_axes((1, 2), ["adrenal_gland_left"])
    with pytest.raises(ValueError, match="left-right"):
        check_mirror_axes((0,), ["adrenal_gland_left", "liver"])


def test_a_left_right_mirror_swaps_each_pair():
    """kidney_left lies at low x; after any augmentation the class on the low-x side must still be kidney_left."""
    shape = (40, 40, 24)
    image = np.zeros((1,) + shape, dtype=np.float32)
    label = np.zeros((1,) + shape, dtype=np.uint8)
    image[0, 4:18, 8:32, 4:20], label[0, 4:18, 8:32, 4:20] = 0.3, 1     # class 1 = kidney_left
    image[0, 22:36, 8:32, 4:20], label[0, 22:36, 8:32, 4:20] = 1.0, 2   # class 2 = kidney_right
    swap = lateral_swap(["kidney_left", "kidney_right"])
    mirrored, unswapped_wrong = 0, 0
    for index in range(16):
        draw = draw_supervised_transform(np.random.default_rng([11, index]), (19.5, 19.5, 11.5), (32, 32, 16),
                                         mirror_axes=(0, 1, 2))
        mirrored += 0 in draw.mirrored
        for table in (swap, None):
            _, moved = supervised_augment(image, label, (19.5, 19.5, 11.5), (32, 32, 16),
                                          np.random.default_rng([11, index]), mirror_axes=(0, 1, 2), swap=table)
            left_x, right_x = np.nonzero(moved[0] == 1)[0], np.nonzero(moved[0] == 2)[0]
            assert left_x.size and right_x.size
            if table is not None:
                assert left_x.mean() < right_x.mean(), index
            else:
                unswapped_wrong += left_x.mean() > right_x.mean()
    assert mirrored >= 3
    assert unswapped_wrong == mirrored, "without the swap every left-right mirror mislabels the pair"


def test_finetune_refuses_to_mirror_an_unpaired_lateral_organ():
    from ContrastiveSegLib.config import RunConfig
    from ContrastiveSegLib.errors import InputError
    from ContrastiveSegLib.finetune import augmentation_options

    config = RunConfig()
    config.train.mirror_axes = (0, 2)
    with pytest.raises(InputError, match="left-right"):
        augmentation_options(config, ["adrenal_gland_left", "liver"])
    assert augmentation_options(config, ["kidney_left", "kidney_right"])["swap"].tolist() == [0, 2, 1]
    config.train.mirror_axes = (2,)
    assert augmentation_options(config, ["adrenal_gland_left"])["swap"] is None


def test_a_stopped_and_resumed_run_with_spatial_augmentation_ends_with_the_same_weights(tmp_path, tiny_dataset):
    import torch
    from conftest import tiny_config

    from ContrastiveSegLib.engine.checkpoint import load_checkpoint
    from ContrastiveSegLib.finetune import run_finetune

    def config():
        made = tiny_config([tiny_dataset], ["liver", "spleen"], max_steps=4)
        made.train.augmentation, made.train.mirror_axes = "spatial", (1, 2)
        return made

    run_finetune(config(), str(tmp_path / "straight"), progress=False)
    stopped = tmp_path / "stopped"

    def stop_at_two(event):
        if event["event"] == "step" and event["step"] == 2:
            (stopped / "STOP").write_text("")

    assert run_finetune(config(), str(stopped), listeners=[stop_at_two], progress=False)["step"] == 2
    assert run_finetune(config(), str(stopped), resume=True, progress=False)["step"] == 4
    straight = load_checkpoint(str(tmp_path / "straight" / "checkpoints" / "last.pt"))["model"]
    resumed = load_checkpoint(str(stopped / "checkpoints" / "last.pt"))["model"]
    for key in straight:
        torch.testing.assert_close(straight[key], resumed[key], rtol=1e-5, atol=1e-6, msg=key)


def test_contrast_phase_shift_moves_each_organ_by_its_own_offset_in_hu():
    from ContrastiveSegLib.data.views import CONTRAST_PHASE_SHIFT_HU, contrast_phase_shift

    rng = np.random.default_rng(3)
    image = rng.uniform(0.3, 0.6, size=(1, 10, 10, 10)).astype(np.float32)   # a CT window: 400 HU per unit
    label = np.zeros(image.shape, dtype=np.int64)
    label[0, :4], label[0, 6:] = 1, 2
    offsets = {1: set(), 2: set()}
    for index in range(40):
        out = contrast_phase_shift(image, label, np.random.default_rng([0, index]), prob=0.5, units_per_hu=1 / 400,
                                   value_range=(0.0, 1.0))
        np.testing.assert_array_equal(out[label == 0], image[label == 0])   # background never moves
        for organ in (1, 2):
            unclipped = (out > 0) & (out < 1) & (label == organ)
            shift = np.round((out[unclipped] - image[unclipped]) * 400, 2)
            assert len(set(shift.tolist())) == 1, "one offset per organ"
            offsets[organ].add(float(shift[0]))
            assert CONTRAST_PHASE_SHIFT_HU[0] <= shift[0] <= CONTRAST_PHASE_SHIFT_HU[1]
        assert out.min() >= 0.0 and out.max() <= 1.0   # clipped to the window, as a scan would be
    for organ in (1, 2):   # unshifted in some patches, shifted by different amounts in the others
        assert 0.0 in offsets[organ] and len(offsets[organ]) > 10
    assert offsets[1] != offsets[2]
    # Off: the same array back and no draw from the generator, so runs without it sample as before.
    generator = np.random.default_rng(1)
    assert contrast_phase_shift(image, label, generator, 0.0, 1 / 400, (0.0, 1.0)) is image
    assert generator.random() == np.random.default_rng(1).random()


def test_contrast_phase_augmentation_is_reproducible_and_off_by_default():
    from ContrastiveSegLib.config import RunConfig
    from ContrastiveSegLib.errors import InputError
    from ContrastiveSegLib.finetune import augmentation_options

    image, label = _cube_case()
    case = PreparedCase("cube", image * 0.5, label, np.eye(4))
    config = RunConfig()
    targets = ["liver"]
    assert augmentation_options(config, targets)["contrast_phase"] is None
    plain = SupervisedPatches(PatchSampler([case], (24, 24, 24), 1.0), 0, 8, **augmentation_options(config, targets))
    config.train.contrast_phase_prob = 1.0
    options = augmentation_options(config, targets)
    assert options["contrast_phase"]["units_per_hu"] == pytest.approx(1 / 400)   # the default -150..250 window
    for augmentation in ("intensity", "spatial"):
        options["augmentation"] = augmentation
        shifted = SupervisedPatches(PatchSampler([case], (24, 24, 24), 1.0), 0, 8, **options)
        again = SupervisedPatches(PatchSampler([case], (24, 24, 24), 1.0), 0, 8, **options)
        for index in range(4):
            first, second = shifted[index], again[index]
            np.testing.assert_array_equal(first["image"].numpy(), second["image"].numpy())
            np.testing.assert_array_equal(first["label"].numpy(), second["label"].numpy())
    options["augmentation"] = "intensity"
    shifted = SupervisedPatches(PatchSampler([case], (24, 24, 24), 1.0), 0, 8, **options)
    def contrast(item):   # the cube's median minus the background's: 0.5 x the intensity scale (0.9-1.1)
        image, label = item["image"].numpy(), item["label"].numpy()
        return float(np.median(image[label == 1]) - np.median(image[label == 0]))

    changed = 0
    for index in range(8):   # the same crops; the cube's contrast to its surroundings moved
        before, after = plain[index], shifted[index]
        np.testing.assert_array_equal(before["label"].numpy(), after["label"].numpy())
        assert abs(contrast(before) - 0.5) < 0.06
        changed += abs(contrast(after) - 0.5) > 0.06
    assert changed >= 4
    config.preprocess.intensity = "percentile"   # not HU: an organ offset in HU means nothing
    with pytest.raises(InputError, match="HU"):
        augmentation_options(config, targets)


def test_hollow_organ_gas_fills_the_front_of_the_organ_inside_its_wall_under_a_flat_level():
    from ContrastiveSegLib.data.views import GAS_SHARE, hollow_organ_gas

    image = np.full((1, 12, 12, 12), 0.5, dtype=np.float32)
    label = np.zeros(image.shape, dtype=np.int64)
    label[0, 2:10, 2:10, 2:10] = 3   # a hollow organ: an 8-voxel cube (its inside: 6 x 6 x 6)
    label[0, 0:2, 0:2, 0:2] = 1      # a solid organ, never touched
    shares = []
    for index in range(30):
        out = hollow_organ_gas(image, label, np.random.default_rng([0, index]), prob=0.5, classes=[3], air=-1.0,
                               anterior_axis=1, anterior_sign=1)
        np.testing.assert_array_equal(out[label != 3], image[label != 3])   # outside the organ: as it was
        gas = out[0] == -1.0
        assert not gas[label[0] != 3].any()
        rim = (label[0] == 3) & ~np.pad(np.ones((6, 6, 6), bool), 3)
        assert not gas[rim].any(), "the organ's wall stays tissue"
        if not gas.any():
            continue
        rows = np.unique(np.nonzero(gas)[1])
        # A flat level: whole y-rows of the inside, and the front ones (higher y is anterior here).
        assert rows.max() == 8 and np.array_equal(rows, np.arange(rows.min(), 9))
        assert gas[3:9, rows.min():9, 3:9].all()
        shares.append(len(rows) / 6)
    assert 5 <= len(shares) <= 25   # prob 0.5 of 30 patches
    assert min(shares) >= GAS_SHARE[0] - 1 / 6 and max(shares) <= GAS_SHARE[1] + 1 / 6 and len(set(shares)) > 2
    # The front is at lower indices when the orientation says so (posterior-first, "LPS").
    out = hollow_organ_gas(image, label, np.random.default_rng(1), 1.0, [3], -1.0, anterior_axis=1, anterior_sign=-1,
                           share=(0.5, 0.5))
    gas = out[0] == -1.0
    assert gas[3:9, 3:6, 3:9].all() and not gas[3:9, 6:9, 3:9].any()
    # Off: the same array back and no draw from the generator, so runs without it sample as before.
    generator = np.random.default_rng(1)
    assert hollow_organ_gas(image, label, generator, 0.0, [3], -1.0, 1) is image
    assert generator.random() == np.random.default_rng(1).random()


def test_gas_reaches_only_hollow_targets_and_keeps_samples_reproducible():
    from ContrastiveSegLib.config import RunConfig
    from ContrastiveSegLib.data.views import anterior_axis
    from ContrastiveSegLib.errors import InputError
    from ContrastiveSegLib.finetune import augmentation_options

    assert anterior_axis("RAS") == (1, 1) and anterior_axis("LPS") == (1, -1) and anterior_axis("ASR") == (0, 1)
    image, label = _cube_case()
    case = PreparedCase("cube", image * 0.5, label, np.eye(4))
    config = RunConfig()
    assert augmentation_options(config, ["liver"])["gas"] is None
    config.train.hollow_organ_gas_prob = 1.0
    assert augmentation_options(config, ["liver", "stomach", "colon"])["gas"]["classes"] == [2, 3]
    options = augmentation_options(config, ["stomach"])
    assert options["gas"] == {"prob": 1.0, "classes": [1], "air": 0.0, "anterior_axis": 1, "anterior_sign": 1}
    for augmentation in ("intensity", "spatial"):
        options["augmentation"] = augmentation
        gassed = SupervisedPatches(PatchSampler([case], (24, 24, 24), 1.0), 0, 4, **options)
        again = SupervisedPatches(PatchSampler([case], (24, 24, 24), 1.0), 0, 4, **options)
        with_gas = 0
        for index in range(4):
            first, second = gassed[index], again[index]
            np.testing.assert_array_equal(first["image"].numpy(), second["image"].numpy())
            np.testing.assert_array_equal(first["label"].numpy(), second["label"].numpy())
            organ = first["label"].numpy() == 1
            # Part of the organ is now far darker than the rest of it (gas, before intensity noise); a patch
            # that cuts off the organ's front can miss it (the spatial path fills the whole case first).
            with_gas += (first["image"].numpy()[organ] < 0.2).sum() > 0.05 * organ.sum()
        assert with_gas >= 3, augmentation
    # A liver is not hollow: the option leaves its patches exactly as without it.
    config.train.hollow_organ_gas_prob = 0.0
    plain = SupervisedPatches(PatchSampler([case], (24, 24, 24), 1.0), 0, 4, **augmentation_options(config, ["liver"]))
    config.train.hollow_organ_gas_prob = 1.0
    solid = SupervisedPatches(PatchSampler([case], (24, 24, 24), 1.0), 0, 4, **augmentation_options(config, ["liver"]))
    np.testing.assert_array_equal(plain[0]["image"].numpy(), solid[0]["image"].numpy())
    config.preprocess.intensity = "percentile"   # MR: there is no gas value to give
    with pytest.raises(InputError, match="CT"):
        augmentation_options(config, ["stomach"])


def test_thin_scan_slab_repeats_the_middle_slabs_ends_as_predict_continues_a_thin_scan():
    import torch

    from ContrastiveSegLib.data.views import THIN_SCAN_MIN_SHARE, thin_scan_slab
    from ContrastiveSegLib.engine.inference import continue_to_patch

    length = 16
    image = np.arange(length, dtype=np.float32)[None, None, None, :].repeat(3, 1).repeat(2, 2)   # [1, 3, 2, 16]
    label = (image > 7).astype(np.int64)
    slabs = set()
    for index in range(40):
        out, out_label = thin_scan_slab(image, label, np.random.default_rng([2, index]), prob=0.5, axis=2)
        if out is image:
            assert out_label is label
            continue
        values = out[0, 0, 0]
        kept = np.unique(values)
        # The slab is contiguous, and a k-slice scan continued to the patch is exactly this patch.
        slices, low = len(kept), int(kept[0])
        assert np.array_equal(kept, np.arange(low, low + slices))
        assert round(THIN_SCAN_MIN_SHARE * length) <= slices < length
        scan = torch.from_numpy(image[None, :, :, :, low:low + slices])
        continued, where = continue_to_patch(scan, (3, 2, length), axes=(2,))
        np.testing.assert_array_equal(out, continued[0].numpy())
        assert where[2] == slice(low, low + slices)
        # The label travels with its slices: every position keeps the label of the slice it shows.
        np.testing.assert_array_equal(out_label, (out > 7).astype(np.int64))
        slabs.add(slices)
    assert len(slabs) > 5   # prob 0.5 of 40 patches, slab thickness drawn anew each time
    # Off: the same arrays back and no draw from the generator, so runs without it sample as before.
    generator = np.random.default_rng(1)
    out, out_label = thin_scan_slab(image, label, generator, 0.0, axis=2)
    assert out is image and out_label is label
    assert generator.random() == np.random.default_rng(1).random()


def test_thin_scan_option_needs_continued_ends_and_keeps_samples_reproducible():
    from ContrastiveSegLib.config import RunConfig
    from ContrastiveSegLib.errors import InputError
    from ContrastiveSegLib.finetune import augmentation_options

    image, label = _cube_case()
    case = PreparedCase("cube", image * 0.5, label, np.eye(4))
    config = RunConfig()
    assert augmentation_options(config, ["liver"])["thin_scan"] is None
    config.train.thin_scan_prob = 1.0
    options = augmentation_options(config, ["liver"])
    assert options["thin_scan"] == {"prob": 1.0, "axis": 2}
    for augmentation in ("intensity", "spatial"):
        options["augmentation"] = augmentation
        thin = SupervisedPatches(PatchSampler([case], (24, 24, 24), 1.0), 0, 4, **options)
        again = SupervisedPatches(PatchSampler([case], (24, 24, 24), 1.0), 0, 4, **options)
        for index in range(4):
            first, second = thin[index], again[index]
            np.testing.assert_array_equal(first["image"].numpy(), second["image"].numpy())
            np.testing.assert_array_equal(first["label"].numpy(), second["label"].numpy())
            # Every patch is a thin scan continued: its first and last slices repeat at least once.
            patch = first["image"].numpy()[0]
            assert np.array_equal(patch[..., 0], patch[..., 1]) or np.array_equal(patch[..., -1], patch[..., -2])
    config.preprocess.beyond_scan_ends = "air"   # predict pads such a run's thin scans with air: nothing to mimic
    with pytest.raises(InputError, match="air"):
        augmentation_options(config, ["liver"])


def test_vessel_lumen_contrast_brightens_the_blood_inside_the_wall_and_nothing_else():
    from ContrastiveSegLib.data.views import VESSEL_CONTRAST_HU, vessel_lumen_contrast

    units = 1.0 / 400.0   # the CT window [-150, 250] HU -> [0, 1]
    image = np.full((1, 10, 10, 10), 0.2, dtype=np.float32)   # + at most 300 HU: 0.95, inside the window
    image[0, 5, 5, 5] = 0.95   # a voxel of the lumen near the window's top: its shift is clipped
    label = np.zeros(image.shape, dtype=np.int64)
    label[0, 2:8, 2:8, 2:8] = 4   # a vessel: its inside is the 4 x 4 x 4 cube 3..6
    label[0, 0:2, 0:2, 0:2] = 1   # an organ that is not a vessel
    lumen = np.zeros(image.shape[1:], bool)
    lumen[3:7, 3:7, 3:7] = True
    offsets = []
    for index in range(20):
        out = vessel_lumen_contrast(image, label, np.random.default_rng([3, index]), prob=0.5, classes=[4],
                                    units_per_hu=units, value_range=(0.0, 1.0))
        np.testing.assert_array_equal(out[0][~lumen], image[0][~lumen])   # wall, organ and background: as they were
        if out is image:
            continue
        moved = out[0][lumen] - image[0][lumen]
        offset = moved[0]
        assert VESSEL_CONTRAST_HU[0] * units <= offset <= VESSEL_CONTRAST_HU[1] * units
        # One offset for the whole lumen, up to the window's top (the bright voxel is clipped at 1).
        assert out[0, 5, 5, 5] == min(np.float32(0.95) + np.float32(offset), 1.0)
        assert np.allclose(np.delete(moved, np.flatnonzero(image[0][lumen] > 0.9)), offset)
        offsets.append(float(offset))
    assert 4 <= len(offsets) <= 16 and len(set(offsets)) == len(offsets)   # prob 0.5 of 20, drawn anew
    # Off: the same array back and no draw from the generator, so runs without it sample as before.
    generator = np.random.default_rng(1)
    assert vessel_lumen_contrast(image, label, generator, 0.0, [4], units, (0.0, 1.0)) is image
    assert generator.random() == np.random.default_rng(1).random()


def test_vessel_contrast_reaches_only_vessel_targets_and_needs_hu():
    from ContrastiveSegLib.config import RunConfig
    from ContrastiveSegLib.errors import InputError
    from ContrastiveSegLib.finetune import augmentation_options

    config = RunConfig()
    assert augmentation_options(config, ["aorta"])["vessels"] is None
    config.train.vessel_contrast_prob = 1.0
    options = augmentation_options(config, ["liver", "aorta", "inferior_vena_cava"])
    assert options["vessels"]["classes"] == [2, 3] and options["vessels"]["prob"] == 1.0
    image, label = _cube_case()
    case = PreparedCase("cube", image * 0.5, label, np.eye(4))
    # A liver is not a vessel: the option leaves its patches exactly as without it.
    solid = SupervisedPatches(PatchSampler([case], (24, 24, 24), 1.0), 0, 4, **augmentation_options(config, ["liver"]))
    config.train.vessel_contrast_prob = 0.0
    plain = SupervisedPatches(PatchSampler([case], (24, 24, 24), 1.0), 0, 4, **augmentation_options(config, ["liver"]))
    np.testing.assert_array_equal(plain[0]["image"].numpy(), solid[0]["image"].numpy())
    config.train.vessel_contrast_prob = 1.0
    vessel = SupervisedPatches(PatchSampler([case], (24, 24, 24), 1.0), 0, 4, **augmentation_options(config, ["aorta"]))
    assert not np.array_equal(plain[0]["image"].numpy(), vessel[0]["image"].numpy())
    config.preprocess.intensity = "percentile"   # MR: no HU to brighten by
    with pytest.raises(InputError, match="HU"):
        augmentation_options(config, ["aorta"])


def test_random_intensity_network_by_hand_with_one_voxelwise_layer():
    """One 1 x 1 x 1 layer is ``w x + b`` per voxel: blended with alpha, scaled to the input's norm."""
    image = np.array([1.0, 2.0, -3.0], dtype=np.float32).reshape(1, 3, 1, 1)
    out = random_intensity_network(image, np.random.default_rng(11), layers=1, kernels=(1,))
    rng = np.random.default_rng(11)
    assert rng.integers(1) == 0                      # the kernel size, from the one choice
    weight, bias, alpha = rng.standard_normal(), rng.standard_normal(), rng.uniform(0.0, 1.0)
    mixed = alpha * (weight * image + bias) + (1 - alpha) * image
    expected = mixed * np.linalg.norm(image) / np.linalg.norm(mixed)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert out.dtype == np.float32 and out.shape == image.shape


def test_random_intensity_network_keeps_edges_where_they_were_and_is_reproducible():
    """Four layers of kernels up to 3 reach 4 voxels: deeper inside a region, the output is one value."""
    image, label = _cube_case(shape=(24, 24, 24), low=(6, 6, 6), high=(18, 18, 18))
    for seed in range(5):
        out = random_intensity_network(image, np.random.default_rng(seed))
        again = random_intensity_network(image, np.random.default_rng(seed))
        np.testing.assert_array_equal(out, again)
        np.testing.assert_allclose(np.linalg.norm(out), np.linalg.norm(image), rtol=1e-4)
        inside = out[0, 10:14, 10:14, 10:14]
        np.testing.assert_allclose(inside, inside.flat[0], rtol=1e-5, atol=1e-6)
        # The patch's own border is replicated, not padded with zeros: no edge appears there.
        outside = np.concatenate([out[0, :2].ravel(), out[0, -2:].ravel(), out[0, :, :2].ravel()])
        np.testing.assert_allclose(outside, outside[0], rtol=1e-5, atol=1e-6)
    different = [random_intensity_network(image, np.random.default_rng(seed))[0, 12, 12, 12] for seed in range(5)]
    assert len(set(np.round(different, 5).tolist())) == 5


def test_gin_option_changes_images_not_labels_and_is_off_by_default():
    from ContrastiveSegLib.config import RunConfig
    from ContrastiveSegLib.finetune import augmentation_options

    config = RunConfig()
    assert augmentation_options(config, ["liver"])["gin_prob"] == 0.0
    image, label = _cube_case()
    case = PreparedCase("cube", image * 0.5, label, np.eye(4))
    plain = SupervisedPatches(PatchSampler([case], (24, 24, 24), 1.0), 0, 4, **augmentation_options(config, ["liver"]))
    unset = SupervisedPatches(PatchSampler([case], (24, 24, 24), 1.0), 0, 4)
    config.train.gin_prob = 1.0
    gin = SupervisedPatches(PatchSampler([case], (24, 24, 24), 1.0), 0, 4, **augmentation_options(config, ["liver"]))
    for index in range(4):
        np.testing.assert_array_equal(plain[index]["image"].numpy(), unset[index]["image"].numpy())
        np.testing.assert_array_equal(plain[index]["label"].numpy(), gin[index]["label"].numpy())
        assert not np.array_equal(plain[index]["image"].numpy(), gin[index]["image"].numpy())
        np.testing.assert_array_equal(gin[index]["image"].numpy(), gin[index]["image"].numpy())


def test_gin_cli_option_is_a_probability():
    from ContrastiveSegLib.cli import _training_config, build_parser
    from ContrastiveSegLib.errors import InputError

    parser = build_parser()
    base = ["finetune", "--data", "x", "--labels", "liver", "--out", "y"]
    assert _training_config(parser.parse_args(base + ["--gin-prob", "0.5"]), "finetune").train.gin_prob == 0.5
    with pytest.raises(InputError, match="probability") as raised:
        _training_config(parser.parse_args(base + ["--gin-prob", "1.5"]), "finetune")
    assert raised.value.path == "--gin-prob"


def test_tissue_enhancement_brightens_solid_organs_and_hollow_walls_by_one_offset():
    image = np.full((1, 12, 12, 12), 0.5, dtype=np.float32)
    label = np.zeros((1, 12, 12, 12), dtype=np.int64)
    label[0, 1:5, 1:5, 1:5] = 1           # a solid organ
    label[0, 6:11, 6:11, 6:11] = 2        # a hollow organ: its 3 x 3 x 3 inside is what it holds
    label[0, 1:5, 7:11, 1:5] = 3          # neither
    units = 1.0 / 400.0
    out = tissue_enhancement(image, label, np.random.default_rng(2), 1.0, solid=[1], hollow=[2],
                             units_per_hu=units, value_range=(0.0, 1.0))
    rng = np.random.default_rng(2)
    assert rng.random() < 1.0
    offset = np.float32(rng.uniform(0.0, 100.0) * units)
    expected = image.copy()
    expected[label == 1] += offset
    wall = label[0] == 2
    wall[7:10, 7:10, 7:10] = False
    expected[0][wall] += offset
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert offset > 0 and out[0, 8, 8, 8] == 0.5 and out[0, 2, 8, 2] == 0.5 and out[0, 0, 0, 0] == 0.5
    # Clipped to the normalisation's range; nothing drawn when off.
    bright = tissue_enhancement(image + 0.45, label, np.random.default_rng(2), 1.0, [1], [2], units, (0.0, 1.0))
    assert bright.max() == 1.0
    rng = np.random.default_rng(5)
    assert tissue_enhancement(image, label, rng, 0.0, [1], [2], units, (0.0, 1.0)) is image
    assert rng.random() == np.random.default_rng(5).random()


def test_tissue_enhancement_option_reaches_the_enhancing_targets_and_needs_hu():
    from ContrastiveSegLib.config import RunConfig
    from ContrastiveSegLib.errors import InputError
    from ContrastiveSegLib.finetune import augmentation_options

    config = RunConfig()
    assert augmentation_options(config, ["liver"])["enhancement"] is None
    config.train.tissue_enhancement_prob = 0.5
    options = augmentation_options(config, ["liver", "aorta", "stomach", "spleen", "vertebrae_L1"])["enhancement"]
    assert options["solid"] == [1, 4] and options["hollow"] == [3] and options["prob"] == 0.5
    image, label = _cube_case()
    case = PreparedCase("cube", image * 0.5, label, np.eye(4))
    config.train.tissue_enhancement_prob = 1.0
    lit = SupervisedPatches(PatchSampler([case], (24, 24, 24), 1.0), 0, 2, **augmentation_options(config, ["liver"]))
    config.train.tissue_enhancement_prob = 0.0
    plain = SupervisedPatches(PatchSampler([case], (24, 24, 24), 1.0), 0, 2, **augmentation_options(config, ["liver"]))
    assert not np.array_equal(plain[0]["image"].numpy(), lit[0]["image"].numpy())
    np.testing.assert_array_equal(plain[0]["label"].numpy(), lit[0]["label"].numpy())
    config.train.tissue_enhancement_prob = 1.0
    config.preprocess.intensity = "percentile"
    with pytest.raises(InputError, match="HU"):
        augmentation_options(config, ["liver"])


def test_spatial_prob_sets_how_often_a_patch_is_moved_and_keeps_the_default_draws():
    """--spatial-prob: 0 gives plain crops, 1 moves every patch; 0.2, nnU-Net's, draws exactly as before."""
    image, label = _cube_case()
    image = image + np.linspace(0, 1, image.size, dtype=np.float32).reshape(image.shape)   # no two voxels alike
    centre, patch = (23.5, 23.5, 19.5), (32, 32, 16)
    crop = (slice(None), slice(8, 40), slice(8, 40), slice(12, 28))
    moved = 0
    for index in range(12):
        def augment(**kwargs):
            rng = np.random.default_rng([21, index])
            return rng, supervised_augment(image, label, centre, patch, rng, **kwargs)

        _, (_, never) = augment(spatial_prob=0.0)
        np.testing.assert_array_equal(never, label[crop].astype(np.int64))
        _, (_, always) = augment(spatial_prob=1.0)
        moved += not np.array_equal(always, label[crop].astype(np.int64))
        default_rng, (default_image, _) = augment()
        given_rng, (given_image, _) = augment(spatial_prob=0.2)
        np.testing.assert_array_equal(default_image, given_image)
        assert default_rng.random() == given_rng.random()   # the same numbers were drawn
    assert moved == 12


def test_the_spatial_prob_flag_is_a_probability_and_defaults_to_nnunets():
    from ContrastiveSegLib.cli import _training_config, build_parser
    from ContrastiveSegLib.errors import InputError

    parser = build_parser()
    base = ["finetune", "--data", "x", "--labels", "liver", "--out", "y", "--augmentation", "spatial"]
    assert _training_config(parser.parse_args(base), "finetune").train.spatial_prob == 0.2
    assert _training_config(parser.parse_args(base + ["--spatial-prob", "0.6"]), "finetune").train.spatial_prob == 0.6
    with pytest.raises(InputError, match="probability") as raised:
        _training_config(parser.parse_args(base + ["--spatial-prob", "1.5"]), "finetune")
    assert raised.value.path == "--spatial-prob"


def _sphere_case(shape=(48, 48, 48), centre=(24.0, 22.0, 25.0), radius=7.0):
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), axis=-1)
    inside = np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius
    return inside[None].astype(np.float32), inside[None].astype(np.uint8)


@pytest.mark.parametrize("factor", [0.9, 1.6])
def test_a_filling_organ_is_resized_about_its_centre_with_its_label(factor):
    from ContrastiveSegLib.data.views import organ_geometry

    image, label = _sphere_case()
    spacing = (2.0, 2.0, 2.0)
    (centre, radius), = organ_geometry(label, [1], spacing).values()
    np.testing.assert_allclose(centre, (24.0, 22.0, 25.0), atol=1e-6)
    assert radius == pytest.approx(14.0, rel=0.03)   # the sphere of its volume, in mm
    patch = (40, 40, 40)
    image_out, label_out = supervised_augment(image, label, centre, patch, np.random.default_rng(1), spatial_prob=0.0,
                                              resizes=[(centre, radius, factor)], spacing=spacing)
    assert label_out.sum() / label.sum() == pytest.approx(factor ** 3, rel=0.1)
    on_label = label_out[0] == 1
    # The image moved with the label: linear intensities agree with nearest labels up to the sphere's rim.
    assert (image_out[0][on_label] >= 0.5 - 1e-4).mean() > 0.97
    assert (image_out[0][~on_label] <= 0.5 + 1e-4).mean() > 0.99
    found = np.argwhere(on_label).mean(axis=0) + (np.asarray(centre) - (np.asarray(patch) - 1) / 2.0)
    np.testing.assert_allclose(found, centre, atol=0.5)


@pytest.mark.parametrize("factor", [0.9, 1.6])
def test_resizing_an_organ_never_folds_and_leaves_far_tissue_in_place(factor):
    import torch

    from ContrastiveSegLib.data.views import resize_organs

    centre, radius, spacing = np.array([10.0, 10.0, 10.0]), 6.0, (1.0, 1.0, 3.0)
    direction = torch.tensor([0.6, 0.0, 0.8 / 3.0])   # a ray, in voxels of the anisotropic grid
    steps = torch.linspace(0.0, 40.0, 801)[:, None]
    ray = torch.tensor(centre, dtype=torch.float32) + steps * direction
    moved = resize_organs(ray, [(centre, radius, factor)], spacing)
    distance = torch.linalg.vector_norm((moved - torch.tensor(centre, dtype=torch.float32))
                                        * torch.tensor(spacing), dim=-1)
    assert torch.all(distance[1:] > distance[:-1])   # monotone along the ray: no fold
    along = torch.linalg.vector_norm((ray - torch.tensor(centre, dtype=torch.float32)) * torch.tensor(spacing), dim=-1)
    far = along >= 2.0 * factor * radius
    assert far.any() and torch.allclose(moved[far], ray[far])
    near = along <= factor * radius
    assert torch.allclose(distance[near], along[near] / factor, atol=1e-4)


def test_organ_sizes_are_drawn_for_every_class_and_only_present_ones_resized():
    from ContrastiveSegLib.data.views import draw_organ_sizes

    geometry = {3: (np.zeros(3), 10.0)}
    first, second = np.random.default_rng(4), np.random.default_rng(4)
    assert draw_organ_sizes(first, geometry, [2, 3], prob=0.0) == []
    resized = draw_organ_sizes(second, geometry, [2, 3], prob=1.0)
    assert len(resized) == 1 and resized[0][1] == 10.0 and 0.9 <= resized[0][2] <= 1.6
    assert first.random() == second.random()   # the same numbers were drawn, resized or not


def test_organ_filling_is_off_by_default_and_asks_for_the_spatial_augmentation():
    from ContrastiveSegLib.config import RunConfig
    from ContrastiveSegLib.errors import InputError
    from ContrastiveSegLib.finetune import augmentation_options

    config = RunConfig()
    assert config.train.organ_filling_prob == 0.0 and augmentation_options(config, ["stomach"])["filling"] is None
    config.train.organ_filling_prob = 0.5
    with pytest.raises(InputError, match="spatial") as raised:
        augmentation_options(config, ["stomach"])
    assert raised.value.path == "--organ-filling-prob"
    config.train.augmentation = "spatial"
    assert augmentation_options(config, ["liver", "stomach"])["filling"] == {"prob": 0.5, "classes": [2]}


def test_organ_filling_changes_only_patches_with_the_organ_and_keeps_draws_without_it():
    image, label = _sphere_case(shape=(64, 64, 40), centre=(20.0, 30.0, 20.0), radius=6.0)
    cases = [PreparedCase("sphere", image, label, np.diag([2.0, 2.0, 2.0, 1.0]))]
    plain = _dataset(cases, length=8)
    off = _dataset(cases, length=8, filling={"prob": 0.0, "classes": [1]})
    on = _dataset(cases, length=8, filling={"prob": 1.0, "classes": [1], "size_range": (1.5, 1.5)})
    plain_voxels = on_voxels = 0
    for index in range(8):
        np.testing.assert_array_equal(plain[index]["image"].numpy(), off[index]["image"].numpy())
        plain_voxels += int(plain[index]["label"].sum())
        on_voxels += int(on[index]["label"].sum())
    assert on_voxels > 2.0 * plain_voxels   # 1.5 x larger each way: about 3.4 x the volume where it is whole
