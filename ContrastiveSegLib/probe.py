"""The ``probe`` command: what a frozen encoder knows, measured without training it.

Two numbers per encoder (a pre-training checkpoint, a fine-tuned model's
encoder, or a random initialisation):

* **linear-probe Dice**: the encoder's features of every level, upsampled to
  the preprocessed volume's grid, feed a multinomial logistic regression fitted
  on a few thousand labelled voxels per class of the training cases; its
  arg-max is scored per organ on the test cases.  A linear classifier can only
  use what the features already separate, so this ranks encoders by how much
  anatomy they encode, not by how well a decoder can be trained on them.
* **position share** per encoder level: the share of the level's feature
  variance that voxel position within the patch explains alone.  Over many
  patches, the variance (across positions) of the per-position mean feature,
  divided by the total variance.  1 means the features say where a voxel sits
  in the patch and nothing else; a feature independent of position gives
  about 1/N for N patches (the noise left in a mean of N).

Features of a whole volume come from MONAI's sliding window, each level
stitched at its own resolution.  Upsampling (trilinear) is linear, and so is
the classifier, so the test volumes are classified level by level at each
level's resolution and only the class scores are upsampled: no full-resolution
copy of all the channels is ever held.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, PreprocessConfig, RunConfig
from .data.preprocess import PreparedCase
from .errors import InputError
from .models import LEVEL_NAMES, build_backbone

# Both backbones downsample four times, so a window start on a multiple of 16
# lands on a whole voxel at every level.
LEVEL_STRIDE = 16


@dataclass
class ProbeSettings:
    """How the probe samples and fits (everything a result depends on besides the encoder and the data)."""

    seed: int = 0                     # voxel sampling, patch positions and (with --init none) the weights
    voxels_per_class: int = 2000      # training voxels drawn per class (all of a class that has fewer)
    position_patches: int = 32        # patches the position share is measured on
    l2: float = 1e-2                  # ridge penalty on the standardised features' weights
    max_iterations: int = 300         # L-BFGS iterations of the logistic regression


@dataclass
class LinearProbe:
    """A linear classifier on raw (unstandardised) concatenated level features.

    ``weight [K, F]`` and ``bias [K]`` for K classes (background first) and F
    features (the levels' channels in ``LEVEL_NAMES`` order); the
    standardisation the fit used is folded in.
    """

    weight: torch.Tensor
    bias: torch.Tensor


# --- encoder -----------------------------------------------------------------------------------------
def probe_configs(init: str, model: Dict[str, object], preprocess: Dict[str, object]
                  ) -> Tuple[ModelConfig, PreprocessConfig]:
    """The network and preprocessing to probe with.

    Settings given in ``model`` / ``preprocess`` (non-None values) win; the
    rest come from the checkpoint's own run settings, else the defaults of the
    other commands.
    """
    config = RunConfig()
    if init != "none":
        from .engine.checkpoint import load_checkpoint

        state = load_checkpoint(init)
        saved = RunConfig.from_dict(state.get("config", {}) or {"model": state.get("model_config", {})})
        config.model, config.preprocess = saved.model, saved.preprocess
    for key, value in model.items():
        if value is not None:
            setattr(config.model, key, value)
    for key, value in preprocess.items():
        if value is not None:
            setattr(config.preprocess, key, value)
    config.model.patch_size = tuple(int(p) for p in config.model.patch_size)
    config.preprocess.spacing = tuple(float(s) for s in config.preprocess.spacing)
    config.model.validate()
    return config.model, config.preprocess


def load_encoder(init: str, model: ModelConfig, seed: int) -> Tuple[nn.Module, Dict[str, List[str]]]:
    """The backbone whose encoder is probed, in eval mode, and what ``--init`` loaded.

    ``init`` = "none": a random initialisation drawn with ``seed`` (the global
    torch generator is left as it was).  Otherwise the encoder of that
    checkpoint (pre-training, finetune or selftrain); any tensor that does not
    fit is an :class:`InputError` (see ``load_pretrained_weights``).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_backbone(model)
    report: Dict[str, List[str]] = {"loaded": [], "interpolated": [], "not_loaded": []}
    if init != "none":
        from .engine.checkpoint import load_pretrained_weights

        report = load_pretrained_weights(backbone, init, encoder_only=True).to_dict()
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    return backbone.eval(), report


def _window_overlaps(patch: Sequence[int]) -> List[float]:
    """Half-overlapping windows where the half step is a multiple of 16 voxels, else touching ones."""
    return [0.5 if int(p) % (2 * LEVEL_STRIDE) == 0 else 0.0 for p in patch]


def encoder_levels(backbone: nn.Module, image: np.ndarray, patch: Sequence[int]
                   ) -> Tuple[List[torch.Tensor], Tuple[int, int, int]]:
    """Every encoder level of a whole preprocessed volume, each at its own resolution.

    Args:
        backbone: a backbone with ``encode`` (see models/backbones.py).
        image: ``[1, X, Y, Z]`` float32, the preprocessed volume (at least one patch large).
        patch: the window, the network's training patch.

    Returns:
        ``(levels, grid)``: ``levels[l]`` is ``[C_l, G_x / 2^l, G_y / 2^l, G_z / 2^l]`` on the
        ``grid`` ``(G_x, G_y, G_z)``, the volume padded at its far end to a multiple of 16.
    """
    from monai.inferers import sliding_window_inference

    shape = image.shape[1:]
    grid = tuple(int(math.ceil(max(s, p) / LEVEL_STRIDE) * LEVEL_STRIDE) for s, p in zip(shape, patch))
    volume = torch.zeros((1, 1) + grid, dtype=torch.float32)
    volume[0, 0, :shape[0], :shape[1], :shape[2]] = torch.as_tensor(image[0], dtype=torch.float32)
    device = next(backbone.parameters()).device
    with torch.no_grad():
        levels = sliding_window_inference(volume, roi_size=tuple(int(p) for p in patch), sw_batch_size=1,
                                          predictor=lambda x: tuple(backbone.encode(x)),
                                          overlap=_window_overlaps(patch), mode="constant",
                                          sw_device=device, device="cpu")
    return [torch.as_tensor(level)[0].float() for level in levels], grid


def features_at_voxels(levels: Sequence[torch.Tensor], voxels: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """The levels upsampled to ``grid`` (trilinear, ``align_corners=False``), read at ``voxels`` only.

    Equal to ``F.interpolate(level[None], size=grid, mode="trilinear")[0][:, x, y, z]``
    for each level, concatenated, without building the upsampled volumes.

    Args:
        levels: ``[C_l, *grid / 2^l]`` each.
        voxels: ``[N, 3]`` integer voxel indices on ``grid``.

    Returns:
        ``[N, sum C_l]``.
    """
    # The centre of voxel i of an n-voxel axis sits at (2i + 1) / n - 1 in grid_sample's
    # align_corners=False coordinates, at every level's resolution alike.
    normalised = (2.0 * voxels.double() + 1.0) / torch.tensor([float(g) for g in grid], dtype=torch.float64) - 1.0
    # grid_sample reads its last coordinate along the input's last axis.
    sample_grid = normalised.flip(-1).float().view(1, -1, 1, 1, 3)
    columns = []
    for level in levels:
        values = F.grid_sample(level[None], sample_grid, mode="bilinear", padding_mode="border", align_corners=False)
        columns.append(values.view(level.shape[0], -1).t())
    return torch.cat(columns, dim=1)


# --- the linear classifier ---------------------------------------------------------------------------
def fit_linear_probe(features: torch.Tensor, classes: torch.Tensor, num_classes: int, l2: float = 1e-2,
                     max_iterations: int = 300) -> LinearProbe:
    """Multinomial logistic regression (cross-entropy + ``l2 / 2 * |W|^2``) by full-batch L-BFGS.

    Args:
        features: ``[N, F]`` training features.
        classes: ``[N]`` integer classes in ``0..num_classes-1``.

    The voxels are drawn class by class (balanced), so the fit weighs every
    class alike, however small the organ: the probe measures how well the
    features separate the classes, not how often each occurs.

    The features are standardised for the fit (zero mean, unit variance per
    feature; the weights start at zero, so the result is deterministic); the
    returned probe applies to raw features.
    """
    x = features.double()
    mean = x.mean(0)
    scale = x.std(0).clamp_min(1e-8)
    z = (x - mean) / scale
    target = classes.long()
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iterations, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimiser.zero_grad()
        loss = F.cross_entropy(z @ weight.t() + bias, target) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    weight, bias = weight.detach(), bias.detach()
    raw_weight = weight / scale
    return LinearProbe(raw_weight, bias - raw_weight @ mean)


def predict_volume(probe: LinearProbe, levels: Sequence[torch.Tensor], grid: Sequence[int],
                   shape: Sequence[int]) -> np.ndarray:
    """Arg-max classes ``[X, Y, Z]`` (uint8) of a volume of ``shape`` from its ``levels`` on ``grid``.

    Each level's class scores are computed at its own resolution and upsampled
    to ``grid`` (the same trilinear upsampling the training features had), then
    summed; the padding beyond ``shape`` is cut off.
    """
    scores = probe.bias.float().view(-1, 1, 1, 1).expand(-1, *grid).clone()
    offset = 0
    for level in levels:
        channels = level.shape[0]
        part = torch.einsum("kc,c...->k...", probe.weight[:, offset:offset + channels].float(), level)
        scores += F.interpolate(part[None], size=tuple(grid), mode="trilinear", align_corners=False)[0]
        offset += channels
    return scores[:, :shape[0], :shape[1], :shape[2]].argmax(0).numpy().astype(np.uint8)


def sample_training_voxels(labels: Sequence[np.ndarray], num_classes: int, per_class: int,
                           rng: np.random.Generator) -> List[np.ndarray]:
    """Up to ``per_class`` voxels of every class, pooled over cases, drawn without replacement.

    Args:
        labels: ``[X, Y, Z]`` integer label volumes, one per case.

    Returns:
        One ``[n, 4]`` array per class of ``(case, x, y, z)`` rows.
    """
    chosen = []
    for cls in range(num_classes):
        where = [np.argwhere(label == cls) for label in labels]
        pool = np.concatenate([np.column_stack([np.full(len(w), i), w]) for i, w in enumerate(where)], axis=0)
        count = min(per_class, len(pool))
        chosen.append(pool[np.sort(rng.choice(len(pool), size=count, replace=False))])
    return chosen


def linear_probe_dice(train_cases: Sequence[PreparedCase], test_cases: Sequence[PreparedCase],
                      featurize: Callable[[np.ndarray], Tuple[List[torch.Tensor], Tuple[int, int, int]]],
                      targets: Sequence[str], settings: ProbeSettings, rng: np.random.Generator) -> Dict:
    """Fit a linear probe on sampled voxels of ``train_cases``; per-organ Dice of its arg-max on ``test_cases``.

    Args:
        train_cases, test_cases: preprocessed cases with labels (classes 0..K as ``targets``).
        featurize: ``image [1, X, Y, Z] -> (levels, grid)`` as :func:`encoder_levels` returns them.

    Returns:
        ``{"dice": {organ: mean over test cases, "mean": ...}, "dice_per_case": ..., "training_voxels": ...}``.
    """
    from .engine.metrics import dice_per_label, mean_dice

    num_classes = len(targets) + 1
    class_names = ["background"] + list(targets)
    chosen = sample_training_voxels([case.label[0] for case in train_cases], num_classes,
                                    settings.voxels_per_class, rng)
    missing = [name for name, rows in zip(class_names, chosen) if len(rows) == 0]
    if missing:
        raise InputError(f"no training case labels {', '.join(missing)}", path="--data",
                         fix="probe only organs the training cases label, or add cases that do")
    rows = np.concatenate(chosen, axis=0)
    classes = torch.as_tensor(np.concatenate([np.full(len(c), k) for k, c in enumerate(chosen)]))
    blocks: Dict[int, torch.Tensor] = {}
    for index, case in enumerate(train_cases):
        mine = np.flatnonzero(rows[:, 0] == index)
        if len(mine):
            levels, grid = featurize(case.image)
            blocks[index] = features_at_voxels(levels, torch.as_tensor(rows[mine, 1:]), grid)
    features = torch.zeros(len(rows), next(iter(blocks.values())).shape[1], dtype=torch.float32)
    for index, block in blocks.items():
        features[np.flatnonzero(rows[:, 0] == index)] = block
    probe = fit_linear_probe(features, classes, num_classes, l2=settings.l2, max_iterations=settings.max_iterations)

    names = {index: name for index, name in enumerate(targets, start=1)}
    per_case = {}
    for case in test_cases:
        levels, grid = featurize(case.image)
        prediction = predict_volume(probe, levels, grid, case.image.shape[1:])
        per_case[case.case_id] = dice_per_label(prediction, case.label[0], names)
    dice: Dict[str, Optional[float]] = {}
    for name in targets:
        values = [scores[name] for scores in per_case.values() if scores.get(name) is not None]
        dice[name] = float(np.mean(values)) if values else None
    dice["mean"] = mean_dice(dice)
    return {"dice": dice, "dice_per_case": per_case,
            "training_voxels": {name: int(len(c)) for name, c in zip(class_names, chosen)}}


# --- position share ----------------------------------------------------------------------------------
class PositionVarianceShare:
    """Share of a feature map's variance explained by position in the patch alone, accumulated over patches.

    For features ``f[n, c, p]`` of patch n, channel c, position p:
    ``sum_c var_p(mean_n f[n, c, p]) / sum_c var_{n,p}(f[n, c, p])``.
    Running sums in float64 keep memory at one patch's size.
    """

    def __init__(self):
        self.count = 0
        self.sum_by_position: Optional[torch.Tensor] = None   # [C, P]
        self.sum_of_squares: Optional[torch.Tensor] = None    # [C]

    def add(self, features: torch.Tensor) -> None:
        """``features [B, C, *S]``: one level of B patches."""
        flat = features.detach().double().reshape(features.shape[0], features.shape[1], -1)
        if self.sum_by_position is None:
            self.sum_by_position = torch.zeros(flat.shape[1:], dtype=torch.float64)
            self.sum_of_squares = torch.zeros(flat.shape[1], dtype=torch.float64)
        self.sum_by_position += flat.sum(0)
        self.sum_of_squares += flat.pow(2).sum(dim=(0, 2))
        self.count += flat.shape[0]

    def share(self) -> Optional[float]:
        if not self.count:
            return None
        positions = self.sum_by_position.shape[1]
        mean_by_position = self.sum_by_position / self.count                         # [C, P]
        grand_mean = mean_by_position.mean(1)                                        # [C]
        total = (self.sum_of_squares / (self.count * positions) - grand_mean.pow(2)).sum()
        between = (mean_by_position - grand_mean[:, None]).pow(2).mean(1).sum()
        return float(between / total) if total > 0 else 0.0


def position_shares(backbone: nn.Module, volumes: Sequence[np.ndarray], patch: Sequence[int], count: int,
                    rng: np.random.Generator, batch_size: int = 2) -> Dict[str, Optional[float]]:
    """Position share of every encoder level over ``count`` patches drawn uniformly from ``volumes``.

    Args:
        volumes: ``[1, X, Y, Z]`` preprocessed volumes, each at least one patch large.
    """
    patch = [int(p) for p in patch]
    shares = [PositionVarianceShare() for _ in LEVEL_NAMES]
    device = next(backbone.parameters()).device
    drawn = []
    for _ in range(count):
        volume = volumes[int(rng.integers(len(volumes)))]
        start = [int(rng.integers(s - p + 1)) for s, p in zip(volume.shape[1:], patch)]
        drawn.append(volume[:, start[0]:start[0] + patch[0], start[1]:start[1] + patch[1],
                            start[2]:start[2] + patch[2]])
    with torch.no_grad():
        for first in range(0, count, batch_size):
            batch = torch.as_tensor(np.stack(drawn[first:first + batch_size]), dtype=torch.float32).to(device)
            for accumulator, level in zip(shares, backbone.encode(batch)):
                accumulator.add(level.cpu())
    return {name: accumulator.share() for name, accumulator in zip(LEVEL_NAMES, shares)}


# --- the command -------------------------------------------------------------------------------------
def run_probe(init: str, data: Sequence[str], test_data: Sequence[str], labels: Sequence[str],
              model: Optional[Dict[str, object]] = None, preprocess: Optional[Dict[str, object]] = None,
              settings: Optional[ProbeSettings] = None, device: str = "cpu", progress: bool = True) -> Dict:
    """Probe the encoder of ``init`` (a checkpoint path, or "none" for a random one); returns the result dict.

    Args:
        data, test_data: dataset specs (as ``finetune --data``) to fit on and to score on.
        labels: canonical organ names, classes 1..K.
        model, preprocess: ``ModelConfig`` / ``PreprocessConfig`` fields to set (None: from the checkpoint).
    """
    from .data.catalog import check_target_names, load_datasets
    from .data.preprocess import CasePreparer
    from .engine.device import choose_device

    settings = settings or ProbeSettings()
    targets = list(labels)
    if not targets:
        raise InputError("no organ to probe", path="--labels", fix="give --labels liver,spleen,...")
    if settings.voxels_per_class < 1 or settings.position_patches < 1:
        raise InputError("--voxels-per-class and --position-patches must be at least 1", path="command line")
    train_sets, test_sets = load_datasets(list(data)), load_datasets(list(test_data))
    check_target_names(train_sets, targets)
    check_target_names(test_sets, targets)
    model_config, preprocess_config = probe_configs(init, model or {}, preprocess or {})
    model_config.out_channels = len(targets) + 1
    backbone, init_report = load_encoder(init, model_config, settings.seed)
    backbone.to(choose_device(device))

    preparer = CasePreparer(preprocess_config, targets, pad_to=model_config.patch_size)
    train_cases = preparer.prepare_all([c for d in train_sets for c in d.cases], progress=progress)
    test_cases = preparer.prepare_all([c for d in test_sets for c in d.cases], progress=progress)
    if not train_cases:
        raise InputError("no training case labels any of the chosen organs", path="--data",
                         fix="check --labels against the datasets' label names")
    if not test_cases:
        raise InputError("no test case labels any of the chosen organs", path="--test-data",
                         fix="check --labels against the datasets' label names")
    patch = model_config.patch_size
    rng = np.random.default_rng([settings.seed, 2718])
    scores = linear_probe_dice(train_cases, test_cases, lambda image: encoder_levels(backbone, image, patch),
                               targets, settings, rng)
    shares = position_shares(backbone, [case.image for case in train_cases + test_cases], patch,
                             settings.position_patches, rng)
    return {
        "dice": scores["dice"],
        "position_share": shares,
        "init": init,
        "model": asdict(model_config),
        "preprocess": asdict(preprocess_config),
        "settings": asdict(settings),
        "train_cases": [case.case_id for case in train_cases],
        "test_cases": [case.case_id for case in test_cases],
        "training_voxels": scores["training_voxels"],
        "dice_per_case": scores["dice_per_case"],
        "init_report": {key: len(value) for key, value in init_report.items()},
    }
