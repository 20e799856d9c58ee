"""Engine benchmarks, printed as one JSON object.

    python benchmarks/bench_engine.py [--device cpu|cuda] [--steps 5] [--patch 64,64,32]

Measured in one run, on the same machine, so ratios are meaningful:

* ``train_step``: seconds per training step (Dice + CE, AdamW, batch 2) and peak memory of UNETR
  (base, the paper's size) and of the light U-Net (small) at the demo patch size, each in its own
  process so peak memory is its own (CPU: peak resident set; CUDA: peak allocated);
* ``data_wait``: the share of a real fine-tuning run's step time spent waiting for the next batch
  (the demo's data: the sample CT, foreground-biased crops plus intensity augmentation);
* ``predict``: seconds to predict the full sample CT (sliding window, 50 % overlap) and to map the
  result back onto its grid.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def peak_memory(device) -> dict:
    """Peak memory of this process so far: CUDA peak allocated, or the CPU process's peak resident set."""
    import torch

    if device.type == "cuda":
        return {"peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "memory_kind": "CUDA peak allocated"}
    return {"peak_memory_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "memory_kind": "process peak resident set (includes Python, torch and MONAI, ~400 MiB)"}


def time_training_steps(objective, batch: dict, steps: int, device, warmup: int = 2) -> dict:
    """Seconds per optimisation step (AdamW; bf16 autocast on CUDA) of ``objective`` on one fixed batch.

    The first ``warmup`` steps (one-off allocations, autotuning) are not timed.
    """
    import torch

    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-4)
    use_amp = device.type == "cuda"
    times = []
    for index in range(steps + warmup):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss, _ = objective(batch)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return {"parameters": sum(p.numel() for p in objective.parameters()),
            "seconds_per_step_median": round(times[len(times) // 2], 4), "seconds_per_step_min": round(times[0], 4)}


def run_child(module: str, function: str, *args) -> dict:
    """``module.function(*args)`` in a fresh Python process (its own peak memory); its JSON result."""
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(HERE)!r}); sys.path.insert(0, {HERE!r}); "
            f"from {module} import {function}; print(json.dumps({function}(*{list(args)!r})))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _train_step_child(architecture: str, size: str, patch, steps: int, device_name: str) -> dict:
    import torch

    from ContrastiveSegLib.config import ModelConfig
    from ContrastiveSegLib.engine.allocator import tune_glibc_malloc
    from ContrastiveSegLib.methods.supervised import SupervisedObjective
    from ContrastiveSegLib.models import build_backbone

    tune_glibc_malloc()
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = SupervisedObjective(build_backbone(ModelConfig(architecture=architecture, size=size, out_channels=5,
                                                           patch_size=tuple(patch)))).to(device)
    batch = {"image": torch.rand(2, 1, *patch, device=device),
             "label": torch.randint(0, 5, (2, 1, *patch), device=device)}
    result = {"architecture": architecture, "size": size, "patch": list(patch), "batch": 2}
    result.update(time_training_steps(model, batch, steps, device))
    result.update(peak_memory(device))
    return result


def bench_train_steps(patch, steps: int, device: str) -> list:
    results = []
    for architecture, size in (("unetr", "base"), ("unet", "small")):
        results.append(run_child("bench_engine", "_train_step_child", architecture, size, list(patch), steps, device))
    return results


def bench_data_wait(steps: int, device: str) -> dict:
    """A real fine-tuning loop on the demo's data; time in ``next(loader)`` vs the whole step."""
    import torch
    from torch.utils.data import DataLoader

    from ContrastiveSegLib.data.catalog import load_datasets
    from ContrastiveSegLib.data.preprocess import CasePreparer
    from ContrastiveSegLib.data.sampling import PatchSampler, StepSampler, SupervisedPatches
    from ContrastiveSegLib.demo import demo_config
    from ContrastiveSegLib.methods.supervised import SupervisedObjective
    from ContrastiveSegLib.models import build_backbone

    config = demo_config(quick=True, device=device)
    config.model.out_channels = len(config.data.labels) + 1
    cases = [c for d in load_datasets(config.data.datasets) for c in d.cases]
    preparer = CasePreparer(config.preprocess, config.data.labels, pad_to=config.model.patch_size)
    start = time.perf_counter()
    prepared = preparer.prepare_all(cases, progress=False)
    preprocess_seconds = time.perf_counter() - start
    sampler = PatchSampler(prepared, config.model.patch_size, config.train.foreground_ratio)
    results = {"preprocess_seconds_first_time": round(preprocess_seconds, 3)}
    start = time.perf_counter()
    preparer.prepare_all(cases, progress=False)
    results["preprocess_seconds_cached"] = round(time.perf_counter() - start, 4)
    for workers in (0, 2):
        torch.manual_seed(0)
        model = SupervisedObjective(build_backbone(config.model)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        dataset = SupervisedPatches(sampler, 0, (steps + 2) * 2)
        loader = DataLoader(dataset, batch_size=2, sampler=StepSampler(0, steps + 2, 2), num_workers=workers)
        wait = total = 0.0
        iterator = iter(loader)
        for index in range(steps + 2):
            step_start = time.perf_counter()
            batch = next(iterator)
            got = time.perf_counter()
            batch = {k: v.to(device) for k, v in batch.items()}
            optimizer.zero_grad()
            loss, _ = model(batch)
            loss.backward()
            optimizer.step()
            if index >= 2:
                wait += got - step_start
                total += time.perf_counter() - step_start
        results[f"workers_{workers}"] = {"data_wait_share": round(wait / total, 4), "seconds_per_step": round(total / steps, 4)}
    return results


def bench_predict(device: str) -> dict:
    import torch

    from ContrastiveSegLib.config import RunConfig
    from ContrastiveSegLib.demo import SAMPLE_DIR, demo_config
    from ContrastiveSegLib.engine.inference import LoadedModel, predict_image
    from ContrastiveSegLib.models import build_backbone

    results = {}
    for patch, spacing, label in (((64, 64, 32), (3.0, 3.0, 3.0), "demo_unet_small_3mm"),
                                  ((96, 96, 96), (1.5, 1.5, 2.0), "unet_small_default_spacing")):
        config: RunConfig = demo_config(quick=True, device=device)
        config.model.patch_size, config.preprocess.spacing = patch, spacing
        config.model.out_channels = 5
        torch.manual_seed(0)
        model = LoadedModel(build_backbone(config.model).to(device).eval(), config,
                            {0: "background", 1: "a", 2: "b", 3: "c", 4: "d"}, "untrained")
        start = time.perf_counter()
        labels, image = predict_image(model, os.path.join(SAMPLE_DIR, "abdomen_ct.nii.gz"), overlap=0.5)
        results[label] = {"seconds": round(time.perf_counter() - start, 3), "input_size": list(image.GetSize()),
                          "patch": list(patch), "spacing_mm": list(spacing)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--patch", default="64,64,32", help="the demo's patch size")
    args = parser.parse_args()
    import torch

    from ContrastiveSegLib.engine.allocator import tune_glibc_malloc

    tune_glibc_malloc()
    patch = [int(v) for v in args.patch.split(",")]
    report = {"device": args.device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "train_step": bench_train_steps(patch, args.steps, args.device)}
    unetr, unet = report["train_step"]
    report["unetr_over_unet_step_time"] = round(unetr["seconds_per_step_median"] / unet["seconds_per_step_median"], 2)
    report["data_wait"] = bench_data_wait(args.steps * 2, args.device)
    report["predict"] = bench_predict(args.device)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
