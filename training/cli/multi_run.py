"""`backprop multi-run`: continual training, several runs into one LoRA adapter merged with SLAO."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from training.cli.common import (
    DATASET_FORMATS,
    GOVERNOR_OPTIONS,
    TRACKING_OPTIONS,
    add_distributed_flags,
    add_governor_flags,
    add_job_flags,
    add_tracking_flags,
    check_distributed,
    distributed_options,
    open_registry,
    status_markup,
)
from training.cli.follow import follow_in_foreground


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
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
    multi.add_argument("--method", choices=["sft", "dpo", "orpo"], help="as for train: every run of the campaign uses it")
    multi.add_argument("--beta", type=float, help="DPO's beta (default 0.1)")
    multi.add_argument("--orpo-lambda", type=float, help="ORPO's lambda (default 0.1)")
    multi.add_argument("--format", choices=DATASET_FORMATS)
    multi.add_argument("--name")
    multi.add_argument("--output", type=Path, help="also copy the merged adapter to this folder at the end")
    add_tracking_flags(multi)
    add_distributed_flags(multi)
    add_governor_flags(multi)
    add_job_flags(multi)
    multi.set_defaults(handler=cmd_multi_run)


def cmd_multi_run(args: argparse.Namespace) -> int:
    from training import jobs
    from training.config import load_settings, nest_options

    keys = ("model", "lr", "seed", "lora_r", "method", "beta", "orpo_lambda", *TRACKING_OPTIONS, *GOVERNOR_OPTIONS)
    options = {key: getattr(args, key) for key in keys}
    settings = load_settings(**nest_options({**options, **distributed_options(args)}))
    check_distributed(settings)
    run = jobs.submit_multi_run(settings, args.data, num_runs=args.runs, steps_per_run=args.steps,
                               samples_per_run=args.samples, merge_mode=args.merge_mode, replay=args.replay,
                               lr_schedule=args.lr_schedule, validation=args.validation, early_stopping=args.early_stopping,
                               name=args.name, fmt=args.format)  # fmt: skip
    code = follow_in_foreground(run.id, args)
    final = open_registry().get(run.id)
    if not args.detach and final.status == "completed":
        if args.output:
            shutil.copytree(final.path / "adapter", args.output, dirs_exist_ok=True)
        if not args.json:
            print_multi_run(final)
    return code


def print_multi_run(run) -> None:
    from rich.console import Console

    from training.multi_run import forgetting_metrics

    registry = open_registry()
    console = Console(highlight=False, soft_wrap=True)
    matrix = registry.forgetting(run.id)
    children = registry.children(run.id)
    console.print(f"[bold]multi-run {run.id}[/] {run.name or ''}  {status_markup(run.status)}  "
                  f"{run.params.get('merge_mode')}, {len(children)}/{run.params.get('runs')} runs")  # fmt: skip
    for i, child in enumerate(children, 1):
        loss = f"{child.final_loss:.4f}" if child.final_loss is not None else "-"
        steps = f"{child.step}/{child.max_steps or '?'}"
        console.print(f"  run {i}: {child.id} {status_markup(child.status)} step {steps} loss {loss}")
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
