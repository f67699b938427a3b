"""Every page: navigation on the left, the page in the middle, the telemetry rail on the right."""

from __future__ import annotations

import reflex as rx

from app.components.charts import sparkline
from app.state.telemetry import TelemetryState

PAGES = [
    ("Train", "/"),
    ("Multi-Run", "/multi-run"),
    ("Dataset", "/dataset"),
    ("Export", "/export"),
    ("Chat", "/chat"),
    ("Runs", "/runs"),
]


def nav() -> rx.Component:
    return rx.vstack(
        rx.hstack(rx.image(src="/logo.svg", width="28px", height="28px"), rx.heading("Backprop", size="5"), align="center"),
        *[rx.link(title, href=href, size="3", weight="medium") for title, href in PAGES],
        rx.spacer(),
        rx.color_mode.button(size="1", variant="ghost", id="color-mode"),
        width="170px", min_width="170px", height="100vh", padding="16px", spacing="3", position="sticky", top="0",
        border_right=f"1px solid {rx.color('gray', 5)}",
    )  # fmt: skip


def telemetry_rail() -> rx.Component:
    return rx.vstack(
        rx.text("Machine", size="2", weight="bold"),
        sparkline("CPU", TelemetryState.cpu_now, TelemetryState.cpu),
        sparkline("RAM", TelemetryState.ram_now, TelemetryState.ram, color="green"),
        rx.foreach(
            TelemetryState.gpus,
            lambda g: rx.vstack(
                rx.text(g["name"], size="1", weight="bold"),
                rx.text(g["now"], size="1", color_scheme="gray"),
                sparkline("util %", "", g["util"]),
                sparkline("VRAM %", "", g["mem"], color="green"),
                sparkline("temp °C", "", g["temp"], color="orange"),
                sparkline("power W", "", g["power"], color="purple"),
                width="100%", spacing="1",
            ),
        ),
        rx.cond(TelemetryState.gpu_note != "", rx.text(TelemetryState.gpu_note, size="1", color_scheme="gray")),
        width="230px", min_width="230px", padding="16px", spacing="3", id="telemetry-rail",
        border_left=f"1px solid {rx.color('gray', 5)}",
    )  # fmt: skip


def page(title: str, *children: rx.Component) -> rx.Component:
    return rx.hstack(
        nav(),
        rx.vstack(rx.heading(title, size="6"), *children, flex="1", min_width="0", padding="24px", spacing="4"),
        telemetry_rail(),
        align="start", spacing="0", width="100%", min_width="1024px", on_mount=TelemetryState.watch,
    )  # fmt: skip
