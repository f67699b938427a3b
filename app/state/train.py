"""The Train page: a form that submits a real training job, then follows its events live."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from itertools import islice
from pathlib import Path
from typing import Any

import reflex as rx

from app.folders import datasets_dir, runs_root
from app.state.errors import as_error, handler
from app.state.follow import Progress, assign_changed
from app.state.form import setter
from app.state.plan_view import PLACEHOLDERS, PlanView, plan_form, plan_view
from app.state.plot import Plot
from training import jobs
from training.config import load_settings, nest_options
from training.datasets import detect_format, iter_rows, resolve_path
from training.errors import BackpropError
from training.models import PRESETS
from training.runs import ACTIVE, Registry
from training.sandbox import inside

DEMO_DATASET = str(Path(__file__).resolve().parents[2] / "assets" / "demo" / "capitals.jsonl")


def model_choices() -> list[str]:
    """The demo model and every preset with its LoRA / QLoRA VRAM estimate, as the model picker shows them."""
    return ["demo  (built-in, CPU friendly)"] + [
        f"{p.hub_id}  (~{p.vram_gb()} GB VRAM, {p.vram_gb(qlora=True)} GB with QLoRA)" for p in PRESETS.values()
    ]


def detect(path: str) -> str:
    """The dataset's format from its first rows (a .jsonl file or a hub dataset is not read whole)."""
    try:
        rows = [r for _, r in islice(iter_rows(resolve_path(path, streaming=True)), 20) if isinstance(r, dict)]
    except BackpropError as exc:
        return f"[{exc.code}] {exc.message}"
    formats = {f for f in (detect_format(r) for r in rows) if f}
    return ", ".join(sorted(formats)) if formats else "unknown format"


UPDATE_EVERY_S = 1.0  # one state update a second: each one redraws the charts in the browser
PLAN_QUIET_S = 0.4  # the form plans once it has been left alone this long: typing plans once, not per keystroke
_SERVER = uuid.uuid4().hex  # a planning claim left by an earlier server process (restarted mid-plan) is stale


def adapter_runs(registry: Registry) -> list[dict[str, str]]:
    """The runs a new run can continue from: completed training runs and multi-runs with an adapter, newest first."""
    return [{"id": r.id, "label": f"{r.id}  {r.name or Path(r.dataset or '').name} · {r.model}"}
            for r in registry.list(status="completed") if r.kind in ("train", "multi-run")
            and (r.path / "adapter" / "adapter_model.safetensors").is_file()]  # fmt: skip


def _cuda_available() -> bool:
    """QLoRA and unsloth need an NVIDIA GPU; the page offers them only then (checked without importing torch)."""
    return shutil.which("nvidia-smi") is not None


def _replan(state: TrainState) -> Any:
    """A form change the plan depends on: ask for a new plan (TrainState.replan coalesces the requests)."""
    state._plan_asked += 1
    return TrainState.replan


