"""Following a run's events from the web app: a run's progress as plain data for the charts and the event log."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.state.plot import Line, Plot, plot
from training.events import read_events
from training.preference import METRICS as PREFERENCE  # the metrics of a DPO/ORPO step

MAX_POINTS = 400  # chart points kept per series; older points are thinned, not dropped
LOG_LINES = 60


@dataclass
class Progress:
    """What a page shows of one run, updated from its events.jsonl (any offset, as often as wanted)."""

    path: Path
    offset: int = 0
    status: str = "queued"
    step: int = 0
    max_steps: int = 0
    # {"step", "loss"} and {"step", "eval_loss"} points; a preference run's also carry its PREFERENCE metrics
    # (an eval point with the eval_ names)
    loss: list[dict] = field(default_factory=list)
    method: str = "sft"  # the `started` event's: sft, dpo or orpo
    tokens_per_s: float = 0.0
    started: float | None = None
    log: list[str] = field(default_factory=list)
    error: str = ""
    hint: str = ""
    adapter: str = ""
    telemetry: list[dict] = field(default_factory=list)  # {"t", "cpu", "ram", "gpu<i>_util", "gpu<i>_temp"} per sample
    gpus: set[int] | None = None  # the run's GPUs (a job may hold several); None: the first GPU each sample reports
    merges: list[dict] = field(default_factory=list)  # a multi-run's `merge` events
    stage: str = ""  # before the first step: "downloading model 350 / 988 MB", "DPO reference: 120 / 480 pairs"

    def read(self) -> bool:
        """Take in the events written since the last call; True if anything changed."""
        events, self.offset = read_events(self.path, self.offset)
        for event in events:
            self._apply(event)
        return bool(events)

    def _apply(self, e: dict[str, Any]) -> None:
        kind = e["event"]
        if kind in ("download", "reference"):  # a model or dataset downloading; DPO scoring its pairs before step 1
            self.stage = e.get("message") or e.get("stage") or kind
        elif kind == "started":
            self.stage = ""
            self.started = self.started or e["t"]
            self.max_steps = e.get("max_steps") or self.max_steps
            self.status = "running"
            self.method = e.get("method") or self.method
            how = ", ".join(f"{k.replace('_', ' ')} {e[k]}" for k in ("attention", "loss_kernel") if e.get(k))
            what = f" {self.method.upper()}" if self.method != "sft" else ""
            self._say(
                e,
                f"started{what} on {e.get('device', '?')}: {e.get('examples', '?')} examples, {self.max_steps} steps"
                + (f" ({how})" if how else ""),
            )
        elif kind == "step":
            self.step, self.max_steps = e["step"], e.get("max_steps") or self.max_steps
            self.tokens_per_s = e.get("tokens_per_s", 0.0)
            metrics = {k: e[k] for k in PREFERENCE if e.get(k) is not None}
            self.loss = _thin([*self.loss, {"step": e["step"], "loss": e["loss"], **metrics}])
        elif kind == "eval":
            metrics = {f"eval_{k}": e[f"eval_{k}"] for k in PREFERENCE if e.get(f"eval_{k}") is not None}
            self.loss = _thin([*self.loss, {"step": e["step"], "eval_loss": e["eval_loss"], **metrics}])
            accuracy = metrics.get("eval_reward_accuracy")
            self._say(e, f"step {e['step']}: eval loss {e['eval_loss']:.4f}"
                      + (f", reward accuracy {accuracy:.2f}" if accuracy is not None else ""))  # fmt: skip
        elif kind in ("queued", "paused", "resumed"):
            self.status = {"queued": "queued", "paused": "paused", "resumed": "running"}[kind]
            self._say(e, f"{kind}: {e.get('reason', '')}")
        elif kind == "merge":
            self.merges = [*self.merges, e]
            self._say(e, f"run {e['run']} merged (lambda {e['lam']:.3f})")
        elif kind == "run_started":
            self._say(e, f"run {e.get('run', '?')} started")
        elif kind == "checkpoint_saved":
            self._say(e, f"checkpoint at step {e.get('step')}")
        elif kind == "completed":
            self.status, self.adapter, self.stage = "completed", e.get("adapter") or "", ""
            peak = e.get("peak_vram_mb")
            self._say(e, "completed" + (f", peak VRAM {peak / 1024:.1f} GiB" if peak else ""))
        elif kind == "failed":
            self.stage = ""
            self.status, self.error, self.hint = "failed", f"[{e.get('code')}] {e.get('message')}", e.get("hint") or ""
            self._say(e, self.error)
        elif kind == "telemetry":
            readings = e.get("gpus") or []
            ours = [g for g in readings if g.get("index") in self.gpus] if self.gpus is not None else readings[:1]
            ram = 100 * e["ram_used"] / e["ram_total"] if e.get("ram_total") else None
            point = {"t": round(e["t"] - (self.started or e["t"]), 1), "cpu": e.get("cpu"), "ram": round(ram, 1) if ram else None}
            for g in ours:  # every GPU of the run: a telemetry event carries all of the machine's
                point |= {f"gpu{g.get('index', 0)}_util": g.get("util"), f"gpu{g.get('index', 0)}_temp": g.get("temp")}
            self.telemetry = _thin([*self.telemetry, point])
        elif kind == "log" and e.get("level") in ("warning", "error", "info") and "samples" not in e:
            self._say(e, e["message"])

    def _say(self, e: dict[str, Any], text: str) -> None:
        self.log = [*self.log, f"{time.strftime('%H:%M:%S', time.localtime(e['t']))}  {text}"][-LOG_LINES:]

    def loss_plot(self) -> Plot:
        """Train and eval loss against steps, the x axis spanning the whole run so the curve grows across it."""
        return loss_plot(self.loss, self.max_steps)

    def telemetry_plot(self) -> Plot:
        return telemetry_plot(self.telemetry)

    @property
    def preference(self) -> bool:
        """A DPO or ORPO run (said by its `started` event, or by the metrics of its steps)."""
        return self.method in ("dpo", "orpo") or any("reward_accuracy" in p for p in self.loss)

    def preference_plots(self) -> dict[str, Plot]:
        """Reward accuracy, reward margin and chosen vs rejected log-probabilities; empty plots for an SFT run."""
        return preference_plots(self.loss, self.max_steps)

    @property
    def eta(self) -> str:
        if not self.started or not self.step or not self.max_steps or self.status != "running":
            return ""
        left = (time.time() - self.started) / self.step * (self.max_steps - self.step)
        return f"{int(left // 60)}:{int(left % 60):02d} left"


def assign_changed(state: Any, values: dict[str, Any]) -> None:
    """Set the state vars whose value differs: every assigned var is sent to the browser and redrawn there."""
    for name, value in values.items():
        if getattr(state, name) != value:
            setattr(state, name, value)


def loss_plot(points: list[dict], max_steps: int = 0) -> Plot:
    train = [(p["step"], p["loss"]) for p in points if "loss" in p]
    evals = [(p["step"], p["eval_loss"]) for p in points if "eval_loss" in p]
    last = max((p["step"] for p in points), default=0)
    lines = [Line("train loss", "accent", train)] + ([Line("eval loss", "orange", evals, dots=True)] if evals else [])
    return plot(lines, x_range=(0, max(max_steps, last, 1)))


def preference_plots(points: list[dict], max_steps: int = 0) -> dict[str, Plot]:
    """A DPO/ORPO run's charts, keyed like the page's vars: train lines and held-out dots, against steps.

    Reward accuracy (share of pairs whose chosen answer out-scores the rejected one) spans 0-1; the margin and the
    log-probabilities (summed over the answer's tokens) span their data."""
    if not any("reward_accuracy" in p or "eval_reward_accuracy" in p for p in points):
        return {"reward_accuracy": Plot(), "reward_margin": Plot(), "logps": Plot()}
    last = max((p["step"] for p in points), default=0)
    x_range = (0, max(max_steps, last, 1))

    def series(key: str) -> list[tuple[float, float | None]]:
        return [(p["step"], p[key]) for p in points if key in p]

    def lines(key: str, name: str, color: str, eval_color: str) -> list[Line]:
        held_out = series(f"eval_{key}")
        return [Line(name, color, series(key))] + ([Line(f"eval {name}", eval_color, held_out, dots=True)] if held_out else [])

    return {
        "reward_accuracy": plot(lines("reward_accuracy", "reward accuracy", "accent", "orange"), x_range=x_range,
                                y_range=(0, 1)),
        "reward_margin": plot(lines("reward_margin", "reward margin", "accent", "orange"), x_range=x_range),
        "logps": plot(lines("chosen_logps", "chosen", "green", "grass") + lines("rejected_logps", "rejected", "red", "tomato"),
                      x_range=x_range),
    }  # fmt: skip


UTIL_COLORS = ["orange", "amber", "gold", "brown", "yellow", "bronze", "lime", "grass"]  # one per GPU, warm for utilisation
TEMP_COLORS = ["red", "crimson", "pink", "plum", "tomato", "ruby", "purple", "violet"]  # and reds for temperature


def telemetry_plot(samples: list[dict]) -> Plot:
    """CPU, RAM, and each of the run's GPUs' utilisation (%) and temperature (°C), against seconds since the run
    started; 0-100. One GPU: "GPU util %" and "GPU °C"; several: "GPU 0 util %", "GPU 0 °C", ..."""
    indices = sorted({int(key[3:].split("_")[0]) for s in samples for key in s if key.startswith("gpu") and "_" in key})
    names = [("cpu", "CPU %", "accent"), ("ram", "RAM %", "green")]
    for n, i in enumerate(indices):
        gpu = "GPU" if len(indices) == 1 else f"GPU {i}"
        names += [(f"gpu{i}_util", f"{gpu} util %", UTIL_COLORS[n % 8]), (f"gpu{i}_temp", f"{gpu} °C", TEMP_COLORS[n % 8])]
    lines = [Line(label, color, [(s["t"], s.get(key)) for s in samples]) for key, label, color in names
             if any(s.get(key) is not None for s in samples)]  # fmt: skip
    return plot(lines, y_range=(0, 100))


def _thin(points: list[dict]) -> list[dict]:
    """Keep at most MAX_POINTS: when over, drop every other point of the older half (the recent curve stays exact)."""
    if len(points) <= MAX_POINTS:
        return points
    half = len(points) // 2
    return points[:half:2] + points[half:]
