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
from typing import Any, Dict, List, Optional, Tuple

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


def load_pretrained_weights(model: torch.nn.Module, checkpoint_path: str, encoder_only: bool = True
                            ) -> Tuple[List[str], List[str]]:
    """Copy matching tensors of a checkpoint's backbone into ``model``.

    Only tensors whose name and shape match are copied; with ``encoder_only``
    just those under ``model.encoder_parameter_prefixes()``.  Returns
    ``(loaded, not_loaded)`` key lists, ``not_loaded`` covering the model's
    keys left at their initial values (with the reason).  An architecture
    mismatch (nothing of the encoder matches) is an InputError.
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
    loaded, not_loaded, update = [], [], {}
    for key, value in target.items():
        if not any(key.startswith(prefix) for prefix in prefixes):
            not_loaded.append(f"{key} (not part of the encoder)")
        elif key not in source:
            not_loaded.append(f"{key} (missing in checkpoint)")
        elif tuple(source[key].shape) != tuple(value.shape):
            not_loaded.append(f"{key} (shape {tuple(source[key].shape)} in checkpoint, {tuple(value.shape)} here)")
        else:
            update[key] = source[key]
            loaded.append(key)
    encoder_keys = [k for k in target if any(k.startswith(p) for p in model.encoder_parameter_prefixes())]
    if encoder_keys and not any(k in update for k in encoder_keys):
        raise InputError("matches none of this network's encoder tensors (different size or patch?)",
                         path=checkpoint_path, details=f"checkpoint model: {source_config}",
                         fix="fine-tune with the same --model, model size and --patch as the pre-training run")
    model.load_state_dict(update, strict=False)
    return loaded, not_loaded


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
