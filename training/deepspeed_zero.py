"""`--strategy deepspeed-zero2|deepspeed-zero3`: DeepSpeed's ZeRO engine runs the step (the `dist` extra).

ZeRO-2 partitions the optimizer state and the gradients over the ranks; ZeRO-3 the weights too (the frozen base and the
LoRA weights), gathered layer by layer while they compute. The engine owns the step: backward passes accumulate until
the step's last one (an accumulation boundary), then `step` reduces the gradients (averaged over the ranks), clips
them, steps Backprop's AdamW and learning-rate schedule, and zeroes the gradients.

Checkpoints keep Backprop's layout (the adapter weights, gathered for rank 0 to write, the schedule and the RNG) plus
the engine's partitioned optimizer state in `zero/`, written by every rank: on several machines the run folder must be
on a shared file system.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TAG = "zero"  # the engine's checkpoint folder inside a Backprop checkpoint


class Zero:
    def __init__(self, loss_module: Any, model: Any, optimizer: Any, scheduler: Any, stage: int, max_grad_norm: float,
                 micro_batch: int) -> None:  # fmt: skip
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,  # the loop marks each step's last pass itself (`backward`)
            "gradient_clipping": max_grad_norm,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,  # Backprop's own AdamW (training/trainer.py adamw)
            "steps_per_print": 1 << 30,
        }
        if stage == 3:
            # The loss module reads the head's weight itself (training/loss.py): ZeRO-3 gathers it for that module too.
            head = model.get_base_model().get_output_embeddings()
            for param in head.parameters():
                deepspeed.zero.register_external_parameter(loss_module, param)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, _optimizer, _, _scheduler = deepspeed.initialize(
            model=loss_module, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )

    def frozen_share(self) -> tuple[int, int]:
        """(frozen elements this rank holds, frozen elements in all): ZeRO-3 keeps 1/N of each on a rank."""
        frozen = [p for p in self.engine.module.parameters() if not p.requires_grad]
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in frozen)
        return local, sum(getattr(p, "ds_numel", p.numel()) for p in frozen)

    def __call__(self, *args: Any) -> Any:
        return self.engine(*args)

    def backward(self, loss: Any, boundary: bool) -> None:
        """Accumulate `loss`'s gradients; at the step's last pass (`boundary`) the engine reduces them."""
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)

    def step(self) -> float:
        """Clip, step the optimizer and the schedule, zero the gradients; returns the gradient norm before clipping."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def whole_adapter(self) -> Any:
        """A context in which every rank holds the LoRA weights whole (ZeRO-3 gathers them; ZeRO-2 has them)."""
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.trainable, modifier_rank=None)

    def save(self, checkpoint: Path) -> None:
        """Every rank writes its part of the optimizer state into `checkpoint`/zero (the frozen weights are left out)."""
        self.engine.save_checkpoint(str(checkpoint), tag=TAG, save_latest=False, exclude_frozen_parameters=True)

    def load(self, checkpoint: Path) -> None:
        """Every rank reads its part of the optimizer state back (the schedule and RNG come from Backprop's files)."""
        self.engine.load_checkpoint(str(checkpoint), tag=TAG, load_module_strict=False, load_optimizer_states=True,
                                    load_lr_scheduler_states=False)  # fmt: skip
