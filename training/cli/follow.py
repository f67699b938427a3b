"""Following a job in the foreground: a progress bar fed by its events; Ctrl-C stops it with a checkpoint."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from typing import Any

from training.cli.common import open_registry, print_error
from training.errors import BackpropError


def follow_in_foreground(run_id: str, args: argparse.Namespace) -> int:
    """Follow a job's events with a progress bar until it ends. Ctrl-C stops it gracefully (checkpoint first),
    a second Ctrl-C kills it. With --detach, print the run id and return at once: the job goes on."""
    from training import jobs  # loads the engine; kept out of `--help`

    registry = open_registry()
    if getattr(args, "detach", False):
        print(json.dumps({"run_id": run_id, "status": registry.get(run_id).status}) if args.json else run_id)
        return 0
    interrupts = 0

    def on_interrupt(signum: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            print("\nStopping at the next step boundary (Ctrl-C again to kill)...", file=sys.stderr)
            with contextlib.suppress(BackpropError):
                jobs.request_stop(registry, run_id)
        else:
            jobs.kill(registry, run_id)

    previous = {sig: signal.signal(sig, on_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    failure: dict[str, Any] | None = None
    try:
        with TrainingProgress(run_id, quiet=args.json) as progress:
            for event in jobs.follow(registry, run_id):
                progress.on_event(event)
                if event["event"] == "failed":
                    failure = event
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    run = registry.get(run_id)
    adapter = run.path / "adapter"
    summary = {"run_id": run.id, "status": run.status, "steps": run.step, "final_loss": run.final_loss,
               "eval_loss": run.eval_loss, "adapter": str(adapter) if run.status == "completed" and adapter.exists() else None,
               "run_dir": str(run.path), "error_code": run.error_code}  # fmt: skip
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    if run.status == "failed":
        error = jobs.failure(run, failure)
        print_error(error, False)
        return error.exit_code
    return {"completed": 0, "stopped": 130}.get(run.status, 3)


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    colour = "green" if summary["status"] == "completed" else "yellow"
    loss = f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "-"
    console.print(
        f"[{colour}]{summary['status']}[/] run [bold]{summary['run_id']}[/] after {summary['steps']} steps, final loss {loss}"
    )
    if summary["adapter"]:
        console.print(f"adapter: {summary['adapter']}")
    elif summary["status"] != "completed":
        console.print(f"continue with: backprop resume {summary['run_id']}")


class TrainingProgress:
    """A rich progress bar fed by a job's events: step, loss, tokens/s, ETA, and what the governor does."""

    def __init__(self, run_id: str, quiet: bool = False):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.run_id = run_id
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=quiet, quiet=quiet),
        )  # fmt: skip
        self.task = self.progress.add_task(f"run {run_id}", total=None, loss="-", tps="-", start=False)
        self.stage = StageLine()
        self.live = False

    def __enter__(self) -> TrainingProgress:
        return self  # the bar appears with the first training event: a model download draws its own line before it

    def __exit__(self, *exc: object) -> None:
        self.stage.close()
        self.progress.stop()

    def say(self, text: str) -> None:
        self.stage.close()  # a line said while a stage line is open starts on a line of its own
        self.progress.console.print(text)

    def on_event(self, event: dict[str, Any]) -> None:
        from rich.markup import escape  # reasons and log lines are text, not markup

        kind = event["event"]
        if kind in ("download", "reference"):
            self.stage.show(event)
            return
        if kind in ("started", "step") and not self.live:  # not before: queue, telemetry and stages come first
            self.stage.close()
            self.progress.start()
            self.live = True
        if kind == "queued":
            self.say(f"[magenta]queued[/]: {event['reason']}")
        elif kind == "started":
            self.progress.start_task(self.task)
            self.progress.update(self.task, total=event.get("max_steps"), completed=event.get("resumed_from") or 0)
            if event.get("multi_run"):
                self.say(f"multi-run: {event['runs']} runs, {event['merge_mode']} merging"
                         + (f", continuing after run {event['resumed_from']}" if event.get("resumed_from") else ""))  # fmt: skip
            elif "model" in event:
                self.say(f"training {event['model']} on {event['examples']} examples ({event['device']})")
            else:
                self.say(f"started: {' '.join(event.get('command', []))}")
        elif kind == "step":
            fields = {"completed": event["step"]}
            if isinstance(event.get("loss"), int | float):
                fields["loss"] = f"{event['loss']:.4f}"
            if isinstance(event.get("tokens_per_s"), int | float):
                fields["tps"] = f"{event['tokens_per_s']:.0f}"
            if isinstance(event.get("max_steps"), int):
                fields["total"] = event["max_steps"]
            self.progress.update(self.task, **fields)
        elif kind == "eval":
            where = f"run {event['run']} step {event['run_step']}" if "run" in event else f"step {event['step']}"
            self.say(f"{where}: eval loss {event['eval_loss']:.4f}")
        elif kind == "run_started":
            self.say(f"[bold]run {event['run']}/{event['runs']}[/] ({event['task']})")
        elif kind == "merge":
            losses = " ".join(f"{v:.3f}" for v in event["eval_losses"])
            self.say(f"merged run {event['run']} (lambda {event['lam']:.3f}); eval loss per task: {losses}")
        elif kind == "checkpoint_saved":
            self.say(f"[dim]checkpoint at step {event.get('step')}[/]")
        elif kind == "paused":
            self.say(f"[magenta]paused[/]: {escape(str(event.get('reason', '')))}")
        elif kind == "resumed":
            self.say(f"[green]resumed[/]: {escape(str(event.get('reason', '')))}")
        elif kind == "log" and event.get("level") in ("warning", "error"):
            self.say(f"[yellow]{escape(str(event['message']))}[/]")


