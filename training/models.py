"""Which model to train: presets, name resolution, and loading a base model with its tokenizer.

`--model` takes a preset name or hub id (loaded with `from_pretrained` through the HF cache), a local HF
folder, a `.gguf` file or an Ollama model `ollama:NAME[:TAG]` (imported once into a cached folder, see gguf_import.py),
or `demo` (the built-in tiny model, see demo_model.py). A tokenizer without a chat template gets
ChatML (with tool calls rendered, see chat_template.py); ChatML tokens it lacks get new embedding and output rows
(`fit_embeddings`), which training learns and saves with the adapter.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.errors import BackpropError
from training.hf_imports import transformers_class

DEMO = "demo"
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class Preset:
    hub_id: str
    params_billion: float
    architecture: str

    def vram_gb(self, qlora: bool = False) -> float:
        """Rough LoRA training footprint: weights + ~30% for activations, adapter and optimizer state."""
        bytes_per_param = 0.55 if qlora else 2.0  # 4-bit incl. quant constants, or bf16
        return round(self.params_billion * bytes_per_param * 1.3 + 0.8, 1)


PRESETS: dict[str, Preset] = {
    p.hub_id: p
    for p in [
        Preset("Qwen/Qwen2.5-0.5B-Instruct", 0.49, "qwen2"),
        Preset("Qwen/Qwen2.5-1.5B-Instruct", 1.54, "qwen2"),
        Preset("Qwen/Qwen2.5-3B-Instruct", 3.09, "qwen2"),
        Preset("Qwen/Qwen2.5-7B-Instruct", 7.62, "qwen2"),
        Preset("meta-llama/Llama-3.2-1B-Instruct", 1.24, "llama"),
        Preset("meta-llama/Llama-3.2-3B-Instruct", 3.21, "llama"),
        Preset("HuggingFaceTB/SmolLM2-135M-Instruct", 0.135, "llama"),
        Preset("HuggingFaceTB/SmolLM2-360M-Instruct", 0.36, "llama"),
        Preset("mistralai/Mistral-7B-Instruct-v0.3", 7.25, "mistral"),
    ]
}
# Short names people type: "qwen2.5-0.5b", "smollm2-135m", ...
ALIASES: dict[str, str] = {
    hub_id.split("/")[1].lower().removesuffix("-instruct").removesuffix("-instruct-v0.3"): hub_id for hub_id in PRESETS
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `name` as the user gave it, `path` a local folder or hub id to load."""

    name: str
    path: str
    is_local: bool


def resolve_model(name: str, home: Path | None = None, on_progress: Callable[[str], None] | None = None) -> ModelSource:
    """Where `name` loads from; a `.gguf` file or an `ollama:` name is imported into a cached folder first (its
    progress as messages to `on_progress`, see gguf_import.py)."""
    from training.gguf_import import imported_model, is_imported_name

    if name == DEMO:
        from training.demo_model import demo_model_path

        return ModelSource(DEMO, str(demo_model_path(home)), True)
    if is_imported_name(name):
        from training.config import load_settings

        return ModelSource(name, str(imported_model(name, home or load_settings().home, on_progress)), True)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists() and not (local / "adapter_config.json").exists():
            raise BackpropError("INPUT_MODEL_NOT_FOUND", model=name)
        return ModelSource(name, str(local.resolve()), True)
    hub_id = ALIASES.get(name.lower(), name)
    if hub_id.count("/") != 1 or hub_id.startswith(("/", ".", "~")):
        raise BackpropError("INPUT_MODEL_NOT_FOUND", model=name)
    return ModelSource(name, hub_id, False)


