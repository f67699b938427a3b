"""Supervise any training script (`backprop run train.py`) from outside, the way the worker governs its own loop.

The script is started as

    python train.py --run-id ID --max-minutes N [--checkpoint-every-seconds S] [--resume-from PATH] [your args]

in its own process group, with BACKPROP_RUN_ID and BACKPROP_RUN_DIR in its environment. Its stdout is read
line by line:
    {"event": "...", ...}                      one of our events (step, eval, checkpoint_saved, log, ...)
    {"step": 10, "loss": 1.23}                 a step
    {"event": "checkpoint_saved", "path": "ckpt/step_10.pt", "step": 10}
    anything else                              kept in the run's log as-is
A script that stops itself at its time box says so with `{"event": "timeboxed"}` (or exit code 3). The time box
counts training: it starts at the script's first step message, not at its launch (imports, loading and a slow first
step do not use it up), so every session makes a step. A script that sends no step is time-boxed from its launch,
once `script_startup_s` (default two minutes) or a whole time box, if longer, has passed.
Pausing is SIGSTOP/SIGCONT of its process group; stopping is SIGINT, then SIGKILL after a grace period.

With `--nproc N` (or `--nnodes`) the script runs under torchrun, one process a rank (torch.distributed reads
RANK, WORLD_SIZE, MASTER_ADDR from the environment): `python -m torch.distributed.run --nproc-per-node N ...
train.py --run-id ID ...`. Rank 0 alone should print the JSON messages. torchrun starts each rank in a process
group of its own, so pause and kill reach torchrun's group and every rank's; the graceful SIGINT goes to torchrun,
which passes it on to every rank. Under torchrun a script's own time box is told by `{"event": "timeboxed"}` (torchrun
turns a rank's exit code 3 into its own 1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from training.config import Settings
from training.control import Control
from training.events import EventWriter
from training.runs import Registry, RunRecord

SCRIPT_EVENTS = {"started", "step", "eval", "checkpoint_saved", "log", "timeboxed", "completed"}
TIMEBOXED_EXIT_CODE = 3


def run_script(run: RunRecord, registry: Registry, spec: dict[str, Any], settings: Settings, control: Control,
               events: EventWriter) -> str:  # fmt: skip
    command = script_command(run, registry, spec, settings)
    env = {**os.environ, "BACKPROP_RUN_ID": run.id, "BACKPROP_RUN_DIR": str(run.path), "PYTHONUNBUFFERED": "1"}
    if spec.get("framework") == "tensorflow":
        env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"  # TensorFlow otherwise takes all VRAM at start
    registry.update(run.id, status="running", started_at=run.started_at or time.time(), error_code=None, error_message=None)
    events.emit("started", durable=True, command=command, cwd=spec["cwd"])
    process = subprocess.Popen(
        command, cwd=spec["cwd"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    reader = _OutputReader(process, run, registry, Path(spec["cwd"]), events, control)
    reader.start()
    status, forced = _supervise(process, run, registry, settings, control, events)
    reader.join()
    if status is None:
        code = process.returncode
        if reader.timeboxed or code == TIMEBOXED_EXIT_CODE:
            status = "timeboxed"
        elif code == 0:
            status = "completed"
        else:
            status = "failed"
    final = {"status": status, "ended_at": time.time(), "reason": None, "heartbeat": time.time()}
    if status == "failed":
        code = control.stop_code or "RUNTIME_SCRIPT_FAILED"
        message = control.stop_message or f"the script exited with code {process.returncode}: {reader.last_lines()}"
        final.update(error_code=code, error_message=message[:500])
        events.emit("failed", durable=True, code=code, message=message, exit_code=process.returncode)
    elif status == "completed":
        final["final_loss"] = reader.last_loss
        events.emit("completed", durable=True, step=reader.last_step, final_loss=reader.last_loss)
    else:
        events.emit("log", durable=True, level="warning", message=f"script run {status}" + (" (forced with SIGKILL)" * forced)
                    + f"; `backprop resume {run.id}` restarts it from its last checkpoint")  # fmt: skip
    registry.update(run.id, **final)
    return status


def script_command(run: RunRecord, registry: Registry, spec: dict[str, Any], settings: Settings) -> list[str]:
    from training.distributed import is_distributed, torchrun_command

    script = spec["script"]
    command = [sys.executable, script] if script.endswith(".py") else [script]
    if is_distributed(settings):  # torchrun runs a .py with this Python, anything else as it is (--no-python)
        command = torchrun_command(settings, None, module=None, script_args=[script] if script.endswith(".py") else
                                   ["--no-python", script])  # fmt: skip
    command += ["--run-id", run.id, "--max-minutes", f"{settings.max_run_minutes:g}"]
    if spec.get("checkpoint_every_minutes"):
        command += ["--checkpoint-every-seconds", f"{spec['checkpoint_every_minutes'] * 60:g}"]
    # On resume, the last checkpoint the script reported wins over the one it was first given.
    saved = [c for c in registry.checkpoints(run.id) if Path(c.path).exists()]
    resume_from = saved[-1].path if saved else spec.get("resume_from")
    if resume_from:
        command += ["--resume-from", resume_from]
    return command + list(spec.get("args", []))


def _supervise(process: subprocess.Popen, run: RunRecord, registry: Registry, settings: Settings, control: Control,
               events: EventWriter) -> tuple[str | None, bool]:  # fmt: skip
    """Pause, time box and stop from outside. Returns (status decided here or None, forced)."""
    launched = time.monotonic()
    paused = False
    interrupted_at: float | None = None
    status: str | None = None
    forced = False
    while process.poll() is None:
        if interrupted_at is None:
            if control.pause.is_set() and not paused:
                _signal_group(process, signal.SIGSTOP)
                paused = True
                events.emit("paused", durable=True, reason=control.pause_reason)
                registry.update(run.id, status="paused", reason=control.pause_reason)
            elif paused and not control.pause.is_set():
                _signal_group(process, signal.SIGCONT)
                paused = False
                events.emit("resumed", durable=True, reason="GPU cooled down")
                registry.update(run.id, status="running", reason=None)
            allowance = max(control.time_box_s or 0, settings.script_startup_s)
            if control.deadline is None and control.time_box_s and time.monotonic() - launched >= allowance:
                events.emit("log", level="warning", message=f"the script sent no step message in the {allowance:g} s"
                            " since its launch: its time box is counted from its launch")  # fmt: skip
                control.deadline = time.monotonic()
            if control.stop.is_set() or control.timed_out():
                status = "failed" if control.stop_code else ("stopped" if control.stop.is_set() else "timeboxed")
                if paused:
                    _signal_group(process, signal.SIGCONT)
                _signal_group(process, signal.SIGINT)
                interrupted_at = time.monotonic()
                events.emit("log", level="info", message=f"sent SIGINT to the script ({status})")
        elif time.monotonic() - interrupted_at > settings.stop_grace_seconds:
            _signal_group(process, signal.SIGKILL)
            forced = True
            interrupted_at = float("inf")  # killed: just wait for it to go
        time.sleep(0.05)
    return status, forced


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    """`sig` to the script's process group and, under torchrun, to each rank's own group too (torchrun starts
    every rank in a new session). SIGINT goes to the script's group only: torchrun passes it on to the ranks."""
    groups = {process.pid}
    if sig != signal.SIGINT:
        groups |= _descendant_groups(process.pid)
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _descendant_groups(pid: int) -> set[int]:
    import psutil

    groups = set()
    try:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                groups.add(os.getpgid(child.pid))
            except ProcessLookupError:
                pass
    except psutil.NoSuchProcess:
        pass
    return groups


