"""Datasets: read a file, detect each row's format, normalize everything to chat messages, validate.

Formats (detected per row, the majority named, or forced with `fmt`):
    sharegpt           {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}
    openai             {"messages": [{"role": "user", "content": "..." | [{"type": "text", "text": ...}]}, ...]}
                       with tool use: assistant "tool_calls", "tool" messages and a row-level "tools" list
    alpaca             {"instruction": ..., "input": ..., "output": ...}
    prompt_completion  {"prompt": ..., "completion": ...}
    chatml             {"text": "<|im_start|>user\\n...<|im_end|>..."}
    text               {"text": "..."} or the paragraphs of a .txt / .md file (trained on every token)
Preference pairs (DPO, ORPO; a row with "chosen" or "rejected" is one, whatever else it holds):
    preference         {"prompt": ..., "chosen": ..., "rejected": ...}: the prompt a string (one user turn) or OpenAI
                       messages (system and earlier turns allowed), each answer a string, one assistant message or a
                       list of them; without "prompt", chosen and rejected are whole conversations and the prompt is
                       the turns they share (TRL's "implicit prompt"); an optional row-level "system"
    sharegpt_preference {"conversations": [...the prompt, ShareGPT turns], "chosen": {"from": "gpt", "value": ...} or a
                       string, "rejected": the same}
    A pair becomes one Example: `messages` the prompt then the chosen answer (what SFT trains on), `rejected` the
    other answer. It must end its prompt with a user turn (or a tool result), hold assistant turns only in its
    answers, and have two non-empty answers that differ; anything else is INPUT_DATASET_BAD_PAIR with file:line.
Files: .jsonl, .json (array or JSONL), .csv, .parquet, .txt, .md (UTF-8, with or without a byte-order mark, LF or
CRLF line ends), or a hub dataset: "owner/name", "owner/name:config", "owner/name@split", "owner/name:config@split"
(default split "train"; slices like "@train[:1000]" work), loaded with the `datasets` library, every shard of the split.

Tool use: a conversation may call tools (OpenAI function calling; ShareGPT "function_call"/"observation" turns).
Whether the model's chat template renders them is checked where the tokenizer is known (`scan(..., tokenizer=)`,
`load_dataset(..., tokenizer=)`); see chat_template.py.

Bad input never crashes and is never dropped silently: each bad row becomes a `RowError` with its line
(for parquet, its row number). `load_dataset` raises the first one as a coded error unless `skip_invalid`,
in which case the report lists what was skipped. `scan` streams, so validating a huge file keeps memory flat.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from training import chat_template
from training.errors import BackpropError

PREFERENCE_FORMATS = ("preference", "sharegpt_preference")
FORMATS = ("sharegpt", "openai", "alpaca", "prompt_completion", "chatml", "text", *PREFERENCE_FORMATS)
BAD_PAIR = "INPUT_DATASET_BAD_PAIR"
FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".md": "text"}
TEXT_ROLE = "text"  # a raw-text example is one message with this role
MAX_ERRORS_KEPT = 1000
_ROLE_ALIASES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "bot": "assistant", "chatgpt": "assistant", "system": "system", "developer": "system",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",  # tool results
}  # fmt: skip
BOM = "\ufeff"
_CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", re.S)


@dataclass
class Example:
    messages: list[dict[str, Any]]  # role, content; assistant turns may carry tool_calls, tool turns tool_call_id/name
    line: int
    format: str
    tools: list[dict[str, Any]] | None = None  # the tools the conversation may call (JSON schemas)
    path: str = ""  # the file (or hub dataset) it came from, for errors found later
    # Preference pairs (DPO, ORPO): `messages` is the prompt followed by the chosen reply, `rejected` the other reply
    # (assistant messages) to the same prompt, and `prompt_turns` how many of `messages` are the prompt.
    rejected: list[dict[str, Any]] | None = None
    prompt_turns: int = 0

    @property
    def is_preference(self) -> bool:
        return self.rejected is not None

    @property
    def prompt(self) -> list[dict[str, Any]]:
        return self.messages[: self.prompt_turns]

    @property
    def chosen(self) -> list[dict[str, Any]]:
        return self.messages[self.prompt_turns :]

    @property
    def is_raw_text(self) -> bool:
        return self.messages[0]["role"] == TEXT_ROLE

    @property
    def uses_tools(self) -> bool:
        return chat_template.uses_tools(self.messages, self.tools)

    def to_record(self) -> dict[str, Any]:
        """The example as a row that loads back into the same example (OpenAI format, or text)."""
        if self.is_raw_text:
            return {"text": self.messages[0]["content"]}
        if self.is_preference:
            return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected,
                    **({"tools": self.tools} if self.tools else {})}  # fmt: skip
        return {"messages": self.messages, **({"tools": self.tools} if self.tools else {})}


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
    pairs: int = 0  # valid preference rows (prompt, chosen, rejected)
    formats: Counter = field(default_factory=Counter)
    errors: list[RowError] = field(default_factory=list)
    error_count: int = 0
    turns: LengthStats = field(default_factory=LengthStats)
    tokens: LengthStats | None = None
    sha256: str | None = None  # of a hub split's rows (a local file is hashed as a file)

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
            "rows": self.rows, "valid_rows": self.valid_rows, "invalid_rows": self.error_count, "pairs": self.pairs,
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


def normalize(record: Any, fmt: str | None = None) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Return (format, messages, tools) for one parsed row, or raise RowProblem saying what is wrong. For a
    preference pair, messages are the prompt and the chosen answer; `normalize_example` keeps the rejected one too."""
    example = normalize_example(record, fmt)
    return example.format, example.messages, example.tools


