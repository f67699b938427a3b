"""The loss through the output head: chunked (never all logits at once) equals the plain cross-entropy, value and gradients."""

from __future__ import annotations

import pytest
from conftest import DEMO_DATA

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("chunk_rows", [1, 7, 16, 64, 1000])
def test_chunked_cross_entropy_equals_plain_loss_and_hidden_gradient(chunk_rows):
    import torch.nn.functional as F

    from training.loss import head_loss, loss_kernel

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500, bias=False).requires_grad_(False)
    hidden = torch.randn(64, 32) * 3  # 64 rows: chunks of 7 do not divide them
    labels = torch.randint(0, 500, (64,))
    assert loss_kernel(head, "cpu") == "chunked"

    plain_in = hidden.clone().requires_grad_()
    plain = F.cross_entropy(head(plain_in), labels, reduction="sum")
    (plain * 0.5).backward()  # a grad_output other than 1 reaches the stored gradient too
    chunked_in = hidden.clone().requires_grad_()
    chunked = head_loss(chunked_in, head, labels, "chunked", chunk_rows=chunk_rows)
    (chunked * 0.5).backward()

    assert torch.allclose(chunked, plain, rtol=1e-6, atol=1e-5)
    assert torch.allclose(chunked_in.grad, plain_in.grad, rtol=1e-5, atol=1e-7)


def test_chunked_cross_entropy_with_a_frozen_bias_and_without_gradients():
    import torch.nn.functional as F

    from training.loss import head_loss

    torch.manual_seed(1)
    head = torch.nn.Linear(16, 100).requires_grad_(False)
    hidden, labels = torch.randn(30, 16), torch.randint(0, 100, (30,))
    expected = F.cross_entropy(head(hidden), labels, reduction="sum")
    with torch.no_grad():  # evaluation: no gradient is computed or kept
        assert torch.allclose(head_loss(hidden, head, labels, "chunked", chunk_rows=8), expected, rtol=1e-6)


def _lora_model(model_dir, added_rows: bool = False):
    from peft import LoraConfig, get_peft_model

    from training.models import ModelSource, load_model, load_tokenizer, new_tokens
    from training.trainer import _token_rows

    source = ModelSource(str(model_dir), str(model_dir), True)
    tokenizer = load_tokenizer(source)
    torch.manual_seed(0)
    model = load_model(source, dtype=torch.float32, tokenizer=tokenizer)
    added = new_tokens(tokenizer)
    assert bool(added) == added_rows
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                        trainable_token_indices=_token_rows(model, added) if added else None)  # fmt: skip
    model = get_peft_model(model, config)
    # LoRA B starts at zero; move it so that every LoRA weight gets a gradient worth comparing.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model, tokenizer


def _batch(tokenizer, rows: int = 6):
    from training.datasets import load_dataset
    from training.packing import BatchPlan, ChatEncoder, collate

    examples = load_dataset(str(DEMO_DATA), None, tokenizer=tokenizer).examples[: rows * 3]
    encoded = [ChatEncoder(tokenizer, 128)(e) for e in examples]
    plan = BatchPlan(encoded, rows, 128, True, 0, tokenizer.pad_token_id)
    return collate(plan.epoch(0)[0], tokenizer.pad_token_id, True)


def _loss_and_grads(model, batch, kernel: str) -> tuple[float, dict]:
    from training.trainer import target_loss

    model.zero_grad(set_to_none=True)
    loss = target_loss(model, batch, "cpu", kernel)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_training_step_has_the_same_loss_and_lora_gradients_chunked_as_plain(tiny_model_dir, monkeypatch):
    from training import loss as loss_module

    model, tokenizer = _lora_model(tiny_model_dir)
    batch = _batch(tokenizer)
    assert batch.target_tokens > 20
    head = model.get_base_model().get_output_embeddings()
    assert loss_module.loss_kernel(head, "cpu") == "chunked"  # the head is frozen under LoRA

    plain_loss, plain_grads = _loss_and_grads(model, batch, "plain")
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", 7)  # several chunks, the last one short
    chunked_loss, chunked_grads = _loss_and_grads(model, batch, "chunked")

    assert chunked_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain_grads.keys() == chunked_grads.keys() and any("lora_A" in n for n in plain_grads)
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        # float32 sums in another order: equal to ~1e-6 of the gradient's scale
        assert torch.allclose(chunked_grads[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max())), name


def test_a_trained_output_head_takes_the_plain_path_and_gets_its_gradient(plain_model_dir):
    """A model given ChatML tokens trains their output rows: the chunked loss (frozen head only) must not be used."""
    from training.loss import loss_kernel

    model, tokenizer = _lora_model(plain_model_dir, added_rows=True)
    head = model.get_base_model().get_output_embeddings()
    assert loss_kernel(head, "cpu", "auto") == "plain"
    assert loss_kernel(head, "cpu", "chunked") == "plain"  # even when asked: chunking cannot train the head

    loss, grads = _loss_and_grads(model, _batch(tokenizer), "auto")
    assert loss > 0
    head_grads = [g for n, g in grads.items() if "lm_head" in n]
    assert head_grads and all(g.abs().sum() > 0 for g in head_grads)
