"""Fine-tuning from a checkpoint: nothing loads partially, UNETR's position embedding follows the patch,
the encoder trains at its own rate (or not at all for K steps), and all of it resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from ContrastiveSegLib.cli import main
from ContrastiveSegLib.config import ModelConfig
from ContrastiveSegLib.engine.checkpoint import (
    UNETR_POSITION_EMBEDDING,
    interpolate_position_embedding,
    load_checkpoint,
    load_pretrained_weights,
    save_checkpoint,
)
from ContrastiveSegLib.engine.events import read_events
from ContrastiveSegLib.engine.trainer import parameter_groups
from ContrastiveSegLib.errors import InputError
from ContrastiveSegLib.finetune import run_finetune
from ContrastiveSegLib.methods.supervised import SupervisedObjective
from ContrastiveSegLib.models import build_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(architecture="unet", size="tiny", patch=(32, 32, 16), classes=2) -> ModelConfig:
    return ModelConfig(architecture=architecture, size=size, out_channels=classes, patch_size=patch)


def _save(path, config: ModelConfig, state=None, seed=0) -> str:
    torch.manual_seed(seed)
    model = build_backbone(config)
    save_checkpoint(str(path), {"kind": "pretrain", "model_config": vars(config).copy(),
                                "model": state if state is not None else model.state_dict()})
    return str(path)


def test_a_tensor_of_another_shape_is_refused_with_the_list_of_tensors_and_shapes(tmp_path):
    source = build_backbone(_model()).state_dict()
    key = "net.down_2.convs.conv_0.conv.weight"
    source[key] = torch.zeros(5, 4, 3, 3, 3)   # one tensor of the encoder no longer fits
    path = _save(tmp_path / "one_off.pt", _model(), state=source)
    with pytest.raises(InputError) as caught:
        load_pretrained_weights(build_backbone(_model()), path)
    message = caught.value.format()
    assert "1 encoder tensor(s) do not fit" in message
    assert f"{key}: (5, 4, 3, 3, 3) in the checkpoint, (8, 4, 3, 3, 3) here" in message

    del source[key]
    path = _save(tmp_path / "missing.pt", _model(), state=source)
    with pytest.raises(InputError, match=f"{key}: missing in the checkpoint"):
        load_pretrained_weights(build_backbone(_model()), path)


def test_finetune_init_of_another_size_exits_2_listing_every_tensor(tmp_path, tiny_dataset, capsys):
    path = _save(tmp_path / "small.pt", _model(size="small"))
    code = main(["finetune", "--data", tiny_dataset, "--labels", "liver", "--out", str(tmp_path / "run"),
                 "--model", "unet", "--model-size", "tiny", "--patch", "32,32,16", "--spacing", "6,6,6",
                 "--max-steps", "1", "--num-workers", "0", "--init", path])
    assert code == 2
    error = capsys.readouterr().err
    assert "net.conv_0.conv_0.conv.weight: (16, 1, 3, 3, 3) in the checkpoint, (4, 1, 3, 3, 3) here" in error
    assert "net.down_4.convs.conv_1.conv.weight" in error
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_matching_tensors_load_exactly_and_the_decoder_is_reported_as_not_loaded(tmp_path):
    path = _save(tmp_path / "ok.pt", _model(), seed=1)
    target = build_backbone(_model())
    report = load_pretrained_weights(target, path)
    source = load_checkpoint(path)["model"]
    assert report.loaded and not report.interpolated
    for key in report.loaded:
        assert torch.equal(target.state_dict()[key], source[key])
    assert all("(not part of the encoder)" in entry for entry in report.not_loaded)


def test_unetr_position_embedding_follows_the_patch_and_is_reported(tmp_path):
    path = _save(tmp_path / "unetr32.pt", _model("unetr", patch=(32, 32, 32)))
    target = build_backbone(_model("unetr", patch=(64, 48, 32)))
    report = load_pretrained_weights(target, path)
    assert len(report.interpolated) == 1 and report.interpolated[0].startswith(UNETR_POSITION_EMBEDDING)
    assert "(32, 32, 32)" in report.interpolated[0] and "(64, 48, 32)" in report.interpolated[0]
    assert tuple(target.state_dict()[UNETR_POSITION_EMBEDDING].shape) == (1, 4 * 3 * 2, 48)
    assert "interpolated to this patch" in report.summary()


def test_position_embedding_interpolation_keeps_each_token_where_it_sits_in_the_patch():
    # Each source token holds the relative position (0..1) of its centre along x, y and z.
    source_patch, target_patch = (32, 48, 16), (64, 48, 32)
    source_grid = [s // 16 for s in source_patch]
    centres = [(torch.arange(n, dtype=torch.float64) + 0.5) / n for n in source_grid]
    grid = torch.stack(torch.meshgrid(*centres, indexing="ij"), dim=-1)          # [2, 3, 1, 3]
    embedding = grid.reshape(1, -1, 3)
    resized = interpolate_position_embedding(embedding, source_patch, target_patch)
    target_grid = [s // 16 for s in target_patch]
    assert tuple(resized.shape) == (1, 4 * 3 * 2, 3)
    values = resized.reshape(*target_grid, 3)
    # Linear in between the source centres, held at the outer ones (align_corners=False clamps).
    expected_x = torch.tensor([0.25, 0.375, 0.625, 0.75], dtype=torch.float64)
    torch.testing.assert_close(values[:, 1, 0, 0], expected_x)
    torch.testing.assert_close(values[2, :, 1, 1], centres[1])
    torch.testing.assert_close(values[3, 2, :, 2], torch.full((2,), 0.5, dtype=torch.float64))
    same = interpolate_position_embedding(embedding, source_patch, source_patch)
    torch.testing.assert_close(same, embedding)


def test_parameter_groups_give_the_encoder_its_own_rate():
    train = tiny_config([], ["liver"]).train
    objective = SupervisedObjective(build_backbone(_model()))
    groups, factors = parameter_groups(objective, train, encoder_lr_scale=0.1)
    encoder_names = {name for name, _ in objective.named_parameters()
                     if name.startswith(tuple("backbone." + p for p in objective.backbone.encoder_parameter_prefixes()))}
    by_id = {id(p): name for name, p in objective.named_parameters()}
    assert {by_id[id(p)] for p in groups[0]["params"]} == encoder_names
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(objective.parameters()))
    assert groups[0]["lr"] == pytest.approx(0.1 * train.lr) and groups[1]["lr"] == pytest.approx(train.lr)
    assert train.resolved_encoder_lr_scale(True) == 0.1 and train.resolved_encoder_lr_scale(False) == 1.0
    train.encoder_lr_scale = 0.5
    assert train.resolved_encoder_lr_scale(True) == 0.5
    train.freeze_encoder_steps = 2
    _, factors = parameter_groups(objective, train, encoder_lr_scale=0.5)
    assert [factors[0](step) for step in range(2)] == [0.0, 0.0] and factors[0](2) == factors[1](2) > 0


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory, tiny_dataset) -> str:
    run = tmp_path_factory.mktemp("init") / "source"
    run_finetune(tiny_config([tiny_dataset], ["liver"], max_steps=1), str(run), progress=False)
    return str(run / "checkpoints" / "last.pt")


def _encoder(state, backbone_prefixes=("net.conv_0.", "net.down_")):
    return {k: v for k, v in state.items() if k.startswith(backbone_prefixes)}


def test_init_trains_the_encoder_at_a_tenth_of_the_rate_by_default(tmp_path, tiny_dataset, source_checkpoint):
    config = tiny_config([tiny_dataset], ["liver", "spleen"], max_steps=2, warmup_steps=0)
    config.init_checkpoint = source_checkpoint
    run_finetune(config, str(tmp_path / "run"), progress=False)
    steps = [e for e in read_events(str(tmp_path / "run" / "events.jsonl")) if e["event"] == "step"]
    assert steps[0]["lr"] == pytest.approx(3e-3) and steps[0]["encoder_lr"] == pytest.approx(3e-4)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["encoder_lr_scale"] == 0.1

    scratch = tiny_config([tiny_dataset], ["liver", "spleen"], max_steps=1)
    run_finetune(scratch, str(tmp_path / "scratch"), progress=False)
    step = [e for e in read_events(str(tmp_path / "scratch" / "events.jsonl")) if e["event"] == "step"][0]
    assert step["encoder_lr"] == step["lr"]


def test_a_frozen_encoder_stays_fixed_for_k_steps_then_trains(tmp_path, tiny_dataset, source_checkpoint):
    initial = _encoder(load_checkpoint(source_checkpoint)["model"])

    def run(steps, name):
        config = tiny_config([tiny_dataset], ["liver", "spleen"], max_steps=steps, freeze_encoder_steps=2)
        config.init_checkpoint = source_checkpoint
        run_finetune(config, str(tmp_path / name), progress=False)
        state = load_checkpoint(str(tmp_path / name / "checkpoints" / "last.pt"))["model"]
        events = [e for e in read_events(str(tmp_path / name / "events.jsonl")) if e["event"] == "step"]
        return state, events

    frozen, events = run(2, "frozen")
    assert [e["encoder_lr"] for e in events] == [0.0, 0.0] and all(e["lr"] > 0 for e in events)
    for key, value in _encoder(frozen).items():
        assert torch.equal(value, initial[key]), key
    torch.manual_seed(0)  # the run's seed: its decoder started from these weights
    assert not torch.equal(frozen["net.final_conv.weight"],
                           build_backbone(_model(classes=3)).state_dict()["net.final_conv.weight"])

    thawed, events = run(3, "thawed")
    assert events[2]["encoder_lr"] > 0
    assert any(not torch.equal(value, initial[key]) for key, value in _encoder(thawed).items())


def test_stop_and_resume_across_the_unfreezing_is_exact(tmp_path, tiny_dataset, source_checkpoint):
    def config():
        c = tiny_config([tiny_dataset], ["liver", "spleen"], max_steps=4, freeze_encoder_steps=3,
                        encoder_lr_scale=0.3)
        c.init_checkpoint = source_checkpoint
        return c

    run_finetune(config(), str(tmp_path / "straight"), progress=False)
    stopped = tmp_path / "stopped"

    def stop(event):
        if event["event"] == "step" and event["step"] == 2:
            (stopped / "STOP").write_text("")

    assert run_finetune(config(), str(stopped), listeners=[stop], progress=False)["step"] == 2
    assert run_finetune(config(), str(stopped), resume=True, progress=False)["step"] == 4
    straight = load_checkpoint(str(tmp_path / "straight" / "checkpoints" / "last.pt"))
    resumed = load_checkpoint(str(stopped / "checkpoints" / "last.pt"))
    for key in straight["model"]:
        torch.testing.assert_close(straight["model"][key], resumed["model"][key], rtol=1e-5, atol=1e-6, msg=key)
    groups = resumed["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["encoder", "rest"]
    assert groups[0]["initial_lr"] == pytest.approx(0.3 * groups[1]["initial_lr"])
    assert [g["lr"] for g in groups] == [g["lr"] for g in straight["optimizer"]["param_groups"]]
