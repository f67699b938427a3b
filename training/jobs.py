"""Jobs: every run in its own supervised worker process.

    run = jobs.submit_train(settings, "data.jsonl")      # registry row (queued) + run dir + worker process
    for event in jobs.follow(registry, run.id):          # events.jsonl, from any offset, until the run ends
        ...
    jobs.stop(registry, run.id)                          # graceful (checkpoint first), forced after a grace period
    jobs.resume(registry, run.id)                        # a new worker continues from the last checkpoint

The worker (`python -m training.worker RUN_DIR`) runs in its own session, so Ctrl-C in a terminal, a closed
browser tab or a restarted web app never kills it; whoever looks can re-attach by following its events.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training import atomic
from training.config import Settings
from training.control import ask_stop
from training.errors import BackpropError
from training.events import Event, read_events
from training.runs import ACTIVE, Registry, RunRecord, pid_alive, refuse_unless_resumable, worker_alive

if TYPE_CHECKING:
    from training.plan import Plan

FOLLOW_POLL_S = 0.2
WORKER_EXIT_WAIT_S = 30  # a worker that has written its final status exits within moments
_children: list[subprocess.Popen] = []  # workers this process started, reaped as they finish


def submit_train(
    settings: Settings,
    data: str,
    *,
    fmt: str | None = None,
    skip_invalid: bool = False,
    name: str | None = None,
    runs_root: Path | None = None,
    from_run: str | None = None,
    plan: bool = True,
    on_download: Callable[..., Any] | None = None,
) -> RunRecord:
    """Register a training run and start its worker (its folder under `runs_root`, default HOME/runs).

    `from_run` (a completed run's id) starts from that run's adapter, on its model and LoRA shape; for DPO that
    adapter is also the reference the run is measured against. `plan` (training/plan.py) fills what the user left
    unset from the model, the data and this machine, records it in spec.json, and refuses a run that will not fit
    (INPUT_RUN_WONT_FIT) before it starts. `on_download` sees the progress of a hub dataset the plan fetches."""
    from training.distributed import check_supported
    from training.trainer import new_train_run

    check_supported(settings, "train")

    registry = Registry(settings.home)
    extra: dict[str, Any] = {}
    if from_run:
        settings, extra = _start_from(registry, settings, from_run)
    if plan:
        planned = plan_run(settings, data, fmt=fmt, on_download=on_download)
        _refuse_problems(planned)
        settings, extra["plan"] = planned.apply(settings), planned.to_dict()
    # Not the run's parent in the registry (that is a multi-run's child): it stays a run of its own, resumable, kept
    # when the run it started from is deleted; spec.json names it.
    run = new_train_run(registry, settings, data, fmt=fmt, skip_invalid=skip_invalid, name=name, runs_root=runs_root,
                        extra=extra)  # fmt: skip
    return start(registry, run)


def plan_run(
    settings: Settings,
    data: str | None,
    *,
    fmt: str | None = None,
    from_run: str | None = None,
    on_download: Callable[..., Any] | None = None,
) -> Plan:
    """The plan (training/plan.py) `submit_train` applies to these settings: after `from_run`'s model and LoRA shape."""
    from training.plan import make_plan

    if from_run:
        settings, _ = _start_from(Registry(settings.home), settings, from_run)
    return make_plan(settings, data, fmt=fmt, on_download=on_download)


def _refuse_problems(planned: Plan) -> None:
    """A setting that will not work is refused before a run is registered (INPUT_RUN_WONT_FIT says what to change)."""
    if not planned.problems:
        return
    first = planned.problems[0]
    hint = first.hint
    if first.code == "INPUT_RUN_WONT_FIT":
        hint += " `backprop plan` shows the estimate; --no-plan starts anyway."
    raise BackpropError(first.code, reason=first.message, hint=hint)


def _start_from(registry: Registry, settings: Settings, run_id: str) -> tuple[Settings, dict[str, Any]]:
    """The settings and spec keys of a run that starts from a finished run's adapter: its model and LoRA shape."""
    parent = registry.get(run_id)
    weights = parent.path / "adapter" / "adapter_model.safetensors"
    if parent.status != "completed" or not weights.is_file():
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"run {parent.id} has no finished adapter to start from "
                            f"(status {parent.status})", hint="Pick a completed training run: `backprop list`.")  # fmt: skip
    parent_settings = json.loads((parent.path / "spec.json").read_text()).get("settings", {})
    model = parent_settings.get("model", parent.model)
    if "model" in settings.model_fields_set and settings.model not in (model, None):
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"--model {settings.model} differs from run {parent.id}'s "
                            f"model {model}", hint="Leave --model out: a run started from another trains its model.")  # fmt: skip
    lora = settings.lora.model_copy(update={k: v for k, v in parent_settings.get("lora", {}).items() if k != "dropout"})
    settings = settings.model_copy(update={"model": model, "lora": lora})
    return settings, {"init_adapter": str(weights), "from_run": parent.id}


