"""MixCL identity-consistency loss: Barlow Twins applied to pixels (MixCL Eq. 4-5).

The two views of one patch go through the encoder and a projector; at one
encoder level their projections are flattened to ``[M, C]`` (one row per pixel
of the batch, :func:`flatten_feature_map`) and the loss pushes the ``C x C``
cross-correlation matrix of the two views towards the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._checks import at_least_float32, check_embeddings, check_positive

NORMALIZATIONS = ("l2", "batchnorm")
REDUCTIONS = ("sum", "mean")


def flatten_feature_map(features: torch.Tensor) -> torch.Tensor:
    """Turn a channel-first feature map into one row per pixel.

    Args:
        features: ``[B, C, *spatial]`` (e.g. ``[B, C, D, H, W]``), any dtype and device.

    Returns:
        ``[B * prod(spatial), C]``: row ``m`` holds the ``C`` channels of one pixel,
        pixels in C order (batch first, then D, H, W).  Two views flattened by
        this function line up pixel by pixel.
    """
    if not isinstance(features, torch.Tensor) or features.ndim < 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"flatten_feature_map: expected a tensor [B, C, *spatial], got {shape}.")
    return features.movedim(1, -1).reshape(-1, features.shape[1])


def _distributed_is_active(func: str, distributed: bool | None) -> bool:
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        return initialised and dist.get_world_size() > 1
    if distributed and not initialised:
        raise ValueError(
            f"{func}: distributed=True but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group() first, or pass distributed=None "
            "to decide automatically."
        )
    return bool(distributed)


def _sum_over_ranks(tensor: torch.Tensor, active: bool) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, differentiably (backward sums the gradients too)."""
    if not active:
        return tensor
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor)


def cross_correlation(
    z1: torch.Tensor,
    z2: torch.Tensor,
    normalization: str = "l2",
    distributed: bool | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """The ``C x C`` cross-correlation matrix of two views' projections (MixCL Eq. 5).

    Args:
        z1, z2: ``[M, C]`` floating-point projections of the two views; row ``m``
            of both is the same pixel.  float16 / bfloat16 are cast to float32.
        normalization: ``"l2"`` (the paper, default):
            ``C_ij = sum_m z1[m,i] z2[m,j] / (||z1[:,i]|| ||z2[:,j]||)``, no centring.
            ``"batchnorm"`` (Barlow Twins): each column is centred and divided by
            its standard deviation (biased, as ``BatchNorm1d`` in training mode),
            then ``C = z1n^T z2n / M``.
        distributed: ``None`` (default) sums over the rows of every rank when
            ``torch.distributed`` is initialised with more than one rank; ``True``
            forces that (error if not initialised); ``False`` uses local rows only.
        eps: numerical floor: the smallest column norm (``"l2"``), or the value
            added to each column's variance (``"batchnorm"``).

    Returns:
        ``[C, C]`` tensor, float32 (float64 for float64 input), computed with
        autocast disabled so it stays float32 under AMP.
    """
    return _cross_correlation("cross_correlation", z1, z2, normalization, distributed, eps)


def _cross_correlation(
    func: str,
    z1: torch.Tensor,
    z2: torch.Tensor,
    normalization: str,
    distributed: bool | None,
    eps: float,
) -> torch.Tensor:
    check_embeddings(func, "z1", z1)
    check_embeddings(func, "z2", z2)
    if z1.shape != z2.shape:
        raise ValueError(
            f"{func}: z1 and z2 must have the same shape [M, C] (row m = the same pixel in "
            f"both views), got {tuple(z1.shape)} and {tuple(z2.shape)}."
        )
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"{func}: normalization must be one of {NORMALIZATIONS}, got {normalization!r}."
        )
    check_positive(func, "eps", eps)
    active = _distributed_is_active(func, distributed)
    if z1.shape[0] == 0 and not active:
        raise ValueError(f"{func}: z1 and z2 have no rows (M = 0); there is nothing to correlate.")
    channels = z1.shape[1]

    with torch.autocast(device_type=z1.device.type, enabled=False):
        a = at_least_float32(z1)
        b = at_least_float32(z2)
        if normalization == "l2":
            # One all-reduce carries the numerator and both squared norms.
            local = torch.cat([(a.T @ b).reshape(-1), (a * a).sum(0), (b * b).sum(0)])
            total = _sum_over_ranks(local, active)
            numerator = total[: channels * channels].reshape(channels, channels)
            norm_a = total[channels * channels : channels * (channels + 1)].clamp_min(eps * eps).sqrt()
            norm_b = total[channels * (channels + 1) :].clamp_min(eps * eps).sqrt()
            return numerator / (norm_a[:, None] * norm_b[None, :])

        rows = torch.tensor(float(a.shape[0]), dtype=a.dtype, device=a.device)
        if active:
            dist.all_reduce(rows)
        means = _sum_over_ranks(torch.cat([a.sum(0), b.sum(0)]), active) / rows
        a = a - means[:channels]
        b = b - means[channels:]
        variances = _sum_over_ranks(torch.cat([(a * a).sum(0), (b * b).sum(0)]), active) / rows
        a = a / (variances[:channels] + eps).sqrt()
        b = b / (variances[channels:] + eps).sqrt()
        return _sum_over_ranks(a.T @ b, active) / rows


