"""MixCL pre-training: shared label vocabulary, sampling, the objective, and the pretrain -> finetune path."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import TINY_ARGS, assert_pretrain_stop_and_resume_match, run_cli, run_torchrun, tiny_config, write_dataset

from ContrastiveSegLib.config import ModelConfig
from ContrastiveSegLib.data.catalog import load_datasets
from ContrastiveSegLib.data.preprocess import CasePreparer
from ContrastiveSegLib.data.sources import prepare_sources, vocabulary
from ContrastiveSegLib.engine.checkpoint import load_checkpoint
from ContrastiveSegLib.engine.events import read_events
from ContrastiveSegLib.losses import flatten_feature_map, identity_loss, label_contrastive_loss, position_variance_loss
from ContrastiveSegLib.methods import mixcl
from ContrastiveSegLib.models import build_backbone
from ContrastiveSegLib.pretrain import method_settings, run_pretrain


def _value_of(label_map: dict, name: str) -> int:
    return next(int(value) for value, label in label_map.items() if label == name)


def _relabel(label: sitk.Image, mapping: dict) -> sitk.Image:
    """``label`` with value ``old`` -> ``new`` for each mapping item, everything else 0."""
    array = sitk.GetArrayFromImage(label)
    out = np.zeros_like(array)
    for old, new in mapping.items():
        out[array == old] = new
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(label)
    return image


@pytest.fixture(scope="module")
def mixed_datasets(tmp_path_factory, sample_pieces, sample_label_map):
    """Two real-CT datasets whose label sets and label numbers differ.

    ``organs_a``: liver = 1 and spleen = 2 (two cases);
    ``organs_b``: stomach = 1 and liver = 2 (one case): liver is a shared organ under another number.
    """
    root = tmp_path_factory.mktemp("mixed")
    liver, spleen, stomach = (_value_of(sample_label_map, n) for n in ("liver", "spleen", "stomach"))
    a = write_dataset(str(root / "organs_a"),
                      {k: (sample_pieces[k][0], _relabel(sample_pieces[k][1], {liver: 1, spleen: 2}))
                       for k in ("upper", "lower")},
                      {"0": "background", "1": "liver", "2": "spleen"})
    image, label = sample_pieces["right"]
    b = write_dataset(str(root / "organs_b"), {"right": (image, _relabel(label, {stomach: 1, liver: 2}))},
                      {"0": "background", "1": "stomach", "2": "liver"})
    return a, b


def _sources(datasets):
    config = tiny_config(datasets, [])
    loaded = load_datasets(datasets)
    preparer = CasePreparer(config.preprocess, vocabulary(loaded), pad_to=config.model.patch_size)
    return prepare_sources(loaded, preparer, progress=False)


def test_vocabulary_matches_labels_across_datasets_by_name(mixed_datasets, sample_pieces, sample_label_map):
    sources = _sources(mixed_datasets)
    assert sources.class_names == ["liver", "spleen", "stomach"]
    assert [len(cases) for cases in sources.by_dataset] == [2, 1]
    assert sources.dataset_labels(1) == ["liver", "stomach"]
    liver_id = sources.class_names.index("liver") + 1
    # The "right" case numbers liver 2 in its own file; in the shared vocabulary it is liver's id.
    right = sources.cases[sources.by_dataset[1][0]]
    assert (right.prepared.label == liver_id).sum() > 0
    assert set(np.unique(right.prepared.label).tolist()) == {0, liver_id, sources.class_names.index("stomach") + 1}
    first, last = right.z_extent
    assert 0 <= first < last < right.prepared.image.shape[-1]


def test_projector_has_channels_c_c_2c():
    head = mixcl.projector(8)
    convolutions = [m for m in head if isinstance(m, torch.nn.Conv3d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convolutions] == [
        (8, 8, (1, 1, 1)), (8, 8, (1, 1, 1)), (8, 16, (1, 1, 1))]
    assert sum(isinstance(m, torch.nn.InstanceNorm3d) for m in head) == 2
    assert head(torch.randn(2, 8, 4, 4, 2)).shape == (2, 16, 4, 4, 2)


def test_sampled_voxels_are_on_the_coarse_grid_and_padded():
    label = np.zeros((8, 8, 4), dtype=np.uint8)
    label[0:4, 0:4, 0:2] = 3        # on the 2x coarser grid: a 2x2x1 block (4 voxels) of class 3
    label[6, 6, 2] = 5               # (3, 3, 1) on the coarse grid: one voxel of class 5
    settings = dict(mixcl.DEFAULTS, samples_per_class=3, background_negatives=False)
    indices, values = mixcl.sampled_voxels(label, 2, 8, settings, np.random.default_rng(0))
    assert indices.shape == values.shape == (8,)
    coarse = label[::2, ::2, ::2]
    kept = values >= 0
    assert sorted(values[kept].tolist()) == [3, 3, 3, 5]          # r = 3 of class 3, the single voxel of 5
    assert (coarse.reshape(-1)[indices[kept]] == values[kept]).all()  # each index holds its label
    assert (values[~kept] == -1).all() and (indices[~kept] == 0).all()
    # With background as a negative, r background voxels are drawn too, uniformly.
    settings["background_negatives"] = True
    indices, values = mixcl.sampled_voxels(label, 2, 12, settings, np.random.default_rng(0))
    assert sorted(values[values >= 0].tolist()) == [0, 0, 0, 3, 3, 3, 5]
    assert (coarse.reshape(-1)[indices[values == 0]] == 0).all()


def test_auxiliary_patch_comes_from_the_same_dataset_half_of_the_time_the_same_case(mixed_datasets):
    sources = _sources(mixed_datasets)
    samples = mixcl.MixCLSamples(sources, (32, 32, 16), dict(mixcl.DEFAULTS), seed=0, length=10)
    draws = [samples.choose_cases(np.random.default_rng([3, i])) for i in range(400)]
    for dataset, first, second in draws:
        assert first in sources.by_dataset[dataset] and second in sources.by_dataset[dataset]
    two_case = [(f, s) for d, f, s in draws if d == 0]
    same = np.mean([f == s for f, s in two_case])
    assert 0.4 < same < 0.6, same
    assert 0.4 < np.mean([d == 0 for d, _, _ in draws]) < 0.6   # datasets drawn uniformly, not by size


def test_samples_are_reproducible_and_shaped(mixed_datasets):
    sources = _sources(mixed_datasets)
    samples = mixcl.MixCLSamples(sources, (32, 32, 16), dict(mixcl.DEFAULTS, samples_per_class=16), seed=7,
                                 length=10)
    a, b, c = samples[4], samples[4], samples[5]
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert not torch.equal(a["views"], c["views"])
    assert a["views"].shape == a["patches"].shape == (3, 1, 32, 32, 16)
    assert a["index1"].shape == a["label1"].shape == (16 * 4,)          # 3 organs + background
    assert a["pairs"].shape == (len(mixcl.LEVEL_NAMES), 2, mixcl.DEFAULTS["identity_pixels"])
    # Independent geometry: V1 and V1' are different resamplings of one crop, and their cells pair up.
    assert not torch.equal(a["patches"][0], a["patches"][1])
    assert (a["pairs"][0, 0] >= 0).sum() > 100
    # The paper's shared geometry: one deformed patch, the same reconstruction target, every cell its own pair.
    shared = mixcl.MixCLSamples(sources, (32, 32, 16), dict(mixcl.DEFAULTS, samples_per_class=16, identity_pixels=4096,
                                                            view_geometry="shared"), seed=7, length=10)[4]
    torch.testing.assert_close(shared["patches"][0], shared["patches"][1])
    enc2 = shared["pairs"][1]
    assert (enc2[0] >= 0).sum() == 16 * 16 * 8 and torch.equal(enc2[0], enc2[1])


def _tiny_objective(**settings):
    config = ModelConfig(architecture="unet", size="tiny", out_channels=2, patch_size=(32, 32, 16))
    torch.manual_seed(0)
    return mixcl.MixCLObjective(build_backbone(config), dict(mixcl.DEFAULTS, **settings))


def _batch(objective, seed=0):
    generator = torch.Generator().manual_seed(seed)
    views = torch.rand(2, 3, 1, 32, 32, 16, generator=generator)
    grid = 16 * 16 * 8
    return {"views": views, "patches": views.clone() * 0.9,
            "index1": torch.randint(grid, (2, 6), generator=generator),
            "label1": torch.tensor([[1, 1, 2, 2, -1, -1], [1, 3, 3, -1, -1, -1]]),
            "index2": torch.randint(grid, (2, 6), generator=generator),
            "label2": torch.tensor([[1, 2, 2, 0, -1, -1], [3, 3, 1, 1, 2, -1]])}


PAPER = {"identity_reduction": "sum", "lambd": 0.0051, "skip_thin_levels": False, "background_negatives": False,
         "view_geometry": "shared", "position_weight": 0.0}


def test_objective_equals_the_sum_of_its_terms_computed_directly():
    """The paper's composition (levels summed, one geometry): kept as an option, term for term."""
    objective = _tiny_objective(alpha=0.3, beta=0.7, **PAPER)
    batch = _batch(objective)
    loss, logs = objective(batch)

    # Independent composition: each view through the encoder separately.
    backbone = objective.backbone
    v1, v1b, v2 = (batch["views"][:, k] for k in range(3))
    levels = [backbone.encode(v) for v in (v1, v1b, v2)]
    identity = 0.0
    for name in mixcl.LEVEL_NAMES:
        index = mixcl.LEVEL_NAMES.index(name)
        # Instance norm is per sample, so projecting views separately equals projecting the stacked batch.
        z1 = objective.projectors[name](levels[0][index])
        z2 = objective.projectors[name](levels[1][index])
        identity = identity + identity_loss(flatten_feature_map(z1), flatten_feature_map(z2))
    enc2 = [objective.projectors["enc2"](lv[1]) for lv in levels]

    def pick(features, indices, labels):
        rows, ys = [], []
        for b in range(features.shape[0]):
            flat = features[b].reshape(features.shape[1], -1)
            for i, y in zip(indices[b].tolist(), labels[b].tolist()):
                if y >= 0:
                    rows.append(flat[:, i])
                    ys.append(y)
        return torch.stack(rows), torch.tensor(ys)

    za, ya = pick(enc2[0], batch["index1"], batch["label1"])
    zb, yb = pick(enc2[2], batch["index2"], batch["label2"])
    label = label_contrastive_loss(za, ya, zb, yb, tau=0.1)
    recon = torch.stack([torch.mean((objective.reconstruction(backbone.decode(lv)) - batch["patches"][:, k]) ** 2)
                         for k, lv in enumerate(levels)]).mean()
    expected = identity + 0.3 * label + 0.7 * recon
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    assert logs["label_pixels"] == float((batch["label1"] >= 0).sum() + (batch["label2"] >= 0).sum())


