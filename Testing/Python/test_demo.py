"""The README's main job: ``contrastiveseg demo --quick`` on the shipped sample, end to end."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from ContrastiveSegLib.data.io import read_label_image


@pytest.mark.slow
def test_quick_demo_runs_and_reports_dice(tmp_path):
    out = tmp_path / "demo"
    result = run_cli(["demo", "--quick", "--networks", "2", "--out", out, "--device", "cpu"])
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("heldout_prediction.nii.gz", "heldout_prediction.seg.nrrd", "overlay.png", "training_curves.png",
                 "metrics.json", "run/checkpoints/last.pt", "run/events.jsonl"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["dice"]) == {"liver", "spleen", "stomach", "aorta"}
    # Patient B is validated on for the curves, so the scored model must not be the one chosen on it; the
    # two networks are an ensemble, seeds 0 and 1, and only the first validates on B.
    assert metrics["checkpoint"] == "run/checkpoints/last.pt"
    assert metrics["checkpoints"] == ["run/checkpoints/last.pt", "run-seed1/checkpoints/last.pt"]
    second = json.loads((out / "run-seed1" / "config.json").read_text())
    assert second["train"]["seed"] == 1 and second["data"]["val_datasets"] == []
    assert json.loads((out / "run" / "postprocess.json").read_text())["chosen_on"] == "training"
    assert "liver" in result.stdout and "mean" in result.stdout  # the printed table
    # The prediction of the DICOM patient is on the DICOM grid, 512 x 512 x 20.
    assert read_label_image(str(out / "heldout_prediction.seg.nrrd")).image.GetSize() == (512, 512, 20)


def test_the_demo_decides_nothing_on_patient_b():
    from ContrastiveSegLib.demo import demo_config, sample_paths

    config = demo_config(quick=True, device="cpu")
    # Patient B is the only validation dataset, so the post-processing rule must come from patient A.
    assert config.data.val_datasets == [sample_paths()["heldout_dataset"]]
    assert config.postprocess.choose_on == "training"
