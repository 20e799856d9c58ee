"""Segmentation backbones that expose their encoder levels.

Every contrastive method in ContrastiveSeg attaches heads to the *encoder
levels* of a segmentation network, so both backbones here split the usual
``forward`` into three public steps::

    levels = model.encode(x)        # five feature maps, full resolution down to 1/16
    features = model.decode(levels) # last decoder features, full resolution
    logits = model.segment(features)

``forward(x)`` is the composition of the three and returns class logits
``[B, out_channels, D, H, W]``.  Both networks need every spatial size of the
input to be a multiple of 16.

The level names are the same for both backbones (``LEVEL_NAMES``):

============  ==========  ============================================
name          resolution  UNETR                        / light UNet
============  ==========  ============================================
``enc1``      1           conv stem on the image       / first conv block
``enc2``      1/2         ViT block 3, upsampled x8    / first down block
``enc3``      1/4         ViT block 6, upsampled x4    / second down block
``enc4``      1/8         ViT block 9, upsampled x2    / third down block
``bottleneck`` 1/16       ViT block 12 (last), reshaped / fourth down block
============  ==========  ============================================
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from monai.networks.nets import UNETR, BasicUNet
from torch import nn

LEVEL_NAMES = ("enc1", "enc2", "enc3", "enc4", "bottleneck")


class UNETRBackbone(nn.Module):
    """MONAI's UNETR (Hatamizadeh et al. 2022) with its encoder levels exposed.

    The MONAI module is kept intact as ``self.net`` so its state-dict keys
    (``net.vit.*``, ``net.encoder1.*``, ...) stay those of MONAI.

    Args:
        in_channels: image channels (1 for CT).
        out_channels: output classes including background.
        img_size: the patch size the ViT is built for (each a multiple of 16).
        feature_size: channels of ``enc1``; ``enc2..enc4`` have 2x, 4x, 8x.
        hidden_size, mlp_dim, num_heads: ViT width, MLP width and heads.
    """

    architecture = "unetr"

    def __init__(self, in_channels: int, out_channels: int, img_size: Sequence[int],
                 feature_size: int = 16, hidden_size: int = 768, mlp_dim: int = 3072,
                 num_heads: int = 12):
        super().__init__()
        self.net = UNETR(in_channels=in_channels, out_channels=out_channels, img_size=tuple(img_size),
                         feature_size=feature_size, hidden_size=hidden_size, mlp_dim=mlp_dim,
                         num_heads=num_heads, proj_type="conv", norm_name="instance",
                         res_block=True, dropout_rate=0.0)
        self.img_size = tuple(int(s) for s in img_size)
        self.level_channels = [feature_size, 2 * feature_size, 4 * feature_size, 8 * feature_size,
                               hidden_size]
        self.decoder_channels = feature_size
        self.in_channels = in_channels
        self.out_channels = out_channels

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``x [B, in_channels, *img_size]`` -> five level tensors ``[B, c_l, *size/2^l]``."""
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"UNETR was built for patches of {self.img_size} voxels, got {tuple(x.shape[2:])}; "
                             "the ViT's position embedding fixes the input size")
        net = self.net
        last, hidden = net.vit(x)
        return [
            net.encoder1(x),
            net.encoder2(net.proj_feat(hidden[3])),
            net.encoder3(net.proj_feat(hidden[6])),
            net.encoder4(net.proj_feat(hidden[9])),
            net.proj_feat(last),
        ]

    def decode(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Five levels -> decoder features ``[B, decoder_channels, D, H, W]``."""
        enc1, enc2, enc3, enc4, bottleneck = levels
        net = self.net
        x = net.decoder5(bottleneck, enc4)
        x = net.decoder4(x, enc3)
        x = net.decoder3(x, enc2)
        return net.decoder2(x, enc1)

    def segment(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.out(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segment(self.decode(self.encode(x)))

    def encoder_parameter_prefixes(self) -> List[str]:
        """State-dict key prefixes that belong to the encoder path."""
        return ["net.vit.", "net.encoder1.", "net.encoder2.", "net.encoder3.", "net.encoder4."]

    def segmentation_head_prefixes(self) -> List[str]:
        """State-dict key prefixes of the final 1x1x1 convolution to class logits."""
        return ["net.out."]


class LightUNetBackbone(nn.Module):
    """A light convolutional U-Net (MONAI ``BasicUNet``) for CPUs and small GPUs.

    Args:
        in_channels, out_channels: as for UNETR.
        features: six channel counts: the five encoder levels, then the last
            decoder level (MONAI's convention).
    """

    architecture = "unet"

    def __init__(self, in_channels: int, out_channels: int,
                 features: Sequence[int] = (16, 16, 32, 64, 128, 16)):
        super().__init__()
        if len(features) != 6:
            raise ValueError(f"features needs 6 channel counts (5 encoder levels + last decoder), got {features}")
        self.net = BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                             features=tuple(features))
        self.level_channels = list(features[:5])
        self.decoder_channels = int(features[5])
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.img_size = None  # any multiple of 16

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        net = self.net
        x0 = net.conv_0(x)
        x1 = net.down_1(x0)
        x2 = net.down_2(x1)
        x3 = net.down_3(x2)
        x4 = net.down_4(x3)
        return [x0, x1, x2, x3, x4]

    def decode(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        x0, x1, x2, x3, x4 = levels
        net = self.net
        u = net.upcat_4(x4, x3)
        u = net.upcat_3(u, x2)
        u = net.upcat_2(u, x1)
        return net.upcat_1(u, x0)

    def segment(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.final_conv(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segment(self.decode(self.encode(x)))

    def encoder_parameter_prefixes(self) -> List[str]:
        return ["net.conv_0.", "net.down_1.", "net.down_2.", "net.down_3.", "net.down_4."]

    def segmentation_head_prefixes(self) -> List[str]:
        return ["net.final_conv."]