def normalize_example(record: Any, fmt: str | None = None, line: int = 0, path: str = "") -> Example:
    """One parsed row as an Example (a preference row with its rejected answer), or raise RowProblem."""
    if not isinstance(record, dict):
        raise RowProblem(f"expected a JSON object, got {_type_name(record)}")
    fmt = fmt or detect_format(record)
    if fmt is None:
        keys = ", ".join(sorted(record)[:6]) or "no keys"
        raise RowProblem(f"no known format fits this row (keys: {keys})", code="INPUT_DATASET_UNKNOWN_FORMAT")
    if fmt in PREFERENCE_FORMATS:
        prompt, chosen, rejected, tools = _pair(record, fmt)
        return Example(prompt + chosen, line, fmt, tools, path, rejected=rejected, prompt_turns=len(prompt))
    messages = _NORMALIZERS[fmt](record)
    tools = _tools(record.get("tools")) if fmt in ("openai", "sharegpt") else None
    if fmt != "text":
        _check_chat(messages)
    return Example(messages, line, fmt, tools, path)


def detect_format(record: dict[str, Any]) -> str | None:
    if "chosen" in record or "rejected" in record:  # first: pairs also carry "prompt" or "conversations"
        return "sharegpt_preference" if "conversations" in record else "preference"
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


def _sharegpt(record: dict[str, Any]) -> list[dict[str, Any]]:
    return _sharegpt_turns(_require_list(record, "conversations"), "conversations")


def _sharegpt_turns(turns: list[Any], key: str, single: bool = False) -> list[dict[str, Any]]:
    messages = []
    for i, turn in enumerate(turns):
        where = key if single else f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RowProblem(f"{where} must be an object, got {_type_name(turn)}")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if speaker == "function_call":  # the value is the call: {"name": ..., "arguments": {...}} or a list of them
            calls = _json_value(text, where + ".value")
            messages.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(calls, where + ".value")})
            continue
        role = _role(speaker, where + ".from")
        content = _tool_result(text, where + ".value") if role == "tool" else _text(text, where + ".value")
        messages.append({"role": role, "content": content})
    return messages


