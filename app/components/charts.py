"""Charts: the live loss chart and the telemetry sparklines (recharts, animation off for live data)."""

from __future__ import annotations

import reflex as rx


def loss_chart(data: rx.Var, height: int = 280) -> rx.Component:
    return rx.recharts.line_chart(
        rx.recharts.cartesian_grid(stroke_dasharray="3 3", stroke_opacity=0.3),
        rx.recharts.x_axis(data_key="step", type_="number", domain=["dataMin", "dataMax"]),
        rx.recharts.y_axis(domain=["auto", "auto"], width=48),
        rx.recharts.graphing_tooltip(),
        rx.recharts.legend(),
        rx.recharts.line(data_key="loss", name="train loss", stroke=rx.color("accent", 9), dot=False,
                         is_animation_active=False, connect_nulls=True),
        rx.recharts.line(data_key="eval_loss", name="eval loss", stroke=rx.color("orange", 9), dot=True,
                         is_animation_active=False, connect_nulls=True),
        data=data, height=height, width="100%", id="loss-chart",
    )  # fmt: skip


def sparkline(label: str | rx.Var, now: str | rx.Var, data: rx.Var, color: str = "accent") -> rx.Component:
    return rx.box(
        rx.hstack(rx.text(label, size="1", weight="medium"), rx.spacer(), rx.text(now, size="1", color_scheme="gray"),
                  width="100%"),
        rx.recharts.line_chart(
            rx.recharts.y_axis(hide=True, domain=[0, "auto"]),
            rx.recharts.line(data_key="v", dot=False, stroke=rx.color(color, 9), stroke_width=1.5, is_animation_active=False),
            data=data, height=32, width="100%", margin={"top": 2, "right": 2, "bottom": 2, "left": 2},
        ),
        width="100%",
    )  # fmt: skip


def status_pill(status: rx.Var, id: str | None = None) -> rx.Component:
    return rx.badge(
        status,
        color_scheme=rx.match(status, ("completed", "green"), ("running", "blue"), ("failed", "red"), ("paused", "purple"),
                              ("queued", "purple"), "amber"),
        variant="soft", id=id,
    )  # fmt: skip
