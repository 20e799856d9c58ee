"""MixCL pre-training: identity + label + reconstruction consistency (docs/METHODS.md §1).

Per sample (``MixCLSamples``): a source dataset, a labelled case and a patch
``P1``; elastic + affine deformation of ``P1`` (p = 0.5 each), then two
intensity views ``V1, V1'``; an auxiliary patch ``P2`` from the same case or
another case of the same dataset (1:1), centred (when foreground-centred) on an
organ that ``P1`` shows, deformed the same way, and one view ``V2`` of it.  The boundary-weighted pixel sampling of the label loss runs in
the data workers, on the labels resampled to ``enc2``'s grid (every second
voxel: nearest-neighbour at 1/2 resolution), so the GPU never waits for a
distance transform.

The objective (``MixCLObjective``) encodes ``[V1, V1', V2]`` in one batch and
computes::

    L = sum_levels L_id(proj_l(V1), proj_l(V1'))
        + alpha * L_label(proj_enc2(V1)[sampled], proj_enc2(V2)[sampled])
        + beta  * L_recon        (MSE of the reconstruction of V1, V1', V2
                                   against the deformed patch before intensity augmentation)

Labels are ids of the run's shared vocabulary (data/sources.py), so a label
is compared across datasets only through its canonical name, and pairs
touching 0 ("not labelled here") are left out.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import RunConfig
from ..data.sampling import PatchSampler
from ..data.sources import PretrainSources
from ..data.views import intensity_view, spatial_augment
from ..errors import InputError
from ..losses import flatten_feature_map, identity_loss, label_contrastive_loss, sample_boundary_weighted
from ..models.backbones import LEVEL_NAMES

TRAINS_DECODER = True   # the reconstruction loss goes through the decoder

# Every setting of the method; "ours" marks the values the paper does not give.
DEFAULTS: Dict[str, Any] = {
    "alpha": 0.01,                 # weight of the label loss (paper)
    "beta": 0.01,                  # weight of the reconstruction loss (paper)
    "lambd": 0.0051,               # off-diagonal weight of the identity loss (ours: Barlow Twins' value)
    "normalization": "l2",         # identity loss: "l2" (paper) or "batchnorm" (Barlow Twins)
    "identity_levels": list(LEVEL_NAMES),   # our reading of "all intermediate layers"
    "label_level": "enc2",         # our reading of "the 2nd layer"
    "tau": 0.1,                    # label-loss temperature (paper)
    "label_reduction": "paper",    # "paper": one log over all pairs; "anchor": per-anchor mean (ours)
    "samples_per_class": 128,      # r, voxels per class and patch (ours; the paper gives no number)
    "mu": 8.0,                     # boundary weight map (paper)
    "eps": 0.05,                   # boundary weight map (paper)
    "spatial_prob": 0.5,           # elastic and affine, each (paper)
    "intensity_prob": 0.2,         # shift, gamma, smoothing, noise, each (paper)
    "same_case_prob": 0.5,         # P2 from the same case as P1 (paper: 1:1)
    "foreground_ratio": 0.67,      # share of patches centred on a labelled voxel (ours)
    "label_tile_size": 4096,       # label loss computed in tiles of this many rows (memory)
}


def check_settings(settings: Dict[str, Any]) -> None:
    """Clear errors for settings that cannot work, before any data is read."""
    unknown = [name for name in settings["identity_levels"] if name not in LEVEL_NAMES]
    if unknown or settings["label_level"] not in LEVEL_NAMES:
        raise InputError(f"unknown level(s) {unknown or [settings['label_level']]}", path="--set",
                         fix=f"levels are {', '.join(LEVEL_NAMES)}")
    if settings["normalization"] not in ("l2", "batchnorm"):
        raise InputError(f"normalization {settings['normalization']!r} is not l2 or batchnorm", path="--set")
    if settings["label_reduction"] not in ("paper", "anchor"):
        raise InputError(f"label_reduction {settings['label_reduction']!r} is not paper or anchor", path="--set")
    for name in ("alpha", "beta", "lambd"):
        if settings[name] < 0:
            raise InputError(f"{name} must be >= 0, got {settings[name]}", path="--set")
    if settings["tau"] <= 0 or settings["mu"] <= 0 or settings["eps"] <= 0 or settings["samples_per_class"] < 1:
        raise InputError("tau, mu and eps must be > 0 and samples_per_class >= 1", path="--set")


def projector(channels: int) -> nn.Sequential:
    """Three 1x1x1 convolutions, channels ``[c, c, 2c]``, instance norm + LeakyReLU between them."""
    c = int(channels)
    return nn.Sequential(
        nn.Conv3d(c, c, 1), nn.InstanceNorm3d(c, affine=True), nn.LeakyReLU(0.01, inplace=True),
        nn.Conv3d(c, c, 1), nn.InstanceNorm3d(c, affine=True), nn.LeakyReLU(0.01, inplace=True),
        nn.Conv3d(c, 2 * c, 1),
    )


def level_factor(level: str) -> int:
    """How many input voxels one voxel of ``level`` spans per axis (enc1: 1, enc2: 2, ...)."""
    return 2 ** LEVEL_NAMES.index(level)


def sampled_voxels(label: np.ndarray, factor: int, budget: int, settings: Dict[str, Any],
                   rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Boundary-weighted voxels of ``label [X, Y, Z]`` on a grid ``factor`` times coarser.

    Returns ``(flat indices [budget] int64, labels [budget] int64)``, padded with
    index 0 and label -1 (padding is dropped before the loss).
    """
    coarse = np.ascontiguousarray(label[::factor, ::factor, ::factor]).astype(np.int64)
    chosen = sample_boundary_weighted(coarse, int(settings["samples_per_class"]), mu=settings["mu"],
                                      eps=settings["eps"], background=0, generator=rng)
    indices = np.zeros(budget, dtype=np.int64)
    values = np.full(budget, -1, dtype=np.int64)
    position = 0
    for value, flat in chosen.items():
        take = flat[: budget - position]
        indices[position:position + take.size] = take
        values[position:position + take.size] = value
        position += take.size
    return indices, values


