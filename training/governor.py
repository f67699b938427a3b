"""The resource governor: which jobs may start, and when a running job must pause or stop.

- Admission (`wait_for_admission`): free RAM, CPU load, and on each GPU free VRAM and temperature; a job gets
  as many passing GPUs as it asks for (`distributed.nproc`; 'auto': all of them), those with the most free
  memory first; then free slots under `max_parallel` (one per GPU the job holds), first in first out.
  A job that cannot start yet stays `queued` with its reason and starts by itself when it can.
- While a job runs (`Watcher`, a thread in the worker): about one telemetry sample per second, written
  as `telemetry` events; above `gpu.max_temp_c` the job pauses at its next step boundary and resumes once
  the GPU has stayed `gpu.cool_down_c` cooler for `gpu.cool_down_seconds`; a pause longer than
  `gpu.max_pause_minutes` stops it with a checkpoint and RUNTIME_GPU_TEMPERATURE_CRITICAL.
The time box itself is the `Control.deadline` that every step boundary checks; it starts at the job's first
training step (a script's first `started` or step message), so start-up never uses it up.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from training.config import Settings
from training.control import Control
from training.errors import BackpropError
from training.runs import Registry
from training.telemetry import GpuReading, Sample, Telemetry

POLL_S = 0.5  # how often a queued job looks again
HEARTBEAT_S = 5.0
# Runs this worker process serves besides its own job (a multi-run's current child): the watcher beats them too,
# so a child held in a pause or a long eval is never taken for dead.
_also_beat: dict[str, Callable[[], None]] = {}


@contextmanager
def heartbeat_also(run_id: str, beat: Callable[[], None]) -> Iterator[None]:
    """While inside, every heartbeat of this process's watcher also calls `beat` (for run `run_id`)."""
    _also_beat[run_id] = beat
    try:
        yield
    finally:
        _also_beat.pop(run_id, None)


@dataclass
class Admission:
    """The governor's answer for one job: why it must wait, or the GPUs it gets and how many processes to start."""

    reason: str | None  # None: the machine can take the job
    gpus: list[GpuReading] = field(default_factory=list)  # the GPUs chosen for it, most free memory first
    nproc: int = 1  # processes to start on this machine: one per chosen GPU, or the asked number on CPU

    @property
    def gpu(self) -> GpuReading | None:
        """The first (on a one-GPU job, the only) GPU chosen."""
        return self.gpus[0] if self.gpus else None


def check_resources(sample: Sample, settings: Settings, busy: Collection[int] = ()) -> Admission:
    """Can this machine take one more job right now, and on which GPUs?

    A job asks for `distributed.nproc` GPUs (one process each; 'auto': every GPU that passes and no running job
    holds). A GPU passes with enough free VRAM and below the temperature limit; the job gets the passing GPUs that
    no running job (`busy`) holds first, then those with the most free memory. Without GPUs, nproc processes run
    on the CPU."""
    free_ram_gb = sample.ram_available / 1024
    if free_ram_gb < settings.min_free_ram_gb:
        return Admission(f"free RAM {free_ram_gb:.1f} GB < {settings.min_free_ram_gb:g} GB (minFreeRamGB)")
    if sample.cpu > settings.max_cpu_percent:
        return Admission(f"CPU load {sample.cpu:.0f}% > {settings.max_cpu_percent:g}% (maxCpuPercent)")
    wanted = settings.distributed.nproc
    if not sample.gpus:
        return Admission(None, nproc=1 if wanted == "auto" else int(wanted))
    by_preference = sorted(sample.gpus, key=lambda g: (g.index in busy, -(g.mem_free if g.mem_free is not None else -1)))
    refusals = {g.index: _refusal(g, settings) for g in by_preference}
    passing = [g for g in by_preference if refusals[g.index] is None]
    if wanted == "auto":
        passing = [g for g in passing if g.index not in busy]
        if passing:
            return Admission(None, passing, len(passing))
        return Admission(_why_not(refusals) or "every GPU is held by running jobs")
    if len(passing) >= int(wanted):
        return Admission(None, passing[: int(wanted)], int(wanted))
    if int(wanted) == 1:
        return Admission(refusals[by_preference[0].index])
    return Admission(f"needs {wanted} GPUs, {len(passing)} of {len(sample.gpus)} pass admission: {_why_not(refusals)}")


def _refusal(gpu: GpuReading, settings: Settings) -> str | None:
    """Why this GPU cannot take a job now, or None."""
    g = settings.gpu
    if gpu.mem_free is not None and gpu.mem_free < g.min_free_vram_mb:
        return f"GPU {gpu.index} free VRAM {gpu.mem_free:.0f} MB < {g.min_free_vram_mb} MB (gpu.minFreeVramMB)"
    if gpu.temp is not None and gpu.temp > g.max_temp_c:
        return f"GPU {gpu.index} at {gpu.temp:.0f} °C > {g.max_temp_c:g} °C (gpu.maxTempC)"
    return None


def _why_not(refusals: dict[int, str | None]) -> str:
    return "; ".join(r for _, r in sorted(refusals.items()) if r)


