"""Experiment tracking's cost: the same training job with all three trackers on, and with tracking off.

Each round trains the demo model on the demo dataset in a real worker process twice: once with
`--report-to tensorboard,mlflow,wandb` (TensorBoard in the run folder, MLflow in a local file store, W&B offline)
and once with `none`. The order alternates between rounds so that a machine warming up or slowing down does not
favour one side. Printed: each job's throughput (tokens / step time, summed over the steps after warm-up), the
median per side, and their ratio (target >= 0.98). The trackers run on the worker's own thread and in W&B's own
process, so what they can cost a step is CPU (and the GIL) taken from the training loop.

Run: .venv/bin/python benchmarks/tracking_overhead.py [--rounds 3] [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WARM_UP_STEPS = 20


def one_job(report_to: str, steps: int) -> float:
    """Tokens/s of one job after warm-up; the job must end completed with its trackers intact."""
    from training import jobs
    from training.config import load_settings, nest_options
    from training.runs import Registry

    settings = load_settings(**nest_options({"model": "demo", "steps": steps, "save_every": 0, "max_run_minutes": 0,
                                             "report_to": report_to}))  # fmt: skip
    run = jobs.submit_train(settings, str(ROOT / "assets" / "demo" / "capitals.jsonl"))
    tokens, seconds = 0, 0.0
    for event in jobs.follow(Registry(settings.home), run.id):
        if event["event"] == "step" and event["step"] > WARM_UP_STEPS:
            tokens += event["tokens"]
            seconds += event["tokens"] / event["tokens_per_s"]
        if event.get("code") == "DEP_TRACKER_FAILED":
            raise SystemExit(f"a tracker failed, the comparison would be unfair: {event['message']}")
    status = Registry(settings.home).get(run.id).status
    if status != "completed":
        raise SystemExit(f"run {run.id} ended {status}")
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="backprop-bench-")
    os.environ.update(BACKPROPAGATE_HOME=home, BACKPROPAGATE_MIN_FREE_RAM_GB="0.25", BACKPROPAGATE_MAX_CPU_PERCENT="100",
                      MLFLOW_TRACKING_URI=Path(home, "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true",
                      WANDB_MODE="offline")  # fmt: skip
    all_three = "tensorboard,mlflow,wandb"
    on, off = [], []
    for round_index in range(args.rounds):
        order = [all_three, "none"] if round_index % 2 == 0 else ["none", all_three]
        for report_to in order:
            rate = one_job(report_to, args.steps)
            (on if report_to != "none" else off).append(rate)
            print(f"round {round_index + 1}: trackers {'on ' if report_to != 'none' else 'off'} {rate:8.1f} tokens/s", flush=True)
    tracked, untracked = statistics.median(on), statistics.median(off)
    print()
    print(f"median tokens/s   trackers on {tracked:.1f}   trackers off {untracked:.1f}")
    print(f"ratio on/off      {tracked / untracked:.4f}   (target >= 0.98; cost {100 * (1 - tracked / untracked):+.2f}%)")


if __name__ == "__main__":
    main()
