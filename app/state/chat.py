"""The Chat page: talk to a tuned run (its adapter, merged or GGUF exports, or any folder), beside its base model if asked."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import reflex as rx

from app.state.errors import handler
from app.state.form import setter
from training.config import load_settings
from training.generate import load_chat_model
from training.runs import Registry

_models: dict[tuple[str, bool], Any] = {}  # loaded once per process: (source, base?) -> ChatModel
_lock = threading.Lock()


def _model(source: str, base: bool) -> Any:
    with _lock:
        if (source, base) not in _models:
            _models[(source, base)] = load_chat_model(source, base=base)
        return _models[(source, base)]


class Stream:
    """One reply generated in a thread: its pieces so far, and how it ended (done; failed with an exception)."""

    def __init__(self, source: str, base: bool, messages: list[dict]):
        self.pieces: list[str] = []
        self.failure: Exception | None = None
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(source, base, messages), daemon=True).start()

    def _run(self, source: str, base: bool, messages: list[dict]) -> None:
        try:
            for piece in _model(source, base).stream(messages, max_new_tokens=200):
                self.pieces.append(piece)
        except Exception as exc:  # raised again in the event handler, which shows it next to Send
            self.failure = exc
        finally:
            self.done.set()


def chat_sources(registry: Registry) -> dict[str, list[str]]:
    """What can be chatted with, by label: every finished run's adapter, and its merged and GGUF exports.
    Each label maps to [what to load, the run whose base model answers beside it]."""
    sources: dict[str, list[str]] = {}
    for run in registry.list():
        if run.status == "completed" and (run.path / "adapter").exists():
            sources[f"{run.id} · adapter"] = [run.id, run.id]
            for e in registry.exports(run.id):
                if e["format"] == "gguf" and e["file"] and Path(e["file"]).is_file():
                    sources[f"{run.id} · gguf {e['quantization']}"] = [e["file"], run.id]
                elif e["format"] == "merged" and Path(e["path"]).is_dir():
                    sources[f"{run.id} · merged"] = [e["path"], run.id]
    return sources


class ChatState(rx.State):
    sources: list[str] = []  # labels, as the picker shows them
    source: str = ""  # the label picked
    folder: str = ""  # or a folder or .gguf file typed in: it wins over the picker
    compare: bool = False
    _targets: dict[str, list[str]] = {}
    prompt: str = ""
    messages: list[dict[str, str]] = []  # role, content, base (the base model's reply to the same prompt)
    busy: bool = False
    error: str = ""

    @handler()
    def load(self):
        self._targets = chat_sources(Registry(load_settings().home))
        self.sources = list(self._targets)
        wanted = self.router.url.query_parameters.get("source", "")  # /chat?source=ID from a run's page
        if f"{wanted} · adapter" in self._targets:
            self.source, self.folder = f"{wanted} · adapter", ""
        elif self.source not in self._targets:
            self.source = self.sources[0] if self.sources else ""

    set_source = setter("source")
    set_folder = setter("folder")
    set_compare = setter("compare", bool)
    set_prompt = setter("prompt")

    @handler()
    def clear(self):
        self.messages, self.error = [], ""

    @handler(background=True, busy="busy")
    async def send(self):
        async with self:
            prompt = self.prompt.strip()
            if not prompt or not (self.folder.strip() or self.source in self._targets):
                return
            self.prompt = ""
            history = [{"role": m["role"], "content": m["content"]} for m in self.messages]
            self.messages = [*self.messages, {"role": "user", "content": prompt, "base": ""},
                             {"role": "assistant", "content": "", "base": ""}]  # fmt: skip
            folder = self.folder.strip()
            source, base_of = [folder, folder] if folder else self._targets[self.source]
            compare = self.compare
        asked = [*history, {"role": "user", "content": prompt}]
        streams = {"content": Stream(source, False, asked)}
        if compare:
            streams["base"] = Stream(base_of, True, asked)
        finished = False
        while not finished:
            await asyncio.sleep(0.1)
            finished = all(s.done.is_set() for s in streams.values())
            async with self:
                last = dict(self.messages[-1])
                for key, stream in streams.items():
                    last[key] = "".join(stream.pieces)
                self.messages = [*self.messages[:-1], last]
        for stream in streams.values():
            if stream.failure is not None:
                raise stream.failure
