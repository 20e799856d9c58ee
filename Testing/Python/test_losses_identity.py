"""Tests of the MixCL identity-consistency loss (ContrastiveSegLib/losses/identity.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ContrastiveSegLib.losses import cross_correlation, flatten_feature_map, identity_loss

LAMBD = 0.0051

HAND_CASES = [
    pytest.param(
        # z1 columns: [1, 0] and [0, 1] (norms 1, 1); z2 columns: [1, 0] and [1, 1] (norms 1, sqrt 2).
        # Numerators: C00 = 1, C01 = 1, C10 = 0, C11 = 1; divided by the norms:
        # C = [[1, 1/sqrt2], [0, 1/sqrt2]].
        # L = (1 - 1)^2 + (1 - 0.70710678)^2 + lambd * ((1/sqrt2)^2 + 0^2)
        #   = 0.08578644 + 0.0051 * 0.5 = 0.08833644
        {"lambd": LAMBD},
        [[1.0, 0.0], [0.0, 1.0]],
        [[1.0, 1.0], [0.0, 1.0]],
        0.08833644,
        id="l2-hand",
    ),
    pytest.param(
        # Same matrix, off-diagonal term switched off: (1 - 1/sqrt2)^2 = 0.08578644.
        {"lambd": 0.0},
        [[1.0, 0.0], [0.0, 1.0]],
        [[1.0, 1.0], [0.0, 1.0]],
        0.08578644,
        id="l2-no-off-diagonal",
    ),
    pytest.param(
        # Unnormalised: C is not scaled by M, only by column norms.  z1 = 3 * z2 column-wise
        # (positive scale), columns orthogonal: C = I, L = 0.
        {"lambd": LAMBD},
        [[3.0, 0.0], [0.0, 6.0], [0.0, 0.0]],
        [[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]],
        0.0,
        id="l2-identity-matrix",
    ),
    pytest.param(
        # reduction="mean" on the first matrix C = [[1, 1/sqrt2], [0, 1/sqrt2]] (C = 2 channels):
        # on-diagonal sum 0.08578644 / 2 + lambd * off-diagonal sum 0.5 / (2 * 1)
        # = 0.04289322 + 0.0051 * 0.25 = 0.04416822
        {"lambd": LAMBD, "reduction": "mean"},
        [[1.0, 0.0], [0.0, 1.0]],
        [[1.0, 1.0], [0.0, 1.0]],
        0.04416822,
        id="l2-mean-hand",
    ),
    pytest.param(
        # Batch norm, M = 2: centred columns are +-d and become +-1 after dividing by the
        # (biased) std d.  z1 columns [0, 2] -> [-1, 1], [5, 1] -> [1, -1];
        # z2 columns [1, 3] -> [-1, 1], [1, 0] -> [1, -1].
        # C = z1n^T z2n / 2 = [[(1 + 1)/2, (-1 - 1)/2], [(-1 - 1)/2, (1 + 1)/2]] = [[1, -1], [-1, 1]]
        # L = 0 + lambd * ((-1)^2 + (-1)^2) = 2 * 0.0051 = 0.0102
        {"lambd": LAMBD, "normalization": "batchnorm"},
        [[0.0, 5.0], [2.0, 1.0]],
        [[1.0, 1.0], [3.0, 0.0]],
        0.0102,
        id="batchnorm-hand",
    ),
]


@pytest.mark.parametrize(("kwargs", "z1", "z2", "expected"), HAND_CASES)
def test_hand_computed_values(kwargs, z1, z2, expected):
    loss = identity_loss(torch.tensor(z1), torch.tensor(z2), **kwargs)
    assert loss.ndim == 0
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_cross_correlation_hand_matrix():
    # The l2 matrix of the first hand case: [[1, 1/sqrt2], [0, 1/sqrt2]].
    correlation = cross_correlation(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    half = math.sqrt(0.5)
    torch.testing.assert_close(correlation, torch.tensor([[1.0, half], [0.0, half]]))
    with pytest.raises(ValueError, match="cross_correlation"):
        cross_correlation(torch.ones(3, 2), torch.ones(3, 2), normalization="none")


def reference_identity_loss(z1, z2, lambd, normalization, eps=1e-8):
    """Eq. 4-5 written with plain Python loops over pixels and channels."""
    a, b = z1.tolist(), z2.tolist()
    rows, channels = len(a), len(a[0])
    if normalization == "batchnorm":

        def standardise(z):
            out = [row[:] for row in z]
            for i in range(channels):
                mean = sum(z[m][i] for m in range(rows)) / rows
                var = sum((z[m][i] - mean) ** 2 for m in range(rows)) / rows
                for m in range(rows):
                    out[m][i] = (z[m][i] - mean) / math.sqrt(var + eps)
            return out

        a, b = standardise(a), standardise(b)
    loss = 0.0
    for i in range(channels):
        for j in range(channels):
            numerator = sum(a[m][i] * b[m][j] for m in range(rows))
            if normalization == "l2":
                denominator = math.sqrt(sum(a[m][i] ** 2 for m in range(rows))) * math.sqrt(
                    sum(b[m][j] ** 2 for m in range(rows))
                )
            else:
                denominator = rows
            c = numerator / denominator
            loss += (1 - c) ** 2 if i == j else lambd * c**2
    return loss


@pytest.mark.parametrize("normalization", ["l2", "batchnorm"])
@pytest.mark.parametrize("lambd", [0.0051, 0.5])
def test_matches_loop_reference(normalization, lambd):
    generator = torch.Generator().manual_seed(3)
    z1 = torch.randn(7, 3, generator=generator, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(7, 3, generator=generator, dtype=torch.float64)
    loss = identity_loss(z1, z2, lambd=lambd, normalization=normalization)
    assert loss.item() == pytest.approx(reference_identity_loss(z1, z2, lambd, normalization), rel=1e-10)


@pytest.mark.parametrize("normalization", ["l2", "batchnorm"])
def test_gradients_are_correct(normalization):
    generator = torch.Generator().manual_seed(4)
    z1 = torch.randn(6, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: identity_loss(a, b, lambd=0.3, normalization=normalization), (z1, z2)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalization", ["l2", "batchnorm"])
def test_low_precision_input_gives_float32_answer(dtype, normalization):
    generator = torch.Generator().manual_seed(5)
    z1 = torch.randn(64, 4, generator=generator).to(dtype)
    z2 = torch.randn(64, 4, generator=generator).to(dtype)
    loss = identity_loss(z1, z2, normalization=normalization)
    expected = identity_loss(z1.float(), z2.float(), normalization=normalization)
    assert loss.dtype == torch.float32
    assert cross_correlation(z1, z2, normalization).dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


def test_stays_float32_under_autocast():
    generator = torch.Generator().manual_seed(6)
    z1 = torch.randn(64, 8, generator=generator)
    z2 = torch.randn(64, 8, generator=generator)
    expected = identity_loss(z1, z2)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = identity_loss(z1, z2)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


def test_zero_column_gives_finite_loss_and_gradients():
    z1 = torch.tensor([[1.0, 0.0], [2.0, 0.0]], requires_grad=True)
    z2 = torch.tensor([[1.0, 1.0], [2.0, 3.0]], requires_grad=True)
    loss = identity_loss(z1, z2)
    loss.backward()
    # Column 1 of z1 is all zero: C_1j = 0, so (1 - C_11)^2 = 1 and C_00 = 1.
    # C_01 = (1 + 6) / (sqrt 5 * sqrt 10) = 0.98994949, lambd * C_01^2 = 0.0051 * 0.98 = 0.004998
    assert loss.item() == pytest.approx(1.0 + LAMBD * 0.98, abs=1e-6)
    assert torch.isfinite(z1.grad).all()
    assert torch.isfinite(z2.grad).all()


def test_flatten_feature_map_puts_one_pixel_per_row():
    features = torch.arange(2 * 3 * 1 * 2 * 2).reshape(2, 3, 1, 2, 2)
    rows = flatten_feature_map(features)
    assert rows.shape == (8, 3)
    # Row m = b * 4 + (d * 4 + h * 2 + w): batch 1, pixel (0, 1, 0) is row 4 + 2 = 6.
    assert rows[6].tolist() == features[1, :, 0, 1, 0].tolist()


@pytest.mark.parametrize(
    ("z1", "z2", "kwargs", "error"),
    [
        (torch.ones(4, 2), torch.ones(4, 3), {}, ValueError),
        (torch.ones(4), torch.ones(4), {}, ValueError),
        (torch.ones(4, 2, dtype=torch.long), torch.ones(4, 2, dtype=torch.long), {}, ValueError),
        (torch.ones(4, 2), torch.ones(4, 2), {"normalization": "cosine"}, ValueError),
        (torch.ones(4, 2), torch.ones(4, 2), {"lambd": -1.0}, ValueError),
        (torch.ones(4, 2), torch.ones(4, 2), {"distributed": True}, ValueError),
        (torch.ones(0, 2), torch.ones(0, 2), {}, ValueError),
        ([[1.0]], torch.ones(1, 1), {}, TypeError),
    ],
)
def test_bad_arguments_are_rejected(z1, z2, kwargs, error):
    with pytest.raises(error, match="identity_loss"):
        identity_loss(z1, z2, **kwargs)


# --- DDP: two gloo processes, each with half of the rows ------------------------------------

_DDP_WORKER = """
import sys
sys.path.insert(0, REPO_ROOT)
import torch
import torch.distributed as dist
from ContrastiveSegLib.engine.device import import_before_process_group
from ContrastiveSegLib.losses import identity_loss

