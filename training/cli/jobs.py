"""`backprop run` (any training script as a governed job), `backprop status` (the machine or one run), `backprop stop`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from training.cli.common import (
    add_distributed_flags,
    add_governor_flags,
    add_job_flags,
    check_distributed,
    distributed_options,
    governor_options,
    open_registry,
    status_markup,
)
from training.cli.follow import follow_in_foreground


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
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
    add_distributed_flags(run, strategy=False)  # a script spreads its model itself; torchrun starts its ranks
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


def cmd_run(args: argparse.Namespace) -> int:
    from training import jobs
    from training.config import load_settings, nest_options

    settings = load_settings(**nest_options({**governor_options(args), **distributed_options(args)}))
    check_distributed(settings)
    run = jobs.submit_script(settings, args.script, args.script_args, name=args.name, run_id=args.run_id,
                             framework=args.framework, checkpoint_every_minutes=args.checkpoint_every_minutes,
                             resume_from=args.resume_from)  # fmt: skip
    return follow_in_foreground(run.id, args)


def cmd_stop(args: argparse.Namespace) -> int:
    from training import jobs

    registry = open_registry()
    run = registry.get(args.run_id)
    print(f"stopping run {run.id} (checkpoint first; forced after {args.grace:g} s)..." if args.grace is not None
          else f"stopping run {run.id} (checkpoint first)...", file=sys.stderr)  # fmt: skip
    run = jobs.stop(registry, run.id, grace=args.grace)
    print(f"run {run.id} {run.status} at step {run.step}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.run_id:
        return run_status(args)
    from rich.console import Console

    from training.config import load_settings
    from training.telemetry import Telemetry

    settings = load_settings(**({"gpu": {"probe": args.gpu_probe}} if args.gpu_probe else {}))
    telemetry = Telemetry(settings.gpu.probe, settings.telemetry_file)
    time.sleep(0.5)  # CPU load is measured over this interval
    sample = telemetry.sample()
    active = [r for r in open_registry().list() if r.status in ("queued", "running", "paused")]
    if args.json:
        print(json.dumps({**sample.to_event(), "gpu_note": sample.gpu_note, "active_runs": [r.id for r in active]}))
        return 0
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"CPU  {sample.cpu:5.1f}%")
    console.print(f"RAM  {sample.ram_used / 1024:.1f} / {sample.ram_total / 1024:.1f} GB used, "
                  f"{sample.ram_available / 1024:.1f} GB free")  # fmt: skip
    for g in sample.gpus:
        mem = f"{g.mem_used:.0f} / {g.mem_total:.0f} MB used, {g.mem_free:.0f} MB free" if g.mem_free is not None else "memory ?"
        console.print(f"GPU {g.index} {g.name}: {mem}, util {fmt(g.util, '%')}, {fmt(g.temp, ' °C')}, "
                      f"power {fmt(g.power, ' W')} / {fmt(g.power_limit, ' W')}")  # fmt: skip
    if sample.gpu_note:
        console.print(f"[dim]{sample.gpu_note}[/]")
    for r in active:
        console.print(f"{status_markup(r.status)} {r.id} {r.name or ''} step {r.step}/{r.max_steps or '?'}"
                      + (f"  ({r.reason})" if r.reason else ""))  # fmt: skip
    return 0


def fmt(value: float | None, unit: str) -> str:
    return "?" if value is None else f"{value:.0f}{unit}"


def run_status(args: argparse.Namespace) -> int:
    registry = open_registry()
    run = registry.get(args.run_id)
    checkpoints = [{"step": c.step, "path": c.path} for c in registry.checkpoints(run.id)]
    logs = [str(run.path / name) for name in ("events.jsonl", "worker.log", "script.log") if (run.path / name).exists()]
    if args.json:
        print(json.dumps({**run.to_dict(), "checkpoints": checkpoints, "logs": logs}, default=str))
        return 0
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    loss = f"{run.loss:.4f}" if run.loss is not None else "-"
    console.print(f"[bold]run {run.id}[/] ({run.kind}) {run.name or ''}  {status_markup(run.status)}"
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
