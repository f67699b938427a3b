"""How much GPU memory a LoRA training step needs, and the batch size that fits a given free-memory figure.

Pure arithmetic (no torch, no GPU): the trainer calls `auto_batch_size` with `torch.cuda.mem_get_info()`'s free
bytes, read after the model is on the GPU; tests call it with any figure.

What a step holds, for a Qwen2/Llama decoder under LoRA without gradient checkpointing (bytes per token and layer;
h hidden size, kv key/value width, i MLP width, e the activations' element size, a the LoRA weights'):

    8h                 the two RMSNorms' float32 copies of their input (HF norms upcast)
    e(2h + 2kv)        attention (sdpa): q, k, v and its output
    3e*i               MLP: gate, silu(gate), up
    LoRA inputs        a(6h + i) when the adapters are wider than the activations (peft keeps them in float32 by
                       default, and lora_A saves its own float32 copy of every input); else e(2h + i): the inputs
                       the adapters share with the frozen layers (two norm outputs, the MLP product)
    7r*a               the seven lora_A outputs

Measured on an H100 (bf16, r=16, 2048 tokens a row, torch 2.11, transformers 5.17, peft 0.21), within 1% of these:
Qwen2.5-0.5B shape 82.1 KB (float32 adapters) / 54.3 KB (bf16 adapters); 1.5B shape 146.7 KB / 97.9 KB.

The loss adds one chunk of logits at a time (training/loss.py: 4096 rows, ~8 bytes per logit: the head's output,
its float32 copy, the bf16 probabilities); a trained output head (new tokens) takes the plain path, all rows at
once at ~12 bytes each (measured 11.5-13.7). AdamW adds 12 bytes per trainable parameter (gradient, two moments).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 2**30
LOGIT_CHUNK_ROWS = 4096  # as training/loss.py CHUNK_ROWS
CHUNKED_LOGIT_BYTES = 8  # per logit element, one chunk at a time
PLAIN_LOGIT_BYTES = 12  # per logit element, every target row at once (the plain loss)
HEADROOM_FRACTION = 0.10  # of the free memory: the caching allocator's fragmentation with varied lengths
HEADROOM_BYTES = 1 * GIB  # cuBLAS/attention workspaces, the optimizer's first step, the CUDA graph of the loss
MAX_BATCH = 64


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a decoder-only transformer that decide its activation memory."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_hidden: int  # key/value width: num_key_value_heads * head_dim (GQA makes it smaller than hidden)

    @classmethod
    def from_config(cls, config: Any) -> DecoderShape:
        """From a transformers config (Llama, Qwen2, Mistral, ... naming)."""
        hidden = config.hidden_size
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
        return cls(config.num_hidden_layers, hidden, intermediate, config.vocab_size, kv_heads * head_dim)


def activation_bytes_per_token(shape: DecoderShape, *, element_bytes: int = 2, adapter_bytes: int = 4, lora_r: int = 16) -> int:
    """Bytes the backward pass keeps per token across all layers (see the module docstring for the terms)."""
    h, kv, i, e, a = shape.hidden, shape.kv_hidden, shape.intermediate, element_bytes, adapter_bytes
    lora_inputs = a * (6 * h + i) if a > e else e * (2 * h + i)
    per_layer = 8 * h + e * (2 * h + 2 * kv) + 3 * e * i + lora_inputs + 7 * lora_r * a
    # Outside the layers: the embeddings' output, the final norm and the loss's gradient buffer.
    return shape.layers * per_layer + (4 + 3 * e) * h


def step_bytes(
    shape: DecoderShape,
    rows: int,
    max_seq_length: int,
    *,
    element_bytes: int = 2,
    adapter_bytes: int = 4,
    lora_r: int = 16,
    trainable_params: int = 0,
    logit_chunk_rows: int | None = LOGIT_CHUNK_ROWS,
) -> int:
    """GPU memory one training step of `rows` full-length rows needs beyond the model weights.

    `logit_chunk_rows=None`: the loss materialises every row's logits at once (a trained output head)."""
    tokens = rows * max_seq_length
    activations = tokens * activation_bytes_per_token(shape, element_bytes=element_bytes, adapter_bytes=adapter_bytes,
                                                      lora_r=lora_r)  # fmt: skip
    if logit_chunk_rows is None:
        logits = tokens * shape.vocab * PLAIN_LOGIT_BYTES
    else:
        logits = min(tokens, logit_chunk_rows) * shape.vocab * CHUNKED_LOGIT_BYTES
    optimizer = trainable_params * 12
    return activations + logits + optimizer


def auto_batch_size(
    free_bytes: float,
    shape: DecoderShape,
    max_seq_length: int,
    *,
    weights_bytes: int = 0,
    max_batch: int = MAX_BATCH,
    **step: Any,
) -> int:
    """The largest power of two (1 to `max_batch`) whose step fits `free_bytes`, after headroom.

    `free_bytes` is read with the model already on the GPU; `weights_bytes` counts weights still to be loaded when it
    was read before. `step` goes to `step_bytes` (element_bytes, adapter_bytes, lora_r, trainable_params,
    logit_chunk_rows). Every row is counted at `max_seq_length` tokens (a packed row, or the longest padded one).
    1 when not even one row fits: OOM recovery cannot split a single row, gradient checkpointing is the way on."""
    budget = free_bytes * (1 - HEADROOM_FRACTION) - HEADROOM_BYTES - weights_bytes
    size = 1
    while size * 2 <= max_batch and step_bytes(shape, size * 2, max_seq_length, **step) <= budget:
        size *= 2
    return size
