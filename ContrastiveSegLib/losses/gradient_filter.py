"""GCL Gradient Filter: keep the pixel pairs whose InfoNCE gradients are largest.

For InfoNCE over one anchor's candidate pairs, the gradient of the loss with
respect to pair ``p``'s logit is ``(softmax(logits)_p - target_p) / tau``.  The
filter scores each pair by ``|softmax - target|`` without building a graph and
keeps the highest-scoring fraction per anchor; the loss is then computed on the
kept pairs only.  (Weighting negatives by the image branch's similarity is the
caller's job.)
"""

from __future__ import annotations

import torch

from ._checks import check_embeddings


@torch.no_grad()
def gradient_filter_mask(
    logits: torch.Tensor,
    targets: torch.Tensor,
    keep_fraction: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which pairs of each anchor to keep, by the size of their InfoNCE gradient.

    Rule, per anchor (row) ``a``, with ``P_a`` its number of valid pairs and
    ``n_pos`` its number of valid positives (``targets == 1``):

    * the budget is ``k = ceil(keep_fraction * P_a)`` (at least 1 when
      ``P_a > 0``; ``keep_fraction * P_a`` is rounded down by 1e-9 first so
      that e.g. ``0.3 * 10`` gives 3, not 4);
    * every valid positive is kept, even when ``n_pos > k``;
    * the remaining ``max(k - n_pos, 0)`` places go to the valid non-positive
      pairs with the largest score ``|softmax(logits)_p - targets_p|`` (for a
      negative that is its softmax probability: the hardest negatives win);
      ties are broken by the lower column index.

    So exactly ``max(k, n_pos)`` pairs are kept.  The softmax runs over the
    valid pairs of the row only.  Computed under ``torch.no_grad()``.

    Args:
        logits: ``[A, P]`` pair logits (similarity / tau) per anchor, floating point.
        targets: ``[A, P]`` with values in {0, 1} (bool, integer or float), 1 = positive.
        keep_fraction: ``q`` in (0, 1] (GCL default 0.25).
        valid: optional ``[A, P]`` bool mask, False for padded pairs that must
            never be kept nor counted in ``P_a``; None = all valid.

    Returns:
        ``[A, P]`` bool tensor, True = keep the pair, on the device of ``logits``.
    """
    func = "gradient_filter_mask"
    check_embeddings(func, "logits", logits)
    if not isinstance(targets, torch.Tensor) or targets.shape != logits.shape:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"{func}: targets must be a tensor of shape {tuple(logits.shape)}, got {shape}.")
    if not bool(((targets == 0) | (targets == 1)).all()):
        raise ValueError(f"{func}: targets must contain only 0 and 1.")
    if (
        isinstance(keep_fraction, bool)
        or not isinstance(keep_fraction, (int, float))
        or not 0 < keep_fraction <= 1
    ):
        raise ValueError(f"{func}: keep_fraction must be a number in (0, 1], got {keep_fraction!r}.")
    if valid is None:
        valid = torch.ones_like(logits, dtype=torch.bool)
    elif not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.shape != logits.shape:
        raise ValueError(f"{func}: valid must be a bool tensor of shape {tuple(logits.shape)}.")

    num_anchors, num_pairs = logits.shape
    positive = (targets == 1) & valid
    probability = torch.softmax(logits.float().masked_fill(~valid, float("-inf")), dim=1)
    score = (probability - targets.float()).abs()
    # Sort key: positives first (2 > any score, which is <= 1), then the other valid
    # pairs by score, padded pairs last (-1 < any score).  A row with no valid pair
    # has NaN probabilities, but all its keys are -1 and its budget is 0.
    key = torch.where(positive, 2.0, torch.where(valid, score, -1.0))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(num_pairs, device=logits.device).expand(num_anchors, num_pairs))

    n_valid = valid.sum(dim=1)
    budget = torch.ceil(n_valid.double() * keep_fraction - 1e-9).long()
    budget = torch.where(n_valid > 0, budget.clamp_min(1), 0)
    keep_count = torch.maximum(budget, positive.sum(dim=1))
    return (rank < keep_count[:, None]) & valid
