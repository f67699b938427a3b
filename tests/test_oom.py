"""OOM recovery on any machine: a real training run with torch.OutOfMemoryError injected before a chosen forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DEMO_DATA

from training import Trainer, checkpoints
from training.config import load_settings, nest_options
from training.control import Control
from training.errors import BackpropError
from training.events import read_events
from training.runs import Registry
from training.trainer import MAX_OOM_SPLITS, new_train_run, run_training

# Four padded rows a micro-batch, two micro-batches a step: a split has rows to halve, and an OOM in the second
# micro-batch comes after the first one's gradients were already accumulated. float32 on a GPU machine too: bf16 rounds
# halved batches differently, and the losses are compared closely.
OPTIONS = {"model": "demo", "steps": 5, "batch_size": 4, "gradient_accumulation": 2, "packing": False, "seed": 7,
           "bf16": False}  # fmt: skip


def train(home, before_forward=None, **options):
    registry = Registry(home)
    run = new_train_run(registry, load_settings(**nest_options({**OPTIONS, **options})), str(DEMO_DATA))
    return registry, run, run_training(run, registry, control=Control(before_forward=before_forward))


def events_of(run) -> list[dict]:
    events, _ = read_events(run.path / "events.jsonl")
    return events


def step_losses(run) -> list[float]:
    return [e["loss"] for e in events_of(run) if e["event"] == "step"]


@pytest.mark.slow
def test_an_oom_halves_the_batch_retries_the_step_and_trains_as_if_nothing_happened(home):
    _, reference_run, reference = train(home)
    assert reference.status == "completed" and reference.steps == 5

    passes: list[tuple[int, int, int]] = []
    raised: list[bool] = []

    def oom_once_in_step_2_micro_batch_1(step: int, index: int, rows: int) -> None:
        passes.append((step, index, rows))
        if (step, index) == (2, 1) and not raised:
            raised.append(True)
            raise torch.OutOfMemoryError("injected: CUDA out of memory")

    _, run, result = train(home, oom_once_in_step_2_micro_batch_1)
    assert result.status == "completed" and result.steps == 5

    # Step 2 ran micro-batch 0 whole, hit the OOM in micro-batch 1, then started over in halves of 2 rows; so did every
    # later step (the split is kept for the rest of the run).
    step_2 = [p for p in passes if p[0] == 2]
    assert step_2 == [(2, 0, 4), (2, 1, 4), (2, 0, 2), (2, 0, 2), (2, 1, 2), (2, 1, 2)]
    assert all(rows == 2 for step, _, rows in passes if step > 2)
    warnings = [e for e in events_of(run) if e["event"] == "log" and "out of memory" in e["message"]]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"
    assert (warnings[0]["step"], warnings[0]["rows"], warnings[0]["oom_splits"]) == (2, 2, 1)
    assert "batch halved to 2 rows" in warnings[0]["message"]

    # Splitting rows keeps the summed-loss / target-token arithmetic, and the failed attempt's half-accumulated
    # gradients were dropped: every step's loss is the uninterrupted run's.
    assert step_losses(run) == pytest.approx(step_losses(reference_run), rel=1e-4, abs=1e-5)
    assert result.final_loss == pytest.approx(reference.final_loss, rel=1e-4)


@pytest.mark.slow
def test_oom_on_every_attempt_ends_failed_with_oom_recovery_exhausted_and_a_checkpoint_that_resumes(home):
    attempts: list[int] = []

    def always_oom_from_step_2(step: int, index: int, rows: int) -> None:
        if step >= 2:
            attempts.append(rows)
            raise torch.OutOfMemoryError("injected: CUDA out of memory")

    registry = Registry(home)
    run = new_train_run(registry, load_settings(**nest_options(OPTIONS)), str(DEMO_DATA))
    with pytest.raises(BackpropError) as caught:
        run_training(run, registry, control=Control(before_forward=always_oom_from_step_2))
    assert caught.value.code == "RUNTIME_OOM_RECOVERY_EXHAUSTED"
    assert "step 2 even at batch size 1" in caught.value.message and "checkpoint of step 1" in caught.value.message
    assert attempts == [4, 2, 1, 1][: MAX_OOM_SPLITS + 1]  # 4 rows, halved each time, one row cannot be split

    record = registry.get(run.id)
    assert (record.status, record.error_code, record.step) == ("failed", "RUNTIME_OOM_RECOVERY_EXHAUSTED", 1)
    events = events_of(run)
    assert [e["oom_splits"] for e in events if e["event"] == "log" and "out of memory" in e["message"]] == [1, 2, 3]
    failed = [e for e in events if e["event"] == "failed"]
    assert len(failed) == 1 and failed[0]["code"] == "RUNTIME_OOM_RECOVERY_EXHAUSTED"

    # The last good step (1) is saved although save_every (50) had not come: a readable checkpoint of step 1...
    saved = registry.checkpoints(run.id)
    assert [c.step for c in saved] == [1]
    assert checkpoints.is_readable(Path(saved[0].path))
    assert any(e["event"] == "checkpoint_saved" and e["step"] == 1 for e in events)
    # ... that `backprop resume` continues from.
    resumed = Trainer().resume(run.id)
    assert resumed.status == "completed" and resumed.steps == 5
    started = [e for e in events_of(run) if e["event"] == "started"]
    assert started[-1]["resumed_from"] == 1


@pytest.mark.slow
def test_oom_in_the_first_step_ends_failed_without_inventing_a_checkpoint(home):
    def always_oom(step: int, index: int, rows: int) -> None:
        raise torch.OutOfMemoryError("injected: CUDA out of memory")

    registry = Registry(home)
    run = new_train_run(registry, load_settings(**nest_options(OPTIONS)), str(DEMO_DATA))
    with pytest.raises(BackpropError) as caught:
        run_training(run, registry, control=Control(before_forward=always_oom))
    assert caught.value.code == "RUNTIME_OOM_RECOVERY_EXHAUSTED" and "checkpoint" not in caught.value.message
    assert registry.get(run.id).status == "failed" and registry.checkpoints(run.id) == []
