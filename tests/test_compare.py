"""`backprop compare`: real runs side by side, from their events and the registry."""

from __future__ import annotations

import json

from tests.conftest import backprop
from training.events import read_events


def train(lr: str) -> dict:
    result = backprop("train", "--model", "demo", "--steps", "6", "--lr", lr, "--report-to", "none", "--json", check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_compare_json_gives_each_runs_curves_and_marks_the_learning_rate_as_differing(home):
    runs = [train(lr) for lr in ("1e-3", "3e-3", "1e-2")]
    ids = [r["run_id"] for r in runs]
    result = backprop("compare", *ids, "--json", check=True)
    compared = json.loads(result.stdout)
    assert [r["id"] for r in compared["runs"]] == ids
    for run, row in zip(runs, compared["runs"], strict=True):
        events, _ = read_events(home / "runs" / run["run_id"] / "events.jsonl")
        steps = [e for e in events if e["event"] == "step"]
        assert row["train"] == [[e["step"], e["loss"]] for e in steps]
        assert row["tokens_per_s_curve"] == [[e["step"], e["tokens_per_s"]] for e in steps]
        assert row["status"] == "completed" and row["steps"] == 6 and row["final_loss"] == run["final_loss"]
        assert row["duration_s"] > 0 and row["tokens_per_s"] > 0
    assert compared["differing"] == ["learning_rate"]
    lr = next(p for p in compared["params"] if p["name"] == "learning_rate")
    assert lr["values"] == [1e-3, 3e-3, 1e-2] and lr["differs"]
    assert compared["max_step"] == 6
    assert [row["step"] for row in compared["chart"]["train"]] == list(range(1, 7))
    assert set(compared["chart"]["train"][0]) == {"step", *ids}

    text = backprop("compare", *ids, check=True, env={"COLUMNS": "160"}).stdout
    assert "train loss" in text and "learning_rate" in text and "parameters that differ" in text
    assert all(run_id in text for run_id in ids)


def test_compare_refuses_one_or_seven_runs_and_unknown_ids_with_coded_errors(home):
    one = backprop("compare", "abc")
    assert one.returncode == 1 and "[INPUT_COMPARE_RUN_COUNT]" in one.stderr and "1 given" in one.stderr
    seven = backprop("compare", *[f"r{i}" for i in range(7)])
    assert seven.returncode == 1 and "[INPUT_COMPARE_RUN_COUNT]" in seven.stderr and "7 given" in seven.stderr
    unknown = backprop("compare", "nosuchrun1", "nosuchrun2")
    assert unknown.returncode == 1 and "[INPUT_RUN_NOT_FOUND]" in unknown.stderr
