"""Stage 2 of each round: pseudo-label every unlabelled scan with the best model so far.

The labels the joint training uses live on the network grid (the preprocessed
scan); a copy on each scan's own grid is written to ``RUN/pseudo_labels/`` to
look at.  Optionally a scan is kept only if predictions on two augmented copies
agree.  For CT models (intensity window in HU) organs predicted outside the
patient's body are set to background, as ``predict`` does.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.io import read_image
from ..data.preprocess import PreparedCase
from ..engine.runfolder import write_json_atomic
from ..models import build_backbone
from .stages import Stage

if TYPE_CHECKING:
    import SimpleITK as sitk


def class_probabilities(backbone: torch.nn.Module, image: np.ndarray, patch_size: Sequence[int],
                        overlap: float = 0.25, use_amp: bool = False, fill: float = 0.0) -> torch.Tensor:
    """Softmax ``[C, X, Y, Z]`` of a preprocessed volume ``[1, X, Y, Z]`` (sliding window, as validation does).

    ``fill``: the value beyond the volume's edge (``PreparedCase.fill``).
    """
    from ..engine.inference import sliding_window_probabilities

    return sliding_window_probabilities(backbone, torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                                        patch_size, overlap=overlap, use_amp=use_amp, fill=fill)


def augmented_agreement(backbone: torch.nn.Module, image: np.ndarray, num_classes: int, patch_size: Sequence[int],
                        overlap: float, seed_key: Sequence[int], use_amp: bool = False) -> Optional[float]:
    """Mean organ Dice between the arg-max predictions on two intensity-augmented copies of a volume.

    The copies are the volume (``[1, X, Y, Z]``, intensities in [0, 1]) scaled by 1.1 / 0.9 and
    shifted by +0.05 / -0.05, each plus Gaussian noise (sd 0.02) drawn from
    ``default_rng([*seed_key, copy])``.  No flips: left and right organs are different classes,
    and a network trained without flips calls a mirrored left kidney the right one.  Organs
    neither copy shows are left out of the mean; None when neither shows any organ.
    """
    from ..engine.metrics import dice_per_label, mean_dice

    predictions = []
    for copy, (scale, shift) in enumerate(((1.1, 0.05), (0.9, -0.05))):
        rng = np.random.default_rng([*[int(k) for k in seed_key], copy])
        noisy = image * scale + shift + rng.normal(0.0, 0.02, image.shape)
        predictions.append(class_probabilities(backbone, noisy, patch_size, overlap, use_amp).argmax(0).cpu().numpy())
    names = {value: f"class_{value}" for value in range(1, num_classes + 1)}
    return mean_dice(dice_per_label(predictions[0], predictions[1], names))


def write_pseudo_label(path: str, probabilities: torch.Tensor, affine: np.ndarray, image_path: str,
                       names: Dict[int, str], colors: Dict[str, Sequence[int]], mask_body: bool = False
                       ) -> Dict[str, int]:
    """Write the arg-max of ``probabilities`` (network grid ``affine``) on the scan's own grid; voxels per organ.

    ``mask_body``: organs outside the patient's body become background (CT in HU only), as in ``predict``.
    """
    from ..data.io import read_image, write_labelmap
    from ..engine.body import mask_outside_body
    from ..engine.inference import probabilities_to_input_grid
    from ..engine.postprocess import value_counts

    reference = read_image(image_path, as_float32=False)
    labels = probabilities_to_input_grid(probabilities.float().cpu().numpy(), affine, reference)
    if mask_body:
        labels = mask_outside_body(labels, reference)
    write_labelmap(path, labels, reference, names=names, colors=colors)
    counts = value_counts(labels, max(max(names, default=0), int(labels.max(initial=0))))
    return {name: int(counts[value]) for value, name in sorted(names.items())}


def body_mask_on_grid(image: "sitk.Image", affine: np.ndarray, shape_xyz: Sequence[int]) -> np.ndarray:
    """The body of CT ``image`` (in HU; see engine/body.py) on a network grid: bool ``[X, Y, Z]``.

    ``affine`` and ``shape_xyz`` describe the grid (a PreparedCase's RAS affine and ``image.shape[1:]``).
    The mask is resampled nearest-neighbour in physical space; voxels the scan does not cover
    (padding) are outside the body.
    """
    import SimpleITK as sitk

    from ..data.preprocess import reference_from_affine, to_monai_array
    from ..engine.body import body_mask

    mask = sitk.GetImageFromArray(body_mask(image).astype(np.uint8))
    mask.CopyInformation(image)
    grid = reference_from_affine(affine, shape_xyz)
    on_grid = sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return to_monai_array(sitk.GetArrayFromImage(on_grid))[0].astype(bool)


class PseudoLabelStage:
    """The pseudo-labelling step of a round, as methods of the run (``_SelfTraining``)."""

    # --- pseudo-labels ----------------------------------------------------------------------------------
    def _pseudo_labels(self, stage: Stage) -> Optional[Tuple[List[PreparedCase], Dict]]:
        """The kept unlabelled cases with their pseudo-labels (network grid) and the round's summary.

        None when a STOP file interrupted the labelling.
        """
        cache = os.path.join(self._stage_folder(stage).root, "pseudo_labels.npz")
        case_ids = [case.case_id for case in self.unlabeled_cases]
        summary_path = os.path.join(self.run.root, "pseudo_labels", f"round_{stage.round}", "summary.json")
        if os.path.exists(cache) and os.path.exists(summary_path):
            with np.load(cache) as stored:
                if [str(c) for c in stored["case_ids"]] == case_ids:
                    kept = [PreparedCase(prepared.case_id, prepared.image, stored[f"label_{index}"][None],
                                         prepared.affine)
                            for index, prepared in enumerate(self.prepared_unlabeled) if bool(stored["kept"][index])]
                    summary = self.run.read_json(summary_path)
                    short = {key: value for key, value in summary.items() if key != "cases"}
                    self.state["results"][stage.name] = {"pseudo_labels": short}
                    return kept, short
        return self._predict_pseudo_labels(stage, cache)

    def _predict_pseudo_labels(self, stage: Stage, cache: str) -> Optional[Tuple[List[PreparedCase], Dict]]:
        from tqdm.auto import tqdm

        from ..report.colors import colors_for

        config, settings, is_main = self.config, self.settings, self.context.is_main
        use_amp = bool(config.train.amp) and self.context.device.type == "cuda"
        threshold = settings["agreement_threshold"]
        # Organs outside the body are the baseline's most obvious mistakes; training on them would teach them.
        mask_body = config.preprocess.intensity == "ct_window"
        backbone = build_backbone(config.model)
        backbone.load_state_dict(self._best_so_far())
        backbone = backbone.to(self.context.device).eval()
        folder = os.path.join(self.run.root, "pseudo_labels", f"round_{stage.round}")
        names = {int(value): name for value, name in self.labels.items() if value != "0"}
        colors = colors_for(self.targets)
        if is_main:
            if os.path.isdir(folder):
                shutil.rmtree(folder)  # a half-written round from an interrupted run
            os.makedirs(folder)
            write_json_atomic(os.path.join(folder, "labels.json"), self.labels)
            write_json_atomic(os.path.join(folder, "colors.json"), {k: list(v) for k, v in colors.items()})
        self.events.message(f"round {stage.round}: pseudo-labelling {len(self.unlabeled_cases)} scan(s) with the "
                            f"model of stage {self.best_stage or 'baseline'}")
        entries, kept, grids = [], [], {}
        totals = {name: 0 for name in self.targets}
        bar = tqdm(total=len(self.unlabeled_cases), desc=f"pseudo-labels round {stage.round}", unit="scan",
                   disable=not (self.progress and is_main) or self.events.to_stdout, leave=False)
        for index, (case, prepared) in enumerate(zip(self.unlabeled_cases, self.prepared_unlabeled)):
            if self._stop_requested():
                bar.close()
                return None
            probabilities = class_probabilities(backbone, prepared.image, config.model.patch_size,
                                                config.train.sw_overlap, use_amp, fill=prepared.fill)
            grid_labels = probabilities.argmax(0).to(torch.uint8).cpu().numpy()
            if mask_body:
                grid_labels[~body_mask_on_grid(read_image(case.image), prepared.affine, grid_labels.shape)] = 0
            agreement = None
            if threshold is not None:
                agreement = augmented_agreement(backbone, prepared.image, len(self.targets), config.model.patch_size,
                                                config.train.sw_overlap, [config.train.seed, stage.round, index],
                                                use_amp)
            keep = threshold is None or (agreement is not None and agreement > threshold)
            entry = {"case": case.case_id, "image": case.image, "agreement": agreement, "kept": keep}
            if is_main:
                filename = f"{self.pseudo_names[index]}.{settings['pseudo_label_format']}"
                entry["file"] = filename
                entry["voxels"] = write_pseudo_label(os.path.join(folder, filename), probabilities, prepared.affine,
                                                     case.image, names, colors, mask_body=mask_body)
                if keep:
                    for name, count in entry["voxels"].items():
                        totals[name] += count
            entries.append(entry)
            grids[f"label_{index}"] = grid_labels
            if keep:
                kept.append(PreparedCase(prepared.case_id, prepared.image, grid_labels[None], prepared.affine))
            bar.update(1)
        bar.close()
        summary = {"round": stage.round, "folder": os.path.relpath(folder, self.run.root),
                   "model_stage": self.best_stage or "baseline", "agreement_threshold": threshold,
                   "volumes": len(entries), "kept": len(kept), "filtered": len(entries) - len(kept),
                   "voxels": totals, "cases": entries}
        short = {key: value for key, value in summary.items() if key != "cases"}
        if is_main:
            write_json_atomic(os.path.join(folder, "summary.json"), summary)
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            temporary = cache + ".tmp.npz"
            np.savez_compressed(temporary, case_ids=np.array([case.case_id for case in self.unlabeled_cases]),
                                kept=np.array([entry["kept"] for entry in entries], dtype=bool), **grids)
            os.replace(temporary, cache)
        self.state["results"][stage.name] = {"pseudo_labels": short}
        self._write_state()
        self.events.emit("pseudo_labels", stage=stage.name, step=self.global_step, **short)
        if not kept:
            self.events.message(f"round {stage.round}: no unlabelled scan passed the agreement filter "
                                f"(threshold {threshold}); this round trains on the labelled cases only",
                                level="warning")
        self._barrier()
        return kept, short
