"""The event stream of a run: one JSON object per line in RUN_DIR/events.jsonl.

Every event has `t` (unix seconds) and `event`; docs/architecture.md lists the vocabulary
(download, reference, started, step, eval, telemetry, checkpoint_saved, paused, resumed, merge, log, completed, failed).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Event = dict[str, Any]
EventSink = Callable[[Event], None]


class EventWriter:
    """Appends events to a file; `durable=True` events (checkpoints, endings) are fsynced.

    Thread-safe: the training loop and the governor's watcher thread share one writer."""

    def __init__(self, path: Path, also: EventSink | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", encoding="utf-8")
        self._also = also
        self._lock = threading.Lock()

    def emit(self, event: str, durable: bool = False, **fields: Any) -> Event:
        record = {"t": round(time.time(), 3), "event": event, **fields}
        with self._lock:
            self._file.write(json.dumps(record, default=str) + "\n")
            self._file.flush()
            if durable:
                os.fsync(self._file.fileno())
        if self._also is not None:
            self._also(record)
        return record

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_events(path: Path, offset: int = 0) -> tuple[list[Event], int]:
    """Complete events from byte `offset` on, and the offset to continue from (a half-written line waits)."""
    if not path.exists():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    events: list[Event] = []
    consumed = 0
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        consumed += len(raw)
        try:
            events.append(json.loads(raw))
        except json.JSONDecodeError:
            continue  # a line torn by a crash is skipped, not fatal
    return events, offset + consumed
