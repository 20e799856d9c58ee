"""Run folders, dataset.json files, label tables and requirement checks of the Slicer module."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ContrastiveSeg"))

from ContrastiveSegJob.datasets import dataset_json_path, read_dataset_labels, write_dataset_json  # noqa: E402
from ContrastiveSegJob.labels import (  # noqa: E402
    canonical_organ_name,
    normalize_label_table,
    organ_color,
    parse_organ_list,
)
from ContrastiveSegJob.requirements import (  # noqa: E402
    missing_requirements,
    read_requirements,
    split_requirement,
    version_at_least,
)
from ContrastiveSegJob.runfolder import (  # noqa: E402
    RunStatus,
    clear_stop,
    delete_output_folder,
    format_size,
    is_model_folder,
    looks_like_output_folder,
    model_checkpoint,
    read_colors,
    read_events,
    read_labels,
    request_stop,
    run_status,
    stop_file,
)


def make_run(folder: Path, events=(), labels=None, colors=None, checkpoints=()):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + "not json\n")
    if labels is not None:
        (folder / "labels.json").write_text(json.dumps(labels))
    if colors is not None:
        (folder / "colors.json").write_text(json.dumps(colors))
    for name in checkpoints:
        (folder / "checkpoints").mkdir(exist_ok=True)
        (folder / "checkpoints" / name).write_bytes(b"weights")
    return folder


def test_run_status(tmp_path):
    assert run_status(tmp_path / "none") == RunStatus.NONE
    assert run_status(make_run(tmp_path / "a", [{"event": "start"}])) == RunStatus.INCOMPLETE
    assert run_status(make_run(tmp_path / "b", [{"event": "start"}], checkpoints=["last.pt"])) == RunStatus.INTERRUPTED
    stopped = [{"event": "start"}, {"event": "finished", "stopped": True}]
    assert run_status(make_run(tmp_path / "c", stopped, checkpoints=["last.pt"])) == RunStatus.STOPPED
    # resumed after the stop, then finished: the last start decides
    done = stopped + [{"event": "start", "start_step": 5}, {"event": "finished", "stopped": False}]
    assert run_status(make_run(tmp_path / "d", done, checkpoints=["last.pt"])) == RunStatus.FINISHED
    resumed_and_crashed = stopped + [{"event": "start", "start_step": 5}]
    assert run_status(make_run(tmp_path / "e", resumed_and_crashed, checkpoints=["last.pt"])) == RunStatus.INTERRUPTED
    assert len(read_events(tmp_path / "e")) == 3  # the non-JSON line is skipped


def test_labels_colors_and_model_folder(tmp_path):
    run = make_run(tmp_path / "run", labels={"0": "background", "1": "liver", "2": "spleen"},
                   colors={"liver": [220, 130, 100], "bad": "x"}, checkpoints=["last.pt"])
    assert read_labels(run) == {1: "liver", 2: "spleen"}
    assert read_colors(run) == {"liver": (220, 130, 100)}
    assert is_model_folder(run)
    assert model_checkpoint(run).name == "last.pt"
    (run / "checkpoints" / "best.pt").write_bytes(b"w")
    assert model_checkpoint(run).name == "best.pt"
    assert not is_model_folder(tmp_path)
    assert read_colors(tmp_path) == {}
    with pytest.raises(FileNotFoundError, match="finetune/ or selftrain/"):
        read_labels(tmp_path)


def test_stop_file(tmp_path):
    path = request_stop(tmp_path / "run")
    assert path == stop_file(tmp_path / "run") and path.is_file()
    assert clear_stop(tmp_path / "run") and not path.exists()
    assert not clear_stop(tmp_path / "run")


def test_delete_only_contrastiveseg_folders(tmp_path):
    output = tmp_path / "output"
    make_run(output / "finetune", [{"event": "start"}], checkpoints=["last.pt"])
    write_dataset_json(output / "scene_data", [], ["liver"])
    assert looks_like_output_folder(output)
    assert delete_output_folder(output) > 0
    assert not output.exists()
    personal = tmp_path / "Documents"
    personal.mkdir()
    (personal / "thesis.docx").write_text("precious")
    assert not looks_like_output_folder(personal)
    with pytest.raises(ValueError, match="not deleting"):
        delete_output_folder(personal)
    assert (personal / "thesis.docx").exists()
    assert format_size(1536) == "1.5 kB" and format_size(12) == "12 B"


def test_dataset_json_round_trip(tmp_path):
    (tmp_path / "img.nrrd").write_bytes(b"")
    path = write_dataset_json(tmp_path, [(tmp_path / "img.nrrd", "lab.nrrd"), ("/elsewhere/i.nii.gz", "/elsewhere/l.nii.gz")],
                              ["liver", "spleen"])
    content = json.loads(path.read_text())
    assert content["labels"] == {"0": "background", "1": "liver", "2": "spleen"}
    assert content["training"][0] == {"image": "./img.nrrd", "label": "./lab.nrrd"}
    assert content["training"][1]["image"] == "/elsewhere/i.nii.gz"
    assert content["numTraining"] == 2
    assert dataset_json_path(tmp_path) == path == dataset_json_path(path)
    assert read_dataset_labels(tmp_path) == {1: "liver", 2: "spleen"}


def test_dataset_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dataset.json found"):
        read_dataset_labels(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_dataset_labels(tmp_path)
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(ValueError, match='has no "labels"'):
        read_dataset_labels(tmp_path)


def test_sample_dataset_labels():
    labels = read_dataset_labels(REPO / "ContrastiveSegLib" / "sample_data")
    assert labels[1] == "spleen" and labels[5] == "liver" and 0 not in labels


@pytest.mark.parametrize("table, expected", [
    ({"0": "background", "1": "liver"}, {1: "liver"}),
    ({"background": 0, "liver": 1, "spleen": "2"}, {1: "liver", 2: "spleen"}),
    ({3: "Kidney Left"}, {3: "Kidney Left"}),
    (["liver", "spleen"], {1: "liver", 2: "spleen"}),
    ("liver, spleen", {1: "liver", 2: "spleen"}),
    (None, {}),
])
def test_normalize_label_table(table, expected):
    assert normalize_label_table(table) == expected


def test_names_and_colours():
    assert canonical_organ_name(" Kidney-Left ") == "kidney_left"
    assert parse_organ_list("Liver, spleen ,liver,, background") == ["liver", "spleen"]
    assert organ_color("Liver") == (220, 130, 100)
    assert organ_color("liver", {"LIVER": [1, 2, 3]}) == (1, 2, 3)
    assert organ_color("vertebrae_L1") == organ_color("Vertebrae L1")  # stable, from the name
    assert all(0 <= c <= 255 for c in organ_color("some new organ"))
    with pytest.raises(ValueError):
        normalize_label_table({"liver": "x"})


def test_requirements(tmp_path):
    shipped = read_requirements(REPO / "ContrastiveSeg" / "Resources" / "requirements.txt")
    assert shipped and all(">=" in line for line in shipped), "every requirement needs a minimum version"
    names = [split_requirement(line)[0].lower() for line in shipped]
    assert "torch" not in names and "simpleitk" not in names and "numpy" not in names
    assert split_requirement("monai[nibabel]>=1.3.0") == ("monai", "1.3.0")
    assert split_requirement("tqdm") == ("tqdm", None)
    with pytest.raises(ValueError):
        split_requirement("monai==1.3")
    assert version_at_least("2.1.0+cpu", "2.0") and not version_at_least("1.13.1", "2.0")
    assert version_at_least("1.10", "1.9")
    assert missing_requirements(["pytest>=1.0", "surely-not-installed-package>=1"]) == ["surely-not-installed-package>=1"]
    assert missing_requirements(["pytest>=999"]) == ["pytest>=999"]
