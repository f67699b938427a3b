"""Scaling: tokens/s of the same training job on 1, 2, ... processes, through the real job system (`backprop train
--nproc N [--strategy S]`: the governor, torchrun, one rank per process), for each strategy asked for (--strategies
ddp,fsdp,deepspeed-zero3; default ddp).

CPU mode (default without CUDA): the demo model and dataset, the same job at 1 and 2 processes: the same global batch
(each of N ranks takes batch/N rows of it), the same steps, the machine's cores split evenly between the ranks. On a
machine whose cores are all busy with one process already, expect no gain: the efficiency shows what the gradient
all-reduce (gloo) and the split cost.

GPU mode (--gpu, or by default on CUDA): a Qwen2.5-0.5B-shape model (benchmarks/gpu_check.py builds it, bf16) on 1, 2,
... N GPUs of this machine, data parallel: each GPU takes the same per-GPU batch (8 packed rows of 2048 tokens), so N GPUs
train N times the tokens per step. Target: >= 90% scaling efficiency.

    efficiency(N) = tokens/s with N processes / (N x tokens/s with one)

Throughput is measured from the run's step events after the first steps (warm-up: allocation, the first all-reduce).
Run: .venv/bin/python benchmarks/scaling.py [--steps 30] [--max-nproc 2] [--strategies ddp,fsdp] [--gpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WARMUP_STEPS = 3  # steps left out of the throughput


def train(home: Path, nproc: int, args: list[str], strategy: str = "ddp") -> dict:
    """One `backprop train --nproc N --strategy S` to the end; its throughput from its step events."""
    from training.events import read_events
    from training.runs import Registry

    env = {**os.environ, "BACKPROPAGATE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)  # the worker splits the cores between the ranks itself
    out = subprocess.run([sys.executable, "-m", "training.cli", "train", "--nproc", str(nproc), "--json", "--save-every", "0",
                          "--max-run-minutes", "0", "--max-parallel", "1", "--strategy", strategy, *args],
                         capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    run_id = json.loads(out.stdout.strip().splitlines()[-1])["run_id"] if out.stdout.strip() else None
    if out.returncode != 0 or run_id is None:
        raise RuntimeError(f"backprop train --nproc {nproc} exited {out.returncode}: {out.stderr.strip()[-800:]}")
    run = Registry(home).get(run_id)
    events, _ = read_events(run.path / "events.jsonl")
    steps = [e for e in events if e["event"] == "step"]
    started = next(e for e in events if e["event"] == "started")
    if len(steps) > WARMUP_STEPS + 1:  # from the end of the warm-up steps to the last step
        first, timed = steps[WARMUP_STEPS - 1], steps[WARMUP_STEPS:]
    else:
        first, timed = started, steps
    seconds = timed[-1]["t"] - first["t"]
    tokens = sum(e["tokens"] for e in timed)
    return {"nproc": nproc, "strategy": strategy if nproc > 1 else "-", "world_size": started.get("world_size", 1),
            "steps": len(steps), "tokens": tokens,
            "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
            "final_loss": run.final_loss, "devices": started.get("devices")}  # fmt: skip


def add_efficiency(rows: list[dict]) -> list[dict]:
    one = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = round(row["tokens_per_s"] / one, 3) if one and row["tokens_per_s"] else None
        row["efficiency"] = round(row["speedup"] / row["nproc"], 3) if row["speedup"] else None
    return rows


def each_count(max_nproc: int, strategies: list[str]):
    """(processes, strategy): one process once, then every strategy at 2..max_nproc."""
    yield 1, "ddp"
    for nproc in range(2, max_nproc + 1):
        for strategy in strategies:
            yield nproc, strategy


def cpu_mode(home: Path, steps: int, max_nproc: int, batch: int, strategies: list[str]) -> list[dict]:
    """The demo job, the same global batch split over 1..max_nproc processes."""
    from training.cli.common import DEMO_DATASET

    rows = []
    for nproc, strategy in each_count(max_nproc, strategies):
        per_rank = max(1, batch // nproc)
        job = [
            "--model",
            "demo",
            "--data",
            str(DEMO_DATASET),
            "--steps",
            str(steps),
            "--batch-size",
            str(per_rank),
            "--seed",
            "0",
        ]
        row = train(home, nproc, job, strategy)
        row["threads_per_process"] = max(1, (os.cpu_count() or 1) // nproc)
        row["global_batch"] = per_rank * nproc
        rows.append(row)
        print(f"  {nproc} process(es), {row['strategy']}: {row['tokens_per_s']} tokens/s", file=sys.stderr, flush=True)
    return add_efficiency(rows)


def gpu_mode(home: Path, steps: int, max_nproc: int, strategies: list[str]) -> list[dict]:
    """The 0.5B shape on 1..N GPUs, the same per-GPU batch."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import GPU_PLAN, QWEN_0_5B, build_model, make_texts  # the GPU check's model and data, not a copy
    from transformers import AutoTokenizer

    gpus = torch.cuda.device_count()
    model_dir = home / "scaling-0.5b"
    build_model(QWEN_0_5B, model_dir, torch.bfloat16)
    rows_per_gpu = GPU_PLAN.packed_rows[QWEN_0_5B.name]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Enough text for the largest run: steps x GPUs x rows of seq_len tokens, and some to spare.
    texts, _ = make_texts(tokenizer, GPU_PLAN, int(steps * min(gpus, max_nproc) * rows_per_gpu * GPU_PLAN.seq_len * 1.2))
    data = home / "scaling.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    rows = []
    for nproc, strategy in each_count(min(gpus, max_nproc), strategies):
        job = ["--model", str(model_dir), "--data", str(data), "--format", "text", "--steps", str(steps),
               "--batch-size", str(rows_per_gpu), "--max-seq-length", str(GPU_PLAN.seq_len), "--no-unsloth"]  # fmt: skip
        row = train(home, nproc, job, strategy)
        rows.append(row)
        print(f"  {nproc} GPU(s), {row['strategy']}: {row['tokens_per_s']} tokens/s", file=sys.stderr, flush=True)
    return add_efficiency(rows)


def render(mode: str, rows: list[dict]) -> str:
    unit = "GPUs" if mode == "gpu" else "processes"
    lines = [f"| {unit} | strategy | steps | tokens/s | speed-up | efficiency |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['nproc']} | {r['strategy']} | {r['steps']} | {r['tokens_per_s']} | {r['speedup']}x | "
                     f"{100 * r['efficiency']:.0f}% |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--max-nproc", type=int, default=None, help="default: 2 on CPU, every GPU with --gpu")
    parser.add_argument("--batch", type=int, default=8, help="CPU mode: the global batch (rows a step)")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None, help="default: when CUDA is there")
    parser.add_argument("--strategies", default="ddp", help="comma-separated: ddp, fsdp, deepspeed-zero2, deepspeed-zero3")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available() if args.gpu is None else args.gpu
    with tempfile.TemporaryDirectory(prefix="bp-scaling-") as tmp:
        home = Path(tmp)
        strategies = args.strategies.split(",")
        if gpu:
            rows = gpu_mode(home, args.steps, args.max_nproc or 64, strategies)
        else:
            rows = cpu_mode(home, args.steps, args.max_nproc or 2, args.batch, strategies)
    mode = "gpu" if gpu else "cpu"
    summary = {"mode": mode, "cores": os.cpu_count(), "rows": rows}
    print(json.dumps(summary, indent=1) if args.json else render(mode, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