def _openai(record: dict[str, Any]) -> list[dict[str, Any]]:
    return _openai_turns(_require_list(record, "messages"), "messages")


def _openai_turns(turns: list[Any], key: str, single: bool = False) -> list[dict[str, Any]]:
    messages = []
    for i, turn in enumerate(turns):
        where = key if single else f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RowProblem(f"{where} must be an object, got {_type_name(turn)}")
        role = _role(turn.get("role"), where + ".role")
        content = turn.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                    raise RowProblem(f"{where}.content[{j}] is a '{kind}' part; only text parts can be trained")
                parts.append(_text(part.get("text"), f"{where}.content[{j}].text"))
            content = "".join(parts)
        calls = turn.get("tool_calls") or ([turn["function_call"]] if turn.get("function_call") else None)
        message: dict[str, Any] = {"role": role}
        if calls is not None:
            if role != "assistant":
                raise RowProblem(f"{where}: only assistant turns can call tools, this one is '{role}'")
            message["content"] = "" if content is None else _text(content, where + ".content")
            message["tool_calls"] = _tool_calls(calls, where + ".tool_calls")
        elif role == "tool":
            message["content"] = _tool_result(content, where + ".content")
            for key in ("tool_call_id", "name"):  # some templates show which call a result answers
                if isinstance(turn.get(key), str):
                    message[key] = turn[key]
        else:
            message["content"] = _text(content, where + ".content")
        messages.append(message)
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


# ---------------------------------------------------------------- preference pairs

Messages = list[dict[str, Any]]


def _pair(record: dict[str, Any], fmt: str) -> tuple[Messages, Messages, Messages, list[dict[str, Any]] | None]:
    """(prompt, chosen, rejected, tools) of a preference row; every problem with it is INPUT_DATASET_BAD_PAIR."""
    try:
        for key in ("chosen", "rejected"):
            if record.get(key) is None:
                raise RowProblem(f"'{key}' is missing: a preference row needs a chosen and a rejected answer")
        prompt, chosen, rejected = (_preference if fmt == "preference" else _sharegpt_preference)(record)
        _check_pair(prompt, chosen, rejected)
        tools = _tools(record.get("tools"))
        _check_chat(prompt + chosen)  # tool results follow tool calls, as in any conversation
    except RowProblem as problem:
        raise RowProblem(problem.reason, BAD_PAIR) from None
    return prompt, chosen, rejected, tools


def _preference(record: dict[str, Any]) -> tuple[Messages, Messages, Messages]:
    value = record.get("prompt")
    if value is None:
        if isinstance(record["chosen"], list) and isinstance(record["rejected"], list):
            return _implicit_prompt(_openai_turns(record["chosen"], "chosen"), _openai_turns(record["rejected"], "rejected"))
        raise RowProblem("'prompt' is missing (or give chosen and rejected as whole conversations that share it)")
    if isinstance(value, str):
        prompt = [{"role": "user", "content": value}]
    elif isinstance(value, dict):
        prompt = _openai_turns([value], "prompt", single=True)
    elif isinstance(value, list):
        prompt = _openai_turns(value, "prompt")
    else:
        raise RowProblem(f"'prompt' must be a string or a list of messages, got {_type_name(value)}")
    chosen = _answer(record["chosen"], "chosen", _openai_turns)
    return _with_system(record, prompt), chosen, _answer(record["rejected"], "rejected", _openai_turns)


def _sharegpt_preference(record: dict[str, Any]) -> tuple[Messages, Messages, Messages]:
    prompt = _with_system(record, _sharegpt_turns(_require_list(record, "conversations"), "conversations"))
    return prompt, _answer(record["chosen"], "chosen", _sharegpt_turns), _answer(record["rejected"], "rejected", _sharegpt_turns)


