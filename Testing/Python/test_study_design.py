"""The study's design: paired subsets, arms, budget, the scored steps, leak checks."""

from __future__ import annotations

import os

import pytest

from ContrastiveSegLib.errors import InputError
from ContrastiveSegLib.study.design import (
    check_no_leak,
    checkpoint_steps,
    draw_subsets,
    parse_arm,
    parse_arms,
    parse_budget,
    parse_fractions,
    study_cells,
)

POOL = [f"ds/case_{i}" for i in range(6)]


def test_subsets_are_a_function_of_count_and_seed_only():
    first = draw_subsets(POOL, [1, 2, 4], [0, 1, 2], val_count=1)
    again = draw_subsets(list(reversed(POOL)), [4, 1, 2], [2, 0, 1], val_count=1)
    assert {k: (v.train_ids, v.val_ids) for k, v in first.items()} == \
           {k: (v.train_ids, v.val_ids) for k, v in again.items()}
    assert len({tuple(first[(1, seed)].train_ids) for seed in (0, 1, 2)}) > 1  # seeds draw different subsets


def test_subsets_of_a_seed_are_nested_and_never_hold_its_validation_cases():
    subsets = draw_subsets(POOL, [1, 2, 4], [0, 1, 2, 3], val_count=2)
    for seed in range(4):
        one, two, four = (set(subsets[(n, seed)].train_ids) for n in (1, 2, 4))
        assert one < two < four and len(four) == 4
        validation = set(subsets[(4, seed)].val_ids)
        assert len(validation) == 2 and not validation & four
        assert all(subsets[(n, seed)].val_ids == subsets[(4, seed)].val_ids for n in (1, 2))


def test_too_few_cases_for_the_largest_count_is_an_input_error():
    with pytest.raises(InputError, match="cannot give 6 training case"):
        draw_subsets(POOL, [6], [0], val_count=1)


def test_arms(tmp_path):
    run = tmp_path / "mixcl"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"x")
    last = str(run / "checkpoints" / "last.pt")
    assert parse_arm("scratch").kind == "scratch"
    assert parse_arm(f"mixcl={run}").checkpoint == last
    assert parse_arm(f"mixcl={last}").checkpoint == last
    arm = parse_arm(f"selftrain:init={run},rounds=1")
    assert (arm.kind, arm.checkpoint, arm.settings) == ("selftrain", last, ["rounds=1"])
    assert parse_arm("selftrain").checkpoint is None
    assert [a.name for a in parse_arms([f"gcl={run}"])] == ["scratch", "gcl"]
    with pytest.raises(InputError, match="without checkpoints/last.pt"):
        parse_arm(f"mixcl={tmp_path}")
    with pytest.raises(InputError):
        parse_arm("mixcl")
    with pytest.raises(InputError, match="given twice"):
        parse_arms(["scratch", "scratch"])


def test_budget_and_fractions():
    assert (parse_budget("steps=2000").kind, parse_budget("steps=2000").value) == ("steps", 2000)
    assert parse_budget("minutes=2.5").value == 2.5
    for bad in ("2000", "steps=0", "steps=1.5", "hours=1"):
        with pytest.raises(InputError):
            parse_budget(bad)
    assert parse_fractions("0.5,0.25") == [0.25, 0.5, 1.0]


def test_the_scored_steps_are_reached_by_the_checkpoint_interval():
    assert checkpoint_steps(200, [0.25, 0.5, 1.0], 200) == ([50, 100, 200], 50)
    # self-training, two stages of 100 steps: the interval also divides a stage
    assert checkpoint_steps(200, [0.3, 1.0], 100) == ([60, 200], 20)
    assert checkpoint_steps(4, [0.25, 0.5, 1.0], 4) == ([1, 2, 4], 1)


def test_cells_pair_every_arm_with_every_count_and_seed():
    arms = parse_arms(["scratch", "selftrain"])
    cells = study_cells(arms, [2, 1], [0, 1])
    assert [c.key for c in cells[:2]] == ["scratch_n1_seed0", "selftrain_n1_seed0"]
    assert len(cells) == 8 and len({c.key for c in cells}) == 8


def test_a_test_scan_among_the_unlabelled_scans_is_refused(tmp_path):
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    scan = folder / "scan.nii.gz"
    scan.write_bytes(b"x")
    with pytest.raises(InputError, match="--unlabeled"):
        check_no_leak({"pool/a": str(tmp_path / "a.nii.gz")}, {"test/scan": str(scan)}, [str(folder)])
    check_no_leak({"pool/a": str(tmp_path / "a.nii.gz")}, {"test/b": str(tmp_path / "b.nii.gz")}, [str(folder)])
    with pytest.raises(InputError, match="never to both"):
        check_no_leak({"pool/a": str(scan)}, {"test/a": os.path.join(str(folder), ".", "scan.nii.gz")})


def test_finetune_holds_no_case_out_when_the_study_sets_validation_aside():
    """With val_fraction 0 every given case trains (finetune alone holds a share out from 3 cases on)."""
    from ContrastiveSegLib.config import RunConfig
    from ContrastiveSegLib.data.catalog import Case
    from ContrastiveSegLib.finetune import split_cases

    cases = [Case(case_id, f"{case_id}.nii.gz", f"{case_id}_label.nii.gz", "ds") for case_id in POOL[:4]]
    config = RunConfig()
    train, validation = split_cases(config, cases, [])
    assert len(train) == 3 and len(validation) == 1
    config.data.val_fraction = 0.0
    train, validation = split_cases(config, cases, [])
    assert [c.case_id for c in train] == POOL[:4] and validation == []
