"""Largest-connected-component rule: chosen per organ only where it raised Dice, stored in the run, applied
by predict; the body mask applies in validation too."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config

from ContrastiveSegLib.engine.postprocess import (
    apply_postprocessing,
    choose_postprocessing,
    label_regions,
    largest_component,
    value_counts,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = {1: "liver", 2: "colon"}


def test_largest_component_keeps_only_the_biggest_island():
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[2:10, 2:10, 2:10] = 1
    labels[15:17, 15:17, 15:17] = 1
    labels[12:14, 2:4, 2:4] = 2
    kept = largest_component(labels, 1)
    assert (kept == 1).sum() == 512 and (kept == 2).sum() == 8   # other classes untouched
    np.testing.assert_array_equal(largest_component(kept, 1), kept)


def test_value_counts_in_chunks_equal_bincount():
    values = np.random.default_rng(0).integers(0, 7, size=(9, 11, 13)).astype(np.uint16)
    for chunk in (1, 100, 10_000):
        np.testing.assert_array_equal(value_counts(values, 6, chunk=chunk), np.bincount(values.reshape(-1)))
    np.testing.assert_array_equal(value_counts(values, 3), np.bincount(values.reshape(-1))[:4])   # the rest is cut


def test_region_numbers_are_uint16_until_they_do_not_fit():
    few = np.zeros((4, 4, 4), dtype=bool)
    few[0, 0, 0] = few[3, 3, 3] = True
    regions, count = label_regions(few)
    assert regions.dtype == np.uint16 and count == 2
    many = np.zeros((2, 2 * 300, 2 * 300), dtype=bool)
    many[0, ::2, ::2] = True   # 90 000 isolated voxels: more regions than uint16 numbers
    regions, count = label_regions(many)
    assert count == 90_000 and regions.max() == 90_000


def _cases():
    """One liver with a false island (the rule helps) and a colon in two true pieces (the rule hurts)."""
    reference = np.zeros((24, 24, 24), dtype=np.uint8)
    reference[2:12, 2:12, 2:12] = 1
    reference[16:22, 2:8, 2:8] = 2
    reference[16:22, 16:22, 16:22] = 2
    prediction = reference.copy()
    prediction[2:6, 18:22, 18:22] = 1          # a second "liver" where there is none
    prediction[2:3, 2:3, 2:3] = 0
    return [prediction], [reference]


def test_the_rule_is_chosen_only_where_it_raised_dice():
    predictions, references = _cases()
    decision = choose_postprocessing(predictions, references, NAMES)
    assert decision["largest_component"] == ["liver"]
    assert decision["dice_after"]["liver"] > decision["dice_before"]["liver"]
    assert decision["dice_after"]["colon"] < decision["dice_before"]["colon"]
    applied = apply_postprocessing(predictions[0], decision, NAMES)
    assert (applied == 1).sum() == (references[0] == 1).sum() - 1
    np.testing.assert_array_equal(applied == 2, predictions[0] == 2)   # the colon keeps both pieces
    np.testing.assert_array_equal(apply_postprocessing(predictions[0], None, NAMES), predictions[0])


def test_the_decision_is_stored_in_the_run_and_applied_by_predict(tmp_path, tiny_dataset, sample_dir):
    from ContrastiveSegLib.engine.inference import load_model, predict_image
    from ContrastiveSegLib.finetune import run_finetune

    config = tiny_config([tiny_dataset], ["liver", "spleen"], max_steps=3, val_datasets=[tiny_dataset])
    run = tmp_path / "run"
    run_finetune(config, str(run), progress=False)
    decision = json.loads((run / "postprocess.json").read_text())
    assert decision["chosen_on"] == "validation" and decision["cases"] == 3
    assert set(decision["dice_before"]) <= {"liver", "spleen"}
    # Force a decision for both organs, so that applying it visibly changes a prediction of an untrained net.
    forced = dict(decision, largest_component=["liver", "spleen"])
    (run / "postprocess.json").write_text(json.dumps(forced))
    model = load_model(str(run), torch.device("cpu"), checkpoint="last")
    assert model.postprocess == forced
    image = f"{sample_dir}/abdomen_ct.nii.gz"
    applied, _ = predict_image(model, image)
    model.postprocess = None
    plain, _ = predict_image(model, image)
    np.testing.assert_array_equal(applied, apply_postprocessing(plain, forced, model.labels))


def test_training_can_choose_on_the_training_cases_or_not_at_all(tmp_path, tiny_dataset):
    from ContrastiveSegLib.finetune import run_finetune

    config = tiny_config([tiny_dataset], ["liver"], max_steps=2)
    config.data.val_fraction = 0.0   # not used: three cases hold one out for validation anyway
    config.postprocess.choose_on = "training"
    run_finetune(config, str(tmp_path / "training"), progress=False)
    assert json.loads((tmp_path / "training" / "postprocess.json").read_text())["chosen_on"] == "training"
    config = tiny_config([tiny_dataset], ["liver"], max_steps=2)
    config.postprocess.choose_on = "off"
    run_finetune(config, str(tmp_path / "off"), progress=False)
    assert not (tmp_path / "off" / "postprocess.json").exists()


def test_validation_is_masked_outside_the_body():
    from ContrastiveSegLib.data.preprocess import PreparedCase
    from ContrastiveSegLib.finetune import make_validator

    class EverythingLiver(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))   # prediction asks a network for its device

        def forward(self, x):
            return torch.cat([torch.zeros_like(x), torch.ones_like(x)], dim=1)

    label = np.zeros((1, 16, 16, 16), dtype=np.uint8)
    label[0, 4:12, 4:12, 4:12] = 1
    body = np.zeros((1, 16, 16, 16), dtype=bool)
    body[0, 2:14, 2:14, 2:14] = True
    case = PreparedCase("a", np.zeros((1, 16, 16, 16), dtype=np.float32), label, np.eye(4), body)
    result = make_validator([case], ["liver"], (16, 16, 16), 0.0)(EverythingLiver(), 0)
    inside = body.sum()
    assert result["dice"]["liver"] == pytest.approx(2 * 512 / (512 + inside))
    unmasked = PreparedCase("a", case.image, label, np.eye(4), None)
    assert make_validator([unmasked], ["liver"], (16, 16, 16), 0.0)(EverythingLiver(), 0)["dice"]["liver"] == \
        pytest.approx(2 * 512 / (512 + 16 ** 3))