def _answer(value: Any, key: str, parse: Any) -> Messages:
    """An answer as assistant messages: a string, one message (its role may be left out) or a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        message = value if "role" in value or "from" in value else {"role": "assistant", **value}
        return parse([message], key, single=True)
    if isinstance(value, list):
        return parse(value, key)
    raise RowProblem(f"'{key}' must be a string, a message or a list of messages, got {_type_name(value)}")


def _implicit_prompt(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """TRL's implicit prompt: the turns both conversations start with; the answers are what follows the last of
    them that is not the assistant's (a shared opening of the answer stays part of both answers)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n and chosen[n - 1]["role"] == "assistant":
        n -= 1
    if n == 0:
        raise RowProblem("without 'prompt', chosen and rejected must be conversations that start with the same prompt turns")
    return chosen[:n], chosen[n:], rejected[n:]


def _with_system(record: dict[str, Any], prompt: Messages) -> Messages:
    """A row-level "system" (LLaMA-Factory, Orca pairs) opens the prompt unless the prompt has its own."""
    system = record.get("system")
    if isinstance(system, str) and system.strip() and not (prompt and prompt[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *prompt]
    return prompt


def _check_pair(prompt: Messages, chosen: Messages, rejected: Messages) -> None:
    if not prompt or (prompt[-1]["role"] == "user" and not prompt[-1]["content"].strip()):
        raise RowProblem("the prompt is empty")
    if prompt[-1]["role"] not in ("user", "tool"):
        raise RowProblem(f"the prompt must end with a user turn (or a tool result), but its last turn is '{prompt[-1]['role']}'")
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        for i, message in enumerate(answer):
            if message["role"] != "assistant":
                where = f"'{key}'" if len(answer) == 1 else f"'{key}[{i}]'"
                raise RowProblem(f"{where} is a '{message['role']}' turn; an answer holds assistant turns only")
        if not any(m["content"].strip() or m.get("tool_calls") for m in answer):
            raise RowProblem(f"the {key} answer is empty")
    if _reply_key(chosen) == _reply_key(rejected):
        raise RowProblem("chosen and rejected are the same answer: a pair needs two different answers")


def _reply_key(answer: Messages) -> list[tuple[str, str]]:
    return [(m["content"].strip(), json.dumps(m.get("tool_calls"), sort_keys=True)) for m in answer]


def _json_messages_cell(value: str) -> Any:
    """A CSV cell of a preference row holding a message or a message list as JSON (as pandas writes them); any
    other text, JSON-looking or not, stays the text it is."""
    if not value.lstrip().startswith(("{", "[")):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return value
    items = parsed if isinstance(parsed, list) else [parsed]
    if items and all(isinstance(m, dict) and ("role" in m or "from" in m) for m in items):
        return parsed
    return value


def _check_chat(messages: list[dict[str, Any]]) -> None:
    if not messages:
        raise RowProblem("the conversation is empty")
    if not any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in messages):
        raise RowProblem("no assistant turn", code="INPUT_DATASET_NO_ASSISTANT_TURN")
    for i, message in enumerate(messages):
        if message["role"] == "tool":
            before = messages[i - 1] if i else None
            if before is None or not (before["role"] == "tool" or before.get("tool_calls")):
                raise RowProblem(f"turn {i + 1} is a tool result, but the turn before it calls no tool")


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI tool calls, with `arguments` parsed: templates render them with `tojson`, and a JSON string would be
    rendered as one quoted string instead of an object."""
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise RowProblem(f"'{where}' is empty")
    result = []
    for j, call in enumerate(calls):
        here = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise RowProblem(f"'{here}' must be an object, got {_type_name(call)}")
        function = call.get("function", call)  # {"function": {"name", "arguments"}} or the flat {"name", "arguments"}
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RowProblem(f"'{here}' names no function (expected function.name)")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            arguments = _json_value(arguments, f"{here}.function.arguments") if arguments.strip() else {}
        if not isinstance(arguments, dict):
            raise RowProblem(f"'{here}.function.arguments' must be a JSON object, got {_type_name(arguments)}")
        entry: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        result.append(entry)
    return result


def _tool_result(value: Any, where: str) -> str:
    """A tool's output as text; structured results (objects, arrays, numbers) are kept as their JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        raise RowProblem(f"'{where}' must be the tool's output, got null")
    return json.dumps(value, ensure_ascii=False)


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """The row's tool definitions: a list of JSON schemas ({"type": "function", "function": {...}} or bare), or a
    JSON string holding one (as many agent datasets store it)."""
    if value is None or value == "" or value == []:
        return None
    tools = _json_value(value, "tools") if isinstance(value, str) else value
    if not isinstance(tools, list):
        raise RowProblem(f"'tools' must be a list of tool definitions, got {_type_name(tools)}")
    for j, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowProblem(f"'tools[{j}]' must be a tool definition with a name (function.name)")
    return tools or None