def submit_multi_run(settings: Settings, datasets: list[str], **options: Any) -> RunRecord:
    """Register a multi-run (see training/multi_run.py for the options) and start its worker."""
    from training.distributed import check_supported
    from training.multi_run import new_multi_run

    check_supported(settings, "multi-run")

    registry = Registry(settings.home)
    return start(registry, new_multi_run(registry, settings, datasets, **options))


def submit_script(
    settings: Settings,
    script: str,
    args: list[str] | None = None,
    *,
    name: str | None = None,
    run_id: str | None = None,
    framework: str = "auto",
    checkpoint_every_minutes: float | None = None,
    resume_from: str | None = None,
) -> RunRecord:
    """Register a run of any training script (see training/script_run.py for its protocol) and start it."""
    path = Path(script).expanduser().resolve()
    if not path.is_file():
        raise BackpropError("INPUT_SCRIPT_NOT_FOUND", path=script)
    if framework == "auto":
        source = path.read_text(errors="replace") if path.suffix == ".py" else ""
        framework = "tensorflow" if "tensorflow" in source else "pytorch" if "torch" in source else "unknown"
    spec = {
        "script": str(path),
        "args": list(args or []),
        "cwd": os.getcwd(),
        "framework": framework,
        "checkpoint_every_minutes": checkpoint_every_minutes,
        "resume_from": str(Path(resume_from).expanduser().resolve()) if resume_from else None,
        "settings": settings.model_dump(mode="json", exclude={"home", "ui", "lora", "training", "model"}),
        "params": {"script": str(path), "args": list(args or []), "framework": framework},
    }
    registry = Registry(settings.home)
    return start(registry, registry.create("script", spec, name=name or path.name, run_id=run_id))


