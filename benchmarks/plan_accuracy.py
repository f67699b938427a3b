"""How honest is the plan? Its peak-memory and speed estimates against what real runs measure, in the same run.

For each case, `backprop plan`'s estimate (training/plan.py) for the settings it picks (or those given), then a real
governed training run of those settings (a worker process, as `backprop train` starts it), whose `completed` event
reports its peak: resident memory on CPU (`peak_rss_mb`, the whole process: Python, torch, the data, the model), CUDA
memory on a GPU (`peak_vram_mb`, torch.cuda.max_memory_allocated: the plan's weights + LoRA + activations + logits).

Cases: the demo model on the demo dataset; the ~28M-parameter model of benchmarks/train_throughput.py on log-normal
texts (the plan's choices, then 8 rows of 1024 tokens); the real SmolLM2-135M-Instruct (scripts/real_model.py) on the
demo dataset; on CUDA also the GPU check's Qwen2.5-0.5B and -1.5B shapes.

    .venv/bin/python benchmarks/plan_accuracy.py [--steps 8] [--json OUT.json]

Target: the memory estimate within +-25% of the measured peak. Speed: the table's estimate (or a probe) vs measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def measure(model: str, data: Path, home: Path, options: dict[str, Any], steps: int) -> dict[str, Any]:
    """The plan's estimate for `options`, then a real run of the planned settings; both figures in MiB."""
    from training import jobs
    from training.config import load_settings, nest_options
    from training.plan import make_plan
    from training.runs import Registry

    settings = load_settings(**nest_options({"model": model, "home": home, "steps": steps, "save_every": 0,
                                             "use_unsloth": False, "report_to": "none", **options}))  # fmt: skip
    plan = make_plan(settings, str(data))
    run = jobs.submit_train(settings, str(data))
    speeds, completed, failed = [], None, None
    for event in jobs.follow(Registry(home), run.id):
        if event["event"] == "step":
            speeds.append(event["tokens_per_s"])
        elif event["event"] == "completed":
            completed = event
        elif event["event"] == "failed":
            failed = event
    if completed is None:
        raise SystemExit(f"run {run.id} of {model} did not complete: {failed}")
    cuda = plan.machine.device == "cuda"
    measured = completed["peak_vram_mb"] if cuda else completed["peak_rss_mb"]
    m = plan.memory
    t = plan.choices
    return {
        "case": f"{Path(model).name} {t['batch_size'].value}x{t['max_seq_length'].value}",
        "device": plan.machine.device,
        "estimate_mb": round(m.peak / 2**20),
        "parts_mb": {
            k: round(getattr(m, k) / 2**20) for k in ("weights", "adapter_and_optimizer", "activations", "logits", "runtime")
        },  # fmt: skip
        "measured_mb": measured,
        "error": m.peak / 2**20 / measured - 1,
        "estimate_tok_s": round(plan.time.tokens_per_second) if plan.time else None,
        "measured_tok_s": round(statistics.median(speeds[1:] or speeds)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    import torch
    from train_throughput import build_model, make_texts, real_model_dir
    from transformers.utils import logging as hf_logging

    from training.cli.common import DEMO_DATASET

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="bp-plan-"))
    tokenizer, _ = build_model(work / "m28")
    texts = work / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(tokenizer, 96, 0)))
    cases: list[tuple[str, Path, dict[str, Any]]] = [
        ("demo", DEMO_DATASET, {}),
        (str(work / "m28"), texts, {}),
        (str(work / "m28"), texts, {"batch_size": 8, "max_seq_length": 1024, "packing": True}),
        (str(real_model_dir()), DEMO_DATASET, {}),  # the real SmolLM2-135M-Instruct on the demo's 40 questions
    ]
    if torch.cuda.is_available():
        from gpu_check import SHAPES  # the real Qwen2.5 shapes, random weights
        from gpu_check import build_model as build_shape

        for shape in SHAPES[:2]:
            folder = work / shape.name
            build_shape(shape, folder, torch.bfloat16)
            cases.append((str(folder), texts, {"max_seq_length": 1024}))
    rows = []
    for model, data, options in cases:
        row = measure(model, data, work / "home", options, args.steps)
        rows.append(row)
        print(f"{row['case']:28} {row['device']:5} estimate {row['estimate_mb']:7,} MiB  measured {row['measured_mb']:7,} MiB  "
              f"error {row['error']:+6.1%}   speed estimate {row['estimate_tok_s'] or 0:8,} tok/s  measured "
              f"{row['measured_tok_s']:8,} tok/s", flush=True)  # fmt: skip
    worst = max(abs(r["error"]) for r in rows)
    print(f"largest memory error: {worst:.1%} (target: within 25%)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
