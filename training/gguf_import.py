"""Train from the model you already run: a `.gguf` file or an Ollama model, dequantized once into a cached HF folder.

    folder = imported_model("~/models/Llama-3.2-1B-Instruct.Q4_K_M.gguf", home)   # home/models/imported/<stem>-<fp>/
    folder = imported_model("ollama:llama3.2:1b", home)   # the GGUF blob that Ollama's manifest for llama3.2:1b names

transformers reads the GGUF (`gguf_file=`) and dequantizes its weights; they are saved as plain safetensors (in the
precision the file held: f32 or f16 as they were, anything quantized or bf16 as bf16) beside the tokenizer and the chat
template the GGUF carries, so every other part of Backprop sees an ordinary model folder. The folder is named by a
fingerprint of the file, so the import runs once per file; a crash mid-import leaves only a `.partial` folder.

A model trained from a quantized file inherits its quantization error: the import says so.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training import atomic
from training.errors import BackpropError

log = logging.getLogger(__name__)

OLLAMA_PREFIX = "ollama:"
OLLAMA_REGISTRY = "registry.ollama.ai"
MODEL_LAYER = "application/vnd.ollama.image.model"
MARKER = "backprop-import.json"  # written last: a folder without it is not a finished import
_SAMPLE = 1 << 20  # bytes read from each end of a file for its fingerprint

# GGUF file types (general.file_type) whose weights are kept at their precision; the rest are saved as bf16.
_EXACT_DTYPES = {0: "float32", 1: "float16"}
_FILE_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
                    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
                    32: "BF16"}  # fmt: skip

Progress = Callable[[str], None]


def is_imported_name(name: str) -> bool:
    """Whether `--model` names a model to import: a `.gguf` file or `ollama:NAME[:TAG]`."""
    return name.startswith(OLLAMA_PREFIX) or name.lower().endswith(".gguf")


def imported_model(name: str, home: Path, on_progress: Progress | None = None) -> Path:
    """The HF folder for a `.gguf` path or an `ollama:` name, imported on first use."""
    say = on_progress or (lambda message: log.info("%s", message))
    gguf_file, fingerprint = _locate(name)
    target = home / "models" / "imported" / f"{_stem(name)}-{fingerprint[:12]}"
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One import per target at a time, across threads (the web app plans and reads datasets on several) and processes.
    with (target.parent / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / MARKER).is_file():  # not imported by whoever held the lock before
            _import(gguf_file, target, name, fingerprint, say)
    return target


# ---------------------------------------------------------------------------------------------------------------------
# where the GGUF is


def _locate(name: str) -> tuple[Path, str]:
    """(the GGUF file, its fingerprint)."""
    if name.startswith(OLLAMA_PREFIX):
        return ollama_blob(name)
    path = Path(name).expanduser()
    if not path.is_file():
        raise BackpropError("INPUT_MODEL_NOT_FOUND", model=name)
    return path.resolve(), _fingerprint(path)


def _fingerprint(path: Path) -> str:
    """sha256 of the size and the first and last MiB: a changed file gets a new folder without hashing gigabytes."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        digest.update(f.read(_SAMPLE))
        f.seek(max(0, path.stat().st_size - _SAMPLE))
        digest.update(f.read(_SAMPLE))
    return digest.hexdigest()


def ollama_store() -> Path:
    """Ollama's local model store: `OLLAMA_MODELS`, default ~/.ollama/models."""
    return Path(os.environ.get("OLLAMA_MODELS") or "~/.ollama/models").expanduser()


def ollama_blob(name: str) -> tuple[Path, str]:
    """The GGUF blob of `ollama:NAME[:TAG]` and its sha256, read from the store's manifest as Ollama lays it out:
    manifests/<registry>/<namespace>/<model>/<tag> (namespace `library` for official models, tag `latest` by default)
    lists layers; the model layer's digest names blobs/sha256-<hex>."""
    reference = name.removeprefix(OLLAMA_PREFIX)
    model, _, tag = reference.partition(":")
    parts = model.split("/") if model else []
    if not parts or len(parts) > 3 or not all(re.fullmatch(r"\w[\w.\-]*", p) for p in [*parts, tag or "latest"]):
        raise BackpropError("INPUT_MODEL_NOT_FOUND", model=name, hint="Name an Ollama model as ollama:NAME or ollama:NAME:TAG "
                            "(as `ollama list` shows it).")  # fmt: skip
    if len(parts) == 1:
        parts = ["library", *parts]
    if len(parts) == 2:
        parts = [OLLAMA_REGISTRY, *parts]
    store = ollama_store()
    manifest_path = store / "manifests" / Path(*parts) / (tag or "latest")
    if not manifest_path.is_file():
        raise BackpropError("INPUT_MODEL_NOT_FOUND", model=name, hint=f"No such model in Ollama's store ({store}): "
                            f"`ollama pull {reference}` first, or set OLLAMA_MODELS to the store's folder.")  # fmt: skip
    try:
        layers = json.loads(manifest_path.read_text(encoding="utf-8"))["layers"]
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == MODEL_LAYER)
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise ValueError(f"unexpected digest {digest!r}")
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        raise BackpropError("INPUT_MODEL_INVALID", path=str(manifest_path), reason=f"no model layer in the manifest ({exc})",
                            hint="Pull the model again with `ollama pull`.") from exc  # fmt: skip
    blob = store / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise BackpropError("INPUT_MODEL_INVALID", path=str(blob), reason=f"the blob for {name} is missing",
                            hint="Pull the model again with `ollama pull`.")  # fmt: skip
    return blob, digest.partition(":")[2]


