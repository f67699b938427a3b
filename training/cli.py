"""The `backprop` command.

Heavy libraries (torch, transformers) are imported inside the commands that need them, so that
`backprop --help` and `backprop list` start fast.
"""

from __future__ import annotations

import argparse
import contextlib
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
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after `--` belongs to the user's script (`backprop run train.py -- --lr 0.01`).
    script_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.script_args = script_args
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
    add_governor_flags(train)
    add_job_flags(train)
    train.set_defaults(handler=cmd_train)

    multi = sub.add_parser(
        "multi-run", parents=[common], help="continual training: several runs, one LoRA adapter, SLAO merging",
        description="One dataset cut into windows (--runs, --samples), or one dataset per run (several --data). "
        "Between runs the adapter is merged with SLAO; after each run every task seen so far is evaluated.",
    )  # fmt: skip
    multi.add_argument("--model", "-m", help="as for train (default: config, else Qwen/Qwen2.5-0.5B-Instruct)")
    multi.add_argument("--data", "-d", action="append", required=True, help="a dataset; repeat for one task per run")
    multi.add_argument("--runs", type=int, help="runs over one dataset's windows")
    multi.add_argument("--steps", type=int, default=100, help="steps per run (default 100)")
    multi.add_argument("--samples", type=int, help="rows per run's window (default: the dataset split evenly)")
    multi.add_argument("--merge-mode", choices=["slao", "sequential"], default="slao")
    multi.add_argument("--replay", type=float, default=0.0, help="fraction of earlier tasks' rows replayed in each run")
    multi.add_argument("--lr-schedule", choices=["constant", "linear", "cosine"], default="constant", help="across runs")
    multi.add_argument("--lr", type=float, help="learning rate of the first run")
    multi.add_argument("--validation", type=float, default=0.1, help="held-out fraction of every task (default 0.1)")
    multi.add_argument("--early-stopping", action="store_true", help="end a run when its task's eval loss stops improving")
    multi.add_argument("--seed", type=int)
    multi.add_argument("--lora-r", type=int)
    multi.add_argument("--format", choices=["sharegpt", "openai", "alpaca", "prompt_completion", "chatml", "text"])
    multi.add_argument("--name")
    multi.add_argument("--output", type=Path, help="also copy the merged adapter to this folder at the end")
    add_governor_flags(multi)
    add_job_flags(multi)
    multi.set_defaults(handler=cmd_multi_run)

    run = sub.add_parser(
        "run", parents=[common], help="run ANY training script as a governed job",
        description="Run a training script under the governor: time box, admission, pause while hot, graceful stop. "
        "The script gets --run-id ID --max-minutes N [--checkpoint-every-seconds S] [--resume-from PATH] and speaks "
        "JSON lines on stdout; see assets/examples/train_script.py. Arguments for the script itself go after `--`: "
        "backprop run train.py --name demo -- --lr 0.01",
    )  # fmt: skip
    run.add_argument("script", help="the script (.py runs with this Python; anything else must be executable)")
    run.add_argument("-n", "--name", help="a name for the run")
    run.add_argument("--run-id", help="choose the run id (lowercase letters, digits, - and _)")
    run.add_argument("-f", "--framework", choices=["pytorch", "tensorflow", "auto"], default="auto")
    run.add_argument("-c", "--checkpoint-every-minutes", type=float, help="passed to the script as --checkpoint-every-seconds")
    run.add_argument("-r", "--resume-from", help="a checkpoint for the script's first start")
    add_governor_flags(run, short=True)
    add_job_flags(run)
    run.set_defaults(handler=cmd_run)

    status = sub.add_parser(
        "status", parents=[common], help="the machine (CPU, RAM, GPUs) or one run",
        description="Without RUN_ID: CPU load, free RAM and every GPU. With RUN_ID: that run's state.",
    )  # fmt: skip
    status.add_argument("run_id", nargs="?")
    status.add_argument("--gpu-probe", choices=["auto", "nvml", "nvidia-smi", "none"])
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)

    stop = sub.add_parser("stop", parents=[common], help="stop a run gracefully (checkpoint first), forced after a grace period")
    stop.add_argument("run_id")
    stop.add_argument("--grace", type=float, help="seconds before the job is killed (default: stopGraceSeconds, 30)")
    stop.set_defaults(handler=cmd_stop)

    resume = sub.add_parser("resume", parents=[common], help="continue a run from its last checkpoint")
    resume.add_argument("run_id", help="run id or unambiguous prefix")
    add_governor_flags(resume)
    add_job_flags(resume)
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

    export = sub.add_parser(
        "export", parents=[common], help="export a run as a LoRA adapter, a merged model or GGUF",
        description="SOURCE is a run id (or prefix), or a folder holding an adapter or a merged model.",
    )  # fmt: skip
    export.add_argument("source")
    export.add_argument("--format", "-f", dest="export_format", choices=["lora", "merged", "gguf"], default="lora")
    export.add_argument("--quantization", "-q", default="q4_k_m", help="gguf: f32, f16, q8_0, q4_k_m, q5_k_m, q6_k, q4_0")
    export.add_argument("--output", "-o", type=Path, help="folder to write (default: RUN_DIR/exports/FORMAT)")
    export.add_argument("--ollama", action="store_true", help="gguf: register the model with Ollama (OLLAMA_HOST)")
    export.add_argument("--ollama-name", help="gguf: the Ollama model name (implies --ollama)")
    export.add_argument("--system", help="gguf: a SYSTEM prompt for the Modelfile")
    export.add_argument("--num-ctx", type=int, help="gguf: the Modelfile's context length")
    export.add_argument("--json", action="store_true")
    export.set_defaults(handler=cmd_export)

    push = sub.add_parser("push", parents=[common], help="upload a run's adapter (or merged model) to the Hugging Face Hub")
    push.add_argument("source", help="run id, or an export folder")
    push.add_argument("--repo", required=True, help="owner/name")
    push.add_argument("--private", action="store_true")
    push.add_argument("--merged", action="store_true", help="push the merged model instead of the adapter")
    push.add_argument("--token-file", help="a file holding the token (default: the HF_TOKEN environment variable)")
    push.add_argument("--json", action="store_true")
    push.set_defaults(handler=cmd_push)

    chat_commands = {"chat": "chat with a tuned model in the terminal", "generate": "one reply to one prompt, for scripts"}
    for name, helptext in chat_commands.items():
        chat = sub.add_parser(name, parents=[common], help=helptext,
                              description="SOURCE: a run id, an adapter or merged model folder, or a .gguf file.")  # fmt: skip
        chat.add_argument("source")
        if name == "generate":
            chat.add_argument("prompt")
        chat.add_argument("--use", choices=["adapter", "merged", "gguf"], default="adapter",
                          help="for a run id: its adapter (default) or its latest merged or GGUF export")  # fmt: skip
        chat.add_argument("--system", help="a system prompt")
        chat.add_argument("--max-new-tokens", type=int, default=256)
        chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
        chat.set_defaults(handler=cmd_chat if name == "chat" else cmd_generate)

    ui = sub.add_parser("ui", parents=[common], help="the web app: train, watch, export and chat in a browser",
                        description="Serves the production build on one port and opens the browser.")  # fmt: skip
    ui.add_argument("--port", type=int, help="default 7862 (ui.port)")
    ui.add_argument("--host", help="default 127.0.0.1 (ui.host)")
    ui.add_argument("--dev", action="store_true", help="hot reload, for developing the app")
    ui.add_argument("--no-browser", action="store_true")
    ui.add_argument(
        "--auth",
        action="store_true",
        help="require a password (BACKPROPAGATE_UI__PASSWORD, or asked for) on every page, event and upload",
    )
    ui.add_argument("--share", nargs="?", const="auto", metavar="TUNNEL",
                    help="publish through a tunnel: cloudflared, ngrok or ssh:user@host (default: whichever is "
                         "installed); refused without --auth")  # fmt: skip
    ui.set_defaults(handler=cmd_ui)

    info = sub.add_parser("info", parents=[common], help="versions, CUDA and GPUs, installed extras, model presets")
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=cmd_info)
    return parser