def load_tokenizer(source: ModelSource) -> Any:
    from training.chat_template import CHATML_TOOLS_TEMPLATE

    tokenizer = _from_pretrained(transformers_class("AutoTokenizer"), source, weights=False)
    if not getattr(tokenizer, "chat_template", None):  # ChatML, which also renders tool calls
        tokenizer.chat_template = CHATML_TOOLS_TEMPLATE
        missing = [token for token in CHATML_TOKENS if token not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": list(CHATML_TOKENS)})
            # The model has never seen these: training must resize its embeddings and learn their rows.
            tokenizer.backprop_new_tokens = tokenizer.convert_tokens_to_ids(missing)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def new_tokens(tokenizer: Any) -> list[int]:
    """The ids of the tokens `load_tokenizer` added (ChatML markers a model without a chat template never saw)."""
    return list(getattr(tokenizer, "backprop_new_tokens", []))


def fit_embeddings(model: Any, tokenizer: Any, *, for_training: bool = False) -> bool:
    """Give the model a row of input and output embeddings for every token of the tokenizer (a tokenizer that got
    the ChatML tokens has more than the base model); True when it resized. A trained adapter's new-token rows live
    in the adapter, so a model that loads it needs the same size first."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return False
    # For training, new rows start at the mean of the others (a neutral start); an adapter's rows replace them anyway.
    model.resize_token_embeddings(len(tokenizer), mean_resizing=for_training)
    return True


def load_model(
    source: ModelSource,
    *,
    dtype: Any = None,
    device: str = "cpu",
    quantization_config: Any = None,
    tokenizer: Any = None,
    attn_implementation: str | None = None,
):
    """The base model; with `tokenizer`, its embeddings sized to fit that tokenizer (see fit_embeddings)."""
    AutoModelForCausalLM = transformers_class("AutoModelForCausalLM")  # noqa: N806 (the class, by its own name)

    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device}
    if not source.is_local:  # its look-up of an adapter config ignores local_files_only (see _from_pretrained)
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    model = _from_pretrained(AutoModelForCausalLM, source, **kwargs)
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    if quantization_config is None:
        model.to(device)
    return model


def attention_implementation(setting: str, device: str, dtype: Any) -> str:
    """The attention kernel to load the model with (`training.attention`): auto is flash_attention_2 on CUDA in bf16 or
    fp16 when flash-attn imports, else sdpa. Packed rows stay apart under each: their position ids restart at every
    example, which transformers turns into block-diagonal masks (sdpa, eager) or, in a batch of one row, varlen
    sequence starts (flash: `target_loss` flattens packed batches into one row for it)."""
    import torch

    half = dtype in (torch.bfloat16, torch.float16)
    if setting == "auto":
        return "flash_attention_2" if device == "cuda" and half and _flash_attn_imports() else "sdpa"
    if setting == "flash_attention_2" and not (device == "cuda" and half and _flash_attn_imports()):
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason="attention flash_attention_2 needs CUDA, bf16 or fp16, and "
                            "the flash-attn package", hint="Use --attention auto (or sdpa).")  # fmt: skip
    return setting


def needs_gradient_checkpointing(free_bytes: float, shape: Any, rows: int, max_seq_length: int, **step: Any) -> bool:
    """True when one micro-batch of `rows` x `max_seq_length` tokens would not fit in the VRAM free next to the weights.

    The estimate is training/memory.py's (activations per token and layer as measured on an H100, one chunk of logits,
    AdamW state; `step` as for `memory.step_bytes`), against the same budget as the automatic batch size: 90% of the
    free bytes less 1 GiB. Qwen2.5-1.5B's shape, 8 x 2048 tokens, float32 adapters: ~72.6 GB, so on below ~82 GB free."""
    from training import memory

    budget = free_bytes * (1 - memory.HEADROOM_FRACTION) - memory.HEADROOM_BYTES
    return memory.step_bytes(shape, rows, max_seq_length, **step) > budget


def _flash_attn_imports() -> bool:
    try:
        import flash_attn  # type: ignore[import-not-found]  # noqa: F401
    except Exception:  # not installed, or built for another torch/CUDA
        return False
    return True


def _from_pretrained(loader: Any, source: ModelSource, *, weights: bool = True, **kwargs: Any) -> Any:
    """`from_pretrained` that fails fast and clearly offline instead of hanging on the network (`weights`: whether
    the loader reads the weights, or only the config and tokenizer files)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not source.is_local:
        # Short network timeouts: an unreachable hub must fail in seconds, not minutes.
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
        from training.download import download_model

        # Fetched into the HF cache first (resumable), then loaded from the cache alone: transformers' own look-ups
        # would retry an unreachable hub for minutes, file after file, even with every file cached.
        download_model(source.path, weights=weights)
        kwargs["local_files_only"] = True
    try:
        return loader.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:300]
        raise BackpropError("DEP_MODEL_LOAD_FAILED", model=source.name, reason=reason) from exc


# Defaults that suit a model better than the global ones (flat option names, as config.FLAT_OPTIONS); a value the user
# set always wins. The plan (training/plan.py) takes them as this model's tuned values.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    # A random-initialized tiny model needs a high learning rate to learn in a minute on a CPU.
    DEMO: {
        "lr": 3e-3,
        "steps": 300,
        "batch_size": 2,
        "gradient_accumulation": 1,
        "max_seq_length": 128,
        "save_every": 100,
        "lora_r": 16,
        "lora_alpha": 32,
    },  # fmt: skip
}


# DPO and ORPO move a model further per step than supervised training: by default a tenth of its learning rate.
PREFERENCE_LR_FACTOR = 0.1


def apply_model_defaults(settings: Any) -> Any:
    """`settings` with this model's defaults for what the user left unset (they stay "not set")."""
    from training.config import fill_unset

    training = settings.training
    defaults = dict(MODEL_DEFAULTS.get(settings.model, {}))
    if "epochs" in training.model_fields_set:
        defaults.pop("steps", None)  # epochs given: a preset's step count must not win over them
    if training.method != "sft":
        defaults["lr"] = float(f"{defaults.get('lr', training.learning_rate) * PREFERENCE_LR_FACTOR:.6g}")
    return fill_unset(settings, defaults, mark_set=False)
