"""`backprop plan`: the settings a run would get on this machine, each with its reason, and its memory and time."""

from __future__ import annotations

import argparse
import json

from training.cli.common import DATASET_FORMATS, DEMO_DATASET


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    plan = sub.add_parser("plan", parents=[common], help="plan a run: settings with reasons, peak memory and time",
                          description="Propose the settings of a run from the model's config, the dataset's token "
                          "lengths and this machine, with a reason for each; estimate its peak memory and time. "
                          "Anything you set wins and is checked. `backprop train` applies the same plan.")  # fmt: skip
    plan.add_argument("--model", "-m", help="preset, hub id, local folder, or 'demo' (only config.json and the tokenizer "
                      "are read)")  # fmt: skip
    plan.add_argument("--data", "-d", help="dataset file or hub dataset id (default with --model demo: the demo dataset)")
    plan.add_argument("--format", choices=DATASET_FORMATS, help="force a dataset format")
    plan.add_argument("--gpus", "--nproc", dest="nproc", help="processes (GPUs) on this machine, or 'auto' (as train's "
                      "--nproc; default 1)")  # fmt: skip
    plan.add_argument("--nnodes", type=int, help="machines taking part (as train's --nnodes)")
    plan.add_argument("--strategy", choices=["ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"],
                      help="how several GPUs share the model (fsdp and deepspeed-zero3 shard the frozen weights)")  # fmt: skip
    plan.add_argument("--method", choices=["sft", "dpo", "orpo"])
    plan.add_argument("--probe", action="store_true", help="measure the speed with a 10-step training run")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    for flag, kind in (("--steps", int), ("--epochs", float), ("--lr", float), ("--batch-size", int),
                       ("--gradient-accumulation", int), ("--max-seq-length", int), ("--lora-r", int),
                       ("--lora-alpha", int)):  # fmt: skip
        plan.add_argument(flag, type=kind)
    plan.add_argument("--qlora", action=argparse.BooleanOptionalAction, default=None, help="4-bit QLoRA (NVIDIA GPU)")
    plan.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    plan.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None)
    plan.set_defaults(handler=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from training.cli.follow import download_sink
    from training.config import load_settings, nest_options
    from training.errors import BackpropError
    from training.plan import make_plan
    from training.probe import probe_throughput

    options = {key: getattr(args, key) for key in ("model", "method", "steps", "epochs", "lr", "batch_size",
                                                    "gradient_accumulation", "max_seq_length", "lora_r", "lora_alpha",
                                                    "qlora", "gradient_checkpointing", "packing", "nproc", "nnodes",
                                                    "strategy")}  # fmt: skip
    settings = load_settings(**nest_options(options))
    data = args.data
    if data is None:
        if settings.model != "demo":
            raise BackpropError("INPUT_INVALID_ARGUMENT", reason="--data is required",
                                hint="Pass --data FILE (its token lengths decide the plan), or use --model demo.")  # fmt: skip
        data = str(DEMO_DATASET)
    plan = make_plan(settings, data, fmt=args.format, on_download=download_sink())
    if args.probe:  # ten real steps of the planned settings: a measured speed instead of the table's
        measured = probe_throughput(plan.apply(settings), data, fmt=args.format)
        plan = make_plan(settings, data, fmt=args.format, throughput=measured)
    print(json.dumps(plan.to_dict()) if args.json else plan.render())
    return 1 if plan.problems else 0
