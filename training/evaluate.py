"""Did it help? A run's base model (adapter off) against the tuned one (adapter on), on held-out data.

    report = evaluate_run(registry, "3f2a")                 # the run's own validation split
    report = evaluate_run(registry, "3f2a", "test.jsonl")   # or any file or hub dataset

The model is loaded once, as the run's adapter on its base; the base model is the same weights inside
`model.disable_adapter()`, so no second copy is held. Both are measured alike:

    loss, perplexity          per target token, with the trainer's own masking (ChatEncoder + mean_loss): on the
                              validation split, the tuned loss is an SFT run's final eval loss
    exact_match, f1           chat data: greedy answers to each prompt (the conversation up to its last assistant
                              turn) against that turn; exact match after whitespace normalization, F1 of the word
                              overlap (lowercase, punctuation dropped: SQuAD style)
    reward_accuracy, margin   preference data: how often the chosen answer is more likely than the rejected one
                              (summed log-probabilities given the prompt), and the mean difference

A multi-run is measured on each task's validation slice (`tasks`) and on all of them together. The report is stored
in the registry (one row, one transaction) and returned as a plain dict: {"id", "run_id", "created_at", "data",
"base", "tuned", "examples", ["tasks"]}.
"""

from __future__ import annotations

import json
import math
import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.datasets import Example, hub_validation, load_dataset, split
from training.errors import BackpropError
from training.runs import Registry, RunRecord

DEFAULT_MAX_EXAMPLES = 200  # held-out examples measured (the first ones); a big --data file is sampled, not read whole
DEFAULT_SHOWN = 5  # prompts shown with both answers
ANSWER_MARGIN_TOKENS = 16  # a greedy answer may run this much longer than its reference before it is cut off
GENERATION_BATCH = 16  # prompts answered at once
# Every metric a report may hold: key, label, True when higher is better (the order the CLI and the run page show).
METRICS = (
    ("loss", "loss", False),
    ("perplexity", "perplexity", False),
    ("exact_match", "exact match", True),
    ("f1", "F1", True),
    ("reward_accuracy", "reward accuracy", True),
    ("reward_margin", "reward margin", True),
)
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def evaluate_run(
    registry: Registry,
    run_id: str,
    data: str | None = None,
    *,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
    shown: int = DEFAULT_SHOWN,
    device: str | None = None,
) -> dict[str, Any]:
    """Base vs tuned on `data` (default: the run's held-out data), stored with the run and returned.

    INPUT_RUN_NOT_FOUND / INPUT_RUN_AMBIGUOUS for an unknown id, STATE_NO_ADAPTER for a run without a final adapter,
    INPUT_INVALID_ARGUMENT for a run that held nothing out (pass `data`) or is not a training run."""
    if max_examples < 1 or shown < 0:
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"max_examples must be >= 1 and shown >= 0 ({max_examples}, "
                            f"{shown})", hint="For example --max-examples 200.")  # fmt: skip
    run = registry.get(run_id)
    spec = _training_spec(run)
    adapter = run.path / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        hint = f"Evaluate a completed run; `backprop resume {run.id}` finishes a stopped or time-boxed one."
        raise BackpropError("STATE_NO_ADAPTER", run_id=run.id, status=run.status, hint=hint)
    from training.config import load_settings
    from training.generate import AdapterModel

    settings = load_settings(**spec["settings"], home=spec.get("home"))
    model = AdapterModel(adapter, settings.home, device=device)
    try:
        scorer = _Scorer(model, settings)
        tasks = _held_out(run, spec, data, model.tokenizer)
        measured = [(name, scorer.measure(examples[:max_examples], shown)) for name, examples in tasks]
    finally:
        model.close()
    overall = _Measured.join([m for _, m in measured])
    report: dict[str, Any] = {
        "run_id": run.id,
        "created_at": time.time(),
        "data": {"source": data or "validation split", "kind": overall.kind, "examples": overall.count,
                 **({"dataset_changed": True} if data is None and _dataset_changed(run, spec) else {})},
        "base": overall.metrics("base"),
        "tuned": overall.metrics("tuned"),
        "examples": _shown_examples([m for _, m in measured], shown),
    }  # fmt: skip
    if data is None and run.kind == "multi-run":
        report["tasks"] = [{"task": name, "examples": m.count, "base": m.metrics("base"), "tuned": m.metrics("tuned")}
                           for name, m in measured]  # fmt: skip
    return registry.add_evaluation(run.id, report)


