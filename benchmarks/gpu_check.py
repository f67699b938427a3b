"""The GPU path in one command: the race against plain HF, TRL and Unsloth, QLoRA, automatic batch size, OOM recovery,
NVML telemetry and GPU-marked tests, on models with the real shapes of Qwen2.5-0.5B and -1.5B.

    python benchmarks/gpu_check.py OUT [--only core,qlora,unsloth]    # on an NVIDIA GPU, about 6 minutes
    python benchmarks/gpu_check.py OUT --cpu-dry-run                   # tiny shapes on CPU: the same code paths
    python benchmarks/gpu_check.py OUT --verify-adapter DIR            # here, after: the adapter DIR brought back -> GGUF
    python benchmarks/gpu_check.py OUT --merge DIR [DIR ...]           # one table from parts run separately

Parts (`--only`), because a GPU machine that cannot download takes at most 64 MiB of wheels per run
(scripts/gpu-wheels makes the sets): `core` (environment, matmul peak, the race without unsloth, automatic batch size,
OOM recovery, telemetry, `pytest -m gpu`, the adapter to bring back), `qlora` (bitsandbytes) and `unsloth`.

Every model is random-initialised here from a seed, with the real shapes (hidden size, layers, heads, KV heads,
intermediate size, the 151,936-token vocabulary) and the demo tokenizer; the data is raw text whose lengths follow
a log-normal distribution clipped to 64..2048 tokens. Every contestant trains LoRA r=16 on all linear layers, bf16,
sequence length 2048, one epoch over the same texts. Tokens/s counts useful (non-padding) tokens; MFU divides the
training FLOPs of those tokens by a bf16 matmul peak measured in the same run.

Each section is written to OUT/results.json as soon as it ends (a killed run keeps what it measured) and OUT/table.md
is rewritten with it. A section that fails records its error and the check goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Where Backprop is not pip-installed (a GPU machine that got only the repository), its worker processes find it here.
# Absolute paths: tests and workers run in other folders.
_paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
os.environ["PYTHONPATH"] = os.pathsep.join(str(Path(path).resolve()) for path in _paths)

import torch  # noqa: E402

LORA_R, LORA_ALPHA, LR, SEED = 16, 32, 2e-4, 0
PART_SIZE = 15 * 2**20  # files brought back from a GPU machine must stay under 16 MiB each


@dataclass(frozen=True)
class Shape:
    """A decoder's shape, from the model's public config.json."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int = 151936
    tie_word_embeddings: bool = True


QWEN_0_5B = Shape("Qwen2.5-0.5B", 896, 24, 14, 2, 4864)
QWEN_1_5B = Shape("Qwen2.5-1.5B", 1536, 28, 12, 2, 8960)
TINY = Shape("tiny (dry run)", 64, 2, 4, 2, 128)  # the real vocabulary: the loss over 152k logits is the same code


@dataclass(frozen=True)
class Plan:
    """How big everything is: the real check on a GPU, or the dry run on CPU."""

    device: str
    dtype: Any
    shapes: tuple[Shape, ...]
    seq_len: int
    min_len: int
    median_len: int
    race_tokens: dict[str, int]  # shape name -> tokens of data per contestant
    packed_rows: dict[str, int]  # shape name -> rows of seq_len per step (TRL, Backprop): ~8k-16k tokens, no OOM
    padded_rows: int  # examples per step (plain HF, padded)


GPU_PLAN = Plan("cuda", torch.bfloat16, (QWEN_0_5B, QWEN_1_5B), 2048, 64, 400,
                {QWEN_0_5B.name: 400_000, QWEN_1_5B.name: 200_000}, {QWEN_0_5B.name: 8, QWEN_1_5B.name: 4}, 8)  # fmt: skip
DRY_PLAN = Plan("cpu", torch.float32, (TINY,), 256, 16, 64, {TINY.name: 6_000}, {TINY.name: 4}, 4)


# ---------------------------------------------------------------------------------------------------- the results


