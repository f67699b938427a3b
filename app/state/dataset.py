"""The Dataset page: upload into the sandbox, detect the format, preview, statistics, every bad line, a split."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import reflex as rx

from app.folders import datasets_dir
from app.state.errors import handler
from app.state.form import setter
from app.state.train import TrainState
from training.config import load_settings
from training.datasets import FILE_TYPES, Example, scan, split
from training.errors import BackpropError
from training.models import load_tokenizer, resolve_model
from training.row_view import view_line
from training.sandbox import inside, safe_name

PREVIEW_ROWS = 5
CHUNK = 1 << 20


def analyze(path: Path, model: str) -> dict:
    """Format, counts, token lengths (with `model`'s tokenizer), duplicates, bad lines and a preview of a dataset."""
    examples: list[Example] = []
    report = scan(path, tokenizer=load_tokenizer(resolve_model(model)), keep=examples)
    digests = [hashlib.sha256(json.dumps([e.messages, e.rejected], sort_keys=True).encode()).hexdigest() for e in examples]
    pairs = [e for e in examples if e.is_preference]
    tokens = report.tokens.to_dict() if report.tokens else {"histogram": {}}
    peak = max(tokens["histogram"].values(), default=1)
    return {
        "format": report.format or "unknown",
        "rows": report.rows, "valid": report.valid_rows, "invalid": report.error_count,
        "duplicates": len(digests) - len(set(digests)),
        "turns": report.turns.to_dict(), "tokens": {k: v for k, v in tokens.items() if k != "histogram"},
        "histogram": [{"bucket": k, "rows": str(v), "width": f"{max(2, round(100 * v / peak))}%"}
                      for k, v in tokens["histogram"].items()],
        "errors": [{"line": str(e.line), "reason": e.reason, "code": e.code} for e in report.errors],
        "preview": [_shown(e.messages) for e in examples[:PREVIEW_ROWS] if not e.is_preference],
        "pair_preview": [{"prompt": _shown(e.prompt), "chosen": _shown(e.chosen), "rejected": _shown(e.rejected or [])}
                         for e in pairs[:PREVIEW_ROWS]],
        "examples": len(examples), "pairs": len(pairs), "first_line": examples[0].line if examples else "",
    }  # fmt: skip


def row_view(path: Path, model: str, line: int, max_seq_length: int, response_only: bool) -> dict:
    """What the model sees of the row on `line`: text pieces by kind (trained, context, cut), counts, problem or note."""
    view = view_line(path, line, load_tokenizer(resolve_model(model)), max_seq_length, response_only)
    summary = (f"line {view.line}: {view.tokens} tokens, {view.trained_tokens} trained" if not view.problem
               else f"line {view.line} is dropped")  # fmt: skip
    return {"pieces": [{"text": p.text, "kind": p.kind} for p in view.pieces], "summary": summary,
            "problem": view.problem, "note": view.note}  # fmt: skip


def _shown(messages: list[dict]) -> list[dict[str, str]]:
    """Messages as the preview shows them: role and the start of the content."""
    return [{"role": m["role"], "content": (m.get("content") or "")[:600]} for m in messages]


def dataset_files() -> list[str]:
    """The datasets already in the sandbox, by name."""
    return sorted(p.name for p in datasets_dir().iterdir() if p.suffix.lower() in FILE_TYPES)


class DatasetState(rx.State):
    files: list[str] = []
    selected: str = ""
    model: str = "demo"
    report: dict[str, str] = {}
    errors: list[dict[str, str]] = []
    preview: list[list[dict[str, str]]] = []
    pair_preview: list[dict[str, list[dict[str, str]]]] = []  # preference data: {"prompt", "chosen", "rejected"} messages
    histogram: list[dict[str, str]] = []
    validation: str = "0.1"
    split_text: str = ""
    message: str = ""
    error: str = ""
    busy: bool = False
    max_upload_bytes: int = load_settings().ui.max_upload_mb * 2**20
    # "What the model sees": one row as training encodes it (training/row_view.py)
    row_line: str = ""
    row_pieces: list[dict[str, str]] = []  # {"text", "kind": trained | context | cut}
    row_summary: str = ""
    row_problem: str = ""
    row_note: str = ""
    row_error: str = ""
    row_busy: bool = False

    @handler()
    async def load(self):
        self.files = dataset_files()
        self.model = (await self.get_state(TrainState)).model.strip() or "demo"  # the model picked for training

    set_model = setter("model")
    set_row_line = setter("row_line")

    @handler()
    async def handle_upload(self, files: list[rx.UploadFile]):
        """Store each upload in the sandbox under a safe name, refusing other file types and oversize files."""
        self.error = self.message = ""
        limit = load_settings().ui.max_upload_mb * 2**20
        for upload in files:
            name = safe_name(upload.name or "dataset")
            if Path(name).suffix.lower() not in FILE_TYPES:
                self.error = str(BackpropError("UI_UPLOAD_REJECTED", name=upload.name, reason="not a dataset file type"))
                continue
            target = inside(datasets_dir(), name)
            partial, size = target.with_name(f".{target.name}.partial"), 0
            with partial.open("wb") as out:
                while chunk := await upload.read(CHUNK):
                    size += len(chunk)
                    if size > limit:
                        break
                    out.write(chunk)
            if size > limit:
                partial.unlink(missing_ok=True)
                mb = load_settings().ui.max_upload_mb
                self.error = str(BackpropError("UI_UPLOAD_REJECTED", name=upload.name, reason=f"larger than {mb} MB"))
                continue
            os.replace(partial, target)
            self.message = f"Uploaded {name} ({size / 1024:.1f} KB)."
            self.selected = name
        self.files = dataset_files()
        if self.selected:
            return DatasetState.inspect

    @handler()
    def rejected(self, rejections: list[dict]):
        """The browser refused a file (type or size) before uploading it: say which and why, with the code."""
        reasons = []
        for r in rejections:
            file = r.get("file")
            name = file.get("path") or file.get("name") if isinstance(file, dict) else "the file"
            why = ", ".join(str(e.get("message", "")) for e in r.get("errors", []) if isinstance(e, dict))
            reasons.append(str(BackpropError("UI_UPLOAD_REJECTED", name=name, reason=why or "not accepted")))
        self.error = " ".join(reasons)

    @handler()
    def select(self, name: str):
        self.selected = name
        return DatasetState.inspect

    @handler()
    def set_validation(self, value: str):
        self.validation = value
        self._describe_split()

    @handler(background=True, busy="busy")
    async def inspect(self):
        async with self:
            if not self.selected:
                return
            self.report, self.errors, self.preview, self.pair_preview, self.histogram = {}, [], [], [], []
            path, model = inside(datasets_dir(), self.selected), self.model
        report = await asyncio.to_thread(analyze, path, model)
        async with self:
            self.errors, self.preview, self.histogram = report.pop("errors"), report.pop("preview"), report.pop("histogram")
            self.pair_preview = report.pop("pair_preview")
            turns, tokens = report.pop("turns"), report.pop("tokens")
            self.report = {k: str(v) for k, v in report.items()} | {"tokenizer": model} | {
                "turns": f"{turns['min']}-{turns['max']} (mean {turns['mean']})" if turns["count"] else "-",
                "tokens": f"{tokens['min']}-{tokens['max']} (mean {tokens['mean']}, total {tokens['total']})"
                if tokens.get("count") else "-",
            }  # fmt: skip
            self._describe_split()
            self.row_line = str(report.get("first_line", ""))
            self._clear_row()
        return DatasetState.show_row  # after this handler lets go of `busy`: a model change stays possible meanwhile

    @handler(background=True, busy="row_busy", error="row_error")
    async def show_row(self):
        """The row on line `row_line` as the model will see it, with the Train page's max length and loss masking."""
        async with self:
            self._clear_row()
            if not self.selected or not self.row_line.strip():
                return
            if not self.row_line.strip().isdigit() or int(self.row_line) < 1:
                raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"'{self.row_line}' is not a line number",
                                    hint="Give the line of the row in the file: 1, 2, ...")  # fmt: skip
            train = await self.get_state(TrainState)
            # What the run will use: the length typed on the Train page, else the one its plan fills in.
            typed = train.max_seq_length.strip() or train.placeholders.get("max_seq_length", "").strip()
            max_len = int(typed) if typed.isdigit() else load_settings().training.max_seq_length
            args = (inside(datasets_dir(), self.selected), self.model, int(self.row_line), max_len, train.response_only)
        view = await asyncio.to_thread(row_view, *args)
        async with self:
            self.row_pieces, self.row_summary = view["pieces"], view["summary"]
            self.row_problem, self.row_note = view["problem"], view["note"]

    def _clear_row(self) -> None:
        self.row_pieces, self.row_summary, self.row_problem, self.row_note, self.row_error = [], "", "", "", ""

    def _describe_split(self) -> None:
        try:
            fraction = float(self.validation)
            n = int(self.report.get("examples", "0"))
            train, val = split([None] * n, fraction, 42) if n >= 2 and 0 < fraction < 1 else ([None] * n, [])  # type: ignore[list-item]
            self.split_text = f"{len(train)} rows to train on, {len(val)} held out for validation"
        except (ValueError, BackpropError) as exc:
            self.split_text = f"invalid split: {exc}"

    @handler()
    async def use_for_training(self):
        train = await self.get_state(TrainState)
        train.dataset = str(inside(datasets_dir(), self.selected))
        train.validation_split = self.validation
        if self.report.get("pairs", "0") != "0" and train.method == "sft":
            train.method = "dpo"  # preference pairs: train on them as such (ORPO can still be picked there)
        return rx.redirect("/")
