"""GCL benchmark, printed as one JSON object.

    python benchmarks/bench_gcl.py [--device cpu|cuda] [--model unet|unetr] [--size small] [--patch 64,64,32]
                                   [--steps 3] [--warmup 1] [--batch-size 2]

Seconds per optimisation step (AdamW; bf16 autocast on CUDA; a fixed synthetic batch) and peak
memory of, side by side on the same backbone, patch and batch of B patches:

* ``supervised``: plain supervised training (Dice + CE; B patches through encoder and decoder);
* ``gcl_off``: GCL without the Gradient Mitigator (plain sum of the K meta-label objectives);
* ``gcl_feature``: GCL with the default ``feature`` mitigator (K gradients through the heads only,
  per-sample PCGrad on the heads' inputs, one backward through the encoder);
* ``gcl_param``: GCL with the exact ``param`` mitigator (K gradients through the encoder, PCGrad on
  the flat encoder gradient, then the trainer's backward).

A GCL step encodes 2B patches (two views each) and has K = 3 meta labels (dataset, case,
position) and the default settings (64 pixels per patch, image head 512 -> 128).  Each
configuration runs in its own process so each peak is its own (CUDA: peak allocated; CPU: the
process's peak resident set, which includes Python, torch and MONAI).  ``*_over_supervised``
are ratios of the median step times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_engine import peak_memory, run_child, time_training_steps  # noqa: E402

META_LABELS = ["dataset", "case", "position"]


def _step_child(kind: str, architecture: str, size: str, patch, steps: int, warmup: int, device_name: str,
                batch_size: int, threads: int = 0) -> dict:
    import torch

    from ContrastiveSegLib.config import ModelConfig
    from ContrastiveSegLib.engine.allocator import tune_glibc_malloc
    from ContrastiveSegLib.methods import gcl
    from ContrastiveSegLib.methods.supervised import SupervisedObjective
    from ContrastiveSegLib.models import build_backbone

    tune_glibc_malloc()
    if threads > 0:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(architecture=architecture, size=size, out_channels=5,
                                          patch_size=tuple(patch)))
    result = {"kind": kind, "architecture": architecture, "size": size, "patch": list(patch), "batch": batch_size}
    if kind == "supervised":
        objective = SupervisedObjective(backbone).to(device)
        batch = {"image": torch.rand(batch_size, 1, *patch, device=device),
                 "label": torch.randint(0, 5, (batch_size, 1, *patch), device=device)}
        result["patches_through_encoder_per_step"] = batch_size
    else:
        settings = dict(gcl.DEFAULTS, mitigator=kind.split("_", 1)[1])
        objective = gcl.GCLObjective(backbone, settings, META_LABELS).to(device)
        grid = 1
        for p in patch:
            grid *= max(p // gcl.level_factor(settings["pixel_level"]), 1)
        # Every patch of one dataset, pairs of cases, alternating positions: each meta label has positives.
        meta = torch.stack([torch.zeros(batch_size, dtype=torch.long), torch.arange(batch_size) // 2,
                            torch.arange(batch_size) % 2], dim=1)
        view1 = torch.rand(batch_size, 1, *patch, device=device)
        batch = {"view1": view1, "view2": view1 + 0.05 * torch.randn_like(view1), "meta": meta.to(device),
                 "pixels": torch.randint(grid, (batch_size, settings["pixels_per_patch"]), device=device),
                 "index": torch.arange(batch_size, device=device)}
        result["patches_through_encoder_per_step"] = 2 * batch_size
        result["meta_labels"] = len(META_LABELS)
    result.update(time_training_steps(objective, batch, steps, device, warmup=warmup))
    result.update(peak_memory(device))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--model", default="unet", choices=["unet", "unetr"])
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--patch", default="64,64,32")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per process (default: torch's choice)")
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    patch = [int(v) for v in args.patch.split(",")]
    threads = args.threads if args.threads > 0 else torch.get_num_threads()
    report = {"device": device, "torch_threads": threads, "cpu_count": os.cpu_count(),
              "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
              "model": args.model, "size": args.size, "patch": patch, "batch": args.batch_size,
              "steps": args.steps, "warmup": args.warmup}
    results = {}
    for kind in ("supervised", "gcl_off", "gcl_feature", "gcl_param"):
        results[kind] = run_child("bench_gcl", "_step_child", kind, args.model, args.size, patch, args.steps,
                                  args.warmup, device, args.batch_size, args.threads)
    report["step"] = results
    base = results["supervised"]["seconds_per_step_median"]
    report["ratios"] = {f"{kind}_over_supervised": round(results[kind]["seconds_per_step_median"] / base, 2)
                        for kind in ("gcl_off", "gcl_feature", "gcl_param")}
    report["ratios"]["param_over_feature"] = round(results["gcl_param"]["seconds_per_step_median"]
                                                   / results["gcl_feature"]["seconds_per_step_median"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
