"""`backprop compare ID ID [ID...]`: 2-6 runs side by side (training/compare.py), as text charts and tables or JSON."""

from __future__ import annotations

import argparse
import json
import sys

from training.cli.common import open_registry, status_markup


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    compare = sub.add_parser("compare", parents=[common], help="2-6 runs side by side: loss curves, parameters, results",
                             description="Compare 2 to 6 runs: train and eval loss on one step axis, tokens/s, the "
                             "parameters that differ, and final metrics. A multi-run is compared by its whole "
                             "timeline.")  # fmt: skip
    compare.add_argument("run_ids", nargs="+", metavar="ID", help="run ids or unambiguous prefixes (2 to 6)")
    compare.add_argument("--all-params", action="store_true", help="list every parameter, not only the differing ones")
    compare.add_argument("--json", action="store_true", help="print the comparison as JSON")
    compare.set_defaults(handler=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from training.compare import compare_runs, format_duration, format_number, format_value

    result = compare_runs(open_registry(), args.run_ids)
    if args.json:
        print(json.dumps(result, default=str))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    runs = result["runs"]
    table = Table(box=None, header_style="bold", title="runs", title_justify="left")
    for column in ("", "id", "name", "kind", "status", "steps", "final loss", "eval loss", "tokens/s", "duration"):
        table.add_column(column, no_wrap=True)
    for r in runs:
        table.add_row(r["marker"], r["id"], escape(r["name"] or ""), r["kind"], status_markup(r["status"]),
                      f"{r['steps']}/{r['max_steps'] or '?'}", format_number(r["final_loss"]), format_number(r["eval_loss"]),
                      format_number(r["tokens_per_s"], ".0f"), format_duration(r["duration_s"]))  # fmt: skip
    console.print(table)
    if any(r.get("bwt") is not None for r in runs):
        console.print(
            "BWT (multi-runs): " + "   ".join(f"{r['marker']} {r['bwt']:+.4f}" for r in runs if r.get("bwt") is not None)
        )
    for key, title in (("train", "train loss"), ("eval", "eval loss"), ("tokens_per_s_curve", "tokens/s")):
        series = [r[key] for r in runs]
        if any(series):
            console.print(f"\n[bold]{title}[/]")
            console.print(
                escape(multi_chart(series, [r["marker"] for r in runs], height=6 if key == "tokens_per_s_curve" else 10))
            )
    console.print("   ".join(f"{r['marker']} {escape(r['label'])}" for r in runs))
    params = Table(box=None, header_style="bold", title="\nparameters" + ("" if args.all_params else " that differ"),
                   title_justify="left")  # fmt: skip
    params.add_column("parameter", no_wrap=True)
    for r in runs:
        params.add_column(f"{r['marker']} {r['id'][:12]}", overflow="fold")
    shown = [p for p in result["params"] if p["differs"] or args.all_params]
    for p in shown:
        style = "bold yellow" if p["differs"] else "dim"
        params.add_row(f"[{style}]{p['name']}[/]", *(escape(format_value(v)) for v in p["values"]))
    if shown:
        console.print(params)
    same = len(result["params"]) - len(result["differing"])
    if not args.all_params:
        console.print(f"[dim]{same} parameters are the same in every run (--all-params lists them)[/]")
    return 0


def multi_chart(series: list[list[list[float]]], markers: list[str], width: int = 64, height: int = 10) -> str:
    """Several [[step, value], ...] series on one step axis, one marker each (the last drawn wins a shared cell)."""
    points = [p for s in series for p in s]
    if not points:
        return ""
    first, last = min(p[0] for p in points), max(p[0] for p in points)
    lo, hi = min(p[1] for p in points), max(p[1] for p in points)
    span, steps = (hi - lo) or 1.0, (last - first) or 1
    columns = min(width, int(last - first) + 1)
    grid = [[" "] * columns for _ in range(height)]
    for marker, s in zip(markers, series, strict=False):
        for step, value in s:
            x = round((step - first) / steps * (columns - 1))
            y = round((value - lo) / span * (height - 1))
            grid[height - 1 - y][x] = marker
    rows = [f"{lo + span * (height - 1 - i) / (height - 1):10.4g} |" + "".join(row) for i, row in enumerate(grid)]
    rows.append(" " * 11 + "+" + "-" * columns + f" step {first:g}..{last:g}")
    return "\n".join(rows)
