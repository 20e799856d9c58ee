"""Tests of the per-position variance floor (ContrastiveSegLib/losses/position_variance.py)."""

from __future__ import annotations

import math

import pytest
import torch

from ContrastiveSegLib.losses import position_variance_loss
from ContrastiveSegLib.probe import PositionVarianceShare


def _position_code(patches=32, channels=8, grid=(4, 4, 2), seed=0):
    """The same random map for every patch: features that only say where a voxel sits."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, channels, *grid, generator=generator).expand(patches, -1, -1, -1, -1).clone()


def _content(patches=32, channels=8, grid=(4, 4, 2), seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(patches, channels, *grid, generator=generator)


def _share(features):
    share = PositionVarianceShare()
    share.add(features.detach())
    return share.share()


def test_hand_computed_two_patches():
    # One channel, two positions, two patches: f = [[1, 3], [3, 1]] (patch x position).
    # Mean 2, spread over all four values 1 -> standardised [[-1, 1], [1, -1]].
    # Per position, unbiased variance over the two patches: ((-1)^2 + 1^2) / 1 = 2, std sqrt(2) > 1 -> loss 0.
    f = torch.tensor([[1.0, 3.0], [3.0, 1.0]]).reshape(2, 1, 2)
    assert float(position_variance_loss(f)) == pytest.approx(0.0, abs=1e-6)
    # f = [[1, 3], [1, 3]]: a pure position code, no variance across patches -> relu(1 - sqrt(eps)) = 0.99.
    g = torch.tensor([[1.0, 3.0], [1.0, 3.0]]).reshape(2, 1, 2)
    assert float(position_variance_loss(g)) == pytest.approx(1.0 - math.sqrt(1e-4), abs=1e-5)


def test_a_position_code_costs_the_full_hinge_and_content_about_nothing():
    assert float(position_variance_loss(_position_code())) > 0.98
    assert float(position_variance_loss(_content())) < 0.1


def test_the_loss_does_not_depend_on_the_features_scale():
    features = 0.7 * _position_code() + _content()
    # Equal up to the eps under the square roots.
    torch.testing.assert_close(position_variance_loss(25.0 * features + 3.0), position_variance_loss(features),
                               rtol=1e-3, atol=1e-4)
    assert float(position_variance_loss(features)) > 0.1


def test_minimising_it_removes_the_position_code():
    # Features = mostly a position code plus a little content; a learnable per-channel mixing of the two
    # (as a 1x1 convolution would do) trained on the loss alone must turn to the content.
    code, content = _position_code(), _content()
    weights = torch.tensor([3.0, 0.3], requires_grad=True)
    optimiser = torch.optim.Adam([weights], lr=0.05)
    before = _share(weights[0] * code + weights[1] * content)
    for _ in range(200):
        optimiser.zero_grad()
        loss = position_variance_loss(weights[0] * code + weights[1] * content)
        loss.backward()
        optimiser.step()
    after = _share(weights[0] * code + weights[1] * content)
    assert before > 0.9 and after < 0.2


def test_fewer_than_two_patches_give_a_connected_zero():
    features = torch.randn(1, 4, 2, 2, 2, requires_grad=True)
    loss = position_variance_loss(features)
    loss.backward()
    assert float(loss) == 0.0 and features.grad is not None and float(features.grad.abs().sum()) == 0.0
    with pytest.raises(ValueError, match=r"\[N, C, \*grid\]"):
        position_variance_loss(torch.randn(3, 4))
