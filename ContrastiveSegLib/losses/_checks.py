"""Argument checks shared by the losses (private).

Every check raises :class:`TypeError` (not a tensor / not a number at all) or
:class:`ValueError` (wrong shape, dtype or value) with a message that names the function,
the argument and what was received, so a caller can see at once what to change.
"""

from __future__ import annotations

import math

import torch


def check_embeddings(func: str, name: str, tensor: object, dims: int = 2) -> torch.Tensor:
    """Check that ``tensor`` is a floating-point torch tensor with ``dims`` dimensions."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{func}: {name} must be a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.ndim != dims:
        raise ValueError(
            f"{func}: {name} must have {dims} dimensions, got shape {tuple(tensor.shape)}."
        )
    if not tensor.is_floating_point():
        raise ValueError(
            f"{func}: {name} must be a floating-point tensor, got dtype {tensor.dtype}."
        )
    return tensor


def check_labels(func: str, name: str, labels: object, length: int) -> torch.Tensor:
    """Check that ``labels`` is a 1-D integer torch tensor with ``length`` entries."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{func}: {name} must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.ndim != 1 or labels.shape[0] != length:
        raise ValueError(
            f"{func}: {name} must have shape [{length}] (one label per embedding), "
            f"got shape {tuple(labels.shape)}."
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"{func}: {name} must hold integer class labels, got dtype {labels.dtype}; "
            "convert it with .long()."
        )
    return labels


def check_positive(func: str, name: str, value: object) -> float:
    """Check that ``value`` is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{func}: {name} must be a number > 0, got {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{func}: {name} must be a finite number > 0, got {value!r}.")
    return float(value)


def check_positive_int(func: str, name: str, value: object) -> int:
    """Check that ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{func}: {name} must be an integer >= 1, got {value!r}.")
    return value


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Cast float16 / bfloat16 up to float32; keep float32 and float64 as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
