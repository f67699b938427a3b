"""The Multi-Run page: a continual-training multi-run with SLAO merging, its runs, merges and forgetting matrix, live."""

from __future__ import annotations

import asyncio

import reflex as rx

from app.folders import runs_root
from app.state.errors import handler
from app.state.follow import Progress, assign_changed
from app.state.form import setter
from app.state.plot import Plot
from app.state.train import DEMO_DATASET, _cuda_available, method_options, nproc_value
from training import jobs
from training.config import load_settings, nest_options
from training.errors import BackpropError
from training.multi_run import forgetting_metrics
from training.runs import ACTIVE, Registry


def heat(value: float | None, low: float, high: float) -> str:
    """A cell colour from green (lowest loss) to red (highest)."""
    if value is None:
        return "transparent"
    share = 0.0 if high <= low else (value - low) / (high - low)
    return f"hsl({round(120 * (1 - share))}, 65%, 55%)"


def multi_run_view(registry: Registry, multi_run_id: str, progress: Progress) -> dict:
    """Everything the page shows of a multi-run, as plain strings (and the loss plot), its events read up to now."""
    run = registry.get(multi_run_id)
    children = registry.children(run.id)
    progress.read()
    merges = progress.merges
    matrix = registry.forgetting(run.id)
    values = [v for row in matrix for v in row if v is not None]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    metrics = forgetting_metrics(matrix)
    return {
        "status": run.status,
        "step": f"{run.step}/{run.max_steps or '?'}",
        "loss": progress.loss_plot(),
        "children": [{"run": str(i), "id": c.id, "status": c.status, "step": f"{c.step}/{c.max_steps or '?'}",
                      "loss": f"{c.final_loss if c.final_loss is not None else (c.loss or 0):.4f}"}
                     for i, c in enumerate(children, 1)],
        "merges": [{"run": str(m["run"]), "lam": f"{m['lam']:.3f}", "a": f"{m['a_norm_before']:.2f} → {m['a_norm_after']:.2f}",
                    "b": f"{m['b_norm_before']:.2f} → {m['b_norm_after']:.2f}"} for m in merges],
        "cells": [{"text": f"{v:.3f}" if v is not None else "", "color": heat(v, low, high)} for row in matrix for v in row],
        "columns": str(len(matrix[0])) if matrix else "1",
        "bwt": f"{metrics['bwt']:+.4f}" if metrics["bwt"] is not None else "",
        "average": f"{metrics['average_loss']:.4f}" if metrics["average_loss"] is not None else "",
        "error": f"[{run.error_code}] {run.error_message}" if run.error_code else "",
    }  # fmt: skip


class MultiRunState(rx.State):
    datasets: str = DEMO_DATASET
    model: str = "demo"
    runs: str = "3"
    steps: str = "30"
    samples: str = ""
    merge_mode: str = "slao"
    replay: str = "0"
    lr_schedule: str = "constant"
    validation: str = "0.25"
    report_to: str = ""  # empty: training.report_to from config or env (auto)
    nproc: str = ""  # "GPUs" on an NVIDIA machine, "processes" on CPU; empty: distributed.nproc from config (1)
    strategy: str = ""  # how several GPUs share the model (training.distributed.STRATEGIES); empty: from config (ddp)
    method: str = "sft"  # every run of the multi-run trains with it: sft, dpo or orpo
    beta: str = ""  # DPO only; empty: from config (0.1)
    orpo_lambda: str = ""  # ORPO only; empty: from config (0.1)
    cuda: bool = _cuda_available()

    multi_run_id: str = ""
    status: str = ""
    step: str = ""
    loss: Plot = Plot()
    children: list[dict[str, str]] = []
    merges: list[dict[str, str]] = []
    cells: list[dict[str, str]] = []
    columns: str = "1"
    bwt: str = ""
    average: str = ""
    error: str = ""
    _following: str = ""

    set_datasets = setter("datasets")
    set_model = setter("model")
    set_runs = setter("runs")
    set_steps = setter("steps")
    set_samples = setter("samples")
    set_merge_mode = setter("merge_mode")
    set_replay = setter("replay")
    set_lr_schedule = setter("lr_schedule")
    set_validation = setter("validation")
    set_report_to = setter("report_to")
    set_nproc = setter("nproc")
    set_strategy = setter("strategy")
    set_method = setter("method")
    set_beta = setter("beta")
    set_orpo_lambda = setter("orpo_lambda")

    @handler()
    def start(self):
        self.error = ""
        options = {"model": self.model.strip() or None, "report_to": self.report_to.strip() or None,
                   "nproc": nproc_value(self.nproc, "GPUs" if self.cuda else "Processes"),
                   "strategy": self.strategy or None, **method_options(self.method, self.beta, self.orpo_lambda)}  # fmt: skip
        settings = load_settings(**nest_options(options))
        files = [line.strip() for line in self.datasets.splitlines() if line.strip()]
        try:
            run = jobs.submit_multi_run(
                settings, files, num_runs=int(self.runs) if len(files) == 1 else None, steps_per_run=int(self.steps),
                samples_per_run=int(self.samples) if self.samples.strip() else None, merge_mode=self.merge_mode,
                replay=float(self.replay or 0), lr_schedule=self.lr_schedule, validation=float(self.validation),
                runs_root=runs_root(),
            )  # fmt: skip
        except ValueError as exc:  # a number field that does not hold a number
            raise BackpropError("INPUT_INVALID_ARGUMENT", reason=str(exc), hint="Type numbers in Runs, Steps per run, "
                                "Samples per run, Replay and Validation.") from None  # fmt: skip
        self.multi_run_id, self.children, self.merges, self.cells, self.bwt, self.average = run.id, [], [], [], "", ""
        self.loss = Plot()
        return MultiRunState.follow

    @handler()
    def reattach(self):
        if not self.multi_run_id:
            active = [r for r in Registry(load_settings().home).list(kind="multi-run") if r.status in ACTIVE]
            if not active:
                return
            self.multi_run_id = active[0].id
        return MultiRunState.follow

    @handler(background=True, busy="_following", claim=lambda state: state.multi_run_id)
    async def follow(self):
        """Follow the multi-run this handler claimed until it ends or the tab starts another."""
        async with self:
            multi_run_id = self._following
        registry = Registry(load_settings().home)
        progress = Progress(registry.get(multi_run_id).path / "events.jsonl")
        while True:
            view = await asyncio.to_thread(multi_run_view, registry, multi_run_id, progress)
            async with self:
                if self.multi_run_id != multi_run_id:
                    return
                assign_changed(self, view)
            if view["status"] not in ACTIVE:
                return
            await asyncio.sleep(1.0)
