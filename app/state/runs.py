"""The Runs page and a run's detail page: every run in the registry, from the browser or the command line."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import reflex as rx

from app.state.errors import handler
from app.state.follow import Progress, assign_changed
from app.state.plan_view import PlanView, recorded_plan
from app.state.plot import Plot
from training import jobs
from training.compare import MAX_RUNS, MIN_RUNS
from training.config import load_settings
from training.errors import BackpropError
from training.evaluate import METRICS, evaluate_run
from training.runs import ACTIVE, Registry
from training.tracking import read_tracking


def _registry() -> Registry:
    return Registry(load_settings().home)


class RunsState(rx.State):
    runs: list[dict[str, str]] = []
    status_filter: str = "all"
    search: str = ""
    selected: list[str] = []  # run ids ticked for the compare view, in the order they were ticked
    error: str = ""

    @rx.var
    def can_compare(self) -> bool:
        return MIN_RUNS <= len(self.selected) <= MAX_RUNS

    @handler()
    def toggle(self, run_id: str, checked: bool):
        others = [i for i in self.selected if i != run_id]
        self.selected = [*others, run_id] if checked else others

    @handler()
    def clear_selection(self):
        self.selected = []

    @handler()
    def compare(self):
        """Open the compare view of the ticked runs; its address names them, so it can be bookmarked or shared."""
        return rx.redirect("/compare?runs=" + ",".join(self.selected))

    @handler()
    def set_status_filter(self, value: str):
        self.status_filter = value
        return RunsState.load

    @handler()
    def set_search(self, value: str):
        self.search = value
        return RunsState.load

    @handler()
    def load(self):
        rows = []
        needle = self.search.strip().lower()
        for r in _registry().list(status=None if self.status_filter == "all" else self.status_filter):
            loss = r.final_loss if r.final_loss is not None else r.loss
            row = {"id": r.id, "name": r.name or "", "kind": r.kind, "status": r.status, "model": r.model or "",
                   "dataset": Path(r.dataset or "").name, "step": f"{r.step}/{r.max_steps or '?'}",
                   "loss": f"{loss:.4f}" if loss is not None else "-",
                   "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at))}  # fmt: skip
            if not needle or any(needle in str(v).lower() for v in row.values()):
                rows.append(row)
        self.runs = rows


def run_view(registry: Registry, run_id: str, progress: Progress | None) -> tuple[dict, Progress]:
    """What a run's page shows, from the registry and its events (read on from where `progress` stopped)."""
    run = registry.get(run_id)
    progress = progress or Progress(run.path / "events.jsonl")
    progress.gpus = run_gpus(run)  # known once admitted, before its first telemetry event
    progress.read()
    info = {"id": run.id, "name": run.name or "", "kind": run.kind, "status": run.status, "model": run.model or "",
            "dataset": run.dataset or "", "step": f"{run.step}/{run.max_steps or '?'}",
            "error": f"[{run.error_code}] {run.error_message}" if run.error_code else "",
            "reason": run.reason or "", "path": str(run.path),
            "stage": progress.stage if run.status in ACTIVE else ""}  # fmt: skip
    view = {
        "info": info,
        "params": [[k, str(v)] for k, v in sorted(run.params.items()) if v is not None],
        "loss": progress.loss_plot(),
        **progress.preference_plots(),  # empty for an SFT run: the page shows them only when they have points
        "log": progress.log[-40:],
        "telemetry": progress.telemetry_plot(),
        "checkpoints": [f"step {c.step}: {c.path}" for c in registry.checkpoints(run.id)],
        "exports": [f"{e['format']} {e['quantization'] or ''} {e['file'] or e['path']}" for e in registry.exports(run.id)],
        "tracking": tracked_in(read_tracking(run.path)),
        "plan": recorded_plan(run.path),
        **report_card(registry.latest_evaluation(run.id)),
    }
    return view, progress


def report_card(report: dict | None) -> dict:
    """The latest did-it-help report (training/evaluate.py) as the run page shows it: one row per metric (and per task
    of a multi-run) with base, tuned and the change, and the prompts with both answers side by side."""
    if report is None:
        return {"eval_summary": "", "eval_rows": [], "eval_examples": []}
    data = report["data"]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(report["created_at"]))
    scopes = [("all", report)] + [(task["task"], task) for task in report.get("tasks", [])]
    rows = []
    for scope, part in scopes:
        for key, label, higher in METRICS:
            if key in part["tuned"]:
                base, tuned = part["base"].get(key), part["tuned"].get(key)
                change = _change(base, tuned, higher)
                rows.append([scope if len(scopes) > 1 else "", label, _figure(base), _figure(tuned), change])
    examples = [{k: str(e.get(k, "")) for k in ("prompt", "reference", "base", "tuned")} for e in report["examples"]]
    summary = f"{data['examples']} held-out examples ({data['source']}, {data['kind']} data), evaluated {when}"
    return {"eval_summary": summary, "eval_rows": rows, "eval_examples": examples}


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _change(base: float | None, tuned: float | None, higher_is_better: bool) -> str:
    """The change from base to tuned, marked better or worse: "+0.95 better"."""
    if base is None or tuned is None:
        return "-"
    if tuned == base:
        return "same"
    better = tuned > base if higher_is_better else tuned < base
    return f"{tuned - base:+.4g} {'better' if better else 'worse'}"


