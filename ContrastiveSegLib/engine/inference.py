"""Prediction: sliding-window inference, then back onto the input image's own grid.

The network sees the image on the run's preprocessing grid (RAS, training
spacing).  Its class probabilities are resampled *in physical space* onto the
grid of the image as it was given (size, spacing, origin, direction) and only
then turned into labels (arg-max), so the labelmap lines up with the input in
any viewer, whatever its orientation.  Only two steps touch the full-size
volume: one resampling down to the network's grid and one, label-sized,
back up (``docs/prediction.md`` has the profile).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from ..config import PreprocessConfig, RunConfig
from ..errors import InputError
from ..models import build_backbone
from .checkpoint import load_checkpoint
from .runfolder import RunFolder, load_label_table


@dataclass
class LoadedModel:
    backbone: nn.Module
    config: RunConfig
    labels: Dict[int, str]
    checkpoint: str
    postprocess: Optional[Dict] = None   # the run's post-processing decision (engine/postprocess.py)


def load_model(model_path: str, device: torch.device, checkpoint: str = "best") -> LoadedModel:
    """A trained segmentation model from a run folder (``best.pt``, else ``last.pt``) or a checkpoint file."""
    if os.path.isdir(model_path):
        run = RunFolder(model_path)
        preferred = run.best_checkpoint if checkpoint == "best" else run.last_checkpoint
        path = preferred if os.path.exists(preferred) else run.last_checkpoint
        if not os.path.exists(path):
            raise InputError("has no checkpoints (checkpoints/best.pt or last.pt)", path=model_path,
                             fix="give the --out folder of a finished finetune run")
    else:
        path = model_path
    state = load_checkpoint(path, map_location="cpu")
    if state.get("kind") == "pretrain":
        raise InputError("is a pre-training checkpoint: it has no trained segmentation output", path=path,
                         fix="fine-tune first: finetune --init " + path)
    config = RunConfig.from_dict(state["config"])
    backbone = build_backbone(config.model)
    try:
        backbone.load_state_dict(state["model"])
    except RuntimeError as error:
        raise InputError(f"does not fit the network its config describes ({str(error)[:300]})", path=path) from None
    labels = {int(k): v for k, v in state["labels"].items()}
    if os.path.isdir(model_path) and os.path.exists(RunFolder(model_path).labels):
        labels = load_label_table(RunFolder(model_path).labels)
    return LoadedModel(backbone.to(device).eval(), config, labels, path, run_postprocessing(model_path, path))


def load_ensemble(model_paths: Sequence[str], device: torch.device, checkpoint: str = "best") -> List[LoadedModel]:
    """Several trained models whose class probabilities :func:`predict_image` averages (an ensemble).

    Networks trained on one or two scans with different seeds make different mistakes; the mean of
    their probabilities is better than the typical one of them (docs/few-label-accuracy.md).  They must
    segment the same organs under the same values and see the image on the same grid (spacing and
    orientation); each keeps its own intensity normalisation, patch size and test-time flips.
    """
    models = [load_model(path, device, checkpoint=checkpoint) for path in model_paths]
    first, first_path = models[0], model_paths[0]
    for model, path in zip(models[1:], model_paths[1:]):
        if model.labels != first.labels:
            raise InputError(f"segments {sorted(model.labels.items())}, {first_path} segments "
                             f"{sorted(first.labels.items())}", path=path,
                             fix="average only runs trained for the same organs (the same --labels)")
        for key in ("spacing", "orientation"):
            mine, theirs = getattr(model.config.preprocess, key), getattr(first.config.preprocess, key)
            if tuple(mine) != tuple(theirs):
                raise InputError(f"predicts at {key} {mine}, {first_path} at {theirs}", path=path,
                                 fix="average only runs trained on the same grid (the same --spacing)")
    return models


def common_postprocessing(models: Sequence[LoadedModel]) -> Optional[Dict]:
    """The post-processing an ensemble applies: an organ's largest-component rule only where every
    member's run chose it (None when a member has no decision: nothing is applied)."""
    decisions = [model.postprocess for model in models]
    if any(not decision for decision in decisions):
        return None
    chosen = set(decisions[0].get("largest_component", []))
    for decision in decisions[1:]:
        chosen &= set(decision.get("largest_component", []))
    return {"largest_component": sorted(chosen), "chosen_on": "every member of the ensemble"}


