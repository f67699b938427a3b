"""Backprop's training engine: LoRA fine-tuning, datasets, the run registry. No UI imports here.

Public names are imported lazily so that `import training` (and `backprop --help`) stays fast and
never loads torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["BackpropError", "Trainer", "TrainResult", "load_settings"]

if TYPE_CHECKING:
    from training.api import Trainer
    from training.config import load_settings
    from training.errors import BackpropError
    from training.trainer import TrainResult

_LAZY = {
    "Trainer": "training.api",
    "TrainResult": "training.trainer",
    "BackpropError": "training.errors",
    "load_settings": "training.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")
