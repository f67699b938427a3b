"""The web app's folders, all inside its sandbox (training.sandbox) at BACKPROPAGATE_UI__OUTPUT_DIR: runs started from
the browser, uploaded datasets, and exports of anything that has no run folder of the app's own."""

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
