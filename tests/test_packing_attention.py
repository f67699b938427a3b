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
