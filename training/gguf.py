"""HF checkpoint -> GGUF: our own converter on top of the `gguf` package, checked with llama.cpp.

`convert()` turns a merged HF model folder (config.json, *.safetensors, tokenizer.json or tokenizer.model,
tokenizer_config.json, the chat template) into one GGUF file that llama.cpp, Ollama and LM Studio load:
- f32, f16 and q8_0 are written here, with numpy;
- q4_0, q4_k_m, q5_k_m and q6_k are written as f16 first, then quantized by llama.cpp itself (llama-cpp-python).
`verify()` loads the file in llama.cpp and compares its tokenizer and greedy decoding with transformers.

Supported: Llama and Mistral (llama.cpp's "llama" architecture) and Qwen2 ("qwen2"); byte-level BPE
tokenizers ("gpt2" in GGUF terms) and SentencePiece-style ones ("llama").
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from training.errors import BackpropError
from training.extras import require

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

# HF class name -> llama.cpp architecture. Mistral is a Llama as far as llama.cpp is concerned.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
DIRECT_QUANTIZATIONS = ("f32", "f16", "q8_0")  # written here with numpy
# Quantized by llama.cpp from an f16 file: quantization -> name of the ftype constant in llama_cpp.
LLAMA_CPP_QUANTIZATIONS: dict[str, str] = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
QUANTIZATIONS: tuple[str, ...] = (*DIRECT_QUANTIZATIONS, *LLAMA_CPP_QUANTIZATIONS)

# The texts chat templates use to end a turn; the first one the template uses becomes eos and eot.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

# Pre-tokenizer regexes from tokenizer.json -> the name llama.cpp knows them by (tokenizer.ggml.pre).
PRE_TOKENIZER_REGEXES: dict[str, str] = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}

# Probes for verify(): plain text, unicode, whitespace and digits, and ChatML special tokens.
TOKENIZER_PROBES = (
    "Hello world! The capital of France is Paris.",
    "Grüße aus Zürich: naïve café, 東京, Ελληνικά, 🚀🙂",
    "  two leading spaces\n\ttab, 1234567 digits, it's, I'LL, x=y+1;",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
)
GREEDY_TOKENS = 8
# How far llama.cpp's logits may be from transformers' (float32), relative to their scale (max |logit|): a floor (the
# embedding and output head, rounded once) plus a share per layer (the difference grows with depth). Measured relative
# differences: f16 4.7e-4-8.2e-4 on 2-layer models, 3.6e-4-9.0e-4 on the 4-layer demo model (raw and tuned), 2.3e-3-2.4e-3
# on SmolLM2-135M-Instruct (30 layers, two tuned runs); f32 2.3e-4 (demo), 8.5e-4-1.7e-3 (SmolLM2); q8_0 6.4e-3-1.8e-2
# (demo), 4.8e-2-5.6e-2 (SmolLM2). The bounds are about 3x those at every depth. A wrong conversion (a rope
# permutation, a misplaced tensor) is off by whole logits.
LOGIT_TOLERANCES: dict[str, tuple[float, float]] = {"f32": (2.5e-3, 1.5e-4), "f16": (2.5e-3, 1.5e-4), "q8_0": (3.6e-2, 4.5e-3)}


def logit_tolerance(quantization: str, layers: int) -> float:
    """The largest relative logit difference llama.cpp may show against transformers for a model this deep."""
    floor, per_layer = LOGIT_TOLERANCES[quantization.lower()]
    return floor + per_layer * layers


# ---------------------------------------------------------------------------------------------------------------------
# convert


def convert(model_dir: Path, out_path: Path, quantization: str = "f16") -> Path:
    """Write the HF model in `model_dir` as GGUF at `out_path`; an existing file there is replaced only on success."""
    quantization = quantization.lower()
    if quantization not in QUANTIZATIONS:
        raise BackpropError("INPUT_UNKNOWN_QUANTIZATION", quantization=quantization, choices=", ".join(QUANTIZATIONS))
    source = _read_source(Path(model_dir))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    try:
        if quantization in DIRECT_QUANTIZATIONS:
            _write_gguf(source, partial, quantization)
        else:
            f16 = out_path.with_name(out_path.name + ".f16.partial")
            try:
                _write_gguf(source, f16, "f16")
                _quantize_with_llama_cpp(f16, partial, quantization)
            finally:
                f16.unlink(missing_ok=True)
        _fsync(partial)
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    return out_path


@dataclass(frozen=True)
class _Source:
    """A merged HF model folder, checked enough that the conversion can start."""

    model_dir: Path
    config: dict[str, Any]
    architecture: str  # HF class name, e.g. LlamaForCausalLM
    arch: str  # llama.cpp architecture, e.g. llama
    weights: tuple[Path, ...]


def _read_source(model_dir: Path) -> _Source:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise BackpropError("INPUT_MODEL_NOT_FOUND", model=str(model_dir))
    config = _read_json(config_path)
    architecture = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    if architecture not in ARCHITECTURES:
        raise BackpropError("INPUT_UNSUPPORTED_ARCHITECTURE", architecture=architecture)
    weights = tuple(sorted(model_dir.glob("*.safetensors")))
    if not weights:
        raise BackpropError("INPUT_MODEL_INVALID", path=str(model_dir), reason="no *.safetensors weights")
    return _Source(model_dir, config, architecture, ARCHITECTURES[architecture], weights)


def _write_gguf(source: _Source, path: Path, quantization: str) -> None:
    """Metadata, tokenizer and tensors into one GGUF file, one tensor in memory at a time."""
    gguf = _require("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(path, source.arch)
    writer.add_name(source.model_dir.name)
    writer.add_file_type(_FILE_TYPES[quantization])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rope_factors = _add_hyperparameters(writer, source)
    vocab = _read_vocab(source.model_dir, source.config)
    _add_tokenizer(writer, vocab, source.model_dir, source.config)

    tensors = _plan_tensors(source, quantization, rope_factors)
    # Tensor infos first, data after: the header must know every shape before the first byte of data.
    for tensor in tensors:
        nbytes = math.prod(gguf.quant_shape_to_byte_shape(tensor.shape, tensor.qtype))
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), nbytes, raw_dtype=tensor.qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in tensors:
            writer.write_tensor_data(gguf.quants.quantize(tensor.load(), tensor.qtype))
    finally:
        writer.close()


_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0


# --- hyperparameters ---------------------------------------------------------------------------------------------------


def _heads(config: dict[str, Any]) -> tuple[int, int, int]:
    """(attention heads, key/value heads, head dimension)."""
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    return n_head, n_head_kv, head_dim


def _add_hyperparameters(writer: Any, source: _Source) -> np.ndarray | None:
    """Architecture metadata; returns Llama 3 rope frequency factors when the model uses them (a tensor, not a key)."""
    import gguf

    config = source.config
    n_head, n_head_kv, head_dim = _heads(config)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim * n_head != config["hidden_size"]:  # llama.cpp assumes hidden / heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)

    # transformers >= 5 keeps rope settings in rope_parameters; older configs in rope_theta + rope_scaling.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_rope_freq_base(theta)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
        return None
    if rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        return None
    if rope_type == "llama3":
        return _llama3_rope_factors(rope, head_dim, theta)
    raise BackpropError("INPUT_UNSUPPORTED_ARCHITECTURE", architecture=f"{source.architecture} with rope scaling '{rope_type}'")


def _llama3_rope_factors(rope: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors of Llama 3.x rope scaling, which llama.cpp reads from the rope_freqs tensor."""
    import numpy as np

    factor = rope["factor"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    wavelength = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (old_context / wavelength - low) / (high - low)
    # Short wavelengths keep their frequency, long ones are slowed down by `factor`, the band between is blended.
    blended = 1 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelength < old_context / high, 1.0, np.where(wavelength > old_context / low, factor, blended))
    return factors.astype(np.float32)


