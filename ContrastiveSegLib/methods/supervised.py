"""Supervised segmentation: Dice + cross-entropy on labelled patches (fine-tuning and baselines)."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn


class SupervisedObjective(nn.Module):
    """``forward({"image": [B, 1, *P], "label": [B, 1, *P] long})`` -> ``(Dice + CE, logs)``.

    MONAI's ``DiceCELoss`` with soft-max outputs, one-hot targets and the
    background channel included (the usual nnU-Net / UNETR setting), equal weights.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        from monai.losses import DiceCELoss

        self.backbone = backbone
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=True, squared_pred=False,
                               smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        logits = self.backbone(batch["image"])
        loss = self.loss(logits.float(), batch["label"])
        return loss, {}