def start(registry: Registry, run: RunRecord) -> RunRecord:
    """Start the worker of a queued run, in a new session (its own process group)."""
    _reap()
    with (run.path / "worker.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "training.worker", str(run.path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    _children.append(process)
    registry.update(run.id, pid=process.pid, heartbeat=time.time())
    return registry.get(run.id)


def resume(
    registry: Registry, run_id: str, settings_overrides: dict[str, Any] | None = None, *, allow_changed_data: bool = False
) -> RunRecord:
    """Queue a time-boxed, stopped, interrupted or failed run again; its worker continues from the last checkpoint.

    Exactly one resume wins a run (see Registry.claim_for_resume); the others get STATE_RUN_ACTIVE. A training run
    whose dataset file changed since it started is refused with INPUT_DATASET_CHANGED unless `allow_changed_data`."""
    run = registry.get(run_id)
    if run.status not in (*ACTIVE, "interrupted") and run.pid is not None:
        # The run's worker writes its final status a moment before it exits: let it go first.
        deadline = time.monotonic() + WORKER_EXIT_WAIT_S
        while worker_alive(run.pid, run.path) and time.monotonic() < deadline:
            time.sleep(0.05)
    run = registry.get(run.id)
    refuse_unless_resumable(run)  # first: a run that cannot resume anyway is not worth hashing its data
    if run.kind == "train" and not allow_changed_data:
        _refuse_changed_dataset(registry, run)
    spec = json.loads((run.path / "spec.json").read_text())
    if settings_overrides:
        spec["settings"] = _merge(spec.get("settings", {}), settings_overrides)
    if run.kind == "train":
        _refuse_changed_world_size(registry, run, spec)
    run = registry.claim_for_resume(run.id, os.getpid())
    spec["allow_changed_data"] = allow_changed_data  # for this start only
    atomic.write_json(run.path / "spec.json", spec)
    return start(registry, run)


def _refuse_changed_dataset(registry: Registry, run: RunRecord) -> None:
    """Fail fast, before a worker starts, when a local dataset file differs from the one the run started on
    (the worker checks again, for any dataset; see trainer.check_dataset_unchanged)."""
    from training import checkpoints
    from training.datasets import file_sha256
    from training.trainer import check_dataset_unchanged

    path = Path(json.loads((run.path / "spec.json").read_text()).get("data") or "")
    resuming = any(checkpoints.is_readable(Path(c.path)) for c in registry.checkpoints(run.id))
    if path.is_file():
        check_dataset_unchanged(run, str(path), file_sha256(path), resuming)


def _refuse_changed_world_size(registry: Registry, run: RunRecord, spec: dict[str, Any]) -> None:
    """A checkpoint's batch position counts global batches of the processes that wrote it: resuming on another number
    of processes is INPUT_WORLD_SIZE_CHANGED, here, before a worker starts (the ranks check again)."""
    from training import checkpoints
    from training.config import load_settings
    from training.distributed import world_size

    saved = [c for c in registry.checkpoints(run.id) if checkpoints.is_readable(Path(c.path))]
    current = world_size(load_settings(**spec.get("settings", {}), home=spec.get("home")))
    if saved and current is not None:
        recorded = checkpoints.recorded_world_size(Path(saved[-1].path))
        if recorded != current:
            raise BackpropError("INPUT_WORLD_SIZE_CHANGED", run_id=run.id, recorded=recorded, current=current)


def request_stop(registry: Registry, run_id: str) -> RunRecord:
    """Ask a job to stop at its next step boundary (it saves a checkpoint first); returns at once."""
    run = registry.get(run_id)
    if run.status not in ACTIVE:
        raise BackpropError("STATE_RUN_NOT_ACTIVE", run_id=run.id, status=run.status)
    # A multi-run's child is trained by its multi-run's worker: stopping it stops the multi-run, with a checkpoint.
    worker_run = registry.get(run.parent_id) if run.parent_id else run
    pid = ask_stop(worker_run.path)
    if pid is not None and worker_alive(pid, worker_run.path):
        _signal(pid, signal.SIGTERM)
    return run


def stop(registry: Registry, run_id: str, grace: float | None = None) -> RunRecord:
    """Stop gracefully; after `grace` seconds (default: the stopGraceSeconds setting) kill the whole job."""
    from training.config import load_settings

    run = request_stop(registry, run_id)
    grace = load_settings().stop_grace_seconds if grace is None else grace
    # A script's supervisor forwards SIGINT and waits `stop_grace_seconds` itself; allow for that and the checkpoint.
    deadline = time.monotonic() + grace + 10
    while run.pid is not None and _alive(run.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if run.pid is not None and _alive(run.pid):
        kill(registry, run.id)
    return registry.get(run.id)


def kill(registry: Registry, run_id: str) -> RunRecord:
    """SIGKILL the job's whole process group (worker and any script it runs); it ends `stopped`."""
    run = registry.get(run_id)
    if run.pid is not None:
        try:
            os.killpg(run.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            _signal(run.pid, signal.SIGKILL)
        while _alive(run.pid):
            time.sleep(0.05)
    if registry.get(run.id).status in ACTIVE or registry.get(run.id).status == "interrupted":
        registry.update(run.id, status="stopped", reason=None, ended_at=time.time(),
                        error_message="killed after the stop grace period")  # fmt: skip
    return registry.get(run.id)


WORKER_CLOSE_S = 40.0  # the longest a worker takes to close its trackers after its run ended (tracking: 30 s)


def follow(registry: Registry, run_id: str, offset: int = 0, poll: float = FOLLOW_POLL_S) -> Iterator[Event]:
    """Yield the run's events from byte `offset` on, live, until the run has ended and every event is read."""
    run = registry.get(run_id)
    path = run.path / "events.jsonl"
    while True:
        _reap()
        events, offset = read_events(path, offset)
        yield from events
        if events:
            continue
        ended = registry.get(run.id)
        if ended.status not in ACTIVE:
            # The worker outlives the run's last status a moment: it flushes and closes the experiment trackers. Wait for
            # it (bounded), so that whoever follows a run sees its trackers' last words and finds everything written.
            deadline = time.monotonic() + WORKER_CLOSE_S
            while ended.pid and _alive(ended.pid) and time.monotonic() < deadline:
                time.sleep(poll)
            events, offset = read_events(path, offset)  # the last words, written just before the status and after it
            yield from events
            return
        time.sleep(poll)


def failure(run: RunRecord, failed_event: Event | None = None) -> BackpropError:
    """The coded error a failed run ended with: from its `failed` event when seen, else from the registry."""
    event = failed_event or {}
    code = event.get("code") or run.error_code or "RUNTIME_TRAINING_FAILED"
    return BackpropError(code, message=event.get("message") or run.error_message, hint=event.get("hint"))


def events_offset(registry: Registry, run_id: str) -> int:
    """The current end of a run's events: follow from here to see only what comes next."""
    path = registry.get(run_id).path / "events.jsonl"
    return path.stat().st_size if path.exists() else 0


def _alive(pid: int) -> bool:
    _reap()
    return pid_alive(pid)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap() -> None:
    """Collect workers of this process that have exited, so none lingers as a zombie."""
    for process in list(_children):
        if process.poll() is not None:
            _children.remove(process)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged
