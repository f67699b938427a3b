"""Experiment tracking: a run's events, copied to TensorBoard, MLflow and W&B (`training.report_to`, `--report-to`).

The worker hangs one `Tracking` on its event writer (`EventWriter(..., also=tracking.feed)`), so the training loop
knows nothing of trackers. `feed` only queues the event; a background thread turns events into tracker calls, so a
slow or unreachable tracker never slows a step. A tracker that raises (at start or at any call) is reported once as a
`log` warning with code DEP_TRACKER_FAILED and dropped for the rest of the run; training goes on.

Where a run was tracked is written to RUN_DIR/tracking.json (see `read_tracking`) and said in a `tracking` event.
A multi-run is tracked as its own tracker run (the whole timeline on one step axis, merges, the forgetting matrix
and BWT) plus one tracker run per child, opened when the multi-run's `run_started` event names the child.
"""

from __future__ import annotations

import contextlib
import json
import netrc
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training import atomic
from training.config import TRACKERS, Settings
from training.errors import BackpropError
from training.events import Event
from training.extras import installed  # a tracker's name is its module's
from training.preference import METRICS as PREFERENCE_METRICS

TRACKING_FILE = "tracking.json"
FLUSH_S = 1.0  # trackers that batch (MLflow) send at most this often
CLOSE_TIMEOUT_S = 30.0  # the worker waits this long for the trackers to finish at the end of a run
EXPERIMENT = "backprop"  # MLflow experiment and W&B project, unless MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT say otherwise


# ---------------------------------------------------------------------------- choosing trackers


def wandb_configured(env: Mapping[str, str] | None = None) -> bool:
    """An API key in WANDB_API_KEY or a netrc entry for the W&B host, or offline mode: W&B can log without a prompt."""
    env = os.environ if env is None else env
    if env.get("WANDB_MODE", "").lower() in ("offline", "dryrun") or env.get("WANDB_API_KEY"):
        return True
    host = (env.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    path = Path(env.get("NETRC") or Path(env.get("HOME", "~")).expanduser() / ".netrc")
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_trackers(report_to: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The trackers a run uses. `auto`: TensorBoard when installed, MLflow when MLFLOW_TRACKING_URI is set, W&B when
    configured (each only when installed). A named tracker is used as asked (missing, it fails with a warning)."""
    env = os.environ if env is None else env
    if report_to == "none":
        return []
    if report_to != "auto":
        return [n for n in TRACKERS if n in report_to.split(",")]
    wanted = {"tensorboard": True, "mlflow": bool(env.get("MLFLOW_TRACKING_URI")), "wandb": wandb_configured(env)}
    return [n for n in TRACKERS if wanted[n] and installed(n)]


def read_tracking(run_dir: Path) -> dict[str, Any]:
    """Where a run was tracked: {"tensorboard": log dir, "mlflow": {"run_id", "tracking_uri", "experiment_id"},
    "wandb": {"run_id", "url" (online) or "offline_dir"}, "failed": {tracker: reason}}; {} when it was not."""
    try:
        data = json.loads((Path(run_dir) / TRACKING_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------- events -> metrics


def metrics_of(event: Event) -> dict[str, float]:
    """The numbers an event carries, under tracker names (train/loss, eval/loss, system/gpu0/util, ...)."""
    kind = event.get("event")
    if kind == "step":
        names = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
                 **{m: f"train/{m}" for m in PREFERENCE_METRICS}}  # fmt: skip
        return {name: float(event[key]) for key, name in names.items() if _number(event.get(key))}
    if kind == "eval" and _number(event.get("eval_loss")):
        names = {"eval_loss": "eval/loss", **{f"eval_{m}": f"eval/{m}" for m in PREFERENCE_METRICS}}
        return {name: float(event[key]) for key, name in names.items() if _number(event.get(key))}
    if kind == "telemetry":
        out = {"system/cpu_percent": event.get("cpu"), "system/ram_used_mb": event.get("ram_used")}
        if _number(event.get("ram_used")) and event.get("ram_total"):
            out["system/ram_percent"] = 100 * event["ram_used"] / event["ram_total"]
        for gpu in event.get("gpus") or []:
            prefix = f"system/gpu{gpu.get('index', 0)}"
            out.update({f"{prefix}/util_percent": gpu.get("util"), f"{prefix}/mem_used_mb": gpu.get("mem_used"),
                        f"{prefix}/temp_c": gpu.get("temp"), f"{prefix}/power_w": gpu.get("power")})  # fmt: skip
            if _number(gpu.get("mem_used")) and gpu.get("mem_total"):
                out[f"{prefix}/mem_percent"] = 100 * gpu["mem_used"] / gpu["mem_total"]
        return {k: float(v) for k, v in out.items() if _number(v)}
    if kind == "merge":
        out = {f"merge/{k}": v for k, v in event.items() if k not in ("t", "event", "run", "eval_losses") and _number(v)}
        for j, loss in enumerate(event.get("eval_losses") or [], 1):
            if _number(loss):
                out[f"forgetting/task_{j}"] = loss
        return {k: float(v) for k, v in out.items()}
    return {}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


# ---------------------------------------------------------------------------- trackers


@dataclass
class TrackedRun:
    """What a tracker needs to open a run: ids, folders, hyperparameters, and (for a multi-run's child) its group."""

    run_id: str
    run_dir: Path
    params: dict[str, Any]
    kind: str = "train"
    group: str | None = None  # the multi-run id of a child run
    parent: dict[str, Any] = field(default_factory=dict)  # the multi-run's tracking.json, for links to it
    previous: dict[str, Any] = field(default_factory=dict)  # this run's tracking.json from an earlier start (a resume)

    @property
    def name(self) -> str:
        return f"backprop-{self.run_id}"

    @property
    def tags(self) -> dict[str, str]:
        tags = {"backprop.run_id": self.run_id, "backprop.kind": self.kind}
        return {**tags, "backprop.multi_run": self.group} if self.group else tags


class Tracker:
    """One tracker's run. `start` returns where it logs (for tracking.json); any method may raise."""

    name = ""

    def start(self, run: TrackedRun) -> Any:
        raise NotImplementedError

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def summary(self, values: dict[str, Any]) -> None:
        """Final numbers (BWT, final loss) and small structures (the forgetting matrix)."""

    def flush(self) -> None:
        """Send what is buffered."""

    def finish(self, status: str) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Event files in RUN_DIR/tensorboard/ (torch's SummaryWriter; hyperparameters in the HParams tab)."""

    name = "tensorboard"

    def start(self, run: TrackedRun) -> str:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        log_dir = run.run_dir / "tensorboard"
        self.writer = SummaryWriter(str(log_dir), flush_secs=10)
        flat = {k: v if isinstance(v, int | float | str | bool) else json.dumps(v, default=str) for k, v in run.params.items()}
        for summary in hparams(flat, {"train/loss": 0.0}):  # the HParams tab, linked to this run's train/loss
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("run", f"{run.name} (kind {run.kind}" + (f", multi-run {run.group})" if run.group else ")"))
        return str(log_dir)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def summary(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if _number(value):
                self.writer.add_scalar(f"final/{name}", value, 0)
            elif value is not None:
                self.writer.add_text(f"final/{name}", f"```\n{json.dumps(value, indent=1)}\n```")

    def flush(self) -> None:
        self.writer.flush()

    def finish(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()


class MlflowTracker(Tracker):
    """A run in MLFLOW_TRACKING_URI's experiment (MLFLOW_EXPERIMENT_NAME, default backprop), through MlflowClient
    (no global active run, so a multi-run and its children log side by side); metrics go in batches."""

    name = "mlflow"

    def start(self, run: TrackedRun) -> dict[str, str]:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run.run_dir / "mlruns").as_uri()
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a local folder store is the user's choice
        # An unreachable server fails within seconds instead of minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient(tracking_uri=uri)
        self.pending: list[Any] = []
        previous = run.previous.get("mlflow") or {}
        if previous.get("run_id") and previous.get("tracking_uri") == uri:  # a resumed run continues its MLflow run
            self.run_id = previous["run_id"]
            client.update_run(self.run_id, status="RUNNING")
            return previous
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        tags = dict(run.tags)
        if run.parent.get("mlflow", {}).get("run_id"):
            tags["mlflow.parentRunId"] = run.parent["mlflow"]["run_id"]  # the child nests under its multi-run
        self.run_id = client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in run.params.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(self.run_id, params=params[i : i + 100], tags=[RunTag("backprop.run_name", run.name)])
        return {"run_id": self.run_id, "tracking_uri": uri, "experiment_id": experiment_id}

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(name, value, now, step) for name, value in metrics.items()]
        if len(self.pending) >= 1000:
            self.flush()

    def summary(self, values: dict[str, Any]) -> None:
        self.log({f"final/{k}": v for k, v in values.items() if _number(v)}, 0)
        for key, value in values.items():  # a tag, not an artifact: a server without artifact access takes it too
            if value is not None and not _number(value):
                self.client.set_tag(self.run_id, f"backprop.{key}", json.dumps(value)[:8000])

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for i in range(0, len(pending), 1000):
            self.client.log_batch(self.run_id, metrics=pending[i : i + 1000])

    def finish(self, status: str) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status={"completed": "FINISHED", "failed": "FAILED"}.get(status, "KILLED"))


class WandbTracker(Tracker):
    """A W&B run with id = the backprop run id (a resume continues it) in RUN_DIR/wandb/; never prompts: without an
    API key or offline mode it fails (with a warning) before wandb is asked."""

    name = "wandb"

    def start(self, run: TrackedRun) -> dict[str, str | None]:
        if not wandb_configured():
            raise RuntimeError("no W&B API key (set WANDB_API_KEY or log in), and WANDB_MODE is not offline")
        import wandb

        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True, save_code=False,
                                  init_timeout=60, finish_timeout=60)  # fmt: skip
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or EXPERIMENT, dir=str(run.run_dir), id=run.run_id,
                              name=run.name, group=run.group, tags=["backprop", run.kind], config=run.params,
                              job_type="multi-run" if run.kind == "multi-run" else "train", resume="allow",
                              reinit="create_new", settings=settings)  # fmt: skip
        offline = self.run.offline  # (asking an offline run for its URL prints a warning)
        return {"run_id": self.run.id, "url": None if offline else self.run.url,
                "offline_dir": str(self.run.settings.sync_dir) if offline else None}  # fmt: skip

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in values.items() if v is not None})

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "completed" else 1)


TRACKER_CLASSES: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


# ---------------------------------------------------------------------------- the worker's sink

_CLOSE = object()


class Tracking:
    """The event sink of one worker (rank 0): queues events, feeds trackers on its own thread.

    `names` are tracker names (resolve_trackers); `emit` (attach it once the event writer exists) receives the
    `tracking` event and DEP_TRACKER_FAILED warnings; `registry` (training.runs.Registry) gives the dataset hash, a
    multi-run's children and its forgetting matrix. Another rank gets a Tracking that does nothing."""

    def __init__(self, run_id: str, run_dir: Path, kind: str, params: dict[str, Any], names: list[str], *,
                 registry: Any = None, rank: int = 0,
                 classes: Mapping[str, type[Tracker]] = TRACKER_CLASSES):  # fmt: skip
        self.run_id, self.run_dir, self.kind, self.params = run_id, Path(run_dir), kind, dict(params)
        self.names = list(names) if rank == 0 else []
        self.registry, self.classes = registry, classes
        self.emit: Callable[..., Any] | None = None
        self.failed: dict[str, str] = {}  # tracker name -> reason; a failed tracker is off for the rest of the run
        self.own: dict[str, Tracker] = {}  # this run's trackers
        self.child: dict[str, Tracker] = {}  # a multi-run's current child's trackers
        self.child_id: str | None = None
        self.next_child: str | None = None
        self.step = 0  # the last train step seen (system metrics are logged at it)
        self.child_step = 0
        self.status = "stopped"
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        if self.names:
            self.thread = threading.Thread(target=self._loop, name="backprop-tracking", daemon=True)
            self.thread.start()

    @classmethod
    def for_run(cls, run: Any, registry: Any, settings: Settings, *, rank: int = 0) -> Tracking:
        """The tracking of a registered run (train and multi-run kinds; a script run is not tracked)."""
        names = resolve_trackers(settings.training.report_to) if run.kind in ("train", "multi-run") else []
        return cls(run.id, run.path, run.kind, run.params, names, registry=registry, rank=rank)

    def attach(self, emit: Callable[..., Any]) -> None:
        self.emit = emit

    def feed(self, event: Event) -> None:
        """The EventWriter's `also` sink: never blocks, never raises."""
        if self.thread is not None:
            self.queue.put(event)

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Finish the trackers (waits at most `timeout`; a tracker still busy then is left to the process's exit)."""
        if self.thread is not None:
            self.queue.put(_CLOSE)
            self.thread.join(timeout)
            self.thread = None

    # ------------------------------------------------------------ the thread

    def _loop(self) -> None:
        last_flush = time.monotonic()
        while True:
            try:
                item = self.queue.get(timeout=FLUSH_S)
            except queue.Empty:
                item = None
            if item is _CLOSE:
                break
            if item is not None:
                self._handle(item)
            if time.monotonic() - last_flush >= FLUSH_S:
                self._call_all("flush")
                last_flush = time.monotonic()
        self._finish_child()
        self._call_all("finish", self.status)

    def _handle(self, event: Event) -> None:
        kind = event.get("event")
        if kind == "started" and not self.own:
            self.own = self._open(self._tracked(self.run_id, self.run_dir, self.kind, self.params, event))
        if kind == "run_started" and event.get("child"):
            self._finish_child()
            self.next_child = event["child"]  # opened at its first step, when the registry has its dataset's hash
        if kind == "step" and self.next_child and "run_step" in event:
            self._open_child(self.next_child)
            self.next_child = None
        metrics = metrics_of(event)
        if kind == "step":
            self.step = int(event["step"])
        if metrics:
            self._log(self.own, metrics, self.step if kind != "eval" else int(event.get("step", self.step)))
        if self.child and kind in ("step", "eval", "telemetry"):  # a multi-run relays its child's steps with run_step
            if "run_step" in event:
                self.child_step = int(event["run_step"])
            self._log(self.child, metrics, self.child_step)
        if kind == "merge":
            self._finish_child()
        if kind == "completed":
            self.status = "completed"
            keys = ("final_loss", "eval_loss", "bwt", "average_loss", "step")
            values = {k: event.get(k) for k in keys if event.get(k) is not None}
            if self.kind == "multi-run" and self.registry is not None:
                with contextlib.suppress(Exception):
                    values["forgetting_matrix"] = self.registry.forgetting(self.run_id)
            self._call(self.own, "summary", values)
        elif kind == "failed":
            self.status = "failed"

    def _tracked(self, run_id: str, run_dir: Path, kind: str, params: dict[str, Any], started: Event | None,
                 group: str | None = None) -> TrackedRun:  # fmt: skip
        record = self._record(run_id)
        extra = {"run_id": run_id}
        if record is not None:
            extra.update(model=record.model, dataset=Path(record.dataset or "").name, dataset_path=record.dataset,
                         dataset_sha256=record.dataset_sha256)  # fmt: skip
        if started:
            extra.update({k: started[k] for k in ("device", "trainable_params", "examples") if started.get(k) is not None})
        params = {**params, **{k: v for k, v in extra.items() if v is not None}}
        return TrackedRun(run_id, run_dir, params, kind, group, read_tracking(self.run_dir) if group else {},
                          read_tracking(run_dir))  # fmt: skip

    def _record(self, run_id: str) -> Any:
        if self.registry is None:
            return None
        try:
            return self.registry.get(run_id)
        except Exception:
            return None

    def _open(self, run: TrackedRun) -> dict[str, Tracker]:
        trackers: dict[str, Tracker] = {}
        locations: dict[str, Any] = {}
        for name in self.names:
            if name in self.failed:
                continue
            try:
                if not installed(name):
                    raise RuntimeError(f"{name} is not installed (pip install 'backprop[track]')")
                tracker = self.classes[name]()
                locations[name] = tracker.start(run)
                trackers[name] = tracker
            except Exception as exc:
                self._fail(name, exc)
        if locations:
            locations = {**read_tracking(run.run_dir), **locations}
            locations.pop("failed", None)
            if self.failed:
                locations["failed"] = dict(self.failed)
            atomic.write_json(run.run_dir / TRACKING_FILE, locations)
            if self.emit is not None:
                self.emit("tracking", run_id=run.run_id, **locations)
        return trackers

    def _open_child(self, child_id: str) -> None:
        self._finish_child()
        record = self._record(child_id)
        if record is None:
            return
        self.child_id, self.child_step = child_id, 0
        tracked = self._tracked(child_id, record.path, "train", record.params, None, group=self.run_id)
        self.child = self._open(tracked)

    def _finish_child(self) -> None:
        if not self.child:
            return
        record = self._record(self.child_id or "")
        status = record.status if record is not None else "stopped"
        if record is not None:
            self._call(self.child, "summary", {"final_loss": record.final_loss, "eval_loss": record.eval_loss,
                                               "step": record.step})  # fmt: skip
        self._call(self.child, "finish", status if status in ("completed", "failed") else "stopped")
        self.child, self.child_id = {}, None

    def _log(self, trackers: dict[str, Tracker], metrics: dict[str, float], step: int) -> None:
        self._call(trackers, "log", metrics, step)

    def _call_all(self, method: str, *args: Any) -> None:
        self._call(self.own, method, *args)
        self._call(self.child, method, *args)

    def _call(self, trackers: dict[str, Tracker], method: str, *args: Any) -> None:
        for name, tracker in list(trackers.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:
                trackers.pop(name, None)
                self._drop(name)
                self._fail(name, exc)

    def _drop(self, name: str) -> None:
        """A failed tracker is off for the whole run: the multi-run's and its child's alike."""
        for trackers in (self.own, self.child):
            tracker = trackers.pop(name, None)
            if tracker is not None:
                with contextlib.suppress(Exception):
                    tracker.finish("failed")

    def _fail(self, name: str, exc: BaseException) -> None:
        if name in self.failed:
            return
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        self.failed[name] = reason
        error = BackpropError("DEP_TRACKER_FAILED", tracker=name, reason=reason)
        if self.emit is not None:
            self.emit("log", level="warning", code=error.code, tracker=name, message=error.message, hint=error.hint)
        with contextlib.suppress(OSError):
            data = read_tracking(self.run_dir)
            data["failed"] = dict(self.failed)
            atomic.write_json(self.run_dir / TRACKING_FILE, data)
