"""MixCL benchmarks, printed as one JSON object.

    python benchmarks/bench_mixcl.py [--device cpu|cuda] [--model unet|unetr] [--size small] [--patch 64,64,32]

Measured in one run, on the same machine:

* ``step``: seconds per optimisation step and peak memory of MixCL pre-training and of plain
  supervised training (Dice + CE) on the same backbone, patch and batch (B samples; a MixCL sample
  is three patches through the encoder: V1, V1' and V2), each in its own process so that each
  peak is its own; ``mixcl_over_supervised`` is the ratio of the median step times.
* ``label_loss``: forward + backward time and peak memory of the label-consistency loss on
  ``N`` sampled voxels per side (N = 1k, 4k, 16k, 64k; 64-dimensional embeddings, half of the voxels
  of each of 4 classes), computed in tiles; ``dense_matrix_mib`` is what one N x N float32 matrix
  of pair similarities would need, which the tiled loss never allocates.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_engine import peak_memory, run_child, time_training_steps  # noqa: E402


def _mixcl_step_child(architecture: str, size: str, patch, steps: int, device_name: str, batch_size: int) -> dict:
    import torch

    from ContrastiveSegLib.config import ModelConfig
    from ContrastiveSegLib.engine.allocator import tune_glibc_malloc
    from ContrastiveSegLib.methods import mixcl
    from ContrastiveSegLib.models import build_backbone

    tune_glibc_malloc()
    device = torch.device(device_name)
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(architecture=architecture, size=size, out_channels=5,
                                          patch_size=tuple(patch)))
    objective = mixcl.MixCLObjective(backbone, dict(mixcl.DEFAULTS)).to(device)
    # Default budget: r = 128 voxels for each of 4 classes in P1 and in P2, on enc2's grid.
    grid = (patch[0] // 2) * (patch[1] // 2) * (patch[2] // 2)
    budget = 128 * 4
    labels = torch.arange(budget, device=device) // 128 + 1
    views = torch.rand(batch_size, 3, 1, *patch, device=device)
    batch = {"views": views, "patches": views.clone(),
             "index1": torch.randint(grid, (batch_size, budget), device=device), "label1": labels.repeat(batch_size, 1),
             "index2": torch.randint(grid, (batch_size, budget), device=device), "label2": labels.repeat(batch_size, 1)}
    result = {"method": "mixcl", "architecture": architecture, "size": size, "patch": list(patch), "batch": batch_size,
              "patches_through_encoder_per_step": 3 * batch_size}
    result.update(time_training_steps(objective, batch, steps, device))
    result.update(peak_memory(device))
    return result


def _label_loss_child(n: int, device_name: str, repeats: int) -> dict:
    import torch

    from ContrastiveSegLib.engine.allocator import tune_glibc_malloc
    from ContrastiveSegLib.losses import label_contrastive_loss

    tune_glibc_malloc()
    device = torch.device(device_name)
    generator = torch.Generator(device="cpu").manual_seed(0)
    z1 = torch.randn(n, 64, generator=generator).to(device).requires_grad_()
    z2 = torch.randn(n, 64, generator=generator).to(device).requires_grad_()
    y1 = (torch.arange(n) % 8).to(device)   # 0..7: half background-free classes 1..4 after the mapping below
    y2 = (torch.arange(n) % 8).flip(0).to(device)
    y1, y2 = torch.where(y1 < 4, y1 + 1, 0), torch.where(y2 < 4, y2 + 1, 0)
    before = peak_memory(device)["peak_memory_mib"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = label_contrastive_loss(z1, y1, z2, y2, tau=0.1)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        z1.grad = z2.grad = None
    after = peak_memory(device)
    extra = after["peak_memory_mib"] - (base if device.type == "cuda" else before)
    return {"n_per_side": n, "pairs": n * n, "seconds_forward_backward": round(min(times[1:]), 4),
            "peak_extra_memory_mib": round(extra, 1), "dense_matrix_mib": round(n * n * 4 / 2**20, 1),
            "memory_kind": "CUDA peak allocated above the inputs" if device.type == "cuda"
            else "growth of the process peak resident set during the loss"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--model", default="unet", choices=["unet", "unetr"])
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--patch", default="64,64,32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--label-sizes", default="1024,4096,16384,65536",
                        help="pixels per side of the label-loss runs; an empty string skips them")
    args = parser.parse_args()
    import torch

    patch = [int(v) for v in args.patch.split(",")]
    report = {"device": args.device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    # Supervised uses bench_engine's fixed batch of 2; the MixCL batch is set to match by default.
    supervised = run_child("bench_engine", "_train_step_child", args.model, args.size, patch, args.steps, args.device)
    method = run_child("bench_mixcl", "_mixcl_step_child", args.model, args.size, patch, args.steps, args.device,
                       args.batch_size)
    report["step"] = {"supervised": supervised, "mixcl": method,
                      "mixcl_over_supervised": round(method["seconds_per_step_median"]
                                                     / supervised["seconds_per_step_median"], 2)}
    report["label_loss"] = [run_child("bench_mixcl", "_label_loss_child", int(n), args.device, 2)
                            for n in args.label_sizes.split(",") if n.strip()]
    print(json.dumps(report, indent=2))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
