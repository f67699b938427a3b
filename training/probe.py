"""A probe: ten real training steps of the planned run, to measure its speed on this machine (`backprop plan --probe`).

It runs as an ordinary governed job, in a throwaway home (no registry row, checkpoint or adapter is kept), and
reports the median tokens/s of its steps after the first (which warms up kernels and caches).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from training.errors import BackpropError

PROBE_STEPS = 10


def probe_throughput(settings: Any, data: str, *, fmt: str | None = None) -> tuple[float, str]:
    """Median training tokens/s of `settings` on `data` over PROBE_STEPS steps, and a source line saying so."""
    from training import jobs
    from training.config import fill_unset
    from training.runs import Registry

    with tempfile.TemporaryDirectory(prefix="backprop-probe-") as home:
        probe = fill_unset(settings.model_copy(update={"home": Path(home)}), {}, mark_set=True)
        training = probe.training.model_copy(update={"steps": PROBE_STEPS, "save_every": 0, "eval_every": 0,
                                                     "validation_split": 0.0, "report_to": "none"})  # fmt: skip
        probe = probe.model_copy(update={"training": training, "max_run_minutes": 0})
        run = jobs.submit_train(probe, data, fmt=fmt, plan=False, name="probe")
        speeds, failed = [], None
        for event in jobs.follow(Registry(Path(home)), run.id):
            if event.get("event") == "step" and event.get("tokens_per_s"):
                speeds.append(float(event["tokens_per_s"]))
            elif event.get("event") == "failed":
                failed = event
    if failed is not None:
        raise BackpropError(failed.get("code") or "RUNTIME_TRAINING_FAILED", message=f"the probe run failed: "
                            f"{failed.get('message')}", reason=failed.get("message"))  # fmt: skip
    if not speeds:
        raise BackpropError("RUNTIME_TRAINING_FAILED", reason="the probe run made no step")
    speed = statistics.median(speeds[1:] or speeds)
    return speed, f"measured: a {len(speeds)}-step probe run"
