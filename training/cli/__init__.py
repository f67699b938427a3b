"""The `backprop` command: one module per command group, each with a small `register(sub, common)` parser builder.

  train.py      train, resume                  multi_run.py  multi-run
  runs.py       list, show-run                 jobs.py       run (any script), status, stop
  data.py       validate                       export.py     export, push
  chat.py       chat, generate                 ui.py         ui
  info.py       info                           compare.py    compare (2-6 runs side by side)
  eval.py       eval (did it help? base vs tuned)
  follow.py     following a job in the foreground (progress bar, Ctrl-C)
  common.py     what several commands share: flags, the registry, printing errors and statuses

Heavy libraries (torch, transformers) are imported inside the commands that need them, so that `backprop --help` and
`backprop list` start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from training.cli import chat, compare, data, export, info, jobs, multi_run, plan, runs, train, ui
from training.cli import eval as eval_command
from training.cli.common import print_error
from training.errors import BackpropError

COMMAND_GROUPS = (plan, train, multi_run, jobs, runs, compare, eval_command, data, export, chat, ui, info)


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter is not for users
    # DeepSpeed (the dist extra) logs to stdout when anything imports it (accelerate does, to unwrap a model): that
    # would break `--json`. This process never trains with it (torchrun's ranks do, with their logs).
    logging.getLogger("DeepSpeed").disabled = True
    # Importing a .gguf or ollama: model takes a while the first time: say what it does, on stderr (stdout stays --json's).
    importing = logging.getLogger("training.gguf_import")
    importing.setLevel(logging.INFO)
    if not importing.handlers:  # main() may run more than once in a process (tests, scripts)
        importing.addHandler(logging.StreamHandler(sys.stderr))
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
        print_error(exc, args.verbose)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", "-v", action="store_true", help="show tracebacks of errors")
    parser = argparse.ArgumentParser(
        prog="backprop",
        description="Fine-tune language models with LoRA: train, inspect runs, resume, validate data.",
        parents=[common],
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub, common)
    return parser
