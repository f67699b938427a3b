"""Datasets: read a file, detect each row's format, normalize everything to chat messages, validate.

Formats (detected per row, the majority named, or forced with `fmt`):
    sharegpt           {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}
    openai             {"messages": [{"role": "user", "content": "..." | [{"type": "text", "text": ...}]}, ...]}
    alpaca             {"instruction": ..., "input": ..., "output": ...}
    prompt_completion  {"prompt": ..., "completion": ...}
    chatml             {"text": "<|im_start|>user\\n...<|im_end|>..."}
    text               {"text": "..."} or the paragraphs of a .txt / .md file (trained on every token)
Files: .jsonl, .json (array or JSONL), .csv, .parquet, .txt, .md, or a hub dataset id ("owner/name").

Bad input never crashes and is never dropped silently: each bad row becomes a `RowError` with its line
(for parquet, its row number). `load_dataset` raises the first one as a coded error unless `skip_invalid`,
in which case the report lists what was skipped. `scan` streams, so validating a huge file keeps memory flat.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.errors import BackpropError

FORMATS = ("sharegpt", "openai", "alpaca", "prompt_completion", "chatml", "text")
FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".md": "text"}
TEXT_ROLE = "text"  # a raw-text example is one message with this role
MAX_ERRORS_KEPT = 1000
_ROLE_ALIASES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "bot": "assistant", "chatgpt": "assistant", "system": "system", "developer": "system",
}  # fmt: skip
_CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", re.S)


@dataclass
class Example:
    messages: list[dict[str, str]]
    line: int
    format: str

    @property
    def is_raw_text(self) -> bool:
        return self.messages[0]["role"] == TEXT_ROLE


@dataclass
class RowError:
    line: int
    code: str
    reason: str

    def describe(self, path: str) -> str:
        return f"{path}:{self.line}: {self.reason}"


class RowProblem(Exception):
    """Raised by normalizers; becomes a RowError with the row's line."""

    def __init__(self, reason: str, code: str = "INPUT_DATASET_INVALID_ROW"):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class LengthStats:
    """Streaming token-length statistics: constant memory whatever the row count."""

    count: int = 0
    total: int = 0
    minimum: int = 0
    maximum: int = 0
    buckets: Counter = field(default_factory=Counter)  # power-of-two histogram

    def add(self, n: int) -> None:
        self.minimum = n if self.count == 0 else min(self.minimum, n)
        self.maximum = max(self.maximum, n)
        self.count += 1
        self.total += n
        self.buckets[max(n, 1).bit_length()] += 1

    def to_dict(self) -> dict[str, Any]:
        mean = self.total / self.count if self.count else 0.0
        histogram = {f"<{2**b}": c for b, c in sorted(self.buckets.items())}
        return {"count": self.count, "min": self.minimum, "max": self.maximum, "mean": round(mean, 1),
                "total": self.total, "histogram": histogram}  # fmt: skip


@dataclass
class DatasetReport:
    path: str
    file_type: str
    rows: int = 0
    valid_rows: int = 0
    formats: Counter = field(default_factory=Counter)
    errors: list[RowError] = field(default_factory=list)
    error_count: int = 0
    turns: LengthStats = field(default_factory=LengthStats)
    tokens: LengthStats | None = None

    @property
    def format(self) -> str | None:
        return self.formats.most_common(1)[0][0] if self.formats else None

    @property
    def usable(self) -> bool:
        return self.valid_rows > 0

    def add_error(self, error: RowError) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(error)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "file_type": self.file_type, "format": self.format, "formats": dict(self.formats),
            "rows": self.rows, "valid_rows": self.valid_rows, "invalid_rows": self.error_count,
            "errors": [{"line": e.line, "code": e.code, "reason": e.reason} for e in self.errors],
            "turns": self.turns.to_dict(), "tokens": self.tokens.to_dict() if self.tokens else None,
            "usable": self.usable,
        }  # fmt: skip


@dataclass
class Dataset:
    examples: list[Example]
    report: DatasetReport
    sha256: str

    @property
    def name(self) -> str:
        return Path(self.report.path).name


# ---------------------------------------------------------------- normalizing one row


