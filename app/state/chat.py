"""The Chat page: talk to a tuned run (its adapter, merged or GGUF exports, or any folder), beside its base model if asked."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import reflex as rx

from training.config import load_settings
from training.errors import BackpropError
from training.runs import Registry

_models: dict[tuple[str, bool], Any] = {}  # loaded once per process: (source, base?) -> ChatModel
_lock = threading.Lock()


def _model(source: str, base: bool) -> Any:
    from training.generate import load_chat_model

    with _lock:
        if (source, base) not in _models:
            _models[(source, base)] = load_chat_model(source, base=base)
        return _models[(source, base)]


def _stream_into(pieces: list[str], done: threading.Event, source: str, base: bool, messages: list[dict]) -> None:
    try:
        for piece in _model(source, base).stream(messages, max_new_tokens=200):
            pieces.append(piece)
    except BackpropError as exc:
        pieces.append(f"\n[{exc.code}] {exc.message}")
    finally:
        done.set()


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

    @rx.event
    def load(self):
        self._targets = chat_sources(Registry(load_settings().home))
        self.sources = list(self._targets)
        wanted = self.router.url.query_parameters.get("source", "")  # /chat?source=ID from a run's page
        if f"{wanted} · adapter" in self._targets:
            self.source, self.folder = f"{wanted} · adapter", ""
        elif self.source not in self._targets:
            self.source = self.sources[0] if self.sources else ""

    @rx.event
    def set_field(self, name: str, value: str | bool):
        setattr(self, name, value)

    @rx.event
    def clear(self):
        self.messages = []

    @rx.event(background=True)
    async def send(self):
        async with self:
            prompt = self.prompt.strip()
            if self.busy or not prompt or not (self.folder.strip() or self.source in self._targets):
                return
            self.busy, self.prompt = True, ""
            history = [{"role": m["role"], "content": m["content"]} for m in self.messages]
            self.messages = [*self.messages, {"role": "user", "content": prompt, "base": ""},
                             {"role": "assistant", "content": "", "base": ""}]  # fmt: skip
            folder = self.folder.strip()
            source, base_of = [folder, folder] if folder else self._targets[self.source]
            compare = self.compare
        asked = [*history, {"role": "user", "content": prompt}]
        streams = {"content": ([], threading.Event())}
        if compare:
            streams["base"] = ([], threading.Event())
        for key, (pieces, done) in streams.items():
            model, base = (base_of, True) if key == "base" else (source, False)
            threading.Thread(target=_stream_into, args=(pieces, done, model, base, asked), daemon=True).start()
        while True:
            await asyncio.sleep(0.1)
            finished = all(done.is_set() for _, done in streams.values())
            async with self:
                last = dict(self.messages[-1])
                for key, (pieces, _) in streams.items():
                    last[key] = "".join(pieces)
                self.messages = [*self.messages[:-1], last]
                if finished:
                    self.busy = False
                    return
