"""Self-training benchmarks, printed as one JSON object.

    python benchmarks/bench_selftrain.py [--device cpu|cuda] [--steps 5] [--patch 64,64,32] [--size small]

Measured in one run, on the same machine, so the ratios are meaningful:

* ``train_step``: seconds per optimisation step (forward, backward, AdamW) of the light U-Net at the
  demo's patch size, on real patches (crops of the sample CT at 3 mm with its labels of the demo's four
  organs, 16 anchors per organ and patch):

  - ``supervised``: Dice + CE on 2 patches (a ``finetune`` / baseline step at batch size 2);
  - ``joint_one_pair``: the self-training objective on 1 pair, the same 2 patches (segmentation on
    the labelled one, local contrastive loss on both): the cost of the method at equal input;
  - ``joint_two_pairs``: 2 pairs = 4 patches, a round's step at the default batch size 2;
  - ``contrastive_loss_only``: forward + backward of the local contrastive loss alone, on the
    embeddings of 2 pairs (the part the method adds besides the head and the second patch);

* ``pseudo_label``: seconds per volume of a round's pseudo-labelling, the same functions the command
  calls: sliding-window prediction (25 % overlap), the optional agreement check (two more
  predictions), mapping back and writing the labelmap on the scan's own grid; for the sample CT
  (patient A, NIfTI) and the held-out DICOM series (patient B), at the demo's 3 mm and at the default
  1.5 x 1.5 x 2 mm.  Preprocessing, done once per run and not per round, is reported beside it.

The networks are untrained: the time of a step or a prediction does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _median_step_seconds(step, steps: int, device) -> dict:
    import torch

    times = []
    for index in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= 2:  # the first steps include one-off allocations
            times.append(time.perf_counter() - start)
    times.sort()
    return {"seconds_per_step_median": round(times[len(times) // 2], 4), "seconds_per_step_min": round(times[0], 4)}


def _real_pairs(patch, pairs: int):
    """``pairs`` pairs of real labelled patches of the sample CT (3 mm, the demo's organs), as a JointPairs batch."""
    import numpy as np
    import torch

    from ContrastiveSegLib.data.catalog import load_datasets
    from ContrastiveSegLib.data.preprocess import CasePreparer
    from ContrastiveSegLib.data.sampling import PatchSampler
    from ContrastiveSegLib.demo import DEMO_ORGANS, demo_config
    from ContrastiveSegLib.methods.selftrain import padded_anchors

    config = demo_config(quick=True, device="cpu")
    cases = [case for dataset in load_datasets(config.data.datasets) for case in dataset.cases]
    prepared = CasePreparer(config.preprocess, DEMO_ORGANS, pad_to=patch).prepare_all(cases, progress=False)
    sampler = PatchSampler(prepared, patch, foreground_ratio=1.0)
    rng = np.random.default_rng(0)
    images, labels, anchors = [], [], []
    for _ in range(pairs * 2):
        image, label, _ = sampler.sample(rng)
        label_tensor = torch.from_numpy(label)
        images.append(torch.from_numpy(image))
        labels.append(label_tensor)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        anchors.append(padded_anchors(label_tensor[0], 16 * len(DEMO_ORGANS), 16, generator))
    kinds = [(True, True), (True, False)] * pairs
    return {"image": torch.stack(images).reshape(pairs, 2, 1, *patch),
            "label": torch.stack(labels).reshape(pairs, 2, 1, *patch),
            "labeled": torch.tensor(kinds[:pairs]), "anchors": torch.stack(anchors).reshape(pairs, 2, -1)}


def bench_train_steps(patch, size: str, steps: int, device_name: str) -> dict:
    import torch

    from ContrastiveSegLib.config import ModelConfig
    from ContrastiveSegLib.demo import DEMO_ORGANS
    from ContrastiveSegLib.methods.selftrain import SelfTrainingObjective, local_contrastive_loss
    from ContrastiveSegLib.methods.supervised import SupervisedObjective
    from ContrastiveSegLib.models import build_backbone

    device = torch.device(device_name)
    model_config = ModelConfig(architecture="unet", size=size, out_channels=len(DEMO_ORGANS) + 1,
                               patch_size=tuple(patch))
    two_pairs = {k: v.to(device) for k, v in _real_pairs(patch, 2).items()}
    one_pair = {k: v[:1] for k, v in two_pairs.items()}
    one_pair["labeled"] = torch.tensor([[True, False]], device=device)
    supervised_batch = {"image": one_pair["image"][0], "label": one_pair["label"][0]}  # the same 2 patches
    use_amp = device.type == "cuda"
    results = {"architecture": "unet", "size": size, "patch": list(patch), "anchors_per_class": 16,
               "organs": list(DEMO_ORGANS)}

    def make_step(objective, batch):
        objective = objective.to(device)
        optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, _ = objective(batch)
            loss.backward()
            optimizer.step()

        return step

    variants = {}
    torch.manual_seed(0)
    variants["supervised"] = make_step(SupervisedObjective(build_backbone(model_config)), supervised_batch)
    torch.manual_seed(0)
    variants["joint_one_pair"] = make_step(SelfTrainingObjective(build_backbone(model_config)), one_pair)
    torch.manual_seed(0)
    variants["joint_two_pairs"] = make_step(SelfTrainingObjective(build_backbone(model_config)), two_pairs)
    # Interleaved, one step of each variant in turn (rotating the order): a machine whose load drifts
    # during the benchmark slows all variants alike, so their ratios stay meaningful.
    times = {name: [] for name in variants}
    names = list(variants)
    for index in range(steps + 2):
        for name in names[index % len(names):] + names[:index % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            variants[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if index >= 2:  # the first steps include one-off allocations
                times[name].append(time.perf_counter() - start)
    for name, patches in (("supervised", 2), ("joint_one_pair", 2), ("joint_two_pairs", 4)):
        ordered = sorted(times[name])
        results[name] = {"seconds_per_step_median": round(ordered[len(ordered) // 2], 4),
                         "seconds_per_step_min": round(ordered[0], 4), "patches": patches}
    torch.manual_seed(0)
    objective = SelfTrainingObjective(build_backbone(model_config)).to(device)
    with torch.no_grad():
        images = two_pairs["image"].reshape(4, 1, *patch)
        embeddings = objective.head(objective.backbone.decode(objective.backbone.encode(images))).float()
    embeddings = embeddings.reshape(2, 2, -1, *patch).detach().requires_grad_(True)
    labels = two_pairs["label"].reshape(2, 2, *patch)

    def contrastive_step():
        embeddings.grad = None
        local_contrastive_loss(embeddings, labels, two_pairs["anchors"], 0.1, "inter").backward()

    results["contrastive_loss_only"] = dict(_median_step_seconds(contrastive_step, steps, device), pairs=2)
    base = results["supervised"]["seconds_per_step_median"]
    results["joint_one_pair_over_supervised"] = round(results["joint_one_pair"]["seconds_per_step_median"] / base, 2)
    results["joint_two_pairs_over_supervised"] = round(results["joint_two_pairs"]["seconds_per_step_median"] / base, 2)
    return results


def bench_pseudo_labels(patch, size: str, device_name: str) -> list:
    import torch

    from ContrastiveSegLib.config import ModelConfig, PreprocessConfig
    from ContrastiveSegLib.data.catalog import Case
    from ContrastiveSegLib.data.preprocess import CasePreparer
    from ContrastiveSegLib.demo import DEMO_ORGANS, SAMPLE_DIR
    from ContrastiveSegLib.models import build_backbone
    from ContrastiveSegLib.report.colors import colors_for
    from ContrastiveSegLib.selftrain import augmented_agreement, class_probabilities, write_pseudo_label

    device = torch.device(device_name)
    use_amp = device.type == "cuda"
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(architecture="unet", size=size, out_channels=len(DEMO_ORGANS) + 1,
                                          patch_size=tuple(patch))).to(device).eval()
    names = {value: name for value, name in enumerate(DEMO_ORGANS, start=1)}
    colors = colors_for(DEMO_ORGANS)
    scans = {"sample_ct_patient_a_nifti": os.path.join(SAMPLE_DIR, "abdomen_ct.nii.gz"),
             "heldout_patient_b_dicom": os.path.join(SAMPLE_DIR, "heldout", "ct_dicom")}
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for spacing_name, spacing in (("demo_3mm", (3.0, 3.0, 3.0)), ("default_1.5x1.5x2mm", (1.5, 1.5, 2.0))):
            preprocess = PreprocessConfig(spacing=spacing)
            for scan_name, path in scans.items():
                case = Case(f"bench/{scan_name}", path, None, "bench")
                start = time.perf_counter()
                prepared = CasePreparer(preprocess, DEMO_ORGANS, pad_to=patch).prepare(case, with_label=False)
                preprocess_seconds = time.perf_counter() - start
                start = time.perf_counter()
                probabilities = class_probabilities(backbone, prepared.image, patch, 0.25, use_amp)
                probabilities.argmax(0).to(torch.uint8).cpu().numpy()
                predict_seconds = time.perf_counter() - start
                start = time.perf_counter()
                augmented_agreement(backbone, prepared.image, len(DEMO_ORGANS), patch, 0.25, [0, 1, 0], use_amp)
                agreement_seconds = time.perf_counter() - start
                start = time.perf_counter()
                write_pseudo_label(os.path.join(folder, f"{scan_name}.nii.gz"), probabilities, prepared.affine, path,
                                   names, colors)
                write_seconds = time.perf_counter() - start
                results.append({
                    "scan": scan_name, "spacing": spacing_name, "spacing_mm": list(spacing),
                    "network_grid_voxels": list(prepared.image.shape[1:]),
                    "preprocess_seconds_once_per_run": round(preprocess_seconds, 3),
                    "predict_seconds": round(predict_seconds, 3),
                    "map_back_and_write_seconds": round(write_seconds, 3),
                    "agreement_check_seconds": round(agreement_seconds, 3),
                    "seconds_per_volume": round(predict_seconds + write_seconds, 3),
                    "seconds_per_volume_with_agreement_filter": round(predict_seconds + write_seconds
                                                                      + agreement_seconds, 3)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--patch", default="64,64,32", help="patch size (default: the demo's 64,64,32)")
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base"], help="U-Net size (default: small)")
    args = parser.parse_args()
    import torch

    from ContrastiveSegLib.engine.allocator import tune_glibc_malloc

    tune_glibc_malloc()
    patch = [int(v) for v in args.patch.split(",")]
    started = time.perf_counter()
    report = {"device": args.device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
              "train_step": bench_train_steps(patch, args.size, args.steps, args.device),
              "pseudo_label": bench_pseudo_labels(patch, args.size, args.device)}
    report["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report["benchmark_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
