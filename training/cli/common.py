"""What several commands share: the governor and job flags, the registry, printing an error or a status."""

from __future__ import annotations

import argparse
import traceback
from pathlib import Path
from typing import Any

from training.distributed import STRATEGIES
from training.errors import BackpropError, redact

DEMO_DATASET = Path(__file__).resolve().parents[2] / "assets" / "demo" / "capitals.jsonl"
DATASET_FORMATS = ["sharegpt", "openai", "alpaca", "prompt_completion", "chatml", "text", "preference", "sharegpt_preference"]
GOVERNOR_OPTIONS = ("max_run_minutes", "max_parallel", "min_free_ram_gb", "gpu_memory_limit", "gpu_probe", "gpu_min_vram",
                    "gpu_max_temp")  # fmt: skip
SPEED_OPTIONS = ("gradient_checkpointing", "attention", "loss_kernel")
TRACKING_OPTIONS = ("report_to",)
DISTRIBUTED_OPTIONS = ("nproc", "nnodes", "node_rank", "master_addr", "master_port")  # and "strategy" where it applies


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


def add_speed_flags(parser: argparse.ArgumentParser) -> None:
    """Memory and speed on CUDA; unset ones are chosen per machine."""
    group = parser.add_argument_group("memory and speed")
    group.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                       help="recompute activations in backward (default: on when they would not fit in free VRAM)")  # fmt: skip
    group.add_argument("--attention", choices=["auto", "sdpa", "eager", "flash_attention_2"],
                       help="attention kernel (default auto: flash_attention_2 on CUDA when installed, else sdpa)")  # fmt: skip
    group.add_argument("--loss-kernel", choices=["auto", "liger", "chunked", "plain"],
                       help="cross-entropy over the vocabulary (default auto: liger on CUDA, else chunked)")  # fmt: skip


def add_tracking_flags(parser: argparse.ArgumentParser) -> None:
    """Experiment trackers (training/tracking.py); unset, training.report_to from config or env (default auto)."""
    parser.add_argument("--report-to", metavar="TRACKERS",
                        help="auto (default: TensorBoard when installed, MLflow when MLFLOW_TRACKING_URI is set, W&B when "
                        "configured), none, or a comma list of wandb, tensorboard, mlflow")  # fmt: skip


def add_distributed_flags(parser: argparse.ArgumentParser, strategy: bool = True) -> None:
    """Several processes, GPUs and machines (torchrun); unset ones come from distributed.* in config or env."""
    group = parser.add_argument_group("several GPUs and machines")
    group.add_argument("--nproc", metavar="N|auto",
                       help="processes on this machine, one a GPU (default 1; auto: every GPU the governor admits)")  # fmt: skip
    if strategy:
        group.add_argument("--strategy", choices=STRATEGIES,
                           help="how the model is spread: ddp (default: a full copy per GPU), fsdp (the frozen "
                           "weights sharded over the GPUs, FSDP2), deepspeed-zero3 (the same through DeepSpeed) or "
                           "deepspeed-zero2 (optimizer state partitioned); deepspeed needs the 'dist' extra")  # fmt: skip
    group.add_argument("--nnodes", type=int, help="machines taking part (default 1): run the same command on each")
    group.add_argument("--node-rank", type=int, help="this machine's index, 0 to nnodes-1 (0 holds the rendezvous)")
    group.add_argument("--master-addr", help="address of machine 0 (several machines)")
    group.add_argument("--master-port", type=int, help="rendezvous port on machine 0 (default: a free one; 29500 on several)")


def distributed_options(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key, None) for key in (*DISTRIBUTED_OPTIONS, "strategy")}


def check_distributed(settings: Any) -> None:
    """Fail fast, before a job is queued: a DeepSpeed strategy needs the 'dist' extra; node_rank must name a machine."""
    from training.extras import require

    d = settings.distributed
    if d.strategy.startswith("deepspeed"):
        require("dist", "deepspeed")
    if d.node_rank >= d.nnodes:
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"--node-rank {d.node_rank} with --nnodes {d.nnodes}",
                            hint="Machines are numbered 0 to nnodes-1; machine 0 holds the rendezvous.")  # fmt: skip


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--detach", action="store_true", help="print the run id and return; the job goes on")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a progress bar")


def governor_options(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in GOVERNOR_OPTIONS}


def open_registry():
    from training.config import load_settings
    from training.runs import Registry

    return Registry(load_settings().home)


def print_error(exc: BackpropError, verbose: bool) -> None:
    from rich.console import Console
    from rich.markup import escape  # messages hold brackets ('backprop[export]', file:line [reason]): not markup

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(f"[bold red]{escape(f'[{exc.code}]')}[/] {escape(redact(exc.message))}")
    if exc.hint:
        console.print(f"[dim]hint:[/] {escape(redact(exc.hint))}")
    if verbose:
        console.print(escape(redact("".join(traceback.format_exception(exc)))))


def status_markup(status: str) -> str:
    colour = {"completed": "green", "running": "cyan", "failed": "red", "interrupted": "yellow", "timeboxed": "yellow",
              "stopped": "yellow", "paused": "magenta", "queued": "magenta"}.get(status, "white")  # fmt: skip
    return f"[{colour}]{status}[/]"