class TrainState(rx.State):
    model: str = "demo"
    dataset: str = DEMO_DATASET
    steps: str = ""
    learning_rate: str = ""
    batch_size: str = ""
    max_run_minutes: str = "10"
    lora_r: str = ""  # empty fields are not set: the plan fills them
    validation_split: str = ""
    epochs: str = ""
    gradient_accumulation: str = ""
    max_seq_length: str = ""
    lora_alpha: str = ""
    lora_dropout: str = ""
    target_modules: str = "all-linear"
    report_to: str = ""  # empty: training.report_to from config or env (auto)
    nproc: str = ""  # "GPUs" on an NVIDIA machine, "processes" on CPU; empty: distributed.nproc from config (1)
    strategy: str = ""  # how several GPUs share the model (training.distributed.STRATEGIES); empty: from config (ddp)
    packing: bool = True
    response_only: bool = True
    qlora: str = "auto"  # auto (the plan decides: 4-bit when 16-bit weights do not fit), on or off
    use_unsloth: bool = True
    method: str = "sft"  # sft, dpo or orpo (training.method)
    beta: str = ""  # DPO only; empty: training.beta from config (0.1)
    orpo_lambda: str = ""  # ORPO only; empty: training.orpo_lambda from config (0.1)
    from_run: str = "none"  # a completed run whose adapter the run starts from (and DPO measures against)
    from_runs: list[dict[str, str]] = []  # the runs offered for that: {"id", "label"}
    cuda: bool = _cuda_available()

    run_id: str = ""
    status: str = ""
    step: int = 0
    max_steps: int = 0
    tokens_per_s: str = ""
    eta: str = ""
    loss: Plot = Plot()
    preference: bool = False  # the run trains on preference pairs: its reward charts are shown
    reward_accuracy: Plot = Plot()
    reward_margin: Plot = Plot()
    logps: Plot = Plot()
    log: list[str] = []
    error: str = ""
    hint: str = ""
    adapter: str = ""
    _following: str = ""
    models: list[str] = model_choices()
    sandbox_datasets: list[str] = []
    dataset_format: str = ""
    stage: str = ""  # what the run does before its first step ("downloading model 350 / 988 MB")

    plan: PlanView = PlanView()  # the plan of the form as it stands (jobs.submit_train applies the same)
    placeholders: dict[str, str] = dict(PLACEHOLDERS)  # a form field left empty shows its planned value
    planning: bool = False
    starting: bool = False  # Start pressed: the run is being planned and registered
    start_stage: str = ""  # what Start does meanwhile: "planning the run", "downloading dataset owner/x: 12 / 80 MB"
    plan_error: str = ""
    plan_hint: str = ""
    _plan_asked: int = 0  # form changes the plan depends on, counted
    _planner: str = ""  # the planning loop of this tab (its claim), "" when none runs

    @rx.var
    def running(self) -> bool:
        return self.status in ACTIVE

    @rx.var
    def percent(self) -> int:
        return int(100 * self.step / self.max_steps) if self.max_steps else 0

    # The fields the plan reads replan when they change.
    set_model = setter("model", then=_replan)
    set_dataset = setter("dataset", then=_replan)
    set_steps = setter("steps", then=_replan)
    set_learning_rate = setter("learning_rate", then=_replan)
    set_batch_size = setter("batch_size", then=_replan)
    set_max_run_minutes = setter("max_run_minutes")
    set_lora_r = setter("lora_r", then=_replan)
    set_validation_split = setter("validation_split")
    set_epochs = setter("epochs", then=_replan)
    set_gradient_accumulation = setter("gradient_accumulation", then=_replan)
    set_max_seq_length = setter("max_seq_length", then=_replan)
    set_lora_alpha = setter("lora_alpha", then=_replan)
    set_lora_dropout = setter("lora_dropout")
    set_target_modules = setter("target_modules", then=_replan)
    set_report_to = setter("report_to")
    set_nproc = setter("nproc")
    set_strategy = setter("strategy")
    set_packing = setter("packing", bool, then=_replan)
    set_response_only = setter("response_only", bool)
    set_qlora = setter("qlora", then=_replan)
    set_use_unsloth = setter("use_unsloth", bool)
    set_method = setter("method", then=_replan)
    set_beta = setter("beta")
    set_orpo_lambda = setter("orpo_lambda")

    @handler(hint="hint")
    def pick_model(self, label: str):
        self.model = label.split("  ")[0]
        return _replan(self)

    @handler(hint="hint")
    def pick_dataset(self, name: str):
        self.dataset = str(inside(datasets_dir(), name))
        self.dataset_format = detect(self.dataset)
        return _replan(self)

    @handler(hint="hint")
    def pick_from_run(self, run_id: str):
        """Continue from a finished run: the new run trains that run's model (shown in Model), on its adapter."""
        self.from_run = run_id
        if run_id != "none":
            self.model = Registry(load_settings().home).get(run_id).model or self.model
        return _replan(self)

    @handler(hint="hint")
    def check_dataset(self):
        self.dataset_format = detect(self.dataset.strip()) if self.dataset.strip() else ""

    @handler(background=True, busy="starting", hint="hint")
    async def start(self):
        """Plan, register and launch the form's run off the event loop: the plan reads the model's tokenizer and the
        data (a hub dataset downloads first), a second or minutes; Start stays disabled meanwhile."""
        async with self:
            options, dataset = self._options(), self.dataset.strip()
            from_run = self.from_run if self.from_run != "none" else None
        settings = load_settings(**nest_options(options))  # a value out of range is CONFIG_INVALID here, beside Start
        async with self:
            self.start_stage = "planning the run"
        loop, ended = asyncio.get_running_loop(), False

        async def show(message: str) -> None:
            async with self:
                if not ended:  # a late message must not outlive the start
                    self.start_stage = message

        def on_download(event: str, durable: bool = False, **fields: Any) -> None:  # in the plan's thread
            asyncio.run_coroutine_threadsafe(show(fields["message"]), loop)

        try:
            run = await asyncio.to_thread(jobs.submit_train, settings, dataset, runs_root=runs_root(), from_run=from_run,
                                          on_download=on_download)  # fmt: skip
        finally:
            async with self:
                ended, self.start_stage = True, ""
        async with self:
            self._attach(run.id)
        return TrainState.follow

    def _options(self) -> dict[str, Any]:
        """The form as flat options (None: left empty, not set); a field that does not read is INPUT_INVALID_ARGUMENT."""
        return {"model": self.model.strip() or None, "steps": _int(self.steps, "Steps"),
                   "lr": _float(self.learning_rate, "Learning rate"), "batch_size": _int(self.batch_size, "Batch size"),
                   "max_run_minutes": _float(self.max_run_minutes, "Time box"), "lora_r": _int(self.lora_r, "LoRA rank"),
                   "packing": self.packing, "response_only": self.response_only,
                   "validation_split": _float(self.validation_split, "Validation split"),
                   "epochs": _float(self.epochs, "Epochs"),
                   "gradient_accumulation": _int(self.gradient_accumulation, "Gradient accumulation"),
                   "max_seq_length": _int(self.max_seq_length, "Max length"),
                   "lora_alpha": _int(self.lora_alpha, "LoRA alpha"), "lora_dropout": _float(self.lora_dropout, "LoRA dropout"),
                   "target_modules": _targets(self.target_modules),
                   "qlora": {"on": True, "off": False}.get(self.qlora) if self.cuda else None,
                   "use_unsloth": self.use_unsloth if self.cuda else None,
                   "report_to": self.report_to.strip() or None,
                   "nproc": nproc_value(self.nproc, "GPUs" if self.cuda else "Processes"),
                   "strategy": self.strategy or None, **method_options(self.method, self.beta, self.orpo_lambda)}  # fmt: skip

    @handler(background=True, error="plan_error", hint="plan_hint")
    async def replan(self):
        """Plan the form's run off the event loop (the model's config and tokenizer, the data: a second or more).

        Form changes only count requests (`_replan`); one loop per tab plans the form as it stands once it has been
        left alone for PLAN_QUIET_S, and plans again if it changed meanwhile: typing never queues plans."""
        claim = f"{_SERVER}:{uuid.uuid4().hex}"
        async with self:
            if self._planner.startswith(_SERVER):
                return  # this tab's loop runs: it sees the new request
            self._planner, self.planning = claim, True
        try:
            while True:
                async with self:
                    asked = self._plan_asked
                await asyncio.sleep(PLAN_QUIET_S)
                async with self:
                    if self._plan_asked != asked:
                        continue  # still typing
                    form = self._plan_input()
                view, error, hint = await asyncio.to_thread(_planned_view, *form)
                async with self:
                    if self._plan_asked == asked:  # else the form changed while planning: plan it again
                        assign_changed(self, {"plan": view, "plan_error": error, "plan_hint": hint,
                                              "placeholders": view.placeholders})  # fmt: skip
                        self._planner, self.planning = "", False
                        return
        finally:
            async with self:
                if self._planner == claim:  # ended by an error or a cancel: free the tab for the next plan
                    self._planner, self.planning = "", False

    def _plan_input(self) -> tuple[dict[str, Any] | BackpropError, str | None, str | None]:
        try:
            options: dict[str, Any] | BackpropError = self._options()
        except BackpropError as exc:
            options = exc
        return options, self.dataset.strip() or None, self.from_run if self.from_run != "none" else None

    @handler(hint="hint")
    def stop(self):
        if self.run_id:
            jobs.request_stop(Registry(load_settings().home), self.run_id)

    @handler(hint="hint")
    def reattach(self):
        """On page load: follow this tab's run, or the newest training run still active (started anywhere)."""
        self.sandbox_datasets = sorted(p.name for p in datasets_dir().iterdir() if not p.name.startswith("."))
        self.from_runs = adapter_runs(Registry(load_settings().home))
        self.check_dataset()
        plan = _replan(self)
        if not self.run_id:
            active = [r for r in Registry(load_settings().home).list(kind="train") if r.status in ACTIVE]
            if not active:
                return plan
            self._attach(active[0].id)
        return [plan, TrainState.follow]

    def _attach(self, run_id: str) -> None:
        self.run_id, self.status, self.step, self.max_steps, self.stage = run_id, "queued", 0, 0, ""
        self.loss, self.log, self.adapter, self.tokens_per_s, self.eta = Plot(), [], "", "", ""
        self.preference, self.reward_accuracy, self.reward_margin, self.logps = False, Plot(), Plot(), Plot()

    @handler(background=True, busy="_following", claim=lambda state: state.run_id, hint="hint")
    async def follow(self):
        """Follow the tab's run (the id this handler claimed) until it ends or the tab moves on to another run."""
        async with self:
            run_id = self._following
        registry = Registry(load_settings().home)
        progress = Progress(registry.get(run_id).path / "events.jsonl")
        while True:
            changed = await asyncio.to_thread(progress.read)
            ended = (await asyncio.to_thread(registry.get, run_id)).status not in ACTIVE
            if ended:
                await asyncio.to_thread(progress.read)  # the last words
                progress.status = (await asyncio.to_thread(registry.get, run_id)).status
                finished = await asyncio.to_thread(adapter_runs, registry)  # it may be continued from now
            async with self:
                if self.run_id != run_id:
                    return  # the tab moved on to another run
                if changed or ended:
                    self._show(progress)
                if ended:
                    self.from_runs = finished
            if ended:
                return
            await asyncio.sleep(UPDATE_EVERY_S)

    def _show(self, progress: Progress) -> None:
        shown = {"status": progress.status, "step": progress.step, "max_steps": progress.max_steps,
                 "loss": progress.loss_plot(), "log": progress.log, "adapter": progress.adapter, "eta": progress.eta,
                 "tokens_per_s": f"{progress.tokens_per_s:.0f} tok/s" if progress.tokens_per_s else "",
                 "preference": progress.preference, "stage": progress.stage if progress.status in ACTIVE else "",
                 **progress.preference_plots()}  # fmt: skip
        if progress.error:
            shown |= {"error": progress.error, "hint": progress.hint}
        assign_changed(self, shown)


