"""The linear probe of a frozen encoder: planted signals are found, position shares are right, the CLI writes JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, tiny_config, write_dataset

from ContrastiveSegLib.data.preprocess import PreparedCase
from ContrastiveSegLib.finetune import run_finetune
from ContrastiveSegLib.models import LEVEL_NAMES
from ContrastiveSegLib.probe import (
    PositionVarianceShare,
    ProbeSettings,
    encoder_levels,
    features_at_voxels,
    linear_probe_dice,
    load_encoder,
    position_shares,
    run_probe,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRID = (32, 32, 16)
TARGETS = ["liver", "spleen"]


def _labelled_case(case_id: str, seed: int) -> PreparedCase:
    """Three classes in slabs of random thickness along x (so train and test cases differ)."""
    rng = np.random.default_rng(seed)
    label = np.zeros(GRID, dtype=np.uint8)
    first, second = int(rng.integers(8, 13)), int(rng.integers(19, 24))
    label[first:second] = 1
    label[second:] = 2
    return PreparedCase(case_id, rng.random((1,) + GRID, dtype=np.float32), label[None], np.eye(4))


def _planted_levels(label: np.ndarray, signal: float, generator: torch.Generator):
    """Five levels at 1, 1/2, ..., 1/16 resolution of noise; level 0 also carries ``signal`` x one-hot(label)."""
    levels = []
    for level in range(5):
        size = [g // 2 ** level for g in GRID]
        levels.append(torch.randn([4] + size, generator=generator))
    one_hot = F.one_hot(torch.as_tensor(label, dtype=torch.long), 3).permute(3, 0, 1, 2).float()
    levels[0] = torch.cat([levels[0], signal * one_hot])
    return levels, GRID


# Noise alone: each organ covers about a third of the volume, so guessing scores about 1/3.
@pytest.mark.parametrize("signal, low, high", [(5.0, 0.97, 1.0), (0.0, 0.2, 0.45)])
def test_probe_finds_a_planted_label_signal_and_nothing_in_noise(signal, low, high):
    generator = torch.Generator().manual_seed(0)
    train = [_labelled_case("train", 1)]
    test = [_labelled_case("test_a", 2), _labelled_case("test_b", 3)]
    label_of = {id(case.image): case.label[0] for case in train + test}
    result = linear_probe_dice(train, test, lambda image: _planted_levels(label_of[id(image)], signal, generator),
                               TARGETS, ProbeSettings(voxels_per_class=300), np.random.default_rng(0))
    assert low <= result["dice"]["mean"] <= high, result["dice"]
    assert set(result["dice_per_case"]) == {"test_a", "test_b"}
    assert result["training_voxels"] == {"background": 300, "liver": 300, "spleen": 300}


def test_features_at_voxels_equal_trilinear_upsampling_read_at_those_voxels():
    generator = torch.Generator().manual_seed(1)
    grid = (32, 48, 16)
    levels = [torch.randn([3] + [g // 2 ** level for g in grid], generator=generator) for level in range(5)]
    voxels = torch.stack([torch.randint(0, g, (50,), generator=generator) for g in grid], dim=1)
    expected = torch.cat([F.interpolate(level[None], size=grid, mode="trilinear", align_corners=False)[0]
                          [:, voxels[:, 0], voxels[:, 1], voxels[:, 2]].t() for level in levels], dim=1)
    torch.testing.assert_close(features_at_voxels(levels, voxels, grid), expected, rtol=1e-5, atol=1e-5)


def test_position_share_is_one_for_a_pure_position_code_and_near_zero_without_one():
    generator = torch.Generator().manual_seed(2)
    code = torch.randn(1, 6, 4, 4, 2, generator=generator)
    position_only = PositionVarianceShare()
    for _ in range(8):
        position_only.add(code.expand(3, -1, -1, -1, -1))
    assert position_only.share() == pytest.approx(1.0, abs=1e-9)

    position_free = PositionVarianceShare()
    for _ in range(16):
        position_free.add(torch.randn(4, 6, 4, 4, 2, generator=generator))
    # The mean of 64 independent patches keeps 1/64 of the variance: the estimator's floor.
    assert position_free.share() < 0.03

    mixed = 0.6 * code + torch.randn(64, 6, 4, 4, 2, generator=generator)
    accumulated = PositionVarianceShare()
    for batch in mixed.split(5):
        accumulated.add(batch)
    flat = mixed.double().reshape(64, 6, -1)
    by_position = flat.mean(0)
    reference = ((by_position - flat.mean(dim=(0, 2))[:, None]) ** 2).mean(1).sum() / flat.var(dim=(0, 2),
                                                                                             unbiased=False).sum()
    assert accumulated.share() == pytest.approx(float(reference), rel=1e-9)


def test_encoder_levels_of_a_one_patch_volume_are_the_encoder_outputs():
    config = tiny_config([], TARGETS).model
    config.out_channels = 3
    backbone, report = load_encoder("none", config, seed=0)
    assert report["loaded"] == [] and not any(p.requires_grad for p in backbone.parameters())
    image = np.random.default_rng(0).random((1, 32, 32, 16), dtype=np.float32)
    levels, grid = encoder_levels(backbone, image, (32, 32, 16))
    assert grid == (32, 32, 16)
    with torch.no_grad():
        direct = backbone.encode(torch.as_tensor(image)[None])
    for stitched, reference in zip(levels, direct):
        torch.testing.assert_close(stitched, reference[0], rtol=1e-4, atol=1e-5)


def test_encoder_levels_stitch_a_volume_larger_than_the_patch_at_every_resolution():
    config = tiny_config([], TARGETS).model
    backbone, _ = load_encoder("none", config, seed=0)
    image = np.random.default_rng(1).random((1, 50, 37, 20), dtype=np.float32)
    levels, grid = encoder_levels(backbone, image, (32, 32, 16))
    assert grid == (64, 48, 32)
    assert [tuple(level.shape) for level in levels] == [
        (c,) + tuple(g // 2 ** i for g in grid) for i, c in enumerate(backbone.level_channels)]


def test_random_encoders_of_one_seed_are_identical_and_of_two_seeds_differ():
    config = tiny_config([], TARGETS).model
    first, _ = load_encoder("none", config, seed=3)
    again, _ = load_encoder("none", config, seed=3)
    other, _ = load_encoder("none", config, seed=4)
    key = "net.conv_0.conv_0.conv.weight"
    assert torch.equal(first.state_dict()[key], again.state_dict()[key])
    assert not torch.equal(first.state_dict()[key], other.state_dict()[key])


def test_position_shares_of_an_encoder_name_every_level():
    config = tiny_config([], TARGETS).model
    backbone, _ = load_encoder("none", config, seed=0)
    volume = np.random.default_rng(2).random((1, 40, 40, 20), dtype=np.float32)
    shares = position_shares(backbone, [volume], (32, 32, 16), 4, np.random.default_rng(0))
    assert list(shares) == list(LEVEL_NAMES)
    assert all(0.0 <= value <= 1.0 for value in shares.values())


@pytest.fixture(scope="module")
def one_case_dataset(tmp_path_factory, sample_pieces, sample_label_map) -> str:
    """One real CT piece: the probe fits and scores on it (only the plumbing is tested here)."""
    return write_dataset(str(tmp_path_factory.mktemp("probe") / "one"), {"upper": sample_pieces["upper"]},
                         sample_label_map)


@pytest.mark.slow  # two encoders on a real CT piece, one through a subprocess
def test_probe_cli_random_encoder_and_a_finetuned_one(tmp_path, one_case_dataset):
    common = ["--data", one_case_dataset, "--test-data", one_case_dataset, "--labels", "liver,spleen",
              "--voxels-per-class", "200", "--position-patches", "2"]
    shape = ["--model", "unet", "--model-size", "tiny", "--patch", "32,32,16", "--spacing", "6,6,6"]
    result = run_cli(["probe", "--init", "none", "--out", tmp_path / "none.json"] + common + shape)
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "none.json").read_text())
    assert set(written["dice"]) == {"liver", "spleen", "mean"}
    assert list(written["position_share"]) == list(LEVEL_NAMES)
    assert written["training_voxels"] == {"background": 200, "liver": 200, "spleen": 200}

    run = tmp_path / "run"
    run_finetune(tiny_config([one_case_dataset], ["liver"], max_steps=1), str(run), progress=False)
    # The network and preprocessing come from the checkpoint when not given.
    written = run_probe(str(run / "checkpoints" / "last.pt"), [one_case_dataset], [one_case_dataset],
                        ["liver", "spleen"], settings=ProbeSettings(voxels_per_class=200, position_patches=2),
                        progress=False)
    assert written["model"]["architecture"] == "unet" and written["preprocess"]["spacing"] == (6.0, 6.0, 6.0)
    assert written["init_report"]["loaded"] > 0


def test_probe_cli_refuses_an_unknown_organ(tmp_path, one_case_dataset):
    result = run_cli(["probe", "--init", "none", "--data", one_case_dataset, "--test-data", one_case_dataset,
                      "--labels", "liver,unicorn", "--out", tmp_path / "p.json"])
    assert result.returncode == 2
    assert "unicorn" in result.stderr
