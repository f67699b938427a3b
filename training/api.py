"""The library in three lines:

    from training import Trainer
    trainer = Trainer("demo")
    run = trainer.train("my_data.jsonl", steps=100)

Each `train` call is a run in the registry, exactly like `backprop train`: `backprop list` shows it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training import jobs
from training.config import load_settings, nest_options
from training.errors import BackpropError
from training.events import EventSink
from training.runs import Registry
from training.trainer import TrainResult


class Trainer:
    def __init__(self, model: str | None = None, **options: Any):
        """`options` are the flat names of `backprop train --help` (lr, batch_size, lora_r, max_run_minutes, ...)."""
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
        from_run: str | None = None,
        plan: bool = True,
        on_event: EventSink | None = None,
        **options: Any,
    ) -> TrainResult:
        """Train in a governed worker process (like `backprop train`) and wait for it; `on_event` sees every event.

        `method="dpo"` or `"orpo"` trains on preference pairs (`beta`, `orpo_lambda`); `from_run` starts from a finished
        run's adapter (and, for DPO, measures against it). `plan=False`: no plan (`backprop train --no-plan`)."""
        settings = load_settings(**nest_options({**self.options, "steps": steps, "epochs": epochs, **options}))
        run = jobs.submit_train(settings, str(data), fmt=format, skip_invalid=skip_invalid, name=name, from_run=from_run,
                                plan=plan)  # fmt: skip
        self.last_run = _wait(Registry(settings.home), run.id, on_event)
        return self.last_run

    def resume(
        self, run_id: str, on_event: EventSink | None = None, *, allow_changed_data: bool = False, **options: Any
    ) -> TrainResult:
        """Continue a run from its last checkpoint (like `backprop resume`); `options` override its settings.

        A dataset file that changed since the run started is refused (INPUT_DATASET_CHANGED) unless
        `allow_changed_data=True`."""
        settings = load_settings(**nest_options(self.options))
        registry = Registry(settings.home)
        offset = jobs.events_offset(registry, run_id)
        run = jobs.resume(registry, run_id, nest_options(options), allow_changed_data=allow_changed_data)
        self.last_run = _wait(registry, run.id, on_event, offset)
        return self.last_run

    def multi_run(
        self,
        dataset: str | Path | list[str | Path],
        num_runs: int | None = None,
        steps_per_run: int = 100,
        samples_per_run: int | None = None,
        merge_mode: str = "slao",
        *,
        on_event: EventSink | None = None,
        **options: Any,
    ) -> TrainResult:
        """A continual-training multi-run (like `backprop multi-run`); the result's adapter is the SLAO-merged one.

        Multi-run options: replay, lr_schedule, validation, early_stopping, name; the rest are training options."""
        multi_run_keys = ("replay", "lr_schedule", "validation", "early_stopping", "name", "fmt")
        multi_run = {k: options.pop(k) for k in multi_run_keys if k in options}
        settings = load_settings(**nest_options({**self.options, **options}))
        datasets = [str(d) for d in dataset] if isinstance(dataset, list) else [str(dataset)]
        run = jobs.submit_multi_run(settings, datasets, num_runs=num_runs, steps_per_run=steps_per_run,
                                   samples_per_run=samples_per_run, merge_mode=merge_mode, **multi_run)  # fmt: skip
        self.last_run = _wait(Registry(settings.home), run.id, on_event)
        return self.last_run

    def export(self, format: str = "gguf", run_id: str | None = None, **options: Any):
        """Export the last run (or `run_id`): `trainer.export("gguf", quantization="q4_k_m")`; see training.export."""
        from training.export import export

        source = run_id or (self.last_run.run_id if self.last_run else None)
        if source is None:
            raise BackpropError("INPUT_INVALID_ARGUMENT", reason="nothing to export yet", hint="Train first, or pass run_id=.")
        return export(source, format, **options)


def _wait(registry: Registry, run_id: str, on_event: EventSink | None, offset: int = 0) -> TrainResult:
    """Follow a job to its end; a failed job raises its coded error, like the CLI prints it."""
    losses: dict[int, float] = {}
    failure = None
    for event in jobs.follow(registry, run_id, offset):
        if event["event"] == "step":
            losses[event["step"]] = event["loss"]
        elif event["event"] == "failed":
            failure = event
        if on_event is not None:
            on_event(event)
    run = registry.get(run_id)
    if run.status == "failed":
        raise jobs.failure(run, failure)
    adapter = run.path / "adapter"
    return TrainResult(run.id, run.status, run.step, run.final_loss, run.eval_loss,
                       adapter if run.status == "completed" and adapter.exists() else None, run.path,
                       [losses[s] for s in sorted(losses)])  # fmt: skip
