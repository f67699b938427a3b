"""The plan of a run before it starts: settings that suit the model, the data and the machine, each with its reason,
and the peak memory and time they will take.

    plan = make_plan(settings, "data.jsonl")        # reads config.json, the tokenizer, the data and the machine
    print(plan.render())                            # `backprop plan`
    settings = plan.apply(settings)                 # `backprop train`: the plan fills what the user left unset

`propose` is the pure part (facts in, choices out): the tests pin its choices on a grid of model shapes, dataset
statistics and free memory. A value the user set (flag, form, config file or env) is never replaced: the plan checks
it instead, and a setting that will not fit becomes a `Problem` with what to change.

Memory (training/memory.py): weights + LoRA weights and their AdamW state + activations (per token and layer, fewer
with gradient checkpointing; on CPU also every layer's attention scores) + one chunk of logits, and on CPU the
runtime itself (torch, transformers, the tokenizer).
Time: tokens to train / tokens per second, from `THROUGHPUT` (a device kind's sustained training FLOP/s) or from a
measured 10-step probe (`--probe`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from training import memory
from training.errors import BackpropError

GIB = memory.GIB
LENGTH_STEP = 64  # max_seq_length is proposed in multiples of this
MAX_PROPOSED_LENGTH = 8192
EFFECTIVE_BATCH = 16  # rows an optimizer step for supervised training; pairs for DPO/ORPO
MIN_STEPS_PER_EPOCH = 8  # a small dataset gets a smaller effective batch rather than a handful of steps
SAMPLE_EXAMPLES = 2000  # token statistics from at most this many examples (spread over the file)
CPU_RUNTIME_BYTES = 520 * 2**20  # a CPU training process before the model: python, torch, transformers, the data
CPU_RAM_FRACTION = 0.85  # of the available RAM a CPU run may plan to use
QLORA_LINEAR_BYTES = 0.53  # NF4 with double quantization: 4 bits a weight plus its block constants
QLORA_ELEMENT_BYTES = 4  # prepare_model_for_kbit_training keeps embeddings, norms and head in float32
PROBE_STEPS = 10

# Sustained LoRA training throughput a device kind reaches, in FLOP/s (matched against the GPU's name, first match
# wins). GPUs: an assumed fraction of the card's dense bf16 peak (35%; measured figures replace these as the GPU check
# records them). CPU: per core, below (fp32).
THROUGHPUT: list[tuple[str, float, str]] = [
    ("H200", 0.35 * 989e12, "assumed: 35% of an H200's bf16 peak"),
    ("H100", 0.35 * 989e12, "assumed: 35% of an H100's bf16 peak"),
    ("A100", 0.35 * 312e12, "assumed: 35% of an A100's bf16 peak"),
    ("L40", 0.35 * 181e12, "assumed: 35% of an L40's bf16 peak"),
    ("4090", 0.35 * 165e12, "assumed: 35% of an RTX 4090's bf16 peak"),
    ("A10", 0.35 * 125e12, "assumed: 35% of an A10's bf16 peak"),
    ("L4", 0.35 * 121e12, "assumed: 35% of an L4's bf16 peak"),
    ("3090", 0.35 * 71e12, "assumed: 35% of an RTX 3090's bf16 peak"),
    ("T4", 0.25 * 65e12, "assumed: 25% of a T4's fp16 peak"),
    ("", 0.35 * 100e12, "assumed: an unknown NVIDIA GPU at 35 TFLOP/s"),
]
# CPU: fitted to the ~28M model at 2 x 832 and 2 x 256 tokens and the demo model at 2 x 128, measured with
# plan_accuracy.py on an idle 2-core AVX2 VM (769, 930 and 4,142 tokens/s; the estimates: -7%, -17%, +1%).
CPU_FLOPS_PER_CORE = 48e9
STEP_OVERHEAD_S = {"cuda": 0.0015, "cpu": 0.005}  # per layer and micro-batch: kernel launches, Python, the optimizer


# ---------------------------------------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class ModelFacts:
    """What a model's config.json says about its size (no weights needed)."""

    name: str
    shape: memory.DecoderShape
    q_width: int  # attention heads x head dim (usually the hidden size)
    heads: int
    tied: bool  # output head shares the embedding matrix
    max_positions: int | None

    @property
    def params(self) -> int:
        s = self.shape
        per_layer = 2 * s.hidden * self.q_width + 2 * s.hidden * s.kv_hidden + 3 * s.hidden * s.intermediate + 2 * s.hidden
        embeddings = s.vocab * s.hidden * (1 if self.tied else 2)
        return s.layers * per_layer + embeddings + s.hidden

    @property
    def linear_params(self) -> int:
        """The layers' projections: what QLoRA stores in 4 bits (embeddings, norms and head stay wide)."""
        s = self.shape
        return s.layers * (2 * s.hidden * self.q_width + 2 * s.hidden * s.kv_hidden + 3 * s.hidden * s.intermediate)

    def lora_params(self, rank: int, target_modules: list[str] | str = "all-linear") -> int:
        s, q = self.shape, self.q_width
        widths = {"q_proj": s.hidden + q, "k_proj": s.hidden + s.kv_hidden, "v_proj": s.hidden + s.kv_hidden,
                  "o_proj": q + s.hidden, "gate_proj": s.hidden + s.intermediate, "up_proj": s.hidden + s.intermediate,
                  "down_proj": s.intermediate + s.hidden}  # fmt: skip
        names = list(widths) if target_modules == "all-linear" else list(target_modules)
        return s.layers * rank * sum(widths.get(name, 2 * s.hidden) for name in names)

    @classmethod
    def from_config(cls, name: str, config: dict[str, Any]) -> ModelFacts:
        config = config.get("text_config") or config  # multimodal configs nest the decoder's
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            layers, vocab = int(config["num_hidden_layers"]), int(config["vocab_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BackpropError("INPUT_MODEL_INVALID", model=name, reason=f"config.json lacks {exc}") from exc
        head_dim = int(config.get("head_dim") or hidden // heads)
        kv_heads = int(config.get("num_key_value_heads") or heads)
        intermediate = int(config.get("intermediate_size") or 4 * hidden)
        shape = memory.DecoderShape(layers, hidden, intermediate, vocab, kv_heads * head_dim)
        return cls(name, shape, heads * head_dim, heads, bool(config.get("tie_word_embeddings", False)),
                   config.get("max_position_embeddings"))  # fmt: skip


@dataclass(frozen=True)
class DataFacts:
    """Token statistics of a dataset, as the model's tokenizer and chat template see it."""

    examples: int
    lengths: tuple[int, ...]  # sorted, of at most SAMPLE_EXAMPLES examples (a pair: its longer side)
    pairs: bool = False
    path: str = ""

    def percentile(self, p: float) -> int:
        if not self.lengths:
            return 0
        return self.lengths[min(len(self.lengths) - 1, math.ceil(p / 100 * len(self.lengths)) - 1)]

    def longer_than(self, length: int) -> int:
        """How many examples of the whole dataset are longer than `length` tokens (scaled up from the sample)."""
        over = sum(1 for n in self.lengths if n > length)
        return round(over * self.examples / max(1, len(self.lengths)))

    def tokens(self, length: int) -> int:
        """Tokens an epoch trains on at `max_seq_length` = `length` (a pair counts both answers)."""
        sides = 2 if self.pairs else 1
        mean = sum(min(n, length) for n in self.lengths) / max(1, len(self.lengths))
        return round(mean * sides * self.examples)


@dataclass(frozen=True)
class Machine:
    """Where the run will train: one device kind, its free memory (per GPU, or the RAM a CPU run may use)."""

    device: str  # "cuda" or "cpu"
    name: str
    free_bytes: float
    total_bytes: float
    gpus: int = 0
    cores: int = 1
    bf16: bool = True

    def describe(self) -> str:
        if self.device == "cuda":
            many = f"{self.gpus} x " if self.gpus > 1 else ""
            return f"{many}{self.name}, {self.free_bytes / GIB:.1f} of {self.total_bytes / GIB:.1f} GiB free"
        return f"CPU ({self.cores} cores), {self.free_bytes / GIB:.1f} of {self.total_bytes / GIB:.1f} GiB RAM available"


# ----------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Choice:
    value: Any
    reason: str
    given: bool = False  # the user set it: the plan only checks it


@dataclass(frozen=True)
class Problem:
    """A setting that will not work, found before the start, with what to change."""

    code: str
    message: str
    hint: str


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    adapter_and_optimizer: int
    activations: int
    logits: int
    runtime: int  # CPU: the process itself; CUDA: 0 (counted in the headroom)
    usable: int  # what the plan may fill now: free memory less headroom
    capacity: int  # the same of the whole device (or RAM): more than this never fits, whatever else ends first

    @property
    def peak(self) -> int:
        return self.weights + self.adapter_and_optimizer + self.activations + self.logits + self.runtime

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable

    @property
    def fits_device(self) -> bool:
        return self.peak <= self.capacity


@dataclass(frozen=True)
class TimeEstimate:
    tokens: int  # trained over the whole run
    tokens_per_second: float
    source: str  # where the speed comes from: a THROUGHPUT row, or the probe

    @property
    def seconds(self) -> float:
        return self.tokens / max(self.tokens_per_second, 1e-9)


@dataclass
class Plan:
    model: ModelFacts
    machine: Machine
    data: DataFacts | None
    method: str
    choices: dict[str, Choice]
    memory: MemoryEstimate
    time: TimeEstimate | None
    steps: int | None  # optimizer steps the settings give on this dataset
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def options(self) -> dict[str, Any]:
        """The flat options (config.FLAT_OPTIONS names) the plan chose: what it fills in for the user."""
        return {name: c.value for name, c in self.choices.items() if not c.given and c.value is not None}

    def apply(self, settings: Any) -> Any:
        """`settings` with the plan's choices where the user set nothing; they count as set from now on (spec.json)."""
        from training.config import fill_unset

        return fill_unset(settings, self.options())

    def to_dict(self) -> dict[str, Any]:
        m = self.memory
        data = None
        if self.data is not None:
            data = {"path": self.data.path, "examples": self.data.examples, "pairs": self.data.pairs,
                    "sampled": len(self.data.lengths), "p50": self.data.percentile(50), "p95": self.data.percentile(95),
                    "max": self.data.percentile(100)}  # fmt: skip
        return {
            "model": {
                "name": self.model.name,
                "params": self.model.params,
                **asdict(self.model.shape),
                "max_positions": self.model.max_positions,
            },  # fmt: skip
            "machine": asdict(self.machine) | {"description": self.machine.describe()},
            "data": data,
            "method": self.method,
            "choices": {name: asdict(c) for name, c in self.choices.items()},
            "memory": asdict(m) | {"peak": m.peak, "fits": m.fits},
            "time": None if self.time is None else asdict(self.time) | {"seconds": round(self.time.seconds, 1)},
            "steps": self.steps,
            "problems": [asdict(p) for p in self.problems],
            "notes": list(self.notes),
        }

    def render(self) -> str:
        """The plan as `backprop plan` prints it."""
        mb = self.model
        lines = [f"Plan for {mb.name} ({self.method}) on {self.machine.describe()}", ""]
        s = mb.shape
        lines.append(f"  model     {_count(mb.params)} parameters, {s.layers} layers, hidden {s.hidden}, "
                     f"vocabulary {s.vocab:,}")  # fmt: skip
        if self.data is not None:
            d = self.data
            unit = "pairs" if d.pairs else "examples"
            sampled = f" (lengths of {len(d.lengths):,} sampled)" if len(d.lengths) < d.examples else ""
            lines.append(f"  data      {d.examples:,} {unit}; tokens p50 {d.percentile(50):,}, p95 {d.percentile(95):,}, "
                         f"max {d.percentile(100):,}{sampled}")  # fmt: skip
        lines += ["", f"  {'setting':<24}{'value':<12}why"]
        for name, c in self.choices.items():
            value = "-" if c.value is None else str(c.value)
            lines.append(f"  {name:<24}{value:<12}{'(yours) ' if c.given else ''}{c.reason}")
        m = self.memory
        lines += ["", f"  memory    ~{m.peak / GIB:.2f} GiB peak of {m.usable / GIB:.1f} GiB usable "
                  f"({'fits' if m.fits else 'DOES NOT FIT'}): weights {m.weights / GIB:.2f}, LoRA + optimizer "
                  f"{m.adapter_and_optimizer / GIB:.2f}, activations {m.activations / GIB:.2f}, logits {m.logits / GIB:.2f}"
                  + (f", runtime {m.runtime / GIB:.2f}" if m.runtime else "")]  # fmt: skip
        if self.time is not None:
            t = self.time
            steps = f"{self.steps:,} steps, " if self.steps else ""
            lines.append(f"  time      ~{duration(t.seconds)}: {steps}{t.tokens:,} tokens at ~{t.tokens_per_second:,.0f} "
                         f"tokens/s ({t.source})")  # fmt: skip
        for note in self.notes:
            lines.append(f"  note      {note}")
        for p in self.problems:
            lines += [f"  PROBLEM   [{p.code}] {p.message}", f"            {p.hint}"]
        return "\n".join(lines)


def summary(plan: dict[str, Any]) -> str:
    """A recorded plan (`Plan.to_dict()`, as spec.json keeps it) in a few lines: what the plan chose, and its estimate."""
    chosen = [f"{name} {c['value']}: {c['reason']}" for name, c in plan["choices"].items() if not c["given"]]
    m = plan["memory"]
    estimate = f"~{m['peak'] / GIB:.1f} GiB peak of {m['usable'] / GIB:.1f} GiB usable"
    if plan.get("time"):
        estimate += f", ~{duration(plan['time']['seconds'])} ({plan['time']['source']})"
    lines = [*chosen, estimate, *plan.get("notes", [])]
    return "\n".join(f"{'plan' if i == 0 else '':<6}{line}" for i, line in enumerate(lines))


# ---------------------------------------------------------------------------------------------------- proposing

# Settings a model preset tunes (training/models.py MODEL_DEFAULTS) win over the data-driven rules below.
PLANNED = ("max_seq_length", "batch_size", "gradient_accumulation", "qlora", "gradient_checkpointing", "lora_r",
           "lora_alpha", "lr", "epochs", "steps")  # fmt: skip


def propose(
    model: ModelFacts,
    data: DataFacts | None,
    machine: Machine,
    *,
    method: str = "sft",
    given: dict[str, Any] | None = None,
    preset: dict[str, Any] | None = None,
    target_modules: list[str] | str = "all-linear",
    packing: bool = True,
    qlora_available: bool = True,
    throughput: tuple[float, str] | None = None,
    strategy: str = "ddp",
) -> Plan:
    """Choose every setting of `PLANNED` the user did not give (`given`: flat option name -> value), with reasons.

    `preset`: a model's own defaults (flat names), which win over the rules. `throughput`: measured tokens/s and its
    source (the probe), else the THROUGHPUT table's estimate. `strategy` (several GPUs): fsdp and deepspeed-zero3
    shard the frozen weights over the GPUs; ddp and deepspeed-zero2 keep them whole on each."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    preset = dict(preset or {})
    choices: dict[str, Choice] = {}
    problems: list[Problem] = []
    notes: list[str] = []
    gpus = max(1, machine.gpus) if machine.device == "cuda" else 1
    pairs = method in ("dpo", "orpo")

    def pick(name: str, value: Any, reason: str) -> Any:
        if name in given:
            choices[name] = Choice(given[name], "set by you", given=True)
            return given[name]
        if name in preset:
            choices[name] = Choice(preset[name], "this model's tuned default")
            return preset[name]
        choices[name] = Choice(value, reason)
        return value

    # Sequence length: cover 95% of the examples, within what the model was trained for.
    max_len = int(pick("max_seq_length", *_length_choice(model, data)))
    cut = data.longer_than(max_len) if data is not None else 0
    if cut and not choices["max_seq_length"].reason.startswith("covers"):  # the rule's reason already says it
        notes.append(f"{cut:,} of {data.examples:,} examples are longer than {max_len} tokens and will be truncated")
    if model.max_positions and max_len > model.max_positions:
        problems.append(Problem("INPUT_INVALID_ARGUMENT", f"max_seq_length {max_len} is longer than the "
                                f"{model.max_positions} positions {model.name} was trained for",
                                f"Use --max-seq-length {model.max_positions} or less."))  # fmt: skip

    # LoRA rank from the dataset's size; alpha = 2 x rank.
    rank = int(pick("lora_r", *_rank_choice(data)))
    pick("lora_alpha", 2 * rank, "twice the rank: the adapter's usual scale")
    row_length = max_len * (2 if pairs else 1)  # a pair's two answers share a row
    shards = gpus if strategy in ("fsdp", "deepspeed-zero3") else 1
    estimate = _Estimator(model, machine, rank, target_modules, row_length, shards)
    if shards > 1:
        notes.append(f"{strategy}: each GPU holds 1/{shards} of the frozen weights")
    estimate.qlora_available = qlora_available

    # Precision and memory savers: 16-bit LoRA if it fits, else gradient checkpointing, else QLoRA.
    qlora, checkpointing = _memory_savers(estimate, machine, given, qlora_available, pick, problems)

    # Batch: the largest power-of-two micro-batch that fits, accumulated to a sensible effective batch.
    rows_per_epoch = _rows_per_epoch(data, max_len, packing)
    target = EFFECTIVE_BATCH
    if rows_per_epoch is not None:
        target = min(target, _floor_pow2(max(1, rows_per_epoch // MIN_STEPS_PER_EPOCH)))
    fitting = estimate.largest_batch(qlora=qlora, checkpointing=checkpointing, limit=max(1, target // gpus))
    unit = "pairs" if pairs else "rows"
    batch_reason = f"the largest power of two up to {max(1, target // gpus)} that fits in memory ({row_length} tokens a row)"
    batch = int(pick("batch_size", fitting, batch_reason))
    accumulation = int(pick("gradient_accumulation", max(1, target // (batch * gpus)), ""))
    effective = batch * accumulation * gpus
    if not choices["gradient_accumulation"].given and "gradient_accumulation" not in preset:
        why = f"{batch} x {accumulation}{f' x {gpus} GPUs' if gpus > 1 else ''} = an effective batch of {effective} {unit}"
        if rows_per_epoch is not None and target < EFFECTIVE_BATCH:
            why += f" (~{rows_per_epoch} rows an epoch: at least {MIN_STEPS_PER_EPOCH} steps each)"
        choices["gradient_accumulation"] = Choice(accumulation, why)

    # Learning rate: LoRA's usual 2e-4 (1e-4 from 10B parameters up); a tenth of it for preference methods.
    lr = 1e-4 if model.params >= 10e9 else 2e-4
    lr_reason = "LoRA's usual rate" if lr == 2e-4 else "a large model: half LoRA's usual rate"
    if pairs:
        from training.models import PREFERENCE_LR_FACTOR

        lr, lr_reason = lr * PREFERENCE_LR_FACTOR, f"{method.upper()} moves the model further a step: a tenth of SFT's"
        if "lr" in preset:
            preset["lr"] = float(f"{preset['lr'] * PREFERENCE_LR_FACTOR:.6g}")
    pick("lr", float(f"{lr:.6g}"), lr_reason)

    # Length of training: passes over the data by its size (steps, when set, win over epochs).
    steps = given.get("steps", preset.get("steps") if "epochs" not in given else None)
    if steps is not None:
        pick("steps", steps, "")
        choices.pop("epochs", None)
    else:
        pick("epochs", *_epochs_choice(data))
    epochs = choices["epochs"].value if "epochs" in choices else None
    if steps is None and rows_per_epoch is not None:
        steps = max(1, math.ceil(epochs * math.ceil(rows_per_epoch / (batch * gpus)) / accumulation))

    # The micro-batch as chosen (or given) must fit.
    memory_estimate = estimate.memory(batch, qlora=qlora, checkpointing=checkpointing)
    if not memory_estimate.fits_device:
        problems.append(_wont_fit(memory_estimate, machine, batch, max_len, checkpointing, qlora, estimate))
    elif not memory_estimate.fits:  # other work holds memory now: the governor's admission waits for it
        notes.append(f"~{memory_estimate.peak / GIB:.1f} GiB is more than the {memory_estimate.usable / GIB:.1f} GiB "
                     "usable now: the run may wait for memory (admission) or run out of it")  # fmt: skip

    time_estimate = None
    if steps is not None:
        # Packed rows are nearly full; unpacked ones hold one example each (padding aside).
        mean = data.tokens(max_len) / data.examples if data is not None and not packing else row_length
        tokens = round(steps * effective * min(row_length, mean))
        speed, source = throughput or estimate.tokens_per_second(batch, checkpointing=checkpointing, gpus=gpus)
        time_estimate = TimeEstimate(tokens, speed, source)
    return Plan(model, machine, data, method, choices, memory_estimate, time_estimate, steps, problems, notes)


def _length_choice(model: ModelFacts, data: DataFacts | None) -> tuple[int, str]:
    limit = min(model.max_positions or MAX_PROPOSED_LENGTH, MAX_PROPOSED_LENGTH)
    if data is None or not data.lengths:
        return min(1024, limit), "no dataset statistics: the default"
    p95 = data.percentile(95)
    length = min(limit, max(LENGTH_STEP, math.ceil(p95 / LENGTH_STEP) * LENGTH_STEP))
    cut = data.longer_than(length)
    covered = 100 * (1 - cut / max(1, data.examples))
    side = " a side" if data.pairs else ""
    reason = f"covers {covered:.0f}% of the examples{side} (p95 {p95}, longest {data.percentile(100)} tokens)"
    if cut:
        reason += f"; {cut:,} longer {'is' if cut == 1 else 'are'} truncated"
    if length == limit and p95 > limit:
        reason += f"; capped at {limit}"
    return length, reason


def _rank_choice(data: DataFacts | None) -> tuple[int, str]:
    if data is None:
        return 16, "the usual rank"
    if data.examples < 200:
        return 8, f"{data.examples} examples: a smaller adapter overfits less"
    if data.examples >= 50_000:
        return 32, f"{data.examples:,} examples: room for a larger adapter"
    return 16, f"the usual rank for {data.examples:,} examples"


def _epochs_choice(data: DataFacts | None) -> tuple[float, str]:
    if data is None:
        return 1.0, "one pass"
    if data.examples < 1000:
        return 3.0, f"{data.examples:,} examples: three passes to learn from"
    if data.examples < 10_000:
        return 2.0, f"{data.examples:,} examples: two passes"
    return 1.0, f"{data.examples:,} examples: one pass is plenty"


def _rows_per_epoch(data: DataFacts | None, max_len: int, packing: bool) -> int | None:
    if data is None:
        return None
    if data.pairs or not packing:
        return data.examples
    return max(1, math.ceil(data.tokens(max_len) / max_len))


def _memory_savers(estimate: _Estimator, machine: Machine, given: dict[str, Any], qlora_available: bool, pick: Any,
                   problems: list[Problem]) -> tuple[bool, bool]:  # fmt: skip
    """QLoRA and gradient checkpointing: off unless one row would not fit without them."""
    cuda = machine.device == "cuda"
    fits_plain = estimate.memory(1, qlora=False, checkpointing=False).fits
    fits_checkpointed = estimate.memory(1, qlora=False, checkpointing=True).fits
    if fits_plain or fits_checkpointed or not cuda:
        qlora_value, qlora_reason = False, "16-bit weights fit" if cuda else "CPU: full-precision weights (QLoRA needs CUDA)"
    elif qlora_available:
        weights = estimate.memory(1, qlora=False, checkpointing=True).weights
        qlora_value, qlora_reason = True, f"16-bit weights ({weights / GIB:.1f} GiB) and one row do not fit: 4-bit weights"
    else:
        qlora_value, qlora_reason = False, "16-bit weights do not fit, and bitsandbytes (the gpu extra) is not installed"
    qlora = bool(pick("qlora", qlora_value, qlora_reason))
    if qlora and not cuda:
        problems.append(Problem("INPUT_INVALID_ARGUMENT", "QLoRA (4-bit) needs an NVIDIA GPU", "Drop --qlora on CPU."))
        qlora = False
    if qlora:
        checkpointing_value, checkpointing_reason = True, "QLoRA always recomputes activations"
    elif estimate.memory(1, qlora=False, checkpointing=False).fits:
        checkpointing_value, checkpointing_reason = False, "one row's activations fit: no recompute needed"
    else:
        checkpointing_value, checkpointing_reason = True, "one row's activations do not fit: recompute them in backward"
    return qlora, bool(pick("gradient_checkpointing", checkpointing_value, checkpointing_reason))


def _wont_fit(m: MemoryEstimate, machine: Machine, batch: int, max_len: int, checkpointing: bool, qlora: bool,
              estimate: _Estimator) -> Problem:  # fmt: skip
    where = "VRAM" if machine.device == "cuda" else "RAM"
    message = f"the run needs ~{m.peak / GIB:.1f} GiB, {m.capacity / GIB:.1f} GiB of {where} is usable at most"
    if batch > 1 and estimate.memory(1, qlora=qlora, checkpointing=checkpointing).fits_device:
        fits = estimate.largest_batch(qlora=qlora, checkpointing=checkpointing, limit=batch)
        hint = f"Use --batch-size {fits} (and --gradient-accumulation to keep the effective batch)."
    elif not checkpointing and estimate.memory(1, qlora=qlora, checkpointing=True).fits_device:
        hint = "Turn gradient checkpointing on (training.gradient_checkpointing), or lower --max-seq-length."
    elif not qlora and machine.device == "cuda":
        extra = "" if estimate.qlora_available else " (install the gpu extra for bitsandbytes)"
        hint = f"Use --qlora{extra} for 4-bit weights, a smaller model, or a GPU with more memory."
    else:
        hint = f"Lower --max-seq-length (now {max_len}), or pick a smaller model."
    return Problem("INPUT_RUN_WONT_FIT", message, hint)


def _floor_pow2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


class _Estimator:
    """Memory and speed of one micro-batch size on this machine (the arithmetic of training/memory.py)."""

    def __init__(self, model: ModelFacts, machine: Machine, rank: int, target_modules: list[str] | str, row_length: int,
                 shards: int = 1):  # fmt: skip
        self.model, self.machine, self.rank, self.row_length, self.shards = model, machine, rank, row_length, shards
        self.cuda = machine.device == "cuda"
        self.element = 2 if self.cuda and machine.bf16 else 4
        self.trainable = model.lora_params(rank, target_modules)
        self.qlora_available = True

    def memory(self, rows: int, *, qlora: bool, checkpointing: bool) -> MemoryEstimate:
        model, e = self.model, self.element
        if qlora:
            wide = model.params - model.linear_params
            weights = round(model.linear_params * QLORA_LINEAR_BYTES + wide * QLORA_ELEMENT_BYTES)
        else:
            weights = model.params * e
        weights //= self.shards
        tokens = rows * self.row_length
        per_token = memory.activation_bytes_per_token(model.shape, element_bytes=e, adapter_bytes=4, lora_r=self.rank)
        if checkpointing:  # each layer keeps only its input; one layer's full set lives during its recompute
            per_token = model.shape.layers * e * model.shape.hidden + per_token // model.shape.layers
        logits = min(tokens, memory.LOGIT_CHUNK_ROWS) * model.shape.vocab * memory.CHUNKED_LOGIT_BYTES
        if not self.cuda:  # CPU attention with a mask (packed or padded rows) keeps every layer's scores for backward
            layers = 1 if checkpointing else model.shape.layers
            scores = rows * layers * model.heads * self.row_length**2 * e
        else:
            scores = 0
        free, total = self.machine.free_bytes, self.machine.total_bytes
        if self.cuda:
            usable, capacity = (b * (1 - memory.HEADROOM_FRACTION) - memory.HEADROOM_BYTES for b in (free, total))
            runtime = 0
        else:
            usable, capacity, runtime = free * CPU_RAM_FRACTION, total * CPU_RAM_FRACTION, CPU_RUNTIME_BYTES
        # LoRA weights (float32) and their gradient and AdamW moments.
        adapter = self.trainable * (4 + 12)
        return MemoryEstimate(int(weights), int(adapter), int(tokens * per_token + scores), int(logits), runtime, int(usable),
                              int(capacity))  # fmt: skip

    def largest_batch(self, *, qlora: bool, checkpointing: bool, limit: int) -> int:
        size = 1
        while size * 2 <= limit and self.memory(size * 2, qlora=qlora, checkpointing=checkpointing).fits:
            size *= 2
        return size

    def tokens_per_second(self, rows: int, *, checkpointing: bool, gpus: int) -> tuple[float, str]:
        """Training FLOPs a token (forward 2N, backward through the frozen weights 2N, a recompute 2N more; causal
        attention's scores) against the device's sustained FLOP/s, plus a fixed cost a layer and micro-batch."""
        model = self.model
        n = model.params - model.shape.vocab * model.shape.hidden * (1 if model.tied else 0)
        flops_per_token = (6 if checkpointing else 4) * n + 6 * model.shape.layers * model.q_width * self.row_length
        if self.cuda:
            flops, source = next((f, s) for key, f, s in THROUGHPUT if key.lower() in self.machine.name.lower())
            flops *= gpus
        else:
            flops = CPU_FLOPS_PER_CORE * self.machine.cores
            source = f"measured: {CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s a CPU core"
        tokens = rows * self.row_length
        seconds = tokens * flops_per_token / flops + model.shape.layers * STEP_OVERHEAD_S[self.machine.device]
        return tokens / seconds, source


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------------------ reading the facts


def model_facts(model: str, home: Path | None = None) -> ModelFacts:
    """ModelFacts from config.json: the demo model's, a local folder's, or the hub's (that one file, not the weights)."""
    from training.models import resolve_model

    source = resolve_model(model, home)
    if source.is_local:
        config_path = Path(source.path) / "config.json"
    else:  # config and tokenizer only (the data's lengths need the tokenizer next); fails fast when the hub is out of reach
        from training.download import download_model

        config_path = download_model(source.path, weights=False) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BackpropError("INPUT_MODEL_INVALID", model=model, reason=f"config.json: {exc}") from exc
    return ModelFacts.from_config(model, config)


def data_facts(
    data: str, tokenizer: Any, *, fmt: str | None = None, method: str = "sft", on_download: Callable[..., Any] | None = None
) -> DataFacts:
    """Token lengths of (a spread sample of) the dataset's valid rows, encoded as training will encode them.

    A hub dataset not cached yet is fetched first (resumable), its progress as `download` events to `on_download`
    (an event sink: `on_download("download", **fields)`), so that the run finds it cached."""
    from training.datasets import Example, fetch_hub_dataset, scan
    from training.download import DownloadEvents
    from training.packing import ChatEncoder
    from training.preference import PairEncoder

    fetch_hub_dataset(data, DownloadEvents(str(data), on_download, what="dataset") if on_download else None)
    examples: list[Example] = []
    report = scan(data, fmt, None, keep=examples, count_tokens=False)
    pairs = method in ("dpo", "orpo")
    stride = max(1, math.ceil(len(examples) / SAMPLE_EXAMPLES))
    sample = examples[::stride]
    lengths = []
    if pairs:
        encoder = PairEncoder(tokenizer, 10**9)
        for example in sample:
            if example.is_preference:
                pair = encoder(example)
                lengths.append(max(len(pair.chosen.input_ids), len(pair.rejected.input_ids)))
    else:
        chat = ChatEncoder(tokenizer, 10**9, response_only=False)
        for example in sample:
            try:
                lengths.append(len(chat(example)))
            except BackpropError:  # a row the template refuses: the trainer reports it by line
                continue
    return DataFacts(len(examples), tuple(sorted(lengths)), pairs, report.path)


def this_machine(settings: Any) -> Machine:
    """The machine as the governor sees it (training/telemetry.py: NVML or nvidia-smi, no CUDA context in this process;
    simulated readings when `telemetry_file` is set): its GPUs, else the CPU and the RAM available."""
    from training.telemetry import Telemetry

    try:
        sample = Telemetry("none" if settings.gpu.probe == "none" else settings.gpu.probe, settings.telemetry_file).sample()
    except Exception:  # a broken driver: plan for the CPU
        sample = Telemetry("none", settings.telemetry_file).sample()
    gpus = [g for g in sample.gpus if g.mem_free is not None]
    if gpus:
        name = gpus[0].name
        bf16 = not any(old in name for old in ("T4", "V100", "P100", "1080", "2080"))
        free = min(g.mem_free for g in gpus) * 2**20  # the tightest GPU decides
        return Machine("cuda", name, free, gpus[0].mem_total * 2**20, gpus=len(gpus), cores=_cores(), bf16=bf16)
    return Machine("cpu", "CPU", sample.ram_available * 2**20, sample.ram_total * 2**20, cores=_cores())


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def given_options(settings: Any) -> dict[str, Any]:
    """The PLANNED settings the user set (flags, form, config file, env), by flat option name."""
    t, lora = settings.training, settings.lora
    names = ("max_seq_length", "batch_size", "gradient_accumulation", "qlora", "gradient_checkpointing", "epochs", "steps")
    given = {name: getattr(t, name) for name in names if name in t.model_fields_set}
    if "learning_rate" in t.model_fields_set:
        given["lr"] = t.learning_rate
    if "r" in lora.model_fields_set:
        given["lora_r"] = lora.r
    if "alpha" in lora.model_fields_set:
        given["lora_alpha"] = lora.alpha
    return {k: v for k, v in given.items() if v is not None}


def make_plan(
    settings: Any,
    data: str | None,
    *,
    fmt: str | None = None,
    machine: Machine | None = None,
    throughput: tuple[float, str] | None = None,
    on_download: Callable[..., Any] | None = None,
) -> Plan:
    """The plan for `settings` (what the user set) on `data` on this machine (or `machine`).

    Reads the model's config.json and tokenizer (a hub model: those small files only) and the dataset. A dataset that
    cannot be read is planned without its statistics (a note says why); the run then reports the error by line.
    `throughput`: a measured speed (training/probe.py) instead of the THROUGHPUT table's. `on_download`: where a hub
    dataset's download progress goes (see data_facts)."""
    from training.models import MODEL_DEFAULTS, load_tokenizer, resolve_model

    t, dist = settings.training, settings.distributed
    facts = model_facts(settings.model, settings.home)
    machine = machine or this_machine(settings)
    if machine.device == "cuda":  # the GPUs this run trains on: one process each (`auto`: every GPU here), per machine
        per_node = machine.gpus if dist.nproc == "auto" else min(int(dist.nproc), max(1, machine.gpus))
        machine = replace(machine, gpus=per_node * dist.nnodes)
    notes: list[str] = []
    data_stats = None
    if data is not None:
        try:
            tokenizer = load_tokenizer(resolve_model(settings.model, settings.home))
            data_stats = data_facts(data, tokenizer, fmt=fmt, method=t.method, on_download=on_download)
        except BackpropError as exc:
            notes.append(f"dataset not measured: {exc.message}")
    preset = {k: v for k, v in MODEL_DEFAULTS.get(settings.model, {}).items() if k in PLANNED}
    plan = propose(facts, data_stats, machine, method=t.method, given=given_options(settings), preset=preset,
                   target_modules=settings.lora.target_modules, packing=t.packing,
                   qlora_available=_importable("bitsandbytes"), throughput=throughput,
                   strategy=settings.distributed.strategy)  # fmt: skip
    plan.notes[:0] = notes
    return plan


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