# ------------------------------------------------------------------------------------------------------------ data


def _training_spec(run: RunRecord) -> dict[str, Any]:
    if run.kind not in ("train", "multi-run"):
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"run {run.id} is a {run.kind} run: only training runs and "
                            "multi-runs have a base model and an adapter to compare", hint="`backprop list` shows the kind "
                            "of each run.")  # fmt: skip
    spec = json.loads((run.path / "spec.json").read_text())
    if "settings" not in spec:
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"run {run.id} has no recorded settings",
                            hint="Evaluate a run trained by backprop train, the library or the web app.")  # fmt: skip
    return spec


def _held_out(run: RunRecord, spec: dict[str, Any], data: str | None, tokenizer: Any) -> list[tuple[str, list[Example]]]:
    """(name, examples) per task: `data` as one task, else exactly what the run held out (a multi-run: per task)."""
    if data is not None:
        return [(Path(str(data)).name, load_dataset(data, tokenizer=tokenizer).examples)]
    if run.kind == "multi-run":
        from training.multi_run import plan_tasks

        return [(task.name, task.val) for task in plan_tasks(spec)]
    t = spec["settings"].get("training", {})
    fmt = spec.get("format")
    fraction = t.get("validation_split", 0.0)
    # As in the trainer: a held-out set given with the run, else a hub dataset's own validation split unless a
    # fraction of the training rows was held out.
    validation = spec.get("validation_data") or (None if fraction else hub_validation(spec["data"]))
    if validation:
        return [("validation", load_dataset(validation, fmt, tokenizer=tokenizer).examples)]
    if not fraction:
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"run {run.id} held no data out (validation split 0)",
                            hint=f"Pass held-out data: backprop eval {run.id} --data FILE")  # fmt: skip
    dataset = load_dataset(spec["data"], fmt, spec.get("skip_invalid", False), tokenizer=tokenizer)
    return [("validation", split(dataset.examples, fraction, t.get("seed", 42))[1])]


def _dataset_changed(run: RunRecord, spec: dict[str, Any]) -> bool:
    """The training file no longer hashes as it did: its split is no longer the rows the run held out."""
    from training.datasets import file_sha256

    path = Path(spec.get("data", ""))
    return bool(run.kind == "train" and run.dataset_sha256 and path.is_file() and file_sha256(path) != run.dataset_sha256)


# ------------------------------------------------------------------------------------------------------------ metrics


def normalize_answer(text: str) -> str:
    """What exact match compares: the text with its whitespace runs collapsed and its ends stripped."""
    return " ".join(text.split())


def exact_match(answer: str, reference: str) -> float:
    return float(normalize_answer(answer) == normalize_answer(reference))


def f1_score(answer: str, reference: str) -> float:
    """Word-overlap F1 (SQuAD style): lowercase words, punctuation dropped; two empty texts agree."""
    got, want = _words(answer), _words(reference)
    if not got or not want:
        return float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if not common:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def _words(text: str) -> list[str]:
    return _PUNCTUATION.sub(" ", text.lower()).split()


def prompt_and_reference(example: Example) -> tuple[list[dict[str, Any]], str] | None:
    """The conversation up to its last assistant turn, and that turn's text; None where there is no plain text answer
    to compare (raw text, a last turn that calls tools)."""
    if example.is_raw_text:
        return None
    if example.is_preference:
        prompt, reply = example.prompt, example.chosen
        last = reply[-1] if reply else None
    else:
        turns = [i for i, m in enumerate(example.messages) if m.get("role") == "assistant"]
        if not turns:
            return None
        prompt, last = example.messages[: turns[-1]], example.messages[turns[-1]]
    if last is None or last.get("tool_calls") or not isinstance(last.get("content"), str) or not prompt:
        return None
    return prompt, last["content"]