def run_postprocessing(model_path: str, checkpoint_path: str) -> Optional[Dict]:
    """The post-processing decision of the run a model comes from (its folder's postprocess.json), or None."""
    from .postprocess import load_postprocessing

    if os.path.isdir(model_path):
        return load_postprocessing(model_path)
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    # A checkpoint file inside a run folder (RUN/checkpoints/*.pt) carries the run's decision with it.
    return load_postprocessing(os.path.dirname(folder)) if os.path.basename(folder) == "checkpoints" else None


def sliding_window_probabilities(backbone: nn.Module, image: torch.Tensor, patch_size: Sequence[int],
                                 overlap: float = 0.5, sw_batch_size: int = 2,
                                 use_amp: bool = False, fill: float = 0.0,
                                 continue_axes: Sequence[int] = ()) -> torch.Tensor:
    """Softmax probabilities ``[C, X, Y, Z]`` for one preprocessed image ``[1, X, Y, Z]``.

    Along ``continue_axes`` (:func:`~..data.preprocess.continued_axes`), an image thinner than the patch
    is first extended to the patch by repeating its end slices, evenly at both ends; the probabilities
    are cut back to the image.  Windows that still reach past the image are filled with ``fill``, the
    run's :func:`~..data.preprocess.padding_value` (air).
    Test-time flips are :func:`mirrored_probabilities`' job (only the axes the run trained mirrored).
    """
    from monai.inferers import sliding_window_inference

    device = next(backbone.parameters()).device
    batch, kept = continue_to_patch(image[None].to(device), patch_size, continue_axes)

    def infer(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, enabled=use_amp and device.type == "cuda"):
            logits = sliding_window_inference(x, roi_size=tuple(int(p) for p in patch_size),
                                              sw_batch_size=sw_batch_size, predictor=backbone, overlap=overlap,
                                              mode="gaussian", padding_mode="constant", cval=float(fill))
        return torch.softmax(logits.float(), dim=1)

    with torch.no_grad():
        return infer(batch)[0][(slice(None),) + kept]


def continue_to_patch(batch: torch.Tensor, patch_size: Sequence[int], axes: Sequence[int]) -> tuple:
    """``(extended, kept)``: ``batch`` ``[N, C, X, Y, Z]`` with its end slices repeated along ``axes``
    until it is as long as the patch (half the missing slices before, the rest after, as MONAI pads),
    and the slices of ``extended`` that hold the original image."""
    kept = [slice(None)] * 3
    pads = [0] * 6  # F.pad wants (z_low, z_high, y_low, y_high, x_low, x_high)
    for axis in axes:
        missing = max(0, int(patch_size[axis]) - int(batch.shape[axis + 2]))
        if missing:
            low = missing // 2
            pads[2 * (2 - axis)], pads[2 * (2 - axis) + 1] = low, missing - low
            kept[axis] = slice(low, low + int(batch.shape[axis + 2]))
    if not any(pads):
        return batch, tuple(kept)
    return torch.nn.functional.pad(batch, pads, mode="replicate"), tuple(kept)


def tta_flips(config: RunConfig) -> tuple:
    """``(axes, swap)`` for test-time augmentation: the axes the run was trained mirrored along, and the
    class permutation a mirror of the left-right axis needs (None when that axis is not among them).

    A network never trained on mirrored images (every run before mirroring existed) gets no flips:
    averaging it with predictions of anatomy it has never seen, left and right exchanged, only hurts.
    """
    from ..data.views import lateral_swap, left_right_axis

    axes = tuple(sorted({int(a) for a in getattr(config.train, "mirror_axes", ()) or ()}))
    lateral = left_right_axis(config.preprocess.orientation)
    swap = lateral_swap(config.data.labels) if lateral in axes else None
    return axes, (swap, lateral)


