"""Runs side by side: their loss curves on one step axis, their parameters (the differing ones marked), their results.

`compare_runs(registry, ids)` returns a plain dict for `backprop compare --json`, its terminal view and the web app.
Curves come from each run's events.jsonl, so runs started from the CLI, the library or the browser compare alike.
A multi-run is compared by its own events: its children's steps relayed on one axis across the whole multi-run
(child i's step s is step (i-1)*steps_per_run + s), its final loss the average eval loss over its tasks, plus BWT;
to compare single children, pass their ids.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from training.errors import BackpropError
from training.events import read_events
from training.runs import Registry, RunRecord

MIN_RUNS, MAX_RUNS = 2, 6
MARKERS = ("●", "x", "o", "+", "*", "#")  # one per run, in order (the terminal chart and its legend)


def compare_runs(registry: Registry, run_ids: list[str]) -> dict[str, Any]:
    """2-6 runs (ids or unambiguous prefixes) compared. INPUT_COMPARE_RUN_COUNT for fewer or more (a repeated id counts
    once); INPUT_RUN_NOT_FOUND / INPUT_RUN_AMBIGUOUS for an id that names no run or several.

    Returns {"runs": [per run: id, name, label, kind, status, model, dataset, dataset_sha256, marker, steps, max_steps,
    final_loss, eval_loss, tokens_per_s (median over steps), duration_s, bwt (multi-runs), and its curves: train
    [[step, loss]], eval [[step, eval_loss]], tokens_per_s_curve [[step, tokens/s]]], "params": [{"name", "values" (one
    per run, None where a run lacks it), "differs"}], "differing": [param names], "max_step": int, "chart": {"train",
    "eval", "tokens_per_s": rows [{"step": s, <run id>: value or absent}] for charting libraries that want one table}}."""
    wanted = list(dict.fromkeys(run_ids))
    if not MIN_RUNS <= len(wanted) <= MAX_RUNS:
        raise BackpropError("INPUT_COMPARE_RUN_COUNT", count=len(wanted))
    records = [registry.get(run_id) for run_id in wanted]
    if len({r.id for r in records}) != len(records):  # two prefixes of one run
        raise BackpropError("INPUT_COMPARE_RUN_COUNT", count=len({r.id for r in records}))
    runs = [_run_summary(record, MARKERS[i]) for i, record in enumerate(records)]
    params = _param_table(records)
    return {
        "runs": runs,
        "params": params,
        "differing": [p["name"] for p in params if p["differs"]],
        "max_step": max((point[0] for r in runs for point in r["train"]), default=0),
        "chart": {key: chart_rows(runs, key) for key in ("train", "eval", "tokens_per_s_curve")},
    }


def run_curves(run_dir: Path) -> dict[str, list[list[float]]]:
    """A run's train loss, eval loss and tokens/s by step, from its events (a resumed run's repeated steps: the later
    wins)."""
    events, _ = read_events(Path(run_dir) / "events.jsonl")
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    speed: dict[int, float] = {}
    for e in events:
        if e["event"] == "step" and e.get("loss") is not None:
            train[int(e["step"])] = e["loss"]
            if e.get("tokens_per_s") is not None:
                speed[int(e["step"])] = e["tokens_per_s"]
        elif e["event"] == "eval" and e.get("eval_loss") is not None:
            evals[int(e["step"])] = e["eval_loss"]
    return {name: [[s, v[s]] for s in sorted(v)] for name, v in (("train", train), ("eval", evals), ("tokens_per_s", speed))}


def chart_rows(runs: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """One row per step that any run has: {"step": s, run_id: value, ...} (runs without that step are left out)."""
    rows: dict[int, dict[str, Any]] = {}
    for run in runs:
        for step, value in run[key]:
            rows.setdefault(int(step), {"step": int(step)})[run["id"]] = value
    return [rows[s] for s in sorted(rows)]


def _run_summary(run: RunRecord, marker: str) -> dict[str, Any]:
    curves = run_curves(run.path)
    end = run.ended_at or (time.time() if run.started_at else None)
    speeds = [v for _, v in curves["tokens_per_s"][1:] or curves["tokens_per_s"]]  # the first step warms up
    final_loss = run.final_loss if run.final_loss is not None else (curves["train"][-1][1] if curves["train"] else None)
    summary = {
        "id": run.id, "name": run.name, "label": run.name or run.id, "kind": run.kind, "status": run.status,
        "model": run.model, "dataset": Path(run.dataset).name if run.dataset else None, "dataset_sha256": run.dataset_sha256,
        "marker": marker, "steps": run.step, "max_steps": run.max_steps, "final_loss": final_loss,
        "eval_loss": run.eval_loss if run.eval_loss is not None else (curves["eval"][-1][1] if curves["eval"] else None),
        "tokens_per_s": round(statistics.median(speeds), 1) if speeds else None,
        "duration_s": round(end - run.started_at, 1) if end and run.started_at else None,
        "train": curves["train"], "eval": curves["eval"], "tokens_per_s_curve": curves["tokens_per_s"],
    }  # fmt: skip
    if run.kind == "multi-run":
        completed = [e for e in read_events(run.path / "events.jsonl")[0] if e["event"] == "completed"]
        summary["bwt"] = completed[-1].get("bwt") if completed else None
    return summary


def _param_table(records: list[RunRecord]) -> list[dict[str, Any]]:
    """Every parameter any run has (first seen first), the dataset and its hash too; `differs` when the values differ."""
    columns = [{**r.params, "dataset": Path(r.dataset).name if r.dataset else None, "dataset_sha256": r.dataset_sha256}
               for r in records]  # fmt: skip
    names = list(dict.fromkeys(name for column in columns for name in column))
    table = []
    for name in names:
        values = [column.get(name) for column in columns]
        table.append({"name": name, "values": values, "differs": len({json.dumps(v, sort_keys=True) for v in values}) > 1})
    return table


def format_number(value: float | None, fmt: str = ".4f") -> str:
    """How a comparison shows a number, in the terminal and on the compare page alike."""
    return format(value, fmt) if value is not None else "-"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def format_value(value: object) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else json.dumps(value)
