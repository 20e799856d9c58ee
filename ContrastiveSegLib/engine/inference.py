"""Prediction: sliding-window inference, then back onto the input image's own grid.

The network sees the image on the run's preprocessing grid (RAS, training
spacing).  Its class probabilities are resampled *in physical space* onto the
grid of the image as it was given (size, spacing, origin, direction) and only
then turned into labels (arg-max), so the labelmap lines up with the input in
any viewer, whatever its orientation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from ..config import RunConfig
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


def run_postprocessing(model_path: str, checkpoint_path: str) -> Optional[Dict]:
    """The post-processing decision of the run a model comes from (its folder's postprocess.json), or None."""
    from .postprocess import load_postprocessing

    if os.path.isdir(model_path):
        return load_postprocessing(model_path)
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    # A checkpoint file inside a run folder (RUN/checkpoints/*.pt) carries the run's decision with it.
    return load_postprocessing(os.path.dirname(folder)) if os.path.basename(folder) == "checkpoints" else None


def sliding_window_probabilities(backbone: nn.Module, image: torch.Tensor, patch_size: Sequence[int],
                                 overlap: float = 0.5, flip_tta: bool = False, sw_batch_size: int = 2,
                                 use_amp: bool = False) -> torch.Tensor:
    """Softmax probabilities ``[C, X, Y, Z]`` for one preprocessed image ``[1, X, Y, Z]``.

    ``flip_tta`` averages the prediction over the 8 combinations of flips of
    the three axes (each mirrored back), at 8x the cost.
    """
    from monai.inferers import sliding_window_inference

    device = next(backbone.parameters()).device
    batch = image[None].to(device)

    def infer(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, enabled=use_amp and device.type == "cuda"):
            logits = sliding_window_inference(x, roi_size=tuple(int(p) for p in patch_size),
                                              sw_batch_size=sw_batch_size, predictor=backbone, overlap=overlap,
                                              mode="gaussian", padding_mode="constant", cval=0.0)
        return torch.softmax(logits.float(), dim=1)

    with torch.no_grad():
        if not flip_tta:
            return infer(batch)[0]
        total = None
        flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
        for dims in flips:
            x = torch.flip(batch, dims) if dims else batch
            p = infer(x)
            p = torch.flip(p, dims) if dims else p
            total = p if total is None else total + p
        return (total / len(flips))[0]


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
                           axes: Sequence[int], swap=None, lateral_axis: int = 0) -> torch.Tensor:
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
        p = sliding_window_probabilities(backbone, flipped, patch_size, overlap=overlap)
        p = torch.flip(p, dims) if dims else p
        if swap is not None and lateral_axis in combo:
            p = p[torch.as_tensor(np.asarray(swap), dtype=torch.long, device=p.device)]
        total = p if total is None else total + p
    return total / len(combos)


def probabilities_to_input_grid(probabilities: np.ndarray, affine_ras: np.ndarray,
                                reference: sitk.Image) -> np.ndarray:
    """Arg-max labels ``(z, y, x)`` on ``reference``'s grid from probabilities ``[C, X, Y, Z]`` on ``affine_ras``.

    Each class channel is resampled linearly in physical space; the arg-max is
    kept as a running maximum so memory stays at two volumes of the input size.
    Voxels outside the network's field of view get background.
    """
    from ..data.preprocess import from_monai_array, reference_from_affine

    grid = reference_from_affine(affine_ras, probabilities.shape[1:])
    best_value = None
    best_label = None
    for label in range(probabilities.shape[0]):
        channel = sitk.GetImageFromArray(from_monai_array(probabilities[label]).astype(np.float32))
        channel.CopyInformation(grid)
        default = 1.0 if label == 0 else 0.0
        resampled = sitk.Resample(channel, reference, sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32)
        values = sitk.GetArrayFromImage(resampled)
        if best_value is None:
            best_value, best_label = values, np.zeros(values.shape, dtype=np.uint8)
        else:
            better = values > best_value
            best_value = np.where(better, values, best_value)
            best_label[better] = label
    return best_label


def predict_image(model: LoadedModel, image_path: str, overlap: float = 0.5, flip_tta: bool = False,
                  image: Optional[sitk.Image] = None, mask_body: bool = True):
    """Predict one image file; returns ``(labels_zyx uint8 on the input grid, input sitk.Image)``.

    The image is normalised as the run says (its CT window, or its saved ct_zscore statistics).
    ``flip_tta`` averages over flips of the axes the run trained mirrored (:func:`tta_flips`).
    ``mask_body``: set everything outside the patient's trunk to background
    (:mod:`.body`), for models trained on CT in HU; other models are left as predicted.
    The run's post-processing decision, if it has one, is applied last.
    """
    from monai.data import MetaTensor

    from ..data.io import read_image
    from ..data.preprocess import affine_from_sitk, build_preprocess_transform, to_monai_array

    image = read_image(image_path) if image is None else image
    data = {"image": MetaTensor(to_monai_array(sitk.GetArrayViewFromImage(image).astype(np.float32)),
                                affine=affine_from_sitk(image))}
    prepared = build_preprocess_transform(model.config.preprocess, pad_to=None, with_label=False)(data)["image"]
    tensor = torch.as_tensor(np.asarray(prepared.numpy(), dtype=np.float32))
    if flip_tta:
        axes, (swap, lateral) = tta_flips(model.config)
        probabilities = mirrored_probabilities(model.backbone, tensor, model.config.model.patch_size, overlap,
                                               axes, swap, lateral)
    else:
        probabilities = sliding_window_probabilities(model.backbone, tensor, model.config.model.patch_size,
                                                     overlap=overlap)
    labels = probabilities_to_input_grid(probabilities.cpu().numpy(), np.asarray(prepared.affine), image)
    if mask_body and model.config.preprocess.is_ct():
        from .body import mask_outside_body

        labels = mask_outside_body(labels, image)
    return apply_run_postprocessing(labels, model), image


def apply_run_postprocessing(labels: np.ndarray, model: LoadedModel) -> np.ndarray:
    """``labels`` with the run's stored post-processing applied (unchanged for runs without one)."""
    from .postprocess import apply_postprocessing

    return apply_postprocessing(labels, model.postprocess, model.labels)
