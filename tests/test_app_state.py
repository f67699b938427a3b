"""The web app's state logic, without a browser: what a page shows of a run, the geometry of its charts, how every
handler ends and shows its errors, and what the browser may set."""

from __future__ import annotations

import asyncio
import inspect
import json
from pathlib import Path

import pytest
import reflex as rx
from conftest import DEMO_DATA, backprop, wait_for

from app import folders
from app.state.chat import ChatState
from app.state.compare import CompareState
from app.state.dataset import DatasetState
from app.state.errors import HANDLED, handler
from app.state.export import ExportState
from app.state.follow import MAX_POINTS, Progress, assign_changed, loss_plot, preference_plots, telemetry_plot
from app.state.multi_run import MultiRunState, heat
from app.state.plot import BOX, Line, plot, sparkline
from app.state.runs import RunDetailState, RunsState
from app.state.telemetry import TelemetryState
from app.state.train import TrainState, _targets, nproc_value
from training.errors import BackpropError
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


def test_a_short_run_labels_each_step_once_where_it_is():
    short = loss_plot([{"step": 1, "loss": 3.0}, {"step": 3, "loss": 2.0}], max_steps=3)
    assert [t.label for t in short.x_ticks] == ["0", "1", "2", "3"]
    assert [t.at for t in short.x_ticks] == ["0.0%", "33.3%", "66.7%", "100.0%"]


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
    samples = [{"t": 0, "cpu": 50.0, "ram": 20.0, "gpu0_util": None, "gpu0_temp": None}, {"t": 1, "cpu": 60.0, "ram": 21.0}]
    assert [s.name for s in telemetry_plot(samples).series] == ["CPU %", "RAM %"]


def test_a_run_on_several_gpus_shows_each_of_its_gpus_and_none_of_the_others(tmp_path):
    path = tmp_path / "events.jsonl"
    events = write_run(path, 1)
    machine = [{"index": i, "name": "Sim", "util": 10.0 * i, "temp": 50.0 + i} for i in range(4)]  # all of the machine's
    events.emit("telemetry", cpu=20.0, ram_used=1000, ram_total=4000, gpus=machine)
    events.close()
    progress = Progress(path, gpus={1, 3})  # the run held GPUs 1 and 3
    progress.read()
    plot = progress.telemetry_plot()
    assert [s.name for s in plot.series] == ["CPU %", "RAM %", "GPU 1 util %", "GPU 1 °C", "GPU 3 util %", "GPU 3 °C"]
    assert [s.last for s in plot.series][2:] == ["10.0", "51.0", "30.0", "53.0"]
    alone = Progress(path, gpus={2})
    alone.read()
    assert [s.name for s in alone.telemetry_plot().series] == ["CPU %", "RAM %", "GPU util %", "GPU °C"]


def test_the_gpus_field_takes_a_count_or_auto_and_refuses_anything_else_with_its_label():
    state = TrainState(_reflex_internal_init=True)
    label = "GPUs" if state.cuda else "Processes"
    for typed, error in (("two", f"{label}: 'two' is not a whole number"), ("0", f"{label}: 0 is less than 1")):
        run(TrainState.set_nproc, state, typed)
        run(TrainState.start, state)
        assert state.error == f"[INPUT_INVALID_ARGUMENT] {error}" and state.run_id == ""
    assert nproc_value(" Auto ", "GPUs") == "auto" and nproc_value("4", "GPUs") == 4 and nproc_value("", "GPUs") is None


def test_the_gpus_and_the_strategy_chosen_on_the_train_page_reach_the_job(sandbox, tmp_path, monkeypatch):
    from training import jobs
    from training.config import load_settings
    from training.runs import Registry

    sensor = tmp_path / "sensor.json"  # a simulated machine without free RAM: the job stays queued, its spec readable
    sensor.write_text(json.dumps({"ram_available": 100}))
    monkeypatch.setenv("BACKPROPAGATE_TELEMETRY_FILE", str(sensor))
    state = TrainState(_reflex_internal_init=True)
    for name, value in (("model", "demo"), ("nproc", "2"), ("strategy", "fsdp"), ("steps", "2")):
        run(getattr(TrainState, f"set_{name}"), state, value)
    run(TrainState.start, state)
    assert state.error == "" and state.run_id
    registry = Registry(load_settings().home)
    spec = json.loads((registry.get(state.run_id).path / "spec.json").read_text())
    assert (spec["settings"]["distributed"]["nproc"], spec["settings"]["distributed"]["strategy"]) == (2, "fsdp")
    wait_for(lambda: registry.get(state.run_id).reason, what="the job to wait for RAM")
    assert jobs.stop(registry, state.run_id, grace=5).status == "stopped"


