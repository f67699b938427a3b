"""How the outside world steers a running job: stop, pause at the next step boundary, a deadline.

The training loop (or the script supervisor) reads a `Control` between two steps; the governor's watcher
thread, signal handlers and the time box write to it.

A stop travels as SIGTERM to the worker, but a worker only a moment old has no handler yet and SIGTERM would kill it
(the run would end `interrupted`). So a stop is first left in the run's folder (`ask_stop`), and the signal is sent only
to a worker that said it listens (`listen`, which also takes a stop left for it before it did).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from training import atomic


@dataclass
class Control:
    stop: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None  # time.monotonic() value; at it the job ends `timeboxed`
    time_box_s: float | None = None  # the time box: it starts at the first training step (see start_clock)
    pause: threading.Event = field(default_factory=threading.Event)  # set: hold at the next step boundary
    pause_reason: str = ""
    stop_code: str | None = None  # an error code when the governor (not the user) stopped the job
    stop_message: str = ""
    # Fault injection (tests): called before every forward pass of a training step with (step, micro-batch index in the
    # step, rows in the pass); raising torch.OutOfMemoryError there drives OOM recovery on any machine.
    before_forward: Callable[[int, int, int], None] | None = None

    def request_stop(self, code: str | None = None, message: str = "") -> None:
        if code and not self.stop.is_set():
            self.stop_code, self.stop_message = code, message
        self.stop.set()

    def request_pause(self, reason: str) -> None:
        self.pause_reason = reason
        self.pause.set()

    def release(self) -> None:
        self.pause.clear()

    def start_clock(self) -> bool:
        """Start the time box (once; later calls keep the first start). Training starts it at its first step, so
        loading the model and data never uses it up and every session makes progress. True when just started."""
        if self.deadline is not None or not self.time_box_s:
            return False
        self.deadline = time.monotonic() + self.time_box_s
        return True

    def timed_out(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def hold(self) -> None:
        """Block while paused; returns early on a stop request or at the deadline."""
        while self.pause.is_set() and not self.stop.is_set() and not self.timed_out():
            self.stop.wait(0.1)


STOP_ASKED = "stop_asked"  # RUN_DIR/stop_asked: when (unix time) a stop was last asked for
LISTENING = "worker_listening"  # RUN_DIR/worker_listening: the pid of the worker whose SIGTERM handler is in place


def ask_stop(run_dir: Path) -> int | None:
    """Leave a stop request in the run's folder; the pid of the last worker that listened for SIGTERM (the caller checks
    it is alive before sending it), or None when none has yet (the worker finds the request when it gets there)."""
    atomic.write_text(run_dir / STOP_ASKED, repr(time.time()))  # first: a worker listening after this line sees it
    try:
        return int((run_dir / LISTENING).read_text())
    except (OSError, ValueError):
        return None


def listen(run_dir: Path, control: Control, queued_at: float) -> None:
    """Worker side, once its signal handlers are in place: say so, then take a stop asked for since this start of the
    run was queued (an older one was meant for an earlier start, and that one stopped)."""
    atomic.write_text(run_dir / LISTENING, str(os.getpid()))
    try:
        asked = float((run_dir / STOP_ASKED).read_text())
    except (OSError, ValueError):
        return
    if asked >= queued_at:
        control.request_stop()