def mirrored_probabilities(backbone: nn.Module, image: torch.Tensor, patch_size: Sequence[int], overlap: float,
                           axes: Sequence[int], swap=None, lateral_axis: int = 0, fill: float = 0.0,
                           continue_axes: Sequence[int] = ()) -> torch.Tensor:
    """Softmax probabilities ``[C, X, Y, Z]`` averaged over every combination of flips of ``axes``.

    Each flipped prediction is flipped back; where the ``lateral_axis`` was flipped its left and right
    classes are exchanged with ``swap`` (a class permutation, its own inverse), since the network
    called the mirrored left kidney "right".
    """
    from itertools import combinations

    axes = tuple(int(a) for a in axes)
    combos = [c for r in range(len(axes) + 1) for c in combinations(axes, r)]
    total = None
    for combo in combos:
        dims = [a + 1 for a in combo]   # image is [1, X, Y, Z]
        flipped = torch.flip(image, dims) if dims else image
        p = sliding_window_probabilities(backbone, flipped, patch_size, overlap=overlap, fill=fill,
                                         continue_axes=continue_axes)
        p = torch.flip(p, dims) if dims else p
        if swap is not None and lateral_axis in combo:
            p = p[torch.as_tensor(np.asarray(swap), dtype=torch.long, device=p.device)]
        total = p if total is None else total + p
    return total / len(combos)


# Cells whose 8 corners disagree (organ borders) and points at the rim of the field of view.
_UNDECIDED = 255
# Output slices handled at once where probabilities are interpolated point by point (bounds the memory).
_SLAB_SLICES = 16


def network_grid(image: sitk.Image, preprocess: PreprocessConfig) -> sitk.Image:
    """The grid MONAI's preprocessing puts ``image`` on (orientation, then spacing), without touching a voxel.

    MONAI's own ``Orientation`` and ``Spacing`` run lazily on a placeholder of
    the image's shape and affine (a zero-stride tensor, no memory), so the grid
    is exactly the one training used.  Returns an empty ``sitk.Image`` with
    that geometry (size ``[X, Y, Z]`` of the network's input).
    """
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    from ..data.preprocess import affine_from_sitk, reference_from_affine

    placeholder = MetaTensor(torch.zeros(1, 1, 1, 1).expand(1, *image.GetSize()), affine=affine_from_sitk(image))
    oriented = Orientation(axcodes=preprocess.orientation, lazy=True)(placeholder)
    spaced = Spacing(pixdim=tuple(float(s) for s in preprocess.spacing), lazy=True)(oriented)
    return reference_from_affine(np.asarray(spaced.peek_pending_affine(), dtype=np.float64),
                                 [int(s) for s in spaced.peek_pending_shape()])


def resample_to_network_grid(image: sitk.Image, preprocess: PreprocessConfig) -> sitk.Image:
    """``image`` resampled (linear, float32) onto :func:`network_grid` in one step.

    Outside the image the nearest voxel is repeated, as MONAI's ``Spacing``
    pads.  Doing this with SimpleITK on the original image avoids the
    full-size copies (a re-ordered float array, an oriented copy, the
    interpolation's own copy) that running MONAI on the full volume makes;
    the MONAI chain then runs on the small result, where its orientation and
    spacing steps change nothing.
    """
    return sitk.Resample(image, network_grid(image, preprocess), sitk.Transform(), sitk.sitkLinear, 0.0,
                         sitk.sitkFloat32, True)


