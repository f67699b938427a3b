"""The compare view (/compare?runs=ID,ID,...): 2-6 runs side by side, from training.compare.compare_runs.

The engine does the comparing (curves on one step axis, the differing parameters, final metrics); this module only
turns its dict into what the page draws: one line per run in each chart, each run in its own colour, and strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import reflex as rx

from app.state.errors import handler
from app.state.form import setter
from app.state.plot import Line, Plot, plot
from training.compare import compare_runs, format_duration, format_number, format_value
from training.config import load_settings
from training.runs import Registry

# One Radix colour per run, in the order the runs were picked (the engine allows at most six).
COLORS = ("accent", "orange", "green", "crimson", "purple", "cyan")
CHARTS = {"train": "train", "evals": "eval", "speed": "tokens_per_s_curve"}  # state var -> the engine's curve


@dataclass
class ParamRow:
    name: str
    cells: list[str] = field(default_factory=list)  # the value in each run, "-" where a run lacks it
    differs: bool = False


def run_ids(query: str) -> list[str]:
    """The ids of `?runs=a,b,c` (blanks dropped, order kept)."""
    return [part.strip() for part in query.split(",") if part.strip()]


def compare_view(result: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of `compare_runs(...)`: a plot per curve (one line per run), a row of strings per run, the
    parameter table."""
    runs = result["runs"]
    x_range = (0, max(result["max_step"], max((r["max_steps"] or 0 for r in runs), default=0), 1))
    plots = {
        var: plot([Line(r["label"], COLORS[i], [(s, v) for s, v in r[key]], dots=key == "eval") for i, r in enumerate(runs)],
                  x_range=x_range)
        for var, key in CHARTS.items()
    }  # fmt: skip
    rows = [
        {"id": r["id"], "label": r["label"], "kind": r["kind"], "status": r["status"], "color": f"var(--{COLORS[i]}-9)",
         "steps": f"{r['steps']}/{r['max_steps'] or '?'}", "final_loss": format_number(r["final_loss"]),
         "eval_loss": format_number(r["eval_loss"]), "tokens_per_s": format_number(r["tokens_per_s"], ".0f"),
         "duration": format_duration(r["duration_s"]), "bwt": format_number(r.get("bwt"), "+.4f")}
        for i, r in enumerate(runs)
    ]  # fmt: skip
    params = [ParamRow(p["name"], [format_value(v) for v in p["values"]], p["differs"]) for p in result["params"]]
    return {
        **plots,
        "runs": rows,
        "params": params,
        "differing": len(result["differing"]),
        "has_bwt": any(r.get("bwt") is not None for r in runs),
    }


class CompareState(rx.State):
    runs: list[dict[str, str]] = []
    params: list[ParamRow] = []
    differing: int = 0
    has_bwt: bool = False
    train: Plot = Plot()
    evals: Plot = Plot()
    speed: Plot = Plot()
    show_all: bool = False
    error: str = ""

    set_show_all = setter("show_all", bool)

    @rx.var
    def shown_params(self) -> list[ParamRow]:
        return [p for p in self.params if p.differs or self.show_all]

    @rx.var
    def same(self) -> int:
        return len(self.params) - self.differing

    @handler()
    def load(self):
        """Compare the runs the address names; a wrong count or an unknown id shows its coded error instead."""
        self.error = ""
        self.runs, self.params, self.train, self.evals, self.speed = [], [], Plot(), Plot(), Plot()
        ids = run_ids(self.router.url.query_parameters.get("runs", ""))
        view = compare_view(compare_runs(Registry(load_settings().home), ids))
        for name, value in view.items():
            setattr(self, name, value)
