"""Speed and memory features for CUDA, exercised on CPU where their logic allows: the optimizer, gradient checkpointing."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")


def _params(seed: int = 0) -> list:
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]


def _train(optimizer, params, steps: int) -> None:
    for i in range(steps):
        optimizer.zero_grad()
        sum(((p - i) ** 2).sum() for p in params).backward()
        optimizer.step()


@pytest.mark.parametrize("saved_fused", [True, False])
def test_an_optimizer_state_saved_fused_or_not_resumes_into_this_machines_optimizer(saved_fused):
    """A checkpoint from a CUDA machine (fused AdamW) resumes on a CPU one and the other way: same steps as never stopped."""
    from training.trainer import adamw, fit_optimizer_state

    params = _params()
    assert adamw(params, 1e-2, 0.01).param_groups[0]["fused"] is None  # CPU parameters: torch's default, not fused
    saved = adamw(params, 1e-2, 0.01, fused=saved_fused)
    _train(saved, params, 3)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]

    resumed = adamw(resumed_params, 1e-2, 0.01, fused=not saved_fused)
    resumed.load_state_dict(copy.deepcopy(saved.state_dict()))
    fit_optimizer_state(resumed)
    assert resumed.param_groups[0]["fused"] is None  # on CPU, whatever the checkpoint's machine did
    _train(saved, params, 2)
    _train(resumed, resumed_params, 2)
    for a, b in zip(params, resumed_params, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_gradient_checkpointing_is_needed_when_a_micro_batch_would_not_fit_in_free_vram():
    from training.memory import DecoderShape
    from training.models import needs_gradient_checkpointing

    # Qwen2.5-1.5B's public shape (layers, hidden, intermediate, vocabulary, key/value width); LoRA r=16, bf16 weights
    qwen_1_5b = DecoderShape(28, 1536, 8960, 151_936, 256)
    step = dict(element_bytes=2, adapter_bytes=4, lora_r=16, trainable_params=18_464_768)
    gb = 10**9
    assert needs_gradient_checkpointing(20 * gb, qwen_1_5b, 8, 2048, **step)  # ~72.6 GB needed
    assert not needs_gradient_checkpointing(141 * gb, qwen_1_5b, 8, 2048, **step)  # an H200
    assert not needs_gradient_checkpointing(20 * gb, qwen_1_5b, 1, 2048, **step)  # one row fits
    # At 80 GB free the float32 adapters' saved inputs decide it: bf16 adapters fit, float32 ones do not.
    assert needs_gradient_checkpointing(80 * gb, qwen_1_5b, 8, 2048, **step)
    assert not needs_gradient_checkpointing(80 * gb, qwen_1_5b, 8, 2048, **{**step, "adapter_bytes": 2})
    qwen_0_5b = DecoderShape(24, 896, 4864, 151_936, 128)
    assert not needs_gradient_checkpointing(80 * gb, qwen_0_5b, 8, 2048, **step)


def test_attention_is_sdpa_on_cpu_and_flash_attention_is_refused_there():
    from training.errors import BackpropError
    from training.models import attention_implementation

    assert attention_implementation("auto", "cpu", torch.float32) == "sdpa"
    assert attention_implementation("auto", "cpu", torch.bfloat16) == "sdpa"
    assert attention_implementation("eager", "cpu", torch.float32) == "eager"
    with pytest.raises(BackpropError) as err:
        attention_implementation("flash_attention_2", "cpu", torch.bfloat16)
    assert err.value.code == "INPUT_INVALID_ARGUMENT"


def test_a_run_with_gradient_checkpointing_forced_on_trains_with_the_same_losses(home):
    from conftest import DEMO_DATA

    from training import Trainer
    from training.events import read_events

    def run(**options):
        result = Trainer("demo").train(DEMO_DATA, steps=3, **options)
        assert result.status == "completed"
        events, _ = read_events(result.run_dir / "events.jsonl")
        return result, events

    plain, plain_events = run(gradient_checkpointing=False)
    checkpointed, events = run(gradient_checkpointing=True)
    started = next(e for e in events if e["event"] == "started")
    assert started["gradient_checkpointing"] is True and started["attention"] == "sdpa"
    assert started["loss_kernel"] == "chunked"
    assert any(e["event"] == "log" and e["message"].startswith("gradient checkpointing on") for e in events)
    assert next(e for e in plain_events if e["event"] == "started")["gradient_checkpointing"] is False
    assert next(e for e in events if e["event"] == "completed")["peak_vram_mb"] is None  # no CUDA here
    # Step 1 is computed before any update; later steps show that the recomputed backward gave the same gradients.
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-4)
    assert checkpointed.losses[0] != checkpointed.losses[-1]
