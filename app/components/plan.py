"""A run's plan (app/state/plan_view.py): the settings with their reasons, peak memory against what is usable, the
time estimate, notes and problems. The Train page shows it live above Start; a run's page shows the recorded one."""

from __future__ import annotations

import reflex as rx


def plan_details(view: rx.Var) -> rx.Component:
    """The plan's facts, its table (setting, value, why; "yours" on what the user set), memory, time and notes."""
    return rx.vstack(
        rx.text(view.title, size="2", weight="medium", class_name="plan-title"),
        rx.foreach(view.facts, lambda line: rx.text(line, size="1", color_scheme="gray", class_name="plan-fact")),
        rx.table.root(
            rx.table.header(rx.table.row(*[rx.table.column_header_cell(c) for c in ("setting", "value", "why")])),
            rx.table.body(rx.foreach(view.rows, lambda r: rx.table.row(
                rx.table.cell(r.setting),
                rx.table.cell(r.value, weight="bold"),
                rx.table.cell(rx.cond(r.given, rx.badge("yours", variant="soft", margin_right="6px")), r.reason,
                              color_scheme="gray"),
                class_name="plan-row", custom_attrs={"data-setting": r.setting},
            ))),
            size="1", width="100%", class_name="plan-table",
        ),
        rx.vstack(
            rx.text("Memory ", view.memory, size="2", class_name="plan-memory"),
            rx.box(rx.box(width=view.memory_percent.to_string() + "%", height="100%",
                          background=rx.cond(view.fits, rx.color("green", 9), rx.color("red", 9)), border_radius="3px"),
                   width="100%", max_width="420px", height="6px", background=rx.color("gray", 4), border_radius="3px"),
            rx.text(view.memory_parts, size="1", color_scheme="gray"),
            spacing="1", width="100%",
        ),
        rx.cond(view.time != "", rx.text("Time ", view.time, " ", rx.text.span("(", view.time_source, ")", color_scheme="gray"),
                                          size="2", class_name="plan-time")),
        rx.foreach(view.notes, lambda note: rx.text("Note: ", note, size="1", class_name="plan-note")),
        spacing="2", width="100%", align="start",
    )  # fmt: skip


def plan_problems(view: rx.Var) -> rx.Component:
    """What will not work, before the start: each problem's code, message and what to change."""
    return rx.foreach(view.problems, lambda p: rx.callout(
        rx.vstack(rx.text("[", p.code, "] ", p.message, weight="bold"), rx.text(p.hint, size="1"), spacing="1"),
        color_scheme="amber", width="100%", class_name="plan-problem",
    ))  # fmt: skip
