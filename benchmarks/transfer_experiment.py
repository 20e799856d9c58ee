"""Does pre-training help a one-scan fine-tune?  Pre-train vs scratch on real CT, printed as JSON.

    python benchmarks/transfer_experiment.py --method mixcl --totalseg DIR --out EXPERIMENT [--seeds 0,1]

``DIR`` is a folder with the TotalSegmentator test files (``example_ct.nii.gz``,
``example_seg_fast_force_split.nii.gz``, ``aorta_ct_cropped.nii.gz``, ``aorta_seg.nii.gz``,
``pulmonary_report/ct_cropped.nii.gz``, ``pulmonary_report/pulmonary_artery.nii.gz``,
``labels_total.json``; Apache-2.0).  The protocol:

1. Pre-training sources with **different label sets**, none of them patient B:
   ``abdomen_pelvis`` (kidneys, pancreas, urinary bladder, sacrum, hips, femurs: organs that are not
   fine-tuning targets), ``aorta`` (aorta only) and ``pulmonary`` (pulmonary artery only).
2. ``pretrain --method METHOD`` on the three sources.
3. For each seed: ``finetune`` on the shipped sample CT (patient A, the demo's single labelled scan)
   for liver, spleen, stomach and aorta, once from scratch and once with ``--init`` from step 2,
   with identical settings and steps.
4. Score both on patient B (the shipped held-out scan, never trained on): one validation at the
   very end of training (``--val-every 0``), on the 3 mm training grid, so no checkpoint is
   chosen by its score on patient B.

The labels of every scan are TotalSegmentator predictions, not manual ground truth, and one
training scan is a tiny experiment: the output is a measurement of this setting, not a claim.
Finished runs are reused (scratch runs are shared between methods), so the script can be re-run
with another ``--method`` into the same ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SAMPLE = os.path.join(REPO, "ContrastiveSegLib", "sample_data")
TARGETS = "liver,spleen,stomach,aorta"
PRETRAIN_ORGANS = ["kidney_right", "kidney_left", "pancreas", "urinary_bladder", "sacrum", "hip_left", "hip_right",
                   "femur_left", "femur_right"]
NETWORK = ["--model", "unet", "--model-size", "small", "--patch", "64,64,32", "--spacing", "3,3,3",
           "--batch-size", "2", "--num-workers", "0"]


def _write_source(folder: str, image: str, label: str, names: dict) -> str:
    """A one-case dataset whose label file keeps only ``names`` ({value in the file: organ}), renumbered 1..K."""
    import SimpleITK as sitk

    os.makedirs(folder, exist_ok=True)
    source = sitk.ReadImage(label)
    array = sitk.GetArrayFromImage(source)
    kept = np.zeros(array.shape, dtype=np.uint8)
    labels = {"0": "background"}
    for new, (old, name) in enumerate(sorted(names.items()), start=1):
        kept[array == old] = new
        labels[str(new)] = name
    out = sitk.GetImageFromArray(kept)
    out.CopyInformation(source)
    sitk.WriteImage(out, os.path.join(folder, "label.nii.gz"))
    with open(os.path.join(folder, "dataset.json"), "w", encoding="utf-8") as handle:
        json.dump({"name": os.path.basename(folder), "labels": labels,
                   "training": [{"image": os.path.abspath(image), "label": "./label.nii.gz"}]}, handle, indent=1)
    return folder


def pretraining_sources(totalseg: str, out: str) -> list:
    with open(os.path.join(totalseg, "labels_total.json"), encoding="utf-8") as handle:
        by_name = {name: int(value) for value, name in json.load(handle).items()}
    return [
        _write_source(os.path.join(out, "abdomen_pelvis"), os.path.join(totalseg, "example_ct.nii.gz"),
                      os.path.join(totalseg, "example_seg_fast_force_split.nii.gz"),
                      {by_name[name]: name for name in PRETRAIN_ORGANS}),
        _write_source(os.path.join(out, "aorta"), os.path.join(totalseg, "aorta_ct_cropped.nii.gz"),
                      os.path.join(totalseg, "aorta_seg.nii.gz"), {1: "aorta"}),
        _write_source(os.path.join(out, "pulmonary"), os.path.join(totalseg, "pulmonary_report", "ct_cropped.nii.gz"),
                      os.path.join(totalseg, "pulmonary_report", "pulmonary_artery.nii.gz"), {1: "pulmonary_artery"}),
    ]


def _finished(run: str) -> bool:
    path = os.path.join(run, "events.jsonl")
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as handle:
        return any('"event":"finished"' in line and '"stopped":false' in line for line in handle)


def _engine(arguments: list, log: list) -> None:
    command = [sys.executable, "-m", "ContrastiveSegLib"] + [str(a) for a in arguments]
    log.append("python -m ContrastiveSegLib " + " ".join(str(a) for a in arguments))
    environment = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")


def _final_validation(run: str) -> dict:
    with open(os.path.join(run, "events.jsonl"), encoding="utf-8") as handle:
        events = [json.loads(line) for line in handle if '"event":"validation"' in line]
    last = events[-1]
    return {"mean_dice": round(last["mean_dice"], 4), "dice": {k: round(v, 4) for k, v in last["dice"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["mixcl", "gcl"], required=True)
    parser.add_argument("--totalseg", required=True, help="folder with the TotalSegmentator test files")
    parser.add_argument("--out", required=True, help="experiment folder (runs are reused when finished)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--pretrain-lr", default="1e-3")
    parser.add_argument("--pretrain-batch-size", default=None,
                        help="default: 1 for mixcl (the paper's batch per GPU), 2 for gcl (contrast needs a batch)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    started = time.time()
    commands: list = []
    sources = pretraining_sources(args.totalseg, os.path.join(args.out, "data"))
    pretrain_run = os.path.join(args.out, f"pretrain_{args.method}")
    if not _finished(pretrain_run):
        arguments = ["pretrain", "--method", args.method, "--out", pretrain_run, "--max-steps", args.pretrain_steps,
                     "--lr", args.pretrain_lr, "--warmup-steps", "10", "--seed", "0", "--device", args.device]
        for source in sources:
            arguments += ["--data", source]
        batch = args.pretrain_batch_size or ("1" if args.method == "mixcl" else "2")
        _engine(arguments + NETWORK + ["--batch-size", batch], commands)
    checkpoint = os.path.join(pretrain_run, "checkpoints", "last.pt")

    results = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for start, init in (("scratch", []), (args.method, ["--init", checkpoint])):
            run = os.path.join(args.out, f"finetune_{start}_seed{seed}")
            if not _finished(run):
                _engine(["finetune", "--data", os.path.join(SAMPLE, "dataset.json"), "--labels", TARGETS,
                         "--val-data", os.path.join(SAMPLE, "heldout", "dataset.json"), "--out", run,
                         "--max-steps", args.finetune_steps, "--lr", "3e-3", "--warmup-steps", "20",
                         "--val-every", "0", "--seed", seed, "--device", args.device] + NETWORK + init, commands)
            results.setdefault(f"seed{seed}", {})[start] = _final_validation(run)
    means = {start: round(float(np.mean([r[start]["mean_dice"] for r in results.values()])), 4)
             for start in ("scratch", args.method)}
    print(json.dumps({"method": args.method, "pretrain_steps": args.pretrain_steps,
                      "finetune_steps": args.finetune_steps, "targets": TARGETS,
                      "heldout_dice_at_end_of_training": results, "mean_over_seeds": means,
                      "commands_run_now": commands, "seconds": round(time.time() - started, 1)}, indent=2))


if __name__ == "__main__":
    main()
