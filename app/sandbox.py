"""Where the web app keeps what it writes: the sandbox of `training.sandbox`, at BACKPROPAGATE_UI__OUTPUT_DIR."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from training.config import load_settings
from training.sandbox import sandbox_root


@cache
def root() -> Path:
    return sandbox_root(load_settings().ui.output_dir)


def runs_root() -> Path:
    return root() / "runs"
