"""Engine events (docs/run-folder.md) folded into the progress the GUI shows."""

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ContrastiveSeg"))

from ContrastiveSegJob.events import (  # noqa: E402
    ProgressState,
    format_duration,
    is_progress_bar,
    parse_event_line,
    split_event_line,
)


def line(**fields) -> str:
    return json.dumps(fields, separators=(",", ":"))


@pytest.mark.parametrize("text, is_event", [
    ('{"event":"step","time":1.0,"step":3}', True),
    ('  {"event": "start"}  \n', True),
    ("Epoch 1: 100%|#####| 5/5 [00:01<00:00]", False),
    ('{"not_an_event": 1}', False),
    ('{"event": 3}', False),
    ("{broken json", False),
    ('finetune:  33%|###       | 1/3 [00:00<00:00]{"event":"step","step":2}', True),
    ('{"event":"step"} trailing text', False),
    ('[{"event":"step"}]', False),
    ("", False),
])
def test_parse_event_line(text, is_event):
    assert (parse_event_line(text) is not None) == is_event


def test_an_event_glued_to_a_progress_bar_is_found():
    """stderr is merged into stdout and the bar redraws with "\\r" only, so an event can follow it on one line."""
    bar = "finetune:  67%|######6   | 2/3 [00:00<00:00,  4.17step/s, loss=1.8810]"
    text, event = split_event_line(bar + '{"event":"step","time":1.5,"step":3,"total":3,"loss":1.78}')
    assert text == bar and event == {"event": "step", "time": 1.5, "step": 3, "total": 3, "loss": 1.78}
    assert is_progress_bar(bar) and is_progress_bar("preprocessing: 100%|##########| 1/1 [00:00<00:00]")
    assert not is_progress_bar("warning: no validation cases") and not is_progress_bar("Dice 100% | great")
    assert split_event_line("plain log line") == ("plain log line", None)
    assert split_event_line('a {"x": 1} b {"event": "start"}') == ('a {"x": 1} b', {"event": "start"})


def test_a_finetune_run_from_start_to_finish():
    state = ProgressState.for_phases(["finetune"], ["/out/finetune"])
    assert state.fraction() == 0.0 and state.status_text() == "Starting..."
    state.begin_phase(0)
    assert state.apply(parse_event_line(line(event="start", time=1, command="finetune", run_dir="/out/finetune",
                                             total_steps=200, start_step=0, device="cpu", world_size=1,
                                             labels=["liver", "spleen"])))
    assert state.device == "cpu" and state.organs == ["liver", "spleen"]
    state.apply(parse_event_line(line(event="step", time=2, step=50, total=200, loss=0.8, lr=1e-4, steps_per_s=2.0,
                                      eta_s=75.0, losses={"dice": 0.5, "ce": 0.3})))
    assert state.percent() == 25
    assert state.loss == 0.8 and state.losses == {"dice": 0.5, "ce": 0.3}
    assert state.status_text() == "finetune: step 50 / 200 \u00b7 loss 0.8 \u00b7 ETA 1 min 15 s \u00b7 cpu"
    state.apply(parse_event_line(line(event="validation", time=3, step=50, dice={"liver": 0.91, "spleen": None},
                                      mean_dice=0.91, best=True)))
    assert state.dice_rows() == [{"organ": "liver", "dice": 0.91}, {"organ": "spleen", "dice": None}]
    assert state.best_mean_dice == 0.91 and state.best_step == 50
    state.apply(parse_event_line(line(event="validation", time=4, step=100, dice={"liver": 0.85}, mean_dice=0.85,
                                      best=False)))
    assert state.best_mean_dice == 0.91 and state.mean_dice == 0.85
    state.apply(parse_event_line(line(event="checkpoint", time=5, step=100, path="checkpoints/best.pt", kind="best")))
    assert state.checkpoints == {"best": "checkpoints/best.pt"}
    state.apply(parse_event_line(line(event="finished", time=6, step=200, stopped=False, best_mean_dice=0.93,
                                      seconds=100.0)))
    assert state.finished and not state.stopped and state.fraction() == 1.0 and state.best_mean_dice == 0.93


def test_resumed_run_starts_at_its_start_step():
    state = ProgressState.for_phases(["finetune"])
    state.begin_phase(0)
    state.apply({"event": "start", "total_steps": 100, "start_step": 40})
    assert state.percent() == 40


def test_two_phases_are_weighted_by_their_steps():
    state = ProgressState.for_phases(["pretrain", "finetune"])
    state.begin_phase(0)
    state.apply({"event": "start", "total_steps": 300})
    state.apply({"event": "step", "step": 150, "total": 300, "loss": 1.0})
    assert state.fraction() == pytest.approx(150 / 600)  # the unknown second phase counts like the first
    state.end_phase()
    state.begin_phase(1)
    assert state.loss is None  # per-run values reset
    state.apply({"event": "start", "total_steps": 100})
    state.apply({"event": "step", "step": 50, "total": 100, "loss": 0.5})
    assert state.fraction() == pytest.approx(350 / 400)
    assert state.status_text().startswith("finetune (2/2): step 50 / 100")


def test_stop_error_warning_and_unknown_events():
    state = ProgressState.for_phases(["finetune"])
    state.begin_phase(0)
    state.apply({"event": "start", "total_steps": 100})
    state.apply({"event": "finished", "step": 10, "stopped": True, "best_mean_dice": None})
    assert state.stopped and not state.phase.finished
    assert not state.apply({"event": "round", "round": 2})  # later methods add events: ignored
    assert not state.apply({"event": "message", "level": "info", "text": "hello"})
    assert state.apply({"event": "message", "level": "warning", "text": "low memory"})
    assert state.warnings == ["low memory"]
    assert state.apply({"event": "error", "message": "data/x.nii.gz: not found", "kind": "input"})
    assert state.error_message == "data/x.nii.gz: not found" and state.error_kind == "input"


def test_bad_values_do_not_break_the_state():
    state = ProgressState.for_phases(["finetune"])
    state.begin_phase(0)
    state.apply({"event": "step", "step": "x", "total": None, "loss": "nan", "eta_s": True})
    assert state.loss is None and state.eta_seconds is None and state.fraction() == 0.0


@pytest.mark.parametrize("seconds, text", [
    (None, "unknown"), (-1, "unknown"), (math.nan, "unknown"), (0, "0 s"), (59.4, "59 s"), (95, "1 min 35 s"),
    (3725, "1 h 02 min"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