# --- tensors -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    name: str  # llama.cpp's name
    shape: tuple[int, ...]  # numpy order: (rows, columns)
    qtype: Any  # gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]  # float32 data, already in llama.cpp's layout


_GLOBAL_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def _gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name for an HF tensor; None for an unknown one."""
    if match := _LAYER_TENSOR.fullmatch(hf_name):
        layer, module, kind = match.groups()
        part = _LAYER_TENSORS.get(module)
        return f"blk.{layer}.{part}.{kind}" if part else None
    module, _, kind = hf_name.rpartition(".")
    part = _GLOBAL_TENSORS.get(module)
    return f"{part}.{kind}" if part else None


def _plan_tensors(source: _Source, quantization: str, rope_factors: np.ndarray | None) -> list[_Tensor]:
    from safetensors import SafetensorError, safe_open

    tied = bool(source.config.get("tie_word_embeddings", False))
    tensors: list[_Tensor] = []
    if rope_factors is not None:
        tensors.append(_Tensor("rope_freqs.weight", rope_factors.shape, _qtype("f32", rope_factors.shape), lambda: rope_factors))
    for path in source.weights:
        try:
            f = safe_open(path, framework="pt")
        except SafetensorError as e:  # a torn download or copy: say which file, not a Rust error
            raise BackpropError("INPUT_MODEL_INVALID", path=str(path), reason=f"unreadable weights ({e})") from e
        with f:
            for hf_name in f.keys():
                if hf_name.endswith("rotary_emb.inv_freq"):  # old checkpoints store it; llama.cpp computes it
                    continue
                if hf_name == "lm_head.weight" and tied:  # llama.cpp reuses token_embd when output is absent
                    continue
                name = _gguf_name(hf_name)
                if name is None:
                    raise BackpropError(
                        "INPUT_UNSUPPORTED_ARCHITECTURE", architecture=f"{source.architecture} (unexpected tensor {hf_name})"
                    )
                shape = tuple(f.get_slice(hf_name).get_shape())
                tensors.append(_Tensor(name, shape, _qtype(quantization, shape), _loader(source, path, hf_name, name)))
    return sorted(tensors, key=_tensor_order)


def _tensor_order(tensor: _Tensor) -> tuple[int, int, str]:
    """token_embd, then the blocks in order, then output_norm and output: the order readers expect."""
    if tensor.name.startswith("blk."):
        return (1, int(tensor.name.split(".")[1]), tensor.name)
    return (2 if tensor.name.startswith("output") else 0, 0, tensor.name)


def _qtype(quantization: str, shape: tuple[int, ...]) -> Any:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    # Norms, biases and rope factors stay F32: they are tiny, and llama.cpp adds or multiplies them in F32.
    if len(shape) == 1 or quantization == "f32":
        return GGMLQuantizationType.F32
    if quantization == "q8_0" and shape[-1] % GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0] == 0:
        return GGMLQuantizationType.Q8_0
    return GGMLQuantizationType.F16


def _loader(source: _Source, path: Path, hf_name: str, name: str) -> Callable[[], np.ndarray]:
    n_head, n_head_kv, _ = _heads(source.config)
    # llama.cpp's "llama" rope rotates adjacent pairs; HF rotates the two halves of each head (qwen2 uses halves in both).
    heads = {".attn_q.": n_head, ".attn_k.": n_head_kv} if source.arch == "llama" else {}
    n_heads = next((n for part, n in heads.items() if part in name), None)

    def load() -> np.ndarray:
        import torch
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:  # torch reads bf16, which numpy cannot
            data = f.get_tensor(hf_name).to(torch.float32).numpy()
        return _interleave_rope_halves(data, n_heads) if n_heads else data

    return load


def _interleave_rope_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from HF's (first half, second half) to llama.cpp's interleaved pairs.

    Row 2i of a head becomes HF row i and row 2i+1 becomes HF row i + head_dim/2, so that the pairs rope rotates
    together sit next to each other. Works for weights (rows, columns) and biases (rows,).
    """
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- tokenizer ---------------------------------------------------------------------------------------------------------


