"""Named training recipes: settings that were measured together, chosen as one (``--recipe``).

``few-label`` is what made one labelled CT scan give the best measured Dice on a patient the network never
saw (docs/few-label-accuracy.md, sections 9-13; the demo trains it): the spatial augmentation, gas in hollow
organs and contrast in vessels (each with probability 0.5; CT only: they work in HU and on CT's air),
patches centred on an organ 80 % of the time, and, for the light U-Net, a learning rate of 3e-3 with 20
warm-up steps (in fine-tuning, for a pre-trained encoder too).  UNETR keeps the engine's 1e-4: the higher
rate was measured on the light U-Net only.  The number of steps is not part of it (800 on the demo's 3 mm
grid); explicit flags given with ``--recipe`` win over it.
"""

from __future__ import annotations

from .config import RunConfig

RECIPES = ("none", "few-label")


def apply_recipe(config: RunConfig, name: str) -> None:
    """Set ``config``'s training to recipe ``name`` (``none`` changes nothing); needs the model and the
    intensity normalisation chosen."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: one of {', '.join(RECIPES)}")
    if name == "none":
        return
    train = config.train
    train.augmentation = "spatial"
    train.foreground_ratio = 0.8
    if config.preprocess.is_ct():
        train.hollow_organ_gas_prob = 0.5
        train.vessel_contrast_prob = 0.5
    if config.model.architecture == "unet":
        # A small network on one scan: a higher rate than fine-tuning's 1e-4.
        train.lr = 3e-3
        train.warmup_steps = 20
        if config.command == "finetune":
            # A pre-trained (--init) encoder at the full rate, not finetune's 0.1: at 0.1 x 3e-3, with the
            # spatial augmentation, the three starts measured lost the stomach and scored lower on average
            # (docs/few-label-accuracy.md, section 23).  Self-training rounds keep their default.
            train.encoder_lr_scale = 1.0