def identity_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    lambd: float = 0.0051,
    normalization: str = "l2",
    distributed: bool | None = None,
    eps: float = 1e-8,
    reduction: str = "sum",
) -> torch.Tensor:
    """MixCL identity-consistency loss for one encoder level (Eq. 4-5).

    ``L = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2`` with ``C`` from
    :func:`cross_correlation`.  (The paper prints ``C_ii^2`` in the second term;
    it is the off-diagonal redundancy term of Barlow Twins.)  Sum the result over
    levels yourself.

    Args:
        z1, z2: ``[M, C]`` floating-point projections of the two views of the same
            pixels (``M = B*D*H*W``; see :func:`flatten_feature_map`).  float16 and
            bfloat16 are cast up: the matrix and the loss are float32, also under AMP.
        lambd: weight of the off-diagonal term, >= 0 (default 0.0051, Barlow Twins;
            MixCL does not give one).
        normalization: ``"l2"`` (paper, default: L2 column norms, no centring) or
            ``"batchnorm"`` (Barlow Twins: centre, scale to unit variance, divide by M).
        distributed: ``None`` = automatic.  Under ``torch.distributed`` with more
            than one rank, every sum over ``m`` runs over the rows of ALL ranks
            (differentiable all-reduce), so every rank gets the loss of the whole
            global batch.  The gradient reaching each rank's rows is then
            ``world_size`` times the single-process gradient of those rows, which is
            what DistributedDataParallel expects: it averages parameter gradients
            over ranks, giving exactly the single-process gradient on all rows.
        eps: numerical floor, see :func:`cross_correlation`.
        reduction: ``"sum"`` (paper, default: the formula above) or ``"mean"`` (ours): the
            on-diagonal sum divided by ``C`` and the off-diagonal sum by ``C (C - 1)``,
            ``L = mean_i (1 - C_ii)^2 + lambd * mean_{i != j} C_ij^2``, so the size of the loss
            at a given correlation does not grow with the number of channels.  (The summed form
            grows with ``C^2``, and where ``M < C`` rows its off-diagonal part cannot fall below
            ``lambd (C^2 / M - C)``.)  ``lambd`` then weighs two means: Barlow Twins' 0.0051 with
            8192 channels corresponds to about 42 here.

    Returns:
        Scalar tensor (float32, or float64 for float64 input).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"identity_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if isinstance(lambd, bool) or not isinstance(lambd, (int, float)) or not lambd >= 0:
        raise ValueError(f"identity_loss: lambd must be a number >= 0, got {lambd!r}.")
    correlation = _cross_correlation("identity_loss", z1, z2, normalization, distributed, eps)
    diagonal = torch.diagonal(correlation)
    off_diagonal = torch.eye(correlation.shape[0], dtype=torch.bool, device=correlation.device).logical_not()
    on = (1 - diagonal).pow(2).sum()
    off = correlation.pow(2)[off_diagonal].sum()
    if reduction == "mean":
        channels = correlation.shape[0]
        return on / channels + lambd * off / max(channels * (channels - 1), 1)
    return on + lambd * off
