"""`torchrun ... -m training.rank RUN_DIR`: one rank of a distributed training run (the worker launches torchrun).

Rank 0 writes the run (events, registry, checkpoints, adapter) and reads stop and pause from the worker through
RUN_DIR/control.json; the other ranks write nothing to the run, their output goes to RUN_DIR/rank-N.log. SIGTERM is
left at its default: torchrun sends it to every rank when one of them has died, and then the run is `interrupted`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from training.config import load_settings
from training.control import Control
from training.distributed import World
from training.errors import BackpropError
from training.events import EventWriter, read_events
from training.runs import Registry
from training.tracking import Tracking

OOM_AT_ENV = "BACKPROP_TEST_OOM_AT"


class _Silent:
    """The events of a rank other than 0: nothing is written."""

    def emit(self, event: str, durable: bool = False, **fields: Any) -> dict[str, Any]:
        return {"event": event, **fields}

    def close(self) -> None:
        pass


class _ReadOnly:
    """The registry as a rank other than 0 sees it: it reads, it never writes."""

    WRITES = ("update", "add_checkpoint", "remove_checkpoint", "create", "claim_for_resume")

    def __init__(self, registry: Registry):
        self._registry = registry

    def __getattr__(self, name: str) -> Any:
        if name in self.WRITES:
            return lambda *args, **kwargs: None
        return getattr(self._registry, name)


def main(argv: list[str] | None = None) -> int:
    run_dir = Path((argv or sys.argv[1:])[0]).resolve()
    world = World.from_env()
    if not world.is_main:
        log = os.open(run_dir / f"rank-{world.rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
    spec = json.loads((run_dir / "spec.json").read_text())
    registry = Registry(Path(spec.get("home") or run_dir.parent.parent))
    run = registry.get(spec["id"])
    settings = load_settings(**spec.get("settings", {}), home=spec.get("home"))
    control = Control()
    control.time_box_s = settings.max_run_minutes * 60 or None  # rank 0's clock; it starts at the first step
    control.before_forward = _injected_oom(world.rank)
    from training.trainer import run_training

    run_rank_0 = world.is_main and settings.distributed.node_rank == 0  # RANK counts over every machine
    tracking = Tracking.for_run(run, registry, settings, rank=0 if run_rank_0 else -1)  # the run's experiment trackers
    follower = None
    if run_rank_0:
        events: Any = EventWriter(run_dir / "events.jsonl", also=tracking.feed)
        tracking.attach(events.emit)
        view: Any = registry
        follower = _TelemetryFollower(run_dir / "events.jsonl", tracking) if tracking.thread is not None else None
    else:
        events, view = _Silent(), _ReadOnly(registry)
    try:
        result = run_training(run, view, control=control, events=events, world=world)
        # Every rank waits here until rank 0 has recorded the run's end: a rank that left first and died on its way
        # out would make torchrun take rank 0 down before its final checkpoint and status are written.
        _barrier()
    except BackpropError:
        return 1  # rank 0 has recorded the coded error
    finally:
        if follower is not None:
            follower.close()
        tracking.close()
        events.close()
        _leave_group()
    return 0 if result.status in ("completed", "stopped", "timeboxed") else 1


class _TelemetryFollower:
    """The worker (the ranks' agent) samples CPU and GPUs and writes `telemetry` events into the run's events.jsonl;
    the run's experiment trackers live here, in rank 0, which follows the file and hands them those events."""

    def __init__(self, path: Path, tracking: Tracking):
        self.path, self.tracking, self.offset = path, tracking, 0
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="backprop-telemetry-follower", daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        while not self.finished.wait(1.0):
            self._read()
        self._read()

    def _read(self) -> None:
        events, self.offset = read_events(self.path, self.offset)
        for event in events:
            if event["event"] == "telemetry":
                self.tracking.feed(event)

    def close(self) -> None:
        self.finished.set()
        self.thread.join(10)


def _injected_oom(rank: int) -> Any:
    """Fault injection for the tests: OOM_AT_ENV="RANK:STEP" raises one torch.OutOfMemoryError in that rank's first
    forward pass of that step (as a GPU would), to prove that every rank recovers from it together."""
    at = os.environ.get(OOM_AT_ENV)
    if not at or int(at.split(":")[0]) != rank:
        return None
    step, fired = int(at.split(":")[1]), []

    def before_forward(at_step: int, index: int, rows: int) -> None:
        if at_step == step and not fired:
            import torch

            fired.append(True)
            raise torch.OutOfMemoryError(f"injected: CUDA out of memory on rank {rank}")

    return before_forward


def _barrier() -> None:
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.barrier()
    except Exception:  # a peer is gone already: what this rank had to write is written
        pass


def _leave_group() -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # leaving after a failure: the exit code already says what happened
        pass


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without running C++ destructors at interpreter exit: one of them sometimes aborts ("terminate called
    # without an active exception") after a clean run, and torchrun would report the rank as failed.
    os._exit(code)