class _OutputReader(threading.Thread):
    """Turns the script's stdout into events, checkpoints and registry progress; keeps the raw text in script.log."""

    def __init__(self, process: subprocess.Popen, run: RunRecord, registry: Registry, cwd: Path, events: EventWriter,
                 control: Control):  # fmt: skip
        super().__init__(name="backprop-script-reader", daemon=True)
        self.process, self.run_record, self.registry, self.cwd, self.events = process, run, registry, cwd, events
        self.control = control
        self.last_step = run.step or 0
        self.last_loss: float | None = None
        self.max_steps: int | None = run.max_steps
        self.timeboxed = False
        self.tail: deque[str] = deque(maxlen=5)
        self.last_write = 0.0

    def run(self) -> None:
        assert self.process.stdout is not None
        with (self.run_record.path / "script.log").open("ab") as log:
            for raw in self.process.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                self.tail.append(line)
                self._handle(line)
        self.registry.update(self.run_record.id, step=self.last_step, loss=self.last_loss)

    def last_lines(self) -> str:
        return " | ".join(x for x in self.tail if x.strip())[-300:]

    def _handle(self, line: str) -> None:
        message = _parse(line)
        if message is None:
            if line.strip():
                self.events.emit("log", level="info", message=line[:2000], source="script")
            return
        kind = message.pop("event", "step")
        message.pop("t", None)
        if kind == "step" and self.control.start_clock():
            self.events.emit("log", level="info", message=f"time box: {self.control.time_box_s / 60:g} min of training from now")
        if kind not in SCRIPT_EVENTS:
            self.events.emit("log", level="info", message=line[:2000], source="script")
        elif kind == "step":
            self._step(message)
        elif kind == "checkpoint_saved":
            self._checkpoint(message)
        elif kind == "timeboxed":
            self.timeboxed = True
        elif kind == "started":
            if isinstance(message.get("max_steps"), int):
                self.max_steps = message["max_steps"]
                self.registry.update(self.run_record.id, max_steps=self.max_steps)
            self.events.emit("log", level="info", message="script started", **message)
        elif kind != "completed":  # the supervisor writes `completed` itself, from the exit code
            self.events.emit(kind, **message)

    def _step(self, message: dict[str, Any]) -> None:
        if not isinstance(message.get("step"), int):
            return
        self.last_step = message["step"]
        if isinstance(message.get("loss"), int | float):
            self.last_loss = float(message["loss"])
        self.events.emit("step", **{"max_steps": self.max_steps, **message})
        now = time.time()
        if now - self.last_write >= 1.0:
            self.registry.update(self.run_record.id, step=self.last_step, loss=self.last_loss, heartbeat=now)
            self.last_write = now

    def _checkpoint(self, message: dict[str, Any]) -> None:
        path = message.get("path")
        if not isinstance(path, str) or not path:
            self.events.emit("log", level="warning", message="checkpoint_saved without a path: ignored")
            return
        if ".." in Path(path).parts:
            self.events.emit("log", level="warning", message=f"refused checkpoint path {path!r}: '..' is not allowed")
            return
        resolved = (self.cwd / path).resolve()
        step = message.get("step") if isinstance(message.get("step"), int) else self.last_step
        self.registry.add_checkpoint(self.run_record.id, step, resolved)
        self.events.emit("checkpoint_saved", durable=True, path=str(resolved), step=step)


def _parse(line: str) -> dict[str, Any] | None:
    """A JSON object that is one of our messages, or None for any other output."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or ("event" not in value and "step" not in value):
        return None
    return value
