"""Supervised contrastive loss (Khosla et al. 2020, "L_out" form) for the GCL image branch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import at_least_float32, check_embeddings, check_labels, check_positive


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss over one batch of embeddings.

    With ``s_ia = cos(z_i, z_a) / tau`` and ``P(i)`` the other samples with the
    same label as ``i`` (never ``i`` itself)::

        loss_i = -1/|P(i)| * sum_{p in P(i)} log( exp(s_ip) / sum_{a != i} exp(s_ia) )

    Anchors with an empty ``P(i)`` are skipped; the result is the mean of
    ``loss_i`` over the anchors that have a positive.  If none has one (all
    labels distinct, or ``B < 2``), the result is an exact zero still connected
    to ``z``, so ``backward()`` works and gives zero gradients.

    Every label value takes part (there is no background here): in GCL the
    labels are meta labels (dataset, case, position bin).

    Args:
        z: ``[B, C]`` floating-point embeddings (L2-normalised inside).
        labels: ``[B]`` integer labels, any integer dtype.
        tau: temperature > 0 (default 0.1).

    Returns:
        Scalar tensor, float32 (float64 for float64 input); computed with
        autocast disabled.
    """
    func = "supcon_loss"
    check_embeddings(func, "z", z)
    check_labels(func, "labels", labels, z.shape[0])
    tau = check_positive(func, "tau", tau)

    with torch.autocast(device_type=z.device.type, enabled=False):
        embeddings = F.normalize(at_least_float32(z), dim=1)
        logits = embeddings @ embeddings.T / tau
        itself = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
        positive = (labels[:, None] == labels[None, :]) & ~itself
        n_positive = positive.sum(dim=1)
        has_positive = n_positive > 0
        if not bool(has_positive.any()):
            return embeddings.sum() * 0.0
        # The anchor itself is left out of the denominator (-inf, gradient 0).
        log_denominator = torch.logsumexp(logits.masked_fill(itself, float("-inf")), dim=1)
        log_probability = logits - log_denominator[:, None]
        per_anchor = -log_probability.masked_fill(~positive, 0.0).sum(dim=1) / n_positive.clamp_min(1)
        return per_anchor[has_positive].mean()
