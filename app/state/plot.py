"""Charts as plain geometry, computed on the server: the browser only swaps a few SVG attributes per update.

A live chart that the browser lays out itself (recharts) costs a few percent of a core per update on a small machine,
and on a CPU-only laptop that is taken from the training job next to it. Here the server turns points into the
`points` attribute of an SVG polyline in a fixed 1000 x 1000 box (stretched to the chart's size), and the axis labels
into percentages for absolutely placed text, so an update is a handful of attribute changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

BOX = 1000  # the SVG viewBox is BOX x BOX; y grows downwards


@dataclass
class Series:
    name: str
    color: str  # a CSS colour
    points: str = ""  # polyline points "x,y x,y ..."
    dots: str = ""  # path data drawing one round dot per point ("" = no dots)
    last: str = ""  # the latest value as text, for the legend


@dataclass
class Tick:
    at: str  # CSS percentage along the axis ("25%"): from the top for y, from the left for x
    label: str


@dataclass
class Plot:
    series: list[Series] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)
    x_ticks: list[Tick] = field(default_factory=list)
    empty: bool = True


@dataclass
class Line:
    """One line to draw: its (x, y) points, in data units; None y values leave a gap."""

    name: str
    color: str  # a Radix colour name: "accent", "orange", ...
    points: list[tuple[float, float | None]]
    dots: bool = False


def plot(lines: list[Line], x_range: tuple[float, float] | None = None, y_range: tuple[float, float] | None = None,
         ticks: int = 4) -> Plot:  # fmt: skip
    """Scale every line into the box. Ranges default to the data's (y padded by 5%); ticks are evenly spaced."""
    xs = [x for line in lines for x, y in line.points if y is not None]
    ys = [y for line in lines for _, y in line.points if y is not None]
    if not xs:
        return Plot(series=[Series(line.name, _css(line.color)) for line in lines])
    x0, x1 = x_range or (min(xs), max(xs))
    y0, y1 = y_range or _padded(min(ys), max(ys))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def sx(x: float) -> float:
        return round((x - x0) / (x1 - x0) * BOX, 1)

    def sy(y: float) -> float:
        return round(BOX - (min(max(y, y0), y1) - y0) / (y1 - y0) * BOX, 1)

    series = []
    for line in lines:
        shown = [(sx(x), sy(y)) for x, y in line.points if y is not None]
        last = next((y for _, y in reversed(line.points) if y is not None), None)
        series.append(Series(
            name=line.name, color=_css(line.color),
            points=" ".join(f"{x},{y}" for x, y in shown),
            dots=" ".join(f"M{x} {y}h0" for x, y in shown) if line.dots else "",
            last=_label(last) if last is not None else "",
        ))  # fmt: skip
    y_ticks = [Tick(f"{100 * i / ticks:.1f}%", _label(y1 - (y1 - y0) * i / ticks)) for i in range(ticks + 1)]
    # The x axis counts steps (or seconds): whole numbers only, each once, placed where it really is.
    whole = sorted({round(x0 + (x1 - x0) * i / ticks) for i in range(ticks + 1)} & set(range(math.ceil(x0), math.floor(x1) + 1)))
    x_ticks = [Tick(f"{100 * (x - x0) / (x1 - x0):.1f}%", _label(x, integer=True)) for x in whole]
    return Plot(series=series, y_ticks=y_ticks, x_ticks=x_ticks, empty=False)


def sparkline(values: list[float | None], top: float | None = None, length: int | None = None) -> str:
    """Polyline points of a sparkline: newest value at the right edge, `length` slots wide, 0 at the bottom."""
    length = length or len(values)
    known = [v for v in values if v is not None]
    if not known or length < 2:
        return ""
    top = top or max(max(known), 1e-9) * 1.1
    offset = length - len(values)
    return " ".join(
        f"{round((offset + i) / (length - 1) * BOX, 1)},{round(BOX - min(v, top) / top * BOX, 1)}"
        for i, v in enumerate(values)
        if v is not None
    )


def _css(color: str) -> str:
    return f"var(--{color}-9)"


def _padded(lo: float, hi: float) -> tuple[float, float]:
    """The data's range with 5% room on both sides, never below zero for data that is not (losses, percentages)."""
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    return (lo - pad if lo < 0 else max(0.0, lo - pad)), hi + pad


def _label(value: float, integer: bool = False) -> str:
    if integer:
        return f"{round(value):,}"
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    if abs(value) < 1e-3:
        return f"{value:.2e}"
    digits = max(0, 2 - math.floor(math.log10(abs(value))))  # three significant digits
    return f"{value:.{digits}f}"
