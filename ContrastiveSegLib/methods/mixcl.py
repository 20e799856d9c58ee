"""MixCL pre-training: identity + label + reconstruction consistency (docs/METHODS.md §1, docs/pretraining.md).

Per sample (``MixCLSamples``): a source dataset, a labelled case and a crop
around a patch centre; two views ``V1, V1'`` of it, each with its own spatial
transform (crop offset, rotation, scale, elastic; ``view_geometry``, default
``independent``: ours) or one shared transform (``shared``: the paper's
reading, where a voxel's positive is the same array index), then intensity
augmentation; an auxiliary patch ``P2`` from the same case or another case of
the same dataset (1:1), centred (when foreground-centred) on an organ that
``V1`` shows, with one view ``V2``.  ``P1``/``P2`` are redrawn (up to
``pair_attempts`` times) until, where the cases have two or more labelled
organs, the pair shows two, one of them in both.  The correspondence of
``V1`` and ``V1'`` on every identity level's grid, and the boundary-weighted
pixel sampling of the label loss (on ``enc2``'s grid), run in the data
workers.

The objective (``MixCLObjective``) encodes ``[V1, V1', V2]`` in one batch and
computes::

    L = mean_levels L_id(proj_l(V1)[corresponding], proj_l(V1')[corresponding])
        + alpha * L_label(proj_enc2(V1)[sampled], proj_enc2(V2)[sampled])
        + beta  * L_recon        (MSE of the reconstruction of V1, V1', V2
                                   against each view before intensity augmentation)
        + position_weight * mean_{position_levels} L_floor(V1, V1', V2)
                                  (position_variance_loss: the views' features at one
                                   position must vary across views; ours)

``L_id`` is normalised per channel pair (``identity_reduction="mean"``) and a
level is skipped in a step where the batch has fewer corresponding pixels than
projection channels; ``identity_reduction="sum"`` sums the paper's formula
over levels.  Labels are ids of the run's shared vocabulary (data/sources.py),
so a label is compared across datasets only through its canonical name;
background (0) is a negative of the organs of its own dataset only
(``background_negatives``), never across datasets.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from ..config import RunConfig
from ..data.sampling import PatchSampler, crop_or_pad
from ..data.sources import PretrainSources
from ..data.views import (
    VIEW_GEOMETRIES,
    draw_view_pair,
    draw_view_transform,
    intensity_view,
    level_grid_shape,
    render_view,
    view_correspondence,
    view_crop_shape,
)
from ..errors import InputError
from ..losses import flatten_feature_map, identity_loss, label_contrastive_loss, sample_boundary_weighted
from ..losses.position_variance import position_floor
from ..models.backbones import LEVEL_NAMES
from .term_gradients import TermGradientLog, encoder_gradient_norms

TRAINS_DECODER = True   # the reconstruction loss goes through the decoder
CANDIDATES_PER_PIXEL = 4   # V1 cells searched for a partner in V1', per identity pixel wanted

# Every setting of the method; "ours" marks the values the paper does not give.
DEFAULTS: Dict[str, Any] = {
    "alpha": 0.1,                  # weight of the label loss (ours, measured: docs/pretraining.md; paper 0.01)
    "beta": 0.2,                   # weight of the reconstruction loss (ours, measured: docs/pretraining.md; paper 0.01)
    "lambd": 1.0,                  # off-diagonal weight of the identity loss (ours, for identity_reduction=mean)
    "identity_reduction": "mean",  # "mean" (ours: per channel pair, levels averaged) or "sum" (paper, levels summed)
    "normalization": "l2",         # identity loss: "l2" (paper) or "batchnorm" (Barlow Twins)
    "identity_levels": list(LEVEL_NAMES),   # our reading of "all intermediate layers"
    "identity_pixels": 1024,       # corresponding pixels per level and sample, at most (ours)
    "skip_thin_levels": True,      # a level sits out a step where the batch has fewer pixels than channels (ours)
    "view_geometry": "independent",  # "independent" (ours: each view its own transform) or "shared" (paper)
    "max_shift": 0.25,             # a view's centre moves up to this share of the patch per axis (ours)
    "match_tolerance": 0.5,        # corresponding = source coordinates within this many cells (ours)
    "label_level": "enc2",         # our reading of "the 2nd layer"
    "tau": 0.1,                    # label-loss temperature (paper)
    "label_reduction": "paper",    # "paper": one log over all pairs; "anchor": per-anchor mean (ours)
    "background_negatives": True,  # background is a negative of its own dataset's organs (ours; paper: no)
    "samples_per_class": 128,      # r, voxels per class and patch (ours; the paper gives no number)
    "mu": 8.0,                     # boundary weight map (paper)
    "eps": 0.05,                   # boundary weight map (paper)
    "spatial_prob": 0.5,           # elastic and affine, each (paper)
    "intensity_prob": 0.2,         # shift, gamma, smoothing, noise, each (paper)
    "same_case_prob": 0.5,         # P2 from the same case as P1 (paper: 1:1)
    "foreground_ratio": 0.67,      # share of patches centred on a labelled voxel (ours)
    "pair_attempts": 8,            # draws of P1/P2 until the pair shows two organs where the cases have them (ours)
    "label_tile_size": 4096,       # label loss computed in tiles of this many rows (memory)
    "gradient_log_every": 50,      # term_gradients event every this many steps, and at step 0 (0: step 0 only)
    "position_weight": 1.0,        # weight of the per-position variance floor (ours; 0: off, as in the paper)
    "position_levels": ["enc4", "bottleneck"],  # levels the variance floor holds on (ours)
}


def check_settings(settings: Dict[str, Any]) -> None:
    """Clear errors for settings that cannot work, before any data is read."""
    unknown = [name for name in list(settings["identity_levels"]) + list(settings["position_levels"])
               if name not in LEVEL_NAMES]
    if unknown or settings["label_level"] not in LEVEL_NAMES:
        raise InputError(f"unknown level(s) {unknown or [settings['label_level']]}", path="--set",
                         fix=f"levels are {', '.join(LEVEL_NAMES)}")
    choices = {"normalization": ("l2", "batchnorm"), "label_reduction": ("paper", "anchor"),
               "identity_reduction": ("mean", "sum"), "view_geometry": VIEW_GEOMETRIES}
    for name, allowed in choices.items():
        if settings[name] not in allowed:
            raise InputError(f"{name} {settings[name]!r} is not one of {', '.join(allowed)}", path=f"--set {name}")
    for name in ("alpha", "beta", "lambd", "max_shift", "position_weight"):
        if settings[name] < 0:
            raise InputError(f"{name} must be >= 0, got {settings[name]}", path="--set")
    if settings["tau"] <= 0 or settings["mu"] <= 0 or settings["eps"] <= 0 or settings["samples_per_class"] < 1:
        raise InputError("tau, mu and eps must be > 0 and samples_per_class >= 1", path="--set")
    if settings["match_tolerance"] <= 0 or settings["identity_pixels"] < 1 or settings["pair_attempts"] < 1:
        raise InputError("match_tolerance must be > 0, identity_pixels and pair_attempts >= 1", path="--set")


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

    With ``background_negatives``, also ``samples_per_class`` background voxels drawn uniformly
    (label 0).  Returns ``(flat indices [budget] int64, labels [budget] int64)``, padded with
    index 0 and label -1 (padding is dropped before the loss).
    """
    coarse = np.ascontiguousarray(label[::factor, ::factor, ::factor]).astype(np.int64)
    chosen = sample_boundary_weighted(coarse, int(settings["samples_per_class"]), mu=settings["mu"],
                                      eps=settings["eps"], background=0, generator=rng)
    if settings.get("background_negatives"):
        background = np.flatnonzero(coarse.reshape(-1) == 0)
        take = min(int(settings["samples_per_class"]), background.size)
        chosen = dict(chosen)
        chosen[0] = rng.choice(background, size=take, replace=False) if take else background[:0]
    indices = np.zeros(budget, dtype=np.int64)
    values = np.full(budget, -1, dtype=np.int64)
    position = 0
    for value, flat in chosen.items():
        take = flat[: budget - position]
        indices[position:position + take.size] = take
        values[position:position + take.size] = value
        position += take.size
    return indices, values


def padded_pairs(cells1: np.ndarray, cells2: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """``[2, budget]`` int64: at most ``budget`` corresponding cell pairs (a random subset), padded with -1."""
    out = np.full((2, budget), -1, dtype=np.int64)
    if cells1.size > budget:
        keep = np.sort(rng.choice(cells1.size, size=budget, replace=False))
        cells1, cells2 = cells1[keep], cells2[keep]
    out[0, :cells1.size] = cells1
    out[1, :cells2.size] = cells2
    return out


def organs(label: np.ndarray) -> Set[int]:
    return {int(v) for v in np.unique(label) if v > 0}


def pair_shows_two_organs(first: Set[int], second: Set[int], available: Set[int]) -> bool:
    """The label loss has something to contrast: an organ in both patches and, where the cases label
    two or more organs, two organs between them (with one organ, background is the negative)."""
    if not first & second:
        return False
    return len(available) < 2 or len(first | second) >= 2


class MixCLSamples(Dataset):
    """Map-style dataset: item ``i`` is MixCL sample ``i`` of the run, drawn from ``default_rng([seed, i])``."""

    def __init__(self, sources: PretrainSources, patch_size, settings: Dict[str, Any], seed: int, length: int):
        self.sources = sources
        self.settings = settings
        self.seed = int(seed)
        self.length = int(length)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.crop_size = view_crop_shape(self.patch_size, float(settings["max_shift"]))
        self.sampler = PatchSampler([case.prepared for case in sources.cases], patch_size,
                                    settings["foreground_ratio"])
        self.datasets = [index for index, cases in enumerate(sources.by_dataset) if cases]
        self.factor = level_factor(settings["label_level"])
        self.identity_levels = list(settings["identity_levels"])
        self.case_organs = [organs(case.prepared.label) if case.prepared.label is not None else set()
                            for case in sources.cases]
        # One padded slot per class (and background) and sampled voxel: fixed shapes let the default collate batch them.
        self.budget = int(settings["samples_per_class"]) * (max(len(sources.class_names), 1) + 1)

    def __len__(self) -> int:
        return self.length

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

    def crop(self, case_index: int, rng: np.random.Generator, prefer: Optional[Sequence[int]] = None):
        """The shared crop ``(image [1, *crop], label [1, *crop] int64)`` around a patch centre of the case."""
        case = self.sources.cases[case_index].prepared
        centre = self.sampler.centre(case_index, rng, prefer)
        start = [min(max(c - s // 2, 0), max(dim - s, 0)) if dim >= s else c - s // 2
                 for c, s, dim in zip(centre, self.crop_size, case.image.shape[1:])]
        label = crop_or_pad(case.label, start, self.crop_size).astype(np.int64) if case.label is not None else \
            np.zeros((1,) + self.crop_size, dtype=np.int64)
        return crop_or_pad(case.image, start, self.crop_size), label

    def _spatial(self) -> Dict[str, Any]:
        return {"max_shift": float(self.settings["max_shift"]), "spatial_prob": float(self.settings["spatial_prob"])}

    def draw_pair(self, first: int, second: int, rng: np.random.Generator):
        """P1's crop and two view transforms, P2's crop and one view transform, and the rendered views."""
        available = self.case_organs[first] | self.case_organs[second]
        for _ in range(int(self.settings["pair_attempts"])):
            crop1, crop_label1 = self.crop(first, rng)
            transform1, transform1b = draw_view_pair(rng, self.crop_size, self.patch_size,
                                                     self.settings["view_geometry"], **self._spatial())
            image1, label1 = render_view(crop1, crop_label1, transform1, self.patch_size)
            shown = organs(label1)
            # P2 is centred on an organ that V1 shows when it can be (ours): pairs of the same organ are
            # the label loss's positives.
            crop2, crop_label2 = self.crop(second, rng, prefer=sorted(shown) or None)
            transform2 = draw_view_transform(rng, self.crop_size, self.patch_size, **self._spatial())
            image2, label2 = render_view(crop2, crop_label2, transform2, self.patch_size)
            if pair_shows_two_organs(shown, organs(label2), available):
                break
        image1b, _ = render_view(crop1, None, transform1b, self.patch_size)
        return (transform1, transform1b), (image1, image1b, image2), (label1, label2)

    def corresponding_cells(self, first, second, level: str, rng: np.random.Generator) -> np.ndarray:
        """``[2, identity_pixels]`` corresponding cells of V1 and V1' on ``level``'s grid (-1 = padding).

        On fine levels only ``CANDIDATES_PER_PIXEL * identity_pixels`` random cells of V1 are searched
        (about a quarter of them find a partner with the default shift and tolerance).
        """
        budget = int(self.settings["identity_pixels"])
        factor = level_factor(level)
        cells = int(np.prod(level_grid_shape(self.patch_size, factor)))
        candidates = None
        if cells > CANDIDATES_PER_PIXEL * budget:
            candidates = np.sort(rng.choice(cells, size=CANDIDATES_PER_PIXEL * budget, replace=False))
        found = view_correspondence(first, second, self.patch_size, factor, self.settings["match_tolerance"],
                                    cells=candidates)
        return padded_pairs(*found, budget, rng)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        settings = self.settings
        dataset, first, second = self.choose_cases(rng)
        (transform1, transform1b), (image1, image1b, image2), (label1, label2) = self.draw_pair(first, second, rng)
        prob = settings["intensity_prob"]
        views = [intensity_view(image, rng, prob) for image in (image1, image1b, image2)]
        pairs = np.stack([self.corresponding_cells(transform1, transform1b, level, rng)
                          for level in self.identity_levels])                                  # [L, 2, K]
        index1, values1 = sampled_voxels(label1[0], self.factor, self.budget, settings, rng)
        index2, values2 = sampled_voxels(label2[0], self.factor, self.budget, settings, rng)
        as_tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array))  # noqa: E731
        return {"views": as_tensor(np.stack(views)), "patches": as_tensor(np.stack([image1, image1b, image2])),
                "index1": as_tensor(index1), "label1": as_tensor(values1),
                "index2": as_tensor(index2), "label2": as_tensor(values2),
                "pairs": as_tensor(pairs), "dataset": torch.tensor(dataset, dtype=torch.int64),
                "index": torch.tensor(int(index), dtype=torch.int64)}


def _gather(features: torch.Tensor, indices: torch.Tensor, labels: torch.Tensor):
    """``features [B, C, *grid]``, ``indices/labels [B, N]`` -> ``(z [n, C], y [n], sample [n])`` without padding."""
    flat = features.flatten(2)                                            # [B, C, V]
    picked = torch.gather(flat, 2, indices.clamp_min(0)[:, None, :].expand(-1, flat.shape[1], -1))  # [B, C, N]
    keep = labels >= 0
    sample = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    return picked.transpose(1, 2)[keep], labels[keep], sample[keep]


def corresponding_rows(z1: torch.Tensor, z2: torch.Tensor, pairs: Optional[torch.Tensor]):
    """Rows ``[M, C]`` of two views' projections at corresponding cells.

    ``z1, z2 [B, C, *grid]``; ``pairs [B, 2, K]`` flat cell indices of view 1 and view 2 (-1 = padding),
    or None: views with one geometry, where every cell corresponds to itself.
    """
    if pairs is None:
        return flatten_feature_map(z1), flatten_feature_map(z2)
    keep = pairs[:, 0] >= 0
    rows1, _, _ = _gather(z1, pairs[:, 0], torch.where(keep, 0, -1))
    rows2, _, _ = _gather(z2, pairs[:, 1], torch.where(keep, 0, -1))
    return rows1, rows2


def _global_count(count: int, device: torch.device) -> int:
    """Rows over all ranks (the identity loss sums over all of them), so every rank skips the same levels."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = torch.tensor(float(count), device=device)
        dist.all_reduce(total)
        return int(total.item())
    return int(count)


class MixCLObjective(nn.Module):
    """``forward(batch)`` -> ``(L_id + alpha L_label + beta L_recon, logs)``; see the module docstring.

    Batch tensors (B samples): ``views [B, 3, 1, *P]`` (V1, V1', V2), ``patches [B, 3, 1, *P]``
    (their reconstruction targets), ``index1/label1/index2/label2 [B, N]`` (sampled voxels
    of V1 and V2 on the label level's grid; label -1 = padding), and optionally
    ``pairs [B, L, 2, K]`` (corresponding cells of V1 and V1' on each identity level's grid,
    -1 = padding; without it every cell corresponds to itself), ``dataset [B]`` (the source
    dataset: background is a negative only within it) and ``index [B]`` (sample indices: they
    time the ``term_gradients`` events).
    """

    def __init__(self, backbone: nn.Module, settings: Dict[str, Any], gradient_log: Optional[TermGradientLog] = None):
        super().__init__()
        self.backbone = backbone
        self.settings = dict(settings)
        self.level_index = {name: LEVEL_NAMES.index(name) for name in LEVEL_NAMES}
        used = sorted(set(self.settings["identity_levels"]) | {self.settings["label_level"]},
                      key=LEVEL_NAMES.index)
        self.projectors = nn.ModuleDict({name: projector(backbone.level_channels[self.level_index[name]])
                                         for name in used})
        self.reconstruction = nn.Conv3d(backbone.decoder_channels, backbone.in_channels, 1)
        self.gradient_log = gradient_log

    def encoder_parameters(self) -> List[nn.Parameter]:
        prefixes = tuple(self.backbone.encoder_parameter_prefixes())
        return [p for name, p in self.backbone.named_parameters() if name.startswith(prefixes) and p.requires_grad]

    def identity_term(self, projected: Dict[str, torch.Tensor], size: int, batch: Dict[str, torch.Tensor],
                      logs: Dict[str, float]) -> torch.Tensor:
        """Identity loss over the levels (mean or sum), skipping a level with fewer rows than channels."""
        settings = self.settings
        terms = []
        # Skipped levels stay in the graph with weight 0: DDP expects a gradient for every projector.
        unused = None
        for position, name in enumerate(settings["identity_levels"]):
            z = projected[name]
            pairs = batch["pairs"][:, position] if "pairs" in batch else None
            z1, z2 = corresponding_rows(z[:size], z[size:2 * size], pairs)
            rows = _global_count(z1.shape[0], z.device)
            logs[f"id_{name}_pixels"] = float(rows)
            if rows == 0 or (settings["skip_thin_levels"] and rows < z.shape[1]):
                # Fewer pixels than channels: the correlation matrix has rank < C and the off-diagonal
                # sum a floor that no feature can lower (docs/pretraining.md), so this level sits out.
                zero = z.sum() * 0.0
                unused = zero if unused is None else unused + zero
                continue
            term = identity_loss(z1, z2, lambd=settings["lambd"], normalization=settings["normalization"],
                                 reduction=settings["identity_reduction"])
            terms.append(term)
            logs[f"id_{name}"] = float(term.detach())
        total = torch.stack(terms) if terms else torch.zeros(1, device=batch["views"].device)
        total = total.mean() if settings["identity_reduction"] == "mean" else total.sum()
        return total if unused is None else total + unused

    def terms(self, batch: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
        """The three weighted terms ``{"identity", "label": alpha L_label, "recon": beta L_recon}`` and the logs."""
        settings = self.settings
        views = batch["views"]
        size = views.shape[0]
        stacked = views.transpose(0, 1).reshape(3 * size, *views.shape[2:])   # [V1 of all, V1' of all, V2 of all]
        levels = self.backbone.encode(stacked)

        logs: Dict[str, float] = {}
        projected: Dict[str, torch.Tensor] = {}
        for name, head in self.projectors.items():
            projected[name] = head(levels[self.level_index[name]][: 2 * size] if name != settings["label_level"]
                                   else levels[self.level_index[name]])
        identity = self.identity_term(projected, size, batch, logs)

        label_features = projected[settings["label_level"]]
        z1, y1, s1 = _gather(label_features[:size], batch["index1"], batch["label1"])
        z2, y2, s2 = _gather(label_features[2 * size:], batch["index2"], batch["label2"])
        dataset = batch.get("dataset")
        dataset = dataset.reshape(-1) if dataset is not None else torch.zeros(size, dtype=torch.long,
                                                                               device=views.device)
        label = label_contrastive_loss(z1.float(), y1, z2.float(), y2, tau=settings["tau"], background=0,
                                       reduction=settings["label_reduction"],
                                       tile_size=int(settings["label_tile_size"]),
                                       background_negatives=bool(settings["background_negatives"]),
                                       groups1=dataset[s1], groups2=dataset[s2])

        reconstruction = self.reconstruction(self.backbone.decode(levels))
        targets = batch["patches"].transpose(0, 1).reshape(reconstruction.shape)
        recon = torch.mean((reconstruction.float() - targets.float()) ** 2)

        weighted = {"identity": identity, "label": settings["alpha"] * label, "recon": settings["beta"] * recon}
        # Without the floor the deepest levels collapse to a position code: the reconstruction reaches
        # them only through the decoder, which has the content from the skips (docs/pretraining.md).
        position = position_floor(levels, LEVEL_NAMES, settings["position_levels"], settings["position_weight"])
        if position is not None:
            weighted["position"] = settings["position_weight"] * position
            logs["position"] = float(position.detach())
        # The label loss is exactly 0 (and so is its gradient) when the pairs hold no negative or no positive.
        logs.update(identity=float(identity.detach()), label=float(label.detach()), recon=float(recon.detach()),
                    label_pixels=float(z1.shape[0] + z2.shape[0]), label_active=float(label.detach() != 0))
        return weighted, logs

    def forward(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        weighted, logs = self.terms(batch)
        loss = sum(weighted.values())
        if self.gradient_log is not None and self.training:
            self.gradient_log.count_label_gradient(logs["label_active"] > 0)
            step = self.gradient_log.step_to_measure(batch)
            if step is not None:
                self.gradient_log.report(step, encoder_gradient_norms(weighted, self.encoder_parameters()))
        return loss, logs


def build(config: RunConfig, backbone: nn.Module, sources: PretrainSources, length: int):
    """The pretrain driver's entry point: ``(MixCLObjective, MixCLSamples)``."""
    settings = {key: config.method.get(key, default) for key, default in DEFAULTS.items()}
    check_settings(settings)
    train = config.train
    per_rank_step = train.batch_size * train.grad_accumulation
    gradient_log = TermGradientLog(int(settings["gradient_log_every"]), length // max(train.max_steps, 1),
                                   per_rank_step)
    objective = MixCLObjective(backbone, settings, gradient_log)
    samples = MixCLSamples(sources, config.model.patch_size, settings, config.train.seed, length)
    return objective, samples
