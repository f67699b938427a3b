"""Arena votes: "this answer is better than that one", kept as preference rows that DPO/ORPO can train on.

path = record_vote(folder, run_id, prompt, chosen="Paris.", rejected="Lyon.", chosen_by="tuned", rejected_by="base")
count_votes(path)  # 1

One file per tuned run, `folder/<run id>.jsonl`, one row a line in the conversational preference format:
{"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...], "chosen_by", "rejected_by", "voted_at"}.
A corrected answer is a vote too: chosen is the user's text (chosen_by "user"), rejected the model's answer.

Nothing recorded is lost and no row is ever half there: several tabs (threads, processes) append under an exclusive
lock, each row goes down in one write followed by fsync, and a partial last line left by a crash mid-write is cut off
by the next append before it writes.
"""

from __future__ import annotations

import fcntl
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.atomic import fsync_dir
from training.errors import BackpropError
from training.sandbox import inside, safe_name

ROLES = ("system", "user", "assistant", "tool")
EPOCHS = 3  # passes over the votes of a "Train on my votes" run: a handful of pairs, seen a few times


def votes_file(folder: Path, source: str) -> Path:
    """Where the votes on `source` (a tuned run's id) are kept: a safe file name inside `folder`."""
    return inside(Path(folder).resolve(), safe_name(f"{source}.jsonl", default="votes"))


def record_vote(
    folder: Path, source: str, prompt: list[dict], chosen: str, rejected: str, chosen_by: str, rejected_by: str
) -> Path:
    """Append one preference row to `folder/<source>.jsonl` (created if needed) and return the file's path.
    Empty answers, identical answers or a prompt that is not a conversation ending with the user are
    INPUT_DATASET_BAD_PAIR, and nothing is written."""
    path = votes_file(folder, source)
    problem = _problem(prompt, chosen, rejected)
    if problem:
        raise BackpropError("INPUT_DATASET_BAD_PAIR", path=path, line=count_votes(path) + 1, reason=problem)
    row = {
        "prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "chosen_by": chosen_by,
        "rejected_by": rejected_by,
        "voted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _append_line(path, (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


def count_votes(path: Path) -> int:
    """How many whole rows `path` holds (0 if it does not exist); a partial last line does not count."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return 0
    return sum(1 for line in data.split(b"\n")[:-1] if line.strip())


def dpo_options() -> dict[str, Any]:
    """Flat options (training.config.nest_options) of a DPO run on the votes: EPOCHS passes over them (epochs given win
    over a model preset's step count); batch size and the rest as configured."""
    return {"method": "dpo", "epochs": EPOCHS}


def _problem(prompt: list[dict], chosen: str, rejected: str) -> str:
    """Why these cannot be a preference pair ("" if they can)."""
    if not isinstance(prompt, list) or not prompt:
        return "the prompt is empty"
    for m in prompt:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"the prompt holds a message that is not {{role, content}}: {str(m)[:80]}"
    if prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
        return "the prompt must end with the user's message"
    if not isinstance(chosen, str) or not chosen.strip():
        return "the chosen answer is empty"
    if not isinstance(rejected, str) or not rejected.strip():
        return "the rejected answer is empty"
    if chosen.strip() == rejected.strip():
        return "chosen and rejected are the same answer: there is nothing to prefer"
    return ""


def _append_line(path: Path, line: bytes) -> None:
    """Append `line` (ending in a newline) whole and durably, under an exclusive lock on the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one writer at a time, across threads (own open file) and processes
        _cut_partial_tail(fd)
        view = memoryview(line)
        while view:  # one write in practice; a short write (disk full, signal) goes on, still under the lock
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock
    if created:
        fsync_dir(path.parent)  # the new file's name is on disk too


def _cut_partial_tail(fd: int) -> None:
    """A crash mid-write can leave a last line without its newline: cut it off, so the file stays valid JSONL."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    end, chunk = size, 4096
    while end > 0:
        start = max(0, end - chunk)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            os.ftruncate(fd, start + newline + 1)
            return
        end = start
    os.ftruncate(fd, 0)


def read_votes(path: Path) -> list[dict[str, Any]]:
    """The whole rows of `path`, in order (for previews and tests)."""
    if not Path(path).exists():
        return []
    lines = Path(path).read_bytes().split(b"\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]
