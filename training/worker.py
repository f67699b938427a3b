"""`python -m training.worker RUN_DIR`: run one job in its own process, governed.

Started by `training.jobs` in a new process group. In order: wait in the queue until the governor admits
the job, start the watcher (telemetry, heartbeat, pause while hot), run the job (a training run or a user's
script) under the time box, and leave its final status in the registry. SIGTERM or SIGINT asks for a
graceful stop: the job stops at its next step boundary with a checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from training.config import Settings, load_settings
from training.control import Control, listen
from training.errors import BackpropError
from training.events import EventWriter
from training.governor import Watcher, cuda_memory_fraction, wait_for_admission
from training.runs import Registry, RunRecord
from training.telemetry import Telemetry
from training.tracking import Tracking

EXIT_BY_STATUS = {"completed": 0, "stopped": 130, "timeboxed": 3, "failed": 2}


def main(argv: list[str] | None = None) -> int:
    run_dir = Path((argv or sys.argv[1:])[0]).resolve()
    spec = json.loads((run_dir / "spec.json").read_text())
    registry = Registry(Path(spec.get("home") or run_dir.parent.parent))
    run = registry.get(spec["id"])
    settings = load_settings(**spec.get("settings", {}), home=spec.get("home"))
    control = Control()
    signal.signal(signal.SIGTERM, lambda *_: control.request_stop())
    signal.signal(signal.SIGINT, lambda *_: control.request_stop())
    listen(run_dir, control, run.queued_at or 0.0)  # from now on a stop comes as SIGTERM; one asked for before is taken here
    registry.update(run.id, pid=os.getpid(), heartbeat=time.time())

    # Experiment trackers (training/tracking.py) read the run's events on their own thread. A distributed run's rank 0
    # writes its training events in a process of its own and tracks them there (training/rank.py), not here.
    from training.distributed import is_distributed

    tracked_here = not (run.kind == "train" and is_distributed(settings))
    tracking = Tracking.for_run(run, registry, settings, rank=0 if tracked_here else -1)
    events = EventWriter(run_dir / "events.jsonl", also=tracking.feed)
    tracking.attach(events.emit)
    try:
        return _govern(run, registry, spec, settings, control, events)
    finally:
        tracking.close()
        events.close()


def _govern(run: RunRecord, registry: Registry, spec: dict, settings: Settings, control: Control, events: EventWriter) -> int:
    telemetry = Telemetry(settings.gpu.probe, settings.telemetry_file)
    if telemetry.note:
        events.emit("log", level="info", message=telemetry.note)
    try:
        admission = wait_for_admission(
            registry, run.id, settings, telemetry, control, on_queued=lambda reason: events.emit("queued", reason=reason)
        )
    except BackpropError as exc:  # a job this machine can never take: say so instead of waiting for ever
        registry.update(run.id, status="failed", reason=None, ended_at=time.time(), error_code=exc.code,
                        error_message=exc.message[:500])  # fmt: skip
        events.emit("failed", durable=True, code=exc.code, message=exc.message, hint=exc.hint)
        return EXIT_BY_STATUS["failed"]
    if admission is None:
        registry.update(run.id, status="stopped", reason=None, ended_at=time.time())
        events.emit("log", durable=True, level="warning", message="stopped while queued")
        return EXIT_BY_STATUS["stopped"]
    # The processes to start here: 'auto' becomes the number of GPUs admitted (one process each).
    settings.distributed.nproc = admission.nproc
    if admission.gpus:
        # Only the chosen GPUs are visible to the job (rank i uses the i-th); set before anything imports torch.
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g.index) for g in admission.gpus)
        totals = [g.mem_total for g in admission.gpus if g.mem_total]
        fraction = cuda_memory_fraction(settings.gpu_memory_limit, max(totals) if totals else None)
        if fraction is not None:
            os.environ["BACKPROP_GPU_MEMORY_FRACTION"] = f"{fraction:.4f}"
    # Jobs running side by side share the cores instead of oversubscribing them (set before torch is imported).
    # On CPU every job slot may run nproc processes; on GPUs a slot is one GPU and one process.
    processes = max(settings.max_parallel, admission.nproc) if admission.gpus else settings.max_parallel * admission.nproc
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    # The time box counts training, not start-up: the job starts the clock at its first step (Control.start_clock).
    control.time_box_s = settings.max_run_minutes * 60 or None

    watcher = Watcher(
        telemetry, settings, control, events.emit,
        heartbeat=lambda: registry.update(run.id, heartbeat=time.time()),
        gpu_indices=[g.index for g in admission.gpus],
    )  # fmt: skip
    watcher.start()
    started = time.monotonic()
    try:
        status = _run_job(run, registry, spec, settings, control, events)
    except BackpropError:
        traceback.print_exc()  # the worker log keeps the traceback; the registry and events have the code
        status = "failed"
    finally:
        watcher.stop()
        seconds = time.monotonic() - started
        if watcher.samples:
            share = 100 * watcher.cpu_seconds / max(seconds, 1e-9)
            message = f"telemetry: {watcher.samples} samples, {watcher.cpu_seconds * 1000:.0f} ms CPU in {seconds:.0f} s"
            events.emit("log", level="info", message=f"{message} ({share:.2f}% of one core)", samples=watcher.samples,
                        cpu_seconds=round(watcher.cpu_seconds, 4), wall_seconds=round(seconds, 2))  # fmt: skip
    return EXIT_BY_STATUS.get(status, 2)


def _run_job(run: RunRecord, registry: Registry, spec: dict, settings: Settings, control: Control, events: EventWriter) -> str:
    if run.kind == "script":
        from training.script_run import run_script

        return run_script(registry.get(run.id), registry, spec, settings, control, events)
    if run.kind == "multi-run":
        _cap_cuda_memory()
        from training.multi_run import run_multi_run

        return run_multi_run(registry.get(run.id), registry, control, events)
    if run.kind == "train":
        from training.distributed import is_distributed, run_ranks

        if is_distributed(settings):  # torchrun starts one process a rank; this worker is their agent
            return run_ranks(registry.get(run.id), registry, settings, control, events)
        _cap_cuda_memory()
        from training.trainer import run_training

        return run_training(registry.get(run.id), registry, control=control, events=events).status
    raise BackpropError("STATE_NOT_RESUMABLE", run_id=run.id, reason=f"unknown job kind '{run.kind}'")


def _cap_cuda_memory() -> None:
    fraction = os.environ.get("BACKPROP_GPU_MEMORY_FRACTION")
    if not fraction:
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(float(fraction), 0)


if __name__ == "__main__":
    sys.exit(main())