GOVERNOR_OPTIONS = ("max_run_minutes", "max_parallel", "min_free_ram_gb", "gpu_memory_limit", "gpu_probe", "gpu_min_vram",
                    "gpu_max_temp")  # fmt: skip


def add_governor_flags(parser: argparse.ArgumentParser, short: bool = False) -> None:
    """The governor's flags; unset ones come from backprop.config.json, BACKPROPAGATE_* env vars or defaults."""
    group = parser.add_argument_group("governor")
    flags = (["-m"] if short else []) + ["--max-run-minutes"]
    group.add_argument(*flags, type=float, help="time box: stop with a checkpoint after this long (default 10; 0: none)")
    group.add_argument(*(["-p"] if short else []), "--max-parallel", type=int, help="jobs running at once (default 1)")
    group.add_argument("--min-free-ram", dest="min_free_ram_gb", type=float, help="GB of free RAM to start (default 4)")
    group.add_argument(*(["-g"] if short else []), "--gpu-memory-limit", help="cap the job's CUDA memory: '80%%' or GB")
    group.add_argument("--gpu-probe", choices=["auto", "nvml", "nvidia-smi", "none"], help="how GPUs are read (default auto)")
    group.add_argument("--gpu-min-vram", type=int, help="MB of free VRAM to start (default 2500)")
    group.add_argument("--gpu-max-temp", type=float, help="pause above this GPU temperature in °C (default 85)")


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--detach", action="store_true", help="print the run id and return; the job goes on")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a progress bar")