def _json_value(value: Any, where: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise RowProblem(f"'{where}' is not valid JSON: {exc.msg} (column {exc.colno})") from None


def _require_list(record: dict[str, Any], key: str) -> list[Any]:
    value = record.get(key)
    if not isinstance(value, list):
        raise RowProblem(f"'{key}' must be a list, got {_type_name(value)}")
    return value


def _role(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.lower() not in _ROLE_ALIASES:
        raise RowProblem(f"{where}: unknown role {value!r} (use system, user/human, assistant/gpt, tool)")
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


# A dataset the `datasets` library loads: a hub id or a local dataset folder, then an optional :config, then an
# optional @split (slices like train[:1000] allowed).
_SELECTION = re.compile(r"(?P<repo>.+?)(?::(?P<config>[\w.-]+))?(?:@(?P<split>[\w.-]+(?:\[[\d%:+-]*\])?))?")
_HUB_REPO = re.compile(r"[\w][\w.-]*/[\w][\w.-]*")
_HF_PATH = re.compile(r"hf://datasets/(?P<repo>[^@]+)@(?P<revision>[^/]+)/(?P<path>.+)")  # a data file, as the builder names it


@dataclass(frozen=True)
class HubDataset:
    """One split of one config of a hub dataset (or of a local folder laid out like one: a clone of a hub dataset
    repository), loaded with the `datasets` library: every shard of the split, configs from its README."""

    repo: str
    config: str | None = None
    split: str = "train"
    streaming: bool = False  # read rows over the network instead of downloading and caching the split first

    def __str__(self) -> str:
        return self.repo + (f":{self.config}" if self.config else "") + f"@{self.split}"

    @property
    def is_local(self) -> bool:
        return Path(self.repo).is_dir()


def parse_hub_id(text: str, streaming: bool = False) -> HubDataset | None:
    """'owner/name', 'owner/name:config', 'owner/name@split', 'owner/name:config@split[:100]', or the same with a local
    dataset folder in place of owner/name; None when the text names neither."""
    match = _SELECTION.fullmatch(text.strip())
    if match is None:
        return None
    repo = match["repo"]
    folder = Path(repo).expanduser()
    if folder.is_dir():
        repo = str(folder.resolve())
    elif not _HUB_REPO.fullmatch(repo) or repo.endswith(tuple(FILE_TYPES)):  # "data/x.jsonl" is a missing file
        return None
    return HubDataset(repo, match["config"], match["split"] or "train", streaming)


def resolve_path(source: str | Path | HubDataset, streaming: bool = False) -> Path | HubDataset:
    """A local file, or the hub dataset (or local dataset folder) a text names; nothing is downloaded yet."""
    if isinstance(source, HubDataset):
        return source
    path = Path(source).expanduser()
    if path.is_file():
        return path
    hub = parse_hub_id(str(source), streaming)
    if hub is not None:
        return hub
    raise BackpropError("INPUT_DATASET_NOT_FOUND", path=source)


def hub_validation(source: str | Path) -> str | None:
    """'owner/name[:config]@validation' when `source` is a hub dataset taken whole from its train split (the default)
    and the dataset has a validation split (held out by its authors: training evaluates on it); else None."""
    hub = None if isinstance(source, Path) or Path(source).expanduser().is_file() else parse_hub_id(source)
    if hub is None or hub.split != "train":
        return None
    validation = HubDataset(hub.repo, hub.config, "validation")
    try:
        with _hub_errors(validation):
            _open_hub(validation)  # the split's files come into the cache, as loading it next would anyway
    except BackpropError as exc:
        if exc.code == "INPUT_DATASET_HUB_SELECTION":  # no such split
            return None
        raise
    return str(validation)


def _hub_rows(hub: HubDataset) -> Iterator[tuple[int, Any]]:
    """(row number, row) over the whole split, shard after shard; failures become coded errors."""
    with _hub_errors(hub):
        rows = _open_hub(hub)
        yield from enumerate(rows, start=1)


def fetch_hub_dataset(source: str | Path | HubDataset, on_progress: Callable[[int, int], None] | None = None) -> bool:
    """Fetch the data files of a hub dataset's config into the HF cache, with `on_progress(done, total)` bytes and
    resuming partial files (training/download.py), before the `datasets` library loads them from there. Every split's
    files: loading one split prepares them all. False, with nothing fetched, for a file, a local folder, a streamed
    split, offline, or data files the library's builder does not name on the hub: loading then goes its own way (and
    reports what is wrong, an unknown config or split included)."""
    hub = source if isinstance(source, HubDataset) else None if Path(source).expanduser().is_file() else parse_hub_id(str(source))
    if hub is None or hub.is_local or hub.streaming or _offline() or (found := _data_files(hub)) is None:
        return False
    from training.download import download_dataset_files

    revision, files = found
    download_dataset_files(hub.repo, files, revision, on_progress)
    return True


def _data_files(hub: HubDataset) -> tuple[str, list[str]] | None:
    """(revision, paths in the repo) of the data files of the selected config, read from the dataset's README and file
    listing without downloading data; None when the library cannot tell, the selected split is not among them, or they
    are not plain files of the repo."""
    datasets = _datasets_library()
    try:
        data_files = datasets.load_dataset_builder(hub.repo, hub.config).config.data_files or {}
    except Exception:  # an unknown config, an unreachable hub: loading says so with its coded error
        return None
    names = [name.partition("[")[0].strip() for name in hub.split.split("+")]
    if not names or any(name not in data_files for name in names):
        return None
    matches = [_HF_PATH.fullmatch(str(url)) for urls in data_files.values() for url in urls]
    if not matches or not all(m and m["repo"] == hub.repo for m in matches):
        return None
    revisions = {unquote(m["revision"]) for m in matches}
    return (revisions.pop(), [m["path"] for m in matches]) if len(revisions) == 1 else None


def _datasets_library() -> Any:
    # An unreachable hub must fail in seconds, not after minutes of retries.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _open_hub(hub: HubDataset) -> Any:
    datasets = _datasets_library()
    split, window = hub.split, None
    if hub.streaming and "[" in split:  # streamed splits cannot be sliced by the library: take the rows ourselves
        split, window = _stream_window(split)
    rows = datasets.load_dataset(hub.repo, hub.config, split=split, streaming=hub.streaming)
    if window is not None:
        rows = rows.skip(window[0])
        if window[1] is not None:
            rows = rows.take(window[1] - window[0])
    return rows


def _stream_window(split: str) -> tuple[str, tuple[int, int | None]]:
    name, _, spec = split.partition("[")
    start, colon, stop = spec.rstrip("]").partition(":")
    if "%" in spec or not colon or not all(x.strip().isdigit() for x in (start, stop) if x.strip()):
        raise BackpropError("INPUT_DATASET_HUB_SELECTION", dataset=split,
                            reason="a streamed split takes row slices only, like train[:1000] or train[100:200]")  # fmt: skip
    return name, (int(start or 0), int(stop) if stop.strip() else None)


@contextmanager
def _hub_errors(hub: HubDataset) -> Iterator[None]:
    """Map what `datasets` and the hub client raise (many types) to coded errors."""
    try:
        yield
    except BackpropError:
        raise
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if isinstance(exc, ValueError) and re.search(r"(?i)split|config", reason):
            raise BackpropError("INPUT_DATASET_HUB_SELECTION", dataset=str(hub), reason=reason) from exc
        if hub.is_local:
            message = f"{hub.repo}: the datasets library cannot read this folder ({reason})"
            raise BackpropError("INPUT_DATASET_UNSUPPORTED_FILE", path=hub.repo, suffix="folder", message=message) from exc
        if _offline():
            reason = f"offline (HF_HUB_OFFLINE) and not in the local cache: {reason}"
        elif type(exc).__name__ == "DatasetNotFoundError":
            message = f"Dataset not found on the hub: {reason}"
            raise BackpropError("INPUT_DATASET_NOT_FOUND", path=str(hub), message=message) from exc
        raise BackpropError("DEP_DATASET_DOWNLOAD_FAILED", dataset=str(hub), reason=reason) from exc


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def iter_rows(path: Path | HubDataset) -> Iterator[tuple[int, Any | RowError]]:
    """Yield (line, parsed record) or (line, RowError) for every row of a file (for parquet and hub datasets: the
    row number), streaming where possible."""
    if isinstance(path, HubDataset):
        yield from _hub_rows(path)
        return
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
    if not head.removeprefix(BOM.encode()).strip():
        raise BackpropError("INPUT_DATASET_EMPTY", path=path)
    if file_type != "parquet" and head.startswith((b"\xff\xfe", b"\xfe\xff")):  # Windows "Unicode" text
        raise BackpropError("INPUT_DATASET_ENCODING", path=path, line=1, reason="the file is UTF-16; save it as UTF-8")
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


def _lines(path: Path) -> Iterator[tuple[int, str | RowError]]:
    """Decoded lines without their line end (LF or CRLF), a leading byte-order mark removed, streaming."""
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            text = _decode_line(raw, line)
            if isinstance(text, str):
                text = text.removesuffix("\n").removesuffix("\r")
                if line == 1:
                    text = text.removeprefix(BOM)
            yield line, text


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any | RowError]]:
    for line, text in _lines(path):
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
        text = raw.decode("utf-8-sig")  # "-sig": a leading byte-order mark is dropped
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
        if isinstance(record, dict) and ("chosen" in record or "rejected" in record):
            for key in ("prompt", "chosen", "rejected"):
                if isinstance(record.get(key), str):
                    record[key] = _json_messages_cell(record[key])
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
    for line, text in _lines(path):
        if isinstance(text, RowError):
            yield line, text
            continue
        if text.strip():
            if not block:
                block_start = line
            block.append(text)
        elif block:
            yield block_start, {"text": "\n".join(block)}
            block = []
    if block:
        yield block_start, {"text": "\n".join(block)}


