"""`backprop list` and `backprop show-run`: the run registry as tables, text charts or JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from training.cli.common import open_registry, status_markup
from training.cli.multi_run import print_multi_run


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    runs = sub.add_parser("list", parents=[common], help="table of runs")
    runs.add_argument("--status", help="only runs with this status")
    runs.add_argument("--limit", type=int, default=20, help="at most this many (default 20; 0: all)")
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(handler=cmd_list)

    show = sub.add_parser("show-run", parents=[common], help="one run: params, loss curve, checkpoints")
    show.add_argument("run_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_show_run)


def cmd_list(args: argparse.Namespace) -> int:
    runs = open_registry().list(status=args.status, limit=args.limit or None)
    if args.json:
        print(json.dumps([r.to_dict() for r in runs], default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    if not runs:
        print("No runs yet. Start one with: backprop train --model demo")
        return 0
    table = Table(box=None, header_style="bold")
    for column in ("id", "kind", "name", "status", "model", "dataset", "step", "loss", "created"):
        table.add_column(column, no_wrap=column in ("id", "status", "step", "created"), overflow="ellipsis")
    for r in runs:
        loss = r.final_loss if r.final_loss is not None else r.loss
        table.add_row(r.id, r.kind, r.name or "", status_markup(r.status), r.model or "", Path(r.dataset or "").name,
                      f"{r.step}/{r.max_steps or '?'}", f"{loss:.4f}" if loss is not None else "-",
                      time.strftime("%m-%d %H:%M", time.localtime(r.created_at)))  # fmt: skip
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # pipes get whole ids and names
    return 0


def cmd_show_run(args: argparse.Namespace) -> int:
    from training.events import read_events
    from training.tracking import read_tracking

    registry = open_registry()
    run = registry.get(args.run_id)
    if run.kind == "multi-run" and not args.json:
        print_multi_run(run)
        return 0
    events, _ = read_events(run.path / "events.jsonl")
    steps: dict[int, float] = {}
    for e in events:
        if e["event"] == "step":
            steps[e["step"]] = e["loss"]  # a resumed run re-emits steps after its checkpoint: the later wins
    evals = [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in events if e["event"] == "eval"]
    checkpoints = [{"step": c.step, "path": c.path} for c in registry.checkpoints(run.id)]
    losses = [steps[s] for s in sorted(steps)]
    if args.json:
        details = {
            **run.to_dict(),
            "losses": losses,
            "evals": evals,
            "checkpoints": checkpoints,
            "tracking": read_tracking(run.path),
        }
        started = next((e for e in reversed(events) if e["event"] == "started"), {})
        details.update({key: started.get(key) for key in ("world_size", "strategy", "devices")})  # how it ran, last time
        if run.kind == "multi-run":
            from training.multi_run import forgetting_metrics

            matrix = registry.forgetting(run.id)
            details.update(forgetting=matrix, **forgetting_metrics(matrix), children=[c.id for c in registry.children(run.id)],
                           merges=[e for e in events if e["event"] == "merge"])  # fmt: skip
        print(json.dumps(details, default=str))
        return 0
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    console.print(f"[bold]run {run.id}[/] {run.name or ''}  {status_markup(run.status)}  step {run.step}/{run.max_steps or '?'}")
    console.print(f"model {run.model}   dataset {run.dataset}   sha256 {(run.dataset_sha256 or '')[:12]}")
    if run.error_code:
        console.print(f"[red][{run.error_code}][/] {run.error_message}")
    params = "  ".join(f"{k}={v}" for k, v in sorted(run.params.items()) if v is not None)
    console.print(f"[dim]{params}[/]")
    if losses:
        console.print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" + (f"   eval {evals[-1]['eval_loss']:.4f}" if evals else ""))
        console.print(loss_chart(losses))
    for c in checkpoints:
        console.print(f"checkpoint step {c['step']}: {c['path']}")
    if (run.path / "adapter").exists():
        console.print(f"adapter: {run.path / 'adapter'}")
    print_tracking(console, read_tracking(run.path))
    return 0


def print_tracking(console, tracking: dict) -> None:
    """Where the run was tracked (RUN_DIR/tracking.json, written by training/tracking.py)."""
    if tracking.get("tensorboard"):
        console.print(f"tensorboard: tensorboard --logdir {tracking['tensorboard']}")
    if tracking.get("mlflow"):
        console.print(f"mlflow: run {tracking['mlflow'].get('run_id')} at {tracking['mlflow'].get('tracking_uri')}")
    if tracking.get("wandb"):
        wandb = tracking["wandb"]
        console.print(f"wandb: {wandb.get('url') or 'offline, `wandb sync ' + str(wandb.get('offline_dir')) + '` uploads it'}")
    for name, reason in (tracking.get("failed") or {}).items():
        console.print(f"[yellow]{name}: failed ({reason})[/]")


def loss_chart(values: list[float], width: int = 60, height: int = 8) -> str:
    """A small text plot of a loss curve (mean per column), high values on top."""
    if not values:
        return ""
    columns = min(width, len(values))
    buckets = [values[i * len(values) // columns : (i + 1) * len(values) // columns] for i in range(columns)]
    means = [sum(b) / len(b) for b in buckets]
    lo, hi = min(means), max(means)
    span = (hi - lo) or 1.0
    levels = [round((m - lo) / span * (height - 1)) for m in means]
    rows = []
    for level in range(height - 1, -1, -1):
        label = f"{lo + span * level / (height - 1):8.3f} |"
        rows.append(label + "".join("•" if lv == level else " " for lv in levels))
    rows.append(" " * 9 + "+" + "-" * columns + f" steps 1..{len(values)}")
    return "\n".join(rows)
