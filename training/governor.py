"""The resource governor: which jobs may start, and when a running job must pause or stop.

- Admission (`wait_for_admission`): free RAM, CPU load, and on the GPU with the most free memory (which
  the job then uses) free VRAM and temperature; then a free slot under `max_parallel`, first in first out.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from training.config import Settings
from training.control import Control
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
    reason: str | None  # None: the machine can take the job
    gpu: GpuReading | None  # the GPU chosen for it


def check_resources(sample: Sample, settings: Settings) -> Admission:
    """Can this machine take one more job right now? Picks the GPU with the most free memory."""
    free_ram_gb = sample.ram_available / 1024
    if free_ram_gb < settings.min_free_ram_gb:
        return Admission(f"free RAM {free_ram_gb:.1f} GB < {settings.min_free_ram_gb:g} GB (minFreeRamGB)", None)
    if sample.cpu > settings.max_cpu_percent:
        return Admission(f"CPU load {sample.cpu:.0f}% > {settings.max_cpu_percent:g}% (maxCpuPercent)", None)
    if not sample.gpus:
        return Admission(None, None)
    gpu = max(sample.gpus, key=lambda g: g.mem_free if g.mem_free is not None else -1)
    g = settings.gpu
    if gpu.mem_free is not None and gpu.mem_free < g.min_free_vram_mb:
        return Admission(f"GPU {gpu.index} free VRAM {gpu.mem_free:.0f} MB < {g.min_free_vram_mb} MB (gpu.minFreeVramMB)", gpu)
    if gpu.temp is not None and gpu.temp > g.max_temp_c:
        return Admission(f"GPU {gpu.index} at {gpu.temp:.0f} °C > {g.max_temp_c:g} °C (gpu.maxTempC)", gpu)
    return Admission(None, gpu)


def wait_for_admission(
    registry: Registry,
    run_id: str,
    settings: Settings,
    telemetry: Telemetry,
    control: Control,
    on_queued: Callable[[str], None],
) -> Admission | None:
    """Block until the job may start (its admission names the GPU it gets); None if stopped while queued."""
    last_reason = None
    while not control.stop.is_set():
        # A free slot (first in, first out) first, then the machine's resources, then take the slot.
        reason = registry.claim(run_id, settings.max_parallel, dry_run=True)
        admission = Admission(reason, None) if reason else check_resources(telemetry.sample(), settings)
        reason = admission.reason or registry.claim(run_id, settings.max_parallel)
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
        gpu_index: int | None,
    ):
        super().__init__(name="backprop-watcher", daemon=True)
        self.telemetry, self.settings, self.control = telemetry, settings, control
        self.emit, self.heartbeat, self.gpu_index = emit, heartbeat, gpu_index
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
        gpu = next((g for g in sample.gpus if g.index == self.gpu_index), sample.gpus[0] if sample.gpus else None)
        if gpu is None:
            return
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