torch.set_num_threads(1)
# The all_reduce below imports torch._dynamo; imported after the group exists, it keeps the group
# alive past destroy_process_group and the rank aborts at exit (see import_before_process_group).
import_before_process_group()
dist.init_process_group("gloo", init_method=INIT_METHOD, rank=RANK, world_size=WORLD_SIZE)
try:
    data = torch.load(INPUT_PATH)
    rows = slice(RANK * ROWS_PER_RANK, (RANK + 1) * ROWS_PER_RANK)
    results = {}
    for normalization in ("l2", "batchnorm"):
        z1 = data["z1"][rows].clone().requires_grad_(True)
        z2 = data["z2"][rows].clone().requires_grad_(True)
        loss = identity_loss(z1, z2, lambd=data["lambd"], normalization=normalization)
        loss.backward()
        local = identity_loss(z1, z2, lambd=data["lambd"], normalization=normalization,
                              distributed=False)
        results[normalization] = {"loss": loss.detach(), "local_loss": local.detach(),
                                  "grad1": z1.grad, "grad2": z2.grad}
    torch.save(results, OUTPUT_PATH)
    # Both ranks leave together: a rank tearing gloo down while the other is still in a
    # collective aborted the process ("terminate called without an active exception").
    dist.barrier()
finally:
    dist.destroy_process_group()
