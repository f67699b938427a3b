"""From examples to batches: tokenize with the chat template, mask non-assistant tokens, pack, batch.

Packing puts several short examples into one row of up to `max_seq_length` tokens. Position ids restart
at 0 for each example, which transformers reads as sequence boundaries: attention never crosses from one
example into another (no padding waste, no contamination). Without packing, examples of similar length
are grouped into batches to keep padding small.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from training import chat_template
from training.datasets import Example
from training.errors import BackpropError

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def target_tokens(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE)


@dataclass
class Batch:
    input_ids: Any  # LongTensor [rows, length]
    labels: Any
    position_ids: Any | None  # packed rows: restarts at each example
    attention_mask: Any | None  # padded rows: 1 for real tokens
    tokens: int  # real (non-padding) tokens
    target_tokens: int  # tokens that carry loss (preference batches: pairs, each one unit of loss)
    # Preference batches (training/preference.py): 2 * pair + (0 chosen, 1 rejected) at each token, -1 at padding; and
    # the reference's summed log-probability of each answer, at the answer's first target token (0 elsewhere).
    sequence_ids: Any | None = None
    reference: Any | None = None


class ChatEncoder:
    """Token ids and labels for one example; only assistant turns carry loss when `response_only`.

    Tool results never carry loss, `response_only` or not: a conversation with tool parts that the template drops,
    or whose turns cannot be cut apart, is refused with a coded error naming its file and line (`backprop validate
    --model M` lists them all; the trainer validates with the tokenizer before encoding).
    """

    def __init__(self, tokenizer: Any, max_seq_length: int, response_only: bool = True):
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.response_only = response_only
        self.fallbacks = 0  # conversations whose template is not prefix-stable: trained on every token
        self.truncated = 0

    def __call__(self, example: Example) -> Encoded:
        if example.is_raw_text:
            ids = self._ids(example.messages[0]["content"])
            if self.tokenizer.eos_token_id is not None:
                ids.append(self.tokenizer.eos_token_id)
            encoded = Encoded(ids, list(ids))
        elif self.response_only or example.uses_tools:
            encoded = self._masked(example)
        else:
            ids = self._ids(chat_template.render(self.tokenizer, example.messages))
            encoded = Encoded(ids, list(ids))
        if len(encoded) > self.max_seq_length:
            self.truncated += 1
            encoded = Encoded(encoded.input_ids[: self.max_seq_length], encoded.labels[: self.max_seq_length])
        return encoded

    def _masked(self, example: Example) -> Encoded:
        # Each new piece of rendered text is one segment, trained on when it is an assistant reply (the
        # "<|im_start|>assistant\n" header itself is not), or, without `response_only`, when it is no tool result.
        self._refuse_unrenderable(example)
        try:
            segments = chat_template.segments(self.tokenizer, example.messages, example.tools)
        except Exception as exc:
            if example.uses_tools:  # training on every token would train on the tool results
                if isinstance(exc, chat_template.NotPrefixStable):
                    raise self._error(chat_template.TOOLS_UNSUPPORTED, chat_template.UNSTABLE, example) from exc
                raise self._error(chat_template.TEMPLATE_ERROR, chat_template.template_error(exc), example) from exc
            # Templates that reject or re-render partial conversations: train on every token instead.
            self.fallbacks += 1
            ids = self._ids(chat_template.render(self.tokenizer, example.messages))
            return Encoded(ids, list(ids))
        ids: list[int] = []
        labels: list[int] = []
        trained = {"assistant"} if self.response_only else {"assistant", "prompt"}
        for text, kind in segments:
            piece = self._ids(text)
            ids += piece
            labels += piece if kind in trained else [IGNORE] * len(piece)
        return Encoded(ids, labels)

    def _refuse_unrenderable(self, example: Example) -> None:
        missing = chat_template.missing_tool_parts(self.tokenizer, example.messages, example.tools)
        if missing:
            raise self._error(chat_template.TOOLS_UNSUPPORTED, missing, example)

    @staticmethod
    def _error(code: str, reason: str, example: Example) -> BackpropError:
        where = f"{example.path or 'dataset'}:{example.line}"
        return BackpropError(code, message=f"{where}: {reason}", path=example.path, line=example.line, reason=reason)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def pack(encoded: list[Encoded], max_seq_length: int) -> list[list[Encoded]]:
    """First-fit decreasing: group examples into bins of at most `max_seq_length` tokens."""
    bins: list[list[Encoded]] = []
    space: list[int] = []
    for item in sorted(encoded, key=len, reverse=True):
        for i, free in enumerate(space):
            if len(item) <= free:
                bins[i].append(item)
                space[i] -= len(item)
                break
        else:
            bins.append([item])
            space.append(max_seq_length - len(item))
    return bins


class BatchPlan:
    """The deterministic order of micro-batches, epoch after epoch, so a resumed run sees the same data."""

    def __init__(
        self,
        encoded: list,
        batch_size: int,
        max_seq_length: int,
        packing: bool,
        seed: int,
        pad_id: int,
        collate_rows: Any = None,
    ):
        """`encoded`: Encoded examples (or any items with a length, such as preference pairs, with `collate_rows`)."""
        self.collate_rows = collate_rows or (lambda rows: collate(rows, pad_id, packing))
        self.batch_size = batch_size
        self.packing = packing
        self.seed = seed
        self.pad_id = pad_id
        self.rows = pack(encoded, max_seq_length) if packing else [[e] for e in encoded]
        self.batches_per_epoch = max(1, -(-len(self.rows) // batch_size))

    def epoch(self, epoch: int) -> list[list[list[Encoded]]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        rows = list(self.rows)
        rng.shuffle(rows)
        if not self.packing:  # group similar lengths: sort within windows of 50 batches
            window = self.batch_size * 50
            rows = [r for i in range(0, len(rows), window) for r in sorted(rows[i : i + window], key=_row_len)]
        batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def micro_batches(self, start: int = 0):
        """Yield micro-batches forever, starting at global index `start` (for resume)."""
        for rows in self.row_batches(start):
            yield self.collate_rows(rows)

    def row_batches(self, start: int = 0):
        """The rows of each micro-batch, uncollated (several ranks each collate their share of them)."""
        epoch, index = divmod(start, self.batches_per_epoch)
        while True:
            yield from self.epoch(epoch)[index:]
            epoch, index = epoch + 1, 0


def _row_len(row: list[Encoded]) -> int:
    return sum(len(e) for e in row)


def collate(rows: list[list[Encoded]], pad_id: int, packing: bool) -> Batch:
    import torch

    length = max(_row_len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    tokens = targets = 0
    for r, row in enumerate(rows):
        at = 0
        for item in row:
            n = len(item)
            ids[r, at : at + n] = torch.tensor(item.input_ids)
            labels[r, at : at + n] = torch.tensor(item.labels)
            labels[r, at] = IGNORE  # an example's first token is never predicted from the one before it
            positions[r, at : at + n] = torch.arange(n)
            at += n
            tokens += n
            targets += item.target_tokens
        mask[r, :at] = 1
        positions[r, at:] = torch.arange(length - at)  # padding is a segment of its own
    if packing:
        return Batch(ids, labels, positions, None, tokens, targets)
    return Batch(ids, labels, None, mask, tokens, targets)


def flatten(batch: Batch) -> Batch:
    """A packed batch as one row: flash attention (transformers' varlen path) reads position ids as example boundaries
    only in a batch of one row; sdpa and eager read them in every row. The loss is unchanged: a row's last token would
    predict the next row's first, whose label is always IGNORE (an example's first token, or padding)."""
    if batch.position_ids is None or batch.input_ids.shape[0] == 1:
        return batch
    one_row = [None if t is None else t.reshape(1, -1) for t in (batch.sequence_ids, batch.reference)]
    return Batch(batch.input_ids.reshape(1, -1), batch.labels.reshape(1, -1), batch.position_ids.reshape(1, -1), None,
                 batch.tokens, batch.target_tokens, *one_row)  # fmt: skip
