"""Self-training with a local contrastive loss on pseudo-labels (Chaitanya et al. 2021, docs/METHODS.md §3).

This module is the *joint step* of a self-training round; the stages, the
pseudo-labelling and the bookkeeping live in :mod:`ContrastiveSegLib.selftrain`.

A sample (``JointPairs``) is a *pair* of patches ``(x, x')``, each from a
labelled case (ground truth) or an unlabelled case (its pseudo-label); sample
``i`` is an L-L, L-U or U-U pair for ``i mod 3 = 0, 1, 2``, so pairs of all
three kinds meet in every batch of two or more pairs.  The anchors (``n``
random voxels per foreground class and patch) are drawn in the data worker
from the sample's own seeded generator, so a resumed run draws the same ones.

The objective (``SelfTrainingObjective``) runs the backbone once on all the
patches of a batch and computes::

    L = DiceCE(logits of the labelled patches, ground truth)
        + contrastive_weight * local contrastive loss (all patches, ground truth or pseudo-label)

The local contrastive loss uses an embedding head (two 1x1x1 convolutions
with a ReLU between them) on the last decoder level, L2-normalised.  For a
pair, the prototypes are the mean embeddings of the foreground classes
present in each patch; an anchor of class ``c`` is pulled to every prototype
of class ``c`` and pushed from the others, with the softmax over the
prototypes of both patches (``matching="inter"``, the default) or of the
anchor's own patch (``"intra"``).  Background is never anchor, positive or
negative.  The loss is the mean over every (anchor, positive) term of the
batch: the authors' TensorFlow code divides inside its batch loop, so its
last pair weighs most; we take the plain mean.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data.sampling import PatchAugmenter, PatchSampler
from ..errors import InputError
from ..losses import class_prototypes, prototype_contrastive_loss, sample_anchors

# Every setting of ``selftrain`` ("ours" marks values the paper does not fix).
DEFAULTS: Dict[str, Any] = {
    "rounds": 3,                        # pseudo-labelling rounds after the baseline (METHODS.md default)
    "contrastive_weight": 0.1,          # lambda (paper)
    "agreement_threshold": None,        # keep a scan only above this Dice between two augmented copies; None = off (paper's default)
    "tau": 0.1,                         # temperature (paper)
    "anchors_per_class": 16,            # n, anchors per foreground class and patch (ours: METHODS.md default)
    "matching": "inter",                # "inter": softmax over both patches' prototypes; "intra": own patch only
    "embedding_dim": 32,                # output channels of the embedding head (ours)
    "pseudo_label_format": "nii.gz",    # file type of the pseudo-labels written to look at (ours)
    "keep_stage_folders": False,        # keep RUN/stages/<stage>/ after the stage ends (ours: it only serves --resume)
}

PSEUDO_LABEL_FORMATS = ("nii.gz", "nii", "nrrd", "mha", "seg.nrrd")
PAIR_KINDS: Tuple[Tuple[bool, bool], ...] = ((True, True), (True, False), (False, False))  # L-L, L-U, U-U


def check_settings(settings: Dict[str, Any]) -> None:
    """Clear errors for settings that cannot work, before any data is read."""
    def bad(name: str, problem: str, option: str = "--set"):
        known = ", ".join(f"{key}={value!r}" for key, value in DEFAULTS.items())
        raise InputError(f"{name} {problem}", path=option, details=f"settings and defaults: {known}")

    rounds = settings["rounds"]
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        bad("rounds", f"must be a whole number >= 1, got {rounds!r}", "--rounds")
    weight = settings["contrastive_weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        bad("contrastive_weight", f"must be a number >= 0, got {weight!r}", "--contrastive-weight")
    threshold = settings["agreement_threshold"]
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 <= threshold <= 1.0):
        bad("agreement_threshold", f"must be a Dice in [0, 1] or none (off), got {threshold!r}",
            "--agreement-threshold")
    tau = settings["tau"]
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
        bad("tau", f"must be a number > 0, got {tau!r}")
    for name in ("anchors_per_class", "embedding_dim"):
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            bad(name, f"must be a whole number >= 1, got {value!r}")
    if settings["matching"] not in ("inter", "intra"):
        bad("matching", f"must be inter or intra, got {settings['matching']!r}")
    if settings["pseudo_label_format"] not in PSEUDO_LABEL_FORMATS:
        bad("pseudo_label_format", f"must be one of {', '.join(PSEUDO_LABEL_FORMATS)}, "
                                   f"got {settings['pseudo_label_format']!r}")
    if not isinstance(settings["keep_stage_folders"], bool):
        bad("keep_stage_folders", f"must be true or false, got {settings['keep_stage_folders']!r}")


class EmbeddingHead(nn.Module):
    """Two 1x1x1 convolutions (ReLU between) on decoder features; output L2-normalised per voxel.

    ``[B, in_channels, D, H, W]`` -> ``[B, embedding_dim, D, H, W]`` with unit length along channels.
    """

    def __init__(self, in_channels: int, embedding_dim: int = 32):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv3d(in_channels, in_channels, kernel_size=1), nn.ReLU(inplace=True),
                                    nn.Conv3d(in_channels, embedding_dim, kernel_size=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(features), dim=1)


def anchors_and_prototypes(embeddings: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The anchors and class prototypes of a batch of patches, each tagged with its patch.

    Both come out of one pass over the batch: slicing the big embedding tensor patch by patch
    would make the backward pass write a full-size zero gradient per slice.

    Args:
        embeddings: ``[Q, C, *spatial]`` normalised embeddings of ``Q`` patches.
        labels: ``[Q, *spatial]`` integer labels (0 = background).
        anchors: ``[Q, A]`` flat voxel indices per patch (:func:`sample_anchors`), -1 = padding.

    Returns:
        ``{"anchors" [Na, C], "anchor_class" [Na], "anchor_patch" [Na], "prototypes" [K, C],
        "prototype_class" [K], "prototype_patch" [K]}``: the anchors' embeddings in patch order, and
        the mean embedding of every foreground class present in each patch (:func:`class_prototypes`).
    """
    patches, channels = embeddings.shape[:2]
    rows = embeddings.reshape(patches, channels, -1).transpose(1, 2).reshape(-1, channels)
    flat = labels.reshape(patches, -1).long()
    voxels = flat.shape[1]
    span = int(flat.max()) + 1 if flat.numel() else 1
    patch = torch.arange(patches, device=flat.device)[:, None]
    # One class_prototypes call for all patches: class c of patch q becomes q * span + c; background stays 0.
    tagged = torch.where(flat > 0, patch * span + flat, torch.zeros_like(flat))
    prototypes, tags = class_prototypes(rows, tagged.reshape(-1))
    anchors = anchors.reshape(patches, -1).to(flat.device)
    valid = anchors >= 0
    voxel = (anchors + patch * voxels)[valid]
    return {"anchors": rows[voxel], "anchor_class": flat.reshape(-1)[voxel],
            "anchor_patch": patch.expand_as(anchors)[valid], "prototypes": prototypes,
            "prototype_class": tags % span, "prototype_patch": tags // span}


def local_contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor, tau: float = 0.1,
                           matching: str = "inter") -> torch.Tensor:
    """The mean of every (anchor, positive) term over a batch of pairs (the clean mean, see the module docstring).

    Args:
        embeddings: ``[P, 2, C, *spatial]`` normalised embeddings of ``P`` pairs of patches.
        labels: ``[P, 2, *spatial]`` integer labels (ground truth or pseudo-label; 0 = background).
        anchors: ``[P, 2, A]`` anchor indices per patch (-1 = padding).
        tau: temperature.
        matching: ``"inter"``: an anchor's softmax runs over the prototypes of both patches of its
            pair; ``"intra"``: over those of its own patch.

    Returns:
        A scalar; an exact zero connected to ``embeddings`` when the batch has no term (no
        foreground in any patch).
    """
    if matching not in ("inter", "intra"):
        raise ValueError(f"matching must be 'inter' or 'intra', got {matching!r}")
    pairs = embeddings.shape[0]
    parts = anchors_and_prototypes(embeddings.reshape(pairs * 2, *embeddings.shape[2:]),
                                   labels.reshape(pairs * 2, *labels.shape[2:]), anchors)
    # A group shares one set of prototypes: a pair (inter) or a single patch (intra).
    divisor = 2 if matching == "inter" else 1
    anchor_group = parts["anchor_patch"] // divisor
    prototype_group = parts["prototype_patch"] // divisor
    total, count = None, 0
    for group in range(pairs * 2 // divisor):
        in_anchors, in_prototypes = anchor_group == group, prototype_group == group
        anchor_class, prototype_class = parts["anchor_class"][in_anchors], parts["prototype_class"][in_prototypes]
        terms = int((anchor_class[:, None] == prototype_class[None, :]).sum())
        if not terms:
            continue
        # prototype_contrastive_loss is the mean of this group's terms; weighting it by their number
        # makes the result the mean over all terms of the batch.
        loss = prototype_contrastive_loss(parts["anchors"][in_anchors], anchor_class,
                                          parts["prototypes"][in_prototypes], prototype_class, tau) * terms
        total = loss if total is None else total + loss
        count += terms
    return total / count if count else embeddings.sum() * 0.0


class SelfTrainingObjective(nn.Module):
    """Segmentation loss on the labelled patches + ``contrastive_weight`` x local contrastive loss on all.

    ``forward(batch)`` takes ``{"image": [B, 2, 1, *P] float, "label": [B, 2, 1, *P] long,
    "labeled": [B, 2] bool, "anchors": [B, 2, A] long}`` (``JointPairs`` items, collated) and
    returns ``(loss, {"segmentation": float, "contrastive": float})``.  A batch without a
    labelled patch has a segmentation loss of 0 (possible only with one pair per batch).

    Args:
        backbone: a segmentation backbone with ``encode``/``decode``/``segment`` and ``decoder_channels``.
        contrastive_weight, tau, matching, embedding_dim: see ``DEFAULTS``.
    """

    def __init__(self, backbone: nn.Module, contrastive_weight: float = 0.1, tau: float = 0.1,
                 matching: str = "inter", embedding_dim: int = 32):
        super().__init__()
        from monai.losses import DiceCELoss

        if matching not in ("inter", "intra"):
            raise ValueError(f"matching must be 'inter' or 'intra', got {matching!r}")
        self.backbone = backbone
        self.head = EmbeddingHead(int(backbone.decoder_channels), int(embedding_dim))
        self.contrastive_weight = float(contrastive_weight)
        self.tau = float(tau)
        self.matching = matching
        # The same loss as SupervisedObjective, so the baseline and the rounds optimise one segmentation loss.
        self.segmentation_loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=True,
                                            squared_pred=False, smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        image, label = batch["image"], batch["label"]
        pairs = image.shape[0]
        spatial = image.shape[3:]
        images = image.reshape(pairs * 2, *image.shape[2:])
        labels = label.reshape(pairs * 2, *label.shape[2:])
        labeled = batch["labeled"].reshape(-1).bool()
        features = self.backbone.decode(self.backbone.encode(images))
        logits = self.backbone.segment(features)
        if bool(labeled.any()):
            segmentation = self.segmentation_loss(logits[labeled].float(), labels[labeled])
        else:
            segmentation = logits.sum() * 0.0  # keeps every parameter in the graph (DDP)
        embeddings = self.head(features).float()
        contrastive = local_contrastive_loss(embeddings.reshape(pairs, 2, -1, *spatial),
                                             labels.reshape(pairs, 2, *spatial), batch["anchors"],
                                             self.tau, self.matching)
        loss = segmentation + self.contrastive_weight * contrastive
        return loss, {"segmentation": float(segmentation.detach()), "contrastive": float(contrastive.detach())}


def padded_anchors(labels: torch.Tensor, count: int, anchors_per_class: int,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[count]`` flat anchor indices of a patch (:func:`sample_anchors`), padded with -1.

    ``count`` must be at least ``anchors_per_class`` x the number of foreground classes.
    """
    chosen = sample_anchors(labels, anchors_per_class, generator=generator)
    if chosen.numel() > count:
        raise ValueError(f"{chosen.numel()} anchors do not fit in {count} slots: more classes than expected")
    out = torch.full((count,), -1, dtype=torch.long)
    out[: chosen.numel()] = chosen
    return out


class JointPairs(Dataset):
    """Map-style dataset of pairs: item ``i`` is pair ``i`` of a round, from ``default_rng([seed, stream, i])``.

    Args:
        labeled: patches of the labelled training cases (ground truth).
        unlabeled: patches of the unlabelled cases kept this round, their pseudo-labels as labels;
            None when there are none (every pair is then L-L).
        seed: the run's seed.
        length: number of pairs.
        num_classes: foreground classes (sets the anchor slots per patch).
        anchors_per_class: ``n``.
        stream: separates the rounds' sample streams (the round number).
        augmenter: how each patch of a pair is drawn and augmented, the run's supervised recipe
            (``finetune.augmentation_options``; pseudo-labels stand in for labels); None: the intensity
            augmentation alone.
    """

    def __init__(self, labeled: PatchSampler, unlabeled: Optional[PatchSampler], seed: int, length: int,
                 num_classes: int, anchors_per_class: int = 16, stream: int = 0,
                 augmenter: Optional[PatchAugmenter] = None):
        self.labeled = labeled
        self.unlabeled = unlabeled
        self.seed = int(seed)
        self.length = int(length)
        self.anchors_per_class = int(anchors_per_class)
        self.slots = self.anchors_per_class * max(int(num_classes), 1)
        self.stream = int(stream)
        self.augmenter = augmenter if augmenter is not None else PatchAugmenter()

    def __len__(self) -> int:
        return self.length

    def pair_kind(self, index: int) -> Tuple[bool, bool]:
        """``(first is labelled, second is labelled)`` of pair ``index``."""
        if self.unlabeled is None:
            return (True, True)
        return PAIR_KINDS[int(index) % len(PAIR_KINDS)]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.stream, int(index)])
        images, labels, anchors = [], [], []
        kind = self.pair_kind(index)
        for is_labeled in kind:
            sampler = self.labeled if is_labeled else self.unlabeled
            image, label = self.augmenter.draw(sampler, rng)
            label_tensor = torch.from_numpy(np.ascontiguousarray(label))
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
            anchors.append(padded_anchors(label_tensor[0], self.slots, self.anchors_per_class, generator))
            images.append(torch.from_numpy(np.ascontiguousarray(image)))
            labels.append(label_tensor)
        return {"image": torch.stack(images), "label": torch.stack(labels), "labeled": torch.tensor(kind),
                "anchors": torch.stack(anchors)}

