"""What the machine is doing right now: one `Sample` per reading, from whichever probe fits.

    probe = make_probe("auto")     # NVML when an NVIDIA driver is present, else CPU and RAM only
    sample = probe.sample()        # Sample(gpus=[GpuReading...], cpu=..., ram_used=..., ...)

Memory is in MiB everywhere. A simulated sensor (`BACKPROPAGATE_TELEMETRY_FILE`, a JSON object re-read at
every sample) replaces or overrides readings, so overheating, full VRAM or low RAM can be shown on any machine:

    {"gpus": [{"name": "Simulated GPU", "temp": 91, "mem_used": 1000, "mem_total": 24000}], "ram_available": 2048}
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

MIB = 2**20
MIN_CPU_INTERVAL_S = 0.25


@dataclass
class GpuReading:
    index: int
    name: str
    util: float | None = None  # percent
    mem_used: float | None = None  # MiB
    mem_total: float | None = None  # MiB
    temp: float | None = None  # degrees C
    power: float | None = None  # W
    power_limit: float | None = None  # W

    @property
    def mem_free(self) -> float | None:
        if self.mem_used is None or self.mem_total is None:
            return None
        return self.mem_total - self.mem_used


@dataclass
class Sample:
    t: float
    cpu: float  # percent of all cores since the previous sample
    ram_used: float
    ram_total: float
    ram_available: float
    gpus: list[GpuReading] = field(default_factory=list)
    gpu_note: str | None = None  # why there are no GPU readings

    def to_event(self) -> dict[str, Any]:
        """The fields of a `telemetry` event."""
        return {
            "gpus": [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in asdict(g).items()} for g in self.gpus],
            "cpu": round(self.cpu, 1),
            "ram_used": round(self.ram_used),
            "ram_total": round(self.ram_total),
            "ram_available": round(self.ram_available),
        }


class GpuProbe(Protocol):
    note: str | None

    def read(self) -> list[GpuReading]: ...


class NoGpu:
    def __init__(self, note: str = "GPU telemetry off (--gpu-probe none)"):
        self.note = note

    def read(self) -> list[GpuReading]:
        return []


class NvmlProbe:
    """Every NVIDIA GPU through NVML (the nvidia-ml-py package)."""

    note = None

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.names = [_text(pynvml.nvmlDeviceGetName(h)) for h in self.handles]

    def read(self) -> list[GpuReading]:
        nv, out = self.nvml, []
        for index, (handle, name) in enumerate(zip(self.handles, self.names, strict=True)):
            reading = GpuReading(index, name)
            # Each query can be unsupported on some boards; a missing value stays None.
            reading.util = _try(lambda h=handle: float(nv.nvmlDeviceGetUtilizationRates(h).gpu))
            memory = _try(lambda h=handle: nv.nvmlDeviceGetMemoryInfo(h))
            if memory is not None:
                reading.mem_used, reading.mem_total = memory.used / MIB, memory.total / MIB
            reading.temp = _try(lambda h=handle: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)))
            reading.power = _try(lambda h=handle: nv.nvmlDeviceGetPowerUsage(h) / 1000)
            reading.power_limit = _try(lambda h=handle: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000)
            out.append(reading)
        return out


class NvidiaSmiProbe:
    """The same readings from `nvidia-smi`, for machines without NVML bindings."""

    note = None
    QUERY = "index,name,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw,power.limit"

    def __init__(self) -> None:
        if shutil.which("nvidia-smi") is None:
            raise FileNotFoundError("nvidia-smi is not on PATH")

    def read(self) -> list[GpuReading]:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        readings = []
        for line in out.strip().splitlines():
            index, name, *values = [v.strip() for v in line.split(",")]
            numbers = [_number(v) for v in values]
            readings.append(GpuReading(int(index), name, *numbers))
        return readings


def make_gpu_probe(kind: str = "auto") -> GpuProbe:
    """NVML, nvidia-smi, or nothing; `auto` tries them in that order and says why it found no GPU."""
    if kind == "none":
        return NoGpu()
    errors = []
    for name, cls in (("nvml", NvmlProbe), ("nvidia-smi", NvidiaSmiProbe)):
        if kind not in ("auto", name):
            continue
        try:
            return cls()
        except Exception as exc:  # no driver, no library, no binary
            errors.append(f"{name}: {type(exc).__name__}: {exc}".strip(": "))
    return NoGpu("no NVIDIA GPU found (" + "; ".join(errors) + "); reporting CPU and RAM only")


class Telemetry:
    """Samples CPU, RAM and GPUs; readings from a simulated sensor file, when set, take precedence."""

    def __init__(self, gpu_probe: str = "auto", simulated: Path | None = None):
        import psutil

        self.psutil = psutil
        self.simulated = Path(simulated) if simulated else None
        self.gpu = make_gpu_probe(gpu_probe)
        psutil.cpu_percent(interval=None)  # prime: the next call measures from now
        self.primed_at = time.monotonic()

    @property
    def note(self) -> str | None:
        return self.gpu.note

    def sample(self) -> Sample:
        # CPU load is an average since the previous call: give the first one a meaningful interval.
        time.sleep(max(0.0, self.primed_at + MIN_CPU_INTERVAL_S - time.monotonic()))
        memory = self.psutil.virtual_memory()
        gpus = self.gpu.read()
        sample = Sample(
            t=time.time(),
            cpu=self.psutil.cpu_percent(interval=None),
            ram_used=(memory.total - memory.available) / MIB,
            ram_total=memory.total / MIB,
            ram_available=memory.available / MIB,
            gpus=gpus,
            gpu_note=self.gpu.note if not gpus else None,
        )
        if self.simulated is not None:
            _apply_simulation(sample, self.simulated)
        return sample


def _apply_simulation(sample: Sample, path: Path) -> None:
    """Override a sample with the readings in `path`; an unreadable file (mid-rewrite) changes nothing."""
    try:
        readings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    for key in ("cpu", "ram_used", "ram_total", "ram_available"):
        if key in readings:
            setattr(sample, key, float(readings[key]))
    if "gpus" in readings:
        known = {f.name for f in fields(GpuReading)}
        sample.gpus = [
            GpuReading(**{"index": i, "name": "Simulated GPU", **{k: v for k, v in g.items() if k in known}})
            for i, g in enumerate(readings["gpus"])
        ]
        sample.gpu_note = None if sample.gpus else "simulated: no GPU"


def _try(read: Any) -> Any:
    try:
        return read()
    except Exception:
        return None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
