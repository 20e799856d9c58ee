"""MixCL label-consistency loss (Eq. 6), computed in tiles.

Pixels sampled from two patches (:func:`sample_boundary_weighted`) are compared
across the two sets: same foreground label = positive pair, different
foreground labels = negative pair, anything touching background is left out.

Memory: the ``N1 x N2`` similarity matrix is never built.  The rows of set 1
and the rows of set 2 are cut into tiles of ``tile_size``; each tile pair gives,
for each of its rows, the log-sum-exp of its positive and of its
positive-or-negative similarities, and tiles are merged with ``logaddexp``
(a running log-sum-exp, so nothing overflows).  With ``checkpoint=True``
(default) a custom autograd function does the same walk in backward,
recomputing one ``tile_size x tile_size`` block at a time and turning it into
gradients at once, so memory stays that of a few blocks whatever N1 and N2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import (
    at_least_float32,
    check_embeddings,
    check_labels,
    check_positive,
    check_positive_int,
)

REDUCTIONS = ("paper", "anchor")


def _pair_masks(row_labels, col_labels, background, negatives):
    """``(valid, positive)`` bool ``[rows, cols]``: pairs that count, and the positive ones among them.

    ``negatives`` is None (background takes no part) or ``(row_groups, col_groups)``: then a
    background pixel is also a negative of a foreground pixel of the same group.
    """
    row_foreground = (row_labels != background)[:, None]
    col_foreground = (col_labels != background)[None, :]
    both = row_foreground & col_foreground
    positive = both & (row_labels[:, None] == col_labels[None, :])
    if negatives is None:
        return both, positive
    row_groups, col_groups = negatives
    one_background = (row_foreground ^ col_foreground) & (row_groups[:, None] == col_groups[None, :])
    return both | one_background, positive


def _tile_log_sum_exp(
    rows: torch.Tensor,
    row_labels: torch.Tensor,
    cols: torch.Tensor,
    col_labels: torch.Tensor,
    tau: float,
    background: int,
    negatives=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of one tile: log-sum-exp over positive columns, and over positive-or-negative ones.

    Rows with no such column get a huge negative but finite value (not -inf), so
    that no NaN can appear in backward; callers drop those rows using counts.
    """
    logits = rows @ cols.T / tau
    valid, positive = _pair_masks(row_labels, col_labels, background, negatives)
    floor = torch.finfo(logits.dtype).min
    log_positive = torch.logsumexp(logits.masked_fill(~positive, floor), dim=1)
    log_all = torch.logsumexp(logits.masked_fill(~valid, floor), dim=1)
    return log_positive, log_all


def _column_tile(negatives, tile):
    return None if negatives is None else (negatives[0], negatives[1][tile])


def _walk_column_tiles(rows, cols, row_labels, col_labels, tau, background, tile_size, negatives=None):
    """Per row: the log-sum-exps of :func:`_tile_log_sum_exp` over all of ``cols``, merged tile by tile."""
    log_positive = log_all = None
    for start in range(0, cols.shape[0], tile_size):
        tile = slice(start, start + tile_size)
        tile_positive, tile_all = _tile_log_sum_exp(rows, row_labels, cols[tile], col_labels[tile], tau, background,
                                                    _column_tile(negatives, tile))
        if log_positive is None:
            log_positive, log_all = tile_positive, tile_all
        else:
            log_positive = torch.logaddexp(log_positive, tile_positive)
            log_all = torch.logaddexp(log_all, tile_all)
    return log_positive, log_all