class Results:
    """results.json and table.md in OUT, rewritten after every section."""

    def __init__(self, out: Path, data: dict[str, Any] | None = None):
        self.out = out
        self.data: dict[str, Any] = data or {"sections": {}, "race": []}

    def section(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            value = fn() or {}
        except Skip as skip:
            value = {"skipped": str(skip)}
        except Exception as exc:
            traceback.print_exc()
            value = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
        value["seconds"] = round(time.perf_counter() - started, 1)
        self.data["sections"][name] = value
        print(f"   {json.dumps(value, default=str)[:600]}", flush=True)
        self.save()
        return value

    def add_race_row(self, row: dict[str, Any]) -> None:
        self.data["race"].append(row)
        print(f"   race: {json.dumps(row, default=str)}", flush=True)
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("results.json", json.dumps(self.data, indent=1, default=str)), ("table.md", render(self.data))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


class Skip(Exception):
    """A section that cannot run here; its message says why."""


def render(data: dict[str, Any]) -> str:
    """The markdown report: the race table, then one line per section."""
    lines = ["# Backprop GPU check", ""]
    env = data["sections"].get("environment", {})
    if env:
        lines += [f"- {k}: {v}" for k, v in env.items() if k != "seconds"] + [""]
    race = data["race"]
    if race:
        lines += ["| model | contestant | tokens/s | vs plain HF | peak VRAM GiB | vs plain HF | MFU | steps | loss | note |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for row in race:
            base = next((r for r in race if r["model"] == row["model"] and r["contestant"].startswith("plain HF")), None)
            ok = "tokens_per_s" in row

            def ratio(key: str, row: dict = row, base: dict | None = base) -> str:
                if not base or not row.get(key) or not base.get(key):
                    return ""
                return f"{row[key] / base[key]:.2f}x"

            lines.append("| " + " | ".join([
                row["model"], row["contestant"],
                f"{row['tokens_per_s']:,.0f}" if ok else "", ratio("tokens_per_s"),
                f"{row['peak_vram_mb'] / 1024:.1f}" if row.get("peak_vram_mb") else "", ratio("peak_vram_mb"),
                f"{row['mfu']:.1%}" if row.get("mfu") is not None else "", str(row.get("steps", "")),
                f"{row['final_loss']:.3f}" if row.get("final_loss") is not None else "",
                str(row.get("note") or row.get("error") or row.get("skipped") or "").replace("|", "/")[:160],
            ]) + " |")  # fmt: skip
        lines.append("")
        planned = [r for r in race if r.get("plan_estimate_mb") and (r.get("peak_vram_mb") or r.get("peak_rss_mb"))]
        if planned:  # the plan's memory estimate (training/plan.py) against each Backprop run's measured peak
            lines += ["| model | contestant | plan estimate GiB | measured GiB (VRAM, or RSS on CPU) | error |",
                      "|---|---|---:|---:|---:|"]  # fmt: skip
            for row in planned:
                est, got = row["plan_estimate_mb"], row.get("peak_vram_mb") or row["peak_rss_mb"]
                cells = [row["model"], row["contestant"], f"{est / 1024:.2f}", f"{got / 1024:.2f}", f"{est / got - 1:+.1%}"]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    for name, value in data["sections"].items():
        if name == "environment":
            continue
        shown = {k: v for k, v in value.items() if k not in ("tail",)}
        lines.append(f"- **{name}**: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- models and data


def build_model(shape: Shape, folder: Path, dtype: Any) -> str:
    """A Qwen2 model of `shape` with the demo tokenizer, saved as an HF folder in `dtype`; returns a fingerprint.

    The weights come from our own seeded generator, not the library's initialisers, so the same model can be rebuilt
    on another machine with other library versions (the GGUF step rebuilds the 0.5B base here)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from training.demo_model import demo_model_path

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path(Path(tempfile.mkdtemp(prefix="bp-gpu-home-"))))
    config = Qwen2Config(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.num_hidden_layers,
                         num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
                         intermediate_size=shape.intermediate_size, tie_word_embeddings=shape.tie_word_embeddings,
                         max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # the library's init is fast on a GPU
        model = Qwen2ForCausalLM(config).to(dtype)
    digest = hashlib.sha256()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if name.endswith("norm.weight"):
                values = torch.ones(param.shape)
            elif name.endswith(".bias"):
                values = torch.zeros(param.shape)
            else:
                values = torch.empty(param.shape).normal_(0.0, 0.02, generator=generator)
            param.copy_(values.to(dtype))
            digest.update(values.to(dtype).view(-1)[:4096].float().numpy().tobytes())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return digest.hexdigest()[:16]


def make_texts(tokenizer: Any, plan: Plan, total_tokens: int, seed: int = SEED) -> tuple[list[str], list[int]]:
    """Raw texts (and their token counts) with log-normal lengths clipped to min_len..seq_len-1, `total_tokens` in all."""
    rng = random.Random(seed)
    words = (ROOT / "assets" / "demo" / "corpus.txt").read_text().split()
    texts, lengths = [], []
    while sum(lengths) < total_tokens:
        target = int(min(plan.seq_len - 1, max(plan.min_len, rng.lognormvariate(math.log(plan.median_len), 0.8))))
        ids: list[int] = []
        while len(ids) < target:
            ids += tokenizer(" " + " ".join(rng.choices(words, k=256)), add_special_tokens=False)["input_ids"]
        text = tokenizer.decode(ids[:target])
        texts.append(text)
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1)  # + end of text
    return texts, lengths


def flops_per_token(shape: Shape, mean_context: float) -> float:
    """Training FLOPs per token with LoRA: forward 2P and input gradients 2P over every matmul (frozen weights need no
    weight gradients), 6 per LoRA parameter, and attention scores 12 * layers * hidden * mean causal context."""
    d, L, f, v = shape.hidden_size, shape.num_hidden_layers, shape.intermediate_size, shape.vocab_size
    kv = shape.num_key_value_heads * d // shape.num_attention_heads
    matmul_params = L * (2 * d * d + 2 * d * kv + 3 * d * f) + d * v
    lora_params = L * LORA_R * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 3)
    return 4 * matmul_params + 6 * lora_params + 12 * L * d * mean_context


def matmul_peak(plan: Plan) -> float:
    """FLOP/s of the best of several large matrix products in the training dtype, on this device, now."""
    n = 8192 if plan.device == "cuda" else 512
    a = torch.randn(n, n, device=plan.device, dtype=plan.dtype)
    b = torch.randn(n, n, device=plan.device, dtype=plan.dtype)
    best = 0.0
    for _ in range(8):
        synchronize(plan)
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        synchronize(plan)
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - start))
    return best


def synchronize(plan: Plan) -> None:
    if plan.device == "cuda":
        torch.cuda.synchronize()


def free_memory(plan: Plan) -> None:
    gc.collect()
    if plan.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mb(plan: Plan) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20) if plan.device == "cuda" else None


# ---------------------------------------------------------------------------------------------------- the contestants


@dataclass
class Workload:
    shape: Shape
    model_dir: Path
    data: Path  # the texts as {"text": ...} lines, for Backprop
    texts: list[str]
    lengths: list[int]
    flops_per_token: float


def step_timer() -> Any:
    """A transformers callback that times training from its first to its last step and keeps the logged losses."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.begin = self.end = 0.0
            self.steps = 0
            self.losses: list[float] = []

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.begin = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.steps += 1

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            self.end = time.perf_counter()

    return StepTimer()


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def hf_args(plan: Plan, rows: int, **extra: Any) -> dict[str, Any]:
    return dict(output_dir=tempfile.mkdtemp(prefix="bp-gpu-hf-"), per_device_train_batch_size=rows, num_train_epochs=1,
                learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=2, save_strategy="no", report_to=[],
                logging_strategy="steps", logging_steps=5, bf16=plan.device == "cuda", use_cpu=plan.device == "cpu",
                disable_tqdm=True, seed=SEED, dataloader_num_workers=0, **extra)  # fmt: skip


def run_plain_hf(work: Workload, plan: Plan) -> dict[str, Any]:
    """What most tutorials do: transformers Trainer + peft, sdpa attention, each batch padded to its longest example,
    examples grouped by length to keep padding small."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(work.model_dir)
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in work.texts]

    def collate(batch: list[dict]) -> dict[str, Any]:
        longest = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), longest), tokenizer.pad_token_id)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    free_memory(plan)
    model = AutoModelForCausalLM.from_pretrained(work.model_dir, dtype=plan.dtype, attn_implementation="sdpa").to(plan.device)
    model = get_peft_model(model, lora_config())
    timer = step_timer()
    # Newer transformers name length grouping a sampling strategy.
    new_style = "train_sampling_strategy" in TrainingArguments.__dataclass_fields__
    grouping = {"train_sampling_strategy": "group_by_length"} if new_style else {"group_by_length": True}
    args = TrainingArguments(**hf_args(plan, plan.padded_rows, remove_unused_columns=False, **grouping))
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r} for r in rows], data_collator=collate,
                      callbacks=[timer])  # fmt: skip
    trainer.train()
    result = {"tokens": sum(len(r) for r in rows), "seconds": timer.end - timer.begin, "steps": timer.steps,
              "peak_vram_mb": peak_mb(plan), "final_loss": timer.losses[-1] if timer.losses else None,
              "note": f"{plan.padded_rows} examples/step, padded"}  # fmt: skip
    del trainer, model
    free_memory(plan)
    return result


def run_trl(work: Workload, plan: Plan, *, unsloth: bool = False) -> dict[str, Any]:
    """TRL's SFTTrainer with padding-free packing (best-fit decreasing), as its docs recommend for speed; with
    `unsloth`, the model comes from Unsloth's FastLanguageModel (Unsloth's own recipe)."""
    if unsloth:
        from unsloth import FastLanguageModel  # noqa: F401  (first: it patches transformers and TRL)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    free_memory(plan)
    tokenizer = AutoTokenizer.from_pretrained(work.model_dir)
    peft_config = None
    if unsloth:
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(str(work.model_dir), max_seq_length=plan.seq_len,
                                                             dtype=plan.dtype, load_in_4bit=False)  # fmt: skip
        model = FastLanguageModel.get_peft_model(model, r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"],
                                                 use_gradient_checkpointing="unsloth")  # fmt: skip
    else:
        model = AutoModelForCausalLM.from_pretrained(work.model_dir, dtype=plan.dtype, attn_implementation="sdpa")
        model = model.to(plan.device)
        peft_config = lora_config()
    timer = step_timer()
    rows = plan.packed_rows[work.shape.name]
    config = SFTConfig(**hf_args(plan, rows), packing=True, padding_free=True, max_length=plan.seq_len,
                       dataset_text_field="text")  # fmt: skip
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list([{"text": t} for t in work.texts]),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[timer])  # fmt: skip
    trainer.train()
    result = {"tokens": sum(work.lengths), "seconds": timer.end - timer.begin, "steps": timer.steps,
              "peak_vram_mb": peak_mb(plan), "final_loss": timer.losses[-1] if timer.losses else None,
              "note": f"{rows} packed rows of {plan.seq_len}/step"}  # fmt: skip
    del trainer, model
    free_memory(plan)
    return result


def backprop_run(work: Workload, plan: Plan, home: Path, **options: Any) -> tuple[Any, list[dict[str, Any]]]:
    """One run through the real job system (worker process, governor, events), as `backprop train` makes it, planned
    (training/plan.py) for what the check leaves unset; its `plan` event-like record is the spec's plan."""
    from training import Trainer
    from training.events import read_events

    free_memory(plan)
    rows = plan.packed_rows[work.shape.name]
    # The machine is the check's: its own load must never queue a run (max_cpu_percent 100).
    settings = {"epochs": 1, "batch_size": rows, "gradient_accumulation": 1, "max_seq_length": plan.seq_len, "lr": LR,
                "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "save_every": 0, "use_unsloth": False, "max_parallel": 1,
                "max_cpu_percent": 100, **options}  # fmt: skip
    settings = {k: v for k, v in settings.items() if v is not None}
    try:
        result = Trainer(str(work.model_dir), home=str(home)).train(work.data, **settings)
        run_dir = result.run_dir
    except Exception:
        from training.runs import Registry

        run_dir = Registry(home).list()[0].path
        result = None
    events, _ = read_events(run_dir / "events.jsonl")
    spec = json.loads((run_dir / "spec.json").read_text())
    if spec.get("plan"):  # the plan's estimate of this run, beside what it measured (summarize_backprop)
        events.append({"event": "plan", "t": 0, **spec["plan"]})
    return result, events


def summarize_backprop(events: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [e for e in events if e["event"] == "step"]
    started = next(e for e in events if e["event"] == "started")
    completed = next((e for e in events if e["event"] == "completed"), {})
    planned = next((e for e in events if e["event"] == "plan"), {})
    logs = [e["message"] for e in events if e["event"] == "log"]
    how = ", ".join(f"{k}={started[k]}" for k in ("loss_kernel", "attention", "gradient_checkpointing") if k in started)
    said = [m for m in logs if any(k in m for k in ("unsloth", "checkpointing", "batch size"))]
    return {"tokens": sum(e["tokens"] for e in steps), "seconds": steps[-1]["t"] - started["t"] if steps else None,
            "steps": len(steps), "peak_vram_mb": completed.get("peak_vram_mb"),
            "plan_estimate_mb": round(planned["memory"]["peak"] / 2**20) if planned else None,
            "peak_rss_mb": completed.get("peak_rss_mb"),
            "final_loss": steps[-1]["loss"] if steps else None, "note": "; ".join([how, *said])[:240]}  # fmt: skip


def run_backprop(work: Workload, plan: Plan, home: Path, **options: Any) -> dict[str, Any]:
    result, events = backprop_run(work, plan, home, **options)
    failed = next((e for e in events if e["event"] == "failed"), None)
    if failed:
        raise RuntimeError(f"[{failed['code']}] {failed['message']}")
    return summarize_backprop(events)


def race_row(results: Results, work: Workload, plan: Plan, contestant: str, fn: Callable[[], dict[str, Any]]) -> None:
    row: dict[str, Any] = {"model": work.shape.name, "contestant": contestant}
    started = time.perf_counter()
    try:
        measured = fn()
        row.update(measured)
        if measured.get("seconds"):
            row["tokens_per_s"] = measured["tokens"] / measured["seconds"]
            peak = results.data["sections"].get("matmul peak", {}).get("flops")
            if peak:
                row["mfu"] = row["tokens_per_s"] * work.flops_per_token / peak
    except Skip as skip:
        row["skipped"] = str(skip)
    except Exception as exc:
        traceback.print_exc()
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    row["wall_s"] = round(time.perf_counter() - started, 1)
    results.add_race_row(row)


def needs_cuda(plan: Plan, what: str) -> None:
    if plan.device != "cuda":
        raise Skip(f"{what} needs CUDA")


def needs_module(name: str) -> None:
    try:
        importlib.import_module(name)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise Skip(f"{name} not importable ({type(exc).__name__}: {reason})") from None


# ---------------------------------------------------------------------------------------------------- the sections


def environment(plan: Plan) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if plan.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu memory GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        with contextlib.suppress(Exception):
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
    else:
        info["gpu"] = "none (CPU dry run)"
    for name in ("transformers", "peft", "accelerate", "trl", "datasets", "unsloth", "bitsandbytes", "liger_kernel",
                 "flash_attn"):  # fmt: skip
        try:
            module = importlib.import_module(name)
            info[name] = getattr(module, "__version__", "imported")
        except Exception as exc:
            info[name] = f"not imported ({type(exc).__name__})"
    return info


def workloads(plan: Plan, work_dir: Path, made: list[Workload]) -> dict[str, Any]:
    """Build each model and its data; `made` receives the workloads, the section gets what was built."""
    from transformers import AutoTokenizer

    info = {}
    for shape in plan.shapes:
        folder = work_dir / shape.name.split()[0]
        started = time.perf_counter()
        built = folder / "fingerprint.txt"  # a part run in a child process reuses the parent's models
        if not built.exists():
            built_fingerprint = build_model(shape, folder, plan.dtype)
            built.write_text(built_fingerprint)
        fingerprint = built.read_text()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        texts, lengths = make_texts(tokenizer, plan, plan.race_tokens[shape.name])
        data = folder.parent / f"{folder.name}.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        mean_context = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
        made.append(Workload(shape, folder, data, texts, lengths, flops_per_token(shape, mean_context)))
        info[shape.name] = {"fingerprint": fingerprint, "examples": len(texts), "tokens": sum(lengths),
                            "length p50": sorted(lengths)[len(lengths) // 2], "length max": max(lengths),
                            "build_s": round(time.perf_counter() - started, 1)}  # fmt: skip
    return info


def race(results: Results, plan: Plan, works: list[Workload], home: Path, part: str) -> None:
    for work in works:
        if part == "core":
            race_row(results, work, plan, "plain HF Trainer + peft (sdpa, padded, length-grouped)",
                     lambda w=work: run_plain_hf(w, plan))  # fmt: skip
            race_row(results, work, plan, "TRL SFTTrainer (padding-free packing)", lambda w=work: run_trl(w, plan))
            race_row(results, work, plan, "Backprop", lambda w=work: run_backprop(w, plan, home, loss_kernel="chunked"))
            race_row(results, work, plan, "Backprop + liger kernels", lambda w=work: backprop_liger(w, plan, home))
        else:  # unsloth
            race_row(results, work, plan, "Backprop + unsloth", lambda w=work: backprop_unsloth(w, plan, home))
            race_row(results, work, plan, "Unsloth (FastLanguageModel + TRL SFTTrainer, packing)",
                     lambda w=work: unsloth_trl(w, plan))  # fmt: skip


def backprop_liger(work: Workload, plan: Plan, home: Path) -> dict[str, Any]:
    needs_cuda(plan, "liger-kernel (Triton)")
    needs_module("liger_kernel")
    return run_backprop(work, plan, home, loss_kernel="liger")


def backprop_unsloth(work: Workload, plan: Plan, home: Path) -> dict[str, Any]:
    needs_cuda(plan, "unsloth")
    needs_module("unsloth")
    row = run_backprop(work, plan, home, use_unsloth=True)
    if "unsloth" not in row["note"]:
        row["note"] = "unsloth was NOT used: " + row["note"]
    return row


def unsloth_trl(work: Workload, plan: Plan) -> dict[str, Any]:
    needs_cuda(plan, "unsloth")
    needs_module("unsloth")
    return run_trl(work, plan, unsloth=True)


def qlora(plan: Plan, work: Workload, home: Path) -> dict[str, Any]:
    needs_cuda(plan, "QLoRA (bitsandbytes 4-bit)")
    needs_module("bitsandbytes")
    _, events = backprop_run(work, plan, home, qlora=True, steps=30, epochs=None, batch_size=4)
    failed = next((e for e in events if e["event"] == "failed"), None)
    losses = [e["loss"] for e in events if e["event"] == "step"]
    summary = summarize_backprop(events) if losses else {}
    return {"status": "failed: " + failed["code"] if failed else "completed", "first loss": losses[0] if losses else None,
            "last loss": losses[-1] if losses else None, "loss fell": bool(losses) and losses[-1] < losses[0],
            "peak_vram_mb": summary.get("peak_vram_mb"), "tokens_per_s": round(summary["tokens"] / summary["seconds"])
            if summary.get("seconds") else None}  # fmt: skip


def auto_batch(plan: Plan, work: Workload, home: Path) -> dict[str, Any]:
    """The plan's batch size (training/plan.py: what fits the free VRAM read through NVML) and its estimate of the peak,
    against the run's measured peak."""
    needs_cuda(plan, "the planned batch size (it reads free VRAM)")
    _, events = backprop_run(work, plan, home, batch_size=None, gradient_accumulation=None, steps=6, epochs=None)
    logs = [e["message"] for e in events if e["event"] == "log"]
    planned = next((e for e in events if e["event"] == "plan"), {})
    batch = planned.get("choices", {}).get("batch_size", {})
    failed = next((e for e in events if e["event"] == "failed"), None)
    completed = next((e for e in events if e["event"] == "completed"), {})
    estimate = planned["memory"]["peak"] / 2**20 if planned else None
    measured = completed.get("peak_vram_mb")
    return {"model": work.shape.name, "picked": f"{batch.get('value')}: {batch.get('reason')}", "plan_estimate_mb":
            round(estimate) if estimate else None, "peak_vram_mb": measured,
            "estimate error": f"{estimate / measured - 1:+.1%}" if estimate and measured else None,
            "out of memory events": sum("out of memory" in m for m in logs),
            "status": "failed: " + failed["code"] if failed else ("completed" if completed else "?")}  # fmt: skip


def oom_recovery(plan: Plan, work: Workload, home: Path) -> dict[str, Any]:
    """A batch far too large for the GPU: halved until it fits, or RUNTIME_OOM_RECOVERY_EXHAUSTED with a checkpoint."""
    needs_cuda(plan, "a real CUDA out-of-memory")
    from training.runs import Registry

    rows = 64
    _, events = backprop_run(work, plan, home, batch_size=rows, steps=2, epochs=None, plan=False)  # the plan refuses it
    logs = [e["message"] for e in events if e["event"] == "log"]
    failed = next((e for e in events if e["event"] == "failed"), None)
    run = Registry(home).list()[0]
    checkpoints = [c.step for c in Registry(home).checkpoints(run.id)]
    return {"model": work.shape.name, "rows of 2048 per micro-batch": rows,
            "halvings": sum("out of memory" in m for m in logs),
            "status": "failed: " + failed["code"] if failed else run.status, "checkpoints at steps": checkpoints}  # fmt: skip


def telemetry(home: Path) -> dict[str, Any]:
    """NVML readings in the first Backprop run's telemetry events, and the GPU the governor gave it."""
    from training.events import read_events
    from training.runs import Registry

    registry = Registry(home)
    runs = [r for r in registry.list() if r.kind == "train"]
    if not runs:
        raise Skip("no Backprop run to read")
    run = min(runs, key=lambda r: r.created_at)
    events, _ = read_events(run.path / "events.jsonl")
    samples = [e for e in events if e["event"] == "telemetry"]
    gpus = [g for e in samples for g in e.get("gpus", [])]

    def most(key: str) -> float | None:
        values = [g[key] for g in gpus if g.get(key) is not None]
        return max(values) if values else None

    return {"run": run.id, "telemetry events": len(samples), "with GPU readings": sum(bool(e.get("gpus")) for e in samples),
            "gpu": gpus[0]["name"] if gpus else None, "max util %": most("util"), "max mem MiB": most("mem_used"),
            "max temp C": most("temp"), "max power W": most("power"), "registry gpu_index": run.gpu_index}  # fmt: skip


def gpu_tests(plan: Plan) -> dict[str, Any]:
    needs_cuda(plan, "tests marked gpu")
    if not (ROOT / "tests" / "test_gpu.py").exists():
        raise Skip("tests/test_gpu.py not there yet")
    files = ["tests/test_gpu.py", "tests/test_evaluate.py"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", *files, "-q", "-p", "no:cacheprovider",
                           "-x", "--timeout=300"] if _has_timeout_plugin() else
                          [sys.executable, "-m", "pytest", "-m", "gpu", *files, "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=420)  # fmt: skip
    tail = (done.stdout + done.stderr).strip().splitlines()
    return {"exit": done.returncode, "summary": tail[-1] if tail else "", "tail": "\n".join(tail[-30:])}


def unsloth_in_child(results: Results, out: Path, work_dir: Path, dry_run: bool) -> dict[str, Any]:
    """The unsloth race rows from a child process of this script (same models and data), added to these results."""
    child_out = out / "unsloth-part"
    command = [sys.executable, __file__, str(child_out), "--only", "unsloth", "--work-dir", str(work_dir)]
    done = subprocess.run(command + (["--cpu-dry-run"] if dry_run else []), timeout=900)
    rows = json.loads((child_out / "results.json").read_text())["race"] if (child_out / "results.json").exists() else []
    for row in rows:
        results.add_race_row(row)
    shutil.rmtree(child_out, ignore_errors=True)
    return {"exit": done.returncode, "rows": len(rows)}


def _has_timeout_plugin() -> bool:
    return importlib.util.find_spec("pytest_timeout") is not None


def bring_back_adapter(out: Path, home: Path, work: Workload) -> dict[str, Any]:
    """The first Backprop run's adapter, as a tar split into parts that fit what a GPU machine can send back."""
    from training.runs import Registry

    runs = sorted((r for r in Registry(home).list() if r.kind == "train" and r.status == "completed"),
                  key=lambda r: r.created_at)  # fmt: skip
    if not runs:
        raise Skip("no completed Backprop run")
    adapter = runs[0].path / "adapter"
    archive = Path(shutil.make_archive(str(out / ".adapter"), "tar", adapter.parent, adapter.name))
    data = archive.read_bytes()
    archive.unlink()
    parts = []
    for i in range(0, len(data), PART_SIZE):
        part = out / f"adapter.tar.{i // PART_SIZE:02d}"
        part.write_bytes(data[i : i + PART_SIZE])
        parts.append(part.name)
    return {"run": runs[0].id, "model": work.shape.name, "bytes": len(data), "parts": parts,
            "sha256": hashlib.sha256(data).hexdigest()[:16]}  # fmt: skip


def verify_adapter(parts_dir: Path, plan: Plan, work_dir: Path, shape: Shape, expected_fingerprint: str | None) -> dict:
    """Rebuild the base here from its seed, export base + adapter to GGUF and let llama.cpp verify the file."""
    import tarfile

    from training.export import export

    parts = sorted(parts_dir.glob("adapter.tar.*"))
    if not parts:
        raise Skip(f"no adapter.tar.* in {parts_dir}")
    work_dir.mkdir(parents=True, exist_ok=True)
    archive = work_dir / "adapter.tar"
    archive.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(archive) as tar:
        tar.extractall(work_dir, filter="data")
    adapter = work_dir / "adapter"
    base = work_dir / "base"
    fingerprint = build_model(shape, base, plan.dtype)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2))
    result = export(adapter, "gguf", quantization="q8_0" if plan.device == "cuda" else "f16", home=work_dir / "home")
    verification = result.verification or {}
    return {"base fingerprint matches": fingerprint == expected_fingerprint if expected_fingerprint else None,
            "gguf": Path(result.file or "").name, "size MiB": round(result.size_bytes / 2**20, 1),
            "llama.cpp verified": verification.get("ok", verification.get("verified")),
            "verification": {k: v for k, v in verification.items() if k in ("ok", "verified", "tokens_match",
                                                                             "greedy_match", "reason")}}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for results.json, table.md and the adapter's parts")
    parser.add_argument("--only", default="core,qlora,unsloth", help="parts to run: core, qlora, unsloth (comma-separated)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on CPU; skips what needs CUDA, per line")
    parser.add_argument("--verify-adapter", type=Path, metavar="DIR", help="export the adapter brought back in DIR to GGUF")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="DIR", help="one table from several parts' results.json")
    parser.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)  # models and data of a parent run, reused
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    if args.merge:
        merged = Results(out)
        for folder in args.merge:
            part = json.loads((folder / "results.json").read_text())
            merged.data["race"] += part["race"]
            for name, value in part["sections"].items():
                merged.data["sections"].setdefault(name, value)
        merged.save()
        print(render(merged.data))
        return

    if args.verify_adapter:
        results = Results(out, json.loads((args.verify_adapter / "results.json").read_text()))
        plan = DRY_PLAN if args.cpu_dry_run else GPU_PLAN  # the plan the adapter was trained under
        shape = plan.shapes[0]
        expected = results.data["sections"].get("models", {}).get(shape.name, {}).get("fingerprint")
        scratch = Path(tempfile.mkdtemp(prefix="bp-gguf-"))
        back = args.verify_adapter
        results.section("GGUF export + llama.cpp (here)", lambda: verify_adapter(back, plan, scratch, shape, expected))
        print(render(results.data))
        return

    if not args.cpu_dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-dry-run, or on an NVIDIA GPU")
    plan = DRY_PLAN if args.cpu_dry_run else GPU_PLAN
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="bp-gpu-check-"))

    parts = set(args.only.split(","))
    results = Results(out)
    results.data["plan"] = {"device": plan.device, "parts": sorted(parts), "seq_len": plan.seq_len,
                            "lora": f"r={LORA_R} alpha={LORA_ALPHA} all linear layers", "lr": LR}  # fmt: skip
    results.section("environment", lambda: environment(plan))
    results.section("matmul peak", lambda: {"flops": matmul_peak(plan), "dtype": str(plan.dtype).replace("torch.", "")})
    works: list[Workload] = []
    results.section("models", lambda: workloads(plan, work_dir, works))
    home = work_dir / "home"
    if not works:
        return
    if "core" in parts:
        race(results, plan, works, home, "core")
        results.section("telemetry", lambda: telemetry(home))
        results.section("adapter to bring back", lambda: bring_back_adapter(out, home, works[0]))
        results.section("automatic batch size", lambda: auto_batch(plan, works[-1], work_dir / "home-auto"))
        results.section("OOM recovery", lambda: oom_recovery(plan, works[0], work_dir / "home-oom"))
        results.section("pytest -m gpu", lambda: gpu_tests(plan))
        if plan.device == "cpu":  # the dry run has llama.cpp at hand: the GGUF step runs at once
            (work_dir / "back").mkdir()
            for part in out.glob("adapter.tar.*"):
                shutil.copy(part, work_dir / "back" / part.name)
            expected = results.data["sections"]["models"][plan.shapes[0].name]["fingerprint"]
            shape = plan.shapes[0]
            results.section(
                "GGUF export + llama.cpp (here)",
                lambda: verify_adapter(work_dir / "back", plan, work_dir / "verify", shape, expected),
            )
    if "qlora" in parts:
        results.section("QLoRA 4-bit", lambda: qlora(plan, works[0], work_dir / "home-qlora"))
    if "unsloth" in parts and len(parts) == 1:
        race(results, plan, works, work_dir / "home-unsloth", "unsloth")
    elif "unsloth" in parts:  # unsloth patches transformers and TRL as it loads: a process of its own, after the others
        results.section("unsloth part", lambda: unsloth_in_child(results, out, work_dir, args.cpu_dry_run))
    print(render(results.data))


if __name__ == "__main__":
    main()
