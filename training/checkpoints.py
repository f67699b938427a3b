"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    RUN_DIR/checkpoints/step-000050/
        adapter_model.safetensors, adapter_config.json   the LoRA weights (a loadable peft adapter)
        optimizer.pt                                     optimizer and LR-scheduler state, RNG states (CPU, CUDA,
                                                         Python, numpy)
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
    world_size: int = 1  # processes that trained it: the global batch position means the same only for the same count


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def new_staging(run_dir: Path, step: int) -> Path:
    """A fresh folder beside where step `step`'s checkpoint goes, to fill and then publish (`save`)."""
    target = checkpoint_dir(run_dir, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def save(run_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: TrainerState, staging: Path | None = None) -> Path:
    """Write the checkpoint of `state.step` into `staging` (new if not given; it may hold more files already, e.g. an
    engine's optimizer state) and publish it in one rename. `optimizer` None: its state lives elsewhere (DeepSpeed)."""
    import torch

    target = checkpoint_dir(run_dir, state.step)
    staging = staging or new_staging(run_dir, state.step)
    try:
        model.save_pretrained(staging, save_embedding_layers=False)  # new tokens' rows are in the adapter's tensors
        optimizer_state = optimizer.state_dict() if optimizer is not None else None
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), **rng_states()}, staging / "optimizer.pt")
        (staging / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
        atomic.publish_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load(path: Path, model: Any, optimizer: Any, scheduler: Any) -> TrainerState:
    """Restore adapter weights, optimizer, scheduler and RNG from a checkpoint folder."""
    return apply(read(path), model, optimizer, scheduler)


def read(path: Path) -> tuple[TrainerState, dict[str, Any], dict[str, Any]]:
    """A checkpoint's contents (state, adapter weights, optimizer/scheduler/RNG), e.g. for rank 0 to send to the others."""
    import torch
    from safetensors.torch import load_file

    try:
        state = TrainerState(**json.loads((path / "trainer_state.json").read_text()))
        weights = load_file(str(path / "adapter_model.safetensors"))
        extra = torch.load(path / "optimizer.pt", weights_only=False, map_location="cpu")
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise BackpropError("STATE_CHECKPOINT_CORRUPT", path=path, reason=exc) from exc
    return state, weights, extra


def recorded_world_size(path: Path) -> int:
    """How many processes trained the checkpoint at `path` (1 for those written before it was recorded)."""
    try:
        return int(json.loads((path / "trainer_state.json").read_text()).get("world_size", 1))
    except (OSError, ValueError) as exc:
        raise BackpropError("STATE_CHECKPOINT_CORRUPT", path=path, reason=exc) from exc


def apply(
    contents: tuple[TrainerState, dict[str, Any], dict[str, Any]], model: Any, optimizer: Any, scheduler: Any
) -> TrainerState:
    """Put what `read` returned into the model, optimizer, scheduler and RNG."""
    from peft import set_peft_model_state_dict

    state, weights, extra = contents
    set_peft_model_state_dict(model, weights)
    if extra["optimizer"] is not None:  # None: DeepSpeed's engine keeps it (training/deepspeed_zero.py)
        optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    restore_rng_states(extra)
    return state


def rng_states() -> dict[str, Any]:
    """Every random number generator a training step may draw from (dropout on CUDA draws from the GPU's own)."""
    import torch

    states: dict[str, Any] = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    states["cuda_rng"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        import numpy

        states["numpy_rng"] = numpy.random.get_state()
    except ImportError:
        states["numpy_rng"] = None
    return states


def restore_rng_states(saved: dict[str, Any]) -> None:
    """Restore what `rng_states` saved. CUDA states are restored per device that exists now (a checkpoint from a
    GPU machine resumed on a CPU one keeps the CPU's); checkpoints from older versions lack some keys."""
    import torch

    torch.set_rng_state(saved["torch_rng"])
    random.setstate(saved["python_rng"])
    cuda = saved.get("cuda_rng")
    if cuda and torch.cuda.is_available():
        for index, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
    if saved.get("numpy_rng") is not None:
        import numpy

        numpy.random.set_state(saved["numpy_rng"])


def is_readable(path: Path) -> bool:
    return all((path / name).is_file() for name in ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt"))
