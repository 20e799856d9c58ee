"""GCL pre-training: gradient-guided contrast with multi-perspective meta labels (docs/gcl.md).

Only the paper's abstract and one figure caption are public.  From them: one
shared encoder feeds an image head (global average pooling -> MLP) and a pixel
head; images sharing a meta label are positives; a Gradient Mitigator resolves
conflicts between the losses of different meta labels; a Gradient Filter keeps
the pixel pairs with the largest loss gradients, guided by the image branch.
Everything else here is our design (docs/gcl.md lists which is which).

Per sample (``GCLSamples``): a case, a crop of it, two views each with its own
spatial transform (crop offset, rotation, scale, elastic; ``view_geometry``,
default ``independent``) or one shared transform (``shared``), then intensity
augmentation; its meta-label ids (data/meta_labels.py) and
``pixels_per_patch`` pairs of corresponding locations of the two views on the
pixel level's grid (docs/pretraining.md).

The objective (``GCLObjective``) encodes both views in one batch.  For every
meta label ``k``::

    L_k = image_weight * SupCon_k(image embeddings of both views)
        + pixel_weight * filtered, image-weighted InfoNCE_k(pixel embeddings)

and the Gradient Mitigator combines the ``L_k`` with PCGrad on the shared
encoder (``mitigator``: ``feature``, ``param`` or ``off``).  A variance floor across the
views at every position of ``position_levels`` (``position_variance_loss``,
weight ``position_weight``; ours) is added after the surgery: without it the
image branch collapses the bottleneck to a code for where a voxel sits in
the patch (docs/pretraining.md, "Position collapse").  The trainer calls
``loss.backward()`` itself, so the surgery is done inside ``forward`` and the
returned loss is a *surrogate*: its value is ``sum_k L_k`` and its gradient is
the surgered one (see :meth:`GCLObjective.forward`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..config import RunConfig
from ..data.meta_labels import BUILTIN, MetaLabels
from ..data.sampling import PatchSampler, crop_or_pad
from ..data.sources import PretrainSources
from ..data.views import (
    VIEW_GEOMETRIES,
    draw_view_pair,
    intensity_view,
    render_view,
    view_correspondence,
    view_crop_shape,
)
from ..errors import InputError
from ..losses import gradient_filter_mask, pcgrad, pcgrad_per_sample, supcon_loss
from ..losses.position_variance import position_floor
from ..models.backbones import LEVEL_NAMES
from .term_gradients import TermGradientLog, encoder_gradient_norms

# Every setting of the method.  The paper's abstract fixes none of the numbers: all values are ours.
DEFAULTS: Dict[str, Any] = {
    "meta_labels": list(BUILTIN),  # dataset, case, position, and/or per-case attribute names
    "positions": 4,                # S, partitions of the axial body extent for "position"
    "meta_csv": None,              # per-case attributes: a case column plus attribute columns
    "mitigator": "feature",        # "feature" (PCGrad per sample on the encoder outputs), "param" (exact), "off"
    "tau_image": 0.1,              # SupCon temperature of the image branch
    "tau_pixel": 0.1,              # InfoNCE temperature of the pixel branch
    "keep_fraction": 0.25,         # q of the Gradient Filter: share of candidate pairs kept per anchor
    "pixels_per_patch": 64,        # sampled locations per patch on the pixel level's grid
    "image_head_dims": [512, 128],  # image head MLP: hidden width, embedding width
    "pixel_level": "enc3",         # encoder level the pixel head reads (1/4 resolution)
    "image_weight": 1.0,           # weight of the image branch in each L_k
    "position_weight": 1.0,        # weight of the per-position variance floor (ours; 0: off, as in the paper)
    "position_levels": ["enc4", "bottleneck"],  # levels the variance floor holds on (ours)
    # weight of the pixel branch in each L_k: at 1 its encoder gradient was 85-137x the image branch's at step 0
    # and the image branch barely trained the encoder; 0.03 brings them within 4x at batch 4 (docs/gcl.md)
    "pixel_weight": 0.03,
    "same_case_prob": 0.5,         # a sample shares its micro-batch's case with this probability
    "foreground_ratio": 0.67,      # share of patches centred on a labelled voxel
    "spatial_prob": 0.5,           # elastic and affine deformation of each view, each
    "intensity_prob": 0.2,         # shift, gamma, smoothing, noise of each view, each
    "view_geometry": "independent",  # "independent": each view its own transform; "shared": one for both
    "max_shift": 0.25,             # a view's centre moves up to this share of the patch per axis
    "match_tolerance": 0.5,        # corresponding = source coordinates within this many cells
    "gradient_log_every": 50,      # term_gradients event every this many steps, and at step 0 (0: step 0 only)
}

MITIGATORS = ("feature", "param", "off")


def check_settings(settings: Dict[str, Any], batch_size: int) -> None:
    """Clear errors for settings that cannot work, before any data is read."""
    if int(batch_size) < 2:
        raise InputError(f"GCL needs at least 2 patches per step and process, got --batch-size {batch_size}",
                         path="--batch-size",
                         fix="use --batch-size 2 or more: the contrastive losses compare the patches of a batch")
    if settings["mitigator"] not in MITIGATORS:
        raise InputError(f"mitigator {settings['mitigator']!r} is not one of {', '.join(MITIGATORS)}",
                         path="--mitigator")
    if settings["pixel_level"] not in LEVEL_NAMES:
        raise InputError(f"unknown level {settings['pixel_level']!r}", path="--set pixel_level",
                         fix=f"levels are {', '.join(LEVEL_NAMES)}")
    keep = settings["keep_fraction"]
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise InputError(f"keep_fraction must be in (0, 1], got {keep!r}", path="--set keep_fraction")
    for name in ("tau_image", "tau_pixel"):
        if not settings[name] > 0:
            raise InputError(f"{name} must be > 0, got {settings[name]}", path=f"--set {name}")
    unknown = [name for name in settings["position_levels"] if name not in LEVEL_NAMES]
    if unknown:
        raise InputError(f"unknown level(s) {unknown}", path="--set position_levels",
                         fix=f"levels are {', '.join(LEVEL_NAMES)}")
    for name in ("image_weight", "pixel_weight", "position_weight"):
        if settings[name] < 0:
            raise InputError(f"{name} must be >= 0, got {settings[name]}", path=f"--set {name}")
    if int(settings["pixels_per_patch"]) < 1 or int(settings["positions"]) < 1:
        raise InputError("pixels_per_patch and positions must be at least 1", path="--set")
    dims = settings["image_head_dims"]
    if not isinstance(dims, (list, tuple)) or len(dims) != 2 or any(int(d) < 1 for d in dims):
        raise InputError(f"image_head_dims must be two widths [hidden, embedding], got {dims!r}",
                         path="--set image_head_dims", fix="write e.g. --set image_head_dims=512,128")
    if settings["view_geometry"] not in VIEW_GEOMETRIES:
        raise InputError(f"view_geometry {settings['view_geometry']!r} is not one of {', '.join(VIEW_GEOMETRIES)}",
                         path="--set view_geometry")
    if not settings["max_shift"] >= 0 or not settings["match_tolerance"] > 0:
        raise InputError("max_shift must be >= 0 and match_tolerance > 0", path="--set")
    for name in ("same_case_prob", "foreground_ratio", "spatial_prob", "intensity_prob"):
        if not 0 <= settings[name] <= 1:
            raise InputError(f"{name} must be in [0, 1], got {settings[name]}", path=f"--set {name}")


def method_settings_of(config: RunConfig) -> Dict[str, Any]:
    """The method's settings from ``config.method``, defaults filled in.

    ``--set image_head_dims=64,16`` arrives as strings: the widths are made integers
    here and in ``config.method``, so ``config.json`` records what was used.
    """
    settings = {key: config.method.get(key, default) for key, default in DEFAULTS.items()}
    dims = settings["image_head_dims"]
    if isinstance(dims, (list, tuple)):
        try:
            settings["image_head_dims"] = [int(d) for d in dims]
        except (TypeError, ValueError):
            raise InputError(f"image_head_dims must be two whole numbers, got {dims!r}", path="--set image_head_dims",
                             fix="write e.g. --set image_head_dims=512,128") from None
        if "image_head_dims" in config.method:
            config.method["image_head_dims"] = settings["image_head_dims"]
    return settings


def check(config: RunConfig, sources: PretrainSources) -> MetaLabels:
    """Check the settings and derive the meta labels (reads ``meta_csv``); raises :class:`InputError`."""
    settings = method_settings_of(config)
    check_settings(settings, config.train.batch_size)
    return MetaLabels(sources, settings["meta_labels"], settings["positions"], settings["meta_csv"])


# --- heads ----------------------------------------------------------------------------------------------

def image_head(channels: int, hidden: int, out: int) -> nn.Sequential:
    """Image head after global average pooling: Linear -> ReLU -> Linear (no batch norm: samples stay independent)."""
    return nn.Sequential(nn.Linear(int(channels), int(hidden)), nn.ReLU(inplace=True), nn.Linear(int(hidden), int(out)))


def pixel_head(channels: int) -> nn.Sequential:
    """Pixel head: two 1x1x1 convolutions ``[c, c]`` with instance norm + LeakyReLU between them."""
    c = int(channels)
    return nn.Sequential(nn.Conv3d(c, c, 1), nn.InstanceNorm3d(c, affine=True), nn.LeakyReLU(0.01, inplace=True),
                         nn.Conv3d(c, c, 1))


def level_factor(level: str) -> int:
    """How many input voxels one voxel of ``level`` spans per axis (enc1: 1, enc2: 2, ...)."""
    return 2 ** LEVEL_NAMES.index(level)


# --- pixel branch ---------------------------------------------------------------------------------------

def gcl_pixel_loss(f1: torch.Tensor, f2: torch.Tensor, share: torch.Tensor, weights: torch.Tensor, tau: float,
                   keep_fraction: float, return_kept: bool = False):
    """Filtered, image-weighted pixel InfoNCE of one meta label, both directions.

    Args:
        f1, f2: ``[B, N, C]`` pixel embeddings of the two views at the same N locations (L2-normalised inside).
        share: ``[B, B]`` bool, True where two patches share the meta label's value (the diagonal
            counts as True).
        weights: ``[B, B]`` weight of a negative of patch ``b`` taken from patch ``b'`` (the image
            branch's clipped cosine similarity; the diagonal is 1).  Treated as a constant.
        tau: temperature.
        keep_fraction: ``q`` of the Gradient Filter.

    For an anchor ``(b, n)`` of one view, the candidates are every location
    ``(b', n')`` of the other view with ``share[b, b']``: the positive is
    ``(b, n)``, the others are negatives.  With ``s = cos / tau`` and the
    negatives' logits shifted by ``log w``, :func:`gradient_filter_mask` keeps
    the positive and the negatives with the largest ``|p - y|`` (``p`` the
    softmax over the weighted logits: the size of each pair's gradient), and::

        loss(anchor) = -log( exp(s_pos) / (exp(s_pos) + sum_{kept neg} w * exp(s_neg)) )

    The result is the mean over the anchors of both views (view 1 -> view 2 and back).
    """
    batch, count, channels = f1.shape
    with torch.autocast(device_type=f1.device.type, enabled=False):
        a_all = F.normalize(f1.to(torch.promote_types(f1.dtype, torch.float32)), dim=-1).reshape(batch * count, -1)
        b_all = F.normalize(f2.to(torch.promote_types(f2.dtype, torch.float32)), dim=-1).reshape(batch * count, -1)
        patch = torch.arange(batch, device=f1.device).repeat_interleave(count)
        itself = torch.eye(batch, dtype=torch.bool, device=f1.device)   # a patch always shares with itself
        valid = (share.to(torch.bool) | itself)[patch[:, None], patch[None, :]]
        target = torch.eye(batch * count, dtype=torch.bool, device=f1.device)
        with torch.no_grad():
            log_weight = torch.log(weights.detach().to(a_all.dtype).clamp_min(0))[patch[:, None], patch[None, :]]
            log_weight = log_weight.masked_fill(target, 0.0)
        terms, kept = [], []
        for anchors, candidates in ((a_all, b_all), (b_all, a_all)):
            logits = anchors @ candidates.T / tau
            weighted = logits + log_weight
            keep = gradient_filter_mask(weighted.detach(), target, keep_fraction, valid)
            log_denominator = torch.logsumexp(weighted.masked_fill(~keep, float("-inf")), dim=1)
            terms.append(log_denominator - logits.diagonal())
            kept.append(keep.sum(dim=1).to(a_all.dtype) / valid.sum(dim=1).to(a_all.dtype))
        loss = torch.cat(terms).mean()
    if return_kept:
        return loss, float(torch.cat(kept).mean())
    return loss


def _unique_missing(labels: torch.Tensor) -> torch.Tensor:
    """Meta-label ids with each missing value (< 0) made unique, so it matches no other patch."""
    own = -1 - torch.arange(labels.shape[0], device=labels.device, dtype=labels.dtype)
    return torch.where(labels < 0, own, labels)


# --- objective ------------------------------------------------------------------------------------------

class GCLObjective(nn.Module):
    """``forward(batch)`` -> ``(surrogate loss, logs)``; see the module docstring.

    Batch tensors (B patches): ``view1, view2 [B, 1, *P]`` (two views of a patch),
    ``meta [B, K]`` int64 meta-label ids (-1 = no value), ``pixels [B, N]`` int64
    flat indices into view 1's pixel-level grid and ``pixels2 [B, N]`` the
    corresponding cells of view 2 (absent: the same indices, views with one
    geometry), ``index [B]`` the sample indices (they seed PCGrad's random
    projection order, so a resumed run repeats it, and time the
    ``term_gradients`` events).

    Args:
        backbone: a backbone with ``encode`` and ``level_channels``.
        settings: the method settings (``DEFAULTS`` keys).
        meta_names: the meta-label names, K of them, in the order of ``meta``'s columns.
        seed: the run's seed.
    """

    def __init__(self, backbone: nn.Module, settings: Dict[str, Any], meta_names: Sequence[str], seed: int = 0,
                 gradient_log: TermGradientLog | None = None):
        super().__init__()
        self.gradient_log = gradient_log
        self.backbone = backbone
        self.settings = dict(settings)
        self.meta_names = list(meta_names)
        self.seed = int(seed)
        self.pixel_index = LEVEL_NAMES.index(self.settings["pixel_level"])
        self.image_index = LEVEL_NAMES.index("bottleneck")
        hidden, out = (int(d) for d in self.settings["image_head_dims"])
        self.image_head = image_head(backbone.level_channels[self.image_index], hidden, out)
        self.pixel_head = pixel_head(backbone.level_channels[self.pixel_index])
        # The tensors the heads read: the "shared encoder outputs" of the feature-mode mitigator.
        self.shared_levels = sorted({self.pixel_index, self.image_index})

    # -- pieces, public so tests can recompute the surgery by hand --
    def encoder_parameters(self) -> List[nn.Parameter]:
        """Trainable backbone parameters of the encoder path (the ``param`` mitigator's shared parameters)."""
        prefixes = tuple(self.backbone.encoder_parameter_prefixes())
        return [p for name, p in self.backbone.named_parameters() if name.startswith(prefixes) and p.requires_grad]

    def head_parameters(self) -> List[nn.Parameter]:
        return [p for p in list(self.image_head.parameters()) + list(self.pixel_head.parameters()) if p.requires_grad]

    def order_generator(self, batch: Dict[str, torch.Tensor]) -> torch.Generator:
        """PCGrad's random orders for this micro-batch, seeded by ``(seed, first sample index)``."""
        first = int(batch["index"].reshape(-1)[0]) if "index" in batch else 0
        generator = torch.Generator()
        generator.manual_seed(int(np.random.default_rng([self.seed, first, 2]).integers(2**62)))
        return generator

    def shared_outputs(self, batch: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """Encode both views as one batch ``[V1 of all, V2 of all]``; copies of the levels the heads read.

        The heads read copies, not the level tensors themselves: ``enc3`` also
        feeds the deeper levels, so the gradient with respect to ``enc3``
        itself would include the image head's path through the bottleneck a
        second time.  The gradient with respect to a copy is only its head's.
        The copies are at least float32, so under autocast the task gradients are float32 too.
        """
        x = torch.cat([batch["view1"], batch["view2"]], dim=0)
        levels = self.backbone.encode(x)
        self.levels = levels   # the variance floor reads the levels themselves, outside the surgery
        return [levels[i].to(torch.promote_types(levels[i].dtype, torch.float32), copy=True)
                for i in self.shared_levels]

    def task_losses(self, shared: Sequence[torch.Tensor], batch: Dict[str, torch.Tensor]
                    ) -> Tuple[List[torch.Tensor], Dict[str, float]]:
        """``[L_1 .. L_K]`` from the shared outputs, and per-branch logs."""
        settings = self.settings
        by_level = dict(zip(self.shared_levels, shared))
        bottleneck, pixel_map = by_level[self.image_index], by_level[self.pixel_index]
        size = batch["view1"].shape[0]
        embeddings = self.image_head(bottleneck.mean(dim=tuple(range(2, bottleneck.ndim))))   # [2B, d]
        projected = self.pixel_head(pixel_map).flatten(2)                                    # [2B, c, V]
        pixels = batch["pixels"].long()
        pixels2 = batch["pixels2"].long() if "pixels2" in batch else pixels
        index = torch.cat([pixels, pixels2], dim=0)[:, None, :].expand(-1, projected.shape[1], -1)
        picked = torch.gather(projected, 2, index).transpose(1, 2)                           # [2B, N, c]
        f1, f2 = picked[:size], picked[size:]
        with torch.no_grad():
            # The image branch's view of how alike two patches are: one embedding per patch (both views).
            patch_embedding = F.normalize(F.normalize(embeddings[:size].float(), dim=1)
                                          + F.normalize(embeddings[size:].float(), dim=1), dim=1)
            weights = (patch_embedding @ patch_embedding.T).clamp_min(0)
            weights.fill_diagonal_(1.0)
        meta = batch["meta"].long()
        losses: List[torch.Tensor] = []
        logs: Dict[str, float] = {}
        kept_sum = 0.0
        self.branch_totals = {}
        for k, name in enumerate(self.meta_names):
            labels = _unique_missing(meta[:, k])
            image_term = supcon_loss(embeddings, torch.cat([labels, labels]), tau=settings["tau_image"])
            share = labels[:, None] == labels[None, :]
            pixel_term, kept = gcl_pixel_loss(f1, f2, share, weights, settings["tau_pixel"],
                                              settings["keep_fraction"], return_kept=True)
            kept_sum += kept
            weighted = {"image": settings["image_weight"] * image_term, "pixel": settings["pixel_weight"] * pixel_term}
            for branch, term in weighted.items():
                self.branch_totals[branch] = term if branch not in self.branch_totals else \
                    self.branch_totals[branch] + term
            losses.append(weighted["image"] + weighted["pixel"])
            logs[f"img_{name}"] = float(image_term.detach())
            logs[f"pix_{name}"] = float(pixel_term.detach())
        logs["kept_pairs"] = kept_sum / max(len(self.meta_names), 1)
        return losses, logs

    def forward(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The surrogate loss: value ``sum_k L_k``, gradient the Gradient Mitigator's.

        For shared tensors ``h`` with task gradients ``g_k`` and surgered
        combination ``g_comb``::

            surrogate = total + C - C.detach(),   C = sum_h (h * (g_comb - sum_k g_k).detach()).sum()

        so ``d surrogate / d h = g_comb`` while the heads (which ``C`` does
        not touch) get the sum of their plain gradients.  ``feature``: ``h``
        are the level tensors the heads read (both views of a patch form one
        sample of the per-sample surgery); ``param``: ``h`` are the encoder's
        parameters.
        """
        shared = self.shared_outputs(batch)
        losses, logs = self.task_losses(shared, batch)
        position = self.position_term(logs)
        if self.gradient_log is not None and self.training:
            step = self.gradient_log.step_to_measure(batch)
            if step is not None:
                terms = dict(self.branch_totals)
                if "position" in logs:
                    terms["position"] = position
                self.gradient_log.report(step, encoder_gradient_norms(terms, self.encoder_parameters()))
        self.branch_totals = {}
        total = torch.stack([loss.to(torch.promote_types(loss.dtype, torch.float32)) for loss in losses]).sum()
        mode = self.settings["mitigator"]
        surrogate = total
        logs["conflicts"] = 0.0
        if mode != "off" and len(losses) > 1:
            generator = self.order_generator(batch)
            if mode == "feature":
                correction, conflicts = self._feature_correction(losses, shared, generator)
            else:
                correction, conflicts = self._param_correction(losses, generator)
            surrogate = total + correction - correction.detach()
            logs["conflicts"] = conflicts
        # The variance floor is no meta-label task: it is added after the surgery, not projected.
        surrogate = surrogate + position
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # DDP expects a gradient for every parameter; the decoder takes no part in GCL.
            surrogate = surrogate + sum(p.reshape(-1)[0] * 0.0 for p in self.parameters() if p.requires_grad)
        for k, name in enumerate(self.meta_names):
            logs[f"L_{name}"] = float(losses[k].detach())
        return surrogate, logs

    def position_term(self, logs: Dict[str, float]) -> torch.Tensor:
        """``position_weight`` x the variance floor across the batch's views on ``position_levels``."""
        levels = self.levels
        self.levels = None
        weight = float(self.settings["position_weight"])
        term = position_floor(levels, LEVEL_NAMES, self.settings["position_levels"], weight)
        if term is None:
            return levels[0].sum() * 0.0
        logs["position"] = float(term.detach())
        return weight * term

    def _feature_correction(self, losses, shared, generator):
        size = shared[0].shape[0] // 2
        per_task = []
        for loss in losses:
            grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
            grads = [torch.zeros_like(h) if g is None else g for g, h in zip(grads, shared)]
            # [2B, ...] -> [B, 2 * F]: a patch's two views are one sample of the surgery.
            per_task.append(torch.cat([g.reshape(2, size, -1).transpose(0, 1).reshape(size, -1) for g in grads],
                                      dim=1))
        stacked = torch.stack(per_task)                                        # [K, B, F]
        combined = pcgrad_per_sample(stacked, generator)
        difference = (combined - stacked.sum(dim=0)).detach()                  # [B, F]
        correction = None
        offset = 0
        for h in shared:
            width = 2 * h[0].numel()
            part = difference[:, offset:offset + width].reshape(size, 2, -1).transpose(0, 1).reshape(h.shape)
            offset += width
            term = (h * part).sum()
            correction = term if correction is None else correction + term
        return correction, _conflict_fraction(stacked)

    def _param_correction(self, losses, generator):
        params = self.encoder_parameters()
        per_task = []
        for loss in losses:
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            per_task.append(grads)
        used = [i for i in range(len(params)) if any(grads[i] is not None for grads in per_task)]
        flat = [torch.cat([(grads[i] if grads[i] is not None else torch.zeros_like(params[i])).reshape(-1)
                           for i in used]) for grads in per_task]
        combined = pcgrad(flat, generator)
        difference = (combined - torch.stack(flat).sum(dim=0)).detach()
        correction = None
        offset = 0
        for i in used:
            p = params[i]
            part = difference[offset:offset + p.numel()].reshape(p.shape).to(p.dtype)
            offset += p.numel()
            term = (p * part).sum()
            correction = term if correction is None else correction + term
        return correction, _conflict_fraction(torch.stack(flat)[:, None, :])


def _conflict_fraction(stacked: torch.Tensor) -> float:
    """Share of (task pair, sample) with a negative dot product, ``stacked [K, B, F]``."""
    with torch.no_grad():
        dots = torch.einsum("kbf,jbf->kjb", stacked.float(), stacked.float())
        tasks = stacked.shape[0]
        upper = torch.triu(torch.ones(tasks, tasks, dtype=torch.bool, device=stacked.device), diagonal=1)
        pairs = dots[upper]                                                    # [pairs, B]
        return float((pairs < 0).float().mean()) if pairs.numel() else 0.0


# --- samples --------------------------------------------------------------------------------------------

class GCLSamples(Dataset):
    """Map-style dataset: item ``i`` is GCL sample ``i`` of the run.

    Item ``i`` is drawn from ``default_rng([seed, i])``, except its case: the
    samples of one micro-batch (``i // batch_size``) share a *group case*
    drawn from ``default_rng([seed, i // batch_size, 1])``; the first sample of
    the micro-batch always takes it, every other one with probability
    ``same_case_prob`` (else a dataset uniformly, then a case of it).  So
    batches hold positives for ``case`` and ``dataset`` often, and every draw
    is a function of ``(seed, i, batch_size)`` alone: resume is exact.
    """

    def __init__(self, sources: PretrainSources, meta: MetaLabels, patch_size, settings: Dict[str, Any], seed: int,
                 length: int, batch_size: int):
        self.sources = sources
        self.meta = meta
        self.settings = settings
        self.seed = int(seed)
        self.length = int(length)
        self.batch_size = max(int(batch_size), 1)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.sampler = PatchSampler([case.prepared for case in sources.cases], self.patch_size,
                                    settings["foreground_ratio"])
        self.datasets = [index for index, cases in enumerate(sources.by_dataset) if cases]
        self.factor = level_factor(settings["pixel_level"])
        self.grid_voxels = int(np.prod([max(p // self.factor, 1) for p in self.patch_size]))
        self.crop_size = view_crop_shape(self.patch_size, float(settings["max_shift"]))

    def __len__(self) -> int:
        return self.length

    def _random_case(self, rng: np.random.Generator) -> int:
        dataset = self.datasets[int(rng.integers(len(self.datasets)))]
        members = self.sources.by_dataset[dataset]
        return members[int(rng.integers(len(members)))]

    def case_of(self, index: int, rng: np.random.Generator) -> int:
        group_case = self._random_case(np.random.default_rng([self.seed, index // self.batch_size, 1]))
        if index % self.batch_size == 0 or rng.random() < self.settings["same_case_prob"]:
            return group_case
        return self._random_case(rng)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        index = int(index)
        rng = np.random.default_rng([self.seed, index])
        settings = self.settings
        case_index = self.case_of(index, rng)
        image = self.sources.cases[case_index].prepared.image
        centre = self.sampler.centre(case_index, rng)
        start = [min(max(c - p // 2, 0), max(dim - p, 0)) if dim >= p else c - p // 2
                 for c, p, dim in zip(centre, self.crop_size, image.shape[1:])]
        crop = crop_or_pad(image, start, self.crop_size)
        centre_z = start[2] + self.crop_size[2] // 2       # the crop's own centre, after keeping it inside
        transforms = draw_view_pair(rng, self.crop_size, self.patch_size, settings["view_geometry"],
                                    max_shift=float(settings["max_shift"]), spatial_prob=float(settings["spatial_prob"]))
        views = [intensity_view(render_view(crop, None, t, self.patch_size)[0], rng, settings["intensity_prob"])
                 for t in transforms]
        cells1, cells2 = view_correspondence(*transforms, self.patch_size, self.factor, settings["match_tolerance"])
        if cells1.size == 0:   # no overlap at this level (rare): the views' centres stand in for each other
            cells1 = cells2 = np.array([self.grid_voxels // 2], dtype=np.int64)
        count = int(settings["pixels_per_patch"])
        chosen = rng.choice(cells1.size, size=count, replace=count > cells1.size)
        as_tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array))  # noqa: E731
        return {"view1": as_tensor(views[0]), "view2": as_tensor(views[1]),
                "meta": as_tensor(self.meta.ids(case_index, centre_z)),
                "pixels": as_tensor(cells1[chosen]), "pixels2": as_tensor(cells2[chosen]),
                "index": torch.tensor(index, dtype=torch.int64)}


def build(config: RunConfig, backbone: nn.Module, sources: PretrainSources, length: int):
    """The pretrain driver's entry point: ``(GCLObjective, GCLSamples)``."""
    settings = method_settings_of(config)
    meta = check(config, sources)
    train = config.train
    gradient_log = TermGradientLog(int(settings["gradient_log_every"]), length // max(train.max_steps, 1),
                                   train.batch_size * train.grad_accumulation)
    objective = GCLObjective(backbone, settings, meta.names, seed=config.train.seed, gradient_log=gradient_log)
    samples = GCLSamples(sources, meta, config.model.patch_size, settings, config.train.seed, length,
                         config.train.batch_size)
    return objective, samples


__all__ = ["DEFAULTS", "GCLObjective", "GCLSamples", "build", "check", "check_settings", "gcl_pixel_loss",
           "image_head", "pixel_head"]
