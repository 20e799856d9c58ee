"""PCGrad gradient surgery (Yu et al. 2020) for the GCL Gradient Mitigator.

Each task gradient ``g_k`` starts as itself and visits the other tasks ``j`` in
a random order; whenever the current projected ``g_k'`` conflicts with the
ORIGINAL ``g_j`` (``g_k' . g_j < 0``), the component along ``g_j`` is removed::

    g_k' <- g_k' - (g_k' . g_j / |g_j|^2) g_j

The combined update is ``sum_k g_k'``.  A ``g_j`` of zero norm is skipped (it
cannot conflict).  Arithmetic is done in at least float32 and the result is
cast back to the input dtype.

Random order: for ``k = 0, ..., K-1`` in turn, one ``torch.randperm(K - 1)`` is
drawn from ``generator`` and applied to the other indices in increasing order.
:func:`pcgrad` and :func:`pcgrad_per_sample` draw the same way, so with equally
seeded generators they use the same orders.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import at_least_float32


def _projection_orders(num_tasks: int, generator: torch.Generator | None) -> list[list[int]]:
    """For each task k, the other task indices in a random order."""
    device = generator.device if generator is not None else torch.device("cpu")
    orders = []
    for task in range(num_tasks):
        others = [j for j in range(num_tasks) if j != task]
        permutation = torch.randperm(num_tasks - 1, generator=generator, device=device).tolist()
        orders.append([others[i] for i in permutation])
    return orders


def _surgery(grads: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """Project and sum ``grads [K, B, F]`` independently for each of the B rows -> ``[B, F]``."""
    squared_norms = (grads * grads).sum(dim=-1)  # [K, B]
    combined = torch.zeros_like(grads[0])
    for task, order in enumerate(orders):
        projected = grads[task].clone()
        for other in order:
            dot = (projected * grads[other]).sum(dim=-1)
            conflict = (dot < 0) & (squared_norms[other] > 0)
            scale = torch.where(conflict, dot / squared_norms[other].clamp_min(torch.finfo(dot.dtype).tiny), 0.0)
            projected = projected - scale[:, None] * grads[other]
        combined = combined + projected
    return combined


def pcgrad(grads: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
    """Combine K task gradients with PCGrad surgery.

    Args:
        grads: K >= 1 gradient tensors of the same shape (usually flat ``[F]``:
            the concatenated parameter gradients of one task), floating point,
            on one device.  Each is treated as one flat vector.
        generator: ``torch.Generator`` for the random projection orders; None
            uses the global RNG.  See the module docstring for the exact draws.

    Returns:
        ``sum_k g_k'``, same shape and dtype as each input gradient.
    """
    func = "pcgrad"
    if isinstance(grads, torch.Tensor) or not isinstance(grads, Sequence) or len(grads) == 0:
        raise ValueError(f"{func}: grads must be a non-empty list of tensors (one per task).")
    shape = grads[0].shape if isinstance(grads[0], torch.Tensor) else None
    for index, grad in enumerate(grads):
        if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
            raise ValueError(f"{func}: grads[{index}] must be a floating-point tensor.")
        if grad.shape != shape:
            raise ValueError(
                f"{func}: all gradients must have the same shape; grads[0] is {tuple(shape)}, "
                f"grads[{index}] is {tuple(grad.shape)}."
            )
    stacked = torch.stack([at_least_float32(grad.reshape(-1)) for grad in grads])
    combined = _surgery(stacked[:, None, :], _projection_orders(len(grads), generator))
    return combined[0].reshape(shape).to(grads[0].dtype)


def pcgrad_per_sample(grads: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """PCGrad done independently for each sample, vectorised over samples.

    Used by the Gradient Mitigator's ``feature`` mode: ``grads[k, b]`` is the
    gradient of task ``k``'s loss with respect to sample ``b``'s shared encoder
    output.  For every ``b`` the result equals ``pcgrad([grads[0, b], ...,
    grads[K-1, b]])``; the random orders are drawn once (one per task, see the
    module docstring) and shared by all samples, so with equally seeded
    generators it equals looping :func:`pcgrad` over the samples.

    Args:
        grads: ``[K, B, *feature]`` floating-point tensor (e.g. ``[K, B, F]`` or
            ``[K, B, C, D, H, W]``); each ``grads[k, b]`` is one flat vector.
        generator: ``torch.Generator`` for the orders; None = global RNG.

    Returns:
        ``[B, *feature]``, the combined gradient of each sample, input dtype.
    """
    func = "pcgrad_per_sample"
    if not isinstance(grads, torch.Tensor) or grads.ndim < 2:
        raise ValueError(f"{func}: grads must be a tensor [K, B, *feature].")
    if not grads.is_floating_point():
        raise ValueError(f"{func}: grads must be floating point, got dtype {grads.dtype}.")
    if grads.shape[0] == 0:
        raise ValueError(f"{func}: grads must hold at least one task (K >= 1).")
    num_tasks, batch = grads.shape[:2]
    if grads.numel() == 0:
        return grads.new_zeros(grads.shape[1:])
    flat = at_least_float32(grads.reshape(num_tasks, batch, -1))
    combined = _surgery(flat, _projection_orders(num_tasks, generator))
    return combined.reshape(grads.shape[1:]).to(grads.dtype)
