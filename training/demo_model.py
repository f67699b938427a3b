"""The built-in `demo` model: a tiny Llama-architecture model that makes the pipeline run offline.

It is built deterministically from files shipped in `assets/demo/`:
- a byte-level BPE tokenizer trained on `corpus.txt` (Qwen2's pre-tokenizer regex, ChatML special tokens),
- a randomly initialised LlamaForCausalLM of a few million parameters (fixed seed).
The result is cached under `<home>/models/demo-v1/` with a manifest of file hashes, and rebuilt when a file
is missing or does not match its hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"
VERSION = "demo-v1"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The pre-tokenizer regex of Qwen2/GPT-4-style tokenizers, so GGUF exports can name a known pre-tokenizer.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class DemoArchitecture:
    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 1024
    head_init_scale: float = 5.0
    seed: int = 0


def demo_model_path(home: Path | None = None) -> Path:
    """The cached demo model folder, built first if missing or corrupt."""
    from training.config import load_settings

    root = (home or load_settings().home) / "models" / VERSION
    if not _is_intact(root):
        build_demo_model(root)
    return root


def build_demo_model(target: Path, arch: DemoArchitecture = DemoArchitecture()) -> Path:
    """Build tokenizer and model into `target` atomically (temp folder, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = _build_tokenizer(arch.vocab_size)
        tokenizer.save_pretrained(staging)
        _build_model(tokenizer, arch).save_pretrained(staging, safe_serialization=True)
        manifest = {"version": VERSION, "architecture": asdict(arch), "files": _hash_files(staging)}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build_tokenizer(vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = (ASSETS / "corpus.txt").read_text(encoding="utf-8").splitlines()
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=1024,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _build_model(tokenizer, arch: DemoArchitecture):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(arch.seed)
    model = LlamaForCausalLM(config)
    # LoRA leaves the output head and final norm frozen; at the usual init (std 0.02) the head cannot
    # express a confident prediction, so even a perfectly learned answer would keep a loss near 2.
    with torch.no_grad():
        model.lm_head.weight.mul_(arch.head_init_scale)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def _hash_files(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }


def _is_intact(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        return manifest.get("version") == VERSION and manifest["files"] == _hash_files(folder)
    except (OSError, ValueError, KeyError):
        return False
