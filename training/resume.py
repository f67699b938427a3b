"""Continue a run that ended early (interrupted, time-boxed, stopped, failed) from its last checkpoint."""

from __future__ import annotations

from training.errors import BackpropError
from training.events import EventSink
from training.runs import ACTIVE, RESUMABLE, Registry
from training.trainer import Control, TrainResult, run_training


def resume_run(
    registry: Registry, run_id: str, *, control: Control | None = None, on_event: EventSink | None = None
) -> TrainResult:
    run = registry.get(run_id)
    if run.status in ACTIVE:
        raise BackpropError("STATE_RUN_ACTIVE", run_id=run.id, status=run.status, pid=run.pid)
    if run.status not in RESUMABLE:
        raise BackpropError("STATE_NOT_RESUMABLE", run_id=run.id, reason=f"it is {run.status}")
    if run.kind != "train":
        raise BackpropError("STATE_NOT_RESUMABLE", run_id=run.id, reason=f"resuming '{run.kind}' runs is not supported yet")
    registry.update(run.id, error_code=None, error_message=None, ended_at=None)
    return run_training(registry.get(run.id), registry, control=control, on_event=on_event)