class MixCLSamples(Dataset):
    """Map-style dataset: item ``i`` is MixCL sample ``i`` of the run, drawn from ``default_rng([seed, i])``."""

    def __init__(self, sources: PretrainSources, patch_size, settings: Dict[str, Any], seed: int, length: int):
        self.sources = sources
        self.settings = settings
        self.seed = int(seed)
        self.length = int(length)
        self.sampler = PatchSampler([case.prepared for case in sources.cases], patch_size,
                                    settings["foreground_ratio"])
        self.datasets = [index for index, cases in enumerate(sources.by_dataset) if cases]
        self.factor = level_factor(settings["label_level"])
        # One padded slot per class and sampled voxel: fixed shapes let the default collate batch them.
        self.budget = int(settings["samples_per_class"]) * max(len(sources.class_names), 1)

    def __len__(self) -> int:
        return self.length

    def _patch(self, case_index: int, rng: np.random.Generator, prefer=None):
        image, label, _ = self.sampler.sample(rng, case_index, prefer)
        return spatial_augment(image, label, rng, prob=self.settings["spatial_prob"])

    def choose_cases(self, rng: np.random.Generator) -> Tuple[int, int, int]:
        """``(dataset, case of P1, case of P2)``: a dataset uniformly, P2's case the same as P1's or another of that dataset."""
        dataset = self.datasets[int(rng.integers(len(self.datasets)))]
        members = self.sources.by_dataset[dataset]
        first = members[int(rng.integers(len(members)))]
        second = first
        if len(members) > 1 and rng.random() >= self.settings["same_case_prob"]:
            others = [m for m in members if m != first]
            second = others[int(rng.integers(len(others)))]
        return dataset, first, second

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        settings = self.settings
        _, first, second = self.choose_cases(rng)
        patch1, label1 = self._patch(first, rng)
        # P2 is centred on an organ that P1 shows when it can be (ours): pairs of the same organ are
        # the label loss's positives, and without any the loss is 0 for that sample.
        patch2, label2 = self._patch(second, rng, prefer=[int(v) for v in np.unique(label1) if v])
        prob = settings["intensity_prob"]
        views = [intensity_view(patch1, rng, prob), intensity_view(patch1, rng, prob), intensity_view(patch2, rng, prob)]
        index1, values1 = sampled_voxels(label1[0], self.factor, self.budget, settings, rng)
        index2, values2 = sampled_voxels(label2[0], self.factor, self.budget, settings, rng)
        as_tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array))  # noqa: E731
        return {"views": as_tensor(np.stack(views)), "patches": as_tensor(np.stack([patch1, patch1, patch2])),
                "index1": as_tensor(index1), "label1": as_tensor(values1),
                "index2": as_tensor(index2), "label2": as_tensor(values2)}


