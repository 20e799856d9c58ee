"""Supervised segmentation: Dice + cross-entropy on labelled patches (fine-tuning and baselines)."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

DICE_MODES = ("sample", "batch", "tversky")
# Tversky's index (Salehi et al., "Tversky loss function for image segmentation using 3D fully
# convolutional deep networks", 2017): false positives weighted alpha, false negatives beta; the paper's
# alpha 0.3, beta 0.7 favour recall.  alpha = beta = 0.5 is the Dice coefficient.
TVERSKY_ALPHA, TVERSKY_BETA = 0.3, 0.7


class SupervisedObjective(nn.Module):
    """``forward({"image": [B, 1, *P], "label": [B, 1, *P] long})`` -> ``(Dice + CE, logs)``.

    MONAI's ``DiceCELoss`` with soft-max outputs and one-hot targets, equal weights. ``dice`` says over
    what the Dice term is taken:

    * ``"sample"`` (every run before the option existed): per patch and per class, background included.
      A class absent from a patch scores ``smooth / (predicted + smooth)`` there, so any probability the
      network gives it in that patch costs nearly a whole Dice point: a pull towards predicting less.
    * ``"batch"`` (nnU-Net's, for its 3D networks): the overlaps and sizes of each foreground class are
      summed over the batch before the ratio is taken, background left out, so an organ missing from one
      patch costs only its false positives relative to the batch's organ.  Under DDP the batch is each
      process's own.
    * ``"tversky"``: ``"batch"`` with Tversky's index in place of Dice's (:data:`TVERSKY_ALPHA` on false
      positives, :data:`TVERSKY_BETA` on false negatives), for networks that miss organ voxels on a new
      scan more than they add wrong ones.  Background is left out: its false negatives are the organs'
      false positives, and weighting them up would pull the other way.
    """

    def __init__(self, backbone: nn.Module, dice: str = "sample"):
        super().__init__()
        from monai.losses import DiceCELoss

        if dice not in DICE_MODES:
            raise ValueError(f"dice must be one of {DICE_MODES}, got {dice!r}")
        self.backbone = backbone
        self.dice = dice
        if dice == "tversky":
            from monai.losses import TverskyLoss

            self.loss = TverskyLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
                                    alpha=TVERSKY_ALPHA, beta=TVERSKY_BETA, smooth_nr=1e-5, smooth_dr=1e-5)
        else:
            self.loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=(dice == "sample"),
                                   batch=(dice == "batch"), squared_pred=False, smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        logits = self.backbone(batch["image"]).float()
        loss = self.loss(logits, batch["label"])
        if self.dice == "tversky":   # MONAI's TverskyLoss has no cross-entropy term; DiceCELoss adds it for the others
            loss = loss + nn.functional.cross_entropy(logits, batch["label"][:, 0].long())
        return loss, {}
