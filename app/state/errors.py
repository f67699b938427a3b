"""How the pages show an engine error next to the control that caused it: code, message and hint on one line."""

from __future__ import annotations

from training.errors import BackpropError


def error_text(exc: BackpropError) -> str:
    return f"[{exc.code}] {exc.message} — {exc.hint}" if exc.hint else f"[{exc.code}] {exc.message}"