def download_sink() -> Any:
    """An event sink that draws `download` events (a hub dataset the plan fetches in this process) on stderr."""
    line = StageLine()
    return lambda event, durable=False, **fields: line.show({"event": event, **fields})


class StageLine:
    """What a run does before its first step, on stderr: a model's or a dataset's `download` (bar, bytes, rate, ETA)
    and DPO's `reference` pass (pairs scored, ETA). On a terminal one line redrawn in place, otherwise a plain line per
    event (the worker sends one a second at most, and the last)."""

    def __init__(self, stream: Any = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.width = 0  # of the line drawn last, to blank what a shorter one leaves
        self.open = False  # a redrawn line waits for its newline

    def show(self, event: dict[str, Any]) -> None:
        line, finished = self._download(event) if event["event"] == "download" else self._reference(event)
        if not self.tty:
            print(line, file=self.stream, flush=True)
            return
        self.stream.write("\r" + line.ljust(self.width) + ("\n" if finished else ""))
        self.stream.flush()
        self.width, self.open = (0, False) if finished else (len(line), True)

    def _download(self, event: dict[str, Any]) -> tuple[str, bool]:
        done, total = event.get("done_mb", 0.0), event.get("total_mb") or 0.0
        rate = event.get("rate_mb_s") or 0.0
        if str(event.get("stage")).startswith("downloaded "):
            return f"{event['message']} ({rate:.1f} MB/s)", True
        name = event.get("model") or event.get("dataset") or "model"
        return f"downloading {name}{self._bar(done, total)} {done:.1f} / {total:.1f} MB, {rate:.1f} MB/s, " \
            f"{_eta(event.get('eta_s'))}", False  # fmt: skip

    def _reference(self, event: dict[str, Any]) -> tuple[str, bool]:
        done, total = event["done"], event["total"]
        if done >= total:
            return f"DPO reference: {total} pairs scored", True
        return f"DPO reference{self._bar(done, total)} {done} / {total} pairs, {_eta(event.get('eta_s'))}", False

    def _bar(self, done: float, total: float) -> str:
        if not (self.tty and total):
            return ""
        filled = round(24 * min(done / total, 1.0))
        return f" [{'=' * filled}{' ' * (24 - filled)}]"

    def close(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


def _eta(seconds: Any) -> str:
    return f"ETA {seconds // 60:.0f}:{seconds % 60:02.0f}" if isinstance(seconds, int | float) else "ETA -"