@dataclass
class _Vocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    types: list[int]  # gguf.TokenType
    ids: dict[str, int]  # token text -> id, to look special tokens up
    scores: list[float] | None = None  # SentencePiece only
    merges: list[str] | None = None  # BPE only
    pre: str | None = None  # BPE only: llama.cpp's pre-tokenizer name
    add_space_prefix: bool = False  # SentencePiece only
    tokenizer_json: dict[str, Any] | None = None


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _read_vocab(model_dir: Path, config: dict[str, Any]) -> _Vocab:
    """Tokens, types and merges or scores, sized to the model's embedding (padding rows become unused tokens)."""
    tj_path, sp_path = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    tj = _read_json(tj_path) if tj_path.is_file() else None
    model = (tj or {}).get("model", {})
    if tj and model.get("type") == "BPE" and not model.get("byte_fallback"):
        vocab = _byte_level_bpe_vocab(tj)
    elif sp_path.is_file() and _has_module("sentencepiece"):
        vocab = _sentencepiece_vocab(sp_path, tj)
    elif tj and model.get("type") in ("BPE", "Unigram"):
        vocab = _sentencepiece_vocab_from_json(tj)
    else:
        reason = "no tokenizer.json (or tokenizer.model with the sentencepiece package installed)"
        raise BackpropError("INPUT_MODEL_INVALID", path=str(model_dir), reason=reason)
    vocab.tokenizer_json = tj

    _add_added_tokens(vocab, tj, _read_json(model_dir / "tokenizer_config.json"))
    n_vocab = config["vocab_size"]
    if len(vocab.tokens) > n_vocab:
        reason = f"the tokenizer has {len(vocab.tokens)} tokens but the model embeds only {n_vocab}"
        raise BackpropError("INPUT_MODEL_INVALID", path=str(model_dir), reason=reason)
    _pad(vocab, n_vocab)
    return vocab