def queue_only(tmp_path, monkeypatch) -> None:
    """A simulated machine without free RAM: jobs submitted from now on stay queued, their spec readable."""
    sensor = tmp_path / "sensor.json"
    sensor.write_text(json.dumps({"ram_available": 100}))
    monkeypatch.setenv("BACKPROPAGATE_TELEMETRY_FILE", str(sensor))


def spec_of(run_id: str) -> dict:
    from training.config import load_settings
    from training.runs import Registry

    return json.loads((Registry(load_settings().home).get(run_id).path / "spec.json").read_text())


def stop_queued(run_id: str) -> None:
    from training import jobs
    from training.config import load_settings
    from training.runs import Registry

    registry = Registry(load_settings().home)
    wait_for(lambda: registry.get(run_id).reason, what="the job to wait for RAM")
    assert jobs.stop(registry, run_id, grace=5).status == "stopped"


def test_the_method_its_beta_and_the_run_to_continue_from_chosen_on_the_train_page_reach_the_job(sandbox, tmp_path,
                                                                                                 monkeypatch):  # fmt: skip
    out = backprop("train", "--model", "demo", "--steps", "2", "--name", "sft-first", "--json", check=True)
    first = json.loads(out.stdout.strip().splitlines()[-1])["run_id"]
    queue_only(tmp_path, monkeypatch)
    state = TrainState(_reflex_internal_init=True)
    state.model = "somewhere/else"
    run(TrainState.reattach, state)  # the page's load: the finished runs it can continue from
    assert [r["id"] for r in state.from_runs] == [first] and "sft-first" in state.from_runs[0]["label"]
    run(TrainState.pick_from_run, state, first)
    assert state.model == "demo"  # a continued run trains its run's model
    for name, value in (("method", "dpo"), ("beta", "0.25"), ("orpo_lambda", "not read for DPO"), ("steps", "2")):
        run(getattr(TrainState, f"set_{name}"), state, value)
    run(TrainState.start, state)
    assert state.error == "" and state.run_id
    spec = spec_of(state.run_id)
    assert (spec["settings"]["training"]["method"], spec["settings"]["training"]["beta"]) == ("dpo", 0.25)
    assert spec["from_run"] == first and spec["init_adapter"].endswith(f"{first}/adapter/adapter_model.safetensors")
    stop_queued(state.run_id)

    # ORPO reads its lambda (and not beta); back to "none" starts from the base model.
    run(TrainState.pick_from_run, state, "none")
    for name, value in (("method", "orpo"), ("beta", "not read for ORPO"), ("orpo_lambda", "0.5")):
        run(getattr(TrainState, f"set_{name}"), state, value)
    run(TrainState.start, state)
    assert state.error == ""
    spec = spec_of(state.run_id)
    assert (spec["settings"]["training"]["method"], spec["settings"]["training"]["orpo_lambda"]) == ("orpo", 0.5)
    assert spec["settings"]["training"]["beta"] == 0.1 and "from_run" not in spec
    stop_queued(state.run_id)


def test_a_beta_that_is_not_a_number_is_refused_with_its_label():
    state = TrainState(_reflex_internal_init=True)
    run(TrainState.set_method, state, "dpo")
    run(TrainState.set_beta, state, "strong")
    run(TrainState.start, state)
    assert state.error == "[INPUT_INVALID_ARGUMENT] Beta: 'strong' is not a number" and state.run_id == ""


def test_the_method_chosen_on_the_multi_run_page_reaches_the_multi_run(sandbox, tmp_path, monkeypatch):
    queue_only(tmp_path, monkeypatch)
    state = MultiRunState(_reflex_internal_init=True)
    for name, value in (("method", "dpo"), ("beta", "0.2"), ("runs", "2"), ("steps", "2")):
        run(getattr(MultiRunState, f"set_{name}"), state, value)
    run(MultiRunState.start, state)
    assert state.error == "" and state.multi_run_id
    training = spec_of(state.multi_run_id)["settings"]["training"]  # each run's settings start from these
    assert (training["method"], training["beta"]) == ("dpo", 0.2)
    stop_queued(state.multi_run_id)


