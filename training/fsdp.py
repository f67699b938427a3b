"""`--strategy fsdp`: the frozen base weights sharded across the ranks (PyTorch FSDP2), the LoRA weights whole on each.

A LoRA run's memory is the base model. FSDP2's `fully_shard` splits each decoder layer's frozen weights (and, in the
root unit, the embeddings, final norm and head) over the ranks and gathers a layer's weights only while it computes,
so N GPUs hold about 1/N of the model each. The trainable weights are left out of the sharding (`ignored_params`):
every rank keeps them whole, so the optimizer, gradient clipping, checkpoints and the adapter work exactly as under
DDP, and their gradients are averaged once a step as under DDP (`World.average_gradients`).

Every rank must take part in every forward pass (a layer's weights are gathered from all of them): evaluation runs on
all ranks, through the sharded root module (the training step's loss module).
"""

from __future__ import annotations

from typing import Any


def decoder_layers(model: Any) -> list[Any]:
    """The model's repeated blocks, one FSDP unit each: the classes transformers marks as never to be split."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    return layers or list(base.get_decoder().layers)


def shard(root: Any, model: Any, device: str) -> tuple[int, int]:
    """Shard `model`'s frozen weights: a unit per decoder layer, and `root` (a module whose forward runs the whole model,
    holding `model`) for the rest. The trainable weights stay whole, moved to `device` (FSDP moves the shards).
    Returns (frozen elements this rank holds, frozen elements in all)."""
    from torch.distributed.fsdp import fully_shard

    trainable = {p for p in model.parameters() if p.requires_grad}
    for p in trainable:
        p.data = p.data.to(device)
    for layer in decoder_layers(model):
        fully_shard(layer, ignored_params=trainable)
    fully_shard(root, ignored_params=trainable)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in frozen)
    return local, sum(p.numel() for p in frozen)
