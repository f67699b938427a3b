"""Preference training on pairs (DPO, ORPO): a prompt, the answer preferred and the one rejected.

A pair is encoded as two sequences (prompt + chosen, prompt + rejected) that travel together: packed side by side in
one row, position ids restarting at each, so one forward pass scores both without padding. The loss needs each
answer's summed log-probability (`answer_logps`): the per-token cross-entropy of the answer's tokens only
(training/loss.py, never all logits at once), summed per answer through the batch's `sequence_ids`.

DPO measures the policy against a reference. The reference here is the model the run starts from (the base model
with a fresh adapter, which is the identity, or `--from-run`'s adapter): its log-probabilities of every pair are
computed once before the first step and kept with the pair, so no second copy of the model is ever held and each
step is one forward and backward pass. ORPO needs no reference: the chosen answers' loss plus λ times the
odds-ratio term.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from training import chat_template
from training.datasets import Example
from training.errors import BackpropError
from training.packing import IGNORE, Batch, Encoded, pack

METHODS = ("sft", "dpo", "orpo")
PREFERENCE_METHODS = ("dpo", "orpo")
METRICS = ("reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps")
# A reward margin this small is a tie, not a preference: at the first step the policy is the reference, and every margin
# is 0 up to the rounding of two differently packed passes.
TIE = 1e-4


@dataclass
class Pair:
    """One preference pair, tokenized: both answers carry labels on their reply tokens only."""

    chosen: Encoded
    rejected: Encoded
    line: int
    reference: tuple[float, float] = (0.0, 0.0)  # the reference's summed log-probabilities of chosen and rejected

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def target_tokens(self) -> int:
        return 1  # a pair is one unit of loss: a step's loss is the mean over its pairs


class PairEncoder:
    """Token ids and labels of both answers of a pair, the prompt left out of the loss.

    A pair longer than `max_seq_length` a side loses the start of its prompt first (the answers are what is compared),
    then the end of its answer."""

    def __init__(self, tokenizer: Any, max_seq_length: int):
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.truncated = 0
        self.fallbacks = 0  # as ChatEncoder's: a pair's template is never replaced by training on every token

    def __call__(self, example: Example) -> Pair:
        if not example.is_preference:
            raise BackpropError("INPUT_DATASET_NOT_PREFERENCE", path=example.path or "dataset", method="dpo or orpo",
                                reason=f"line {example.line} is a {example.format} row")  # fmt: skip
        prompt_ids, chosen_ids, chosen_labels = self._encode(example.prompt, example.chosen, example)
        _, rejected_ids, rejected_labels = self._encode(example.prompt, example.rejected, example)
        longer = max(len(chosen_ids), len(rejected_ids))
        # Both answers see the same prompt: its tail that leaves room for the longer answer.
        room = max(0, self.max_seq_length - longer)
        kept = prompt_ids[max(0, len(prompt_ids) - room) :]
        self.truncated += len(kept) < len(prompt_ids) or longer > self.max_seq_length
        return Pair(self._side(kept, chosen_ids, chosen_labels), self._side(kept, rejected_ids, rejected_labels),
                    example.line)  # fmt: skip

    def _side(self, prompt_ids: list[int], ids: list[int], labels: list[int]) -> Encoded:
        n = self.max_seq_length
        return Encoded((prompt_ids + ids)[:n], ([IGNORE] * len(prompt_ids) + labels)[:n])

    def _encode(
        self, prompt: list[dict[str, Any]], reply: list[dict[str, Any]], example: Example
    ) -> tuple[list[int], list[int], list[int]]:
        """(the prompt's ids, the answer's ids, the answer's labels): the rendered pair cut where the prompt ends."""
        try:
            pieces = chat_template.segments(self.tokenizer, prompt + reply, example.tools)
        except Exception as exc:
            where = f"{example.path or 'dataset'}:{example.line}"
            reason = chat_template.template_error(exc)
            raise BackpropError("INPUT_DATASET_TEMPLATE_ERROR", message=f"{where}: {reason}", path=example.path,
                                line=example.line, reason=reason) from exc  # fmt: skip
        prompt_chars = len(chat_template.render(self.tokenizer, prompt, example.tools, add_generation_prompt=True))
        prompt_ids: list[int] = []
        ids: list[int] = []
        labels: list[int] = []
        at = 0
        for text, kind in pieces:
            piece = self._ids(text)
            if at < prompt_chars:
                prompt_ids += piece
            else:
                ids += piece
                labels += piece if kind == "assistant" else [IGNORE] * len(piece)
            at += len(text)
        return prompt_ids, ids, labels

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def collate_pairs(rows: list[list[Pair]], pad_id: int) -> Batch:
    """Rows of pairs as one batch: each answer a segment (position ids restart), `sequence_ids` 2k and 2k + 1 for the
    k-th pair in row order, the reference log-probabilities at each answer's first target token."""
    import torch

    length = max(sum(len(p) for p in row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    sequences = torch.full((len(rows), length), -1, dtype=torch.long)
    reference = torch.zeros((len(rows), length), dtype=torch.float32)
    k = tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for pair in row:
            for side, answer in enumerate((pair.chosen, pair.rejected)):
                n = len(answer)
                ids[r, at : at + n] = torch.tensor(answer.input_ids)
                labels[r, at : at + n] = torch.tensor(answer.labels)
                labels[r, at] = IGNORE  # a sequence's first token is never predicted from the one before it
                positions[r, at : at + n] = torch.arange(n)
                sequences[r, at : at + n] = 2 * k + side
                first = next((at + i for i in range(1, n) if answer.labels[i] != IGNORE), None)
                if first is not None:
                    reference[r, first] = pair.reference[side]
                at += n
            k += 1
            tokens += len(pair)
        positions[r, at:] = torch.arange(length - at)  # padding is a segment of its own
    return Batch(ids, labels, positions, None, tokens, k, sequences, reference)


def answer_logps(model: Any, batch: Batch, device: str, kernel: str = "auto") -> Any:
    """Each answer's summed log-probability, indexed by sequence id ([max id + 1]; ids without targets hold 0)."""
    import torch

    from training.loss import head_token_losses, loss_kernel
    from training.packing import flatten

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if "flash" in str(getattr(base.config, "_attn_implementation", "")):
        batch = flatten(batch)  # packed sequences stay apart under flash attention only in a single row
    hidden = decoder(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                     use_cache=False).last_hidden_state  # fmt: skip
    labels = batch.labels.to(device)[:, 1:]
    keep = labels != IGNORE
    kernel = loss_kernel(head, device, kernel)
    logps = -head_token_losses(hidden[:, :-1][keep], head, labels[keep], "chunked" if kernel == "liger" else kernel)
    owners = batch.sequence_ids.to(device)[:, 1:][keep]
    sums = torch.zeros(int(batch.sequence_ids.max()) + 1, dtype=logps.dtype, device=device)
    return sums.index_add(0, owners, logps)


@dataclass
class PairScores:
    """What a batch's pairs score, one entry a pair: the policy's and the reference's summed log-probabilities of the
    chosen and rejected answers, and the answers' target token counts."""

    chosen: Any
    rejected: Any
    reference_chosen: Any
    reference_rejected: Any
    chosen_tokens: Any
    rejected_tokens: Any

    @classmethod
    def of(cls, sums: Any, batch: Batch) -> PairScores:
        """From `answer_logps`'s sums: the pairs present in the batch (a split batch may hold any of them)."""
        import torch

        labels = batch.labels[:, 1:]
        keep = labels != IGNORE
        owners = batch.sequence_ids[:, 1:][keep]
        size = sums.shape[0]
        counts = torch.zeros(size, dtype=torch.float32).index_add(0, owners, torch.ones_like(owners, dtype=torch.float32))
        reference = torch.zeros(size, dtype=torch.float32).index_add(0, owners, batch.reference[:, 1:][keep])
        present = torch.unique(batch.sequence_ids[batch.sequence_ids >= 0] // 2)
        c, r = 2 * present, 2 * present + 1
        device = sums.device
        return cls(sums[c.to(device)], sums[r.to(device)], reference[c].to(device), reference[r].to(device),
                   counts[c].to(device), counts[r].to(device))  # fmt: skip


@dataclass
class PreferenceLoss:
    """The loss of a batch's pairs, summed over them (the loop divides by the step's pair count), and its metrics.

    DPO:  -log σ(β · ((chosen - ref_chosen) - (rejected - ref_rejected))); rewards β · (logp - ref logp).
    ORPO: the chosen answer's mean token loss - λ · log σ(log odds(chosen) - log odds(rejected)), a sequence's odds
          from its mean token log-probability p as p / (1 - p); rewards λ · mean log-probability (as TRL reports them).
    Reward accuracy is the share of pairs whose chosen reward is the higher one (by more than TIE)."""

    method: str
    beta: float = 0.1
    orpo_lambda: float = 0.1

    def __call__(self, scores: PairScores) -> tuple[Any, dict[str, float]]:
        import torch
        import torch.nn.functional as F

        if self.method == "dpo":
            chosen_rewards = self.beta * (scores.chosen - scores.reference_chosen)
            rejected_rewards = self.beta * (scores.rejected - scores.reference_rejected)
            losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
        elif self.method == "orpo":
            chosen_mean = scores.chosen / scores.chosen_tokens.clamp(min=1)
            rejected_mean = scores.rejected / scores.rejected_tokens.clamp(min=1)
            log_odds = (chosen_mean - rejected_mean) - (_log1m_exp(chosen_mean) - _log1m_exp(rejected_mean))
            losses = -chosen_mean - self.orpo_lambda * F.logsigmoid(log_odds)
            chosen_rewards, rejected_rewards = self.orpo_lambda * chosen_mean, self.orpo_lambda * rejected_mean
        else:
            raise ValueError(f"not a preference method: {self.method}")
        with torch.no_grad():
            margin = (chosen_rewards - rejected_rewards).float()
            metrics = {
                "pairs": float(losses.shape[0]),
                "reward_accuracy": float((margin > TIE).float().sum()),
                "reward_margin": float(margin.sum()),
                "chosen_logps": float(scores.chosen.detach().sum()),
                "rejected_logps": float(scores.rejected.detach().sum()),
            }
        return losses.sum(), metrics


def _log1m_exp(x: Any) -> Any:
    """log(1 - exp(x)) for x < 0, kept finite where exp(x) rounds to 1."""
    import torch

    return torch.log1p(-torch.exp(x).clamp(max=1 - 1e-6))


def add_metrics(total: dict[str, float], more: dict[str, float], weight: float = 1.0) -> None:
    for key, value in more.items():
        total[key] = total.get(key, 0.0) + value * weight


def mean_metrics(total: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Sums over pairs -> means per pair, rounded for events: {prefix + name: value}."""
    pairs = max(1.0, total.get("pairs", 0.0))
    return {prefix + name: round(total.get(name, 0.0) / pairs, 5) for name in METRICS}


def batches(pairs: list[Pair], rows: int, max_seq_length: int, pad_id: int) -> list[tuple[list[Pair], Batch]]:
    """Pairs in a fixed order as batches of `rows` packed rows, each with the pairs it holds in sequence-id order."""
    packed = pack(pairs, 2 * max_seq_length)
    out = []
    for i in range(0, len(packed), rows):
        chunk = packed[i : i + rows]
        out.append(([p for row in chunk for p in row], collate_pairs(chunk, pad_id)))
    return out


def score_pairs(
    compute: Any, pairs: list[Pair], rows: int, max_seq_length: int, pad_id: int,
    on_scored: Callable[[int], None] | None = None,
) -> list[tuple[float, float]]:  # fmt: skip
    """The summed log-probabilities of both answers of each pair (no gradients), in `pairs`' order.

    `compute(batch)` is `answer_logps` of the model at hand (or a sharded model's root module); `on_scored(n)` hears
    after each batch how many pairs are scored so far (progress; it may raise to stop)."""
    import torch

    index = {id(p): i for i, p in enumerate(pairs)}
    scores: list[tuple[float, float]] = [(0.0, 0.0)] * len(pairs)
    scored = 0
    with torch.no_grad():
        for held, batch in batches(pairs, rows, max_seq_length, pad_id):
            sums = compute(batch).float().cpu()
            for k, pair in enumerate(held):
                scores[index[id(pair)]] = (float(sums[2 * k]), float(sums[2 * k + 1]))
            scored += len(held)
            if on_scored is not None:
                on_scored(scored)
    return scores


def pair_logps(model: Any, tokenizer: Any, examples: list[Example], device: str, max_seq_length: int,
               rows: int = 8) -> list[tuple[float, float]]:  # fmt: skip
    """For each preference example, the model's summed log-probabilities of its chosen and rejected answers given the
    prompt (what `backprop eval` compares between the base and the tuned model)."""
    encoder = PairEncoder(tokenizer, max_seq_length)
    pairs = [encoder(e) for e in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return score_pairs(lambda batch: answer_logps(model, batch, device), pairs, rows, max_seq_length, pad_id)
