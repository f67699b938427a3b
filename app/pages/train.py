"""Train: model, dataset and the main settings; Start and Stop; live status, progress, loss chart and event log."""

from __future__ import annotations

import reflex as rx

from app.components.charts import line_chart, preference_charts, progress_bar, status_pill
from app.components.layout import page
from app.components.plan import plan_details, plan_problems
from app.state.train import TrainState
from training.distributed import STRATEGIES


def field(label: str, name: str, value: rx.Var, placeholder: str | rx.Var = "", width: str = "160px") -> rx.Component:
    return rx.vstack(
        rx.text(label, size="1", weight="medium"),
        rx.input(value=value, placeholder=placeholder, on_change=getattr(TrainState, f"set_{name}"), id=f"field-{name}",
                 width=width),
        spacing="1",
    )  # fmt: skip


METHODS = [("sft", "SFT (supervised)"), ("dpo", "DPO (preference pairs)"), ("orpo", "ORPO (preference pairs)")]


def method_select(value: rx.Var, on_change, id: str) -> rx.Component:
    """The training method: SFT on conversations, or DPO / ORPO on preference pairs (prompt, chosen, rejected)."""
    return rx.vstack(
        rx.text("Method", size="1", weight="medium"),
        rx.select.root(rx.select.trigger(id=id),
                       rx.select.content(*[rx.select.item(label, value=key) for key, label in METHODS]),
                       value=value, on_change=on_change),
        spacing="1",
    )  # fmt: skip


def preference_settings() -> rx.Component:
    """Method, its hyperparameter, and the finished run to continue from."""
    return rx.hstack(
        method_select(TrainState.method, TrainState.set_method, "field-method"),
        rx.cond(TrainState.method == "dpo", field("Beta (DPO)", "beta", TrainState.beta, "0.1")),
        rx.cond(TrainState.method == "orpo", field("Lambda (ORPO)", "orpo_lambda", TrainState.orpo_lambda, "0.1")),
        rx.vstack(
            rx.text("Continue from run", size="1", weight="medium"),
            rx.select.root(
                rx.select.trigger(id="field-from-run", min_width="200px"),
                rx.select.content(rx.select.item("none (start from the base model)", value="none"),
                                  rx.foreach(TrainState.from_runs, lambda r: rx.select.item(r["label"], value=r["id"]))),
                value=TrainState.from_run, on_change=TrainState.pick_from_run,
            ),
            spacing="1",
        ),
        wrap="wrap", align="end",
    )  # fmt: skip


def form() -> rx.Component:
    return rx.card(
        rx.vstack(
            rx.hstack(
                field("Model", "model", TrainState.model, "demo, a preset, a hub id or a folder", width="280px"),
                rx.vstack(rx.text("Presets", size="1", weight="medium"),
                          rx.select(TrainState.models, placeholder="pick a preset", on_change=TrainState.pick_model,
                                    id="model-presets"), spacing="1"),
                wrap="wrap", align="end",
            ),
            rx.hstack(
                field("Dataset", "dataset", TrainState.dataset, "a .jsonl/.json/.csv/.parquet/.txt file", width="420px"),
                rx.vstack(rx.text("Uploaded datasets", size="1", weight="medium"),
                          rx.select(TrainState.sandbox_datasets, placeholder="upload on the Dataset page",
                                    on_change=TrainState.pick_dataset, id="dataset-picker"), spacing="1"),
                rx.button("Check", on_click=TrainState.check_dataset, variant="soft"),
                rx.text(TrainState.dataset_format, size="2", color_scheme="gray", id="dataset-format"),
                wrap="wrap", align="end",
            ),
            rx.hstack(
                field("Steps", "steps", TrainState.steps, planned("steps")),
                field("Learning rate", "learning_rate", TrainState.learning_rate, planned("learning_rate")),
                field("Batch size", "batch_size", TrainState.batch_size, planned("batch_size")),
                field("Time box (minutes)", "max_run_minutes", TrainState.max_run_minutes, "0: none"),
                rx.cond(TrainState.cuda, field("GPUs", "nproc", TrainState.nproc, "1, 2, ... or auto"),
                        field("Processes", "nproc", TrainState.nproc, "1")),
                rx.vstack(rx.text("Spread over them", size="1", weight="medium"),
                          rx.select(list(STRATEGIES), value=TrainState.strategy, on_change=TrainState.set_strategy,
                                    placeholder="ddp", id="field-strategy"), spacing="1"),
                wrap="wrap",
            ),
            preference_settings(),
            rx.accordion.root(
                rx.accordion.item(
                    header="Advanced",
                    content=rx.hstack(
                        field("Epochs (when no steps)", "epochs", TrainState.epochs, planned("epochs")),
                        field("Gradient accumulation", "gradient_accumulation", TrainState.gradient_accumulation,
                              planned("gradient_accumulation")),
                        field("Max length (tokens)", "max_seq_length", TrainState.max_seq_length, planned("max_seq_length")),
                        field("LoRA rank", "lora_r", TrainState.lora_r, planned("lora_r")),
                        field("LoRA alpha", "lora_alpha", TrainState.lora_alpha, planned("lora_alpha")),
                        field("LoRA dropout", "lora_dropout", TrainState.lora_dropout, "0"),
                        field("Target modules", "target_modules", TrainState.target_modules, "all-linear or q_proj,v_proj",
                              width="220px"),
                        field("Validation split", "validation_split", TrainState.validation_split, "0: none"),
                        field("Report to", "report_to", TrainState.report_to, "auto, none or tensorboard,mlflow,wandb",
                              width="260px"),
                        rx.checkbox("Packing", checked=TrainState.packing,
                                    on_change=TrainState.set_packing),
                        rx.checkbox("Loss on replies only", checked=TrainState.response_only,
                                    on_change=TrainState.set_response_only),
                        rx.cond(TrainState.cuda, rx.hstack(
                            rx.vstack(rx.text("QLoRA (4-bit)", size="1", weight="medium"),
                                      rx.select(["auto", "on", "off"], value=TrainState.qlora, on_change=TrainState.set_qlora,
                                                id="field-qlora"), spacing="1"),
                            rx.checkbox("unsloth when installed", checked=TrainState.use_unsloth,
                                        on_change=TrainState.set_use_unsloth),
                        ), rx.text("QLoRA and unsloth need an NVIDIA GPU.", size="1", color_scheme="gray")),
                        align="end", wrap="wrap",
                    ),
                ),
                collapsible=True, type="single", variant="ghost", width="100%",
            ),
            plan_panel(),
            rx.hstack(
                rx.button("Start training", on_click=TrainState.start, disabled=TrainState.running | TrainState.starting,
                          loading=TrainState.starting, id="start"),
                rx.button("Stop", on_click=TrainState.stop, disabled=~TrainState.running, color_scheme="red", variant="soft",
                          id="stop"),
                rx.text(TrainState.start_stage, color_scheme="purple", size="2", id="start-stage"),
                align="center",
            ),
            rx.cond(TrainState.error != "",
                    rx.callout(rx.vstack(rx.text(TrainState.error, weight="bold"), rx.text(TrainState.hint, size="1")),
                               color_scheme="red", id="train-error")),
            spacing="3", width="100%",
        ),
        width="100%",
    )  # fmt: skip


