"""Charts: line charts and sparklines drawn from server-computed geometry (app/state/plot.py), and the status pill."""

from __future__ import annotations

import reflex as rx

from app.state.plot import BOX

# Presentation of the lines: strokes keep their width in screen pixels however the box is stretched.
LINE = {"fill": "none", "strokeWidth": "2px", "vectorEffect": "non-scaling-stroke", "strokeLinejoin": "round"}
DOTS = {"fill": "none", "strokeWidth": "7px", "strokeLinecap": "round", "vectorEffect": "non-scaling-stroke"}
GRID = {"stroke": rx.color("gray", 5), "strokeWidth": "1px", "vectorEffect": "non-scaling-stroke"}


def _box(*children: rx.Component) -> rx.Component:
    return rx.el.svg(*children, view_box=f"0 0 {BOX} {BOX}", preserve_aspect_ratio="none", width="100%", height="100%",
                     style={"display": "block", "overflow": "visible"})  # fmt: skip


def line_chart(plot: rx.Var, height: str = "260px", id: str | None = None, empty: str = "No points yet.") -> rx.Component:
    """Axes with labels, a legend with each line's latest value, and the lines (optionally with dots)."""
    return rx.box(
        rx.hstack(
            rx.foreach(plot.series, lambda s: rx.hstack(
                rx.box(width="12px", height="3px", background=s.color),
                rx.text(s.name, " ", s.last, size="1"),
                align="center", spacing="1",
            )),
            spacing="4", padding_left="56px", class_name="chart-legend",
        ),
        rx.box(
            rx.foreach(plot.y_ticks, lambda t: rx.text(t.label, size="1", color_scheme="gray", position="absolute",
                                                       top=t.at, right="calc(100% + 6px)", transform="translateY(-50%)")),
            rx.foreach(plot.x_ticks, lambda t: rx.text(t.label, size="1", color_scheme="gray", position="absolute",
                                                       left=t.at, top="calc(100% + 4px)", transform="translateX(-50%)")),
            _box(
                *[rx.el.svg.line(x1="0", x2=str(BOX), y1=str(y), y2=str(y), style=GRID) for y in range(0, BOX + 1, BOX // 4)],
                rx.foreach(plot.series, lambda s: rx.el.svg.polyline(points=s.points, style={**LINE, "stroke": s.color})),
                rx.foreach(plot.series, lambda s: rx.el.svg.path(d=s.dots, style={**DOTS, "stroke": s.color})),
            ),
            rx.cond(plot.empty, rx.center(rx.text(empty, size="2", color_scheme="gray"), position="absolute", inset="0")),
            position="relative", height=height, margin="8px 12px 28px 56px",
        ),
        id=id, width="100%",
    )  # fmt: skip


def sparkline(label: str | rx.Var, now: str | rx.Var, points: rx.Var, color: str = "accent") -> rx.Component:
    return rx.box(
        rx.hstack(rx.text(label, size="1", weight="medium"), rx.spacer(), rx.text(now, size="1", color_scheme="gray"),
                  width="100%"),
        rx.box(_box(rx.el.svg.polyline(points=points, style={**LINE, "strokeWidth": "1.5px", "stroke": rx.color(color, 9)})),
               height="28px", border_bottom=f"1px solid {rx.color('gray', 4)}", class_name="sparkline"),
        width="100%",
    )  # fmt: skip


def progress_bar(percent: rx.Var) -> rx.Component:
    """A plain bar: Radix's progress component kept the browser busy (10% of a core) while a run trained."""
    return rx.box(
        rx.box(width=percent.to_string() + "%", height="100%", background=rx.color("accent", 9), border_radius="3px"),
        width="100%", height="6px", background=rx.color("gray", 4), border_radius="3px", id="progress-bar",
    )  # fmt: skip


def status_pill(status: rx.Var, id: str | None = None) -> rx.Component:
    return rx.badge(
        status,
        color_scheme=rx.match(status, ("completed", "green"), ("running", "blue"), ("failed", "red"), ("paused", "purple"),
                              ("queued", "purple"), "amber"),
        variant="soft", id=id,
    )  # fmt: skip


def preference_charts(accuracy: rx.Var, margin: rx.Var, logps: rx.Var, id: str, height: str = "200px") -> rx.Component:
    """A DPO/ORPO run's charts: reward accuracy and reward margin side by side, chosen vs rejected log-probs below."""

    def titled(title: str, about: str, plot: rx.Var, name: str) -> rx.Component:
        return rx.vstack(rx.text(title, size="2", weight="bold"), rx.text(about, size="1", color_scheme="gray"),
                         line_chart(plot, height=height, id=f"{id}-{name}", empty="Appears with the first steps."),
                         width="100%", spacing="1")  # fmt: skip

    return rx.vstack(
        rx.grid(
            titled("Reward accuracy", "Share of pairs whose chosen answer the model now prefers to the rejected one",
                   accuracy, "accuracy"),
            titled("Reward margin", "Chosen reward minus rejected reward: how strongly it prefers the chosen answer", margin,
                   "margin"),
            columns="2", spacing="4", width="100%",
        ),
        titled("Log-probabilities of the answers", "Chosen and rejected, summed over each answer's tokens; dots: held-out "
               "pairs", logps, "logps"),
        width="100%", id=id,
    )  # fmt: skip
