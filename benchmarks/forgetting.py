"""Forgetting: SLAO against sequential LoRA on three synthetic tasks learned one after another.

Three small rule-like tasks the demo model can learn (each a closed set of question/answer mappings, asked
with row-level repetition so that every task's validation slice asks mappings its training rows teach):

    successor   "What number comes after 17?"      -> "18."
    letters     "Which letter follows k?"          -> "l."
    plurals     "What is the plural of apple?"     -> "apples."

The same multi-run (same data, steps, seeds, learning rate) runs twice, `--merge-mode slao` and `sequential`.
Printed for each: the forgetting matrix (eval loss of task j after run i), BWT on loss (mean over the earlier
tasks of L[T][j] − L[j][j]; above 0 means forgetting) and the final average loss over the three tasks.

`--model real` runs the same on the real pretrained SmolLM2-135M-Instruct of the real-model tier (scripts/real_model.py)
at a learning rate for a pretrained model (5e-4) and 20 steps per run unless --steps says otherwise: what a continual
campaign does to a model that already knows things.

Run: .venv/bin/python benchmarks/forgetting.py [--model demo|real] [--steps 150] [--rows 120]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

WORDS = ["apple", "river", "stone", "cloud", "tiger", "candle", "window", "garden", "pencil", "rocket", "forest",
         "mirror", "button", "planet", "bridge", "castle"]  # fmt: skip


def task_rows(name: str, rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    if name == "successor":
        pairs = [(f"What number comes after {n}?", f"{n + 1}.") for n in range(40)]
    elif name == "letters":
        pairs = [
            (f"Which letter follows {c}?", f"{string.ascii_lowercase[i + 1]}.") for i, c in enumerate(string.ascii_lowercase[:-1])
        ]
    else:
        pairs = [(f"What is the plural of {w}?", f"{w}s.") for w in WORDS]
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in (rng.choice(pairs) for _ in range(rows))
    ]


def run(model: str, lr: float, mode: str, files: list[Path], steps: int) -> dict:
    from training import Trainer
    from training.runs import Registry

    result = Trainer(model, seed=0, lr=lr, save_every=0, max_run_minutes=0).multi_run(
        [str(f) for f in files], steps_per_run=steps, merge_mode=mode, validation=0.15, name=f"forgetting-{mode}"
    )
    registry = Registry(Path(os.environ["BACKPROPAGATE_HOME"]))
    return {"matrix": registry.forgetting(result.run_id), "run_id": result.run_id}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["demo", "real"], default="demo")
    parser.add_argument("--steps", type=int, help="steps per run (default: 150 for demo, 20 for real)")
    parser.add_argument("--rows", type=int, default=120)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="backprop-forgetting-"))
    os.environ.update(BACKPROPAGATE_HOME=str(work / "home"), BACKPROPAGATE_MIN_FREE_RAM_GB="0.25",
                      BACKPROPAGATE_MAX_CPU_PERCENT="100")  # fmt: skip
    from training.multi_run import forgetting_metrics

    if args.model == "real":
        from train_throughput import real_model_dir

        model, lr, steps = str(real_model_dir()), 5e-4, args.steps or 20
    else:
        model, lr, steps = "demo", 3e-3, args.steps or 150

    files = []
    for i, name in enumerate(("successor", "letters", "plurals")):
        path = work / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in task_rows(name, args.rows, seed=i)))
        files.append(path)
    print(f"tasks: successor, letters, plurals; {args.rows} rows each; {steps} steps per run; model {Path(model).name}\n")
    summary = {}
    for mode in ("sequential", "slao"):
        matrix = run(model, lr, mode, files, steps)["matrix"]
        metrics = forgetting_metrics(matrix)
        summary[mode] = metrics
        print(f"{mode}: eval loss of task j (columns) after run i (rows)")
        for i, row in enumerate(matrix, 1):
            print(f"  after run {i}  " + "  ".join(f"{v:7.4f}" if v is not None else "      -" for v in row))
        print(f"  BWT {metrics['bwt']:+.4f}   final average loss {metrics['average_loss']:.4f}\n")
    seq, slao = summary["sequential"], summary["slao"]
    print(f"BWT          sequential {seq['bwt']:+.4f}   slao {slao['bwt']:+.4f}")
    print(f"average loss sequential {seq['average_loss']:.4f}   slao {slao['average_loss']:.4f}"
          f"   ratio slao/sequential {slao['average_loss'] / seq['average_loss']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