def wait_for_admission(
    registry: Registry,
    run_id: str,
    settings: Settings,
    telemetry: Telemetry,
    control: Control,
    on_queued: Callable[[str], None],
) -> Admission | None:
    """Block until the job may start (its admission names the GPUs it gets); None if stopped while queued.

    Raises INPUT_INVALID_ARGUMENT for a job that asks for more GPUs than this machine has (it would wait for ever)."""
    last_reason = None
    while not control.stop.is_set():
        # A free slot (first in, first out) first, then the machine's resources, then take the slots: one per GPU.
        reason = registry.claim(run_id, settings.max_parallel, dry_run=True)
        if reason:
            admission = Admission(reason)
        else:
            sample = telemetry.sample()
            _refuse_impossible(sample, settings)
            admission = check_resources(sample, settings, busy=registry.gpus_in_use(except_run=run_id))
        reason = admission.reason or registry.claim(run_id, settings.max_parallel, gpus=[g.index for g in admission.gpus])
        if reason is None:
            return admission
        if reason != last_reason:
            registry.update(run_id, reason=reason, heartbeat=time.time())
            on_queued(reason)
            last_reason = reason
        else:
            registry.update(run_id, heartbeat=time.time())
        control.stop.wait(POLL_S)
    return None


def _refuse_impossible(sample: Sample, settings: Settings) -> None:
    wanted = settings.distributed.nproc
    if sample.gpus and wanted != "auto" and int(wanted) > len(sample.gpus):
        raise BackpropError(
            "INPUT_INVALID_ARGUMENT", reason=f"nproc {wanted} asks for more GPUs than this machine has ({len(sample.gpus)})",
            hint=f"Use --nproc {len(sample.gpus)} or --nproc auto, or several machines (--nnodes).",
        )  # fmt: skip


class ThermalGuard:
    """Pause above `max_temp`; resume after `cool_seconds` at or below `max_temp - margin`."""

    def __init__(self, max_temp: float, margin: float, cool_seconds: float):
        self.max_temp, self.resume_at, self.cool_seconds = max_temp, max_temp - margin, cool_seconds
        self.hot = False
        self.cool_since: float | None = None

    def update(self, temp: float | None, now: float) -> str | None:
        """'pause', 'resume' or None (no change)."""
        if temp is None:
            return None
        if not self.hot:
            if temp > self.max_temp:
                self.hot, self.cool_since = True, None
                return "pause"
            return None
        if temp > self.resume_at:
            self.cool_since = None
            return None
        self.cool_since = self.cool_since if self.cool_since is not None else now
        if now - self.cool_since >= self.cool_seconds:
            self.hot = False
            return "resume"
        return None


class Watcher(threading.Thread):
    """Samples telemetry about once per `interval`, emits it, beats the heartbeat and guards the GPU temperature."""

    def __init__(
        self,
        telemetry: Telemetry,
        settings: Settings,
        control: Control,
        emit: Callable[..., object],
        heartbeat: Callable[[], None],
        gpu_indices: Collection[int] = (),
    ):
        super().__init__(name="backprop-watcher", daemon=True)
        self.telemetry, self.settings, self.control = telemetry, settings, control
        self.emit, self.heartbeat, self.gpu_indices = emit, heartbeat, set(gpu_indices)
        g = settings.gpu
        self.guard = ThermalGuard(g.max_temp_c, g.cool_down_c, g.cool_down_seconds)
        self.finished = threading.Event()
        self.samples = 0
        self.cpu_seconds = 0.0  # this thread's own CPU time: the governor's cost
        self.paused_at: float | None = None

    def run(self) -> None:
        interval = self.settings.telemetry_interval_s  # 0: no telemetry, heartbeat only
        last_beat = 0.0
        while not self.finished.is_set():
            if interval > 0:
                started = time.thread_time()
                sample = self.telemetry.sample()
                self.samples += 1
                self.emit("telemetry", **sample.to_event())
                self._guard_temperature(sample)
                self.cpu_seconds += time.thread_time() - started
            now = time.monotonic()
            if now - last_beat >= HEARTBEAT_S:
                for beat in (self.heartbeat, *tuple(_also_beat.values())):
                    try:
                        beat()
                    except Exception:  # a busy registry must not kill the watcher; the next beat retries
                        pass
                last_beat = now
            self.finished.wait(interval if interval > 0 else HEARTBEAT_S)

    def _guard_temperature(self, sample: Sample) -> None:
        # The hottest GPU of the job decides: every rank pauses at the same step boundary anyway.
        ours = [g for g in sample.gpus if g.index in self.gpu_indices] or sample.gpus[:1]
        if not ours:
            return
        gpu = max(ours, key=lambda g: g.temp if g.temp is not None else float("-inf"))
        change = self.guard.update(gpu.temp, time.monotonic())
        if change == "pause":
            self.paused_at = time.monotonic()
            self.control.request_pause(f"GPU {gpu.index} at {gpu.temp:.0f} °C > {self.guard.max_temp:g} °C")
        elif change == "resume":
            self.paused_at = None
            self.control.release()
        limit = self.settings.gpu.max_pause_minutes * 60
        if self.paused_at is not None and limit and time.monotonic() - self.paused_at > limit:
            self.control.request_stop(
                "RUNTIME_GPU_TEMPERATURE_CRITICAL",
                f"GPU {gpu.index} stayed above {self.guard.resume_at:g} °C for more than "
                f"{self.settings.gpu.max_pause_minutes:g} minutes",
            )
            self.control.release()

    def stop(self) -> None:
        self.finished.set()
        self.join(timeout=5)


def cuda_memory_fraction(limit: str | None, total_mb: float | None) -> float | None:
    """'80%' -> 0.8; '12' or '12GB' -> 12 GB of the GPU's total; None: no cap."""
    if not limit:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%|gb|g)?\s*", limit, re.IGNORECASE)
    if match is None:
        return None
    value, unit = float(match.group(1)), (match.group(2) or "gb").lower()
    if unit == "%":
        return min(1.0, value / 100)
    if not total_mb:
        return None
    return min(1.0, value * 1024 / total_mb)