def test_a_preference_file_is_previewed_as_pairs_and_counted(home, tmp_path):
    from app.state.dataset import analyze

    rows = [{"prompt": "Where is the library?", "chosen": "On Elm Street, happy to help!", "rejected": "Look it up."},
            {"prompt": "Where is the library?", "chosen": "On Elm Street, happy to help!", "rejected": "No idea."},
            {"prompt": [{"role": "system", "content": "You are a hotel desk."}, {"role": "user", "content": "Late checkout?"}],
             "chosen": [{"role": "assistant", "content": "Certainly, noon is fine."}],
             "rejected": [{"role": "assistant", "content": "Be out by ten."}]}]  # fmt: skip
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = analyze(data, "demo")
    assert (report["pairs"], report["valid"], report["preview"]) == (3, 3, [])  # pairs only, no conversation cards
    assert report["duplicates"] == 0  # the same prompt and chosen answer against another rejected one is another pair
    assert report["pair_preview"][0] == {"prompt": [{"role": "user", "content": "Where is the library?"}],
                                         "chosen": [{"role": "assistant", "content": "On Elm Street, happy to help!"}],
                                         "rejected": [{"role": "assistant", "content": "Look it up."}]}  # fmt: skip
    assert [m["role"] for m in report["pair_preview"][2]["prompt"]] == ["system", "user"]
    assert report["pair_preview"][2]["rejected"][0]["content"] == "Be out by ten."


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


def write_preference_run(path, steps: int) -> EventWriter:
    events = EventWriter(path)
    events.emit("started", max_steps=steps, device="cpu", examples=16, method="dpo")
    for step in range(1, steps + 1):
        events.emit("step", step=step, max_steps=steps, loss=0.69 / step, tokens=100, tokens_per_s=1000.0,
                    reward_accuracy=min(1.0, 0.25 * step), reward_margin=0.5 * step, chosen_logps=-20.0 + step,
                    rejected_logps=-20.0 - step)  # fmt: skip
        if step % 2 == 0:
            events.emit("eval", step=step, eval_loss=0.7 / step, eval_reward_accuracy=0.5, eval_reward_margin=0.4 * step,
                        eval_chosen_logps=-21.0, eval_rejected_logps=-22.0 - step)  # fmt: skip
    return events


def test_a_dpo_run_is_followed_into_reward_accuracy_margin_and_log_prob_charts(tmp_path):
    path = tmp_path / "events.jsonl"
    write_preference_run(path, 4).close()
    progress = Progress(path)
    progress.read()
    assert progress.preference and "started DPO on cpu" in progress.log[0]
    assert "step 4: eval loss 0.1750, reward accuracy 0.50" in progress.log[-1]
    charts = progress.preference_plots()
    accuracy = charts["reward_accuracy"]
    assert [s.name for s in accuracy.series] == ["reward accuracy", "eval reward accuracy"]
    assert [s.last for s in accuracy.series] == ["1.00", "0.500"]
    assert xy(accuracy.series[0].points) == [(250, 750), (500, 500), (750, 250), (1000, 0)]  # 0-1 fills the box
    assert accuracy.series[1].dots and (accuracy.y_ticks[0].label, accuracy.y_ticks[-1].label) == ("1.00", "0")
    assert [s.last for s in charts["reward_margin"].series] == ["2.00", "1.60"]
    assert [s.name for s in charts["logps"].series] == ["chosen", "eval chosen", "rejected", "eval rejected"]
    assert [s.last for s in charts["logps"].series] == ["-16.0", "-21.0", "-24.0", "-26.0"]
    assert progress.loss_plot().series[0].last == "0.172"  # the loss chart is the same as for SFT


def test_an_sft_run_has_no_reward_charts(tmp_path):
    path = tmp_path / "events.jsonl"
    write_run(path, 3).close()
    progress = Progress(path)
    progress.read()
    assert not progress.preference and progress.loss[-1] == {"step": 3, "loss": 5.0 / 3}
    assert all(chart.empty and not chart.series for chart in progress.preference_plots().values())
    assert preference_plots([], 10)["reward_accuracy"].empty


