"""Build a backbone from a :class:`~ContrastiveSegLib.config.ModelConfig`."""

from __future__ import annotations

from torch import nn

from ..config import UNET_SIZES, UNETR_SIZES, ModelConfig
from .backbones import LightUNetBackbone, UNETRBackbone


def build_backbone(config: ModelConfig) -> nn.Module:
    """The segmentation network described by ``config`` (randomly initialised)."""
    config.validate()
    if config.architecture == "unetr":
        return UNETRBackbone(config.in_channels, config.out_channels, tuple(config.patch_size),
                             **UNETR_SIZES[config.size])
    return LightUNetBackbone(config.in_channels, config.out_channels, UNET_SIZES[config.size])
