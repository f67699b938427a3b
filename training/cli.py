"""The `backprop` command.

Heavy libraries (torch, transformers) are imported inside the commands that need them, so that
`backprop --help` and `backprop list` start fast.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from training.errors import BackpropError, redact

DEMO_DATASET = Path(__file__).resolve().parent.parent / "assets" / "demo" / "capitals.jsonl"


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter is not for users
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        return args.handler(args) or 0
    except BackpropError as exc:
        _print_error(exc, args.verbose)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130


def _print_error(exc: BackpropError, verbose: bool) -> None:
    from rich.console import Console

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(f"[bold red][{exc.code}][/] {redact(exc.message)}", markup=True)
    if exc.hint:
        console.print(f"[dim]hint:[/] {redact(exc.hint)}")
    if verbose:
        console.print(redact("".join(traceback.format_exception(exc))))


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", "-v", action="store_true", help="show tracebacks of errors")
    parser = argparse.ArgumentParser(
        prog="backprop",
        description="Fine-tune language models with LoRA: train, inspect runs, resume, validate data.",
        parents=[common],
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    train = sub.add_parser("train", parents=[common], help="fine-tune a model on a dataset",
                           description="Fine-tune a model with LoRA. Every run is recorded in the registry.")  # fmt: skip
    train.add_argument(
        "--model", "-m", help="preset, hub id, local folder, or 'demo' (default: config, else Qwen/Qwen2.5-0.5B-Instruct)"
    )
    train.add_argument("--data", "-d", help="dataset file or hub dataset id (default with --model demo: the demo dataset)")
    train.add_argument(
        "--format", choices=["sharegpt", "openai", "alpaca", "prompt_completion", "chatml", "text"], help="force a dataset format"
    )
    train.add_argument("--skip-invalid", action="store_true", help="train on the valid rows and report the bad ones")
    train.add_argument("--name", help="a name for the run")
    train.add_argument("--steps", type=int, help="optimizer steps (wins over --epochs)")
    train.add_argument("--epochs", type=float)
    train.add_argument("--lr", type=float, help="learning rate")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--gradient-accumulation", "--grad-accum", type=int)
    train.add_argument("--max-seq-length", type=int)
    train.add_argument("--warmup-ratio", type=float)
    train.add_argument("--lr-scheduler", choices=["cosine", "linear", "constant"])
    train.add_argument("--seed", type=int)
    train.add_argument("--lora-r", type=int)
    train.add_argument("--lora-alpha", type=int)
    train.add_argument("--lora-dropout", type=float)
    train.add_argument("--target-modules", help="comma-separated module names, or all-linear")
    train.add_argument("--validation-split", type=float, help="fraction held out for eval loss")
    train.add_argument("--eval-every", type=int, help="steps between evaluations")
    train.add_argument("--save-every", type=int, help="steps between checkpoints")
    train.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None, help="pack short examples (default on)")
    train.add_argument("--response-only", action=argparse.BooleanOptionalAction, default=None,
                       help="loss on assistant tokens only (default on)")  # fmt: skip
    train.add_argument("--qlora", action="store_true", default=None, help="4-bit QLoRA (NVIDIA GPU)")
    train.add_argument("--unsloth", dest="use_unsloth", action=argparse.BooleanOptionalAction, default=None,
                       help="use unsloth on CUDA when installed (default on)")  # fmt: skip
    train.add_argument(
        "--max-run-minutes", type=float, default=0, help="time box: stop with a checkpoint after this long (0: none)"
    )
    train.add_argument("--json", action="store_true", help="print the result as JSON instead of a progress bar")
    train.set_defaults(handler=cmd_train)

    resume = sub.add_parser("resume", parents=[common], help="continue a run from its last checkpoint")
    resume.add_argument("run_id", help="run id or unambiguous prefix")
    resume.add_argument("--max-run-minutes", type=float, default=0)
    resume.add_argument("--json", action="store_true")
    resume.set_defaults(handler=cmd_resume)

    runs = sub.add_parser("list", parents=[common], help="table of runs")
    runs.add_argument("--status", help="only runs with this status")
    runs.add_argument("--limit", type=int, default=20, help="at most this many (default 20; 0: all)")
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(handler=cmd_list)

    show = sub.add_parser("show-run", parents=[common], help="one run: params, loss curve, checkpoints")
    show.add_argument("run_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_show_run)

    validate = sub.add_parser("validate", parents=[common], help="check a dataset: format, counts, token lengths, bad lines",
                              description="Exit 0: all rows valid; 3: some rows invalid; 1: unusable.")  # fmt: skip
    validate.add_argument("data")
    validate.add_argument("--format", choices=["sharegpt", "openai", "alpaca", "prompt_completion", "chatml", "text"])
    validate.add_argument("--model", "-m", default="demo", help="tokenizer for token-length stats (default: demo)")
    validate.add_argument("--no-tokens", action="store_true", help="skip token-length stats (fastest)")
    validate.add_argument("--json", action="store_true")
    validate.set_defaults(handler=cmd_validate)

    info = sub.add_parser("info", parents=[common], help="versions, CUDA and GPUs, installed extras, model presets")
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=cmd_info)
    return parser


# ---------------------------------------------------------------------------- commands


def _registry():
    from training.config import load_settings
    from training.runs import Registry

    return Registry(load_settings().home)


def cmd_train(args: argparse.Namespace) -> int:
    from training.config import load_settings, nest_options
    from training.runs import Registry
    from training.trainer import new_train_run

    options = {
        key: getattr(args, key)
        for key in ("model", "steps", "epochs", "lr", "batch_size", "gradient_accumulation", "max_seq_length",
                    "warmup_ratio", "lr_scheduler", "seed", "lora_r", "lora_alpha", "lora_dropout", "validation_split",
                    "eval_every", "save_every", "packing", "response_only", "qlora", "use_unsloth")
    }  # fmt: skip
    if args.target_modules:
        options["target_modules"] = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    settings = load_settings(**nest_options(options))
    data = args.data
    if data is None:
        if settings.model != "demo":
            raise BackpropError(
                "INPUT_INVALID_ARGUMENT", reason="--data is required", hint="Pass --data FILE, or use --model demo."
            )
        data = str(DEMO_DATASET)
    registry = Registry(settings.home)
    run = new_train_run(registry, settings, data, fmt=args.format, skip_invalid=args.skip_invalid, name=args.name)
    return _run_in_foreground(run.id, args, lambda control, on_event: _train(run, registry, control, on_event))


def _train(run, registry, control, on_event):
    from training.trainer import run_training

    return run_training(run, registry, control=control, on_event=on_event)


def cmd_resume(args: argparse.Namespace) -> int:
    from training.resume import resume_run

    registry = _registry()
    run = registry.get(args.run_id)
    return _run_in_foreground(
        run.id, args, lambda control, on_event: resume_run(registry, run.id, control=control, on_event=on_event)
    )


def _run_in_foreground(run_id: str, args: argparse.Namespace, start) -> int:
    """Run a job in this process with a progress bar; the first Ctrl-C stops it gracefully (checkpoint first)."""
    from training.trainer import Control

    control = Control(deadline=time.monotonic() + args.max_run_minutes * 60 if args.max_run_minutes else None)

    def request_stop(signum, frame):
        if control.stop.is_set():
            raise KeyboardInterrupt
        control.stop.set()
        print("\nStopping at the next step boundary (Ctrl-C again to abort)...", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        if args.json:
            result = start(control, None)
        else:
            with _TrainingProgress(run_id) as progress:
                result = start(control, progress.on_event)
    finally:
        signal.signal(signal.SIGINT, previous)
    summary = {"run_id": result.run_id, "status": result.status, "steps": result.steps, "final_loss": result.final_loss,
               "eval_loss": result.eval_loss, "adapter": str(result.adapter_path) if result.adapter_path else None,
               "run_dir": str(result.run_dir)}  # fmt: skip
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    if result.status == "stopped":
        return 130
    return 0 if result.status == "completed" else 3


def _print_summary(summary: dict[str, Any]) -> None:
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


class _TrainingProgress:
    """A rich progress bar fed by training events: step, loss, tokens/s, ETA."""

    def __init__(self, run_id: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.run_id = run_id
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )  # fmt: skip
        self.task = self.progress.add_task(f"run {run_id}", total=None, loss="-", tps="-", start=False)

    def __enter__(self) -> _TrainingProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "started":
            self.progress.start_task(self.task)
            self.progress.update(self.task, total=event["max_steps"], completed=event.get("resumed_from") or 0)
            self.progress.console.print(f"training {event['model']} on {event['examples']} examples ({event['device']})")
        elif kind == "step":
            self.progress.update(
                self.task, completed=event["step"], loss=f"{event['loss']:.4f}", tps=f"{event['tokens_per_s']:.0f}"
            )
        elif kind == "eval":
            self.progress.console.print(f"step {event['step']}: eval loss {event['eval_loss']:.4f}")
        elif kind == "checkpoint_saved":
            self.progress.console.print(f"[dim]checkpoint at step {event['step']}[/]")
        elif kind == "log" and event.get("level") in ("warning", "error"):
            self.progress.console.print(f"[yellow]{event['message']}[/]")


def cmd_list(args: argparse.Namespace) -> int:
    runs = _registry().list(status=args.status, limit=args.limit or None)
    if args.json:
        print(json.dumps([r.to_dict() for r in runs], default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    if not runs:
        print("No runs yet. Start one with: backprop train --model demo")
        return 0
    table = Table(box=None, header_style="bold")
    for column in ("id", "name", "status", "model", "dataset", "step", "loss", "created"):
        table.add_column(column, no_wrap=column in ("id", "status", "step", "created"), overflow="ellipsis")
    for r in runs:
        loss = r.final_loss if r.final_loss is not None else r.loss
        table.add_row(r.id, r.name or "", _status_markup(r.status), r.model or "", Path(r.dataset or "").name,
                      f"{r.step}/{r.max_steps or '?'}", f"{loss:.4f}" if loss is not None else "-",
                      time.strftime("%m-%d %H:%M", time.localtime(r.created_at)))  # fmt: skip
    Console().print(table)
    return 0


def _status_markup(status: str) -> str:
    colour = {"completed": "green", "running": "cyan", "failed": "red", "interrupted": "yellow",
              "timeboxed": "yellow", "stopped": "yellow", "paused": "magenta"}.get(status, "white")  # fmt: skip
    return f"[{colour}]{status}[/]"


def cmd_show_run(args: argparse.Namespace) -> int:
    from training.events import read_events

    registry = _registry()
    run = registry.get(args.run_id)
    events, _ = read_events(run.path / "events.jsonl")
    steps: dict[int, float] = {}
    for e in events:
        if e["event"] == "step":
            steps[e["step"]] = e["loss"]  # a resumed run re-emits steps after its checkpoint: the later wins
    evals = [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in events if e["event"] == "eval"]
    checkpoints = [{"step": c.step, "path": c.path} for c in registry.checkpoints(run.id)]
    losses = [steps[s] for s in sorted(steps)]
    if args.json:
        print(json.dumps({**run.to_dict(), "losses": losses, "evals": evals, "checkpoints": checkpoints}, default=str))
        return 0
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    console.print(f"[bold]run {run.id}[/] {run.name or ''}  {_status_markup(run.status)}  step {run.step}/{run.max_steps or '?'}")
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
    return 0


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


def cmd_validate(args: argparse.Namespace) -> int:
    from training.datasets import scan

    tokenizer = None
    if not args.no_tokens:
        from training.models import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(args.model))
    report = scan(args.data, args.format, tokenizer=tokenizer)
    code = 1 if not report.usable else (3 if report.error_count else 0)
    if args.json:
        print(json.dumps({**report.to_dict(), "tokenizer": None if args.no_tokens else args.model}))
        return code
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    formats = ", ".join(f"{k} {v}" for k, v in report.formats.most_common()) or "none"
    console.print(f"[bold]{report.path}[/] ({report.file_type})")
    console.print(f"format: {report.format or 'unknown'}  ({formats})")
    console.print(f"rows: {report.rows}   valid: {report.valid_rows}   invalid: {report.error_count}")
    if report.turns.count:
        turns = report.turns.to_dict()
        console.print(f"turns per conversation: min {turns['min']}  mean {turns['mean']}  max {turns['max']}")
    if report.tokens and report.tokens.count:
        t = report.tokens.to_dict()
        console.print(f"tokens ({args.model} tokenizer): min {t['min']}  mean {t['mean']}  max {t['max']}  total {t['total']}")
        console.print("  " + "  ".join(f"{k}: {v}" for k, v in t["histogram"].items()))
    for error in report.errors:
        console.print(f"[red]{error.describe(report.path)}[/] [dim][{error.code}][/]")
    if report.error_count > len(report.errors):
        console.print(f"... and {report.error_count - len(report.errors)} more")
    if code == 1:
        console.print("[red]unusable: no valid rows[/]")
    elif code == 3:
        console.print("[yellow]some rows are invalid: fix them, or train with --skip-invalid[/]")
    else:
        console.print("[green]ok[/]")
    return code


def cmd_info(args: argparse.Namespace) -> int:
    from training.system_info import collect

    info = collect()
    if args.json:
        print(json.dumps(info, default=str))
        return 0
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    for key in ("backprop", "python", "torch", "transformers", "peft", "platform", "home"):
        console.print(f"{key:13} {info[key]}")
    console.print(f"{'cuda':13} {info['cuda'] or 'not available'}")
    for gpu in info["gpus"]:
        console.print(f"  GPU {gpu['index']}: {gpu['name']}, {gpu['memory_gb']} GB")
    console.print("extras:      " + "  ".join(f"{k} {'✓ ' + v if v else '✗'}" for k, v in info["extras"].items()))
    console.print("presets (LoRA VRAM / QLoRA VRAM, GB):")
    for p in info["presets"]:
        console.print(f"  {p['hub_id']:40} {p['vram_gb']:5} / {p['qlora_vram_gb']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
