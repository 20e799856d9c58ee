"""Score one checkpoint on the study's test cases, the way a user would: ``predict`` then ``evaluate``.

The prediction is made with :func:`ContrastiveSegLib.engine.inference.predict_image`
(the ``predict`` command's defaults: overlap 0.5, no flips, body mask for CT)
and written on the test image's own grid; :func:`ContrastiveSegLib.evaluate.evaluate_files`
then scores it against the test case's label file, organs matched by name.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import torch

from ..data.catalog import Case


def reference_names(case: Case) -> Dict[int, str]:
    """``{value: organ}`` of a case's label file, from its dataset's label map (empty for ``.seg.nrrd``)."""
    return {value: name for name, values in case.label_map.items() for value in values}


def score_checkpoint(checkpoint: str, test_cases: Sequence[Case], targets: Sequence[str], device: torch.device,
                     prediction_dir: str) -> Dict[str, Dict]:
    """Per-organ and mean Dice of ``checkpoint`` on every test case.

    Args:
        checkpoint: a finetune / selftrain checkpoint file.
        test_cases: the cases to score (image and label files).
        targets: the study's organs; an organ the reference does not label is scored as None.
        device: where the network runs.
        prediction_dir: the predicted label maps are written here, one ``.nii.gz`` per case.

    Returns:
        ``{case id: {"dice": {organ: float | None}, "mean_dice": float | None}}``; the mean is
        over the organs present in the prediction or the reference.
    """
    from ..data.io import write_labelmap
    from ..engine.inference import load_model, predict_image
    from ..engine.metrics import mean_dice
    from ..evaluate import evaluate_files

    model = load_model(checkpoint, device)
    names = {value: name for value, name in model.labels.items() if value != 0}
    os.makedirs(prediction_dir, exist_ok=True)
    scores: Dict[str, Dict] = {}
    for case in test_cases:
        labels, image = predict_image(model, case.image)
        path = os.path.join(prediction_dir, case.case_id.replace("/", "__") + ".nii.gz")
        write_labelmap(path, labels, image, names=names)
        metrics = evaluate_files(path, case.label, names, reference_names(case) or None)
        dice = {name: _lookup(metrics["dice"], name) for name in targets}
        scores[case.case_id] = {"dice": dice, "mean_dice": mean_dice(dice)}
    return scores


def _lookup(dice: Dict[str, float], target: str):
    """The Dice of ``target`` in an evaluate result, whose keys are the reference's spelling of the name."""
    from ..data.labels import canonical_name

    for name, value in dice.items():
        if canonical_name(name) == target:
            return value
    return None


def mean_over_cases(scores: Dict[str, Dict], targets: List[str]) -> Dict:
    """``{"dice": {organ: mean over cases}, "mean_dice": mean over cases of the case means}`` (None where empty)."""
    import numpy as np

    dice = {}
    for name in targets:
        values = [case["dice"][name] for case in scores.values() if case["dice"].get(name) is not None]
        dice[name] = float(np.mean(values)) if values else None
    means = [case["mean_dice"] for case in scores.values() if case["mean_dice"] is not None]
    return {"dice": dice, "mean_dice": float(np.mean(means)) if means else None}
