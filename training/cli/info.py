"""`backprop info`: versions, CUDA and GPUs, installed extras, model presets with VRAM estimates."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    info = sub.add_parser("info", parents=[common], help="versions, CUDA and GPUs, installed extras, model presets")
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=cmd_info)


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
