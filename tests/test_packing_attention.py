"""Packing keeps examples apart under every attention implementation the trainer may pick on CPU (sdpa, eager):
each packed example's loss equals its loss when run alone."""

from __future__ import annotations

import pytest
from conftest import DEMO_DATA

torch = pytest.importorskip("torch")


def _per_example_losses(model, rows, pad_id: int) -> list[float]:
    """Summed cross-entropy of each example of the batch's rows, in order."""
    import torch.nn.functional as F

    from training.packing import collate

    batch = collate(rows, pad_id, packing=True)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits.float()
    losses = []
    for r, row in enumerate(rows):
        at = 0
        for item in row:
            n = len(item)
            labels = batch.labels[r, at + 1 : at + n]
            keep = labels != -100
            losses.append(float(F.cross_entropy(logits[r, at : at + n - 1][keep], labels[keep], reduction="sum")))
            at += n
    return losses


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_have_the_loss_they_have_alone(tiny_model_dir, attention):
    from training.datasets import load_dataset
    from training.models import ModelSource, load_model, load_tokenizer
    from training.packing import ChatEncoder

    source = ModelSource("demo", str(tiny_model_dir), True)
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=torch.float32, attn_implementation=attention).eval()
    assert model.config._attn_implementation == attention
    examples = load_dataset(str(DEMO_DATA), None, tokenizer=tokenizer).examples
    encoded = [ChatEncoder(tokenizer, 128, response_only=False)(e) for e in examples[:40]]
    encoded = sorted({len(e): e for e in encoded}.values(), key=len)[:4]  # four different lengths
    assert len({len(e) for e in encoded}) == 4

    packed = _per_example_losses(model, [encoded], tokenizer.pad_token_id)
    alone = [_per_example_losses(model, [[e]], tokenizer.pad_token_id)[0] for e in encoded]
    assert all(loss > 0 for loss in alone)
    assert packed == pytest.approx(alone, rel=1e-5)


def test_packed_rows_flattened_into_one_row_as_flash_attention_needs_keep_every_examples_loss(tiny_model_dir):
    """Flash attention reads position ids as boundaries only in a one-row batch: the trainer flattens packed batches
    for it. Flattened (padding included), every example still has the loss it has alone (checked here under sdpa)."""
    from peft import LoraConfig, get_peft_model

    from training.datasets import load_dataset
    from training.models import ModelSource, load_model, load_tokenizer
    from training.packing import ChatEncoder, collate, flatten
    from training.trainer import target_loss

    source = ModelSource("demo", str(tiny_model_dir), True)
    tokenizer = load_tokenizer(source)
    model = get_peft_model(load_model(source, dtype=torch.float32, attn_implementation="sdpa"),
                           LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")).eval()  # fmt: skip
    examples = load_dataset(str(DEMO_DATA), None, tokenizer=tokenizer).examples[:5]
    e = [ChatEncoder(tokenizer, 128)(x) for x in examples]
    rows = [[e[0], e[1]], [e[2]], [e[3], e[4]]]  # rows of different lengths: padding between them once flattened
    batch = collate(rows, tokenizer.pad_token_id, packing=True)
    flat = flatten(batch)
    assert flat.input_ids.shape == (1, batch.input_ids.numel()) and flat.target_tokens == batch.target_tokens

    pad = tokenizer.pad_token_id
    with torch.no_grad():
        by_rows = float(target_loss(model, batch, "cpu"))
        flattened = float(target_loss(model, flat, "cpu"))
        alone = sum(float(target_loss(model, collate([[x]], pad, packing=True), "cpu")) for x in e)
    assert flattened == pytest.approx(alone, rel=1e-5)
    assert by_rows == pytest.approx(alone, rel=1e-5)