@dataclass
class _Measured:
    """One set of examples measured on both sides: loss sums, per-example scores, answers for showing."""

    kind: str = "chat"  # chat, preference or text (raw text: loss only)
    count: int = 0
    loss_sum: dict[str, float] = field(default_factory=lambda: {"base": 0.0, "tuned": 0.0})
    target_tokens: int = 0
    scores: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: {"base": [], "tuned": []})
    answers: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self, side: str) -> dict[str, float | None]:
        loss = self.loss_sum[side] / self.target_tokens if self.target_tokens else None
        out: dict[str, float | None] = {
            "loss": _round(loss),
            "perplexity": _round(math.exp(min(loss, 700.0))) if loss is not None else None,
        }
        scores = self.scores[side]
        if self.kind == "preference":
            out["reward_accuracy"] = _round(sum(c > r for c, r in scores) / len(scores)) if scores else None
            out["reward_margin"] = _round(sum(c - r for c, r in scores) / len(scores)) if scores else None
        elif self.kind == "chat":
            out["exact_match"] = _round(sum(em for em, _ in scores) / len(scores)) if scores else None
            out["f1"] = _round(sum(f1 for _, f1 in scores) / len(scores)) if scores else None
        return out

    @staticmethod
    def join(parts: list[_Measured]) -> _Measured:
        kinds = {p.kind for p in parts if p.count}
        whole = _Measured(kind="preference" if "preference" in kinds else "chat" if "chat" in kinds else "text")
        for p in parts:
            whole.count += p.count
            whole.target_tokens += p.target_tokens
            for side in ("base", "tuned"):
                whole.loss_sum[side] += p.loss_sum[side]
                whole.scores[side] += p.scores[side]
            whole.answers += p.answers
        return whole