# ---------------------------------------------------------------------------- commands


def _registry():
    from training.config import load_settings
    from training.runs import Registry

    return Registry(load_settings().home)


def cmd_train(args: argparse.Namespace) -> int:
    from training import jobs
    from training.config import load_settings, nest_options

    options = {
        key: getattr(args, key)
        for key in ("model", "steps", "epochs", "lr", "batch_size", "gradient_accumulation", "max_seq_length",
                    "warmup_ratio", "lr_scheduler", "seed", "lora_r", "lora_alpha", "lora_dropout", "validation_split",
                    "eval_every", "save_every", "packing", "response_only", "qlora", "use_unsloth", *GOVERNOR_OPTIONS)
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
    run = jobs.submit_train(settings, data, fmt=args.format, skip_invalid=args.skip_invalid, name=args.name)
    return _follow_in_foreground(run.id, args)


def cmd_multi_run(args: argparse.Namespace) -> int:
    import shutil

    from training import jobs
    from training.config import load_settings, nest_options

    options = {key: getattr(args, key) for key in ("model", "lr", "seed", "lora_r", *GOVERNOR_OPTIONS)}
    settings = load_settings(**nest_options(options))
    run = jobs.submit_campaign(settings, args.data, num_runs=args.runs, steps_per_run=args.steps,
                               samples_per_run=args.samples, merge_mode=args.merge_mode, replay=args.replay,
                               lr_schedule=args.lr_schedule, validation=args.validation, early_stopping=args.early_stopping,
                               name=args.name, fmt=args.format)  # fmt: skip
    code = _follow_in_foreground(run.id, args)
    final = _registry().get(run.id)
    if not args.detach and final.status == "completed":
        if args.output:
            shutil.copytree(final.path / "adapter", args.output, dirs_exist_ok=True)
        if not args.json:
            _print_campaign(final)
    return code


def _print_campaign(run) -> None:
    from rich.console import Console

    from training.multirun import forgetting_metrics

    registry = _registry()
    console = Console(highlight=False, soft_wrap=True)
    matrix = registry.forgetting(run.id)
    children = registry.children(run.id)
    console.print(f"[bold]campaign {run.id}[/] {run.name or ''}  {_status_markup(run.status)}  "
                  f"{run.params.get('merge_mode')}, {len(children)}/{run.params.get('runs')} runs")  # fmt: skip
    for i, child in enumerate(children, 1):
        loss = f"{child.final_loss:.4f}" if child.final_loss is not None else "-"
        steps = f"{child.step}/{child.max_steps or '?'}"
        console.print(f"  run {i}: {child.id} {_status_markup(child.status)} step {steps} loss {loss}")
    from training.events import read_events

    events, _ = read_events(run.path / "events.jsonl")
    merges = [e for e in events if e["event"] == "merge"]
    if merges:
        console.print("merges:  run  lambda   |A| before -> after   |B| before -> after")
        for m in merges:
            console.print(f"         {m['run']:3}  {m['lam']:.3f}   {m['a_norm_before']:8.3f} -> {m['a_norm_after']:8.3f}"
                          f"   {m['b_norm_before']:8.3f} -> {m['b_norm_after']:8.3f}")  # fmt: skip
    if matrix:
        console.print("forgetting matrix (eval loss; row: after run i, column: task j)")
        console.print("          " + "".join(f"task {j + 1:<4}" for j in range(len(matrix[0]))))
        for i, row in enumerate(matrix, 1):
            console.print(f"  run {i:<3} " + "".join(f"{v:9.4f}" if v is not None else "        -" for v in row))
        metrics = forgetting_metrics(matrix)
        console.print(f"BWT {metrics['bwt']:+.4f} (on loss: above 0 means forgetting)   "
                      f"average loss {metrics['average_loss']:.4f}")  # fmt: skip
    if (run.path / "adapter").exists():
        console.print(f"merged adapter: {run.path / 'adapter'}")


def cmd_run(args: argparse.Namespace) -> int:
    from training import jobs
    from training.config import load_settings, nest_options

    settings = load_settings(**nest_options({key: getattr(args, key) for key in GOVERNOR_OPTIONS}))
    run = jobs.submit_script(settings, args.script, args.script_args, name=args.name, run_id=args.run_id,
                             framework=args.framework, checkpoint_every_minutes=args.checkpoint_every_minutes,
                             resume_from=args.resume_from)  # fmt: skip
    return _follow_in_foreground(run.id, args)


def cmd_resume(args: argparse.Namespace) -> int:
    from training import jobs
    from training.config import nest_options

    registry = _registry()
    overrides = nest_options({key: getattr(args, key) for key in GOVERNOR_OPTIONS})
    run = jobs.resume(registry, args.run_id, overrides)
    return _follow_in_foreground(run.id, args)


def cmd_stop(args: argparse.Namespace) -> int:
    from training import jobs

    registry = _registry()
    run = registry.get(args.run_id)
    print(f"stopping run {run.id} (checkpoint first; forced after {args.grace:g} s)..." if args.grace is not None
          else f"stopping run {run.id} (checkpoint first)...", file=sys.stderr)  # fmt: skip
    run = jobs.stop(registry, run.id, grace=args.grace)
    print(f"run {run.id} {run.status} at step {run.step}")
    return 0


def _follow_in_foreground(run_id: str, args: argparse.Namespace) -> int:
    """Follow a job's events with a progress bar until it ends. Ctrl-C stops it gracefully (checkpoint first),
    a second Ctrl-C kills it. With --detach, print the run id and return at once: the job goes on."""
    from training import jobs

    registry = _registry()
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
        with _TrainingProgress(run_id, quiet=args.json) as progress:
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
        _print_summary(summary)
    if run.status == "failed":
        error = jobs.failure(run, failure)
        _print_error(error, False)
        return error.exit_code
    return {"completed": 0, "stopped": 130}.get(run.status, 3)


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

    def __enter__(self) -> _TrainingProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def say(self, text: str) -> None:
        self.progress.console.print(text)

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "queued":
            self.say(f"[magenta]queued[/]: {event['reason']}")
        elif kind == "started":
            self.progress.start_task(self.task)
            self.progress.update(self.task, total=event.get("max_steps"), completed=event.get("resumed_from") or 0)
            if event.get("campaign"):
                self.say(f"campaign: {event['runs']} runs, {event['merge_mode']} merging"
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
            self.say(f"[magenta]paused[/]: {event.get('reason', '')}")
        elif kind == "resumed":
            self.say(f"[green]resumed[/]: {event.get('reason', '')}")
        elif kind == "log" and event.get("level") in ("warning", "error"):
            self.say(f"[yellow]{event['message']}[/]")


def cmd_status(args: argparse.Namespace) -> int:
    if args.run_id:
        return _run_status(args)
    from rich.console import Console

    from training.config import load_settings
    from training.telemetry import Telemetry

    settings = load_settings(**({"gpu": {"probe": args.gpu_probe}} if args.gpu_probe else {}))
    telemetry = Telemetry(settings.gpu.probe, settings.telemetry_file)
    time.sleep(0.5)  # CPU load is measured over this interval
    sample = telemetry.sample()
    active = [r for r in _registry().list() if r.status in ("queued", "running", "paused")]
    if args.json:
        print(json.dumps({**sample.to_event(), "gpu_note": sample.gpu_note, "active_runs": [r.id for r in active]}))
        return 0
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"CPU  {sample.cpu:5.1f}%")
    console.print(f"RAM  {sample.ram_used / 1024:.1f} / {sample.ram_total / 1024:.1f} GB used, "
                  f"{sample.ram_available / 1024:.1f} GB free")  # fmt: skip
    for g in sample.gpus:
        mem = f"{g.mem_used:.0f} / {g.mem_total:.0f} MB used, {g.mem_free:.0f} MB free" if g.mem_free is not None else "memory ?"
        console.print(f"GPU {g.index} {g.name}: {mem}, util {_fmt(g.util, '%')}, {_fmt(g.temp, ' °C')}, "
                      f"power {_fmt(g.power, ' W')} / {_fmt(g.power_limit, ' W')}")  # fmt: skip
    if sample.gpu_note:
        console.print(f"[dim]{sample.gpu_note}[/]")
    for r in active:
        console.print(f"{_status_markup(r.status)} {r.id} {r.name or ''} step {r.step}/{r.max_steps or '?'}"
                      + (f"  ({r.reason})" if r.reason else ""))  # fmt: skip
    return 0


def _fmt(value: float | None, unit: str) -> str:
    return "?" if value is None else f"{value:.0f}{unit}"


def _run_status(args: argparse.Namespace) -> int:
    registry = _registry()
    run = registry.get(args.run_id)
    checkpoints = [{"step": c.step, "path": c.path} for c in registry.checkpoints(run.id)]
    logs = [str(run.path / name) for name in ("events.jsonl", "worker.log", "script.log") if (run.path / name).exists()]
    if args.json:
        print(json.dumps({**run.to_dict(), "checkpoints": checkpoints, "logs": logs}, default=str))
        return 0
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    loss = f"{run.loss:.4f}" if run.loss is not None else "-"
    console.print(f"[bold]run {run.id}[/] ({run.kind}) {run.name or ''}  {_status_markup(run.status)}"
                  + (f": {run.reason}" if run.reason else ""))  # fmt: skip
    console.print(f"step {run.step}/{run.max_steps or '?'}   loss {loss}   pid {run.pid or '-'}"
                  + (f"   GPU {run.gpu_index}" if run.gpu_index is not None else "")
                  + (f"   heartbeat {time.time() - run.heartbeat:.0f} s ago" if run.heartbeat else ""))  # fmt: skip
    if run.error_code:
        console.print(f"[red][{run.error_code}][/] {run.error_message}")
    for c in checkpoints:
        console.print(f"checkpoint step {c['step']}: {c['path']}")
    for log in logs:
        console.print(f"[dim]log: {log}[/]")
    return 0


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
    for column in ("id", "kind", "name", "status", "model", "dataset", "step", "loss", "created"):
        table.add_column(column, no_wrap=column in ("id", "status", "step", "created"), overflow="ellipsis")
    for r in runs:
        loss = r.final_loss if r.final_loss is not None else r.loss
        table.add_row(r.id, r.kind, r.name or "", _status_markup(r.status), r.model or "", Path(r.dataset or "").name,
                      f"{r.step}/{r.max_steps or '?'}", f"{loss:.4f}" if loss is not None else "-",
                      time.strftime("%m-%d %H:%M", time.localtime(r.created_at)))  # fmt: skip
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # pipes get whole ids and names
    return 0


def _status_markup(status: str) -> str:
    colour = {"completed": "green", "running": "cyan", "failed": "red", "interrupted": "yellow", "timeboxed": "yellow",
              "stopped": "yellow", "paused": "magenta", "queued": "magenta"}.get(status, "white")  # fmt: skip
    return f"[{colour}]{status}[/]"


def cmd_show_run(args: argparse.Namespace) -> int:
    from training.events import read_events

    registry = _registry()
    run = registry.get(args.run_id)
    if run.kind == "multirun" and not args.json:
        _print_campaign(run)
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
        details = {**run.to_dict(), "losses": losses, "evals": evals, "checkpoints": checkpoints}
        if run.kind == "multirun":
            from training.multirun import forgetting_metrics

            matrix = registry.forgetting(run.id)
            details.update(forgetting=matrix, **forgetting_metrics(matrix), children=[c.id for c in registry.children(run.id)],
                           merges=[e for e in events if e["event"] == "merge"])  # fmt: skip
        print(json.dumps(details, default=str))
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


def cmd_export(args: argparse.Namespace) -> int:
    from training.export import export

    def show(event: dict[str, Any]) -> None:
        if event["event"] == "export_progress" and not args.json:
            print(f"{event['stage']}...", file=sys.stderr)

    result = export(args.source, args.export_format, quantization=args.quantization, output=args.output,
                    ollama_name=args.ollama_name, register_ollama=args.ollama, system=args.system, num_ctx=args.num_ctx,
                    on_event=show)  # fmt: skip
    if args.json:
        print(json.dumps(result.to_dict(), default=str))
        return 0
    print(f"{result.format}{' ' + result.quantization if result.quantization else ''}: {result.file or result.path}"
          f" ({result.size_bytes / 2**20:.1f} MiB)")  # fmt: skip
    if result.verification is not None:
        v = result.verification
        detail = ", ".join(f"{k} {v[k]}" for k in ("tokenizer_match", "greedy_match", "max_logit_diff") if k in v)
        print(f"verified: {'ok' if v.get('ok') else 'FAILED'} ({detail})")
    if result.ollama:
        print(f"ollama: registered as {result.ollama.get('name')} ({result.ollama.get('method')})")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from training.hub import push

    result = push(args.source, args.repo, private=args.private, merged=args.merged, token_file=args.token_file)
    print(json.dumps(result) if args.json else f"pushed {result['folder']} to {result['url']}")
    return 0


def _chat_model(args: argparse.Namespace):
    """The model behind SOURCE: for a run id, its adapter or its newest export of the chosen kind."""
    from training.generate import load_chat_model

    source = args.source
    if args.use != "adapter" and not Path(source).exists():
        registry = _registry()
        run = registry.get(source)
        exports = [e for e in registry.exports(run.id) if e["format"] == args.use]
        if not exports:
            raise BackpropError("STATE_NO_ADAPTER", run_id=run.id, status=f"without a {args.use} export",
                                hint=f"Create one first: backprop export {run.id} --format {args.use}")  # fmt: skip
        source = exports[0]["file"] or exports[0]["path"]
    return load_chat_model(source)


def cmd_generate(args: argparse.Namespace) -> int:
    model = _chat_model(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    for piece in model.stream(messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model = _chat_model(args)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print("Chat with the tuned model. /reset clears the conversation, Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            prompt = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not prompt:
            continue
        if prompt == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": prompt})
        reply = []
        print("model> ", end="", flush=True)
        for piece in model.stream(history, max_new_tokens=args.max_new_tokens, temperature=args.temperature):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_ui(args: argparse.Namespace) -> int:
    from app.launch import serve  # the one place the engine's command line reaches into the web app

    return serve(args.host, args.port, dev=args.dev, open_browser=not args.no_browser, auth=args.auth, share=args.share)


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
