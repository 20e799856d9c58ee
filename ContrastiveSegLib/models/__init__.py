"""Segmentation backbones with exposed encoder levels, and the heads methods attach to them."""

from .backbones import LEVEL_NAMES, LightUNetBackbone, UNETRBackbone
from .factory import build_backbone

__all__ = ["LEVEL_NAMES", "LightUNetBackbone", "UNETRBackbone", "build_backbone"]