# ---------------------------------------------------------------- the public functions


def scan(
    source: str | Path | HubDataset,
    fmt: str | None = None,
    tokenizer: Any = None,
    keep: list[Example] | None = None,
    *,
    count_tokens: bool = True,
    streaming: bool = False,
) -> DatasetReport:
    """Validate a dataset in one streaming pass. Examples are appended to `keep` when a list is given.

    With a tokenizer, each conversation is also checked against the model's chat template (tool calls it cannot
    render, templates that raise) and, unless `count_tokens` is off, its token length is counted. `streaming`
    reads a hub dataset over the network instead of downloading and caching its split first.
    """
    if fmt is not None and fmt not in FORMATS:
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"unknown format '{fmt}'", hint=f"Use one of: {', '.join(FORMATS)}")
    path = resolve_path(source, streaming)
    hub = isinstance(path, HubDataset)
    report = DatasetReport(str(path), "hub" if hub else FILE_TYPES.get(path.suffix.lower(), "?"))
    if tokenizer is not None and count_tokens:
        report.tokens = LengthStats()
    digest = hashlib.sha256() if hub else None  # a hub split has no one file to hash: hash its rows
    for line, record in iter_rows(path):
        report.rows += 1
        if digest is not None:
            digest.update(json.dumps(record, sort_keys=True, default=str).encode() + b"\n")
        if isinstance(record, RowError):
            report.add_error(record)
            continue
        try:
            example = normalize_example(record, fmt, line, report.path)
            if tokenizer is not None and not example.is_raw_text:
                _check_template(tokenizer, example)
        except RowProblem as problem:
            report.add_error(RowError(line, problem.code, problem.reason))
            continue
        report.valid_rows += 1
        if example.is_preference:
            report.pairs += 1
        report.formats[example.format] += 1
        report.turns.add(len(example.messages))
        if report.tokens is not None:
            report.tokens.add(len(render_tokens(tokenizer, example)))
        if keep is not None:
            keep.append(example)
    if report.rows == 0:
        raise BackpropError("INPUT_DATASET_EMPTY", path=path)
    report.sha256 = digest.hexdigest() if digest is not None else None
    return report


