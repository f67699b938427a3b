"""`backprop train` and `backprop resume`: start a LoRA fine-tune as a governed job, or continue one."""

from __future__ import annotations

import argparse
from pathlib import Path

from training.cli.common import (
    DATASET_FORMATS,
    DEMO_DATASET,
    GOVERNOR_OPTIONS,
    SPEED_OPTIONS,
    TRACKING_OPTIONS,
    add_distributed_flags,
    add_governor_flags,
    add_job_flags,
    add_speed_flags,
    add_tracking_flags,
    check_distributed,
    distributed_options,
    governor_options,
    open_registry,
)
from training.cli.follow import follow_in_foreground
from training.errors import BackpropError


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    train = sub.add_parser("train", parents=[common], help="fine-tune a model on a dataset",
                           description="Fine-tune a model with LoRA. Every run is recorded in the registry.")  # fmt: skip
    train.add_argument(
        "--model", "-m", help="preset, hub id, local folder, or 'demo' (default: config, else Qwen/Qwen2.5-0.5B-Instruct)"
    )
    train.add_argument("--data", "-d", help="dataset file or hub dataset id (default with --model demo: the demo dataset)")
    train.add_argument("--format", choices=DATASET_FORMATS, help="force a dataset format")
    train.add_argument("--skip-invalid", action="store_true", help="train on the valid rows and report the bad ones")
    train.add_argument("--name", help="a name for the run")
    train.add_argument(
        "--method",
        choices=["sft", "dpo", "orpo"],
        help='sft (default): learn the answers; dpo or orpo: learn from preference pairs (README "Preferences")',
    )
    train.add_argument("--beta", type=float, help="DPO: how far the tuned model may move from the reference (default 0.1)")
    train.add_argument("--orpo-lambda", type=float, help="ORPO: weight of the odds-ratio term (default 0.1)")
    train.add_argument(
        "--from-run",
        metavar="RUN_ID",
        help="start from a finished run's adapter (its model and LoRA shape); DPO's reference is that adapter",
    )
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
    add_speed_flags(train)
    add_tracking_flags(train)
    add_distributed_flags(train)
    train.add_argument("--no-plan", dest="plan", action="store_false",
                       help="skip the plan (`backprop plan`): generic defaults, no fit check")  # fmt: skip
    train.add_argument("--print-launch", action="store_true",
                       help="print the torchrun command and a Slurm sbatch script for this job, and exit")  # fmt: skip
    add_governor_flags(train)
    add_job_flags(train)
    train.set_defaults(handler=cmd_train, parser=train)

    resume = sub.add_parser("resume", parents=[common], help="continue a run from its last checkpoint")
    resume.add_argument("run_id", help="run id or unambiguous prefix")
    resume.add_argument("--allow-changed-data", action="store_true",
                        help="continue although the dataset file changed since the run started "
                             "(its batches then hold other rows)")  # fmt: skip
    add_governor_flags(resume)
    add_job_flags(resume)
    resume.set_defaults(handler=cmd_resume)


def cmd_train(args: argparse.Namespace) -> int:
    from training import jobs
    from training.config import load_settings, nest_options

    options = {
        key: getattr(args, key)
        for key in ("model", "steps", "epochs", "lr", "batch_size", "gradient_accumulation", "max_seq_length",
                    "warmup_ratio", "lr_scheduler", "seed", "lora_r", "lora_alpha", "lora_dropout", "validation_split",
                    "eval_every", "save_every", "packing", "response_only", "qlora", "use_unsloth", "method", "beta",
                    "orpo_lambda", *SPEED_OPTIONS,
                    *TRACKING_OPTIONS, *GOVERNOR_OPTIONS)
    }  # fmt: skip
    if args.target_modules:
        options["target_modules"] = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    settings = load_settings(**nest_options({**options, **distributed_options(args)}))
    check_distributed(settings)
    if args.print_launch:
        from training.cli.launch import launch_text

        print(launch_text(settings, args.parser, args))
        return 0
    data = args.data
    if data is None:
        if settings.model != "demo":
            raise BackpropError(
                "INPUT_INVALID_ARGUMENT", reason="--data is required", hint="Pass --data FILE, or use --model demo."
            )
        data = str(DEMO_DATASET)
    from training.cli.follow import download_sink

    run = jobs.submit_train(settings, data, fmt=args.format, skip_invalid=args.skip_invalid, name=args.name,
                            from_run=args.from_run, plan=args.plan, on_download=download_sink())  # fmt: skip
    _print_plan(run.path, args)
    return follow_in_foreground(run.id, args)


def _print_plan(run_dir: Path, args: argparse.Namespace) -> None:
    """What the plan chose for this run and its estimate, before the progress bar (not with --json or --detach)."""
    import json
    import sys

    from training.plan import summary

    recorded = json.loads((run_dir / "spec.json").read_text()).get("plan")
    if recorded and not args.json and not args.detach:
        print(summary(recorded), file=sys.stderr)


def cmd_resume(args: argparse.Namespace) -> int:
    from training import jobs
    from training.config import nest_options

    registry = open_registry()
    overrides = nest_options(governor_options(args))
    run = jobs.resume(registry, args.run_id, overrides, allow_changed_data=args.allow_changed_data)
    return follow_in_foreground(run.id, args)
