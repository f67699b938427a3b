"""The web app's folders, all inside its sandbox (training.sandbox) at BACKPROPAGATE_UI__OUTPUT_DIR: runs started from
the browser, uploaded datasets, exports of anything that has no run folder of the app's own, and Chat's votes."""

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


def datasets_dir() -> Path:
    folder = root() / "datasets"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def exports_dir() -> Path:
    return root() / "exports"


def preferences_dir() -> Path:
    """Arena votes from the Chat page: one preference file per tuned run (training.votes)."""
    folder = root() / "preferences"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
