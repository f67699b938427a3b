"""`backprop chat` (a conversation in the terminal) and `backprop generate` (one reply, for scripts)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from training.cli.common import open_registry
from training.errors import BackpropError


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    chat_commands = {
        "chat": "chat with a run's model or any model, in the terminal",
        "generate": "one reply to one prompt, for scripts",
    }
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


def library_warnings_to_log() -> Path:
    """transformers', peft's and Python's warnings go to a log file in the home, never into the middle of a reply."""
    from transformers.utils import logging as hf_logging

    from training.config import load_settings

    path = load_settings().home / "logs" / "chat.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    if any(getattr(h, "baseFilename", None) == str(path) for h in logging.getLogger("py.warnings").handlers):
        return path  # already routed in this process
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    hf_logging.disable_default_handler()  # its own handler writes to stderr
    logging.captureWarnings(True)
    for name in ("py.warnings", "transformers", "peft"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.propagate = False
    return path


def chat_model(args: argparse.Namespace):
    """The model behind SOURCE: for a run id, its adapter or its newest export of the chosen kind."""
    from training.generate import load_chat_model

    library_warnings_to_log()

    source = args.source
    if args.use != "adapter" and not Path(source).exists():
        registry = open_registry()
        run = registry.get(source)
        exports = [e for e in registry.exports(run.id) if e["format"] == args.use]
        if not exports:
            raise BackpropError("STATE_NO_ADAPTER", run_id=run.id, status=f"without a {args.use} export",
                                hint=f"Create one first: backprop export {run.id} --format {args.use}")  # fmt: skip
        source = exports[0]["file"] or exports[0]["path"]
    return load_chat_model(source)


def cmd_generate(args: argparse.Namespace) -> int:
    model = chat_model(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    for piece in model.stream(messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model = chat_model(args)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"Chat with {model.description}. /reset clears the conversation, Ctrl-D quits.", file=sys.stderr)
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