def _byte_level_bpe_vocab(tj: dict[str, Any]) -> _Vocab:
    from gguf import TokenType

    ids: dict[str, int] = tj["model"]["vocab"]
    tokens = _by_id(ids)
    # tokenizers >= 0.20 writes merges as pairs, older versions as "a b" strings; GGUF wants the strings.
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return _Vocab("gpt2", tokens, [TokenType.NORMAL] * len(tokens), dict(ids), merges=merges, pre=_pre_tokenizer_name(tj))


def _pre_tokenizer_name(tj: dict[str, Any]) -> str:
    """Which of llama.cpp's built-in pre-tokenizers splits text like this tokenizer.json does."""
    steps = _flatten(tj.get("pre_tokenizer"), "pretokenizers")
    kinds = [step["type"] for step in steps]
    regexes = [step["pattern"].get("Regex") for step in steps if step["type"] == "Split"]
    if len(regexes) == 1 and regexes[0] in PRE_TOKENIZER_REGEXES:
        return PRE_TOKENIZER_REGEXES[regexes[0]]
    byte_level_regex = any(step["type"] == "ByteLevel" and step.get("use_regex", True) for step in steps)
    if kinds == ["ByteLevel"] and byte_level_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and byte_level_regex and steps[0].get("individual_digits"):
        return "smollm"
    log.warning("unknown pre-tokenizer %s: using llama.cpp's default; verify() will show whether it matches", kinds)
    return "default"


def _sentencepiece_vocab(sp_path: Path, tj: dict[str, Any] | None) -> _Vocab:
    import sentencepiece
    from gguf import TokenType

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    add_space_prefix = _adds_space_prefix(tj) if tj else True  # every Llama/Mistral SentencePiece model does
    return _Vocab("llama", tokens, types, {t: i for i, t in enumerate(tokens)}, scores=scores, add_space_prefix=add_space_prefix)


def _sentencepiece_vocab_from_json(tj: dict[str, Any]) -> _Vocab:
    """A SentencePiece vocabulary rebuilt from tokenizer.json (Unigram, or BPE with byte fallback)."""
    from gguf import TokenType

    model = tj["model"]
    if model["type"] == "Unigram":
        tokens = [piece for piece, _ in model["vocab"]]
        scores = [float(score) for _, score in model["vocab"]]
        unk = tokens[model["unk_id"]] if model.get("unk_id") is not None else None
    else:
        tokens = _by_id(model["vocab"])
        # llama.cpp merges the adjacent pair with the highest score: score a token by minus the rank of the merge
        # that makes it, so it merges in BPE's order (SentencePiece's own BPE models are scored the same way).
        merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
        rank: dict[str, int] = {}
        for r, (left, right) in enumerate(merges):
            rank.setdefault(left + right, r)
        scores = [-float(rank.get(token, len(merges))) for token in tokens]
        unk = model.get("unk_token")
    types = [TokenType.BYTE if _BYTE_TOKEN.fullmatch(t) else TokenType.UNKNOWN if t == unk else TokenType.NORMAL for t in tokens]
    ids = {t: i for i, t in enumerate(tokens)}
    return _Vocab("llama", tokens, types, ids, scores=scores, add_space_prefix=_adds_space_prefix(tj))


