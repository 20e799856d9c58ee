"""Engine benchmarks, printed as one JSON object.

    python benchmarks/bench_engine.py [--device cpu|cuda] [--steps 5] [--patch 64,64,32]

Measured in one run, on the same machine, so ratios are meaningful:

* ``train_step``: seconds per training step (Dice + CE, AdamW, batch 2) and peak memory of UNETR
  (base, the paper's size) and of the light U-Net (small) at the demo patch size, each in its own
  process so peak memory is its own (CPU: peak resident set; CUDA: peak allocated);
* ``data_wait``: the share of a real fine-tuning run's step time spent waiting for the next batch
  (the demo's data: the sample CT, foreground-biased crops plus intensity augmentation);
* ``predict``: seconds to predict the full sample CT (sliding window, 50 % overlap) and to map the
  result back onto its grid;
* ``full_ct_predict``: ``contrastiveseg predict`` on a full-size CT (512 x 512 x 300, made by
  tiling the held-out patient's 20-slice DICOM series, mirrored every other time) next to the plain
  reference script ``benchmarks/plain_predict.py``, with the demo's network (trained once with the
  demo's quick settings, or ``--model RUN``): wall seconds, CPU seconds and peak resident memory of
  each command as a whole process, run alternately ``--repeats`` times, and the ratios.

    python benchmarks/bench_engine.py --sections full_ct_predict --work /tmp/bench [--model RUN]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
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


def make_full_size_ct(path: str, slices: int = 300) -> dict:
    """A 512 x 512 x ``slices`` CT (int16 HU, NIfTI): the held-out DICOM series tiled along z, every other copy
    mirrored so the anatomy stays continuous.  Real voxels at a clinical grid; the cost of prediction depends on
    the grid, not on what the tiles show."""
    import numpy as np
    import SimpleITK as sitk

    from ContrastiveSegLib.demo import SAMPLE_DIR

    folder = os.path.join(SAMPLE_DIR, "heldout", "ct_dicom")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
    series = reader.Execute()
    hu = sitk.GetArrayFromImage(series).astype(np.int16)
    copies = -(-slices // hu.shape[0])
    volume = np.concatenate([hu if k % 2 == 0 else hu[::-1] for k in range(copies)])[:slices]
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(series.GetSpacing())
    image.SetOrigin(series.GetOrigin())
    image.SetDirection(series.GetDirection())
    if not os.path.exists(path):
        sitk.WriteImage(image, path, useCompression=True)
    return {"size": list(image.GetSize()), "spacing_mm": [round(s, 4) for s in image.GetSpacing()],
            "source": "sample_data/heldout/ct_dicom tiled along z"}


def demo_network(folder: str, steps: int) -> str:
    """The demo's network (``demo --quick`` settings, ``steps`` steps on the sample CT), trained once into ``folder``."""
    from ContrastiveSegLib.demo import demo_config
    from ContrastiveSegLib.finetune import run_finetune

    if not os.path.exists(os.path.join(folder, "checkpoints", "last.pt")):
        config = demo_config(quick=True, device="cpu", max_steps=steps)
        config.train.val_every = 0
        run_finetune(config, folder, progress=False)
    return folder


def measure_process(command: list) -> dict:
    """Wall seconds, CPU seconds (user + system) and peak resident memory of one command, as its own process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stderr = process.stderr.read().decode("utf-8", "replace")
    process.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-2000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def bench_full_ct_predict(work: str, model: str, repeats: int, train_steps: int) -> dict:
    import numpy as np
    import SimpleITK as sitk

    os.makedirs(work, exist_ok=True)
    image = os.path.join(work, "full_ct.nii.gz")
    report = {"input": make_full_size_ct(image)}
    run = model or demo_network(os.path.join(work, "demo_network"), train_steps)
    report["network"] = {"run": run, "trained_steps_if_made_here": None if model else train_steps}
    outputs = {"plain": os.path.join(work, "plain.nii.gz"), "predict": os.path.join(work, "predict.nii.gz")}
    commands = {"plain": [sys.executable, os.path.join(HERE, "plain_predict.py"), run, image, outputs["plain"]],
                "predict": [sys.executable, "-m", "ContrastiveSegLib", "predict", "--model", run, "--image", image,
                            "--out", outputs["predict"], "--checkpoint", "last", "--device", "cpu"]}
    runs = {"plain": [], "predict": []}
    for _ in range(repeats):
        for name in ("plain", "predict"):   # alternately, so both see the same machine
            runs[name].append(measure_process(commands[name]))
    for name, measured in runs.items():
        best = min(measured, key=lambda m: m["wall_s"])
        report[name] = {"runs": measured, "best_wall_s": best["wall_s"],
                        "best_cpu_s": min(m["cpu_s"] for m in measured),
                        "peak_rss_mib": max(m["peak_rss_mib"] for m in measured)}
    report["predict_over_plain"] = {
        "wall_time": round(report["predict"]["best_wall_s"] / report["plain"]["best_wall_s"], 3),
        "cpu_time": round(report["predict"]["best_cpu_s"] / report["plain"]["best_cpu_s"], 3),
        "peak_memory": round(report["predict"]["peak_rss_mib"] / report["plain"]["peak_rss_mib"], 3)}
    plain = sitk.GetArrayFromImage(sitk.ReadImage(outputs["plain"]))
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(outputs["predict"]))
    report["same_label_share"] = round(float(np.mean(plain == predicted)), 4)
    report["note"] = ("predict also checks the input, interpolates probabilities before the arg-max and masks "
                      "outside the body; ratios are of runs made alternately in this one invocation")
    return report


SECTIONS = ("train_step", "data_wait", "predict", "full_ct_predict")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--patch", default="64,64,32", help="the demo's patch size")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    parser.add_argument("--work", default=None, help="folder for the full-size CT and the demo network (kept for "
                                                      "reuse; default: a new temporary folder)")
    parser.add_argument("--model", default=None, help="full_ct_predict: a finetune run to use instead of training one")
    parser.add_argument("--train-steps", type=int, default=40, help="full_ct_predict: steps of the network trained "
                                                                     "here (default: 40, as demo --quick)")
    parser.add_argument("--repeats", type=int, default=2, help="full_ct_predict: runs of each command")
    args = parser.parse_args()
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    import torch

    from ContrastiveSegLib.engine.allocator import tune_glibc_malloc

    tune_glibc_malloc()
    patch = [int(v) for v in args.patch.split(",")]
    report = {"device": args.device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if "train_step" in sections:
        report["train_step"] = bench_train_steps(patch, args.steps, args.device)
        unetr, unet = report["train_step"]
        report["unetr_over_unet_step_time"] = round(unetr["seconds_per_step_median"]
                                                    / unet["seconds_per_step_median"], 2)
    if "data_wait" in sections:
        report["data_wait"] = bench_data_wait(args.steps * 2, args.device)
    if "predict" in sections:
        report["predict"] = bench_predict(args.device)
    if "full_ct_predict" in sections:
        work = args.work or tempfile.mkdtemp(prefix="contrastiveseg-bench-")
        report["full_ct_predict"] = bench_full_ct_predict(work, args.model, args.repeats, args.train_steps)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