def test_position_floor_adds_its_weighted_loss_on_all_encoded_views():
    """The variance floor: weight x mean over its levels of position_variance_loss over V1, V1' and V2."""
    batch = _batch(None, seed=2)
    plain, _ = _tiny_objective(position_weight=0.0)(batch)
    objective = _tiny_objective(position_weight=0.5, position_levels=["enc4", "bottleneck"])
    loss, logs = objective(batch)
    views = batch["views"]
    levels = objective.backbone.encode(views.transpose(0, 1).reshape(-1, *views.shape[2:]))
    floor = (position_variance_loss(levels[3]) + position_variance_loss(levels[4])) / 2
    torch.testing.assert_close(loss, plain + 0.5 * floor, rtol=1e-4, atol=1e-5)
    assert logs["position"] == pytest.approx(float(floor), rel=1e-4) and float(floor) > 0
    from ContrastiveSegLib.errors import InputError

    with pytest.raises(InputError, match="unknown level"):
        mixcl.check_settings(dict(mixcl.DEFAULTS, position_levels=["enc9"]))
    with pytest.raises(InputError, match="position_weight must be >= 0"):
        mixcl.check_settings(dict(mixcl.DEFAULTS, position_weight=-1.0))


def test_objective_gradients_reach_encoder_projectors_and_reconstruction_head():
    objective = _tiny_objective()
    loss, _ = objective(_batch(objective, seed=1))
    loss.backward()
    encoder_first = objective.backbone.net.conv_0.conv_0.conv.weight
    assert encoder_first.grad is not None and encoder_first.grad.abs().sum() > 0
    for name, head in objective.projectors.items():
        assert head[0].weight.grad is not None, name   # DDP needs a gradient for every trainable tensor
        if name in ("bottleneck",):   # 2 x 2 x 1 cells x 2 samples = 8 pixels < 64 channels: sits out
            assert head[0].weight.grad.abs().sum() == 0
        else:
            assert head[0].weight.grad.abs().sum() > 0, name
    assert objective.reconstruction.weight.grad.abs().sum() > 0


