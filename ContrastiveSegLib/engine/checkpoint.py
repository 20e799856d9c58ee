"""Checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint is a plain dict of tensors, numbers and strings (so
``torch.load(..., weights_only=True)`` can read it without unpickling code):

    format, format_version   "contrastiveseg", 1
    kind                     "finetune" | "pretrain" | "selftrain"
    model_config             the ModelConfig as a dict (architecture, size, classes, patch)
    labels                   {"0": "background", "1": "liver", ...} (the output classes)
    model                    the backbone's state dict (what ``--init`` and ``predict`` load)
    extra                    other trainable state of the objective (method heads), for resume
    optimizer, scheduler, scaler, step, rng, best_metric, config
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..errors import InputError

FORMAT = "contrastiveseg"
FORMAT_VERSION = 1


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Write ``state`` to ``path`` through a temporary file in the same folder, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION}
    payload.update(state)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a ContrastiveSeg checkpoint; InputError for a missing or foreign file."""
    if not os.path.exists(path):
        raise InputError("does not exist", path=path, fix="give a checkpoint written by ContrastiveSeg (RUN/checkpoints/*.pt)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise InputError(f"cannot be read as a checkpoint ({type(error).__name__}: {str(error)[:200]})", path=path,
                         fix="give a checkpoint written by ContrastiveSeg; other pickles are not loaded for safety") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError("is not a ContrastiveSeg checkpoint", path=path,
                         fix="give RUN/checkpoints/best.pt or last.pt of a ContrastiveSeg run")
    if int(state.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(f"was written by a newer ContrastiveSeg (format {state.get('format_version')})", path=path,
                         fix="update ContrastiveSeg")
    return state


@dataclass
class InitReport:
    """What ``load_pretrained_weights`` did: tensor names, each list in the model's key order.

    ``loaded``: copied unchanged; ``interpolated``: copied after resampling to
    this network's shape (with a note saying from what to what); ``not_loaded``:
    left at their initial values, with the reason.
    """

    loaded: List[str] = field(default_factory=list)
    interpolated: List[str] = field(default_factory=list)
    not_loaded: List[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"loaded {len(self.loaded)} encoder tensors, {len(self.not_loaded)} left at their initial values"
        if self.interpolated:
            text += f"; interpolated to this patch: {'; '.join(self.interpolated)}"
        return text

    def to_dict(self) -> Dict[str, List[str]]:
        return {"loaded": list(self.loaded), "interpolated": list(self.interpolated),
                "not_loaded": list(self.not_loaded)}


# UNETR's learnable position embedding, [1, tokens, hidden]: one vector per 16^3 token of the patch.
UNETR_POSITION_EMBEDDING = "net.vit.patch_embedding.position_embeddings"
UNETR_TOKEN_SIZE = 16


def interpolate_position_embedding(embedding: torch.Tensor, source_patch: Sequence[int],
                                   target_patch: Sequence[int]) -> torch.Tensor:
    """UNETR position embeddings ``[1, tokens, hidden]`` of ``source_patch`` resampled to ``target_patch``.

    The tokens form a grid of ``patch / 16`` per axis, flattened in C order
    (how MONAI's patch embedding flattens its convolution output).  The grid is
    resampled trilinearly (``align_corners=False``), the usual way of moving a
    ViT to another input size (DeiT, timm's ``resample_abs_pos_embed``).
    """
    source_grid = [int(s) // UNETR_TOKEN_SIZE for s in source_patch]
    target_grid = [int(s) // UNETR_TOKEN_SIZE for s in target_patch]
    hidden = embedding.shape[-1]
    if embedding.shape[1] != int(torch.tensor(source_grid).prod()):
        raise ValueError(f"position embedding of {embedding.shape[1]} tokens does not fit a patch of {source_patch}")
    grid = embedding.reshape(1, *source_grid, hidden).permute(0, 4, 1, 2, 3).float()
    resized = torch.nn.functional.interpolate(grid, size=target_grid, mode="trilinear", align_corners=False)
    return resized.permute(0, 2, 3, 4, 1).reshape(1, -1, hidden).to(embedding.dtype)


def load_pretrained_weights(model: torch.nn.Module, checkpoint_path: str, encoder_only: bool = True) -> InitReport:
    """Copy a checkpoint's backbone tensors into ``model`` (its encoder only, with ``encoder_only``).

    Every tensor to load must exist in the checkpoint with this network's
    shape: anything else is an :class:`InputError` listing each such tensor
    with both shapes, so a partial load never passes silently.  The one
    exception is UNETR's position embedding, which is interpolated to this
    network's patch (and reported in ``InitReport.interpolated``).  Tensors
    outside the encoder (with ``encoder_only``) stay at their initial values.
    """
    state = load_checkpoint(checkpoint_path)
    source_config = state.get("model_config", {})
    architecture = getattr(model, "architecture", None)
    if source_config.get("architecture") != architecture:
        raise InputError(f"holds a {source_config.get('architecture')!r} network, but this run builds {architecture!r}",
                         path=checkpoint_path, fix=f"use --model {source_config.get('architecture')} or a matching checkpoint")
    source = state["model"]
    target = model.state_dict()
    prefixes = model.encoder_parameter_prefixes() if encoder_only else [""]
    report, update, mismatched = InitReport(), {}, []
    for key, value in target.items():
        if not any(key.startswith(prefix) for prefix in prefixes):
            report.not_loaded.append(f"{key} (not part of the encoder)")
        elif key not in source:
            mismatched.append(f"{key}: missing in the checkpoint, {tuple(value.shape)} here")
        elif tuple(source[key].shape) == tuple(value.shape):
            update[key] = source[key]
            report.loaded.append(key)
        elif key == UNETR_POSITION_EMBEDDING and source[key].shape[-1] == value.shape[-1]:
            source_patch = tuple(int(p) for p in source_config.get("patch_size", ()))
            target_patch = tuple(int(p) for p in getattr(model, "img_size", ()) or ())
            update[key] = interpolate_position_embedding(source[key], source_patch, target_patch)
            report.interpolated.append(f"{key} from a patch of {source_patch} ({tuple(source[key].shape)}) "
                                       f"to {target_patch} ({tuple(value.shape)})")
        else:
            mismatched.append(f"{key}: {tuple(source[key].shape)} in the checkpoint, {tuple(value.shape)} here")
    if mismatched:
        shown = mismatched[:40] + ([f"... and {len(mismatched) - 40} more"] if len(mismatched) > 40 else [])
        raise InputError(f"{len(mismatched)} encoder tensor(s) do not fit this network", path=checkpoint_path,
                         details=f"checkpoint model: {source_config}\n" + "\n".join(shown),
                         fix="use the --model, --model-size (and, for a U-Net, any --patch) of the pre-training "
                             "run; only UNETR's position embedding is interpolated to another patch")
    model.load_state_dict(update, strict=False)
    return report


def rng_state() -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Optional[Dict[str, Any]]) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