class _RowLogSumExp(torch.autograd.Function):
    """Per row of ``rows``: log-sum-exp over its positive and over its valid columns of ``cols``.

    Forward and backward both walk ``cols`` in tiles of ``tile_size`` and keep
    only per-row results between tiles; backward recomputes one tile's
    similarities at a time and turns them into gradients straight away, so
    memory is ``O(len(rows) * tile_size)`` however many columns there are.
    (``torch.utils.checkpoint`` per tile was not enough: autograd may recompute
    many tiles before it consumes them, and the peak grew with N1 * N2.)
    The gradient of a log-sum-exp with respect to a logit is its soft-max weight.
    """

    @staticmethod
    def forward(ctx, rows, cols, row_labels, col_labels, tau, background, tile_size, negatives=None):
        log_positive, log_all = _walk_column_tiles(rows, cols, row_labels, col_labels, tau, background, tile_size,
                                                   negatives)
        ctx.save_for_backward(rows, cols, row_labels, col_labels, log_positive, log_all)
        ctx.tau, ctx.background, ctx.tile_size, ctx.negatives = tau, background, tile_size, negatives
        return log_positive, log_all

    @staticmethod
    def backward(ctx, grad_positive, grad_all):
        rows, cols, row_labels, col_labels, log_positive, log_all = ctx.saved_tensors
        tau, background, tile_size, negatives = ctx.tau, ctx.background, ctx.tile_size, ctx.negatives
        grad_rows = torch.zeros_like(rows)
        grad_cols = torch.zeros_like(cols)
        for start in range(0, cols.shape[0], tile_size):
            tile = slice(start, start + tile_size)
            logits = rows @ cols[tile].T / tau
            valid, positive = _pair_masks(row_labels, col_labels[tile], background, _column_tile(negatives, tile))
            weight = torch.zeros_like(logits)
            if grad_positive is not None:
                weight += torch.where(positive, torch.exp(logits - log_positive[:, None]), 0.0) * grad_positive[:, None]
            if grad_all is not None:
                weight += torch.where(valid, torch.exp(logits - log_all[:, None]), 0.0) * grad_all[:, None]
            weight /= tau
            grad_rows += weight @ cols[tile]
            grad_cols[tile] += weight.T @ rows
        return grad_rows, grad_cols, None, None, None, None, None, None


