"""Local contrastive loss against class prototypes (Chaitanya et al., pseudo-label self-training).

Anchors are a few random foreground voxels per class (:func:`sample_anchors`);
prototypes are the mean embedding of each foreground class present in an image
(:func:`class_prototypes`).  An anchor is pulled towards the prototypes of its
class and pushed from the others (:func:`prototype_contrastive_loss`).
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


def prototype_contrastive_loss(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    prototypes: torch.Tensor,
    prototype_labels: torch.Tensor,
    tau: float = 0.1,
) -> torch.Tensor:
    """Mean over (anchor, same-class prototype) pairs of a softmax over all prototypes.

    For every anchor ``n`` and every prototype ``k`` with
    ``prototype_labels[k] == anchor_labels[n]``, one term::

        -log( exp(cos(a_n, p_k) / tau) / sum_{k'} exp(cos(a_n, p_k') / tau) )

    where the denominator runs over ALL ``K`` prototypes given (pass the
    prototypes of both images for inter-image mode, of the anchor's own image
    for intra-image mode).  The result is the plain mean of all terms, so an
    anchor with two same-class prototypes contributes two terms.  Anchors whose
    class has no prototype contribute nothing; with no term at all the result
    is an exact zero still connected to the inputs (backward gives zero
    gradients).

    Background is not handled here: the caller passes neither background
    anchors nor background prototypes (:func:`class_prototypes` and
    :func:`sample_anchors` leave background out).

    Args:
        anchors: ``[N, C]`` floating-point anchor embeddings (normalised inside).
        anchor_labels: ``[N]`` integer class of each anchor.
        prototypes: ``[K, C]`` floating-point prototypes (normalised inside).
        prototype_labels: ``[K]`` integer class of each prototype.
        tau: temperature > 0 (default 0.1).

    Returns:
        Scalar tensor, float32 (float64 for float64 input); autocast disabled.
    """
    func = "prototype_contrastive_loss"
    check_embeddings(func, "anchors", anchors)
    check_embeddings(func, "prototypes", prototypes)
    check_labels(func, "anchor_labels", anchor_labels, anchors.shape[0])
    check_labels(func, "prototype_labels", prototype_labels, prototypes.shape[0])
    if anchors.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"{func}: anchors and prototypes must have the same number of channels, "
            f"got {anchors.shape[1]} and {prototypes.shape[1]}."
        )
    tau = check_positive(func, "tau", tau)

    with torch.autocast(device_type=anchors.device.type, enabled=False):
        a = F.normalize(at_least_float32(anchors), dim=1)
        p = F.normalize(at_least_float32(prototypes), dim=1).to(a.dtype)
        positive = anchor_labels[:, None] == prototype_labels[None, :]
        if not bool(positive.any()):
            return (a.sum() + p.sum()) * 0.0
        log_probability = torch.log_softmax(a @ p.T / tau, dim=1)
        return -log_probability[positive].mean()


def class_prototypes(
    embeddings: torch.Tensor, labels: torch.Tensor, background: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean embedding of each foreground class present.

    Args:
        embeddings: ``[C, *spatial]`` channel-first map (e.g. ``[C, D, H, W]``)
            with ``labels`` of shape ``spatial``, or ``[N, C]`` rows with
            ``labels`` of shape ``[N]``.  A 2-D tensor with 1-D labels is always
            read as ``[N, C]``.
        labels: integer labels on the same device.
        background: label value left out (default 0).

    Returns:
        ``(prototypes [K, C], prototype_labels [K] int64)``: one row per
        foreground value present, in ascending label order, with the dtype of
        ``embeddings``; the mean is not normalised (the losses normalise).
        ``K = 0`` when there is no foreground.
    """
    func = "class_prototypes"
    if not isinstance(embeddings, torch.Tensor) or not embeddings.is_floating_point():
        raise ValueError(f"{func}: embeddings must be a floating-point torch.Tensor.")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{func}: labels must be an integer torch.Tensor.")
    if embeddings.ndim == 2 and labels.ndim == 1:
        if embeddings.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{func}: embeddings [N, C] = {tuple(embeddings.shape)} and labels "
                f"{tuple(labels.shape)} disagree on N."
            )
        rows = embeddings
    elif embeddings.ndim == labels.ndim + 1 and embeddings.shape[1:] == labels.shape:
        rows = embeddings.reshape(embeddings.shape[0], -1).T
    else:
        raise ValueError(
            f"{func}: expected embeddings [C, *spatial] with labels [*spatial], or [N, C] with "
            f"labels [N]; got {tuple(embeddings.shape)} and {tuple(labels.shape)}."
        )
    flat_labels = labels.reshape(-1).long()
    foreground = flat_labels != background
    classes, which = torch.unique(flat_labels[foreground], return_inverse=True)
    sums = rows.new_zeros(classes.numel(), rows.shape[1]).index_add_(0, which, rows[foreground])
    counts = torch.bincount(which, minlength=classes.numel()).to(rows.dtype)
    return sums / counts[:, None], classes


def sample_anchors(
    labels: torch.Tensor,
    n_per_class: int,
    background: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Up to ``n_per_class`` random voxels of each foreground class.

    Args:
        labels: integer tensor of any shape (e.g. ``[D, H, W]``).
        n_per_class: voxels drawn per class, without replacement, >= 1; a class
            with fewer voxels gives all of them.
        background: label value never drawn (default 0).
        generator: ``torch.Generator`` for the draws (its device is used for
            the random numbers); None = global CPU RNG.

    Returns:
        1-D int64 tensor of flat (C-order) indices into ``labels.reshape(-1)``,
        on the device of ``labels``: grouped by class in ascending label order,
        ascending within a class.  Read their classes with
        ``labels.reshape(-1)[indices]``.
    """
    func = "sample_anchors"
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{func}: labels must be an integer torch.Tensor.")
    n_per_class = check_positive_int(func, "n_per_class", n_per_class)
    random_device = generator.device if generator is not None else torch.device("cpu")
    flat = labels.reshape(-1)
    chosen = []
    for value in torch.unique(flat):
        if value == background:
            continue
        positions = torch.nonzero(flat == value).squeeze(1)
        if positions.numel() > n_per_class:
            pick = torch.randperm(positions.numel(), generator=generator, device=random_device)[:n_per_class]
            positions = positions[pick.to(positions.device)].sort().values
        chosen.append(positions)
    if not chosen:
        return torch.zeros(0, dtype=torch.long, device=labels.device)
    return torch.cat(chosen)
