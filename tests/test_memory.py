"""The automatic batch size: a memory estimate checked against an H100's measurements, and the trainer's use of it."""

from __future__ import annotations

import json

import pytest
from conftest import DEMO_DATA

from training.memory import GIB, DecoderShape, activation_bytes_per_token, auto_batch_size, step_bytes

# Public configs of Qwen2.5-0.5B and -1.5B (head_dim 64 and 128, two key/value heads).
QWEN_05B = DecoderShape(layers=24, hidden=896, intermediate=4864, vocab=151936, kv_hidden=2 * 64)
QWEN_15B = DecoderShape(layers=28, hidden=1536, intermediate=8960, vocab=151936, kv_hidden=2 * 128)
SEQ = 2048


@pytest.mark.parametrize(
    ("shape", "adapter_bytes", "measured_gib"),
    [(QWEN_05B, 4, 3.7603), (QWEN_05B, 2, 2.4844), (QWEN_15B, 4, 7.8372), (QWEN_15B, 2, 5.2276)],
)
def test_the_activation_estimate_is_within_two_percent_of_what_an_h100_measured(shape, adapter_bytes, measured_gib):
    """Reference: memory kept after the forward pass per extra row of 2048 tokens, bf16, LoRA r=16 on all linear layers,
    sdpa, float32 (peft's default) or bf16 adapters; torch 2.11, transformers 5.17, peft 0.21 on one H100."""
    estimated = activation_bytes_per_token(shape, element_bytes=2, adapter_bytes=adapter_bytes, lora_r=16) * SEQ / GIB
    assert estimated == pytest.approx(measured_gib, rel=0.02)


def test_the_shape_is_read_from_a_transformers_config():
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936)  # fmt: skip
    assert DecoderShape.from_config(config) == QWEN_05B


@pytest.mark.parametrize("shape", [QWEN_05B, QWEN_15B])
def test_the_batch_size_grows_with_free_memory_in_powers_of_two_up_to_64(shape):
    sizes = [auto_batch_size(gib * GIB, shape, SEQ) for gib in (0, 1, 6, 10, 20, 40, 70, 139, 1000, 10_000)]
    assert sizes == sorted(sizes), sizes
    assert all(s in (1, 2, 4, 8, 16, 32, 64) for s in sizes)
    assert sizes[0] == sizes[1] == 1 and sizes[-1] == 64


@pytest.mark.parametrize("gib", [10, 20, 40, 70, 139])
def test_the_chosen_batch_fits_with_headroom_and_twice_it_would_not(gib):
    free = gib * GIB
    for shape in (QWEN_05B, QWEN_15B):
        size = auto_batch_size(free, shape, SEQ)
        if size > 1:
            assert step_bytes(shape, size, SEQ) < 0.9 * free - GIB
        assert step_bytes(shape, 2 * size, SEQ) > 0.9 * free - GIB


def test_sizes_for_qwen_shapes_at_2048_tokens():
    """What an 80 GB card (about 70 GiB free next to the weights) and a 12 GB one (about 10 GiB free) get."""
    assert auto_batch_size(70 * GIB, QWEN_05B, SEQ) == 8  # float32 adapters: 3.8 GiB a row, 4.6 GiB of logits chunk
    assert auto_batch_size(70 * GIB, QWEN_05B, SEQ, adapter_bytes=2) == 16  # bf16 adapters: 2.5 GiB a row
    assert auto_batch_size(70 * GIB, QWEN_15B, SEQ) == 4
    assert auto_batch_size(10 * GIB, QWEN_05B, SEQ) == 1
    assert auto_batch_size(10 * GIB, QWEN_15B, SEQ) == 1  # one row does not fit: gradient checkpointing's case


