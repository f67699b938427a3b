"""Runs: every run in the registry with a status filter and search; a run's page with its curve and actions."""

from __future__ import annotations

import reflex as rx

from app.components.charts import line_chart, preference_charts, status_pill
from app.components.layout import page
from app.components.plan import plan_details, plan_problems
from app.state.runs import RunDetailState, RunsState

STATUSES = ["all", "queued", "running", "paused", "completed", "failed", "stopped", "timeboxed", "interrupted"]


def runs_page() -> rx.Component:
    columns = ["id", "name", "kind", "status", "model", "dataset", "step", "loss", "created"]
    return page(
        "Runs",
        rx.hstack(
            rx.select(STATUSES, value=RunsState.status_filter, on_change=RunsState.set_status_filter, id="status-filter"),
            rx.input(placeholder="search", value=RunsState.search, on_change=RunsState.set_search, id="run-search",
                     debounce_timeout=50),
            rx.button("Refresh", on_click=RunsState.load, variant="soft"),
            rx.spacer(),
            rx.text(RunsState.selected.length(), " selected (2 to 6 to compare)", size="2", color_scheme="gray",
                    id="runs-selected"),
            rx.button("Clear", on_click=RunsState.clear_selection, variant="soft", disabled=RunsState.selected.length() == 0),
            rx.button("Compare", on_click=RunsState.compare, disabled=~RunsState.can_compare, id="compare-runs"),
            width="100%", align="center",
        ),
        rx.cond(RunsState.error != "", rx.callout(RunsState.error, color_scheme="red", id="runs-error")),
        rx.cond(
            RunsState.runs.length() > 0,
            rx.table.root(
                rx.table.header(rx.table.row(rx.table.column_header_cell(""),
                                             *[rx.table.column_header_cell(c) for c in columns])),
                rx.table.body(
                    rx.foreach(RunsState.runs, lambda r: rx.table.row(
                        rx.table.cell(rx.checkbox(checked=RunsState.selected.contains(r["id"]),
                                                  on_change=lambda checked: RunsState.toggle(r["id"], checked),
                                                  class_name="run-select", custom_attrs={"data-run": r["id"]})),
                        rx.table.cell(rx.link(r["id"], href="/runs/" + r["id"])),
                        *[rx.table.cell(status_pill(r["status"]) if c == "status" else r[c]) for c in columns[1:]],
                    )),
                ),
                size="1", white_space="nowrap", width="100%", id="runs-table",  # narrow windows scroll it sideways
            ),
            rx.text("No runs yet. Start one on the Train page, or with `backprop train --model demo`.", color_scheme="gray"),
        ),
    )  # fmt: skip


def report_card() -> rx.Component:
    """Did it help? The latest evaluation: base vs tuned per metric, then prompts with both answers side by side."""
    return rx.card(
        rx.vstack(
            rx.heading("Did it help?", size="3"),
            rx.text(RunDetailState.eval_summary, size="1", color_scheme="gray", id="eval-summary"),
            rx.table.root(
                rx.table.header(rx.table.row(*[rx.table.column_header_cell(c) for c in ("", "metric", "base", "tuned",
                                                                                        "change")])),
                rx.table.body(rx.foreach(RunDetailState.eval_rows, lambda r: rx.table.row(
                    rx.table.cell(r[0]), rx.table.cell(r[1]), rx.table.cell(r[2]), rx.table.cell(r[3], weight="bold"),
                    rx.table.cell(r[4], color=rx.cond(r[4].contains("better"), "var(--green-11)",
                                                      rx.cond(r[4].contains("worse"), "var(--red-11)", "inherit"))),
                ))),
                size="1", id="eval-metrics",
            ),
            rx.foreach(RunDetailState.eval_examples, lambda e: rx.vstack(
                rx.text(e["prompt"], size="2", weight="bold"),
                rx.grid(_answer("reference", e["reference"], "gray"), _answer("base", e["base"], "orange"),
                        _answer("tuned", e["tuned"], "green"), columns="3", spacing="3", width="100%"),
                spacing="1", width="100%", class_name="eval-example",
            )),
            width="100%", align="start",
        ),
        width="100%", id="eval-card",
    )  # fmt: skip


def _answer(label: str, text: rx.Var, scheme: str) -> rx.Component:
    return rx.vstack(rx.text(label, size="1", weight="medium", color_scheme=scheme),
                     rx.text(text, size="2", white_space="pre-wrap"), spacing="1", align="start", width="100%")  # fmt: skip