def normalize(record: Any, fmt: str | None = None) -> tuple[str, list[dict[str, str]]]:
    """Return (format, messages) for one parsed row, or raise RowProblem saying what is wrong."""
    if not isinstance(record, dict):
        raise RowProblem(f"expected a JSON object, got {_type_name(record)}")
    fmt = fmt or detect_format(record)
    if fmt is None:
        keys = ", ".join(sorted(record)[:6]) or "no keys"
        raise RowProblem(f"no known format fits this row (keys: {keys})", code="INPUT_DATASET_UNKNOWN_FORMAT")
    messages = _NORMALIZERS[fmt](record)
    if fmt != "text":
        _check_chat(messages)
    return fmt, messages


def detect_format(record: dict[str, Any]) -> str | None:
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "chatml" if isinstance(record["text"], str) and "<|im_start|>" in record["text"] else "text"
    return None


def _sharegpt(record: dict[str, Any]) -> list[dict[str, str]]:
    turns = _require_list(record, "conversations")
    messages = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RowProblem(f"{where} must be an object, got {_type_name(turn)}")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        messages.append({"role": _role(speaker, where + ".from"), "content": _text(text, where + ".value")})
    return messages


def _openai(record: dict[str, Any]) -> list[dict[str, str]]:
    turns = _require_list(record, "messages")
    messages = []
    for i, turn in enumerate(turns):
        where = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise RowProblem(f"{where} must be an object, got {_type_name(turn)}")
        content = turn.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                    raise RowProblem(f"{where}.content[{j}] is a '{kind}' part; only text parts can be trained")
                parts.append(_text(part.get("text"), f"{where}.content[{j}].text"))
            content = "".join(parts)
        messages.append({"role": _role(turn.get("role"), where + ".role"), "content": _text(content, where + ".content")})
    return messages


def _alpaca(record: dict[str, Any]) -> list[dict[str, str]]:
    instruction = _text(record.get("instruction"), "instruction")
    extra = record.get("input") or ""
    prompt = instruction + ("\n\n" + _text(extra, "input") if extra else "")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record.get("output"), "output")}]
    if record.get("system"):
        messages.insert(0, {"role": "system", "content": _text(record["system"], "system")})
    return messages


def _prompt_completion(record: dict[str, Any]) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": _text(record.get("prompt"), "prompt")},
        {"role": "assistant", "content": _text(record.get("completion"), "completion")},
    ]


def _chatml(record: dict[str, Any]) -> list[dict[str, str]]:
    text = _text(record.get("text"), "text")
    turns = _CHATML_TURN.findall(text)
    if not turns:
        raise RowProblem("text has <|im_start|> but no complete <|im_start|>role ... <|im_end|> turn")
    return [{"role": _role(role, "text"), "content": content} for role, content in turns]


def _raw_text(record: dict[str, Any]) -> list[dict[str, str]]:
    text = _text(record.get("text"), "text")
    if not text.strip():
        raise RowProblem("text is empty")
    return [{"role": TEXT_ROLE, "content": text}]


_NORMALIZERS = {
    "sharegpt": _sharegpt, "openai": _openai, "alpaca": _alpaca,
    "prompt_completion": _prompt_completion, "chatml": _chatml, "text": _raw_text,
}  # fmt: skip


def _check_chat(messages: list[dict[str, str]]) -> None:
    if not messages:
        raise RowProblem("the conversation is empty")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise RowProblem("no assistant turn", code="INPUT_DATASET_NO_ASSISTANT_TURN")


def _require_list(record: dict[str, Any], key: str) -> list[Any]:
    value = record.get(key)
    if not isinstance(value, list):
        raise RowProblem(f"'{key}' must be a list, got {_type_name(value)}")
    return value