def test_a_gpu_run_says_how_it_trained_and_its_peak_vram(tmp_path):
    path = tmp_path / "events.jsonl"
    events = EventWriter(path)
    events.emit("started", max_steps=1, device="cuda", examples=4, attention="sdpa", loss_kernel="chunked")
    events.emit("completed", adapter=str(tmp_path / "adapter"), peak_vram_mb=9830)
    events.close()
    progress = Progress(path)
    progress.read()
    assert "(attention sdpa, loss kernel chunked)" in progress.log[0]
    assert progress.log[-1].endswith("completed, peak VRAM 9.6 GiB")


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


# --- every page handler: busy flag cleared, error shown, whatever is raised -------------------------------------------


class Probe(rx.State):
    """A page of the shape every page has: a busy flag, an error, and handlers that fail in every way."""

    busy: bool = False
    error: str = ""
    hint: str = ""
    _following: str = ""
    run_id: str = ""
    done: list[str] = []

    @handler(background=True, busy="busy")
    async def fail(self, kind: str):
        async with self:
            self.done = [*self.done, "started"]
        raise {"coded": BackpropError("INPUT_RUN_NOT_FOUND", run_id="abc"), "attribute": AttributeError("no 'inside'"),
               "key": KeyError("stage")}[kind]  # fmt: skip

    @handler(background=True, busy="busy")
    async def wait(self, gate: asyncio.Event):
        await gate.wait()
        async with self:
            self.done = [*self.done, "waited"]

    @handler(background=True, busy="_following", claim=lambda state: state.run_id, hint="hint")
    async def follow(self, gate: asyncio.Event):
        async with self:
            following = self._following
        await gate.wait()
        async with self:
            self.done = [*self.done, f"followed {following}"]

    @handler(hint="hint")
    def submit(self, text: str):
        raise ValueError(f"not a number: {text}")


def probe() -> Probe:
    return Probe(_reflex_internal_init=True)


def run(handler_, state, *args):
    """Run a page's event handler the way Reflex does, on a state outside any server (`async with state` is a no-op)."""
    result = handler_.fn(state, *args)
    return asyncio.run(result) if inspect.iscoroutine(result) else result


@pytest.mark.parametrize(("kind", "code"), [("coded", "INPUT_RUN_NOT_FOUND"), ("attribute", "RUNTIME_UNEXPECTED"),
                                            ("key", "RUNTIME_UNEXPECTED")])  # fmt: skip
def test_a_background_handler_that_raises_ends_not_busy_with_its_coded_error_shown(kind, code, caplog):
    state = probe()
    run(Probe.fail, state, kind)
    assert state.done == ["started"] and state.busy is False
    assert state.error.startswith(f"[{code}] ") and " — " in state.error  # code, message — hint
    unexpected = [r for r in caplog.records if r.name == "backprop.ui" and r.exc_info]
    if code == "RUNTIME_UNEXPECTED":  # a bug: its traceback goes to the server's log
        assert "Probe.fail" in state.error and "the log of `backprop ui`" in state.error
        assert len(unexpected) == 1 and unexpected[0].exc_info[0].__name__ in ("AttributeError", "KeyError")
    else:
        assert not unexpected


def test_a_busy_handler_is_refused_until_it_ends_and_a_new_attempt_clears_the_old_error():
    state = probe()
    state.error = "[INPUT_RUN_NOT_FOUND] from before"

    async def twice():
        gate = asyncio.Event()
        first = asyncio.create_task(Probe.wait.fn(state, gate))
        await asyncio.sleep(0)
        assert state.busy and state.error == ""  # claimed; the old error is gone
        await Probe.wait.fn(state, gate)  # refused: the first one still runs
        gate.set()
        await first

    asyncio.run(twice())
    assert state.done == ["waited"] and state.busy is False


def test_a_cancelled_handler_still_clears_its_busy_flag():
    state = probe()

    async def cancel():
        task = asyncio.create_task(Probe.wait.fn(state, asyncio.Event()))
        await asyncio.sleep(0)
        assert state.busy
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel())
    assert state.busy is False and state.done == []