def _adds_space_prefix(tj: dict[str, Any]) -> bool:
    """Whether text gets a leading '▁' (Prepend normalizer, or a Metaspace pre-tokenizer that prepends).

    llama.cpp prepends to the text after every special token too and even before a leading space, like the Prepend
    normalizer of Llama 2 tokenizers. Metaspace differs at the edges ("first" skips text after special tokens, and no
    scheme prefixes text that already starts with a space); verify() shows when a probe hits such an edge.
    """
    normalizers = _flatten(tj.get("normalizer"), "normalizers")
    if any(n["type"] == "Prepend" for n in normalizers):
        return True
    for step in _flatten(tj.get("pre_tokenizer"), "pretokenizers"):
        if step["type"] == "Metaspace":
            return step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never") != "never"
    return False


def _add_added_tokens(vocab: _Vocab, tj: dict[str, Any] | None, tokenizer_config: dict[str, Any]) -> None:
    """Added tokens: special ones become CONTROL (llama.cpp parses them only when asked), the others USER_DEFINED."""
    from gguf import TokenType

    if tj is not None:
        added = [(t["id"], t["content"], t.get("special", False)) for t in tj.get("added_tokens", [])]
    else:
        decoder = tokenizer_config.get("added_tokens_decoder", {})
        added = [(int(i), t["content"], t.get("special", False)) for i, t in decoder.items()]
    for token_id, content, special in added:
        _pad(vocab, token_id + 1)
        vocab.tokens[token_id] = content
        vocab.ids[content] = token_id
        if vocab.types[token_id] in (TokenType.BYTE, TokenType.UNKNOWN):
            continue  # SentencePiece's <0x..> and <unk> keep their own types
        vocab.types[token_id] = TokenType.CONTROL if special else TokenType.USER_DEFINED


def _pad(vocab: _Vocab, size: int) -> None:
    """Grow the vocabulary to `size` with unused placeholders (embedding rows no token uses)."""
    from gguf import TokenType

    for i in range(len(vocab.tokens), size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(TokenType.UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-10000.0)


def _add_tokenizer(writer: Any, vocab: _Vocab, model_dir: Path, config: dict[str, Any]) -> None:
    from gguf import TokenType

    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)

    tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
    generation_config = _read_json(model_dir / "generation_config.json")
    template = _chat_template(model_dir, tokenizer_config)
    if template:
        writer.add_chat_template(template)

    def token_id(value: Any) -> int | None:
        text = value.get("content") if isinstance(value, dict) else value
        return vocab.ids.get(text) if isinstance(text, str) else None

    def first(value: Any) -> int | None:
        return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None

    # A chat model must stop at the end of its turn, so the template's end-of-turn token is eos (and eot).
    template_text = json.dumps(template) if template else ""
    eot = next((vocab.ids[t] for t in END_OF_TURN_TOKENS if t in vocab.ids and t in template_text), None)
    eos = _first_set(
        eot,
        token_id(tokenizer_config.get("eos_token")),
        first(generation_config.get("eos_token_id")),
        first(config.get("eos_token_id")),
    )
    pad = _first_set(token_id(tokenizer_config.get("pad_token")), first(config.get("pad_token_id")))
    bos = _first_set(token_id(tokenizer_config.get("bos_token")), first(config.get("bos_token_id")))
    # Without a bos key llama.cpp assumes token 11 for BPE vocabularies; name a real token even if it is never added.
    bos = _first_set(bos, pad, eos) if vocab.model == "gpt2" else bos
    unknown = [i for i, t in enumerate(vocab.types) if t == TokenType.UNKNOWN]
    unk = _first_set(token_id(tokenizer_config.get("unk_token")), *unknown[:1])
    for add, value in ((writer.add_bos_token_id, bos), (writer.add_eos_token_id, eos), (writer.add_eot_token_id, eot),
                       (writer.add_pad_token_id, pad), (writer.add_unk_token_id, unk)):  # fmt: skip
        if value is not None:
            add(value)
    # SentencePiece Llama/Mistral tokenizers add bos unless told otherwise; byte-level BPE ones do not.
    add_bos, add_eos = _template_adds(vocab.tokenizer_json, tokenizer_config, default_bos=vocab.model == "llama")
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)