def _role(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.lower() not in _ROLE_ALIASES:
        raise RowProblem(f"{where}: unknown role {value!r} (use system, user/human, assistant/gpt)")
    return _ROLE_ALIASES[value.lower()]


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RowProblem(f"'{where}' must be a string, got {_type_name(value)}")
    return value


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


# ---------------------------------------------------------------- reading files


def resolve_path(source: str | Path) -> Path:
    """A local path, or a hub dataset id downloaded through the HF cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.endswith(tuple(FILE_TYPES)):
        return _download_hub_dataset(text)
    raise BackpropError("INPUT_DATASET_NOT_FOUND", path=source)


def _download_hub_dataset(repo_id: str) -> Path:
    import os

    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=[f"*{s}" for s in FILE_TYPES if s != ".md"]))
    except Exception as exc:  # the hub client raises many types; all mean "could not fetch"
        raise BackpropError("DEP_DATASET_DOWNLOAD_FAILED", dataset=repo_id, reason=str(exc).splitlines()[0][:200]) from exc
    files = sorted(p for p in folder.rglob("*") if p.suffix in FILE_TYPES and p.is_file())
    preferred = [p for p in files if "train" in p.name] or files
    if not preferred:
        raise BackpropError("DEP_DATASET_DOWNLOAD_FAILED", dataset=repo_id, reason="no data file in the repository")
    return preferred[0]


def iter_rows(path: Path) -> Iterator[tuple[int, Any | RowError]]:
    """Yield (line, parsed record) or (line, RowError) for every row of a file, streaming where possible."""
    file_type = FILE_TYPES.get(path.suffix.lower())
    if file_type is None:
        raise BackpropError("INPUT_DATASET_UNSUPPORTED_FILE", path=path, suffix=path.suffix or "(none)")
    _check_not_empty_or_binary(path, file_type)
    if file_type == "jsonl":
        yield from _jsonl_rows(path)
    elif file_type == "json":
        yield from _json_rows(path)
    elif file_type == "csv":
        yield from _csv_rows(path)
    elif file_type == "parquet":
        yield from _parquet_rows(path)
    else:
        yield from _text_rows(path)


def _check_not_empty_or_binary(path: Path, file_type: str) -> None:
    with path.open("rb") as f:
        head = f.read(8192)
    if not head.strip():
        raise BackpropError("INPUT_DATASET_EMPTY", path=path)
    if file_type == "parquet":
        if not head.startswith(b"PAR1"):
            raise BackpropError("INPUT_DATASET_BINARY", path=path, line=1, message=f"{path}: not a parquet file")
        return
    if b"\x00" in head:
        raise BackpropError("INPUT_DATASET_BINARY", path=path, line=head[: head.index(b"\x00")].count(b"\n") + 1)


def _decode_line(raw: bytes, line: int) -> str | RowError:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RowError(line, "INPUT_DATASET_ENCODING", f"invalid UTF-8 at byte {exc.start} of the line")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any | RowError]]:
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            text = _decode_line(raw, line)
            if isinstance(text, RowError):
                yield line, text
                continue
            if not text.strip():
                continue
            try:
                yield line, json.loads(text)
            except json.JSONDecodeError as exc:
                yield line, RowError(line, "INPUT_DATASET_INVALID_JSON", f"invalid JSON: {exc.msg} (column {exc.colno})")


def _json_rows(path: Path) -> Iterator[tuple[int, Any | RowError]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        yield line, RowError(line, "INPUT_DATASET_ENCODING", f"invalid UTF-8 at byte {exc.start}")
        return
    stripped = text.lstrip()
    if not stripped.startswith("["):
        yield from _jsonl_rows(path)  # a .json file holding JSON lines
        return
    # A JSON array: decode element by element to know the line each one starts on.
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        pos = _skip_separators(text, pos)
        if pos >= len(text):
            line = text.count("\n") + 1
            yield line, RowError(line, "INPUT_DATASET_INVALID_JSON", "invalid JSON: the array is not closed (truncated file?)")
            return
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield exc.lineno, RowError(exc.lineno, "INPUT_DATASET_INVALID_JSON", f"invalid JSON: {exc.msg} (column {exc.colno})")
            return
        yield line, record


def _skip_separators(text: str, pos: int) -> int:
    while pos < len(text) and (text[pos].isspace() or text[pos] == ","):
        pos += 1
    return pos


def _csv_rows(path: Path) -> Iterator[tuple[int, Any | RowError]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        yield line, RowError(line, "INPUT_DATASET_ENCODING", f"invalid UTF-8 at byte {exc.start}")
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start = 2  # line 1 is the header
    for row in reader:
        record: dict[str, Any] = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
        for key in ("messages", "conversations"):  # list columns arrive as JSON strings
            if isinstance(record.get(key), str):
                try:
                    record[key] = json.loads(record[key])
                except json.JSONDecodeError as exc:
                    record = RowError(start, "INPUT_DATASET_INVALID_JSON", f"column '{key}': invalid JSON: {exc.msg}")  # type: ignore[assignment]
                    break
        yield start, record
        start = reader.line_num + 1


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any | RowError]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends for broken files
        raise BackpropError("INPUT_DATASET_BINARY", path=path, line=1, message=f"{path}: unreadable parquet ({exc})") from exc
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def _text_rows(path: Path) -> Iterator[tuple[int, Any | RowError]]:
    """Paragraphs (blocks separated by blank lines) of a .txt or .md file, each a raw-text row."""
    block: list[str] = []
    block_start = 1
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            text = _decode_line(raw, line)
            if isinstance(text, RowError):
                yield line, text
                continue
            if text.strip():
                if not block:
                    block_start = line
                block.append(text)
            elif block:
                yield block_start, {"text": "".join(block).rstrip("\n")}
                block = []
    if block:
        yield block_start, {"text": "".join(block).rstrip("\n")}


# ---------------------------------------------------------------- the public functions


def scan(source: str | Path, fmt: str | None = None, tokenizer: Any = None, keep: list[Example] | None = None) -> DatasetReport:
    """Validate a dataset in one streaming pass. Examples are appended to `keep` when a list is given."""
    if fmt is not None and fmt not in FORMATS:
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"unknown format '{fmt}'", hint=f"Use one of: {', '.join(FORMATS)}")
    path = resolve_path(source)
    report = DatasetReport(str(path), FILE_TYPES.get(path.suffix.lower(), "?"))
    if tokenizer is not None:
        report.tokens = LengthStats()
    for line, record in iter_rows(path):
        report.rows += 1
        if isinstance(record, RowError):
            report.add_error(record)
            continue
        try:
            row_format, messages = normalize(record, fmt)
        except RowProblem as problem:
            report.add_error(RowError(line, problem.code, problem.reason))
            continue
        report.valid_rows += 1
        report.formats[row_format] += 1
        report.turns.add(len(messages))
        example = Example(messages, line, row_format)
        if report.tokens is not None:
            report.tokens.add(len(render_tokens(tokenizer, example)))
        if keep is not None:
            keep.append(example)
    if report.rows == 0:
        raise BackpropError("INPUT_DATASET_EMPTY", path=path)
    return report


def load_dataset(source: str | Path, fmt: str | None = None, skip_invalid: bool = False) -> Dataset:
    """Every valid example of a dataset; bad rows raise (with file:line) unless `skip_invalid`."""
    examples: list[Example] = []
    report = scan(source, fmt, keep=examples)
    path = Path(report.path)
    if report.error_count and not skip_invalid:
        first = report.errors[0]
        more = f" (and {report.error_count - 1} more bad rows)" if report.error_count > 1 else ""
        raise BackpropError(first.code, message=first.describe(str(path)) + more, path=path, line=first.line)
    if not examples:
        raise BackpropError("INPUT_DATASET_EMPTY", path=path, message=f"{path}: no valid rows ({report.error_count} bad)")
    return Dataset(examples, report, file_sha256(path))


def split(examples: list[Example], validation_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded train/validation split; the validation side gets at least one row when asked for any."""
    if validation_fraction <= 0:
        return list(examples), []
    if len(examples) < 2:
        raise BackpropError("INPUT_DATASET_TOO_SMALL", path="dataset", reason="a validation split needs at least 2 rows")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(len(examples) * validation_fraction)))
    val_idx = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val


def render_tokens(tokenizer: Any, example: Example) -> list[int]:
    """The token ids an example trains on (chat template applied; raw text as is)."""
    if example.is_raw_text:
        return tokenizer(example.messages[0]["content"], add_special_tokens=False)["input_ids"]
    text = tokenizer.apply_chat_template(example.messages, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
