"""The Train page: a form that submits a real training job, then follows its events live."""

from __future__ import annotations

import asyncio
from pathlib import Path

import reflex as rx

from app.sandbox import runs_root
from app.state.follow import Progress
from training import jobs
from training.config import load_settings, nest_options
from training.errors import BackpropError
from training.runs import ACTIVE, Registry

DEMO_DATASET = str(Path(__file__).resolve().parents[2] / "assets" / "demo" / "capitals.jsonl")
UPDATE_EVERY_S = 0.5  # at most two state updates a second


class TrainState(rx.State):
    model: str = "demo"
    dataset: str = DEMO_DATASET
    steps: str = ""
    learning_rate: str = ""
    batch_size: str = ""
    max_run_minutes: str = "10"
    lora_r: str = "16"
    validation_split: str = ""
    packing: bool = True
    response_only: bool = True

    run_id: str = ""
    status: str = ""
    step: int = 0
    max_steps: int = 0
    tokens_per_s: str = ""
    eta: str = ""
    loss: list[dict] = []
    log: list[str] = []
    error: str = ""
    hint: str = ""
    adapter: str = ""
    _following: str = ""

    @rx.var
    def running(self) -> bool:
        return self.status in ACTIVE

    @rx.var
    def percent(self) -> int:
        return int(100 * self.step / self.max_steps) if self.max_steps else 0

    @rx.event
    def set_field(self, name: str, value: str | bool):
        setattr(self, name, value)

    @rx.event
    def start(self):
        self.error = self.hint = ""
        options = {"model": self.model.strip() or None, "steps": _int(self.steps), "lr": _float(self.learning_rate),
                   "batch_size": _int(self.batch_size), "max_run_minutes": _float(self.max_run_minutes),
                   "lora_r": _int(self.lora_r), "packing": self.packing, "response_only": self.response_only,
                   "validation_split": _float(self.validation_split)}  # fmt: skip
        try:
            settings = load_settings(**nest_options(options))
            run = jobs.submit_train(settings, self.dataset.strip(), runs_root=runs_root())
        except (BackpropError, ValueError) as exc:
            self.error = f"[{exc.code}] {exc.message}" if isinstance(exc, BackpropError) else str(exc)
            self.hint = exc.hint if isinstance(exc, BackpropError) else ""
            return
        self._attach(run.id)
        return TrainState.follow

    @rx.event
    def stop(self):
        if self.run_id:
            try:
                jobs.request_stop(Registry(load_settings().home), self.run_id)
            except BackpropError as exc:
                self.error, self.hint = f"[{exc.code}] {exc.message}", exc.hint

    @rx.event
    def reattach(self):
        """On page load: follow this tab's run, or the newest training run still active (started anywhere)."""
        if not self.run_id:
            active = [r for r in Registry(load_settings().home).list(kind="train") if r.status in ACTIVE]
            if not active:
                return
            self._attach(active[0].id)
        return TrainState.follow

    def _attach(self, run_id: str) -> None:
        self.run_id, self.status, self.step, self.max_steps = run_id, "queued", 0, 0
        self.loss, self.log, self.adapter, self.tokens_per_s, self.eta = [], [], "", "", ""

    @rx.event(background=True)
    async def follow(self):
        async with self:
            if self._following == self.run_id or not self.run_id:
                return
            run_id = self._following = self.run_id
        registry = Registry(load_settings().home)
        progress = Progress(registry.get(run_id).path / "events.jsonl")
        try:
            while True:
                changed = await asyncio.to_thread(progress.read)
                ended = (await asyncio.to_thread(registry.get, run_id)).status not in ACTIVE
                if ended:
                    await asyncio.to_thread(progress.read)  # the last words
                    progress.status = (await asyncio.to_thread(registry.get, run_id)).status
                async with self:
                    if self.run_id != run_id:
                        return  # the tab moved on to another run
                    if changed or ended:
                        self.status, self.step, self.max_steps = progress.status, progress.step, progress.max_steps
                        self.loss, self.log, self.adapter = progress.loss, progress.log, progress.adapter
                        self.tokens_per_s = f"{progress.tokens_per_s:.0f} tok/s" if progress.tokens_per_s else ""
                        self.eta = progress.eta
                        if progress.error:
                            self.error, self.hint = progress.error, progress.hint
                if ended:
                    return
                await asyncio.sleep(UPDATE_EVERY_S)
        finally:
            async with self:
                if self._following == run_id:
                    self._following = ""


def _int(text: str) -> int | None:
    return int(text) if text.strip() else None


def _float(text: str) -> float | None:
    return float(text) if text.strip() else None
