"""DPO throughput on CPU: Backprop's DPO against TRL's DPOTrainer with peft (what a user would pick instead).

Both train LoRA (r=16, all linear layers, beta 0.1) for one epoch over the same conversational preference pairs on the
same locally built ~28M-parameter Llama (benchmarks/train_throughput.py's model). Prompt and answer lengths vary
(log-normal). TRL pads each batch and, with peft, computes the reference by running the model again with the adapter
disabled at every step; Backprop packs each pair's two answers side by side without padding, and computes the
reference log-probabilities once before the first step (included in its time below).

Each trainer runs in a process of its own, so that its peak memory (RSS, CPU) is its own.

Printed: tokens/s of each (the prompt + answer tokens of both answers of every pair, what both must read), the ratio
(target >= 1.2), and peak RSS.

Run: .venv/bin/python benchmarks/dpo_throughput.py [--pairs 48] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_throughput import LORA_ALPHA, LORA_R, build_model  # noqa: E402

LR, BETA, MAX_LENGTH = 5e-5, 0.1, 1024


def make_pairs(tokenizer, n: int, seed: int) -> list[dict]:
    """Conversational pairs: a user prompt of 24..512 tokens, two answers of 16..512 tokens each."""
    rng = random.Random(seed)
    words = (ROOT / "assets" / "demo" / "corpus.txt").read_text().split()

    def text(median: int, low: int, high: int) -> str:
        target = int(min(high, max(low, rng.lognormvariate(math.log(median), 0.8))))
        ids: list[int] = []
        while len(ids) < target:
            ids += tokenizer(" " + " ".join(rng.choices(words, k=64)), add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[:target]).strip()

    return [{"prompt": [{"role": "user", "content": text(96, 24, 512)}],
             "chosen": [{"role": "assistant", "content": text(128, 16, 400)}],
             "rejected": [{"role": "assistant", "content": text(128, 16, 400)}]} for _ in range(n)]  # fmt: skip


def pair_tokens(tokenizer, pairs: list[dict]) -> int:
    """What both trainers read: prompt + answer, for each answer of each pair (chat template applied)."""
    total = 0
    for p in pairs:
        for side in ("chosen", "rejected"):
            text = tokenizer.apply_chat_template(p["prompt"] + p[side], tokenize=False)
            total += len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return total


def run_trl(folder: Path, data: Path, batch: int) -> float:
    """TRL's DPOTrainer with a peft LoRA config (reference = the model with the adapter disabled); training seconds."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            self.begin = time.perf_counter()

        def on_train_end(self, *args, **kwargs):
            self.end = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(folder)
    clock = Clock()
    config = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=LR,
                       beta=BETA, max_length=MAX_LENGTH, save_strategy="no", report_to=[], logging_strategy="no",
                       use_cpu=True, disable_tqdm=True, seed=0)  # fmt: skip
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear", task_type="CAUSAL_LM")
    rows = [json.loads(line) for line in data.open()]
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(folder), args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(rows), callbacks=[clock], peft_config=lora)  # fmt: skip
    trainer.train()
    return clock.end - clock.begin


def run_backprop(folder: Path, data: Path, rows: int, home: Path) -> float:
    """Backprop's DPO, one epoch; training seconds from the reference pass to the last step."""
    from training import Trainer
    from training.events import read_events

    result = Trainer(str(folder), home=str(home)).train(
        data, epochs=1, method="dpo", beta=BETA, batch_size=rows, max_seq_length=MAX_LENGTH, lr=LR, lora_r=LORA_R,
        lora_alpha=LORA_ALPHA, save_every=0, use_unsloth=False, gradient_accumulation=1,
    )  # fmt: skip
    events, _ = read_events(result.run_dir / "events.jsonl")
    reference = next(e for e in events if "reference log-probabilities" in e.get("message", ""))
    started = next(e["t"] for e in events if e["event"] == "started")
    last_step = [e for e in events if e["event"] == "step"][-1]["t"]
    return reference["seconds"] + (last_step - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-batch", type=int, default=4, help="pairs per TRL step")
    parser.add_argument("--backprop-batch", type=int, default=1, help="packed rows (several pairs each) per Backprop step")
    parser.add_argument("--only", choices=["trl", "backprop"], help=argparse.SUPPRESS)  # one trainer, in a child process
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.only:
        work = Path(args.work)
        seconds = run_trl(work / "model", work / "pairs.jsonl", args.trl_batch) if args.only == "trl" else \
            run_backprop(work / "model", work / "pairs.jsonl", args.backprop_batch, work / "home")  # fmt: skip
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb}))
        return

    import torch

    work = Path(tempfile.mkdtemp(prefix="bp-dpo-bench-"))
    tokenizer, model = build_model(work / "model")
    pairs = make_pairs(tokenizer, args.pairs, args.seed)
    (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tokens = pair_tokens(tokenizer, pairs)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.1f}M parameters, LoRA r={LORA_R} on all linear layers, {torch.get_num_threads()} threads")
    print(f"data: {len(pairs)} pairs, {tokens} tokens (prompt + answer, both answers)")
    results = {}
    for name, only in (("TRL DPOTrainer + peft", "trl"), ("backprop DPO (packed, reference once)", "backprop")):
        out = subprocess.run([sys.executable, __file__, "--only", only, "--work", str(work), "--trl-batch",
                              str(args.trl_batch), "--backprop-batch", str(args.backprop_batch)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        rate = tokens / figures["seconds"]
        results[only] = rate
        print(f"{name:40} {figures['seconds']:7.1f}s = {rate:8.1f} tok/s   peak RSS {figures['peak_rss_mb']:7.0f} MB")
    print(f"ratio backprop / TRL DPOTrainer: {results['backprop'] / results['trl']:.2f}x (target >= 1.2)")


if __name__ == "__main__":
    main()
