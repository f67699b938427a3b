"""The telemetry rail: about one sample per second of CPU, RAM and every GPU, the last few minutes, on every page."""

from __future__ import annotations

import asyncio
from collections import deque
from functools import cache

import reflex as rx

from app.state.errors import handler
from app.state.plot import sparkline
from training.config import load_settings
from training.telemetry import GpuReading, Sample, Telemetry

HISTORY = 180  # points kept: three minutes at one per second


@cache
def _probe() -> Telemetry:
    settings = load_settings()
    return Telemetry(settings.gpu.probe, settings.telemetry_file)


# One sampler per server, shared by every tab: a tab opened now still shows the last three minutes.
_history: deque[Sample] = deque(maxlen=HISTORY)
_app: rx.App | None = None  # the running app, handed to its lifespan task: whose tabs are still connected


async def sample_forever(app: rx.App) -> None:
    """Lifespan task of the app (Reflex passes it the app): one telemetry sample a second into the shared history."""
    global _app
    _app = app
    while True:
        _history.append(await asyncio.to_thread(_probe().sample))
        await asyncio.sleep(1.0)


class TelemetryState(rx.State):
    cpu: str = ""  # sparkline points (app/state/plot.py)
    ram: str = ""
    cpu_now: str = "-"
    ram_now: str = "-"
    gpus: list[dict[str, str]] = []  # per GPU: name, util/mem/temp/power sparklines and the latest values as text
    gpu_note: str = ""
    _watching: bool = False

    @handler(background=True, busy="_watching", error=None)
    async def watch(self):
        while True:
            samples = list(_history)
            async with self:
                if samples:
                    self._show(samples)
                if not tab_open(self.router.session.client_token):
                    return
            await asyncio.sleep(1.0)

    def _show(self, samples: list[Sample]) -> None:
        last = samples[-1]
        self.cpu = sparkline([s.cpu for s in samples], top=100, length=HISTORY)
        self.ram = sparkline([100 * s.ram_used / s.ram_total for s in samples], top=100, length=HISTORY)
        self.cpu_now = f"{last.cpu:.0f}%"
        self.ram_now = f"{last.ram_used / 1024:.1f} / {last.ram_total / 1024:.0f} GB"
        self.gpu_note = "No NVIDIA GPU found: CPU and RAM only." if last.gpu_note and not last.gpus else ""
        self.gpus = [self._gpu(g, [s.gpus[i] if i < len(s.gpus) else None for s in samples]) for i, g in enumerate(last.gpus)]

    @staticmethod
    def _gpu(g: GpuReading, history: list[GpuReading | None]) -> dict[str, str]:
        def series(read, top: float | None = 100) -> str:
            return sparkline([read(h) if h is not None else None for h in history], top=top, length=HISTORY)

        return {
            "name": f"GPU {g.index} {g.name}",
            "util": series(lambda h: h.util),
            "mem": series(lambda h: 100 * h.mem_used / h.mem_total if h.mem_used is not None and h.mem_total else None),
            "temp": series(lambda h: h.temp),
            "power": series(lambda h: h.power, top=g.power_limit or None),
            "now": " · ".join(
                x for x in (
                    f"{g.util:.0f}%" if g.util is not None else "",
                    f"{g.mem_used / 1024:.1f}/{g.mem_total / 1024:.0f} GB" if g.mem_used is not None and g.mem_total else "",
                    f"{g.temp:.0f} °C" if g.temp is not None else "",
                    f"{g.power:.0f} W" if g.power is not None else "",
                ) if x
            ),
        }  # fmt: skip


def tab_open(token: str) -> bool:
    """Whether the browser tab with this client token is still connected (assumed so before the app has started)."""
    namespace = _app.event_namespace if _app is not None else None
    return namespace is None or token in namespace.token_to_sid
