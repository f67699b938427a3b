"""The web app's state logic, without a browser: what a page shows of a run, and the geometry of its charts."""

from __future__ import annotations

import json

import pytest

from app.state.follow import MAX_POINTS, Progress, assign_changed, loss_plot, telemetry_plot
from app.state.multirun import heat
from app.state.plot import BOX, Line, plot, sparkline
from app.state.train import _targets
from training.events import EventWriter


def xy(points: str) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in points.split()]


# --- chart geometry ---------------------------------------------------------------------------------------------------


def test_a_line_is_scaled_into_the_box_with_y_growing_downwards():
    shown = plot([Line("loss", "accent", [(0, 2.0), (5, 1.0), (10, 0.0)])], x_range=(0, 10), y_range=(0, 2))
    assert xy(shown.series[0].points) == [(0, 0), (BOX / 2, BOX / 2), (BOX, BOX)]
    assert shown.series[0].color == "var(--accent-9)" and shown.series[0].last == "0"
    assert not shown.empty


def test_the_loss_axis_spans_the_whole_run_so_the_curve_grows_across_it():
    early = loss_plot([{"step": 1, "loss": 3.0}, {"step": 10, "loss": 2.0}], max_steps=100)
    xs = [x for x, _ in xy(early.series[0].points)]
    assert xs == [BOX * 1 / 100, BOX * 10 / 100]
    assert [t.label for t in early.x_ticks] == ["0", "25", "50", "75", "100"]


def test_losses_are_never_drawn_below_zero_and_eval_points_get_dots():
    shown = loss_plot([{"step": 1, "loss": 0.01}, {"step": 2, "loss": 0.02}, {"step": 2, "eval_loss": 0.03}], max_steps=2)
    assert float(shown.y_ticks[-1].label) >= 0  # the bottom tick (5% padding would go negative)
    train, evals = shown.series
    assert train.dots == "" and evals.dots.count("h0") == 1 and evals.name == "eval loss"


def test_missing_values_leave_gaps_and_no_points_means_an_empty_chart():
    shown = plot([Line("gpu", "orange", [(0, None), (1, 50.0), (2, None)])], y_range=(0, 100))
    assert len(xy(shown.series[0].points)) == 1
    assert plot([Line("loss", "accent", [])]).empty


def test_a_sparkline_puts_the_newest_value_at_the_right_edge_of_its_window():
    points = xy(sparkline([10.0, 50.0, 100.0, 150.0], top=100, length=10))
    assert points[-1] == (BOX, 0)  # newest at the right; above the top is clamped to the top
    assert points[0] == (round(BOX * 6 / 9, 1), BOX * 0.9)  # the window is 10 slots: 4 values fill the right end
    assert sparkline([None, None]) == ""


def test_run_telemetry_shows_only_the_sensors_that_reported():
    samples = [{"t": 0, "cpu": 50.0, "ram": 20.0, "gpu_util": None, "gpu_temp": None}, {"t": 1, "cpu": 60.0, "ram": 21.0}]
    assert [s.name for s in telemetry_plot(samples).series] == ["CPU %", "RAM %"]


# --- following a run --------------------------------------------------------------------------------------------------


def write_run(path, steps: int) -> EventWriter:
    events = EventWriter(path)
    events.emit("started", max_steps=steps, device="cpu", examples=40)
    for step in range(1, steps + 1):
        events.emit("step", step=step, max_steps=steps, loss=5.0 / step, tokens=100, tokens_per_s=1000.0)
    return events


def test_progress_reads_a_run_as_it_is_written_from_any_offset(tmp_path):
    path = tmp_path / "events.jsonl"
    events = write_run(path, 10)
    progress = Progress(path)
    assert progress.read() and (progress.status, progress.step, progress.max_steps) == ("running", 10, 10)
    assert not progress.read()  # nothing new
    events.emit("eval", step=10, eval_loss=0.7)
    events.emit("completed", adapter=str(tmp_path / "adapter"))
    events.close()
    assert progress.read()
    assert progress.status == "completed" and progress.adapter.endswith("adapter")
    assert progress.loss[-1] == {"step": 10, "eval_loss": 0.7} and "completed" in progress.log[-1]
    whole = Progress(path)
    whole.read()
    assert whole.loss == progress.loss and whole.log == progress.log  # in pieces or at once: the same page


def test_a_failed_run_shows_its_code_and_hint(tmp_path):
    path = tmp_path / "events.jsonl"
    events = write_run(path, 2)
    events.emit("failed", code="RUNTIME_OUT_OF_MEMORY", message="out of memory", hint="lower the batch size")
    events.close()
    progress = Progress(path)
    progress.read()
    assert progress.status == "failed"
    assert progress.error == "[RUNTIME_OUT_OF_MEMORY] out of memory" and progress.hint == "lower the batch size"


def test_long_runs_are_thinned_to_a_bounded_series_keeping_the_recent_curve_exact(tmp_path):
    path = tmp_path / "events.jsonl"
    write_run(path, 3 * MAX_POINTS).close()
    progress = Progress(path)
    progress.read()
    steps = [p["step"] for p in progress.loss]
    assert len(steps) <= MAX_POINTS
    assert steps[0] == 1 and steps[-1] == 3 * MAX_POINTS and steps == sorted(steps)
    assert steps[-MAX_POINTS // 4 :] == list(range(3 * MAX_POINTS - MAX_POINTS // 4 + 1, 3 * MAX_POINTS + 1))


def test_a_half_written_line_waits_for_its_end(tmp_path):
    path = tmp_path / "events.jsonl"
    write_run(path, 1).close()
    line = json.dumps({"t": 0, "event": "step", "step": 2, "max_steps": 2, "loss": 1.0, "tokens": 1, "tokens_per_s": 1.0})
    with path.open("a") as f:
        f.write(line[:20])
    progress = Progress(path)
    progress.read()
    assert progress.step == 1
    with path.open("a") as f:
        f.write(line[20:] + "\n")
    progress.read()
    assert progress.step == 2


def test_only_values_that_changed_are_assigned_so_only_they_travel_to_the_browser():
    class Page:
        def __init__(self):
            self.__dict__.update(step=3, loss=loss_plot([{"step": 1, "loss": 2.0}], 10), assigned=[])

        def __setattr__(self, name, value):
            self.assigned.append(name)
            super().__setattr__(name, value)

    page = Page()
    assign_changed(page, {"step": 4, "loss": loss_plot([{"step": 1, "loss": 2.0}], 10)})  # an equal, new plot
    assert page.assigned == ["step"] and page.step == 4


# --- small pieces of the pages ----------------------------------------------------------------------------------------


def test_the_forgetting_heatmap_runs_from_green_to_red():
    assert heat(1.0, 1.0, 3.0) == "hsl(120, 65%, 55%)" and heat(3.0, 1.0, 3.0) == "hsl(0, 65%, 55%)"
    assert heat(None, 1.0, 3.0) == "transparent"


@pytest.mark.parametrize(
    ("text", "targets"),
    [("all-linear", "all-linear"), ("q_proj, v_proj", ["q_proj", "v_proj"]), ("  ", None)],
)
def test_lora_targets_are_read_from_the_form(text, targets):
    assert _targets(text) == targets
