"""`backprop validate`: a dataset's format, counts (preference pairs among them), token lengths and every bad line as
file:line."""

from __future__ import annotations

import argparse
import json

from training.cli.common import DATASET_FORMATS
from training.datasets import PREFERENCE_FORMATS

FORMATS = list(dict.fromkeys([*DATASET_FORMATS, *PREFERENCE_FORMATS]))


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    validate = sub.add_parser("validate", parents=[common], help="check a dataset: format, counts, token lengths, bad lines",
                              description="Exit 0: all rows valid; 3: some rows invalid; 1: unusable.")  # fmt: skip
    validate.add_argument("data")
    validate.add_argument("--format", choices=FORMATS)
    validate.add_argument("--model", "-m", default="demo", help="tokenizer: token lengths, template check (default demo)")
    validate.add_argument("--no-tokens", action="store_true", help="skip token-length stats (fastest)")
    validate.add_argument("--streaming", action="store_true",
                          help="hub datasets: read rows over the network, no download of the split")  # fmt: skip
    validate.add_argument("--json", action="store_true")
    validate.set_defaults(handler=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    from training.datasets import scan

    tokenizer = None
    if not args.no_tokens:
        from training.models import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(args.model))
    report = scan(args.data, args.format, tokenizer=tokenizer, streaming=args.streaming)
    code = 1 if not report.usable else (3 if report.error_count else 0)
    if args.json:
        print(json.dumps({**report.to_dict(), "tokenizer": None if args.no_tokens else args.model}))
        return code
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False, soft_wrap=True)
    formats = ", ".join(f"{k} {v}" for k, v in report.formats.most_common()) or "none"
    console.print(f"[bold]{report.path}[/] ({report.file_type})")
    console.print(f"format: {report.format or 'unknown'}  ({formats})")
    console.print(f"rows: {report.rows}   valid: {report.valid_rows}   invalid: {report.error_count}")
    if report.pairs:
        console.print(f"{report.pairs} preference pairs (prompt, chosen, rejected): ready for --method dpo or orpo")
    if report.turns.count:
        turns = report.turns.to_dict()
        console.print(f"turns per conversation: min {turns['min']}  mean {turns['mean']}  max {turns['max']}")
    if report.tokens and report.tokens.count:
        t = report.tokens.to_dict()
        counted = "tokens, prompt + chosen" if report.pairs else "tokens"  # of a pair: the conversation SFT trains on
        stats = f"min {t['min']}  mean {t['mean']}  max {t['max']}  total {t['total']}"
        console.print(f"{counted} ({args.model} tokenizer): {stats}")
        console.print("  " + "  ".join(f"{k}: {v}" for k, v in t["histogram"].items()))
    for error in report.errors:
        console.print(f"[red]{escape(error.describe(report.path))}[/] [dim]{escape(f'[{error.code}]')}[/]")
    if report.error_count > len(report.errors):
        console.print(f"... and {report.error_count - len(report.errors)} more")
    if code == 1:
        console.print("[red]unusable: no valid rows[/]")
    elif code == 3:
        console.print("[yellow]some rows are invalid: fix them, or train with --skip-invalid[/]")
    else:
        console.print("[green]ok[/]")
    return code