def _first_set(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def _chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | list[dict[str, str]] | None:
    """transformers >= 4.43 saves chat_template.jinja beside the tokenizer; older ones kept it in tokenizer_config."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return tokenizer_config.get("chat_template")


def _template_adds(tj: dict[str, Any] | None, tokenizer_config: dict[str, Any], default_bos: bool) -> tuple[bool, bool]:
    """(adds bos, adds eos) to a single text: what tokenizer.json's post-processor does, else tokenizer_config says."""
    for processor in _flatten((tj or {}).get("post_processor"), "processors"):
        if processor["type"] == "TemplateProcessing":
            single = processor["single"]
            return "SpecialToken" in single[0], "SpecialToken" in single[-1]
    return bool(tokenizer_config.get("add_bos_token", default_bos)), bool(tokenizer_config.get("add_eos_token", False))


# --- llama.cpp quantization --------------------------------------------------------------------------------------------


def _quantize_with_llama_cpp(src: Path, dst: Path, quantization: str) -> None:
    llama_cpp = _require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_QUANTIZATIONS[quantization])
    chatter = logging.getLogger("llama-cpp-python")  # llama-cpp-python routes llama.cpp's log through this logger
    level = chatter.level
    chatter.setLevel(logging.ERROR)
    try:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        chatter.setLevel(level)
    if status != 0:
        raise BackpropError("RUNTIME_GGUF_QUANTIZATION_FAILED", quantization=quantization, reason=f"llama.cpp returned {status}")


# ---------------------------------------------------------------------------------------------------------------------
# verify


def verify(gguf_path: Path, model_dir: Path, quantization: str) -> dict[str, Any]:
    """Load the GGUF in llama.cpp and compare it with the HF model it came from.

    Tokenization of the probes must match transformers exactly, and llama.cpp must generate GREEDY_TOKENS tokens. For
    f32, f16 and q8_0 llama.cpp is also fed transformers' greedy path after a chat prompt (so both see the same tokens):
    its logits must be within `logit_tolerance` of transformers', relative to their scale (`greedy_match` reports
    whether it also picks the same tokens: a real model's q8_0 file may rightly pick the other of two near-tied ones).
    Lower quantizations only have to load and generate."""
    llama_cpp = _require_llama_cpp()
    from training.hf_imports import transformers_class

    hf_tokenizer = transformers_class("AutoTokenizer").from_pretrained(str(model_dir))
    prompt = _probe_prompt(hf_tokenizer)
    exact = quantization.lower() in DIRECT_QUANTIZATIONS
    expected, expected_logits = _greedy_transformers(model_dir, prompt, GREEDY_TOKENS) if exact else (None, None)
    try:
        llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, verbose=False, logits_all=False)
    except (ValueError, RuntimeError) as e:  # llama-cpp-python's "Failed to load model from file"
        raise BackpropError(
            "RUNTIME_GGUF_VERIFICATION_FAILED", path=str(gguf_path), reason=f"llama.cpp cannot load it ({e})"
        ) from e
    try:
        mismatches = []
        for probe in TOKENIZER_PROBES:
            ours = llm.tokenize(probe.encode("utf-8"), add_bos=True, special=True)
            theirs = hf_tokenizer.encode(probe, add_special_tokens=True)
            if ours != theirs:
                mismatches.append({"probe": probe, "gguf": ours, "hf": theirs})
        generated = _greedy_llama_cpp(llama_cpp, llm, prompt, GREEDY_TOKENS)
        forced = _forced_llama_cpp(llama_cpp, llm, prompt, expected) if expected is not None else None
    finally:
        llm.close()

    report: dict[str, Any] = {
        "path": str(gguf_path),
        "quantization": quantization,
        "tokenizer_match": not mismatches,
        "tokenizer_mismatches": mismatches,
        "greedy_match": None,
        "probe_prompt": prompt,
        "probe_tokens": generated,
        "expected_tokens": expected,
        "max_logit_diff": None,
        "llama_cpp_version": llama_cpp.__version__,
    }
    problems = []
    if mismatches:
        first = mismatches[0]["probe"]
        problems.append(
            f"tokenization differs from transformers on {len(mismatches)} of {len(TOKENIZER_PROBES)} probes, e.g. {first!r}"
        )
    if forced is not None and expected is not None and expected_logits is not None:
        layers = _read_json(model_dir / "config.json").get("num_hidden_layers", 1)
        report.update(_logit_check(forced, expected, expected_logits, logit_tolerance(quantization, layers)))
        if report["relative_logit_diff"] > report["tolerance"]:
            problems.append(f"logits differ from transformers' by {report['relative_logit_diff']:.2e} of their scale "
                            f"(tolerance {report['tolerance']:.1e})")  # fmt: skip
    if len(generated) != GREEDY_TOKENS:
        problems.append(f"generated {len(generated)} of {GREEDY_TOKENS} tokens")
    report["ok"] = not problems
    if problems:
        raise BackpropError("RUNTIME_GGUF_VERIFICATION_FAILED", path=str(gguf_path), reason="; ".join(problems), report=report)
    return report


