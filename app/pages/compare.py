"""Compare: 2-6 runs side by side: loss and tokens/s curves on one step axis, final metrics, the parameters that differ."""

from __future__ import annotations

import reflex as rx

from app.components.charts import line_chart, status_pill
from app.components.layout import page
from app.state.compare import CompareState

METRICS = [("steps", "steps"), ("final_loss", "final loss"), ("eval_loss", "eval loss"), ("tokens_per_s", "tokens/s"),
           ("duration", "duration")]  # fmt: skip


def metrics_table() -> rx.Component:
    return rx.table.root(
        rx.table.header(rx.table.row(
            rx.table.column_header_cell(""), rx.table.column_header_cell("run"), rx.table.column_header_cell("kind"),
            rx.table.column_header_cell("status"), *[rx.table.column_header_cell(title) for _, title in METRICS],
            rx.cond(CompareState.has_bwt, rx.table.column_header_cell("BWT")),
        )),
        rx.table.body(rx.foreach(CompareState.runs, lambda r: rx.table.row(
            rx.table.cell(rx.box(width="12px", height="12px", border_radius="2px", background=r["color"])),
            rx.table.cell(rx.link(r["label"], href="/runs/" + r["id"])),
            rx.table.cell(r["kind"]), rx.table.cell(status_pill(r["status"])),
            *[rx.table.cell(r[key], class_name=f"metric-{key}") for key, _ in METRICS],
            rx.cond(CompareState.has_bwt, rx.table.cell(r["bwt"], class_name="metric-bwt")),
            custom_attrs={"data-run": r["id"]},
        ))),
        size="1", white_space="nowrap", width="100%", id="compare-metrics",
    )  # fmt: skip


def params_table() -> rx.Component:
    return rx.table.root(
        rx.table.header(rx.table.row(
            rx.table.column_header_cell("parameter"),
            rx.foreach(CompareState.runs, lambda r: rx.table.column_header_cell(r["label"])),
        )),
        rx.table.body(rx.foreach(CompareState.shown_params, lambda p: rx.table.row(
            rx.table.cell(p.name, weight=rx.cond(p.differs, "bold", "regular"), white_space="nowrap"),
            rx.foreach(p.cells, lambda v: rx.table.cell(v, word_break="break-all")),  # long hashes wrap, no column hides
            background=rx.cond(p.differs, rx.color("amber", 3), "transparent"),
            class_name=rx.cond(p.differs, "param-row differs", "param-row"), custom_attrs={"data-param": p.name},
        ))),
        size="1", width="100%", id="compare-params",
    )  # fmt: skip


def compare_page() -> rx.Component:
    return page(
        "Compare runs",
        rx.cond(CompareState.error != "", rx.callout(CompareState.error, color_scheme="red", id="compare-error")),
        rx.cond(
            CompareState.runs.length() > 0,
            rx.vstack(
                metrics_table(),
                rx.heading("Train loss", size="3"),
                line_chart(CompareState.train, height="220px", id="compare-train", empty="No training steps recorded."),
                rx.heading("Eval loss", size="3"),
                line_chart(CompareState.evals, height="180px", id="compare-eval",
                           empty="No eval loss recorded (the runs had no validation split)."),
                rx.heading("Tokens/s", size="3"),
                line_chart(CompareState.speed, height="160px", id="compare-speed", empty="No steps recorded."),
                rx.hstack(
                    rx.heading("Parameters", size="3"),
                    rx.text(CompareState.differing, " differ, ", CompareState.same, " the same", size="2",
                            color_scheme="gray"),
                    rx.spacer(),
                    rx.checkbox("Show all parameters", checked=CompareState.show_all, on_change=CompareState.set_show_all,
                                id="compare-show-all"),
                    width="100%", align="center",
                ),
                params_table(),
                width="100%", align="start",
            ),
            rx.cond(CompareState.error == "", rx.text("Pick 2 to 6 runs on the Runs page and press Compare.",
                                                     color_scheme="gray")),
        ),
    )  # fmt: skip
