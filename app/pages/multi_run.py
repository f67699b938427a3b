"""Multi-Run: a continual multi-run (one dataset in windows, or one file per run); runs, merges, forgetting heatmap."""

from __future__ import annotations

import reflex as rx

from app.components.charts import line_chart, status_pill
from app.components.layout import page
from app.pages.train import method_select
from app.state.multi_run import MultiRunState
from training.distributed import STRATEGIES


def field(label: str, name: str, value: rx.Var, width: str = "120px") -> rx.Component:
    return rx.vstack(rx.text(label, size="1", weight="medium"),
                     rx.input(value=value, on_change=getattr(MultiRunState, f"set_{name}"), width=width, id=f"mr-{name}"),
                     spacing="1")  # fmt: skip


def choice(label: str, name: str, value: rx.Var, options: list[str]) -> rx.Component:
    control = rx.select(options, value=value, on_change=getattr(MultiRunState, f"set_{name}"))
    return rx.vstack(rx.text(label, size="1", weight="medium"), control, spacing="1")


HEADERS = {"lam": "λ", "a": "‖A‖ before → after", "b": "‖B‖ before → after", "loss": "final loss"}


def table(rows: rx.Var, columns: list[str], id: str) -> rx.Component:
    return rx.table.root(
        rx.table.header(rx.table.row(*[rx.table.column_header_cell(HEADERS.get(c, c)) for c in columns])),
        rx.table.body(rx.foreach(rows, lambda r: rx.table.row(*[
            rx.table.cell(status_pill(r[c]) if c == "status" else r[c]) for c in columns]))),
        size="1", id=id,
    )  # fmt: skip


def multi_run_page() -> rx.Component:
    return page(
        "Multi-Run",
        rx.card(rx.vstack(
            rx.vstack(rx.text("Datasets: one file to cut into windows, or one file per run (one per line)", size="1",
                              weight="medium"),
                      rx.text_area(value=MultiRunState.datasets, on_change=MultiRunState.set_datasets,
                                   width="100%", rows="3"), width="100%", spacing="1"),
            rx.hstack(
                field("Model", "model", MultiRunState.model, "200px"), field("Runs", "runs", MultiRunState.runs),
                field("Steps per run", "steps", MultiRunState.steps), field("Samples per run", "samples", MultiRunState.samples),
                choice("Merge", "merge_mode", MultiRunState.merge_mode, ["slao", "sequential"]),
                field("Replay", "replay", MultiRunState.replay),
                choice("LR across runs", "lr_schedule", MultiRunState.lr_schedule, ["constant", "linear", "cosine"]),
                field("Validation", "validation", MultiRunState.validation),
                rx.cond(MultiRunState.cuda, field("GPUs", "nproc", MultiRunState.nproc),
                        field("Processes", "nproc", MultiRunState.nproc)),
                rx.vstack(rx.text("Spread over them", size="1", weight="medium"),
                          rx.select(list(STRATEGIES), value=MultiRunState.strategy, on_change=MultiRunState.set_strategy,
                                    placeholder="ddp", id="mr-strategy"), spacing="1"),
                method_select(MultiRunState.method, MultiRunState.set_method, "mr-method"),
                rx.cond(MultiRunState.method == "dpo", field("Beta (DPO)", "beta", MultiRunState.beta)),
                rx.cond(MultiRunState.method == "orpo", field("Lambda (ORPO)", "orpo_lambda", MultiRunState.orpo_lambda)),
                wrap="wrap",
            ),
            rx.accordion.root(
                rx.accordion.item(header="Advanced", content=rx.hstack(
                    rx.vstack(rx.text("Report to", size="1", weight="medium"),
                              rx.input(value=MultiRunState.report_to, on_change=MultiRunState.set_report_to, width="260px",
                                       placeholder="auto, none or tensorboard,mlflow,wandb", id="mr-report_to"),
                              spacing="1"),
                    wrap="wrap",
                )),
                collapsible=True, type="single", variant="ghost", width="100%",
            ),
            rx.button("Start multi-run", on_click=MultiRunState.start, id="mr-start"),
            rx.cond(MultiRunState.error != "", rx.callout(MultiRunState.error, color_scheme="red", id="mr-error")),
            width="100%",
        ), width="100%"),
        rx.cond(
            MultiRunState.multi_run_id != "",
            rx.vstack(
                rx.hstack(rx.text("Multi-run ", rx.link(MultiRunState.multi_run_id, href="/runs/" + MultiRunState.multi_run_id)),
                          status_pill(MultiRunState.status, id="mr-status"), rx.text(MultiRunState.step, " steps"),
                          align="center"),
                line_chart(MultiRunState.loss, height="200px", id="mr-loss", empty="The loss appears with the first steps."),
                table(MultiRunState.children, ["run", "id", "status", "step", "loss"], "mr-runs"),
                rx.text("Merge timeline", weight="bold", size="2"),
                table(MultiRunState.merges, ["run", "lam", "a", "b"], "mr-merges"),
                rx.text("Forgetting matrix: eval loss of task j (column) after run i (row)", weight="bold", size="2"),
                rx.grid(rx.foreach(MultiRunState.cells, lambda c: rx.box(rx.text(c["text"], size="1"), background=c["color"],
                                                                         padding="6px", text_align="center")),
                        columns=MultiRunState.columns, spacing="1", width="60%", id="mr-heatmap"),
                rx.cond(MultiRunState.bwt != "", rx.text("BWT (on loss; above 0 means forgetting) ", MultiRunState.bwt,
                                                         " · average loss ", MultiRunState.average, id="mr-bwt")),
                width="100%", align="start",
            ),
            rx.text("Start a multi-run to see its runs, the merges and the forgetting matrix here.", color_scheme="gray"),
        ),
    )  # fmt: skip