def _logit_check(forced: np.ndarray, expected: list[int], expected_logits: np.ndarray, tolerance: float) -> dict[str, Any]:
    """llama.cpp's logits (`forced`) against transformers' along transformers' greedy path, relative to their scale.
    `greedy_match`: llama.cpp picks transformers' token at every step (reported; within the bound a pick can only
    differ where transformers' top two are within twice the difference, a tie at this precision)."""
    import numpy as np

    scale = float(np.abs(expected_logits).max()) or 1.0
    difference = float(np.abs(forced - expected_logits).max())
    flips = int((forced.argmax(axis=-1) != np.asarray(expected)).sum())
    return {"greedy_match": flips == 0, "greedy_flips": flips, "max_logit_diff": difference,
            "relative_logit_diff": difference / scale, "logit_scale": scale, "tolerance": tolerance}  # fmt: skip


def _probe_prompt(tokenizer: Any) -> list[int]:
    """Token ids of a short chat prompt (plain text when the tokenizer has no chat template)."""
    question = "What is the capital of France?"
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)  # the template already holds any bos
    return tokenizer.encode(question, add_special_tokens=True)


def _greedy_llama_cpp(llama_cpp: ModuleType, llm: Any, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after `prompt`."""
    llm.reset()
    llm.eval(prompt)
    generated: list[int] = []
    for _ in range(n):
        generated.append(int(_last_logits(llama_cpp, llm).argmax()))
        llm.eval([generated[-1]])
    return generated


def _forced_llama_cpp(llama_cpp: ModuleType, llm: Any, prompt: list[int], path: list[int]) -> np.ndarray:
    """llama.cpp's logits for each token of `path` after `prompt`, fed the path itself (teacher forcing)."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    steps = []
    for token in path:
        steps.append(_last_logits(llama_cpp, llm))
        llm.eval([token])
    return np.stack(steps)


def _last_logits(llama_cpp: ModuleType, llm: Any) -> np.ndarray:
    """Without logits_all, llama-cpp-python keeps no scores: the last position's logits, read from llama.cpp."""
    import numpy as np

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def _greedy_transformers(model_dir: Path, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """The reference: the HF model in fp32 on the CPU, n greedy tokens and their logits."""
    import torch

    from training.hf_imports import transformers_class

    model = transformers_class("AutoModelForCausalLM").from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    steps = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids).logits[0, -1]
            steps.append(logits)
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist(), torch.stack(steps).numpy()


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _require(module: str) -> Any:
    import importlib

    require("export", module)
    return importlib.import_module(module)


def _require_llama_cpp() -> Any:
    return _require("llama_cpp")


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _by_id(ids: dict[str, int]) -> list[str]:
    tokens = [""] * (max(ids.values()) + 1)
    for text, i in ids.items():
        tokens[i] = text
    return tokens


def _flatten(step: dict[str, Any] | None, children: str) -> list[dict[str, Any]]:
    """A tokenizer.json normalizer / pre-tokenizer / post-processor as a flat list of steps."""
    if not step:
        return []
    if step["type"] == "Sequence":
        return [leaf for child in step[children] for leaf in _flatten(child, children)]
    return [step]


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())
