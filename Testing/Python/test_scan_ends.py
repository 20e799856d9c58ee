"""Past the first and last slice of a scan thinner than the patch: the body continued, or air.

A sliding window over a scan with fewer slices than the patch must show the network something beyond the
scan's ends.  New runs repeat the end slices along the body's long axis (the body goes on); runs saved
before the setting existed keep air, and so predict as they did.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ContrastiveSegLib.config import PreprocessConfig, RunConfig
from ContrastiveSegLib.data.preprocess import PreparedCase, continued_axes
from ContrastiveSegLib.engine.inference import continue_to_patch, sliding_window_probabilities

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Recorder(torch.nn.Module):
    """Logits (x, 0): the probability of class 0 is sigmoid(input), voxel for voxel; every window is kept."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.cat([x, torch.zeros_like(x)], dim=1)


def _slab(shape=(6, 8, 3)) -> torch.Tensor:
    """An image ``[1, X, Y, Z]`` whose every voxel differs, so a misplaced slice shows."""
    return torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape((1,) + shape) / 100.0


def test_the_window_sees_the_end_slices_repeated_along_the_body_axis_and_air_in_plane():
    image, network = _slab(), Recorder()
    probabilities = sliding_window_probabilities(network, image, (8, 8, 8), overlap=0.0, fill=-5.0,
                                                 continue_axes=(2,))
    window = network.seen[0][0, 0]
    assert window.shape == (8, 8, 8)
    # z: 5 missing slices, 2 before (copies of slice 0) and 3 after (copies of slice 2), as MONAI splits them.
    # x: the image has 6 columns of the patch's 8; in-plane is not continued, so those 2 are air (the fill).
    inside = window[1:7]
    for z in range(8):
        source = min(max(z - 2, 0), 2)
        assert torch.equal(inside[:, :, z], image[0, :, :, source]), z
    assert torch.all(window[0] == -5.0) and torch.all(window[7] == -5.0)
    # The probabilities are the image's own voxels, in place: cut back exactly to the scan.
    assert probabilities.shape == (2,) + tuple(image.shape[1:])
    assert torch.allclose(probabilities[0], torch.sigmoid(image[0]))


def test_air_fills_the_window_where_nothing_is_continued():
    image, network = _slab(), Recorder()
    probabilities = sliding_window_probabilities(network, image, (8, 8, 8), overlap=0.0, fill=-5.0)
    window = network.seen[0][0, 0]
    assert int((window == -5.0).sum()) == 8 * 8 * 8 - image.numel()
    assert torch.allclose(probabilities[0], torch.sigmoid(image[0]))


def test_a_scan_as_long_as_the_patch_is_left_alone():
    batch = _slab((6, 8, 8))[None]
    extended, kept = continue_to_patch(batch, (8, 8, 8), (2,))
    assert extended is batch and extended[(slice(None), slice(None)) + kept].shape == batch.shape


def test_the_continued_axis_is_the_orientations_superior_inferior_one():
    assert continued_axes(PreprocessConfig()) == (2,)
    assert continued_axes(PreprocessConfig(orientation="LPS")) == (2,)
    assert continued_axes(PreprocessConfig(orientation="SAR")) == (0,)
    assert continued_axes(PreprocessConfig(beyond_scan_ends="air")) == ()
    with pytest.raises(ValueError, match="beyond_scan_ends"):
        continued_axes(PreprocessConfig(beyond_scan_ends="mirror"))


def test_new_runs_continue_and_runs_saved_before_the_setting_keep_air():
    assert RunConfig().preprocess.beyond_scan_ends == "continue"
    assert RunConfig.from_dict(RunConfig().to_dict()).preprocess.beyond_scan_ends == "continue"
    saved_before = RunConfig().to_dict()
    del saved_before["preprocess"]["beyond_scan_ends"]
    assert RunConfig.from_dict(saved_before).preprocess.beyond_scan_ends == "air"
    assert RunConfig.from_dict({}).preprocess.beyond_scan_ends == "air"


def test_validation_meets_a_thin_cases_ends_as_predict_does():
    """``finetune``'s validation predicts a prepared case with the case's continued axes."""
    from ContrastiveSegLib.finetune import predict_prepared

    image = _slab().numpy()
    for axes, expected_air in (((2,), 2 * 8 * 8), ((), 8 * 8 * 8 - image.size)):
        network = Recorder()
        case = PreparedCase("thin", image, None, np.eye(4), fill=-5.0, continued_axes=axes)
        labels = predict_prepared(network, case, (8, 8, 8), 0.0)
        assert labels.shape == image.shape[1:]
        assert int((network.seen[0] == -5.0).sum()) == expected_air


def test_the_cli_option_sets_the_run_config():
    from ContrastiveSegLib.cli import _training_config, build_parser

    parser = build_parser()
    for given, expected in (([], "continue"), (["--beyond-scan-ends", "air"], "air")):
        args = parser.parse_args(["finetune", "--data", "x", "--labels", "liver", "--out", "y"] + given)
        assert _training_config(args, "finetune").preprocess.beyond_scan_ends == expected
