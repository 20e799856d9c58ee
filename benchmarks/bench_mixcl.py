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
  (The synthetic step batch has no view pairs, so the identity loss compares every cell with itself.)

    python benchmarks/bench_mixcl.py --balance DATA --work WORK [--patch 64,64,32] [--batch-size 2]

instead writes the leak-free pre-training sources (``LEAK_FREE_SOURCES``: LIDC 0001-0003 and two crops
of patient C, read from ``DATA``) as datasets under ``WORK`` and reports, for the paper's reading of MixCL
and for the defaults, on the U-Net small at seed 0: the encoder-gradient norm of each weighted term
(identity, alpha x label, beta x reconstruction, and the variance floor where it is on) at
initialisation, over the first ``--batches`` batches of real samples, and the share of
``--share-batches`` batches whose label loss has a gradient (a positive and a negative pair exist).
Deterministic; see docs/pretraining.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

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


# --- leak-free pre-training sources (docs/pretraining.md) -------------------------------------------------
# Paths are relative to the data folder given on the command line; none of these scans is patient A (the sample
# CT the demo fine-tunes on) or patient B (the held-out series it is scored on), nor a slab of them.
LEAK_FREE_SOURCES = {
    "lidc": {"patients": "LIDC-IDRI-0001, 0002 and 0003 (three patients)",
             "cases": [(f"lidc/lidc_000{n}.nii.gz", {f"lidc/lidc_000{n}_lungs.nii.gz": {1: 1}}) for n in (1, 2, 3)],
             "labels": {1: "lungs"}},
    "aorta": {"patients": "patient C (aorta crop)",
              "cases": [("totalsegmentator/aorta_ct_cropped.nii.gz", {"totalsegmentator/aorta_seg.nii.gz": {1: 1}})],
              "labels": {1: "aorta"}},
    "pulmonary": {"patients": "patient C again (pulmonary crop of the same chest CT: not a new patient)",
                  "cases": [("totalsegmentator/pulmonary_report/ct_cropped.nii.gz",
                             {"totalsegmentator/pulmonary_report/heart.nii.gz": {1: 2},
                              "totalsegmentator/pulmonary_report/pulmonary_artery.nii.gz": {1: 1}})],
                  "labels": {1: "pulmonary_artery", 2: "heart"}},
}