def test_label_term_is_zero_without_a_positive_pair():
    objective = _tiny_objective(alpha=1.0, beta=0.0)
    batch = _batch(objective)
    batch["label2"] = torch.where(batch["label2"] > 0, torch.full_like(batch["label2"], 9), batch["label2"])
    _, logs = objective(batch)
    assert logs["label"] == 0.0


def test_settings_are_typed_and_unknown_ones_listed():
    settings = method_settings("mixcl", ["alpha=0.5", "identity_levels=enc2,bottleneck", "label_reduction=anchor"])
    assert settings["alpha"] == 0.5 and settings["identity_levels"] == ["enc2", "bottleneck"]
    assert settings["label_reduction"] == "anchor" and settings["name"] == "mixcl"
    from ContrastiveSegLib.errors import InputError

    with pytest.raises(InputError, match="samples_per_class=128"):
        method_settings("mixcl", ["alhpa=0.5"])
    with pytest.raises(InputError, match="not a valid value"):
        method_settings("mixcl", ["samples_per_class=many"])


def test_pretrain_on_mixed_label_sets_then_finetune_from_it(tmp_path, mixed_datasets, tiny_dataset):
    run = tmp_path / "pretrain"
    result = run_cli(["pretrain", "--method", "mixcl", "--data", mixed_datasets[0], "--data", mixed_datasets[1],
                      "--out", run, "--max-steps", "3", "--set", "samples_per_class=32", "--batch-size", "2"]
                     + [a for a in TINY_ARGS if a not in ("--batch-size", "1")])
    assert result.returncode == 0, result.stderr
    state = load_checkpoint(str(run / "checkpoints" / "last.pt"))
    assert state["kind"] == "pretrain" and state["step"] == 3
    assert any(key.startswith("projectors.") for key in state["extra"])
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert config["method"]["name"] == "mixcl" and config["method"]["samples_per_class"] == 32
    assert config["method"]["alpha"] == mixcl.DEFAULTS["alpha"] and config["train"]["batch_size"] == 2
    events = read_events(str(run / "events.jsonl"))
    steps = [e for e in events if e["event"] == "step"]
    assert {"identity", "label", "recon", "position", "id_enc2", "label_active"} <= set(steps[-1]["losses"])
    gradients = [e for e in events if e["event"] == "term_gradients"]
    assert gradients[0]["step"] == 0 and set(gradients[0]["norms"]) == {"identity", "label", "recon", "position"}
    assert all(value >= 0 for value in gradients[0]["norms"].values())
    share = [e for e in events if e["event"] == "label_gradients"]
    assert len(share) == 1 and share[0]["batches"] == 3 and 0 <= share[0]["share"] <= 1
    assert all(np.isfinite(e["loss"]) for e in steps)
    messages = " ".join(e["text"] for e in events if e["event"] == "message")
    assert "organs_b" in messages and "liver, stomach" in messages

    tuned = tmp_path / "finetune"
    result = run_cli(["finetune", "--data", tiny_dataset, "--labels", "liver,spleen", "--out", tuned,
                      "--max-steps", "2", "--init", run / "checkpoints" / "last.pt"] + TINY_ARGS)
    assert result.returncode == 0, result.stderr
    report = json.loads((tuned / "init_report.json").read_text(encoding="utf-8"))
    assert len(report["loaded"]) > 0 and all(k.startswith("net.") for k in report["loaded"])
    assert not any(k.startswith(("net.upcat", "net.final")) for k in report["loaded"])


