"""Self-training with a local contrastive loss on pseudo-labels: anchors, the joint objective, the command."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import ONE_THREAD, SAMPLE_DIR, TINY_ARGS, run_cli, run_torchrun, tiny_config, write_dataset
from torch import nn

from ContrastiveSegLib.data.preprocess import PreparedCase
from ContrastiveSegLib.data.sampling import PatchSampler
from ContrastiveSegLib.engine.checkpoint import load_checkpoint
from ContrastiveSegLib.engine.events import read_events
from ContrastiveSegLib.errors import InputError
from ContrastiveSegLib.losses import class_prototypes
from ContrastiveSegLib.methods.selftrain import (
    JointPairs,
    SelfTrainingObjective,
    anchors_and_prototypes,
    local_contrastive_loss,
    padded_anchors,
)
from ContrastiveSegLib.selftrain import load_unlabeled_cases, run_selftrain, selftrain_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ContrastiveSeg"))
from ContrastiveSegJob.events import ProgressState  # noqa: E402
from ContrastiveSegJob.runfolder import RunStatus, run_status  # noqa: E402

LABELS = ["liver", "spleen"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- anchors and prototypes

def test_anchors_and_prototypes_of_a_tiny_labelled_volume():
    # Patch 0, 4 x 3 x 1: 5 liver voxels (1), 2 spleen voxels (2), 5 background; patch 1: only spleen (2).
    labels = torch.tensor([[[1, 1, 0], [1, 1, 2], [1, 0, 2], [0, 0, 0]],
                           [[0, 0, 0], [0, 2, 2], [0, 0, 0], [0, 0, 0]]]).reshape(2, 4, 3, 1)
    embeddings = torch.arange(2 * 2 * 12, dtype=torch.float32).reshape(2, 2, 4, 3, 1)  # [patch, C, *spatial]
    generator = torch.Generator().manual_seed(0)
    anchors = torch.stack([padded_anchors(labels[q], count=6, anchors_per_class=3, generator=generator)
                           for q in range(2)])
    assert anchors.shape == (2, 6) and anchors.dtype == torch.long
    chosen = anchors[0][anchors[0] >= 0]
    classes = labels[0].reshape(-1)[chosen]
    assert (classes == 1).sum() == 3 and (classes == 2).sum() == 2  # n per class, all of a smaller class
    assert (classes != 0).all() and len(set(chosen.tolist())) == len(chosen)
    assert (anchors[0, 5:] == -1).all() and anchors[1].tolist() == [4, 5, -1, -1, -1, -1]

    parts = anchors_and_prototypes(embeddings, labels, anchors)
    flat = [embeddings[q].reshape(2, -1) for q in range(2)]
    assert parts["anchor_patch"].tolist() == [0] * 5 + [1] * 2
    torch.testing.assert_close(parts["anchors"], torch.cat([flat[0][:, chosen].T, flat[1][:, [4, 5]].T]))
    assert parts["anchor_class"].tolist() == classes.tolist() + [2, 2]
    liver, spleen = [0, 1, 3, 4, 6], [5, 8]  # flat indices, C order
    assert parts["prototype_patch"].tolist() == [0, 0, 1] and parts["prototype_class"].tolist() == [1, 2, 2]
    expected = torch.stack([flat[0][:, liver].mean(1), flat[0][:, spleen].mean(1), flat[1][:, [4, 5]].mean(1)])
    torch.testing.assert_close(parts["prototypes"], expected)
    # The library's own per-image prototypes agree.
    prototypes, prototype_labels = class_prototypes(embeddings[0], labels[0])
    assert prototype_labels.tolist() == [1, 2]
    torch.testing.assert_close(prototypes, expected[:2])


def _cases(shape=(8, 8, 8)):
    image = np.random.default_rng(0).random((1,) + shape).astype(np.float32)
    label = np.zeros((1,) + shape, dtype=np.uint8)
    label[0, :4, :4] = 1
    label[0, 5:, 5:] = 2
    pseudo = np.zeros_like(label)
    pseudo[0, 2:6, 2:6, 2:6] = 2
    labelled = PreparedCase("d/l", image, label, np.eye(4))
    unlabelled = PreparedCase("u/u", image * 0.5, pseudo, np.eye(4))
    return labelled, unlabelled


def test_joint_pairs_mix_the_three_pair_kinds_and_draw_anchors_reproducibly():
    labelled, unlabelled = _cases()
    pairs = JointPairs(PatchSampler([labelled], (4, 4, 4), 1.0), PatchSampler([unlabelled], (4, 4, 4), 1.0), seed=3,
                       length=6, num_classes=2, anchors_per_class=5, stream=1)
    kinds = [tuple(pairs[i]["labeled"].tolist()) for i in range(6)]
    assert kinds == [(True, True), (True, False), (False, False)] * 2
    item = pairs[4]
    assert item["image"].shape == (2, 1, 4, 4, 4) and item["label"].shape == (2, 1, 4, 4, 4)
    assert item["anchors"].shape == (2, 10)
    for patch in range(2):
        anchors = item["anchors"][patch]
        chosen = anchors[anchors >= 0]
        classes = item["label"][patch, 0].reshape(-1)[chosen]
        assert (classes > 0).all()
        for value in (1, 2):
            present = int((item["label"][patch, 0] == value).sum())
            assert int((classes == value).sum()) == min(5, present)
    again = pairs[4]
    for key in item:
        assert torch.equal(item[key], again[key]), key
    other_round = JointPairs(pairs.labeled, pairs.unlabeled, seed=3, length=6, num_classes=2, anchors_per_class=5,
                             stream=2)[4]
    assert not torch.equal(other_round["image"], item["image"])
    only_labelled = JointPairs(pairs.labeled, None, seed=3, length=6, num_classes=2)
    assert all(only_labelled[i]["labeled"].all() for i in range(3))


def test_joint_pairs_draw_their_patches_with_the_runs_supervised_recipe():
    from ContrastiveSegLib.data.sampling import PatchAugmenter
    from ContrastiveSegLib.data.views import intensity_augment

    labelled, unlabelled = _cases((24, 24, 24))
    labelled_patches = PatchSampler([labelled], (16, 16, 16), 1.0)
    unlabelled_patches = PatchSampler([unlabelled], (16, 16, 16), 1.0)
    # Without an augmenter: the sampler's crop and the intensity augmentation, as before the recipe reached
    # self-training, so that older runs draw the same pairs.
    pairs = JointPairs(labelled_patches, unlabelled_patches, seed=3, length=3, num_classes=2, stream=1)
    rng = np.random.default_rng([3, 1, 1])
    image, label, _ = labelled_patches.sample(rng)
    np.testing.assert_array_equal(pairs[1]["image"][0].numpy(), intensity_augment(image, rng))
    # With the run's recipe, each patch (labelled or pseudo-labelled) is the augmenter's draw from the pair's
    # generator: rotated, zoomed and deformed with its label.
    spatial = PatchAugmenter(augmentation="spatial")
    recipe_pairs = JointPairs(labelled_patches, unlabelled_patches, seed=3, length=3, num_classes=2, stream=1,
                              augmenter=spatial)
    item = recipe_pairs[1]  # an L-U pair
    rng = np.random.default_rng([3, 1, 1])
    image, label = spatial.draw(labelled_patches, rng)
    np.testing.assert_array_equal(item["image"][0].numpy(), image)
    np.testing.assert_array_equal(item["label"][0].numpy(), label)
    assert not np.array_equal(item["image"][0].numpy(), pairs[1]["image"][0].numpy())
    # The pseudo-labelled patch keeps its label on its voxels: class 2 only where the pseudo-label was.
    assert set(np.unique(item["label"][1].numpy())) <= {0, 2}


def test_selftrain_cli_takes_the_finetune_recipe_flags():
    from ContrastiveSegLib.cli import _training_config, build_parser

    parser = build_parser()
    base = ["selftrain", "--labeled", "x", "--unlabeled", "u", "--labels", "liver", "--out", "y"]
    config = _training_config(parser.parse_args(base + ["--augmentation", "spatial", "--hollow-organ-gas-prob", "0.5",
                                                        "--vessel-contrast-prob", "0.5",
                                                        "--average-weights-from", "0.5"]), "selftrain")
    assert config.train.augmentation == "spatial" and config.train.hollow_organ_gas_prob == 0.5
    assert config.train.vessel_contrast_prob == 0.5 and config.train.average_weights_from == 0.5
    with pytest.raises(SystemExit):  # the largest-component rule is finetune's choice, not selftrain's
        parser.parse_args(base + ["--postprocess-on", "training"])


# --------------------------------------------------------------------------- the loss

def _reference_loss(embeddings, labels, tau, matching):
    """Every anchor = every foreground voxel; plain Python, independent of the library."""
    terms = []
    for pair_embeddings, pair_labels in zip(embeddings, labels):
        patches = []
        for patch_embeddings, patch_labels in zip(pair_embeddings, pair_labels):
            # Embeddings are unit vectors per voxel (the head normalises); prototypes are their means.
            vectors = [np.asarray(v, dtype=float) / np.linalg.norm(v) for v in patch_embeddings]
            classes = list(patch_labels)
            prototypes = []
            for value in sorted(set(classes) - {0}):
                mean = np.mean([v for v, c in zip(vectors, classes) if c == value], axis=0)
                prototypes.append((mean / np.linalg.norm(mean), value))
            anchors = [(v, c) for v, c in zip(vectors, classes) if c != 0]
            patches.append((anchors, prototypes))
        for index, (anchors, own) in enumerate(patches):
            prototypes = patches[0][1] + patches[1][1] if matching == "inter" else own
            for anchor, value in anchors:
                logits = [float(anchor @ p) / tau for p, _ in prototypes]
                log_denominator = math.log(sum(math.exp(x) for x in logits))
                terms += [log_denominator - x for x, (_, c) in zip(logits, prototypes) if c == value]
    return sum(terms) / len(terms)


# One pair; embeddings per voxel ([C=2]) and labels of patch a and patch b (0 = background).
PAIR_A = ([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [1, 2, 0])
PAIR_B = ([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], [1, 1, 0])


def _as_tensors(pairs):
    """``[(patch a, patch b)]`` of ``(embeddings [N][C], labels [N])`` -> normalised ``[P, 2, C, N]``, ``[P, 2, N]``."""
    embeddings = torch.tensor([[e for e, _ in pair] for pair in pairs])
    labels = torch.tensor([[lab for _, lab in pair] for pair in pairs])
    return torch.nn.functional.normalize(embeddings.permute(0, 1, 3, 2), dim=2), labels


def test_local_contrastive_loss_by_hand():
    # Inter-image, tau = 0.5.  Prototypes: a1 = [1, 0], a2 = [0, 1], b1 = mean([1,0], [.6,.8]) = [.8,.4] ->
    # [.8944, .4472].  Anchors and cosines to (a1, a2, b1):
    #   a.v0 [1,0] (1):   (1, 0, .8944)      positives a1, b1
    #   a.v1 [0,1] (2):   (0, 1, .4472)      positive a2
    #   b.v0 [1,0] (1):   (1, 0, .8944)      positives a1, b1
    #   b.v1 [.6,.8] (1): (.6, .8, .8944)    positives a1, b1
    # 7 terms, e.g. -log(e^2 / (e^2 + e^0 + e^1.7889)) = -log(7.3891 / 14.3723) = 0.6653 for (a.v0, a1).
    embeddings, labels = _as_tensors([(PAIR_A, PAIR_B)])
    anchors = torch.tensor([[[0, 1], [0, 1]]])
    loss = local_contrastive_loss(embeddings, labels, anchors, tau=0.5, matching="inter")
    s = math.sqrt(0.8**2 + 0.4**2)
    b1 = (0.8 / s, 0.4 / s)

    def term(cosines, positive):
        return -math.log(math.exp(cosines[positive] / 0.5) / sum(math.exp(c / 0.5) for c in cosines))

    v0 = (1.0, 0.0, b1[0])
    v1 = (0.0, 1.0, b1[1])
    w1 = (0.6, 0.8, 0.6 * b1[0] + 0.8 * b1[1])
    expected = (term(v0, 0) + term(v0, 2) + term(v1, 1) + term(v0, 0) + term(v0, 2) + term(w1, 0) + term(w1, 2)) / 7
    assert abs(term(v0, 0) - 0.6653) < 1e-4
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert loss.item() == pytest.approx(_reference_loss([[PAIR_A[0], PAIR_B[0]]], [[PAIR_A[1], PAIR_B[1]]], 0.5,
                                                        "inter"), abs=1e-5)


@pytest.mark.parametrize("matching", ["inter", "intra"])
def test_local_contrastive_loss_is_the_clean_mean_over_all_pairs(matching):
    rng = np.random.default_rng(1)
    pair_embeddings = rng.normal(size=(3, 2, 6, 4))
    pair_labels = np.array([[[1, 1, 2, 0, 0, 2], [1, 0, 0, 0, 2, 2]],
                            [[3, 3, 3, 0, 1, 0], [0, 0, 0, 0, 0, 0]],    # the second patch has no organ
                            [[2, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]])
    embeddings = torch.nn.functional.normalize(torch.tensor(pair_embeddings, dtype=torch.float32).permute(0, 1, 3, 2),
                                               dim=2)
    labels = torch.tensor(pair_labels)
    anchors = torch.full((3, 2, 6), -1, dtype=torch.long)
    for p in range(3):
        for i in range(2):
            foreground = torch.nonzero(labels[p, i]).squeeze(1)
            anchors[p, i, : len(foreground)] = foreground
    loss = local_contrastive_loss(embeddings, labels, anchors, tau=0.1, matching=matching)
    expected = _reference_loss(pair_embeddings.tolist(), pair_labels.tolist(), 0.1, matching)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


class _StubBackbone(nn.Module):
    """Decoder features [x, 1 - x] of a one-channel image x; a fixed 1x1x1 segmentation layer."""

    decoder_channels = 2

    def __init__(self):
        super().__init__()
        self.out = nn.Conv3d(2, 3, kernel_size=1)
        with torch.no_grad():
            self.out.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0], [-1.0, 0.3]]).reshape(3, 2, 1, 1, 1))
            self.out.bias.copy_(torch.tensor([0.1, -0.2, 0.0]))

    def encode(self, x):
        return [x]

    def decode(self, levels):
        return torch.cat([levels[0], 1.0 - levels[0]], dim=1)

    def segment(self, features):
        return self.out(features)


def test_objective_is_segmentation_on_labelled_plus_weighted_contrast_on_all():
    from monai.losses import DiceCELoss

    objective = SelfTrainingObjective(_StubBackbone(), contrastive_weight=0.25, tau=0.2, embedding_dim=2)
    with torch.no_grad():  # an identity head: embeddings = normalised decoder features
        for layer in (objective.head.layers[0], objective.head.layers[2]):
            layer.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1, 1))
            layer.bias.zero_()
    # Two pairs (L-U, U-U) of 4 x 1 x 1 patches, intensities in [0, 1].
    x = torch.tensor([[[0.9, 0.2, 0.5, 0.1], [0.3, 0.8, 0.6, 0.0]],
                      [[0.7, 0.4, 0.25, 0.95], [0.15, 0.55, 0.65, 0.35]]])
    y = torch.tensor([[[1, 2, 0, 1], [2, 2, 1, 0]], [[1, 0, 2, 2], [0, 1, 1, 2]]])
    batch = {"image": x.reshape(2, 2, 1, 4, 1, 1), "label": y.reshape(2, 2, 1, 4, 1, 1),
             "labeled": torch.tensor([[True, False], [False, False]]),
             "anchors": torch.tensor([[[0, 1, 3, -1], [0, 1, 2, -1]], [[0, 2, 3, -1], [1, 2, 3, -1]]])}
    loss, logs = objective(batch)

    features = torch.stack([x, 1 - x], dim=2)                       # [P, 2, C, N]
    logits = objective.backbone.segment(features[0, 0].reshape(1, 2, 4, 1, 1))
    segmentation = DiceCELoss(to_onehot_y=True, softmax=True)(logits, y[0, 0].reshape(1, 1, 4, 1, 1)).item()
    contrast = _reference_loss(features.permute(0, 1, 3, 2).tolist(), y.tolist(), 0.2, "inter")
    assert logs["segmentation"] == pytest.approx(segmentation, rel=1e-5)
    assert logs["contrastive"] == pytest.approx(contrast, rel=1e-5)
    assert loss.item() == pytest.approx(segmentation + 0.25 * contrast, rel=1e-5)
    loss.backward()
    assert objective.head.layers[0].weight.grad is not None and objective.backbone.out.weight.grad is not None


def test_settings_parse_set_strings_and_reject_bad_values():
    settings = selftrain_settings(["tau=0.2", "matching=intra", "agreement_threshold=0.8"], rounds=2)
    assert settings["tau"] == 0.2 and settings["matching"] == "intra" and settings["rounds"] == 2
    assert settings["agreement_threshold"] == 0.8 and settings["name"] == "selftrain"
    assert selftrain_settings([])["agreement_threshold"] is None and selftrain_settings([])["contrastive_weight"] == 0.1
    with pytest.raises(InputError, match="not a setting of selftrain"):
        selftrain_settings(["lambda=1"])
    with pytest.raises(InputError, match="matching"):
        selftrain_settings(["matching=both"])
    with pytest.raises(InputError, match="rounds"):
        selftrain_settings([], rounds=0)


# --------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def selftrain_data(tmp_path_factory, sample_label_map):
    """One labelled case, one validation case, and a plain folder of two unlabelled scans (real CT pieces)."""
    root = tmp_path_factory.mktemp("selftrain")
    image = sitk.ReadImage(os.path.join(SAMPLE_DIR, "abdomen_ct.nii.gz"), sitk.sitkFloat32)
    label = sitk.ReadImage(os.path.join(SAMPLE_DIR, "abdomen_ct_labels.nii.gz"))
    labelled = write_dataset(str(root / "labelled"), {"upper": (image[:, :, 10:30], label[:, :, 10:30])},
                             sample_label_map)
    validation = write_dataset(str(root / "validation"), {"lower": (image[:, :, 0:20], label[:, :, 0:20])},
                               sample_label_map)
    unlabelled = root / "scans"
    unlabelled.mkdir()
    sitk.WriteImage(image[0:90, :, 0:30], str(unlabelled / "right.nii.gz"))
    sitk.WriteImage(image[30:122, :, 5:25], str(unlabelled / "left.nii.gz"))
    return {"labelled": labelled, "validation": validation, "unlabelled": str(unlabelled)}


def test_selftrain_cli_end_to_end(tmp_path, selftrain_data):
    run = tmp_path / "run"
    result = run_cli(["selftrain", "--labeled", selftrain_data["labelled"], "--unlabeled", selftrain_data["unlabelled"],
                      "--val-data", selftrain_data["validation"], "--labels", "liver,spleen", "--out", run,
                      "--rounds", "2", "--max-steps", "2", "--agreement-threshold", "0.0", "--events-stdout"]
                     + TINY_ARGS + ["--batch-size", "2"], env=ONE_THREAD)  # two pairs a step: always a labelled patch
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(str(run / "events.jsonl"))
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("finished") == 1 and kinds[-1] == "finished"
    start = events[kinds.index("start")]
    assert start["total_steps"] == 6 and start["stages"] == ["baseline", "round_1", "round_2"]
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6] and {e["total"] for e in steps} == {6}
    assert [e["stage"] for e in steps] == ["baseline"] * 2 + ["round_1"] * 2 + ["round_2"] * 2
    assert set(steps[-1]["losses"]) == {"segmentation", "contrastive"}
    rounds = [e for e in events if e["event"] == "round"]
    assert [e["round"] for e in rounds] == [0, 1, 2]
    for event in rounds:
        assert event["mean_dice"] is not None and set(event["dice"]) == {"liver", "spleen"}
    best = max(rounds, key=lambda e: e["mean_dice"])
    assert rounds[-1]["best_stage"] == best["stage"] and rounds[-1]["best_mean_dice"] == best["mean_dice"]
    assert events[-1]["best_mean_dice"] == best["mean_dice"] and events[-1]["stopped"] is False
    assert "pseudo_labels" in rounds[1] and "pseudo_labels" not in rounds[0]
    # The whole command is one run for the Slicer module.
    assert run_status(run) == RunStatus.FINISHED
    progress = ProgressState.for_phases(["selftrain"])
    progress.begin_phase(0)
    for event in events:
        progress.apply(event)
    assert progress.percent() == 100 and progress.best_mean_dice == best["mean_dice"]

    # Pseudo-labels: one file per scan on the scan's own grid, named and coloured, and a summary.
    for round_number in (1, 2):
        folder = run / "pseudo_labels" / f"round_{round_number}"
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["volumes"] == 2 and summary["kept"] + summary["filtered"] == 2
        assert json.loads((folder / "labels.json").read_text()) == {"0": "background", "1": "liver", "2": "spleen"}
        assert set(json.loads((folder / "colors.json").read_text())) == {"liver", "spleen"}
        for entry in summary["cases"]:
            written = sitk.ReadImage(str(folder / entry["file"]))
            scan = sitk.ReadImage(os.path.join(selftrain_data["unlabelled"], entry["file"]))
            assert written.GetSize() == scan.GetSize() and np.allclose(written.GetSpacing(), scan.GetSpacing())
            counts = np.bincount(sitk.GetArrayFromImage(written).reshape(-1), minlength=3)
            assert entry["voxels"] == {"liver": int(counts[1]), "spleen": int(counts[2])}
            assert entry["kept"] == (entry["agreement"] is not None and entry["agreement"] > 0.0)
        event = [e for e in events if e["event"] == "pseudo_labels" and e["round"] == round_number][0]
        assert event["kept"] == summary["kept"] and event["voxels"] == summary["voxels"]

    # The model: best.pt / last.pt of kind "selftrain", the stage folders cleaned up; predict works.
    assert not (run / "stages").exists()
    state = load_checkpoint(str(run / "checkpoints" / "best.pt"))
    assert state["kind"] == "selftrain" and state["best_metric"] == best["mean_dice"]
    assert load_checkpoint(str(run / "checkpoints" / "last.pt"))["kind"] == "selftrain"
    saved = json.loads((run / "selftrain.json").read_text())
    assert saved["finished"] == ["baseline", "round_1", "round_2"] and saved["best_stage"] == best["stage"]
    from ContrastiveSegLib.cli import main

    prediction = tmp_path / "prediction.nii.gz"
    scan = os.path.join(selftrain_data["unlabelled"], "right.nii.gz")
    assert main(["predict", "--model", str(run), "--image", scan, "--out", str(prediction), "--device", "cpu"]) == 0
    assert sitk.ReadImage(str(prediction)).GetSize() == sitk.ReadImage(scan).GetSize()


def _config(data, rounds=1, max_steps=2, **settings):
    config = tiny_config([data["labelled"]], LABELS, max_steps=max_steps)
    config.data.unlabeled = [data["unlabelled"]]
    config.method = selftrain_settings([f"{k}={v}" for k, v in settings.items()], rounds=rounds)
    return config


def test_stop_in_a_round_then_resume_finishes_the_run(tmp_path, selftrain_data):
    run = tmp_path / "run"

    def stop_in_round_one(event):
        if event["event"] == "step" and event["step"] == 4:  # round_1's first step (the baseline has 3)
            (run / "STOP").write_text("")

    with pytest.warns(UserWarning, match="no validation cases"):
        summary = run_selftrain(_config(selftrain_data, max_steps=3), str(run), listeners=[stop_in_round_one],
                                progress=False)
    assert summary["stopped"] and summary["step"] == 4 and summary["stages"] == ["baseline"]
    assert not (run / "STOP").exists() and run_status(run) == RunStatus.STOPPED
    assert load_checkpoint(str(run / "stages" / "round_1" / "checkpoints" / "last.pt"))["step"] == 1
    assert not (run / "checkpoints" / "best.pt").exists()  # no validation: the latest model is the model

    with pytest.warns(UserWarning, match="no validation cases"):
        summary = run_selftrain(_config(selftrain_data, max_steps=3), str(run), resume=True, progress=False)
    assert summary["step"] == 6 and not summary["stopped"]
    assert summary["stages"] == ["baseline", "round_1"] and summary["best_stage"] == "round_1"
    events = read_events(str(run / "events.jsonl"))
    starts = [e for e in events if e["event"] == "start"]
    assert [s["start_step"] for s in starts] == [0, 4] and {s["total_steps"] for s in starts} == {6}
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert len([e for e in events if e["event"] == "pseudo_labels"]) == 1  # the round's labels were kept
    assert [e["stage"] for e in events if e["event"] == "round"] == ["baseline", "round_1"]
    assert [e["stopped"] for e in events if e["event"] == "finished"] == [True, False]
    assert run_status(run) == RunStatus.FINISHED and not (run / "stages").exists()
    assert load_checkpoint(str(run / "checkpoints" / "last.pt"))["step"] == 3
    saved = json.loads((run / "selftrain.json").read_text())
    assert saved["finished"] == ["baseline", "round_1"] and saved["results"]["round_1"]["pseudo_labels"]["volumes"] == 2

    # The stop and resume changed nothing: the same weights as a run straight through.
    straight = tmp_path / "straight"
    with pytest.warns(UserWarning, match="no validation cases"):
        run_selftrain(_config(selftrain_data, max_steps=3), str(straight), progress=False)
    a = load_checkpoint(str(straight / "checkpoints" / "last.pt"))
    b = load_checkpoint(str(run / "checkpoints" / "last.pt"))
    for part in ("model", "extra"):
        assert a[part].keys() == b[part].keys() and a[part]
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, selftrain_data):
    """The last.pt of a one-step finetune run on the labelled case (liver, spleen)."""
    from ContrastiveSegLib.finetune import run_finetune

    source = tmp_path_factory.mktemp("finetune") / "run"
    with pytest.warns(UserWarning, match="no validation cases"):
        run_finetune(tiny_config([selftrain_data["labelled"]], LABELS, max_steps=1), str(source), progress=False)
    return str(source / "checkpoints" / "last.pt")


def test_init_with_a_finetune_model_of_the_same_labels_is_the_baseline(tmp_path, selftrain_data, finetuned):
    # A Dice above 1 cannot be: every scan is filtered out and the round trains on the labelled case only.
    config = _config(selftrain_data, rounds=1, max_steps=1, agreement_threshold=1.0)
    config.init_checkpoint = finetuned
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="no validation cases"):
        summary = run_selftrain(config, str(run), progress=False)
    assert summary["step"] == 1 and summary["stages"] == ["baseline", "round_1"]
    events = read_events(str(run / "events.jsonl"))
    assert events[[e["event"] for e in events].index("start")]["total_steps"] == 1
    assert [(e["stage"], e["source"]) for e in events if e["event"] == "round"] == [("baseline", "init"),
                                                                                   ("round_1", "trained")]
    assert [e["stage"] for e in events if e["event"] == "step"] == ["round_1"]
    assert any("it is the baseline" in e.get("text", "") for e in events if e["event"] == "message")
    pseudo = [e for e in events if e["event"] == "pseudo_labels"][0]
    assert pseudo["kept"] == 0 and pseudo["filtered"] == 2 and pseudo["model_stage"] == "baseline"
    assert any("no unlabelled scan passed the agreement filter" in e.get("text", "") for e in events
               if e["event"] == "message" and e["level"] == "warning")


def test_init_with_a_pretrain_checkpoint_loads_the_encoder_and_trains_a_baseline(tmp_path, selftrain_data, finetuned):
    from ContrastiveSegLib.engine.checkpoint import save_checkpoint

    state = load_checkpoint(finetuned)
    state.update(kind="pretrain", labels={"0": "background", "1": "liver", "2": "kidney", "3": "lung"})
    pretrained = str(tmp_path / "pretrain.pt")
    save_checkpoint(pretrained, state)
    config = _config(selftrain_data, rounds=1, max_steps=1)
    config.init_checkpoint = pretrained
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="no validation cases"):
        summary = run_selftrain(config, str(run), progress=False)
    assert summary["step"] == 2 and summary["stages"] == ["baseline", "round_1"]
    report = json.loads((run / "init_report.json").read_text())
    assert report["loaded"] and all(key.startswith(("net.conv_0.", "net.down_")) for key in report["loaded"])
    events = read_events(str(run / "events.jsonl"))
    assert [(e["stage"], e["source"]) for e in events if e["event"] == "round"] == [("baseline", "trained"),
                                                                                   ("round_1", "trained")]
    # A checkpoint of another network is refused before anything is written.
    config = _config(selftrain_data)
    config.init_checkpoint = pretrained
    config.model.architecture = "unetr"
    with pytest.raises(InputError, match="holds a 'unet' network"):
        run_selftrain(config, str(tmp_path / "other"), progress=False)
    assert not (tmp_path / "other").exists()


def test_unlabelled_scans_from_a_folder_of_files_a_dicom_series_and_clashing_names(tmp_path, selftrain_data):
    dicom = os.path.join(SAMPLE_DIR, "heldout", "ct_dicom")
    cases = load_unlabeled_cases([selftrain_data["unlabelled"], dicom], taken_names={"scans"})
    assert [case.case_id for case in cases] == ["scans-2/left", "scans-2/right", "ct_dicom/ct_dicom"]
    assert cases[2].image == dicom and all(case.label is None for case in cases)
    with pytest.raises(InputError, match="the same scan is given twice"):
        load_unlabeled_cases([selftrain_data["unlabelled"], os.path.join(selftrain_data["unlabelled"], "")], ())


def test_unlabelled_input_errors_name_the_folder_and_write_nothing(tmp_path, selftrain_data):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = _config(selftrain_data)
    config.data.unlabeled = [str(empty)]
    with pytest.raises(InputError, match="is an empty folder") as error:
        run_selftrain(config, str(tmp_path / "run"), progress=False)
    assert str(empty) in str(error.value) and "What to do" in str(error.value)
    (empty / "notes.txt").write_text("not a scan")
    with pytest.raises(InputError, match="holds no scans"):
        run_selftrain(config, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_torchrun_two_cpu_processes_selftrain(tmp_path, selftrain_data):
    """Both ranks train every stage, only rank 0 pseudo-labels and writes; the run still reads as one run."""
    run = tmp_path / "ddp"
    result = run_torchrun(["selftrain", "--labeled", selftrain_data["labelled"],
                           "--unlabeled", selftrain_data["unlabelled"], "--val-data", selftrain_data["validation"],
                           "--labels", "liver,spleen", "--out", run, "--rounds", "1", "--max-steps", "2",
                           "--agreement-threshold", "0.0", "--device", "cpu"] + TINY_ARGS + ["--batch-size", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(str(run / "events.jsonl"))
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("finished") == 1  # one writer, though two processes trained
    assert events[kinds.index("start")]["world_size"] == 2
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4]
    assert [e["round"] for e in events if e["event"] == "round"] == [0, 1]
    summary = json.loads((run / "pseudo_labels" / "round_1" / "summary.json").read_text())
    assert summary["volumes"] == 2
    assert (run / "checkpoints" / "last.pt").exists()


def test_body_mask_on_the_network_grid_keeps_the_body_and_drops_air_and_padding():
    import SimpleITK as sitk

    from ContrastiveSegLib.data.preprocess import affine_from_sitk
    from ContrastiveSegLib.engine.body import body_mask
    from ContrastiveSegLib.selftrain import body_mask_on_grid

    hu = np.full((10, 40, 40), -1000.0, dtype=np.float32)   # (z, y, x): air
    hu[:, 10:30, 8:32] = 20.0                                 # the trunk
    hu[:, 36:39, 2:38] = 300.0                                # a table, detached from the trunk
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((2.0, 2.0, 3.0))
    affine = affine_from_sitk(image)
    same_grid = body_mask_on_grid(image, affine, (40, 40, 10))
    assert np.array_equal(same_grid, np.transpose(body_mask(image), (2, 1, 0)))
    assert same_grid[20, 20, 5] and not same_grid[20, 37, 5] and not same_grid[1, 1, 5]
    # A grid larger than the scan (padding at the far end): the padding is outside the body.
    padded = body_mask_on_grid(image, affine, (48, 40, 12))
    assert np.array_equal(padded[:40, :, :10], same_grid) and not padded[40:].any() and not padded[:, :, 10:].any()