def _planned_view(options: dict[str, Any] | BackpropError, dataset: str | None,
                  from_run: str | None) -> tuple[PlanView, str, str]:  # fmt: skip
    """The plan of the form's options as the page shows it, or the empty plan and the coded error that stopped it."""
    try:
        if isinstance(options, BackpropError):
            raise options
        return plan_view(plan_form(options, dataset, from_run)), "", ""
    except Exception as exc:  # a plan that cannot be made is shown in the panel; a bug is logged too
        shown = as_error(exc, "TrainState.replan")
        return PlanView(), f"[{shown.code}] {shown.message}", shown.hint


def method_options(method: str, beta: str, orpo_lambda: str) -> dict[str, Any]:
    """The method and its own hyperparameter (beta for DPO, lambda for ORPO); the other's field is not read."""
    return {"method": method or None, "beta": _float(beta, "Beta") if method == "dpo" else None,
            "orpo_lambda": _float(orpo_lambda, "Lambda") if method == "orpo" else None}  # fmt: skip


def nproc_value(text: str, label: str) -> int | str | None:
    """The GPUs (processes) field: a whole number of at least 1, or auto; None when left empty."""
    text = text.strip().lower()
    if text == "auto":
        return text
    value = _int(text, label)
    if value is not None and value < 1:
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"{label}: {value} is less than 1",
                            hint=f"Type 1 or more in {label}, auto, or leave it empty for one.")  # fmt: skip
    return value


def _targets(text: str) -> list[str] | str | None:
    text = text.strip()
    if not text:
        return None
    return text if text == "all-linear" else [t.strip() for t in text.split(",") if t.strip()]


def _int(text: str, label: str) -> int | None:
    return _number(text, label, int, "a whole number")


def _float(text: str, label: str) -> float | None:
    return _number(text, label, float, "a number")


def _number(text: str, label: str, kind: type, what: str):
    """A number typed in a form field, None when left empty; anything else is INPUT_INVALID_ARGUMENT."""
    if not text.strip():
        return None
    try:
        return kind(text)
    except ValueError:
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"{label}: '{text.strip()}' is not {what}",
                            hint=f"Type {what} in {label}, or leave it empty for the default.") from None  # fmt: skip
