"""`backprop export` (adapter, merged model, GGUF, Ollama) and `backprop push` (the Hugging Face Hub)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
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