def test_a_follow_loop_claims_its_run_and_frees_only_its_own_claim():
    state = probe()

    async def switch():
        old_gate, new_gate = asyncio.Event(), asyncio.Event()
        state.run_id = "run-a"
        old = asyncio.create_task(Probe.follow.fn(state, old_gate))
        await asyncio.sleep(0)
        await Probe.follow.fn(state, asyncio.Event())  # run-a is followed already: refused at once
        state.run_id = "run-b"  # the tab starts another run while run-a's loop winds down
        new = asyncio.create_task(Probe.follow.fn(state, new_gate))
        await asyncio.sleep(0)
        assert state._following == "run-b"
        old_gate.set()
        await old
        assert state._following == "run-b"  # run-a's end leaves run-b's claim alone
        new_gate.set()
        await new

    asyncio.run(switch())
    assert state.done == ["followed run-a", "followed run-b"] and state._following == ""
    state.run_id = ""
    run(Probe.follow, state, asyncio.Event())  # nothing to follow: refused at once
    assert state.done == ["followed run-a", "followed run-b"]


def test_a_plain_handler_shows_the_error_and_its_hint_apart():
    state = probe()
    run(Probe.submit, state, "abc")
    assert state.error.startswith("[RUNTIME_UNEXPECTED] Unexpected error in Probe.submit: ValueError: not a number: abc")
    assert "backprop ui" in state.hint


def page_states() -> list[type]:
    return [ChatState, CompareState, DatasetState, ExportState, MultiRunState, RunDetailState, RunsState, TelemetryState,
            TrainState]  # fmt: skip


def test_every_event_handler_of_every_page_goes_through_the_one_mechanism():
    modules = {cls.__module__ for cls in page_states()}
    assert modules == {
        f"app.state.{m}" for m in ("chat", "compare", "dataset", "export", "multi_run", "runs", "telemetry", "train")
    }
    for cls in page_states():
        for name, event in cls.event_handlers.items():
            if name != "setvar":  # Reflex's own; it reaches only the `set_` handlers below
                assert getattr(event.fn, HANDLED, False), f"{cls.__name__}.{name} is not declared with app.state.errors.handler"


def test_the_train_form_refuses_a_number_that_is_not_one_with_its_code_and_hint():
    state = TrainState(_reflex_internal_init=True)
    run(TrainState.set_steps, state, "twelve")
    run(TrainState.start, state)
    assert state.error == "[INPUT_INVALID_ARGUMENT] Steps: 'twelve' is not a whole number"
    assert "leave it empty" in state.hint and state.run_id == ""


# --- what the browser may set -----------------------------------------------------------------------------------------

FORMS = {
    TrainState: {"model", "dataset", "steps", "learning_rate", "batch_size", "max_run_minutes", "lora_r", "validation_split",
                 "epochs", "gradient_accumulation", "max_seq_length", "lora_alpha", "lora_dropout", "target_modules",
                 "packing", "response_only", "qlora", "use_unsloth", "report_to", "nproc", "strategy", "method", "beta",
                 "orpo_lambda"},
    MultiRunState: {"datasets", "model", "runs", "steps", "samples", "merge_mode", "replay", "lr_schedule", "validation",
                    "report_to", "nproc", "strategy", "method", "beta", "orpo_lambda"},
    ExportState: {"source", "folder", "format", "quantization", "ollama_name", "register", "hub_repo", "private"},
    ChatState: {"source", "folder", "compare", "prompt"},
    DatasetState: {"model", "validation", "row_line"},
    RunsState: {"status_filter", "search"},
    CompareState: {"show_all"},
}  # fmt: skip


def test_the_browser_can_set_the_form_fields_and_nothing_else():
    for cls in page_states():
        settable = {name.removeprefix("set_") for name in cls.event_handlers if name.startswith("set_")}
        assert settable == FORMS.get(cls, set()), cls.__name__
        assert "set_field" not in cls.event_handlers


@pytest.mark.parametrize("var", ["run_id", "_following", "cuda", "models", "error", "status"])
def test_a_client_event_setting_a_backend_or_non_form_var_is_refused(var):
    state = TrainState(_reflex_internal_init=True)
    before = getattr(state, var)
    with pytest.raises(AttributeError):  # Reflex's generic setvar reaches only the `set_` handlers
        TrainState.setvar.fn(state, var, "/tmp/elsewhere")
    with pytest.raises(AttributeError):  # and a page cannot even be compiled with such an event
        TrainState.setvar(var, "/tmp/elsewhere")
    assert getattr(state, var) == before
    TrainState.setvar.fn(state, "steps", "12")  # a form field is fine
    assert state.steps == "12"


