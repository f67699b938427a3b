"""The Chat page: talk to a tuned run (its adapter, or one of its GGUF exports), optionally beside its base model."""

from __future__ import annotations

import asyncio
import threading
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


class ChatState(rx.State):
    sources: list[str] = []
    source: str = ""
    compare: bool = False
    prompt: str = ""
    messages: list[dict[str, str]] = []  # role, content, base (the base model's reply to the same prompt)
    busy: bool = False

    @rx.event
    def load(self):
        registry = Registry(load_settings().home)
        sources = []
        for run in registry.list():
            if run.status == "completed" and (run.path / "adapter").exists():
                sources.append(run.id)
                sources += [e["file"] for e in registry.exports(run.id) if e["format"] == "gguf" and e["file"]]
        self.sources = sources
        if self.source not in sources:
            self.source = sources[0] if sources else ""

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
            if self.busy or not prompt or not self.source:
                return
            self.busy, self.prompt = True, ""
            history = [{"role": m["role"], "content": m["content"]} for m in self.messages]
            self.messages = [*self.messages, {"role": "user", "content": prompt, "base": ""},
                             {"role": "assistant", "content": "", "base": ""}]  # fmt: skip
            source, compare = self.source, self.compare and not self.source.endswith(".gguf")
        asked = [*history, {"role": "user", "content": prompt}]
        streams = {"content": ([], threading.Event())}
        if compare:
            streams["base"] = ([], threading.Event())
        for key, (pieces, done) in streams.items():
            threading.Thread(target=_stream_into, args=(pieces, done, source, key == "base", asked), daemon=True).start()
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