def test_a_bigger_model_a_longer_sequence_or_all_logits_at_once_never_get_a_bigger_batch():
    for gib in (10, 20, 40, 70, 139):
        free = gib * GIB
        small = auto_batch_size(free, QWEN_05B, SEQ)
        assert auto_batch_size(free, QWEN_15B, SEQ) <= small
        assert auto_batch_size(free, QWEN_05B, 2 * SEQ) <= small
        assert auto_batch_size(free, QWEN_05B, SEQ, logit_chunk_rows=None) <= small
        assert auto_batch_size(free, QWEN_05B, SEQ, weights_bytes=int(GIB)) <= small


def test_tiny_free_memory_gives_one():
    assert auto_batch_size(0, QWEN_05B, SEQ) == 1
    assert auto_batch_size(512 * 2**20, DecoderShape(layers=2, hidden=64, intermediate=128, vocab=256, kv_hidden=64), 64) == 1


# ------------------------------------------------------------------ the trainer


def _loop(home, **options):
    """A training loop of a registered run with the demo model loaded as LoRA, as far as choosing a batch size needs."""
    from peft import LoraConfig, get_peft_model

    from training.config import load_settings, nest_options
    from training.control import Control
    from training.events import EventWriter
    from training.models import load_model, resolve_model
    from training.runs import Registry
    from training.trainer import _Loop, new_train_run

    registry = Registry(home)
    settings = load_settings(**nest_options({"model": "demo", "steps": 2, **options}))
    run = new_train_run(registry, settings, str(DEMO_DATA))
    spec = json.loads((run.path / "spec.json").read_text())
    loop = _Loop(run, registry, settings, spec, EventWriter(run.path / "events.jsonl"), Control())
    loop.device = "cpu"
    lora = settings.lora
    loop.model = get_peft_model(load_model(resolve_model("demo", settings.home)),
                                LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules,
                                           task_type="CAUSAL_LM"))  # fmt: skip
    return loop, run


def _logs(run) -> list[dict]:
    from training.events import read_events

    events, _ = read_events(run.path / "events.jsonl")
    return [e for e in events if e["event"] == "log"]


def test_the_trainer_picks_a_batch_size_from_the_free_memory_it_is_given_and_keeps_it_in_the_spec(home):
    loop, run = _loop(home)
    shape = DecoderShape.from_config(loop.model.config)
    assert shape.vocab == loop.model.config.vocab_size and shape.layers == loop.model.config.num_hidden_layers

    size = loop._batch_size(free_bytes=2 * GIB)
    assert 1 < size < 64 and size & (size - 1) == 0
    # float32 on CPU, LoRA r=16 on all linear layers, rows of max_seq_length tokens.
    assert step_bytes(shape, size, 1024, element_bytes=4, adapter_bytes=4) < 0.9 * 2 * GIB - GIB
    assert json.loads((run.path / "spec.json").read_text())["auto_batch_size"] == size
    loop.events.close()
    said = [e for e in _logs(run) if "auto batch size" in e["message"]]
    assert len(said) == 1 and said[0]["batch_size"] == size and said[0]["free_vram_gb"] == 2.0
    assert f"auto batch size {size} from 2.0 GiB free VRAM" in said[0]["message"]

    # A resumed run reads the same batches: the size in spec.json wins over a new figure.
    assert loop._batch_size(free_bytes=40 * GIB) == size


def test_more_free_memory_gives_the_trainer_a_bigger_batch(home):
    small, _ = _loop(home)
    big, _ = _loop(home)
    assert small._batch_size(free_bytes=1.2 * GIB) == 1
    assert big._batch_size(free_bytes=40 * GIB) == 64


def test_a_given_batch_size_is_kept_and_cpu_without_a_figure_uses_the_configured_size(home):
    given, run = _loop(home, batch_size=3)
    assert given._batch_size(free_bytes=40 * GIB) == 3
    assert "auto_batch_size" not in json.loads((run.path / "spec.json").read_text())
    unset, _ = _loop(home)
    assert unset._batch_size() == unset.t.batch_size  # on CPU nothing reads CUDA