def run_gpus(run) -> set[int] | None:
    """The GPUs a run held (the governor's pick), None when it ran on none or before the registry recorded them."""
    if run.gpus:
        return {int(i) for i in run.gpus.split(",")}
    return {run.gpu_index} if run.gpu_index is not None else None


def tracked_in(tracking: dict) -> list[str]:
    """Where a run was tracked (its tracking.json), one line per tracker, a failed one with its reason."""
    lines = []
    if tracking.get("tensorboard"):
        lines.append(f"TensorBoard: {tracking['tensorboard']}")
    if mlflow := tracking.get("mlflow"):
        lines.append(f"MLflow: run {mlflow.get('run_id')} at {mlflow.get('tracking_uri')}")
    if wandb := tracking.get("wandb"):
        lines.append(f"W&B: {wandb['url']}" if wandb.get("url") else f"W&B (offline): {wandb.get('offline_dir')}")
    lines += [f"{name}: failed ({reason})" for name, reason in (tracking.get("failed") or {}).items()]
    return lines


class RunDetailState(rx.State):
    found: bool = True
    info: dict[str, str] = {}
    params: list[list[str]] = []
    loss: Plot = Plot()
    reward_accuracy: Plot = Plot()  # a DPO/ORPO run's charts
    reward_margin: Plot = Plot()
    logps: Plot = Plot()
    log: list[str] = []
    checkpoints: list[str] = []
    exports: list[str] = []
    tracking: list[str] = []
    telemetry: Plot = Plot()
    plan: PlanView = PlanView()  # the plan the run was started with (spec.json); not shown when it has none
    eval_summary: str = ""  # the latest did-it-help report: what was measured, when
    eval_rows: list[list[str]] = []  # [task, metric, base, tuned, change]
    eval_examples: list[dict[str, str]] = []  # prompt, reference, base, tuned
    evaluating: bool = False
    eval_error: str = ""
    error: str = ""
    _following: str = ""

    @handler()
    def load(self):
        self.error = ""
        self.found = False  # until the run is read
        view, _ = run_view(_registry(), self.run_id, None)
        self.found = True
        assign_changed(self, view)
        if view["info"]["status"] in ACTIVE:
            return RunDetailState.follow

    @handler(background=True, busy="_following", claim=lambda state: state.run_id)
    async def follow(self):
        """While the run is active: its page follows it, once a second (a run deleted meanwhile shows its error)."""
        async with self:
            run_id = self._following
        registry, progress = _registry(), None
        while True:
            view, progress = await asyncio.to_thread(run_view, registry, run_id, progress)
            async with self:
                if self.run_id != run_id:
                    return
                assign_changed(self, view)
            if view["info"]["status"] not in ACTIVE:
                return
            await asyncio.sleep(1.0)

    @handler(background=True, busy="evaluating", error="eval_error")
    async def evaluate(self):
        """Base vs tuned on the run's held-out data (training/evaluate.py), off the event loop; the card shows the result."""
        async with self:
            run_id = self.run_id
        report = await asyncio.to_thread(evaluate_run, _registry(), run_id)
        async with self:
            if self.run_id == run_id:
                assign_changed(self, report_card(report))

    @handler()
    def stop(self):
        jobs.request_stop(_registry(), self.run_id)
        return RunDetailState.load

    @handler()
    def delete(self):
        """Forget a finished run and delete its folder (checkpoints, exports); an active run must be stopped first."""
        registry = _registry()
        run = registry.get(self.run_id)
        if run.status in ("queued", "running", "paused"):
            raise BackpropError("STATE_RUN_ACTIVE", run_id=run.id, status=run.status, pid=run.pid)
        for child in registry.children(run.id):
            registry.delete(child.id)
            shutil.rmtree(child.path, ignore_errors=True)
        registry.delete(run.id)
        shutil.rmtree(run.path, ignore_errors=True)
        return rx.redirect("/runs")

    @handler()
    def resume(self):
        jobs.resume(_registry(), self.run_id)
        return RunDetailState.load