def test_a_form_setter_refuses_a_value_of_another_type():
    state = TrainState(_reflex_internal_init=True)
    run(TrainState.set_packing, state, "yes")
    assert state.packing is True and state.error.startswith("[UI_EVENT_REFUSED] The page cannot set 'packing'")


# --- defect: Export crashed on runs started from the command line ------------------------------------------------------


@pytest.fixture
def sandbox(home, tmp_path, monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_UI__OUTPUT_DIR", str(tmp_path / "sandbox"))
    folders.root.cache_clear()
    yield tmp_path / "sandbox"
    folders.root.cache_clear()


def test_a_run_started_from_the_command_line_exports_into_the_sandbox(sandbox):
    out = backprop("train", "--model", "demo", "--steps", "2", "--json", check=True)
    run_id = json.loads(out.stdout.strip().splitlines()[-1])["run_id"]
    state = ExportState(_reflex_internal_init=True)
    state.source, state.format = run_id, "lora"
    run(ExportState.start, state)
    assert state.error == "" and state.busy is False
    assert state.result["path"] == str(sandbox.resolve() / "exports" / f"{run_id}-lora")
    assert (Path(state.result["path"]) / "adapter_model.safetensors").is_file()


def test_a_chat_model_that_cannot_load_shows_its_code_next_to_send(sandbox, tmp_path):
    state = ChatState(_reflex_internal_init=True)
    state.folder, state.prompt = str(tmp_path / "nowhere"), "hello"
    run(ChatState.send, state)
    assert state.error.startswith("[INPUT_MODEL_NOT_FOUND]") and state.busy is False
    assert [m["role"] for m in state.messages] == ["user", "assistant"]


# --- the plan of the Train form ---------------------------------------------------------------------------------------


def rows_of(state: TrainState) -> dict[str, tuple[str, str, bool]]:
    return {r.setting: (r.value, r.reason, r.given) for r in state.plan.rows}


def write_long_chats(path: Path, count: int) -> Path:
    """`count` conversations far longer than the demo's one-line questions (a few hundred tokens each)."""
    with path.open("w") as f:
        for i in range(count):
            question = f"Tell me about city number {i}. " * (4 + i % 5)
            answer = " ".join(f"Fact {j}: city {i} has {j * 7 + i} parks and {j + i} bridges." for j in range(12 + i % 9))
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")  # fmt: skip
    return path


def test_the_train_page_plans_the_demo_model_on_the_demo_dataset_with_a_reason_for_each_setting(sandbox):
    state = TrainState(_reflex_internal_init=True)
    assert state.lora_r == "" and state.steps == ""  # empty fields are not set: the plan fills them
    run(TrainState.reattach, state)  # the page's load asks for the plan
    run(TrainState.replan, state)
    assert state.plan_error == "" and state.plan.shown and not state.planning
    assert state.plan.title.startswith("demo (sft) on CPU")
    assert "data: 40 examples; tokens p50" in state.plan.facts[1]
    rows = rows_of(state)
    assert {"Max length (tokens)", "Batch size", "Gradient accumulation", "Learning rate", "Steps", "LoRA rank"} <= set(rows)
    assert all(reason for _, reason, _ in rows.values()) and not any(given for *_, given in rows.values())
    assert rows["Steps"][:2] == ("300", "this model's tuned default") and rows["QLoRA"][0] == "off"
    assert state.placeholders["steps"] == "300" and state.placeholders["lora_r"] == "16"  # the empty fields say so
    assert state.plan.fits and state.plan.memory.startswith("~") and "fits" in state.plan.memory
    assert "weights" in state.plan.memory_parts and "activations" in state.plan.memory_parts
    assert "300 steps" in state.plan.time and "GFLOP/s a CPU core" in state.plan.time_source
    assert state.plan.problems == []


def test_a_value_typed_in_the_train_form_shows_as_yours_wins_and_is_what_the_run_records(sandbox, tmp_path, monkeypatch):
    state = TrainState(_reflex_internal_init=True)
    for name, value in (("batch_size", "4"), ("lora_r", "8"), ("steps", "7")):
        assert run(getattr(TrainState, f"set_{name}"), state, value) == TrainState.replan  # each change replans
    run(TrainState.replan, state)
    rows = rows_of(state)
    assert rows["Batch size"] == ("4", "set by you", True) and rows["LoRA rank"] == ("8", "set by you", True)
    assert rows["Steps"] == ("7", "set by you", True) and "7 steps" in state.plan.time
    assert rows["LoRA alpha"] == ("32", "this model's tuned default", False)  # the rest is still planned
    # Start applies the same plan: the run's spec.json records the typed values as the user's, the rest as planned.
    queue_only(tmp_path, monkeypatch)
    run(TrainState.start, state)
    assert state.error == "" and state.run_id
    spec = spec_of(state.run_id)
    choices = spec["plan"]["choices"]
    assert choices["batch_size"] == {"value": 4, "reason": "set by you", "given": True}
    assert choices["lr"]["given"] is False and spec["settings"]["training"]["learning_rate"] == choices["lr"]["value"]
    assert spec["settings"]["training"]["batch_size"] == 4 and spec["settings"]["lora"]["r"] == 8
    stop_queued(state.run_id)


def test_start_plans_and_registers_off_the_event_loop_and_a_second_press_meanwhile_is_refused(sandbox, tmp_path, monkeypatch):
    """Start's plan reads the tokenizer and the data (a hub dataset downloads first): the server goes on answering the
    page meanwhile. Here another writer holds the registry, so the run cannot be registered until it lets go."""
    import sqlite3

    from training.config import load_settings
    from training.runs import Registry

    queue_only(tmp_path, monkeypatch)
    state = TrainState(_reflex_internal_init=True)
    run(TrainState.set_steps, state, "2")
    writer = sqlite3.connect(Registry(load_settings().home).db_path, isolation_level=None)

    async def press_start_twice() -> object:
        writer.execute("BEGIN EXCLUSIVE")
        first = asyncio.create_task(TrainState.start.fn(state))
        await asyncio.sleep(0)  # the first Start runs up to its plan, which a worker thread carries on
        assert state.starting and not state.run_id  # the event loop is free while it works
        assert state.start_stage == "planning the run"  # shown beside Start (a hub dataset's download next)
        assert await TrainState.start.fn(state) is None  # a second press is refused, not queued behind it
        writer.execute("COMMIT")
        return await first

    try:
        assert asyncio.run(press_start_twice()) == TrainState.follow
    finally:
        writer.close()
    assert state.error == "" and state.run_id and state.starting is False and state.start_stage == ""
    stop_queued(state.run_id)

    run(TrainState.set_steps, state, "0")  # reads as a number, but no run has 0 steps: refused beside Start
    run(TrainState.start, state)
    assert state.error.startswith("[CONFIG_INVALID]") and state.starting is False and state.start_stage == ""


def test_changing_the_dataset_or_the_model_replans_from_their_statistics(sandbox, tmp_path, tiny_model_dir):
    state = TrainState(_reflex_internal_init=True)
    run(TrainState.set_model, state, str(tiny_model_dir))  # a model folder: no tuned defaults, the data decides
    run(TrainState.replan, state)
    demo_facts, demo_rows = state.plan.facts, rows_of(state)
    assert state.plan.title.startswith(f"{tiny_model_dir} (sft)")
    assert demo_rows["LoRA rank"] == ("8", "40 examples: a smaller adapter overfits less", False)
    assert demo_rows["Epochs"][:2] == ("3", "40 examples: three passes to learn from")
    run(TrainState.set_dataset, state, str(write_long_chats(tmp_path / "long.jsonl", 240)))
    run(TrainState.replan, state)
    rows = rows_of(state)
    assert state.plan.facts[0] == demo_facts[0] and state.plan.facts[1].startswith("data: 240 examples; tokens p50")
    assert rows["LoRA rank"] == ("16", "the usual rank for 240 examples", False)
    assert rows["Max length (tokens)"][1].startswith("covers") and int(rows["Max length (tokens)"][0]) > int(
        demo_rows["Max length (tokens)"][0])  # fmt: skip
    assert state.placeholders["max_seq_length"] == rows["Max length (tokens)"][0]
    assert state.placeholders["steps"].endswith(" from epochs")  # epochs decide: the steps they make on this data
    # Back to the demo model: its tuned defaults win over the data's rules again.
    run(TrainState.pick_model, state, "demo  (built-in, CPU friendly)")
    run(TrainState.replan, state)
    assert rows_of(state)["LoRA rank"] == ("16", "this model's tuned default", False)


def test_a_plan_that_cannot_be_made_shows_its_coded_error_in_the_panel_and_the_form_stays_usable(sandbox, tmp_path):
    state = TrainState(_reflex_internal_init=True)
    run(TrainState.set_model, state, str(tmp_path / "no-such-model"))
    run(TrainState.replan, state)
    assert state.plan_error.startswith("[INPUT_MODEL_NOT_FOUND]") and state.plan_hint
    assert not state.plan.shown and state.placeholders["steps"] == "model default" and state.error == ""
    run(TrainState.set_model, state, "demo")
    run(TrainState.set_steps, state, "twelve")
    run(TrainState.replan, state)
    assert state.plan_error == "[INPUT_INVALID_ARGUMENT] Steps: 'twelve' is not a whole number"
    run(TrainState.set_steps, state, "12")
    run(TrainState.replan, state)
    assert state.plan_error == "" and rows_of(state)["Steps"] == ("12", "set by you", True)


def test_a_typed_setting_that_will_not_work_is_flagged_before_the_start_with_what_to_change_in_the_form(sandbox):
    state = TrainState(_reflex_internal_init=True)
    run(TrainState.set_max_seq_length, state, "4096")  # the demo model has 1024 positions
    run(TrainState.replan, state)
    assert state.plan_error == "" and rows_of(state)["Max length (tokens)"] == ("4096", "set by you", True)
    [problem] = state.plan.problems
    assert (problem.code, problem.message) == ("INPUT_INVALID_ARGUMENT", "max_seq_length 4096 is longer than the 1024 "
                                               "positions demo was trained for")  # fmt: skip
    assert problem.hint == "Use Max length 1024 or less."  # the form's field, not the command line's flag


def test_typing_while_a_plan_is_pending_plans_once_the_form_as_it_ends(sandbox, monkeypatch):
    import app.state.train as train

    plans, real = [], train.plan_form

    def counted(*args):  # the real plan, counted
        plans.append(args[0].get("steps"))
        return real(*args)

    monkeypatch.setattr(train, "plan_form", counted)
    state = TrainState(_reflex_internal_init=True)

    async def type_while_planning():
        loop = asyncio.create_task(TrainState.replan.fn(state))
        await asyncio.sleep(0)  # the loop has claimed the tab and waits for the form to be left alone
        assert state.planning
        for typed in ("1", "12", "120"):  # each keystroke: a request, and a replan event refused at once
            run(TrainState.set_steps, state, typed)
            await TrainState.replan.fn(state)
        await loop

    asyncio.run(type_while_planning())
    assert plans == [120] and rows_of(state)["Steps"] == ("120", "set by you", True) and not state.planning
    state._planner = "an-earlier-server:claim"  # a claim left by a server that restarted mid-plan is stale
    run(TrainState.replan, state)
    assert plans == [120, 120] and state._planner == ""


def test_a_run_page_shows_the_plan_the_run_was_started_with_and_nothing_for_a_run_without_one(sandbox, tmp_path,
                                                                                              monkeypatch):  # fmt: skip
    from app.state.runs import run_view
    from training import jobs
    from training.config import load_settings
    from training.runs import Registry

    queue_only(tmp_path, monkeypatch)
    registry = Registry(load_settings().home)
    planned = jobs.submit_train(load_settings(model="demo", training={"batch_size": 4}), str(DEMO_DATA))
    unplanned = jobs.submit_train(load_settings(model="demo"), str(DEMO_DATA), plan=False)
    view, _ = run_view(registry, planned.id, None)
    rows = {r.setting: (r.value, r.given) for r in view["plan"].rows}
    assert view["plan"].shown and rows["Batch size"] == ("4", True) and rows["Steps"] == ("300", False)
    assert view["plan"].time and view["plan"].memory and "data: 40 examples" in view["plan"].facts[1]
    assert run_view(registry, unplanned.id, None)[0]["plan"].shown is False
    for run_id in (planned.id, unplanned.id):
        stop_queued(run_id)
