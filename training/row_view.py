"""What the model sees of one dataset row (the "dataset doctor"): the exact text the model's chat template renders,
cut into the tokens training learns from and those it only reads, the token count, and why a row is cut or dropped.

    view = view_line("chats.jsonl", 12, tokenizer, max_seq_length=1024)
    for piece in view.pieces:
        piece.text, piece.kind        # "trained", "context" (read, no loss) or "cut" (beyond max_seq_length)

The same encoder as training (packing.ChatEncoder), so what is shown is what trains: a default system prompt the
template injects, the end-of-turn token that must be learnt for the model to stop, masking of everything but replies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.datasets import Example, scan
from training.errors import BackpropError
from training.packing import IGNORE, ChatEncoder


@dataclass(frozen=True)
class Piece:
    text: str
    kind: str  # "trained", "context" or "cut"


@dataclass
class RowView:
    line: int
    pieces: list[Piece] = field(default_factory=list)
    tokens: int = 0  # all of the row's tokens, before any cut
    trained_tokens: int = 0  # those that carry loss, within max_seq_length
    cut_tokens: int = 0  # beyond max_seq_length: never seen in training
    problem: str = ""  # why the row is dropped ([CODE] message), when it is
    note: str = ""  # what to know about a row that trains, e.g. that its reply lies beyond max_seq_length

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def view_example(example: Example, tokenizer: Any, max_seq_length: int, response_only: bool = True) -> RowView:
    """The row as training encodes it, in pieces of one kind each."""
    view = RowView(example.line)
    try:
        encoded = ChatEncoder(tokenizer, 10**9, response_only)(example)  # uncut: the cut is shown, not applied
    except BackpropError as exc:
        view.problem = str(exc)
        return view
    kinds = ["cut" if i >= max_seq_length else "trained" if label != IGNORE else "context"
             for i, label in enumerate(encoded.labels)]  # fmt: skip
    view.tokens = len(encoded.input_ids)
    view.trained_tokens = kinds.count("trained")
    view.cut_tokens = kinds.count("cut")
    if example.is_preference:
        view.note = "a preference pair: shown is the prompt with the chosen answer; the rejected one is encoded the same way"
    if view.cut_tokens:
        view.note = (f"{view.cut_tokens} of its {view.tokens} tokens lie beyond the max length ({max_seq_length}) and are cut"
                     + ("; the whole reply is cut, so this row teaches nothing: raise the max length" if not view.trained_tokens
                        else ""))  # fmt: skip
    start = 0
    for end in range(1, len(kinds) + 1):
        if end == len(kinds) or kinds[end] != kinds[start]:
            text = tokenizer.decode(encoded.input_ids[start:end], skip_special_tokens=False)
            view.pieces.append(Piece(text, kinds[start]))
            start = end
    return view


def view_line(
    path: str | Path, line: int, tokenizer: Any, max_seq_length: int, response_only: bool = True, fmt: str | None = None
) -> RowView:
    """The row on `line` of a dataset file: its view, or the reason it is dropped (a bad line, a row the template cannot
    render); INPUT_INVALID_ARGUMENT for a line that holds no row."""
    examples: list[Example] = []
    report = scan(path, fmt, tokenizer, keep=examples, count_tokens=False)
    example = next((e for e in examples if e.line == line), None)
    if example is not None:
        return view_example(example, tokenizer, max_seq_length, response_only)
    error = next((e for e in report.errors if e.line == line), None)
    if error is not None:
        return RowView(line, problem=f"[{error.code}] {error.reason}")
    lines = sorted({e.line for e in examples} | {e.line for e in report.errors})
    raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"line {line} holds no row of {path}",
                        hint=f"Rows are on lines {lines[0]}-{lines[-1]}." if lines else "The dataset has no rows.")  # fmt: skip
