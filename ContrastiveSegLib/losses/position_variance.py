"""A variance floor across patches at every position: the answer to features that only say where a voxel sits.

A convolutional encoder with zero padding can compute, at its coarse levels, a
pattern that is the same for every patch and differs between positions (a
code for "where in the patch").  Under instance normalisation a level cannot
collapse to a constant, so when a pre-training signal rewards features that
do not depend on the input (an embedding pulled towards its positives, a
reconstruction the skip connections already provide), the level collapses to
that position code instead (docs/pretraining.md, "Position collapse").

This loss is VICReg's variance term (Bardes et al. 2022) taken per position:
the features of the batch's patches at one position must vary across patches.
A position code has no variance across patches at a fixed position and costs
the full hinge; features that depend on the anatomy under the voxel cost
about nothing.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._checks import at_least_float32


def position_variance_loss(features: torch.Tensor, target: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """Mean over channels and positions of ``relu(target - std_n(f[n, c, p]))``.

    The features are first standardised per channel over all patches and
    positions, so ``std_n`` is the share of a channel's spread found between
    patches at one position: 1 when position explains nothing, 0 for a pure
    position code.

    Args:
        features: ``[N, C, *grid]`` one level's features of N >= 2 patches.
        target: the hinge's floor on the standard deviation across patches (VICReg: 1).
        eps: added to the variances before the square roots.

    Returns:
        Scalar tensor (float32 or float64); an exact zero connected to
        ``features`` when N < 2.
    """
    if features.ndim < 3:
        raise ValueError(f"position_variance_loss: features must be [N, C, *grid], got shape {tuple(features.shape)}")
    if features.shape[0] < 2:
        return features.sum() * 0.0
    with torch.autocast(device_type=features.device.type, enabled=False):
        f = at_least_float32(features).flatten(2)                                      # [N, C, P]
        centred = f - f.mean(dim=(0, 2), keepdim=True)
        f = centred / torch.sqrt(centred.pow(2).mean(dim=(0, 2), keepdim=True) + eps)
        across = torch.sqrt(f.var(dim=0, unbiased=True) + eps)                        # [C, P]
        return torch.relu(target - across).mean()


def position_floor(levels: Sequence[torch.Tensor], level_names: Sequence[str], chosen: Sequence[str],
                   weight: float) -> Optional[torch.Tensor]:
    """The floor of MixCL and GCL: :func:`position_variance_loss` averaged over the ``chosen`` levels.

    ``levels`` are an encoder's outputs named by ``level_names``; the result is unweighted, and None when
    ``weight`` is 0 or no level is chosen (the floor is off).
    """
    if not weight or not chosen:
        return None
    return torch.stack([position_variance_loss(levels[list(level_names).index(name)]) for name in chosen]).mean()