def test_pretrain_stop_and_resume_continue_exactly(tmp_path, mixed_datasets):
    def config():
        c = tiny_config(list(mixed_datasets), [], max_steps=4, batch_size=2)
        c.method = method_settings("mixcl", ["samples_per_class=16", "spatial_prob=0.0"])
        return c

    assert_pretrain_stop_and_resume_match(config, tmp_path, total_steps=4)


def test_pretrain_bad_input_is_reported(tmp_path, mixed_datasets):
    result = run_cli(["pretrain", "--method", "mixcl", "--data", mixed_datasets[0], "--out", tmp_path / "r",
                      "--labels", "pancreas"] + TINY_ARGS)
    assert result.returncode == 2
    assert "unknown label name(s): pancreas" in result.stderr and "liver" in result.stderr
    result = run_cli(["pretrain", "--method", "mixcl", "--data", mixed_datasets[0], "--out", tmp_path / "r",
                      "--mitigator", "param"] + TINY_ARGS)
    assert result.returncode == 2 and "--method gcl" in result.stderr
    assert not os.path.exists(tmp_path / "r" / "checkpoints")


@pytest.mark.slow
def test_torchrun_two_cpu_processes_pretrain(tmp_path, mixed_datasets):
    """Under DDP every trainable tensor must get a gradient each step: the unused class head is frozen."""
    import shutil

    run = tmp_path / "ddp"
    result = run_torchrun(["pretrain", "--method", "mixcl", "--data", mixed_datasets[0], "--data", mixed_datasets[1],
                           "--out", run, "--max-steps", "3", "--device", "cpu", "--set", "samples_per_class=16"]
                          + TINY_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(str(run / "events.jsonl"))
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    shutil.rmtree(run)


def test_pretraining_leaves_the_class_head_untouched(tmp_path, mixed_datasets):
    config = tiny_config(list(mixed_datasets), [], max_steps=2, batch_size=1)
    config.method = method_settings("mixcl", ["samples_per_class=16"])
    run_pretrain(config, str(tmp_path / "run"), progress=False)
    state = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.pt"))
    torch.manual_seed(config.train.seed)
    fresh = build_backbone(config.model).state_dict()
    head = [k for k in fresh if k.startswith("net.final_conv.")]
    assert head
    for key in head:
        torch.testing.assert_close(state["model"][key], fresh[key])
    assert not torch.equal(state["model"]["net.down_1.convs.conv_0.conv.weight"],
                           fresh["net.down_1.convs.conv_0.conv.weight"])


def test_identity_loss_compares_the_corresponding_cells_of_the_two_views():
    """Hand-made maps: pairs (view-1 cell, view-2 cell) pick exactly those rows, padding (-1) is dropped."""
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(2, 3, 2, 2, 1, generator=generator, dtype=torch.float64)   # B = 2, C = 3, 4 cells
    z2 = torch.randn(2, 3, 2, 2, 1, generator=generator, dtype=torch.float64)
    pairs = torch.tensor([[[0, 3, 2, -1], [1, 0, 3, -1]],
                          [[1, 2, -1, -1], [2, 2, -1, -1]]])                    # [B, 2, K]
    rows1, rows2 = mixcl.corresponding_rows(z1, z2, pairs)
    expected1 = torch.stack([z1[0, :, 0, 0, 0], z1[0, :, 1, 1, 0], z1[0, :, 1, 0, 0],
                             z1[1, :, 0, 1, 0], z1[1, :, 1, 0, 0]])
    expected2 = torch.stack([z2[0, :, 0, 1, 0], z2[0, :, 0, 0, 0], z2[0, :, 1, 1, 0],
                             z2[1, :, 1, 0, 0], z2[1, :, 1, 0, 0]])
    torch.testing.assert_close(rows1, expected1)
    torch.testing.assert_close(rows2, expected2)
    # The loss on them, by hand: C_ij = sum_m a_mi b_mj / (|a_i| |b_j|), mean on and off the diagonal.
    a, b = expected1, expected2
    correlation = (a.T @ b) / (a.norm(dim=0)[:, None] * b.norm(dim=0)[None, :])
    on = sum((1 - correlation[i, i]) ** 2 for i in range(3)) / 3
    off = sum(correlation[i, j] ** 2 for i in range(3) for j in range(3) if i != j) / 6
    loss = identity_loss(rows1, rows2, lambd=0.5, reduction="mean")
    assert float(loss) == pytest.approx(float(on + 0.5 * off), rel=1e-12)
    # Without pairs (one geometry) every cell pairs with itself.
    same1, same2 = mixcl.corresponding_rows(z1, z2, None)
    torch.testing.assert_close(same1, flatten_feature_map(z1))
    torch.testing.assert_close(same2, flatten_feature_map(z2))


def test_pair_sampler_shows_two_organs_when_the_cases_have_them(mixed_datasets):
    """organs_a labels liver and spleen: the pair shows both (one of them in both patches)."""
    sources = _sources(mixed_datasets)
    shares = {}
    for attempts in (1, 8):
        settings = dict(mixcl.DEFAULTS, samples_per_class=8, pair_attempts=attempts)
        samples = mixcl.MixCLSamples(sources, (32, 32, 16), settings, seed=1, length=40)
        good = []
        for index in range(24):
            rng = np.random.default_rng([1, index])
            _, first, second = samples.choose_cases(rng)
            _, _, (label1, label2) = samples.draw_pair(first, second, rng)
            available = samples.case_organs[first] | samples.case_organs[second]
            assert len(available) >= 2
            shown1, shown2 = mixcl.organs(label1), mixcl.organs(label2)
            good.append(bool(shown1 & shown2) and len(shown1 | shown2) >= 2)
        shares[attempts] = np.mean(good)
    assert shares[8] >= 0.9 and shares[8] > shares[1], shares
    assert mixcl.pair_shows_two_organs({1}, {1, 2}, {1, 2}) and not mixcl.pair_shows_two_organs({1}, {1}, {1, 2})
    assert mixcl.pair_shows_two_organs({1}, {1}, {1}) and not mixcl.pair_shows_two_organs({1}, {2}, {1, 2})


def test_term_gradient_norms_timing_and_warning():
    from ContrastiveSegLib.methods.term_gradients import TermGradientLog, encoder_gradient_norms, unbalanced_terms

    weight = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    other = torch.nn.Parameter(torch.tensor([1.0]))
    terms = {"big": (weight ** 2).sum() * 10, "small": weight.sum() * 0.01, "elsewhere": other.sum()}
    norms = encoder_gradient_norms(terms, [weight])
    assert norms["big"] == pytest.approx(10 * 2 * 5.0) and norms["small"] == pytest.approx(0.01 * 2 ** 0.5)
    assert norms["elsewhere"] == 0.0                     # does not reach the measured parameters
    message = unbalanced_terms({"identity": 500.0, "label": 2.0, "recon": 3.0})
    assert "identity" in message and "label" in message and "250x" in message
    assert unbalanced_terms({"identity": 50.0, "label": 1.0}) is None

    # 2 processes x batch 2 x 2 micro-batches: 8 samples a step, 4 per process.
    log = TermGradientLog(every=3, samples_per_step=8, samples_per_rank_step=4)
    first = {0: 0, 4: 0, 2: None, 8: None, 24: 3, 28: 3, 26: None}
    for index, step in first.items():
        assert log.step_to_measure({"index": torch.tensor([index, index + 1])}) == step, index
    with pytest.warns(UserWarning, match="identity"):
        log.report(0, {"identity": 500.0, "label": 2.0})
    log.count_label_gradient(True)
    log.count_label_gradient(False)
    assert log.label_gradient_share() == 0.5