def _stem(name: str) -> str:
    text = name.removeprefix(OLLAMA_PREFIX) if name.startswith(OLLAMA_PREFIX) else Path(name).name.removesuffix(".gguf")
    return re.sub(r"[^\w.\-]+", "-", text).strip("-.") or "model"


# ---------------------------------------------------------------------------------------------------------------------
# the import


def _import(gguf_file: Path, target: Path, name: str, fingerprint: str, say: Progress) -> None:
    from training.extras import require

    require("export", "gguf")  # transformers reads GGUF through the gguf package
    import torch

    from training.hf_imports import transformers_class

    file_type = gguf_file_type(gguf_file)
    dtype = getattr(torch, _EXACT_DTYPES.get(file_type, "bfloat16"))
    kind = _FILE_TYPE_NAMES.get(file_type, f"file type {file_type}")
    if file_type not in _EXACT_DTYPES:
        say(f"{name} is quantized ({kind}): the model you train starts from the quantized weights and keeps their error")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    started = time.monotonic()
    try:
        folder, file = str(gguf_file.parent), gguf_file.name
        say(f"importing {name}: reading the tokenizer and chat template")
        tokenizer = _from_gguf(transformers_class("AutoTokenizer"), folder, file, name)
        if not getattr(tokenizer, "chat_template", None) and (template := gguf_chat_template(gguf_file)):
            tokenizer.chat_template = template
        say(f"importing {name}: dequantizing {gguf_file.stat().st_size / 2**20:.0f} MiB of {kind} weights")
        loaded = _from_gguf(transformers_class("AutoModelForCausalLM"), folder, file, name, dtype=dtype)
        model = _plain_copy(loaded, name)
        del loaded
        say(f"importing {name}: saving the model folder")
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer.model_max_length > 10**9:  # "unbounded": the model's own context is the honest limit
            tokenizer.model_max_length = model.config.max_position_embeddings
        tokenizer.save_pretrained(staging)
        _clean_json(staging / "config.json", "quantization_config")
        _clean_json(staging / "tokenizer_config.json", "is_local", "local_files_only")  # load options, not settings
        atomic.write_json(staging / MARKER, {"source": name, "file": str(gguf_file), "fingerprint": fingerprint,
                                             "gguf_file_type": kind, "dtype": str(dtype).replace("torch.", ""),
                                             "seconds": round(time.monotonic() - started, 1)})  # fmt: skip
        atomic.publish_dir(staging, target)  # under the lock: nobody else writes the target
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"imported {name} into {target} in {time.monotonic() - started:.0f} s")


def _from_gguf(loader: Any, folder: str, file: str, name: str, **kwargs: Any) -> Any:
    from transformers.utils import logging as hf_logging

    # Its notes (a per-tensor progress bar, how fast packed weights compute in float32) are not for this one-off copy.
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return loader.from_pretrained(folder, gguf_file=file, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:  # an architecture transformers cannot read from GGUF
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise BackpropError("DEP_MODEL_LOAD_FAILED", model=name, reason=f"transformers cannot read this GGUF: {reason}",
                            hint="transformers reads Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3 and more from GGUF "
                                 "(see its docs); otherwise start from the model's Hugging Face folder.") from exc  # fmt: skip
    finally:
        hf_logging.set_verbosity(verbosity)


def _plain_copy(loaded: Any, name: str) -> Any:
    """The same weights in a model transformers can save: a GGUF-loaded one remembers the file as its quantization and
    refuses `save_pretrained`. Built on the meta device and given the loaded tensors themselves (no second copy)."""
    import torch

    from training.hf_imports import transformers_class

    config = loaded.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    with torch.device("meta"):
        model = transformers_class("AutoModelForCausalLM").from_config(config, dtype=loaded.dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        reason = f"weights missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}"
        raise BackpropError("DEP_MODEL_LOAD_FAILED", model=name, reason=reason,
                            hint="This GGUF's tensors do not fit the architecture transformers reads it as: start from "
                                 "the model's Hugging Face folder or hub id instead.")  # fmt: skip
    if tied:
        model.tie_weights()
    return model


def _clean_json(path: Path, *keys: str) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    if [data.pop(key) for key in keys if key in data]:
        atomic.write_json(path, data)


def _metadata(gguf_file: Path) -> Any:
    from gguf import GGUFReader

    return GGUFReader(gguf_file).fields


def gguf_file_type(gguf_file: Path) -> int:
    """general.file_type: 0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 7 Q8_0, 15 Q4_K_M, ... (-1 when the file does not say)."""
    field = _metadata(gguf_file).get("general.file_type")
    return int(field.parts[field.data[0]][0]) if field is not None else -1


def gguf_chat_template(gguf_file: Path) -> str | None:
    field = _metadata(gguf_file).get("tokenizer.chat_template")
    return bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else None
