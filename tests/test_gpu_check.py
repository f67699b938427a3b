"""The GPU check's dry run: the same code paths as on an H100, with tiny shapes on CPU, so the script cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_the_gpu_check_dry_run_races_every_contestant_it_can_and_says_why_it_skips_the_rest(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "BACKPROPAGATE_MIN_FREE_RAM_GB": "0.25"}  # a CI machine's RAM is small, and busy
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", str(out), "--cpu-dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    race = {row["contestant"]: row for row in results["race"]}

    # Everything that runs on CPU trained for real on the same data: useful tokens, steps and a loss.
    for name in ("plain HF Trainer + peft (sdpa, padded, length-grouped)", "TRL SFTTrainer (padding-free packing)", "Backprop"):
        row = race[name]
        assert "error" not in row, row
        assert row["tokens_per_s"] > 0 and row["steps"] > 0 and row["final_loss"] > 0 and 0 < row["mfu"] < 1
    assert race["plain HF Trainer + peft (sdpa, padded, length-grouped)"]["tokens"] == race["Backprop"]["tokens"]

    # What needs CUDA is skipped, line by line, saying so.
    for name in ("Backprop + liger kernels", "Backprop + unsloth", "Unsloth (FastLanguageModel + TRL SFTTrainer, packing)"):
        assert "needs CUDA" in race[name]["skipped"]
    sections = results["sections"]
    for name in ("automatic batch size", "OOM recovery", "pytest -m gpu", "QLoRA 4-bit"):
        assert "needs CUDA" in sections[name]["skipped"], sections[name]

    # The run's events held telemetry; its adapter went out in parts and came back as a GGUF that llama.cpp verified.
    assert sections["telemetry"]["telemetry events"] > 0
    assert sections["adapter to bring back"]["parts"] == ["adapter.tar.00"]
    gguf = sections["GGUF export + llama.cpp (here)"]
    assert gguf["base fingerprint matches"] is True and gguf["llama.cpp verified"] is True, gguf

    table = (out / "table.md").read_text()
    assert "| Backprop |" in table and "needs CUDA" in table
    # The plan's memory estimate of the Backprop run stands beside the run's measured peak (here: resident memory).
    backprop_row = race["Backprop"]
    assert backprop_row["plan_estimate_mb"] > 0 and backprop_row["peak_rss_mb"] > 0
    assert "| plan estimate GiB |" in table

    # Parts run on separate machines make one table.
    merged = tmp_path / "merged"
    subprocess.run([sys.executable, "benchmarks/gpu_check.py", str(merged), "--merge", str(out), str(out)], cwd=ROOT,
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    assert len(json.loads((merged / "results.json").read_text())["race"]) == 2 * len(results["race"])
