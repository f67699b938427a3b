"""`backprop eval RUN_ID`: did the fine-tune help? Base vs tuned on held-out data (training/evaluate.py)."""

from __future__ import annotations

import argparse
import json
import sys

from training.cli.common import open_registry


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from training.evaluate import DEFAULT_MAX_EXAMPLES, DEFAULT_SHOWN

    ev = sub.add_parser("eval", parents=[common], help="did it help? the base model vs the tuned one on held-out data",
                        description="Compare a run's base model (adapter off) with the tuned one on held-out data: loss "
                        "and perplexity; for chat data greedy answers scored against the references (exact match, F1); "
                        "for preference data reward accuracy and margin. The report is stored with the run and shown on "
                        "its page.")  # fmt: skip
    ev.add_argument("run_id", metavar="RUN_ID", help="run id or unambiguous prefix")
    ev.add_argument("--data", "-d", help="held-out file or hub dataset (default: the run's own validation split)")
    ev.add_argument("--max-examples", type=int, default=DEFAULT_MAX_EXAMPLES,
                    help=f"measure at most this many examples, the first ones (default {DEFAULT_MAX_EXAMPLES})")  # fmt: skip
    ev.add_argument("--shown", type=int, default=DEFAULT_SHOWN, help=f"prompts shown with both answers (default {DEFAULT_SHOWN})")
    ev.add_argument("--json", action="store_true", help="print the report as JSON")
    ev.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_run

    report = evaluate_run(open_registry(), args.run_id, args.data, max_examples=args.max_examples, shown=args.shown)
    if args.json:
        print(json.dumps(report))
        return 0
    print_report(report)
    return 0


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    data = report["data"]
    console.print(f"Run {report['run_id']}: {data['examples']} held-out examples ({escape(str(data['source']))}, "
                  f"{data['kind']} data)")  # fmt: skip
    if data.get("dataset_changed"):
        console.print("[yellow]The training file changed since the run: its split is no longer what the run held out.[/]")
    console.print(metrics_table(report["base"], report["tuned"]))
    for task in report.get("tasks", []):
        console.print(metrics_table(task["base"], task["tuned"], title=f"task {escape(task['task'])} ({task['examples']})"))
    for i, example in enumerate(report["examples"], 1):
        console.print(f"\n[bold]{i}. {escape(example['prompt'])}[/]")
        console.print(f"  [dim]reference[/] {escape(example['reference'])}")
        if "rejected" in example:
            console.print(f"  [dim]rejected [/] {escape(example['rejected'])}")
        console.print(f"  [dim]base     [/] {escape(example['base'])}")
        console.print(f"  [dim]tuned    [/] {escape(example['tuned'])}")
    console.print(f"\n[dim]evaluation {report['id']}, stored with the run[/]")


def metrics_table(base: dict, tuned: dict, title: str | None = None):
    from rich.table import Table

    table = Table(box=None, header_style="bold", title=title, title_justify="left")
    for column in ("metric", "base", "tuned", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right", no_wrap=True)
    from training.evaluate import METRICS

    for key, label, higher_is_better in METRICS:
        if key not in tuned:
            continue
        before, after = base.get(key), tuned.get(key)
        change = "-"
        if before is not None and after is not None:
            better = after > before if higher_is_better else after < before
            colour = "green" if better else "red" if after != before else "white"
            change = f"[{colour}]{after - before:+.4g}[/]"
        table.add_row(label, _number(before), _number(after), change)
    return table


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
