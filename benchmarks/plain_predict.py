"""The plain reference for ``contrastiveseg predict``'s cost: the same network, no extras.

    python benchmarks/plain_predict.py RUN_FOLDER IMAGE OUT.nii.gz

Reads the image, orients it to RAS and resamples it (linear) to the run's
spacing with SimpleITK, applies the same CT window, runs MONAI's
``sliding_window_inference`` with the same weights, patch, overlap and
Gaussian blending, takes the arg-max on the network's grid, resamples it back
(nearest) and writes it.  ``predict`` does more (input checks, probabilities
resampled before the arg-max, the body mask, named segments); this is the
cost floor ``benchmarks/bench_engine.py`` compares it with.
"""

import sys

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference

from ContrastiveSegLib.config import RunConfig
from ContrastiveSegLib.engine.checkpoint import load_checkpoint
from ContrastiveSegLib.engine.runfolder import RunFolder
from ContrastiveSegLib.models import build_backbone

run, image_path, out_path = sys.argv[1:4]
state = load_checkpoint(RunFolder(run).last_checkpoint, map_location="cpu")
config = RunConfig.from_dict(state["config"])
network = build_backbone(config.model).eval()
network.load_state_dict(state["model"])

image = sitk.ReadImage(image_path, sitk.sitkFloat32)
oriented = sitk.DICOMOrient(image, "RAS")
spacing = [float(s) for s in config.preprocess.spacing]
size = [max(1, round(n * s / t)) for n, s, t in zip(oriented.GetSize(), oriented.GetSpacing(), spacing)]
grid = sitk.Resample(oriented, size, sitk.Transform(), sitk.sitkLinear, oriented.GetOrigin(), spacing,
                     oriented.GetDirection(), -1024.0, sitk.sitkFloat32)
low, high = config.preprocess.window
voxels = np.clip((sitk.GetArrayViewFromImage(grid) - low) / (high - low), 0.0, 1.0)
tensor = torch.from_numpy(np.ascontiguousarray(voxels.transpose(2, 1, 0)))[None, None]  # [1, 1, X, Y, Z]
with torch.no_grad():
    logits = sliding_window_inference(tensor, tuple(config.model.patch_size), 2, network, overlap=0.5,
                                      mode="gaussian")
labels = sitk.GetImageFromArray(logits[0].argmax(0).numpy().astype(np.uint8).transpose(2, 1, 0))
labels.CopyInformation(grid)
sitk.WriteImage(sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0), out_path,
                useCompression=True)
