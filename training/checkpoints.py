"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    RUN_DIR/checkpoints/step-000050/
        adapter_model.safetensors, adapter_config.json   the LoRA weights (a loadable peft adapter)
        optimizer.pt                                     optimizer and LR-scheduler state, RNG states
        trainer_state.json                               step, micro-batch position, tokens seen

Each checkpoint is written to a hidden staging folder and renamed into place, so a crash leaves the
previous checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from training import atomic
from training.errors import BackpropError


@dataclass
class TrainerState:
    step: int
    micro_batch: int  # global index of the next micro-batch to read
    tokens_seen: int
    loss: float | None


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def save(run_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: TrainerState) -> Path:
    import torch

    target = checkpoint_dir(run_dir, state.step)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
            },
            staging / "optimizer.pt",
        )
        (staging / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
        atomic.publish_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load(path: Path, model: Any, optimizer: Any, scheduler: Any) -> TrainerState:
    """Restore adapter weights, optimizer, scheduler and RNG from a checkpoint folder."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        state = TrainerState(**json.loads((path / "trainer_state.json").read_text()))
        weights = load_file(str(path / "adapter_model.safetensors"))
        extra = torch.load(path / "optimizer.pt", weights_only=False, map_location="cpu")
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise BackpropError("STATE_CHECKPOINT_CORRUPT", path=path, reason=exc) from exc
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["torch_rng"])
    random.setstate(extra["python_rng"])
    return state


def is_readable(path: Path) -> bool:
    return all((path / name).is_file() for name in ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt"))
