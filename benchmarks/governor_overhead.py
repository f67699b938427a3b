"""The governor's cost: the same training job with and without the telemetry watcher.

Each round trains the demo model on the demo dataset in a real worker process twice: once with the watcher
sampling telemetry every second (the default, which also guards the GPU temperature) and once with it off
(`telemetryIntervalS: 0`, heartbeat only). The order alternates between rounds so that a machine warming up
or slowing down does not favour one side. Printed per side: the median over rounds of each job's throughput
(tokens / step time, summed over the steps after warm-up), and the watcher's own CPU time as a share of one
core (measured by the worker with thread CPU time). On a small shared machine the job-to-job spread is larger
than the watcher's cost; the CPU share is the direct measurement.

Run: .venv/bin/python benchmarks/governor_overhead.py [--rounds 3] [--steps 300]
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


def one_job(interval: float, steps: int) -> tuple[float, float | None]:
    """Tokens/s of one job (after warm-up), and the watcher's share of one core (None when off)."""
    from training import jobs
    from training.config import load_settings, nest_options
    from training.runs import Registry

    settings = load_settings(**nest_options({"model": "demo", "steps": steps, "save_every": 0,
                                             "telemetry_interval_s": interval, "max_run_minutes": 0}))  # fmt: skip
    run = jobs.submit_train(settings, str(ROOT / "assets" / "demo" / "capitals.jsonl"))
    tokens, seconds, share = 0, 0.0, None
    for event in jobs.follow(Registry(settings.home), run.id):
        if event["event"] == "step" and event["step"] > 20:  # after warm-up
            tokens += event["tokens"]
            seconds += event["tokens"] / event["tokens_per_s"]
        if event["event"] == "log" and "cpu_seconds" in event:
            share = 100 * event["cpu_seconds"] / event["wall_seconds"]
    return tokens / seconds, share


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="backprop-bench-")
    os.environ.update(BACKPROPAGATE_HOME=home, BACKPROPAGATE_MIN_FREE_RAM_GB="0.25", BACKPROPAGATE_MAX_CPU_PERCENT="100")

    on, off, shares = [], [], []
    for round_index in range(args.rounds):
        order = [1.0, 0.0] if round_index % 2 == 0 else [0.0, 1.0]
        for interval in order:
            rate, share = one_job(interval, args.steps)
            (on if interval else off).append(rate)
            if share is not None:
                shares.append(share)
            print(f"round {round_index + 1}: watcher {'on ' if interval else 'off'} {rate:8.1f} tokens/s"
                  + (f"   watcher CPU {share:.3f}% of one core" if share is not None else ""), flush=True)  # fmt: skip
    with_watcher, without = statistics.median(on), statistics.median(off)
    print()
    print(f"median tokens/s   watcher on {with_watcher:.1f}   watcher off {without:.1f}")
    print(f"ratio on/off      {with_watcher / without:.4f}   (cost {100 * (1 - with_watcher / without):+.2f}%)")
    print(f"watcher CPU       {statistics.median(shares):.3f}% of one core (median over {len(shares)} jobs)")


if __name__ == "__main__":
    main()