def _gather(features: torch.Tensor, indices: torch.Tensor, labels: torch.Tensor):
    """``features [B, C, *grid]``, ``indices/labels [B, N]`` -> ``(z [n, C], y [n])`` without padding."""
    flat = features.flatten(2)                                            # [B, C, V]
    picked = torch.gather(flat, 2, indices[:, None, :].expand(-1, flat.shape[1], -1))  # [B, C, N]
    keep = labels >= 0
    return picked.transpose(1, 2)[keep], labels[keep]


class MixCLObjective(nn.Module):
    """``forward(batch)`` -> ``(L_id + alpha L_label + beta L_recon, logs)``; see the module docstring.

    Batch tensors (B samples): ``views [B, 3, 1, *P]`` (V1, V1', V2), ``patches [B, 3, 1, *P]``
    (their reconstruction targets), ``index1/label1/index2/label2 [B, N]`` (sampled voxels
    of P1 and P2 on the label level's grid; label -1 = padding).
    """

    def __init__(self, backbone: nn.Module, settings: Dict[str, Any]):
        super().__init__()
        self.backbone = backbone
        self.settings = dict(settings)
        self.level_index = {name: LEVEL_NAMES.index(name) for name in LEVEL_NAMES}
        used = sorted(set(self.settings["identity_levels"]) | {self.settings["label_level"]},
                      key=LEVEL_NAMES.index)
        self.projectors = nn.ModuleDict({name: projector(backbone.level_channels[self.level_index[name]])
                                         for name in used})
        self.reconstruction = nn.Conv3d(backbone.decoder_channels, backbone.in_channels, 1)

    def forward(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        settings = self.settings
        views = batch["views"]
        size = views.shape[0]
        stacked = views.transpose(0, 1).reshape(3 * size, *views.shape[2:])   # [V1 of all, V1' of all, V2 of all]
        levels = self.backbone.encode(stacked)

        identity = stacked.new_zeros((), dtype=torch.float32)
        logs: Dict[str, float] = {}
        projected: Dict[str, torch.Tensor] = {}
        for name, head in self.projectors.items():
            projected[name] = head(levels[self.level_index[name]][: 2 * size] if name != settings["label_level"]
                                   else levels[self.level_index[name]])
        for name in settings["identity_levels"]:
            z = projected[name]
            term = identity_loss(flatten_feature_map(z[:size]), flatten_feature_map(z[size:2 * size]),
                                 lambd=settings["lambd"], normalization=settings["normalization"])
            identity = identity + term
            logs[f"id_{name}"] = float(term.detach())

        label_features = projected[settings["label_level"]]
        z1, y1 = _gather(label_features[:size], batch["index1"], batch["label1"])
        z2, y2 = _gather(label_features[2 * size:], batch["index2"], batch["label2"])
        label = label_contrastive_loss(z1.float(), y1, z2.float(), y2, tau=settings["tau"], background=0,
                                       reduction=settings["label_reduction"],
                                       tile_size=int(settings["label_tile_size"]))

        reconstruction = self.reconstruction(self.backbone.decode(levels))
        targets = batch["patches"].transpose(0, 1).reshape(reconstruction.shape)
        recon = torch.mean((reconstruction.float() - targets.float()) ** 2)

        loss = identity + settings["alpha"] * label + settings["beta"] * recon
        logs.update(identity=float(identity.detach()), label=float(label.detach()), recon=float(recon.detach()),
                    label_pixels=float(z1.shape[0] + z2.shape[0]))
        return loss, logs


def build(config: RunConfig, backbone: nn.Module, sources: PretrainSources, length: int):
    """The pretrain driver's entry point: ``(MixCLObjective, MixCLSamples)``."""
    settings = {key: config.method.get(key, default) for key, default in DEFAULTS.items()}
    check_settings(settings)
    objective = MixCLObjective(backbone, settings)
    samples = MixCLSamples(sources, config.model.patch_size, settings, config.train.seed, length)
    return objective, samples