def probabilities_to_input_grid(probabilities: np.ndarray, affine_ras: np.ndarray,
                                reference: sitk.Image) -> np.ndarray:
    """Arg-max labels ``(z, y, x)`` uint8 on ``reference``'s grid from probabilities ``[C, X, Y, Z]`` on ``affine_ras``.

    The result is that of resampling every class channel linearly in physical
    space onto ``reference`` and taking the arg-max there (points outside the
    network's field of view: background), at about the cost of one
    nearest-neighbour resampling of a label map.  Where the 8 network voxels
    around a point share one arg-max, the interpolated probabilities have that
    arg-max too (a convex combination keeps ``p_c >= p_k``), so that label is
    copied; only points in the other cells (organ borders, the rim of the
    field of view) are interpolated, slab by slab.
    """
    from ..data.preprocess import from_monai_array, reference_from_affine

    classes = probabilities.shape[0]
    if classes >= _UNDECIDED:
        raise ValueError(f"at most {_UNDECIDED - 1} classes fit the uint8 labels, got {classes}")
    grid = reference_from_affine(affine_ras, probabilities.shape[1:])
    winner = probabilities.argmax(0).astype(np.uint8)   # [X, Y, Z]
    if min(winner.shape) < 2:
        labels = np.full(tuple(reversed(reference.GetSize())), _UNDECIDED, dtype=np.uint8)
    else:
        x, y, z = winner.shape
        corners = [winner[a:x - 1 + a, b:y - 1 + b, c:z - 1 + c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]
        uniform = np.logical_and.reduce([corner == corners[0] for corner in corners[1:]])
        cells = sitk.GetImageFromArray(from_monai_array(np.where(uniform, corners[0], _UNDECIDED).astype(np.uint8)))
        cells.SetSpacing(grid.GetSpacing())
        cells.SetDirection(grid.GetDirection())
        cells.SetOrigin(grid.TransformContinuousIndexToPhysicalPoint((0.5, 0.5, 0.5)))  # cell (i,j,k) spans i..i+1
        labels = sitk.GetArrayFromImage(sitk.Resample(cells, reference, sitk.Transform(), sitk.sitkNearestNeighbor,
                                                      _UNDECIDED, sitk.sitkUInt8))
    _interpolate_undecided(labels, probabilities, grid, reference)
    return labels


def _interpolate_undecided(labels: np.ndarray, probabilities: np.ndarray, grid: sitk.Image,
                           reference: sitk.Image) -> None:
    """Fill the ``_UNDECIDED`` voxels of ``labels`` (z, y, x) with the arg-max of linearly interpolated probabilities.

    Interpolation as ITK's linear resampling does it: a point inside the
    buffer (continuous index in ``[-0.5, size - 0.5)``) takes the trilinear
    value with the edge repeated; a point outside gets background.
    """
    from scipy.ndimage import map_coordinates

    def index_to_point(image: sitk.Image) -> np.ndarray:
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        return direction * np.asarray(image.GetSpacing(), dtype=np.float64)[None, :]

    to_grid = np.linalg.inv(index_to_point(grid))
    matrix = to_grid @ index_to_point(reference)
    offset = to_grid @ (np.asarray(reference.GetOrigin()) - np.asarray(grid.GetOrigin()))
    size = np.asarray(probabilities.shape[1:], dtype=np.float64)[:, None]
    for start in range(0, labels.shape[0], _SLAB_SLICES):
        slab = labels[start:start + _SLAB_SLICES]
        zz, yy, xx = np.nonzero(slab == _UNDECIDED)
        if zz.size == 0:
            continue
        points = matrix @ np.stack([xx, yy, zz + start]).astype(np.float64) + offset[:, None]   # grid (x, y, z)
        inside = np.all((points >= -0.5) & (points < size - 0.5), axis=0)
        best_label = np.zeros(zz.size, dtype=np.uint8)
        best_value = np.full(zz.size, -np.inf, dtype=np.float32)
        for label in range(probabilities.shape[0]):
            values = np.full(zz.size, 1.0 if label == 0 else 0.0, dtype=np.float32)
            values[inside] = map_coordinates(probabilities[label], points[:, inside], order=1, mode="nearest")
            better = values > best_value
            best_label[better] = label
            best_value[better] = values[better]
        slab[zz, yy, xx] = best_label


def predict_image(model: Union[LoadedModel, Sequence[LoadedModel]], image_path: str, overlap: float = 0.5,
                  flip_tta: bool = False, image: Optional[sitk.Image] = None, mask_body: bool = True,
                  background_weight: float = 1.0):
    """Predict one image file; returns ``(labels_zyx uint8 on the input grid, input sitk.Image)``.

    The image is normalised as the run says (its CT window, or its saved ct_zscore statistics).
    ``model`` may be a list from :func:`load_ensemble`: the class probabilities of its members are
    averaged on the network's grid before anything else.
    ``flip_tta`` averages over flips of the axes the run trained mirrored (:func:`tta_flips`).
    ``background_weight`` multiplies the background's probability before the arg-max: below 1, a voxel
    becomes an organ on less evidence (more of each organ); 1, the arg-max as trained.
    ``mask_body``: set everything outside the patient's trunk to background
    (:mod:`.body`), for models trained on CT in HU; other models are left as predicted.
    The run's post-processing decision, if it has one, is applied last (an ensemble's:
    :func:`common_postprocessing`).

    Cost (``docs/prediction.md``): the full-size volume is read once and
    resampled once onto the network's grid; the network runs on that grid;
    mapping the labels back costs about one nearest-neighbour resampling, and
    the body mask is found on the full grid.
    """
    from ..data.io import read_image

    if not background_weight > 0:   # before the network runs, not after
        raise ValueError(f"background_weight must be positive, got {background_weight}")
    models = [model] if isinstance(model, LoadedModel) else list(model)
    image = read_image(image_path, as_float32=False) if image is None else image
    on_grid = resample_to_network_grid(image, models[0].config.preprocess)
    probabilities, affine = None, None
    for member in models:
        p, affine = network_probabilities(member, on_grid, overlap, flip_tta)
        probabilities = p if probabilities is None else probabilities + p
    probabilities = (probabilities / len(models)).cpu().numpy()
    if background_weight != 1.0:
        probabilities[0] *= np.float32(background_weight)
    labels = probabilities_to_input_grid(probabilities, affine, image)
    if mask_body and models[0].config.preprocess.is_ct():
        from .body import mask_outside_body

        labels = mask_outside_body(labels, image)   # on the full grid: a coarser one joins arms to the trunk
    if len(models) == 1:
        return apply_run_postprocessing(labels, models[0]), image
    from .postprocess import apply_postprocessing

    return apply_postprocessing(labels, common_postprocessing(models), models[0].labels), image


def network_probabilities(model: LoadedModel, on_grid: sitk.Image, overlap: float, flip_tta: bool):
    """``(probabilities [C, X, Y, Z], affine)`` of one model for an image already on its network grid
    (:func:`resample_to_network_grid`), normalised as its run says."""
    from monai.data import MetaTensor

    from ..data.preprocess import (
        affine_from_sitk,
        build_preprocess_transform,
        continued_axes,
        padding_value,
        to_monai_array,
    )

    data = {"image": MetaTensor(to_monai_array(sitk.GetArrayViewFromImage(on_grid)), affine=affine_from_sitk(on_grid))}
    prepared = build_preprocess_transform(model.config.preprocess, pad_to=None, with_label=False)(data)["image"]
    tensor = torch.as_tensor(np.asarray(prepared.numpy(), dtype=np.float32))
    fill, ends = padding_value(model.config.preprocess), continued_axes(model.config.preprocess)
    if flip_tta:
        axes, (swap, lateral) = tta_flips(model.config)
        probabilities = mirrored_probabilities(model.backbone, tensor, model.config.model.patch_size, overlap,
                                               axes, swap, lateral, fill=fill, continue_axes=ends)
    else:
        probabilities = sliding_window_probabilities(model.backbone, tensor, model.config.model.patch_size,
                                                     overlap=overlap, fill=fill, continue_axes=ends)
    return probabilities, np.asarray(prepared.affine, dtype=np.float64)


def apply_run_postprocessing(labels: np.ndarray, model: LoadedModel) -> np.ndarray:
    """``labels`` with the run's stored post-processing applied (unchanged for runs without one)."""
    from .postprocess import apply_postprocessing

    return apply_postprocessing(labels, model.postprocess, model.labels)