def _check_template(tokenizer: Any, example: Example) -> None:
    """The model's chat template must render the conversation; for a pair, both (prompt + chosen, prompt + rejected)."""
    conversations = [("", example.messages)]
    if example.rejected is not None:
        conversations.append(("the rejected conversation: ", example.prompt + example.rejected))
    for label, messages in conversations:
        found = chat_template.problem(tokenizer, messages, example.tools)
        if found is not None:
            raise RowProblem(label + found[1], code=found[0])


def load_dataset(
    source: str | Path | HubDataset,
    fmt: str | None = None,
    skip_invalid: bool = False,
    *,
    tokenizer: Any = None,
    streaming: bool = False,
) -> Dataset:
    """Every valid example of a dataset; bad rows raise (with file:line) unless `skip_invalid`.

    Give the model's tokenizer to refuse, row by row, conversations its chat template cannot render (tool calls).
    """
    examples: list[Example] = []
    report = scan(source, fmt, tokenizer, keep=examples, count_tokens=False, streaming=streaming)
    path = report.path
    if report.error_count and not skip_invalid:
        first = report.errors[0]
        more = f" (and {report.error_count - 1} more bad rows)" if report.error_count > 1 else ""
        raise BackpropError(first.code, message=first.describe(path) + more, path=path, line=first.line, reason=first.reason)
    if not examples:
        raise BackpropError("INPUT_DATASET_EMPTY", path=path, message=f"{path}: no valid rows ({report.error_count} bad)")
    return Dataset(examples, report, report.sha256 or file_sha256(Path(path)))


def require_preference(dataset: Dataset, method: str) -> None:
    """Refuse (INPUT_DATASET_NOT_PREFERENCE) a dataset for a preference method (dpo, orpo) unless every example is a
    pair; the reason names the first row that is not one."""
    for example in dataset.examples:
        if not example.is_preference:
            where = "row" if dataset.report.file_type in ("parquet", "hub") else "line"
            reason = f"{where} {example.line} is a {example.format} row, not a pair (prompt, chosen, rejected)"
            raise BackpropError("INPUT_DATASET_NOT_PREFERENCE", path=dataset.report.path, method=method, reason=reason,
                                line=example.line)  # fmt: skip


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
    """The token ids an example trains on (chat template applied; raw text as is). For a preference pair, the
    prompt and the chosen answer: what SFT trains on, and what the token statistics of a pair file count."""
    if example.is_raw_text:
        return tokenizer(example.messages[0]["content"], add_special_tokens=False)["input_ids"]
    text = chat_template.render(tokenizer, example.messages, example.tools)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
