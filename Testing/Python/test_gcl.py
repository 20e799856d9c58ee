"""GCL pre-training: meta labels, the Gradient Mitigator's surgery, the Gradient Filter's pixel loss,
and the pretrain -> finetune path."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import (
    ONE_THREAD,
    TINY_ARGS,
    assert_pretrain_stop_and_resume_match,
    run_cli,
    run_torchrun,
    tiny_config,
    write_dataset,
)

from ContrastiveSegLib.config import ModelConfig
from ContrastiveSegLib.data.meta_labels import MISSING, MetaLabels, position_bin
from ContrastiveSegLib.data.preprocess import PreparedCase
from ContrastiveSegLib.data.sources import PretrainSources, SourceCase
from ContrastiveSegLib.engine.checkpoint import load_checkpoint
from ContrastiveSegLib.engine.events import read_events
from ContrastiveSegLib.errors import InputError
from ContrastiveSegLib.finetune import run_finetune
from ContrastiveSegLib.losses import pcgrad, position_variance_loss
from ContrastiveSegLib.methods import gcl
from ContrastiveSegLib.models import build_backbone
from ContrastiveSegLib.pretrain import method_settings, run_pretrain

NO_BATCH_ONE = [a for a in TINY_ARGS if a not in ("--batch-size", "1")]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- meta labels --------------------------------------------------------------------------------------

def _fake_sources(attributes=None):
    """Two datasets, three cases; case 2 has a body extent of slices 10..49."""
    attributes = attributes or {}
    ids = ["dsA/c1", "dsA/c2", "dsB/c1"]
    cases = []
    for index, case_id in enumerate(ids):
        prepared = PreparedCase(case_id, np.zeros((1, 4, 4, 60), np.float32), np.zeros((1, 4, 4, 60), np.uint8),
                                np.eye(4))
        cases.append(SourceCase(prepared, 0 if case_id.startswith("dsA") else 1, index,
                                dict(attributes.get(case_id, {})), (10, 49) if index == 2 else (0, 59)))
    return PretrainSources(["dsA", "dsB"], ["liver"], cases, [[0, 1], [2]])


def test_position_bins_cut_the_body_extent_into_equal_slabs():
    # 40 slices, 4 partitions: slices 10..19 -> 0, 20..29 -> 1, 30..39 -> 2, 40..49 -> 3.
    assert [position_bin(z, (10, 49), 4) for z in (10, 19, 20, 29, 30, 39, 40, 49)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert position_bin(3, (10, 49), 4) == 0 and position_bin(70, (10, 49), 4) == 3   # outside: nearest slab
    assert position_bin(5, (0, 9), 2) == 1 and position_bin(4, (0, 9), 2) == 0
    assert position_bin(7, (7, 7), 4) == 0


def test_meta_label_ids_from_builtins_csv_and_dataset_json(tmp_path):
    csv_path = tmp_path / "meta.csv"
    # The full id and the bare case name both match; an empty cell and a missing row mean "no value".
    csv_path.write_text("Case,phase,scanner\ndsA/c1,venous,x\nc2,arterial,\nunknown_case,venous,y\n")
    sources = _fake_sources({"dsB/c1": {"site": "north"}})
    with pytest.warns(UserWarning) as caught:
        meta = MetaLabels(sources, ["dataset", "case", "position", "phase", "scanner", "site"], 4, str(csv_path))
    text = " ".join(str(w.message) for w in caught)
    assert "1 of 3 pre-training case(s) have no row (dsB/c1)" in text and "never a positive" in text
    assert "unknown_case" in text
    assert meta.vocabularies[3] == ["arterial", "venous"] and meta.vocabularies[4] == ["x"]
    assert meta.ids(0, 0).tolist() == [0, 0, 0, 1, 0, MISSING]
    assert meta.ids(1, 59).tolist() == [0, 1, 3, 0, MISSING, MISSING]
    assert meta.ids(2, 25).tolist() == [1, 2, 1, MISSING, MISSING, 0]       # (25 - 10) * 4 / 40 = 1.5 -> bin 1
    assert "phase: 2 value(s), 1 case(s) without a value" in meta.describe()


def test_meta_label_errors_say_which_file_what_and_what_to_do(tmp_path):
    sources = _fake_sources()
    with pytest.raises(InputError, match="does not exist") as error:
        MetaLabels(sources, ["phase"], 4, str(tmp_path / "nope.csv"))
    assert "nope.csv" in str(error.value) and "What to do" in str(error.value)
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_name,phase\nc1,venous\n")
    with pytest.raises(InputError, match="has no column naming the case") as error:
        MetaLabels(sources, ["phase"], 4, str(bad))
    assert "patient_name, phase" in str(error.value) and "'case'" in str(error.value)
    good = tmp_path / "good.csv"
    good.write_text("case,phase\ndsA/c1,venous\n")
    with pytest.raises(InputError, match="unknown meta label name.*: phse") as error:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            MetaLabels(sources, ["dataset", "phse"], 4, str(good))
    assert "dataset, case, position, phase" in str(error.value)
    with pytest.raises(InputError, match="unknown meta label name"):
        MetaLabels(sources, ["phase"], 4, None)
    ambiguous = tmp_path / "ambiguous.csv"
    ambiguous.write_text("case,phase\nc1,venous\n")
    with pytest.raises(InputError, match="'c1' is ambiguous: it names dsA/c1, dsB/c1") as error:
        MetaLabels(sources, ["phase"], 4, str(ambiguous))
    assert "<dataset>/<case>" in str(error.value)
    with pytest.raises(InputError, match="named twice"):
        MetaLabels(sources, ["case", "case"])
    with pytest.raises(InputError, match="at least 2 patches"):
        gcl.check_settings(dict(gcl.DEFAULTS), batch_size=1)
    with pytest.raises(InputError, match="keep_fraction"):
        gcl.check_settings(dict(gcl.DEFAULTS, keep_fraction=0.0), batch_size=2)


def test_settings_come_from_the_command_line_options():
    settings = method_settings("gcl", ["keep_fraction=0.5", "image_head_dims=[64,16]"], mitigator="param",
                               meta_labels=["case", "phase"], meta_csv="meta.csv")
    assert settings["keep_fraction"] == 0.5 and settings["image_head_dims"] == [64, 16]
    config = tiny_config([], [])
    config.method = method_settings("gcl", ["image_head_dims=32,8"])
    assert gcl.method_settings_of(config)["image_head_dims"] == [32, 8] == config.method["image_head_dims"]
    assert settings["mitigator"] == "param" and settings["meta_labels"] == ["case", "phase"]
    assert settings["meta_csv"] == "meta.csv" and settings["pixel_level"] == "enc3"


# --- Gradient Filter: the pixel loss ------------------------------------------------------------------

def test_pixel_loss_on_a_hand_computed_example():
    f1 = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)   # B = 2 patches, N = 1 location
    f2 = f1.clone()
    share = torch.ones(2, 2, dtype=torch.bool)
    weights = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    # Each anchor: positive cos 1, one negative cos 0 with weight 0.5 -> -log(e / (e + 0.5)).
    loss = gcl.gcl_pixel_loss(f1, f2, share, weights, tau=1.0, keep_fraction=1.0)
    assert float(loss) == pytest.approx(math.log(1 + 0.5 / math.e), abs=1e-12)
    # q = 0.5 of 2 candidates keeps only the positive: nothing left to push apart.
    assert float(gcl.gcl_pixel_loss(f1, f2, share, weights, 1.0, 0.5)) == pytest.approx(0.0, abs=1e-12)
    # Patches that do not share the meta label are no negatives of each other.
    assert float(gcl.gcl_pixel_loss(f1, f2, torch.eye(2, dtype=torch.bool), weights, 1.0, 1.0)) == pytest.approx(0.0)
    # The image branch finds them unrelated (weight 0): the negative counts for nothing.
    zero = torch.eye(2, dtype=torch.float64)
    assert float(gcl.gcl_pixel_loss(f1, f2, share, zero, 1.0, 1.0)) == pytest.approx(0.0, abs=1e-12)


def _reference_pixel_loss(f1, f2, share, weights, tau, q):
    """The rule of docs/gcl.md written out anchor by anchor with Python floats."""
    batch, count, _ = f1.shape
    a = torch.nn.functional.normalize(f1, dim=-1).tolist()
    b = torch.nn.functional.normalize(f2, dim=-1).tolist()
    terms = []
    for anchors, candidates in ((a, b), (b, a)):
        for p in range(batch):
            for n in range(count):
                pairs = []   # (weight, logit, is_positive)
                for p2 in range(batch):
                    if not share[p][p2]:
                        continue
                    for n2 in range(count):
                        s = sum(x * y for x, y in zip(anchors[p][n], candidates[p2][n2])) / tau
                        positive = p2 == p and n2 == n
                        pairs.append((1.0 if positive else weights[p][p2], s, positive))
                z = sum(w * math.exp(s) for w, s, _ in pairs)
                scores = [abs(w * math.exp(s) / z - (1.0 if pos else 0.0)) for w, s, pos in pairs]
                budget = max(math.ceil(q * len(pairs) - 1e-9), 1)
                negatives = sorted((i for i, pair in enumerate(pairs) if not pair[2]), key=lambda i: -scores[i])
                kept = negatives[:budget - 1]
                s_pos = next(s for _, s, pos in pairs if pos)
                denominator = math.exp(s_pos) + sum(pairs[i][0] * math.exp(pairs[i][1]) for i in kept)
                terms.append(-math.log(math.exp(s_pos) / denominator))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("q", [0.25, 0.5, 1.0])
def test_pixel_loss_keeps_the_largest_gradients_weighted_by_image_similarity(q):
    generator = torch.Generator().manual_seed(3)
    f1 = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    f2 = f1 + 0.3 * torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    share = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    weights = torch.tensor([[1.0, 0.7, 0.2], [0.7, 1.0, 0.0], [0.2, 0.0, 1.0]], dtype=torch.float64)
    got = gcl.gcl_pixel_loss(f1, f2, share, weights, tau=0.5, keep_fraction=q)
    assert float(got) == pytest.approx(_reference_pixel_loss(f1, f2, share.tolist(), weights.tolist(), 0.5, q),
                                       rel=1e-10)


# --- Gradient Mitigator: the surrogate's gradients against a direct computation --------------------

PATCH = (32, 32, 16)


def _objective(mitigator, meta_names=("dataset", "case", "position"), **overrides):
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(architecture="unet", size="tiny", out_channels=3, patch_size=PATCH))
    # The variance floor is off unless a test asks for it: the mitigator tests compare against the tasks alone.
    overrides = {"position_weight": 0.0, **overrides}
    settings = dict(gcl.DEFAULTS, mitigator=mitigator, image_head_dims=[16, 8], pixels_per_patch=16, **overrides)
    return gcl.GCLObjective(backbone, settings, list(meta_names), seed=5)


def _batch(meta, grid_voxels=8 * 8 * 4):
    generator = torch.Generator().manual_seed(1)
    meta = torch.tensor(meta, dtype=torch.int64)
    size = meta.shape[0]
    view1 = torch.rand(size, 1, *PATCH, generator=generator)
    return {"view1": view1, "view2": view1 + 0.05 * torch.randn(view1.shape, generator=generator),
            "meta": meta, "pixels": torch.randint(0, grid_voxels, (size, 16), generator=generator),
            "index": torch.arange(6, 6 + size)}


# Three meta labels that pull four patches three incompatible ways (plus one missing value).  At
# initialisation the pixel branch's gradients dominate and rarely conflict; the mitigator tests give
# it a small weight so the image branch's conflicts show and the surgery has work to do.
CONTRADICTING = [[0, 0, 0], [0, 1, -1], [1, 0, 1], [1, 1, 0]]


def _assert_all_close(actual: dict, expected: dict, what: str = ""):
    """Float32 agreement up to summation order, relative to the largest gradient of all.

    (Gradients that are zero in exact arithmetic, e.g. a convolution bias before
    instance norm, come out as rounding noise: a per-tensor scale would be wrong.)
    """
    scale = max(float(value.abs().max()) for value in expected.values())
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=1e-5 * scale, msg=f"{what} {name}")


def _surrogate_grads(objective, batch):
    objective.zero_grad(set_to_none=True)
    loss, logs = objective(batch)
    loss.backward()
    return loss, logs, {name: p.grad for name, p in objective.named_parameters()}


def _head_and_encoder(objective):
    heads = {f"image_head.{n}": p for n, p in objective.image_head.named_parameters()}
    heads.update({f"pixel_head.{n}": p for n, p in objective.pixel_head.named_parameters()})
    prefixes = tuple(objective.backbone.encoder_parameter_prefixes())
    encoder = {f"backbone.{n}": p for n, p in objective.backbone.named_parameters() if n.startswith(prefixes)}
    return heads, encoder


def _plain_head_grads(objective, losses, heads):
    grads = [torch.autograd.grad(loss, list(heads.values()), retain_graph=True) for loss in losses]
    return {name: sum(g[i] for g in grads) for i, name in enumerate(heads)}


@pytest.mark.parametrize("pixel_level", ["enc3", "bottleneck"])
def test_feature_mode_is_per_sample_pcgrad_on_the_heads_inputs_then_one_backward(pixel_level):
    objective = _objective("feature", pixel_level=pixel_level, pixel_weight=0.01)
    batch = _batch(CONTRADICTING, 8 * 8 * 4 if pixel_level == "enc3" else 2 * 2 * 1)
    loss, logs, got = _surrogate_grads(objective, batch)
    heads, encoder = _head_and_encoder(objective)

    # Direct: task gradients on copies of the levels the heads read, PCGrad sample by sample
    # (a sample = one patch, both its views), then the combined gradient pushed through the encoder.
    levels = objective.backbone.encode(torch.cat([batch["view1"], batch["view2"]]))
    used = sorted({2 if pixel_level == "enc3" else 4, 4})
    inputs = [levels[i].clone() for i in used]
    losses, _ = objective.task_losses(inputs, batch)
    assert float(loss.detach()) == pytest.approx(float(sum(losses).detach()), rel=1e-6)
    task_grads = [torch.autograd.grad(L, inputs, retain_graph=True) for L in losses]
    size = batch["view1"].shape[0]
    combined = [torch.zeros_like(h) for h in inputs]
    for b in range(size):
        vectors = [torch.cat([torch.cat([g[b].reshape(-1), g[size + b].reshape(-1)]) for g in grads])
                   for grads in task_grads]
        merged = pcgrad(vectors, objective.order_generator(batch))
        offset = 0
        for t, h in enumerate(inputs):
            width = h[0].numel()
            combined[t][b] = merged[offset:offset + width].reshape(h[0].shape)
            combined[t][size + b] = merged[offset + width:offset + 2 * width].reshape(h[0].shape)
            offset += 2 * width
    expected = dict(zip(encoder, torch.autograd.grad([levels[i] for i in used], list(encoder.values()),
                                                     grad_outputs=combined, retain_graph=True)))
    expected.update(_plain_head_grads(objective, losses, heads))

    assert logs["conflicts"] > 0   # the surgery did something
    _assert_all_close(got, expected)
    plain = _objective("off", pixel_level=pixel_level, pixel_weight=0.01)
    _, _, off = _surrogate_grads(plain, batch)
    assert any(not torch.allclose(got[n], off[n]) for n in encoder)
    decoder = [n for n in got if n.startswith("backbone.net.upcat") or n.startswith("backbone.net.final")]
    assert decoder and all(got[n] is None for n in decoder)


def test_param_mode_is_pcgrad_on_the_encoder_parameters():
    objective = _objective("param", pixel_weight=0.01)
    batch = _batch(CONTRADICTING)
    loss, logs, got = _surrogate_grads(objective, batch)
    heads, encoder = _head_and_encoder(objective)
    losses, _ = objective.task_losses(objective.shared_outputs(batch), batch)
    assert float(loss.detach()) == pytest.approx(float(sum(losses).detach()), rel=1e-6)
    flat = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(L, list(encoder.values()), retain_graph=True)])
            for L in losses]
    merged = pcgrad(flat, objective.order_generator(batch))
    offset, expected = 0, {}
    assert logs["conflicts"] > 0
    for name, p in encoder.items():
        expected[name] = merged[offset:offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    _assert_all_close(got, expected, "encoder")
    _assert_all_close(got, _plain_head_grads(objective, losses, heads), "heads")


@pytest.mark.parametrize("mitigator", ["feature", "off"])
def test_position_floor_is_added_after_the_surgery(mitigator):
    """Gradient = the mitigator's gradient without the floor + weight x the floor's own gradient."""
    batch = _batch(CONTRADICTING)
    _, _, without = _surrogate_grads(_objective(mitigator, pixel_weight=0.01), batch)
    objective = _objective(mitigator, pixel_weight=0.01, position_weight=0.5, position_levels=["enc4", "bottleneck"])
    loss, logs, got = _surrogate_grads(objective, batch)
    levels = objective.backbone.encode(torch.cat([batch["view1"], batch["view2"]]))
    floor = (position_variance_loss(levels[3]) + position_variance_loss(levels[4])) / 2
    assert logs["position"] == pytest.approx(float(floor), rel=1e-4) and float(floor) > 0
    params = dict(objective.named_parameters())
    names = [n for n in params if got[n] is not None]
    extra = torch.autograd.grad(0.5 * floor, [params[n] for n in names], allow_unused=True)
    expected = {n: (without[n] if without[n] is not None else 0) + (e if e is not None else 0)
                for n, e in zip(names, extra)}
    _assert_all_close({n: got[n] for n in names}, expected)
    assert any(e is not None and float(e.abs().sum()) > 0 for e in extra)   # the floor reaches the encoder
    from ContrastiveSegLib.errors import InputError

    with pytest.raises(InputError, match="unknown level"):
        gcl.check_settings(dict(gcl.DEFAULTS, position_levels=["enc9"]), 2)


def test_off_and_a_single_meta_label_give_the_plain_sum():
    batch = _batch(CONTRADICTING)
    objective = _objective("off")
    loss, logs, got = _surrogate_grads(objective, batch)
    losses, _ = objective.task_losses(objective.shared_outputs(batch), batch)
    params = dict(objective.named_parameters())
    trained = [n for n in params if got[n] is not None]
    plain = torch.autograd.grad(sum(losses), [params[n] for n in trained])
    _assert_all_close(got, dict(zip(trained, plain)))
    assert logs["conflicts"] == 0.0 and {"img_case", "pix_case", "L_position", "kept_pairs"} <= set(logs)

    single = _batch([row[:1] for row in CONTRADICTING])
    reference = _surrogate_grads(_objective("off", ["dataset"]), single)[2]
    for mode in ("feature", "param"):
        result = _surrogate_grads(_objective(mode, ["dataset"]), single)[2]
        _assert_all_close(result, {n: v for n, v in reference.items() if v is not None}, mode)


# --- samples and the command line ----------------------------------------------------------------------

def _relabel(label: sitk.Image, mapping: dict) -> sitk.Image:
    array = sitk.GetArrayFromImage(label)
    out = np.zeros_like(array)
    for old, new in mapping.items():
        out[array == old] = new
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(label)
    return image


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, sample_pieces, sample_label_map):
    """``organs_a`` (liver, spleen; two cases) and ``organs_b`` (stomach, liver under other numbers; one case)."""
    root = tmp_path_factory.mktemp("gcl")
    value = {name: next(int(v) for v, n in sample_label_map.items() if n == name)
             for name in ("liver", "spleen", "stomach")}
    a = write_dataset(str(root / "organs_a"),
                      {k: (sample_pieces[k][0], _relabel(sample_pieces[k][1], {value["liver"]: 1, value["spleen"]: 2}))
                       for k in ("upper", "lower")},
                      {"0": "background", "1": "liver", "2": "spleen"})
    image, label = sample_pieces["right"]
    b = write_dataset(str(root / "organs_b"),
                      {"right": (image, _relabel(label, {value["stomach"]: 1, value["liver"]: 2}))},
                      {"0": "background", "1": "stomach", "2": "liver"})
    csv_path = root / "meta.csv"
    csv_path.write_text("case,phase\norgans_a/upper,venous\nlower,arterial\norgans_b/right,venous\n")
    return a, b, str(csv_path)


def test_samples_are_reproducible_grouped_and_shaped(two_datasets):
    from ContrastiveSegLib.data.catalog import load_datasets
    from ContrastiveSegLib.data.preprocess import CasePreparer
    from ContrastiveSegLib.data.sources import prepare_sources, vocabulary

    config = tiny_config(two_datasets[:2], [], batch_size=2)
    loaded = load_datasets(config.data.datasets)
    sources = prepare_sources(loaded, CasePreparer(config.preprocess, vocabulary(loaded), pad_to=PATCH),
                              progress=False)
    settings = dict(gcl.DEFAULTS, pixels_per_patch=16, spatial_prob=0.0)
    meta = MetaLabels(sources, ["dataset", "case", "position"], 4)
    samples = gcl.GCLSamples(sources, meta, PATCH, settings, seed=3, length=400, batch_size=2)
    item = samples[5]
    assert item["view1"].shape == (1, *PATCH) and item["view2"].shape == (1, *PATCH)
    assert item["meta"].dtype == torch.int64 and item["meta"].shape == (3,)
    assert item["pixels"].shape == (16,) and int(item["pixels"].max()) < 8 * 8 * 4 and int(item["index"]) == 5
    assert len(set(item["pixels"].tolist())) == 16          # distinct locations
    again = samples[5]
    for key in item:
        assert torch.equal(item[key], again[key]), key
    # The first sample of a micro-batch always takes the group's case; the second about half of the time.
    same = sum(int(samples[2 * g]["meta"][1] == samples[2 * g + 1]["meta"][1]) for g in range(40))
    assert 14 <= same <= 36
    # Each view has its own geometry: the pixel pairs are corresponding cells, mostly at different indices;
    # with the shared geometry every location is its own partner.
    assert item["pixels2"].shape == (16,) and (item["pixels"] != item["pixels2"]).float().mean() > 0.5
    shared = gcl.GCLSamples(sources, meta, PATCH, dict(settings, view_geometry="shared"), seed=3, length=400,
                            batch_size=2)[5]
    assert torch.equal(shared["pixels"], shared["pixels2"])


def test_pixel_branch_compares_the_corresponding_cells_of_view_2(monkeypatch):
    """The pixel InfoNCE gets view 1 at ``pixels`` and view 2 at ``pixels2`` (its corresponding cells)."""
    batch = _batch(CONTRADICTING)
    generator = torch.Generator().manual_seed(9)
    batch["pixels2"] = torch.randint(0, 8 * 8 * 4, batch["pixels"].shape, generator=generator)
    objective = _objective("off")
    seen = []
    original = gcl.gcl_pixel_loss

    def spy(f1, f2, *args, **kwargs):
        seen.append((f1.detach(), f2.detach()))
        return original(f1, f2, *args, **kwargs)

    monkeypatch.setattr(gcl, "gcl_pixel_loss", spy)
    shared = objective.shared_outputs(batch)
    objective.task_losses(shared, batch)
    projected = objective.pixel_head(dict(zip(objective.shared_levels, shared))[objective.pixel_index]).flatten(2)
    size = batch["view1"].shape[0]
    for b in range(size):
        torch.testing.assert_close(seen[0][0][b], projected[b][:, batch["pixels"][b]].T)
        torch.testing.assert_close(seen[0][1][b], projected[size + b][:, batch["pixels2"][b]].T)


def test_pretrain_gcl_then_finetune_from_it(tmp_path, two_datasets, tiny_dataset):
    a, b, csv_path = two_datasets
    run = tmp_path / "pretrain"
    result = run_cli(["pretrain", "--method", "gcl", "--data", a, "--data", b, "--out", run, "--max-steps", "3",
                      "--batch-size", "2", "--meta-csv", csv_path, "--meta-labels", "dataset,case,position,phase",
                      "--set", "pixels_per_patch=16", "--set", "image_head_dims=32,16"] + NO_BATCH_ONE, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    state = load_checkpoint(str(run / "checkpoints" / "last.pt"))
    assert state["kind"] == "pretrain" and state["step"] == 3
    assert any(k.startswith("image_head.") for k in state["extra"]) and any(k.startswith("pixel_head.")
                                                                            for k in state["extra"])
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert config["method"]["name"] == "gcl" and config["method"]["mitigator"] == "feature"
    assert config["method"]["meta_labels"] == ["dataset", "case", "position", "phase"]
    steps = [e for e in read_events(str(run / "events.jsonl")) if e["event"] == "step"]
    assert len(steps) == 3 and all(np.isfinite(e["loss"]) for e in steps)
    assert {"img_dataset", "pix_phase", "L_case", "conflicts", "kept_pairs"} <= set(steps[-1]["losses"])

    tuned = tmp_path / "finetune"
    config = tiny_config([tiny_dataset], ["liver", "spleen"], max_steps=1)
    config.init_checkpoint = str(run / "checkpoints" / "last.pt")
    run_finetune(config, str(tuned), progress=False)
    report = json.loads((tuned / "init_report.json").read_text(encoding="utf-8"))
    assert report["loaded"] and all(k.startswith(("net.conv_0.", "net.down_")) for k in report["loaded"])


@pytest.mark.slow
@pytest.mark.parametrize("mitigator", ["feature", "param"])
def test_torchrun_two_cpu_processes_gcl(tmp_path, two_datasets, mitigator):
    """Both mitigator modes take task gradients inside forward; under DDP every rank must still agree."""
    a, b, csv_path = two_datasets
    run = tmp_path / "ddp"
    result = run_torchrun(["pretrain", "--method", "gcl", "--data", a, "--data", b, "--out", run, "--max-steps", "2",
                           "--batch-size", "2", "--meta-csv", csv_path, "--mitigator", mitigator, "--device", "cpu",
                           "--set", "pixels_per_patch=16", "--set", "image_head_dims=32,16"] + NO_BATCH_ONE)
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(str(run / "events.jsonl"))
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2] and all(np.isfinite(e["loss"]) for e in steps)
    assert load_checkpoint(str(run / "checkpoints" / "last.pt"))["step"] == 2


def test_pretrain_gcl_bad_input_is_reported(tmp_path, two_datasets):
    a, _, csv_path = two_datasets
    result = run_cli(["pretrain", "--method", "gcl", "--data", a, "--out", tmp_path / "r1"] + TINY_ARGS, env=ONE_THREAD)
    assert result.returncode == 2 and "at least 2 patches" in result.stderr and "--batch-size" in result.stderr
    config = tiny_config([a], [], max_steps=1, batch_size=2)
    config.method = method_settings("gcl", meta_csv=csv_path, meta_labels=["case", "contrast"])
    with pytest.raises(InputError, match=r"unknown meta label name\(s\): contrast") as error:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the CSV also names a case of the other dataset
            run_pretrain(config, str(tmp_path / "r2"), progress=False)
    assert "phase" in str(error.value)


def test_pretrain_gcl_stop_and_resume_continue_exactly(tmp_path, two_datasets):
    def config():
        c = tiny_config(list(two_datasets[:2]), [], max_steps=3, batch_size=2)
        c.data.cache_dir = str(tmp_path / "cache")
        c.method = method_settings("gcl", ["pixels_per_patch=8", "image_head_dims=16,8", "spatial_prob=0.0"])
        return c

    assert_pretrain_stop_and_resume_match(config, tmp_path, total_steps=3)