def planned(name: str) -> rx.Var:
    """A field left empty shows the plan's value for it (the plan fills it at the start)."""
    return TrainState.placeholders[name]


def plan_panel() -> rx.Component:
    """The plan of the form as it stands, updated as it changes: what Start will use, why, and whether it fits."""
    return rx.vstack(
        rx.hstack(rx.heading("Plan", size="3"),
                  rx.text("Empty fields get the plan's value; what you type wins and is checked.", size="1",
                          color_scheme="gray"),
                  rx.cond(TrainState.planning, rx.hstack(rx.spinner(size="1"), rx.text("planning...", size="1"),
                                                         id="plan-busy", align="center")),
                  align="center", wrap="wrap"),
        rx.cond(TrainState.plan_error != "",
                rx.callout(rx.vstack(rx.text(TrainState.plan_error, weight="bold"), rx.text(TrainState.plan_hint, size="1")),
                           color_scheme="red", id="plan-error")),
        rx.cond(TrainState.plan.shown, plan_details(TrainState.plan)),
        plan_problems(TrainState.plan),
        width="100%", spacing="2", id="plan-panel",
    )  # fmt: skip


def progress() -> rx.Component:
    return rx.cond(
        TrainState.run_id != "",
        rx.card(
            rx.vstack(
                rx.hstack(
                    rx.text("Run ", rx.link(TrainState.run_id, href="/runs/" + TrainState.run_id, id="train-run-id"),
                            weight="medium"),
                    status_pill(TrainState.status, id="status-pill"),
                    rx.text(TrainState.step, " / ", TrainState.max_steps, " steps", id="step-count"),
                    rx.text(TrainState.tokens_per_s, color_scheme="gray"),
                    rx.text(TrainState.eta, color_scheme="gray"),
                    rx.text(TrainState.stage, color_scheme="purple", id="train-stage"),
                    align="center", wrap="wrap",
                ),
                progress_bar(TrainState.percent),
                line_chart(TrainState.loss, id="loss-chart", empty="The loss curve appears with the first steps."),
                rx.cond(TrainState.preference, preference_charts(TrainState.reward_accuracy, TrainState.reward_margin,
                                                                 TrainState.logps, id="train-preference")),
                rx.cond(TrainState.adapter != "", rx.vstack(
                    rx.text("Adapter saved: ", rx.code(TrainState.adapter), size="2"),
                    rx.hstack(
                        rx.link(rx.button("Export", variant="soft"), href="/export?run=" + TrainState.run_id),
                        rx.link(rx.button("Chat with it", variant="soft"), href="/chat?source=" + TrainState.run_id),
                        rx.link(rx.button("Open the run", variant="soft"), href="/runs/" + TrainState.run_id),
                    ),
                )),
                rx.scroll_area(
                    rx.vstack(rx.foreach(TrainState.log, lambda line: rx.text(line, size="1", font_family="monospace")),
                              spacing="0"),
                    type="auto", scrollbars="vertical", style={"height": "160px"}, id="event-log",
                ),
                width="100%",
            ),
            width="100%",
        ),
        rx.text("Nothing is training. Pick a model and a dataset (the demo ones are filled in) and press Start training.",
                color_scheme="gray"),
    )  # fmt: skip


def train_page() -> rx.Component:
    return page("Train", form(), progress())
