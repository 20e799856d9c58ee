"""predict --tta flips only the axes the run trained mirrored, and swaps left/right classes when it flips
the left-right axis."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from ContrastiveSegLib.config import RunConfig
from ContrastiveSegLib.engine.inference import LoadedModel, mirrored_probabilities, predict_image, tta_flips

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SideByPosition(nn.Module):
    """A "network" that calls the low-x half of its input class 1 (left) and the high-x half class 2.

    It knows left from right by position, as a trained network does from anatomy; it ignores intensities.
    It counts its calls.
    """

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        size = x.shape[2]
        position = torch.linspace(-1.0, 1.0, size).view(1, 1, size, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return torch.cat([torch.zeros_like(position) + self.anchor, -4 * position, 4 * position], dim=1)


def _config(labels, mirror_axes=()):
    config = RunConfig()
    config.data.labels = list(labels)
    config.model.patch_size = (16, 16, 16)
    config.preprocess.spacing = (2.0, 2.0, 2.0)
    config.train.mirror_axes = tuple(mirror_axes)
    return config


def test_flips_are_the_trained_axes_only():
    assert tta_flips(_config(["liver"]))[0] == ()                       # runs trained without mirroring
    assert tta_flips(_config(["liver"], (2, 1)))[0] == (1, 2)
    axes, (swap, lateral) = tta_flips(_config(["kidney_left", "kidney_right"], (0, 2)))
    assert axes == (0, 2) and lateral == 0 and swap.tolist() == [0, 2, 1]
    assert tta_flips(_config(["kidney_left", "kidney_right"], (2,)))[1][0] is None   # no left-right flip, no swap


def test_a_left_right_flip_swaps_the_pair_back():
    image = torch.rand(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    net = SideByPosition().eval()
    plain = mirrored_probabilities(net, image, (16, 16, 16), 0.0, axes=())
    swapped = mirrored_probabilities(net, image, (16, 16, 16), 0.0, axes=(0,), swap=np.array([0, 2, 1]))
    torch.testing.assert_close(swapped, plain)
    # Without the swap the two passes disagree everywhere and average to a coin toss: the test can fail.
    unswapped = mirrored_probabilities(net, image, (16, 16, 16), 0.0, axes=(0,), swap=None)
    assert (unswapped.argmax(0) != plain.argmax(0)).float().mean() > 0.2


@pytest.mark.parametrize("mirror_axes, passes", [((), 1), ((2,), 2), ((1, 2), 4)])
def test_predict_tta_runs_one_pass_per_combination_of_trained_axes(mirror_axes, passes):
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 100, (16, 16, 16)).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    net = SideByPosition().eval()
    model = LoadedModel(net, _config(["liver", "spleen"], mirror_axes), {0: "background", 1: "liver", 2: "spleen"},
                        "none")
    predict_image(model, "unused", image=image, flip_tta=False)
    single = net.calls
    net.calls = 0
    predict_image(model, "unused", image=image, flip_tta=True)
    assert net.calls == passes * single