"""


def test_distributed_sums_run_over_all_ranks(tmp_path):
    import runpy

    import torch.multiprocessing as mp

    world_size, rows_per_rank = 2, 5
    generator = torch.Generator().manual_seed(7)
    z1 = torch.randn(world_size * rows_per_rank, 3, generator=generator, dtype=torch.float64)
    z2 = z1 + 0.7 * torch.randn(world_size * rows_per_rank, 3, generator=generator, dtype=torch.float64)
    input_path = tmp_path / "inputs.pt"
    torch.save({"z1": z1, "z2": z2, "lambd": 0.2}, input_path)
    script = tmp_path / "ddp_worker.py"
    script.write_text(_DDP_WORKER)

    # runpy.run_path is the process target so that the child needs nothing from this test
    # module (it works whatever import mode pytest uses).
    context = mp.get_context("spawn")
    processes = []
    for rank in range(world_size):
        init_globals = {
            "REPO_ROOT": str(Path(__file__).resolve().parents[2]),
            "INIT_METHOD": (tmp_path / "ddp_init").as_uri(),
            "RANK": rank,
            "WORLD_SIZE": world_size,
            "ROWS_PER_RANK": rows_per_rank,
            "INPUT_PATH": str(input_path),
            "OUTPUT_PATH": str(tmp_path / f"rank{rank}.pt"),
        }
        process = context.Process(target=runpy.run_path, args=(str(script), init_globals))
        process.start()
        processes.append(process)
    for process in processes:
        process.join(timeout=120)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert [process.exitcode for process in processes] == [0] * world_size

    for normalization in ("l2", "batchnorm"):
        a = z1.clone().requires_grad_(True)
        b = z2.clone().requires_grad_(True)
        single = identity_loss(a, b, lambd=0.2, normalization=normalization)
        single.backward()
        for rank in range(world_size):
            result = torch.load(tmp_path / f"rank{rank}.pt")[normalization]
            rows = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)
            torch.testing.assert_close(result["loss"], single.detach(), rtol=1e-10, atol=1e-12)
            # The local-only loss differs: the all-reduce really happened.
            assert abs(result["local_loss"].item() - single.item()) > 1e-3
            # Every rank computes the whole loss and the all-reduce backward sums the ranks'
            # gradients, so each rank's rows get world_size x the single-process gradient;
            # DDP's mean over ranks then gives exactly the single-process gradient.
            torch.testing.assert_close(result["grad1"] / world_size, a.grad[rows], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(result["grad2"] / world_size, b.grad[rows], rtol=1e-9, atol=1e-12)


def _correlated_columns(rows: int, channels: int, between: float, across_views: float, seed: int = 0):
    """Two views ``[rows, channels]`` whose columns have (uncentred, L2) correlation about ``between`` with each
    other and about ``across_views`` with the same column of the other view."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(rows, 1, generator=generator, dtype=torch.float64)
    own = torch.randn(rows, channels, generator=generator, dtype=torch.float64)
    z1 = math.sqrt(between) * common + math.sqrt(1 - between) * own
    noise = torch.randn(rows, channels, generator=generator, dtype=torch.float64)
    z2 = across_views * z1 + math.sqrt(1 - across_views**2) * (math.sqrt(between) * common
                                                                + math.sqrt(1 - between) * noise)
    return z1, z2


def test_mean_reduction_does_not_grow_with_channels():
    """At a fixed correlation structure, doubling C leaves the normalised loss in place; the sum grows ~ C^2."""
    values = {}
    for channels in (16, 32):
        z1, z2 = _correlated_columns(40000, channels, between=0.3, across_views=0.8)
        values[channels] = {reduction: float(identity_loss(z1, z2, lambd=1.0, reduction=reduction))
                            for reduction in ("mean", "sum")}
    assert values[32]["mean"] == pytest.approx(values[16]["mean"], rel=0.03)
    assert values[32]["sum"] > 3.5 * values[16]["sum"]


def test_mean_reduction_is_the_sum_divided_per_part():
    z1, z2 = _correlated_columns(50, 6, between=0.2, across_views=0.5, seed=3)
    on = float(identity_loss(z1, z2, lambd=0.0))
    off = float(identity_loss(z1, z2, lambd=1.0)) - on
    mean = float(identity_loss(z1, z2, lambd=0.7, reduction="mean"))
    assert mean == pytest.approx(on / 6 + 0.7 * off / 30, rel=1e-12)
    with pytest.raises(ValueError, match="reduction"):
        identity_loss(z1, z2, reduction="average")
