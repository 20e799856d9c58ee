"""``--recipe``: one choice that sets the measured few-label settings; flags given with it win."""

from __future__ import annotations

import pytest

from ContrastiveSegLib.cli import _training_config, build_parser
from ContrastiveSegLib.config import TrainConfig
from ContrastiveSegLib.recipes import apply_recipe

FINETUNE = ["finetune", "--data", "x", "--labels", "liver", "--out", "y"]
RECIPE_FIELDS = ("augmentation", "hollow_organ_gas_prob", "vessel_contrast_prob", "foreground_ratio", "lr",
                 "warmup_steps")


def _train(args, command="finetune"):
    return _training_config(build_parser().parse_args(args), command).train


def test_without_a_recipe_every_setting_is_the_engines_default():
    train, defaults = _train(FINETUNE + ["--model", "unet"]), TrainConfig()
    for name in RECIPE_FIELDS:
        assert getattr(train, name) == getattr(defaults, name), name


def test_few_label_sets_the_demos_recipe_for_the_light_unet():
    from ContrastiveSegLib.demo import demo_config

    train = _train(FINETUNE + ["--recipe", "few-label", "--model", "unet"])
    assert (train.augmentation, train.hollow_organ_gas_prob, train.vessel_contrast_prob) == ("spatial", 0.5, 0.5)
    assert (train.foreground_ratio, train.lr, train.warmup_steps) == (0.8, 3e-3, 20)
    demo = demo_config(quick=False, device="cpu").train  # the demo trains the same recipe
    for name in RECIPE_FIELDS:
        assert getattr(train, name) == getattr(demo, name), name


def test_unetr_keeps_its_learning_rate_under_the_recipe():
    train = _train(FINETUNE + ["--recipe", "few-label", "--model", "unetr"])
    assert train.augmentation == "spatial" and train.lr == 1e-4 and train.warmup_steps == 0


def test_flags_given_with_the_recipe_win():
    train = _train(FINETUNE + ["--recipe", "few-label", "--model", "unet", "--lr", "1e-3", "--warmup-steps", "0",
                               "--augmentation", "intensity", "--vessel-contrast-prob", "0"])
    assert (train.lr, train.warmup_steps, train.augmentation, train.vessel_contrast_prob) == (1e-3, 0, "intensity", 0.0)
    assert train.hollow_organ_gas_prob == 0.5  # not given: the recipe's


@pytest.mark.parametrize("args, command", [
    (["selftrain", "--labeled", "x", "--unlabeled", "u", "--labels", "liver", "--out", "y"], "selftrain"),
])
def test_selftrain_takes_the_recipe(args, command):
    train = _train(args + ["--recipe", "few-label", "--model", "unet"], command)
    assert train.augmentation == "spatial" and train.lr == 3e-3


def test_an_unknown_recipe_is_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(FINETUNE + ["--recipe", "best"])
    from ContrastiveSegLib.config import RunConfig

    with pytest.raises(ValueError, match="unknown recipe"):
        apply_recipe(RunConfig(), "best")


def test_the_recipes_hu_augmentations_are_left_out_for_mr():
    train = _train(FINETUNE + ["--recipe", "few-label", "--model", "unet", "--intensity", "percentile"])
    assert train.augmentation == "spatial" and train.lr == 3e-3
    assert train.hollow_organ_gas_prob == 0.0 and train.vessel_contrast_prob == 0.0  # CT's air and HU only


def test_few_label_finetunes_a_pretrained_encoder_at_the_full_rate():
    # Section 23 of docs/few-label-accuracy.md: at finetune's 0.1 x lr the recipe's pre-trained starts scored lower.
    from ContrastiveSegLib.config import RunConfig

    train = _train(FINETUNE + ["--recipe", "few-label", "--model", "unet", "--init", "ckpt.pt"])
    assert train.encoder_lr_scale == 1.0 and train.resolved_encoder_lr_scale(True) == 1.0
    plain = _train(FINETUNE + ["--model", "unet", "--init", "ckpt.pt"])
    assert plain.encoder_lr_scale is None and plain.resolved_encoder_lr_scale(True) == 0.1   # without the recipe
    given = _train(FINETUNE + ["--recipe", "few-label", "--model", "unet", "--encoder-lr-scale", "0.1"])
    assert given.encoder_lr_scale == 0.1   # a flag given with the recipe wins
    unetr = _train(FINETUNE + ["--recipe", "few-label", "--model", "unetr", "--init", "ckpt.pt"])
    assert unetr.resolved_encoder_lr_scale(True) == 0.1   # measured on the light U-Net only
    rounds = _train(["selftrain", "--labeled", "x", "--unlabeled", "u", "--labels", "liver", "--out", "y",
                     "--recipe", "few-label", "--model", "unet", "--init", "ckpt.pt"], "selftrain")
    assert rounds.resolved_encoder_lr_scale(True) == 0.1   # self-training rounds were not measured at 1.0
    config = RunConfig(command="finetune")
    config.model.architecture = "unet"
    apply_recipe(config, "few-label")
    assert config.train.encoder_lr_scale == 1.0
