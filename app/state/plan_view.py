"""A run's plan (training/plan.py, as `Plan.to_dict()` gives it and spec.json keeps it) as the pages show it: the
settings with their reasons, the peak memory against what is usable, the time estimate, notes and problems.

The Train page plans the form live (`plan_form`); a run's page shows the plan recorded in its spec.json
(`recorded_plan`). Both go through `plan_view`, so the two read the same."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.plan import duration

GIB = 2**30

# The plan's settings by the names the Train form gives them; the form fields they fill (placeholders).
LABELS = {"max_seq_length": "Max length (tokens)", "lora_r": "LoRA rank", "lora_alpha": "LoRA alpha",
          "qlora": "QLoRA", "gradient_checkpointing": "Gradient checkpointing", "batch_size": "Batch size",
          "gradient_accumulation": "Gradient accumulation", "lr": "Learning rate", "steps": "Steps",
          "epochs": "Epochs"}  # fmt: skip
FIELDS = {"steps": "steps", "lr": "learning_rate", "batch_size": "batch_size", "epochs": "epochs",
          "gradient_accumulation": "gradient_accumulation", "max_seq_length": "max_seq_length", "lora_r": "lora_r",
          "lora_alpha": "lora_alpha"}  # fmt: skip
# What a form field's placeholder says without a plan.
PLACEHOLDERS = {"steps": "model default", "learning_rate": "model default", "batch_size": "model default", "epochs": "1",
                "gradient_accumulation": "1", "max_seq_length": "model default", "lora_r": "16", "lora_alpha": "32"}  # fmt: skip
# A problem's hint names the command line's flags; the page names its fields.
FLAGS = {"--max-seq-length": "Max length", "--batch-size": "Batch size", "--gradient-accumulation": "Gradient accumulation",
         "--qlora": "QLoRA", "--lora-r": "LoRA rank", "--lr": "Learning rate"}  # fmt: skip


@dataclass
class PlanRow:
    setting: str
    value: str
    reason: str
    given: bool  # the user set it: the plan only checked it


@dataclass
class PlanProblem:
    code: str
    message: str
    hint: str


@dataclass
class PlanView:
    shown: bool = False  # False: no plan (none recorded, or not computed yet)
    title: str = ""  # "demo (sft) on CPU (2 cores), 22.0 of 23.5 GiB RAM available"
    facts: list[str] = field(default_factory=list)  # the model's size, the data's token lengths
    rows: list[PlanRow] = field(default_factory=list)
    memory: str = ""  # "~0.63 GiB peak of 18.7 GiB usable"
    memory_parts: str = ""  # weights, LoRA + optimizer, activations, logits (runtime)
    memory_percent: int = 0  # of the usable memory, at most 100 (the bar)
    fits: bool = True
    time: str = ""  # "~52 s: 300 steps, 76,800 tokens at ~1,479 tokens/s"
    time_source: str = ""  # where the speed comes from
    notes: list[str] = field(default_factory=list)
    problems: list[PlanProblem] = field(default_factory=list)
    placeholders: dict[str, str] = field(default_factory=lambda: dict(PLACEHOLDERS))  # Train form field -> planned value


def plan_view(plan: dict[str, Any] | None) -> PlanView:
    """What a page shows of `plan` (Plan.to_dict()); an empty view for None."""
    if not plan:
        return PlanView()
    model, data, memory, time = plan["model"], plan.get("data"), plan["memory"], plan.get("time")
    facts = [f"model: {_count(model['params'])} parameters, {model['layers']} layers, hidden {model['hidden']}, "
             f"vocabulary {model['vocab']:,}"]  # fmt: skip
    if data:
        unit = "pairs" if data.get("pairs") else "examples"
        sampled = f" (lengths of {data['sampled']:,} sampled)" if data["sampled"] < data["examples"] else ""
        facts.append(f"data: {data['examples']:,} {unit}; tokens p50 {data['p50']:,}, p95 {data['p95']:,}, "
                     f"max {data['max']:,}{sampled}")  # fmt: skip
    rows, placeholders = [], dict(PLACEHOLDERS)
    for name, choice in plan["choices"].items():
        value = _value(choice["value"])
        rows.append(PlanRow(LABELS.get(name, name), value, choice["reason"], bool(choice["given"])))
        if name in FIELDS and choice["value"] is not None:
            placeholders[FIELDS[name]] = value
    if "steps" in plan["choices"]:  # steps decide the length: epochs are not read
        placeholders["epochs"] = "steps decide"
    elif plan.get("steps"):  # epochs decide: the steps they make on this dataset
        placeholders["steps"] = f"{plan['steps']} from epochs"
    parts = [("weights", memory["weights"]), ("LoRA + optimizer", memory["adapter_and_optimizer"]),
             ("activations", memory["activations"]), ("logits", memory["logits"])]  # fmt: skip
    if memory.get("runtime"):
        parts.append(("runtime", memory["runtime"]))
    peak, usable = memory["peak"], max(1, memory["usable"])
    view = PlanView(
        shown=True,
        title=f"{model['name']} ({plan['method']}) on {plan['machine']['description']}",
        facts=facts,
        rows=rows,
        memory=f"~{_gib(peak)} GiB peak of {_gib(usable, 1)} GiB usable: {'fits' if memory['fits'] else 'does NOT fit'}",
        memory_parts=", ".join(f"{label} {_gib(n)}" for label, n in parts) + " GiB",
        memory_percent=min(100, max(1, round(100 * peak / usable))),
        fits=bool(memory["fits"]),
        notes=list(plan.get("notes") or []),
        problems=[PlanProblem(p["code"], p["message"], _in_form_words(p["hint"])) for p in plan.get("problems") or []],
        placeholders=placeholders,
    )
    if time:
        steps = f"{plan['steps']:,} steps, " if plan.get("steps") else ""
        view.time = (f"~{duration(time['seconds'])}: {steps}{time['tokens']:,} tokens at "
                     f"~{time['tokens_per_second']:,.0f} tokens/s")  # fmt: skip
        view.time_source = time["source"]
    return view


def plan_form(options: dict[str, Any], dataset: str | None, from_run: str | None = None) -> dict[str, Any]:
    """The plan `jobs.submit_train` will apply to the Train form's options (flat option names; None: not set) on
    `dataset` (None: no statistics), as a dict. Reads the model's config and tokenizer and the data: run it off the
    event loop. Raises BackpropError (a model that cannot be found, a number that is not one)."""
    from training import jobs
    from training.config import load_settings, nest_options

    settings = load_settings(**nest_options(options))
    return jobs.plan_run(settings, dataset, from_run=from_run).to_dict()


def recorded_plan(run_dir: Path) -> PlanView:
    """The plan a run was started with (spec.json "plan"); an empty view for a run without one."""
    try:
        spec = json.loads((run_dir / "spec.json").read_text())
    except (OSError, json.JSONDecodeError):
        return PlanView()
    return plan_view(spec.get("plan") if isinstance(spec, dict) else None)


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
        return str(int(value))  # 3.0 epochs reads as 3
    return str(value)


def _in_form_words(hint: str) -> str:
    for flag, label in FLAGS.items():
        hint = hint.replace(flag, label)
    return hint


def _gib(n: float, digits: int = 2) -> str:
    return f"{n / GIB:.{digits}f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