def _pair_counts(y1: torch.Tensor, y2: torch.Tensor, background: int,
                 negatives=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of set 1: number of positive partners and of positive-or-negative partners in set 2."""
    foreground2 = y2[y2 != background]
    classes, counts = torch.unique(foreground2, return_counts=True)
    foreground1 = y1 != background
    n_pairs = torch.where(foreground1, foreground2.numel(), 0)
    if negatives is not None:
        groups1, groups2 = negatives
        # A foreground row also pairs with the background of its group, a background row with that group's foreground.
        names = torch.unique(torch.cat([groups1, groups2]))
        row_group, col_group = torch.searchsorted(names, groups1), torch.searchsorted(names, groups2)
        background2 = y2 == background
        background_of = torch.bincount(col_group[background2], minlength=names.numel())
        foreground_of = torch.bincount(col_group[~background2], minlength=names.numel())
        n_pairs = torch.where(foreground1, n_pairs + background_of[row_group], foreground_of[row_group])
    if classes.numel() == 0:
        return torch.zeros_like(n_pairs), n_pairs
    where = torch.searchsorted(classes, y1).clamp_max(classes.numel() - 1)
    n_positive = torch.where(foreground1 & (classes[where] == y1), counts[where], 0)
    return n_positive, n_pairs


def label_contrastive_loss(
    z1: torch.Tensor,
    y1: torch.Tensor,
    z2: torch.Tensor,
    y2: torch.Tensor,
    tau: float = 0.1,
    background: int = 0,
    reduction: str = "paper",
    tile_size: int = 4096,
    checkpoint: bool = True,
    background_negatives: bool = False,
    groups1: torch.Tensor | None = None,
    groups2: torch.Tensor | None = None,
) -> torch.Tensor:
    """MixCL label-consistency loss over all cross pairs of two sets of pixel embeddings.

    With ``s_ik = cos(z1[i], z2[k]) / tau`` for every ``i`` in set 1 and ``k`` in set 2:

    * positive pair: ``y1[i] == y2[k] != background``;
    * negative pair: ``y1[i] != y2[k]``, both ``!= background``;
    * a pair with a background pixel on either side is left out; with
      ``background_negatives=True`` (ours) a background pixel is a negative of a
      foreground pixel of the same group (``groups1``/``groups2``, e.g. the source
      dataset: there background means "none of this dataset's organs", which says
      nothing about another dataset's organs); two background pixels never pair.

    ``reduction="paper"`` (Eq. 6, default), one log over all pairs::

        L = -log( sum_{pos} exp(s_ik) / sum_{pos and neg} exp(s_ik) )

    ``reduction="anchor"``: every pixel ``i`` of set 1 that has at least one
    positive partner in set 2 is an anchor (set-2 pixels are never anchors; the
    loss is not symmetrised) with ``l_i = -log( sum_{k pos of i} exp(s_ik) /
    sum_{k pos or neg of i} exp(s_ik) )``, and ``L`` is the plain mean of ``l_i``
    over those anchors.  (The positives are summed inside the log, unlike
    SupCon's ``L_out`` which averages one log per positive.)

    When there is no positive pair the result is an exact zero that is still
    connected to ``z1`` and ``z2``: ``backward()`` works and gives zero gradients.

    Args:
        z1: ``[N1, C]`` floating-point embeddings of set 1 (normalised inside).
        y1: ``[N1]`` integer labels of set 1.
        z2: ``[N2, C]`` embeddings of set 2, same ``C`` and device.
        y2: ``[N2]`` integer labels of set 2.
        tau: temperature > 0 (default 0.1).
        background: the label value that takes no part (default 0).
        reduction: ``"paper"`` or ``"anchor"``, see above.
        tile_size: rows per tile on each side (>= 1).  With ``checkpoint=True``
            memory is about a few ``tile_size x tile_size`` blocks at a time plus
            ``2 * N1 * ceil(N2 / tile_size)`` per-row partial results; the result
            does not depend on it (up to rounding).  The default 4096 makes a
            typical MixCL batch (128 pixels per class) a single tile.
        checkpoint: recompute each tile in backward instead of keeping all tiles'
            similarities for autograd (default True).  Measured on the CPU, C = 64,
            tile 4096: peak growth 960 MiB at N1 = N2 = 8192 and 1012 MiB at 16384
            (``benchmarks/bench_mixcl.py``), where the dense matrix alone would be
            256 MiB and 1 GiB and grows with N^2.
        background_negatives: let background pixels be negatives within a group (default False:
            the paper's rule, background takes no part).  Background pixels are never anchors
            and never positives.
        groups1, groups2: ``[N1]``, ``[N2]`` integer group of each pixel (default: one group).

    Returns:
        Scalar tensor, float32 (float64 for float64 input); computed with
        autocast disabled.
    """
    func = "label_contrastive_loss"
    check_embeddings(func, "z1", z1)
    check_embeddings(func, "z2", z2)
    check_labels(func, "y1", y1, z1.shape[0])
    check_labels(func, "y2", y2, z2.shape[0])
    if z1.shape[1] != z2.shape[1]:
        raise ValueError(
            f"{func}: z1 and z2 must have the same number of channels, got {z1.shape[1]} and {z2.shape[1]}."
        )
    tau = check_positive(func, "tau", tau)
    tile_size = check_positive_int(func, "tile_size", tile_size)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{func}: reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    y1 = y1.long()
    y2 = y2.long()
    negatives = None
    if background_negatives:
        negatives = tuple(torch.zeros_like(y) if g is None else g.to(y.device).long().reshape(-1)
                          for g, y in ((groups1, y1), (groups2, y2)))
        if negatives[0].shape != y1.shape or negatives[1].shape != y2.shape:
            raise ValueError(f"{func}: groups1 and groups2 must have one entry per pixel, got "
                             f"{tuple(negatives[0].shape)} and {tuple(negatives[1].shape)}.")

    with torch.autocast(device_type=z1.device.type, enabled=False):
        a = F.normalize(at_least_float32(z1), dim=1)
        b = F.normalize(at_least_float32(z2), dim=1).to(a.dtype)
        zero = (a.sum() + b.sum()) * 0.0
        n_positive, n_pairs = _pair_counts(y1, y2, background, negatives)
        has_positive = n_positive > 0
        if not bool(has_positive.any()):
            return zero

        recompute = checkpoint and torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
        log_positive_rows = []
        log_all_rows = []
        for start in range(0, a.shape[0], tile_size):
            rows = slice(start, start + tile_size)
            walk = _RowLogSumExp.apply if recompute else _walk_column_tiles
            row_negatives = None if negatives is None else (negatives[0][rows], negatives[1])
            log_positive, log_all = walk(a[rows], b, y1[rows], y2, tau, background, tile_size, row_negatives)
            log_positive_rows.append(log_positive)
            log_all_rows.append(log_all)
        log_positive = torch.cat(log_positive_rows)
        log_all = torch.cat(log_all_rows)

        if reduction == "paper":
            return torch.logsumexp(log_all[n_pairs > 0], dim=0) - torch.logsumexp(
                log_positive[has_positive], dim=0
            )
        return (log_all[has_positive] - log_positive[has_positive]).mean()