def leak_free_sources(data_root: str, out: str) -> list:
    """Write the leak-free sources as datasets under ``out`` (reused when present); returns their folders.

    Each label file is resampled onto its CT's grid (nearest neighbour); where two masks overlap the
    later one in the table wins (the pulmonary artery over the heart).
    """
    import SimpleITK as sitk

    folders = []
    for name, source in LEAK_FREE_SOURCES.items():
        folder = os.path.join(out, name)
        folders.append(folder)
        if os.path.exists(os.path.join(folder, "dataset.json")):
            continue
        os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
        training = []
        for image_path, masks in source["cases"]:
            image = sitk.ReadImage(os.path.join(data_root, image_path))
            label = None
            for mask_path, mapping in masks.items():
                mask = sitk.Resample(sitk.ReadImage(os.path.join(data_root, mask_path)), image, sitk.Transform(),
                                     sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
                array = sitk.GetArrayFromImage(mask)
                label = np.zeros(array.shape, dtype=np.uint8) if label is None else label
                for old, new in mapping.items():
                    label[array == old] = new
            case = os.path.basename(image_path).replace(".nii.gz", "")
            written = sitk.GetImageFromArray(label)
            written.CopyInformation(image)
            sitk.WriteImage(written, os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
            training.append({"image": os.path.abspath(os.path.join(data_root, image_path)),
                             "label": f"./labelsTr/{case}.nii.gz"})
        labels = {"0": "background", **{str(k): v for k, v in source["labels"].items()}}
        with open(os.path.join(folder, "dataset.json"), "w", encoding="utf-8") as handle:
            json.dump({"name": name, "description": source["patients"], "labels": labels, "training": training},
                      handle, indent=1)
    return folders


def prepared_sources(folders: list, patch, spacing):
    """The sources preprocessed as ``pretrain`` does (CT window, ``spacing`` mm, padded to ``patch``)."""
    from ContrastiveSegLib.config import RunConfig
    from ContrastiveSegLib.data.catalog import load_datasets
    from ContrastiveSegLib.data.preprocess import CasePreparer
    from ContrastiveSegLib.data.sources import prepare_sources, vocabulary

    config = RunConfig()
    config.preprocess.spacing = tuple(spacing)
    datasets = load_datasets(folders)
    preparer = CasePreparer(config.preprocess, vocabulary(datasets), pad_to=tuple(patch))
    return prepare_sources(datasets, preparer, progress=False)


def label_pairs_have_gradient(batch: dict, background_negatives: bool) -> bool:
    """Whether the label loss of a collated batch is non-zero: a positive pair and a negative pair exist."""
    y1, y2 = batch["label1"], batch["label2"]
    d = batch["dataset"]
    positive = negative = False
    for a in range(y1.shape[0]):
        set1 = {int(v) for v in y1[a] if v > 0}
        for b in range(y2.shape[0]):
            set2 = {int(v) for v in y2[b] if v > 0}
            positive |= bool(set1 & set2)
            negative |= len(set1 | set2) >= 2 and bool(set1) and bool(set2)
            if background_negatives and d[a] == d[b]:
                negative |= bool(set1) and bool((y2[b] == 0).any())
                negative |= bool(set2) and bool((y1[a] == 0).any())
    return positive and negative


def _balance_child(data_root: str, work: str, patch, spacing, batch_size: int, batches: int, share_batches: int,
                   variant: str, overrides: dict) -> dict:
    """Encoder-gradient norms of the weighted terms at initialisation (the variance floor too, when on),
    and the label-gradient share."""
    import torch
    from torch.utils.data import default_collate

    from ContrastiveSegLib.config import ModelConfig
    from ContrastiveSegLib.methods import mixcl
    from ContrastiveSegLib.methods.term_gradients import encoder_gradient_norms
    from ContrastiveSegLib.models import build_backbone

    torch.set_num_threads(1)
    sources = prepared_sources(leak_free_sources(data_root, work), patch, spacing)
    settings = dict(mixcl.DEFAULTS, **(mixcl_paper_settings() if variant == "paper" else {}), **overrides)
    samples = mixcl.MixCLSamples(sources, patch, settings, seed=0, length=batch_size * max(batches, share_batches))
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(architecture="unet", size="small", out_channels=len(sources.class_names) + 1,
                                          patch_size=tuple(patch)))
    objective = mixcl.MixCLObjective(backbone, settings)
    norms = []
    active = 0
    for step in range(max(batches, share_batches)):
        batch = default_collate([samples[step * batch_size + j] for j in range(batch_size)])
        active += label_pairs_have_gradient(batch, bool(settings["background_negatives"]))
        if step >= batches:
            continue
        weighted, _ = objective.terms(batch)
        norms.append(encoder_gradient_norms(weighted, objective.encoder_parameters()))
    names = list(norms[0])
    mean = {name: float(np.mean([n[name] for n in norms])) for name in names}
    return {"variant": variant, "settings": {k: settings[k] for k in ("alpha", "beta", "lambd", "identity_reduction",
                                                                     "view_geometry", "background_negatives")},
            "step0_norms": norms[0], "mean_norms": mean, "batches": batches,
            "step0_largest_over_smallest": max(norms[0].values()) / max(min(norms[0].values()), 1e-30),
            "mean_largest_over_smallest": max(mean.values()) / max(min(mean.values()), 1e-30),
            "label_gradient_share": active / max(batches, share_batches), "share_batches": max(batches, share_batches),
            "sources": sources.dataset_names}


def mixcl_paper_settings() -> dict:
    """The paper's reading (the method's defaults before docs/pretraining.md's changes)."""
    return {"alpha": 0.01, "beta": 0.01, "lambd": 0.0051, "identity_reduction": "sum", "skip_thin_levels": False,
            "background_negatives": False, "view_geometry": "shared", "pair_attempts": 1, "position_weight": 0.0}


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
    parser.add_argument("--balance", metavar="DATA", default=None,
                        help="instead: the terms' encoder-gradient norms at initialisation and the share of batches "
                             "with a label gradient, paper settings vs defaults, on the leak-free sources in DATA")
    parser.add_argument("--work", default="mixcl_balance", help="--balance: folder for the source datasets")
    parser.add_argument("--spacing", default="3,3,3", help="--balance: preprocessing spacing in mm")
    parser.add_argument("--batches", type=int, default=4, help="--balance: batches whose gradients are measured")
    parser.add_argument("--share-batches", type=int, default=50, help="--balance: batches for the label share")
    args = parser.parse_args()
    import torch

    if args.balance:
        patch = [int(v) for v in args.patch.split(",")]
        spacing = [float(v) for v in args.spacing.split(",")]
        report = {"model": "unet small", "patch": patch, "batch": args.batch_size, "spacing": spacing,
                  "note": "deterministic (seed 0); gradient norms of the weighted terms w.r.t. the encoder"}
        report["variants"] = [run_child("bench_mixcl", "_balance_child", args.balance, args.work, patch, spacing,
                                        args.batch_size, args.batches, args.share_batches, variant, {})
                              for variant in ("paper", "default")]
        print(json.dumps(report, indent=2))
        return

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
