"""The Chat page: talk to a tuned run (its adapter, merged or GGUF exports, or any folder), beside its base model if asked.

Side by side with a run's adapter, each finished pair of replies can be voted on ("tuned is better", "base is better",
or a better answer written by the user): every vote is a preference row in the sandbox's preferences/<run>.jsonl
(training.votes), and "Train on my votes" starts a DPO run from that adapter on them."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import reflex as rx

from app.folders import preferences_dir, runs_root
from app.state.errors import handler
from app.state.form import setter
from training import jobs
from training.config import load_settings, nest_options
from training.errors import BackpropError
from training.generate import load_chat_model
from training.runs import Registry
from training.votes import count_votes, dpo_options, record_vote, votes_file

ADAPTER = " · adapter"  # the label suffix of a run's adapter: the one source votes can train (DPO starts from it)
MIN_VOTES = 2

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


def turn(role: str, content: str, **extra: str) -> dict[str, str]:
    """One message of the page, with every key the page reads (the same keys for every message)."""
    return {"role": role, "content": content, "base": "", "run": "", "done": "", "same": "", "vote": "", **extra}


def _text(value: Any, name: str) -> str:
    if type(value) is not str:
        raise BackpropError("UI_EVENT_REFUSED", name=name, reason=f"it takes a str, not {type(value).__name__}")
    return value


class ChatState(rx.State):
    sources: list[str] = []  # labels, as the picker shows them
    source: str = ""  # the label picked
    folder: str = ""  # or a folder or .gguf file typed in: it wins over the picker
    compare: bool = False
    _targets: dict[str, list[str]] = {}
    prompt: str = ""
    # role, content, base (the base model's reply to the same prompt); on a reply also: run (the run whose adapter
    # answered, when its pair can be voted on), done ("1" once both replies ended well), same ("1" if they are equal),
    # vote (what was voted: tuned, base or user)
    messages: list[dict[str, str]] = []
    busy: bool = False
    error: str = ""
    vote_run: str = ""  # the run picked, when it is an adapter: its votes are counted and can be trained on
    votes: int = 0
    correcting: int = -1  # the reply a better answer is being written for
    correction: str = ""
    training: bool = False
    vote_error: str = ""

    @handler()
    def load(self):
        self._targets = chat_sources(Registry(load_settings().home))
        self.sources = list(self._targets)
        wanted = self.router.url.query_parameters.get("source", "")  # /chat?source=ID from a run's page
        if f"{wanted} · adapter" in self._targets:
            self.source, self.folder = f"{wanted} · adapter", ""
        elif self.source not in self._targets:
            self.source = self.sources[0] if self.sources else ""
        self._count_votes()

    set_compare = setter("compare", bool)
    set_prompt = setter("prompt")

    @handler()
    def set_source(self, value: str):
        self.source = _text(value, "source")
        self._count_votes()

    @handler()
    def set_folder(self, value: str):
        self.folder = _text(value, "folder")
        self._count_votes()

    def _count_votes(self) -> None:
        """The picked run (an adapter, nothing typed) and how many votes it has."""
        picked = self.source.endswith(ADAPTER) and not self.folder.strip() and self.source in self._targets
        self.vote_run = self._targets[self.source][0] if picked else ""
        self.votes = count_votes(votes_file(preferences_dir(), self.vote_run)) if self.vote_run else 0

    @handler()
    def clear(self):
        self.messages, self.error, self.vote_error = [], "", ""
        self.correcting, self.correction = -1, ""

    def _pair(self, index: Any) -> dict[str, str]:
        """The reply at `index`, if it is a finished pair not voted on yet (the browser sends the index)."""
        if type(index) is not int or not 0 < index < len(self.messages):
            raise BackpropError("UI_EVENT_REFUSED", name="vote", reason=f"there is no reply {index!r}")
        reply = self.messages[index]
        if reply["role"] != "assistant" or not reply["run"] or not reply["done"] or reply["vote"]:
            raise BackpropError("UI_EVENT_REFUSED", name="vote", reason=f"reply {index} cannot be voted on")
        return reply

    def _record(self, index: int, chosen: str, rejected: str, chosen_by: str, rejected_by: str) -> None:
        reply = self.messages[index]
        prompt = [{"role": m["role"], "content": m["content"]} for m in self.messages[:index]]
        record_vote(preferences_dir(), reply["run"], prompt, chosen, rejected, chosen_by, rejected_by)
        self.messages = [*self.messages[:index], {**reply, "vote": chosen_by}, *self.messages[index + 1 :]]
        self._count_votes()

    @handler(error="vote_error")
    def vote(self, index: int, winner: str):
        """`winner` ("tuned" or "base") answered the prompt before reply `index` better than the other model."""
        reply = self._pair(index)
        if winner not in ("tuned", "base"):
            raise BackpropError("UI_EVENT_REFUSED", name="vote", reason=f"the winner is tuned or base, not {winner!r}")
        answers = {"tuned": reply["content"], "base": reply["base"]}
        loser = "base" if winner == "tuned" else "tuned"
        self._record(index, answers[winner], answers[loser], winner, loser)

    @handler(error="vote_error")
    def write_better(self, index: int):
        self._pair(index)
        self.correcting, self.correction = index, ""

    @handler(error="vote_error")
    def edit_correction(self, value: str):
        self.correction = _text(value, "correction")

    @handler(error="vote_error")
    def cancel_correction(self):
        self.correcting, self.correction = -1, ""

    @handler(error="vote_error")
    def save_correction(self):
        """The user's answer is preferred over the tuned model's."""
        reply = self._pair(self.correcting)
        if not self.correction.strip():
            raise BackpropError("INPUT_INVALID_ARGUMENT", reason="the better answer is empty", hint="Write it, then Save.")
        self._record(self.correcting, self.correction.strip(), reply["content"], "user", "tuned")
        self.correcting, self.correction = -1, ""

    @handler(busy="training", error="vote_error")
    def train_on_votes(self):
        """A DPO run from the picked run's adapter on its votes; the page moves to the new run."""
        self._count_votes()
        if not self.vote_run or self.votes < MIN_VOTES:
            so_far = f"{self.votes} vote{'' if self.votes == 1 else 's'} so far"
            raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"{so_far}: at least {MIN_VOTES} are needed",
                                hint="Vote on more side-by-side replies first.")  # fmt: skip
        settings = load_settings(**nest_options(dpo_options()))  # a few passes over the votes
        data = votes_file(preferences_dir(), self.vote_run)
        run = jobs.submit_train(settings, str(data), from_run=self.vote_run, name=f"votes on {self.vote_run}",
                                runs_root=runs_root())  # fmt: skip
        return rx.redirect(f"/runs/{run.id}")

    @handler(background=True, busy="busy")
    async def send(self):
        async with self:
            prompt = self.prompt.strip()
            if not prompt or not (self.folder.strip() or self.source in self._targets):
                return
            self.prompt = ""
            history = [{"role": m["role"], "content": m["content"]} for m in self.messages]
            folder = self.folder.strip()
            source, base_of = [folder, folder] if folder else self._targets[self.source]
            compare = self.compare
            votable = compare and not folder and self.source.endswith(ADAPTER)  # a run's adapter beside its base model
            self.messages = [*self.messages, turn("user", prompt), turn("assistant", "", run=base_of if votable else "")]
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
        async with self:  # both replies are whole: the pair can be voted on
            last = dict(self.messages[-1])
            tuned, base = last["content"].strip(), last["base"].strip()
            last["done"] = "1" if tuned and (base or not compare) else ""
            last["same"] = "1" if compare and tuned == base else ""
            self.messages = [*self.messages[:-1], last]
