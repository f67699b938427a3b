"""The library in three lines:

    from training import Trainer
    trainer = Trainer("demo")
    run = trainer.train("my_data.jsonl", steps=100)

Each `train` call is a run in the registry, exactly like `backprop train`: `backprop list` shows it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.config import load_settings, nest_options
from training.events import EventSink
from training.runs import Registry
from training.trainer import Control, TrainResult, new_train_run, run_training


class Trainer:
    def __init__(self, model: str | None = None, **options: Any):
        """`options` are the flat names of `backprop train --help` (lr, batch_size, lora_r, ...)."""
        self.options = {"model": model, **options}
        self.last_run: TrainResult | None = None

    def train(
        self,
        data: str | Path,
        steps: int | None = None,
        epochs: float | None = None,
        *,
        format: str | None = None,
        skip_invalid: bool = False,
        name: str | None = None,
        on_event: EventSink | None = None,
        **options: Any,
    ) -> TrainResult:
        settings = load_settings(**nest_options({**self.options, "steps": steps, "epochs": epochs, **options}))
        registry = Registry(settings.home)
        run = new_train_run(registry, settings, str(data), fmt=format, skip_invalid=skip_invalid, name=name)
        self.last_run = run_training(run, registry, control=Control(), on_event=on_event)
        return self.last_run

    def resume(self, run_id: str, on_event: EventSink | None = None) -> TrainResult:
        from training.resume import resume_run

        settings = load_settings(**nest_options(self.options))
        self.last_run = resume_run(Registry(settings.home), run_id, on_event=on_event)
        return self.last_run
