"""The optional parts of Backprop and what installs them.

Core (the engine and the CLI) needs no compiler and no web stack. A feature whose extra is not installed fails fast,
before any work, with DEP_MISSING naming the exact command: `pip install 'backprop[export]'`.
"""

from __future__ import annotations

import importlib.util

from training.errors import BackpropError

# extra -> {module it provides: the distribution that installs it}
EXTRAS: dict[str, dict[str, str]] = {
    "ui": {"reflex": "reflex", "jwt": "pyjwt"},
    "export": {"gguf": "gguf", "llama_cpp": "llama-cpp-python"},
    "track": {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"},
    "gpu": {"unsloth": "unsloth", "bitsandbytes": "bitsandbytes", "liger_kernel": "liger-kernel"},
    "dist": {"deepspeed": "deepspeed"},  # --strategy deepspeed-zero2|deepspeed-zero3
}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(extra: str, *modules: str) -> None:
    """DEP_MISSING unless every module named (default: all of the extra's) can be imported."""
    wanted = modules or tuple(EXTRAS[extra])
    missing = [EXTRAS[extra][m] for m in wanted if not installed(m)]
    if missing:
        raise BackpropError("DEP_MISSING", package=", ".join(missing), reason=f"it comes with the '{extra}' extra",
                            install=f"'backprop[{extra}]'")  # fmt: skip