class _Scorer:
    """Measures examples with one loaded model: `base` with its adapter switched off, `tuned` with it on."""

    def __init__(self, model: Any, settings: Any):
        from training.packing import ChatEncoder

        self.chat = model  # training.generate.AdapterModel: .model is the peft model, .tokenizer the run's tokenizer
        self.peft = model.model
        self.device = str(self.peft.device).split(":")[0]
        self.t = settings.training
        self.encoder = ChatEncoder(model.tokenizer, self.t.max_seq_length, self.t.response_only)

    def sides(self) -> list[tuple[str, Any]]:
        import contextlib

        return [("base", self.peft.disable_adapter), ("tuned", contextlib.nullcontext)]

    def measure(self, examples: list[Example], shown: int) -> _Measured:
        if not examples:
            return _Measured(kind="text")
        answerable = [e for e in examples if prompt_and_reference(e) is not None]
        kind = "preference" if any(e.is_preference for e in examples) else "chat" if answerable else "text"
        # Chat data is scored by its answers, so every prompt gets one; preference data by its pairs: only the shown
        # prompts get answers, to look at.
        answered = answerable if kind == "chat" else answerable[:shown]
        measured = _Measured(kind=kind, count=len(examples))
        encoded = [self.encoder(e) for e in examples]
        measured.target_tokens = sum(e.target_tokens for e in encoded)
        answers: dict[str, list[str]] = {}
        for side, context in self.sides():
            with context():
                measured.loss_sum[side] = self._loss(encoded) * measured.target_tokens
                if kind == "preference":
                    measured.scores[side] = self._pair_logps([e for e in examples if e.is_preference])
                answers[side] = self._answers([prompt_and_reference(e) for e in answered])  # type: ignore[misc]
        for example, base, tuned in zip(answered, answers["base"], answers["tuned"], strict=True):
            prompt, reference = prompt_and_reference(example)  # type: ignore[misc]
            if kind == "chat":
                measured.scores["base"].append((exact_match(base, reference), f1_score(base, reference)))
                measured.scores["tuned"].append((exact_match(tuned, reference), f1_score(tuned, reference)))
            rejected = {"rejected": _reply_text(example.rejected)} if example.is_preference else {}
            measured.answers.append({"prompt": _prompt_text(prompt), "reference": reference, "base": base, "tuned": tuned,
                                     **rejected})  # fmt: skip
        return measured

    def _loss(self, encoded: list) -> float:
        from training.trainer import mean_loss

        if not any(e.target_tokens for e in encoded):
            return 0.0
        t = self.t
        return mean_loss(self.peft, encoded, t.batch_size, t.max_seq_length, t.packing, self.chat.tokenizer.pad_token_id,
                         self.device, t.loss_kernel)  # fmt: skip

    def _answers(self, asked: list[tuple[list[dict[str, Any]], str]]) -> list[str]:
        """Greedy answers to (prompt, reference) pairs, GENERATION_BATCH prompts at a time (left-padded, so every row
        ends where its answer starts), each cut off a little past its reference's length and at the first end-of-turn
        token. The prompt is the chat template's, as in Chat (training.generate); a prompt that fills the context gets
        no answer."""
        import torch

        from training.hf_imports import transformers_class

        GenerationConfig = transformers_class("GenerationConfig")  # noqa: N806 (a class)

        tokenizer, stops = self.chat.tokenizer, self.chat.stop_ids
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        todo = []
        for i, (prompt, reference) in enumerate(asked):
            ids = self.chat.prompt_ids(prompt)
            budget = len(tokenizer(reference, add_special_tokens=False)["input_ids"]) + ANSWER_MARGIN_TOKENS
            if self.chat.context_length:
                budget = min(budget, self.chat.context_length - len(ids))
            if budget > 0:
                todo.append((i, ids, budget))
        todo.sort(key=lambda job: len(job[1]))  # similar lengths together: little padding
        answers = [""] * len(asked)
        for start in range(0, len(todo), GENERATION_BATCH):
            group = todo[start : start + GENERATION_BATCH]
            width = max(len(ids) for _, ids, _ in group)
            rows = [[pad] * (width - len(ids)) + ids for _, ids, _ in group]
            mask = [[0] * (width - len(ids)) + [1] * len(ids) for _, ids, _ in group]
            # A config of its own: a model's defaults (Qwen's repetition penalty, sampling) must not change greedy answers.
            config = GenerationConfig(max_new_tokens=max(b for _, _, b in group), do_sample=False, num_beams=1,
                                      eos_token_id=sorted(stops), pad_token_id=pad)  # fmt: skip
            device = self.peft.device
            with torch.inference_mode():
                out = self.peft.generate(input_ids=torch.tensor(rows, device=device),
                                         attention_mask=torch.tensor(mask, device=device), generation_config=config)  # fmt: skip
            for (i, _, budget), new in zip(group, out[:, width:].tolist(), strict=True):
                new = new[:budget]
                end = next((k for k, token in enumerate(new) if token in stops), len(new))
                answers[i] = tokenizer.decode(new[:end], skip_special_tokens=True).strip()
        return answers

    def _pair_logps(self, pairs: list[Example]) -> list[tuple[float, float]]:
        from training.preference import pair_logps

        return pair_logps(self.peft, self.chat.tokenizer, pairs, self.device, self.t.max_seq_length)


def _shown_examples(parts: list[_Measured], shown: int) -> list[dict[str, Any]]:
    """Up to `shown` prompts with both answers, taken in turn from each task."""
    out: list[dict[str, Any]] = []
    for i in range(max((len(p.answers) for p in parts), default=0)):
        out += [p.answers[i] for p in parts if i < len(p.answers)]
    return out[:shown]


def _prompt_text(prompt: list[dict[str, Any]]) -> str:
    """The last message of the prompt (what was asked), as text."""
    content = prompt[-1].get("content")
    return content if isinstance(content, str) else json.dumps(content)


def _reply_text(reply: list[dict[str, Any]] | None) -> str:
    return "\n".join(m["content"] for m in reply or [] if isinstance(m.get("content"), str))


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)
