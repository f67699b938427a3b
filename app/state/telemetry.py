"""The telemetry rail: about one sample per second of CPU, RAM and every GPU, the last few minutes, on every page."""

from __future__ import annotations

import asyncio
from functools import cache

import reflex as rx

from training.config import load_settings
from training.telemetry import Telemetry

HISTORY = 180  # points kept: three minutes at one per second


@cache
def _probe() -> Telemetry:
    settings = load_settings()
    return Telemetry(settings.gpu.probe, settings.telemetry_file)


def _point(series: list[dict], value: float | None) -> list[dict]:
    return [*series, {"v": round(value, 1) if value is not None else None}][-HISTORY:]


class TelemetryState(rx.State):
    cpu: list[dict] = []
    ram: list[dict] = []
    cpu_now: str = "-"
    ram_now: str = "-"
    gpus: list[dict] = []  # per GPU: name, util/mem/temp/power series and their latest values as text
    gpu_note: str = ""
    _watching: bool = False

    @rx.event(background=True)
    async def watch(self):
        async with self:
            if self._watching:
                return
            self._watching = True
        try:
            while True:
                sample = await asyncio.to_thread(_probe().sample)
                async with self:
                    self.cpu = _point(self.cpu, sample.cpu)
                    self.ram = _point(self.ram, 100 * sample.ram_used / sample.ram_total)
                    self.cpu_now = f"{sample.cpu:.0f}%"
                    self.ram_now = f"{sample.ram_used / 1024:.1f} / {sample.ram_total / 1024:.0f} GB"
                    self.gpu_note = "No NVIDIA GPU found: CPU and RAM only." if sample.gpu_note and not sample.gpus else ""
                    self.gpus = [self._gpu(g, i) for i, g in enumerate(sample.gpus)]
                    if self.router.session.client_token not in app_tokens():
                        return  # the tab is gone
                await asyncio.sleep(1.0)
        finally:
            async with self:
                self._watching = False

    def _gpu(self, g, i: int) -> dict:
        old = self.gpus[i] if i < len(self.gpus) else {}
        mem = 100 * g.mem_used / g.mem_total if g.mem_used is not None and g.mem_total else None
        return {
            "name": f"GPU {g.index} {g.name}",
            "util": _point(old.get("util", []), g.util),
            "mem": _point(old.get("mem", []), mem),
            "temp": _point(old.get("temp", []), g.temp),
            "power": _point(old.get("power", []), g.power),
            "now": " · ".join(
                x for x in (
                    f"{g.util:.0f}%" if g.util is not None else "",
                    f"{g.mem_used / 1024:.1f}/{g.mem_total / 1024:.0f} GB" if g.mem_used is not None and g.mem_total else "",
                    f"{g.temp:.0f} °C" if g.temp is not None else "",
                    f"{g.power:.0f} W" if g.power is not None else "",
                ) if x
            ),
        }  # fmt: skip


def app_tokens() -> set[str]:
    """Client tokens of the browser tabs connected right now."""
    from app.app import app

    namespace = app.event_namespace
    return set(namespace.token_to_sid) if namespace is not None else set()