def run_detail_page() -> rx.Component:
    info = RunDetailState.info
    active = (info["status"] == "queued") | (info["status"] == "running") | (info["status"] == "paused")
    return page(
        "Run",
        rx.cond(
            RunDetailState.found,
            rx.vstack(
                rx.hstack(rx.heading(info["id"], size="4"), rx.text(info["name"]), status_pill(info["status"], id="run-status"),
                          rx.text(info["step"], " steps", id="run-step"), align="center"),
                rx.text(info["model"], " · ", info["dataset"], color_scheme="gray", size="2"),
                rx.cond(RunDetailState.tracking.length() > 0, rx.hstack(
                    rx.text("Tracked in", size="2", weight="medium"),
                    rx.vstack(rx.foreach(RunDetailState.tracking, lambda t: rx.text(t, size="1", font_family="monospace")),
                              spacing="0"),
                    align="baseline", id="run-tracking",
                )),
                rx.cond(info["reason"] != "", rx.text(info["reason"], color_scheme="purple")),
                rx.cond(info["stage"] != "", rx.text(info["stage"], color_scheme="purple", id="run-stage")),
                rx.cond(info["error"] != "", rx.callout(info["error"], color_scheme="red")),
                rx.hstack(
                    rx.button("Stop", on_click=RunDetailState.stop, variant="soft", color_scheme="red", disabled=~active,
                              id="run-stop"),
                    rx.button("Resume", on_click=RunDetailState.resume, variant="soft", id="run-resume",
                              disabled=active | (info["status"] == "completed")),
                    rx.button("Refresh", on_click=RunDetailState.load, variant="soft"),
                    rx.link(rx.button("Export", variant="soft"), href="/export?run=" + info["id"], id="run-export"),
                    rx.link(rx.button("Chat", variant="soft"), href="/chat?source=" + info["id"], id="run-chat"),
                    rx.button("Evaluate", on_click=RunDetailState.evaluate, variant="soft", id="run-evaluate",
                              loading=RunDetailState.evaluating, disabled=info["status"] != "completed"),
                    rx.alert_dialog.root(
                        rx.alert_dialog.trigger(rx.button("Delete", color_scheme="red", variant="outline", id="delete-run")),
                        rx.alert_dialog.content(
                            rx.alert_dialog.title("Delete this run?"),
                            rx.alert_dialog.description("Its registry entry, checkpoints, adapter and exports are deleted."),
                            rx.hstack(
                                rx.alert_dialog.cancel(rx.button("Cancel", variant="soft")),
                                rx.alert_dialog.action(rx.button("Delete", color_scheme="red", on_click=RunDetailState.delete,
                                                                 id="confirm-delete")),
                                justify="end",
                            ),
                        ),
                    ),
                ),
                rx.cond(RunDetailState.error != "", rx.callout(RunDetailState.error, color_scheme="red", id="run-error")),
                rx.cond(RunDetailState.eval_error != "", rx.callout(RunDetailState.eval_error, color_scheme="red",
                                                                    id="eval-error")),
                rx.cond(RunDetailState.evaluating, rx.text("Evaluating the base and the tuned model on held-out data...",
                                                           size="2", color_scheme="gray", id="eval-busy")),
                rx.cond(RunDetailState.eval_rows.length() > 0, report_card()),
                line_chart(RunDetailState.loss, id="run-loss", empty="No training steps recorded."),
                rx.cond(~RunDetailState.reward_accuracy.empty, preference_charts(
                    RunDetailState.reward_accuracy, RunDetailState.reward_margin, RunDetailState.logps, id="run-preference")),
                rx.cond(~RunDetailState.telemetry.empty, rx.vstack(
                    rx.heading("Telemetry during the run", size="3"),
                    line_chart(RunDetailState.telemetry, height="180px", id="run-telemetry"),
                    width="100%",
                )),
                rx.cond(RunDetailState.plan.shown, rx.accordion.root(
                    rx.accordion.item(header="Plan: settings with their reasons, memory and time estimate",
                                      content=rx.vstack(plan_details(RunDetailState.plan),
                                                        plan_problems(RunDetailState.plan), width="100%")),
                    collapsible=True, type="single", variant="ghost", width="100%", id="run-plan",
                )),
                rx.heading("Parameters", size="3"),
                rx.grid(rx.foreach(RunDetailState.params, lambda p: rx.text(p[0], ": ", p[1], size="1")), columns="3",
                        width="100%"),
                rx.heading("Checkpoints", size="3"),
                rx.foreach(RunDetailState.checkpoints, lambda c: rx.text(c, size="1", font_family="monospace")),
                rx.heading("Exports", size="3"),
                rx.foreach(RunDetailState.exports, lambda e: rx.text(e, size="1", font_family="monospace")),
                rx.heading("Log", size="3"),
                rx.foreach(RunDetailState.log, lambda line: rx.text(line, size="1", font_family="monospace")),
                width="100%", align="start",
            ),
            rx.text(RunDetailState.error, color_scheme="red"),
        ),
    )  # fmt: skip
