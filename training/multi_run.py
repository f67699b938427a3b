"""Multi-run continual training: one LoRA adapter carried through a multi-run of runs, merged with SLAO between them.

A multi-run is a job of kind `multi-run` with one child `train` run per step:

    tasks    one dataset cut into windows of `samples_per_run` rows (in file order: data that arrives over
             time), or one dataset per run; each task keeps a seeded validation slice; runs ≥ 2 may replay a
             fraction of earlier tasks' rows
    run i    trains from the SLAO initialisation (orthonormal A, previous fine-tuned B), or in `sequential` mode
             simply continues from the previous run's adapter; the learning rate follows a schedule across runs
    merge    A_merge = A_ft,i; B_merge += λ(i)·(B_ft,i − B_merge) (see slao.py); a `merge` event records λ and norms
    measure  the merged adapter's eval loss on the validation slice of every task seen so far: one row of the
             forgetting matrix; backward transfer (BWT) and average loss come from it

After every run the multi-run's state is committed in one step: the tensors go to new files named by run index
(`state/merged-0003.safetensors`, `state/init-0004.safetensors`), then `state/state.json`, written atomically and
last, points at them; older versions are deleted only after that. A crash at any moment leaves the previous
state whole, so `backprop resume` merges each run exactly once, continuing at the run that was cut short (from
its checkpoint). The registry's forgetting rows and the `merge` events are written after the commit, and again on
resume if a crash lost them. The result, `RUN_DIR/adapter/`, is the merged adapter as a standard peft folder.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training import atomic, governor, slao
from training.config import Settings, load_settings
from training.control import Control
from training.datasets import Example, load_dataset, split
from training.distributed import is_distributed
from training.errors import BackpropError
from training.events import EventWriter, read_events
from training.runs import Registry, RunRecord

MERGE_MODES = ("slao", "sequential")
LR_SCHEDULES = ("constant", "linear", "cosine")
# Fault injection for the crash tests: BACKPROP_TEST_CRASH_AT=<point>:<run> SIGKILLs the worker at that point.
CRASH_AT_ENV = "BACKPROP_TEST_CRASH_AT"
_VERSIONED = re.compile(r"(merged|init)-(\d{4})\.safetensors")


@dataclass
class MultiRunProgress:
    """Everything a resumed multi-run needs, saved after each run (the tensors live beside it as safetensors)."""

    next_run: int = 1
    merged: str | None = None  # the file in state/ with the merged adapter after run next_run - 1
    children: dict[str, str] = field(default_factory=dict)  # run index -> child run id
    forgetting: list[list[float | None]] = field(default_factory=list)  # row i: after run i+1, column j: task j+1
    merges: list[dict[str, float]] = field(default_factory=list)
    run_losses: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Task:
    name: str
    train: list[Example]
    val: list[Example]


# ---------------------------------------------------------------------------- submitting


def new_multi_run(
    registry: Registry,
    settings: Settings,
    datasets: list[str],
    *,
    num_runs: int | None = None,
    steps_per_run: int = 100,
    samples_per_run: int | None = None,
    merge_mode: str = "slao",
    replay: float = 0.0,
    lr_schedule: str = "constant",
    validation: float = 0.1,
    early_stopping: bool = False,
    name: str | None = None,
    fmt: str | None = None,
    runs_root: Path | None = None,
) -> RunRecord:
    """Check the multi-run's inputs and register it (its worker plans the tasks again, from the same seed)."""
    from training.models import apply_model_defaults

    if merge_mode not in MERGE_MODES:
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"unknown merge mode '{merge_mode}'", hint="Use slao or sequential.")
    if lr_schedule not in LR_SCHEDULES:
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"unknown lr schedule '{lr_schedule}'",
                            hint=f"Use one of: {', '.join(LR_SCHEDULES)}.")  # fmt: skip
    if not 0 <= replay < 1 or not 0 < validation < 1 or steps_per_run < 1:
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason="replay must be in [0, 1), validation in (0, 1), steps >= 1",
                            hint="For example --replay 0.1 --validation 0.1 --steps 100.")  # fmt: skip
    paths = [str(Path(d).expanduser().resolve()) if Path(d).expanduser().exists() else d for d in datasets]
    if len(paths) > 1 and num_runs not in (None, len(paths)):
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"{len(paths)} datasets but --runs {num_runs}",
                            hint="With several --data files there is one run per file; leave --runs out.")  # fmt: skip
    num_runs = len(paths) if len(paths) > 1 else num_runs
    if not num_runs or num_runs < 1:
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason="a multi-run needs at least one run",
                            hint="Pass --runs N (N >= 1), or several --data files.")  # fmt: skip
    settings = apply_model_defaults(settings)
    spec = {
        "datasets": paths, "format": fmt, "num_runs": num_runs, "steps_per_run": steps_per_run,
        "samples_per_run": samples_per_run, "merge_mode": merge_mode, "replay": replay, "lr_schedule": lr_schedule,
        "validation": validation, "early_stopping": early_stopping,
        "settings": settings.model_dump(mode="json", exclude={"home", "ui"}),
        "params": {"model": settings.model, "runs": num_runs, "steps_per_run": steps_per_run, "samples_per_run": samples_per_run,
                   "merge_mode": merge_mode, "replay": replay, "lr_schedule": lr_schedule, "validation": validation,
                   "learning_rate": settings.training.learning_rate, "lora_r": settings.lora.r},
    }  # fmt: skip
    plan_tasks(spec)  # bad data fails now, in the caller's terminal, not later in the worker
    datasets_label = ", ".join(Path(p).name for p in paths)
    return registry.create("multi-run", spec, model=settings.model, dataset=datasets_label, name=name, runs_root=runs_root)


def plan_tasks(spec: dict[str, Any]) -> list[Task]:
    """The multi-run's tasks, the same every time for the same spec (resume depends on it)."""
    seed = spec["settings"]["training"]["seed"]
    if len(spec["datasets"]) > 1:
        chunks = [(Path(p).stem, load_dataset(p, spec.get("format")).examples) for p in spec["datasets"]]
    else:
        examples = load_dataset(spec["datasets"][0], spec.get("format")).examples
        runs, size = spec["num_runs"], spec["samples_per_run"] or len(examples) // spec["num_runs"]
        if size < 2 or runs * size > len(examples):
            reason = f"{runs} runs x {size} samples need {runs * size} rows, the file has {len(examples)}"
            raise BackpropError("INPUT_DATASET_TOO_SMALL", path=spec["datasets"][0], reason=reason)
        chunks = [(f"window {i + 1}", examples[i * size : (i + 1) * size]) for i in range(runs)]
    tasks = []
    for i, (name, rows) in enumerate(chunks):
        train, val = split(rows, spec["validation"], seed + i)
        tasks.append(Task(name, train, val))
    return tasks


# ---------------------------------------------------------------------------- running (in the worker)


def run_multi_run(run: RunRecord, registry: Registry, control: Control, events: EventWriter) -> str:
    from training.trainer import new_train_run, run_training

    spec = json.loads((run.path / "spec.json").read_text())
    settings = load_settings(**spec["settings"], home=spec.get("home"))
    state_dir = run.path / "state"
    state = _load_state(state_dir)
    tasks = plan_tasks(spec)
    total = spec["num_runs"]
    registry.update(run.id, status="running", started_at=run.started_at or time.time(), max_steps=total * spec["steps_per_run"])
    events.emit("started", durable=True, multi_run=True, runs=total, merge_mode=spec["merge_mode"],
                max_steps=total * spec["steps_per_run"],
                resumed_from=state.next_run - 1 or None,
                tasks=[{"name": t.name, "train": len(t.train), "validation": len(t.val)} for t in tasks])  # fmt: skip
    _rewrite_records(run, registry, events, state)
    try:
        _check_mergeable(settings)
        return _runs(run, registry, control, events, spec, settings, state_dir, state, tasks, run_training, new_train_run)
    except BackpropError as exc:
        events.emit("failed", durable=True, code=exc.code, message=exc.message, hint=exc.hint)
        registry.update(run.id, error_code=exc.code, error_message=exc.message[:500])
        _end(registry, run, events, "failed", None)
        raise


def _check_mergeable(settings: Settings) -> None:
    """SLAO merges LoRA A/B pairs only. A tokenizer without a chat template gets ChatML tokens whose embedding rows
    are trained too, and no merge carries those across runs: refuse such a model before any run starts."""
    from training.models import load_tokenizer, new_tokens, resolve_model

    if new_tokens(load_tokenizer(resolve_model(settings.model, settings.home))):
        raise BackpropError("INPUT_MODEL_NO_CHAT_TEMPLATE", model=settings.model)


def _runs(run: RunRecord, registry: Registry, control: Control, events: EventWriter, spec: dict, settings: Settings,
          state_dir: Path, state: MultiRunProgress, tasks: list[Task], run_training: Any, new_train_run: Any) -> str:  # fmt: skip
    """Run i = next_run..T: train (or finish) the child, merge, measure forgetting, save the multi-run's state."""
    total = spec["num_runs"]
    evaluator = None
    for i in range(state.next_run, total + 1):
        child = _child_run(registry, run, spec, settings, state, tasks, i, new_train_run)
        atomic.write_json(state_dir / "state.json", asdict(state))  # the child's id survives a crash during its training
        if child.status != "completed":
            events.emit("log", level="info", message=f"run {i}/{total}: {child.id}")
            events.emit("run_started", run=i, runs=total, child=child.id, task=tasks[i - 1].name)
            offset = (i - 1) * spec["steps_per_run"]
            relay = _relay(events, i, offset, registry, run.id, control)
            # The worker's watcher beats the child's heartbeat too (it pauses, it evaluates).
            with governor.heartbeat_also(child.id, lambda c=child.id: registry.update(c, heartbeat=time.time())):
                if is_distributed(settings):
                    status = _train_on_ranks(child, registry, settings, control, events, relay)
                else:  # the child trains in this process
                    status = run_training(child, registry, control=control, on_event=relay).status
            if status != "completed":
                return _end(registry, run, events, status, f"run {i} of {total} ended {status}")
        fine_tuned = _adapter_weights(registry.get(child.id).path / "adapter")
        merged = _load_tensors(state_dir / state.merged) if state.merged else None
        if spec["merge_mode"] == "slao":
            merged, stats = slao.merge(merged, fine_tuned, i)
            next_init = slao.next_run_init(fine_tuned)
        else:
            stats = slao.merge(None, fine_tuned, i)[1]
            merged, next_init = fine_tuned, fine_tuned
        evaluator = evaluator or _Evaluator(settings, child.path / "adapter", spec)
        row = [evaluator.loss(merged, tasks[j].val) for j in range(i)] + [None] * (total - i)
        merge = {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(stats).items()}
        state.forgetting.append(row)
        state.merges.append(merge)
        child_record = registry.get(child.id)
        state.run_losses.append({"run": i, "child": child.id, "final_loss": child_record.final_loss, "steps": child_record.step})
        # The commit: new files first (never the ones state.json points at now), then state.json names them.
        _save_tensors(state_dir / _merged_name(i), merged)
        if i < total:
            _save_tensors(state_dir / _init_name(i + 1), next_init)
        _crash_point("tensors", i)
        state.next_run, state.merged = i + 1, _merged_name(i)
        atomic.write_json(state_dir / "state.json", asdict(state))
        _drop_old_versions(state_dir, state)
        _crash_point("committed", i)
        registry.record_forgetting(run.id, i, row)
        events.emit("merge", durable=True, **merge, eval_losses=row[:i])
        registry.update(run.id, step=i * spec["steps_per_run"], loss=child_record.final_loss, heartbeat=time.time())
        if is_distributed(settings):
            evaluator.release()  # the next child's ranks want the GPUs' memory back
            evaluator = None
    _publish_adapter(run, state_dir, evaluator, tasks)
    metrics = forgetting_metrics(state.forgetting)
    registry.update(run.id, final_loss=metrics["average_loss"], eval_loss=metrics["average_loss"])
    events.emit("completed", durable=True, adapter=str(run.path / "adapter"), **metrics)
    return _end(registry, run, events, "completed", None)


def _child_run(registry: Registry, multi_run: RunRecord, spec: dict, settings: Settings, state: MultiRunProgress,
               tasks: list[Task], i: int, new_train_run: Any) -> RunRecord:  # fmt: skip
    """Run i's child: the one a crashed multi-run already made, or a new one with its data, LR and initialisation."""
    if str(i) in state.children:
        return registry.get(state.children[str(i)])
    data_dir = multi_run.path / "data"
    state_dir = multi_run.path / "state"
    train = list(tasks[i - 1].train)
    if i > 1 and spec["replay"]:
        earlier = [e for t in tasks[: i - 1] for e in t.train]
        rng = random.Random(settings.training.seed + i)
        train += rng.sample(earlier, min(len(earlier), round(spec["replay"] * len(train))))
    _write_examples(data_dir / f"run-{i}.train.jsonl", train)
    _write_examples(data_dir / f"run-{i}.val.jsonl", tasks[i - 1].val)
    lr = settings.training.learning_rate * lr_factor(spec["lr_schedule"], i, spec["num_runs"])
    overrides = {"steps": spec["steps_per_run"], "learning_rate": lr, "validation_split": 0.0,
                 "eval_every": max(1, spec["steps_per_run"] // 5) if spec["early_stopping"] else 0,
                 "early_stopping_patience": 2 if spec["early_stopping"] else 0}  # fmt: skip
    # A child has no time box of its own: the multi-run's spans its runs (the worker's clock; the ranks hear of it).
    child_settings = settings.model_copy(update={"training": settings.training.model_copy(update=overrides),
                                                 "max_run_minutes": 0})  # fmt: skip
    init = state_dir / _init_name(i)
    if i > 1 and not init.exists():  # a multi-run saved by a version with one unversioned file
        init = state_dir / "next_init.safetensors"
    child = new_train_run(registry, child_settings, str(data_dir / f"run-{i}.train.jsonl"),
                          name=f"{multi_run.name or multi_run.id} run {i}/{spec['num_runs']}", parent_id=multi_run.id,
                          extra={"validation_data": str(data_dir / f"run-{i}.val.jsonl"),
                                 "init_adapter": str(init) if i > 1 else None},
                          runs_root=multi_run.path.parent)  # fmt: skip
    state.children[str(i)] = child.id
    return child


def _train_on_ranks(child: RunRecord, registry: Registry, settings: Settings, control: Control, events: EventWriter,
                    relay: Any) -> str:  # fmt: skip
    """Train a child on several processes (torchrun, training/distributed.py); its rank 0 writes the child's events,
    which this worker follows and relays. Returns the child's final status."""
    from training.distributed import run_ranks

    path, offset = child.path / "events.jsonl", 0

    def follow() -> None:
        nonlocal offset
        new, offset = read_events(path, offset)
        for event in new:
            relay(event)

    status = run_ranks(child, registry, settings, control, events, on_poll=follow)
    follow()
    return status


def lr_factor(schedule: str, i: int, total: int) -> float:
    """The learning rate of run i (1-based) relative to the first run's."""
    progress = (i - 1) / total
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def forgetting_metrics(matrix: list[list[float | None]]) -> dict[str, float | None]:
    """BWT on loss: mean over earlier tasks j of (L[T][j] − L[j][j]); positive means the multi-run forgot."""
    if not matrix:
        return {"bwt": None, "average_loss": None}
    last = [v for v in matrix[-1] if v is not None]
    diagonal = [matrix[j][j] for j in range(len(matrix))]
    earlier = [matrix[-1][j] - diagonal[j] for j in range(len(matrix) - 1)]  # type: ignore[operator]
    return {"bwt": sum(earlier) / len(earlier) if earlier else 0.0, "average_loss": sum(last) / len(last)}


def _relay(events: EventWriter, i: int, offset: int, registry: Registry, multi_run_id: str, control: Control):
    """Copy a child's progress into the multi-run's own events, on one step axis across runs."""
    last_write = [0.0]

    def relay(event: dict[str, Any]) -> None:
        if event["event"] == "step":
            control.start_clock()  # the time box spans the multi-run's runs, from its first step
        if event["event"] in ("step", "eval"):
            fields = {k: v for k, v in event.items() if k not in ("t", "event", "step", "max_steps")}
            events.emit(event["event"], run=i, step=offset + event["step"], run_step=event["step"], **fields)
            if time.time() - last_write[0] > 1.0 and event["event"] == "step":
                registry.update(multi_run_id, step=offset + event["step"], loss=event["loss"], heartbeat=time.time())
                last_write[0] = time.time()
        elif event["event"] in ("paused", "resumed"):
            events.emit(event["event"], **{k: v for k, v in event.items() if k not in ("t", "event")})
            registry.update(multi_run_id, status="paused" if event["event"] == "paused" else "running",
                            reason=event.get("reason") if event["event"] == "paused" else None)  # fmt: skip

    return relay


def _rewrite_records(run: RunRecord, registry: Registry, events: EventWriter, state: MultiRunProgress) -> None:
    """The registry's forgetting rows and the merge events follow a state commit: write any a crash lost."""
    for i, row in enumerate(state.forgetting, 1):
        registry.record_forgetting(run.id, i, row)  # idempotent
    logged = {e.get("run") for e in read_events(run.path / "events.jsonl")[0] if e["event"] == "merge"}
    for merge, row in zip(state.merges, state.forgetting, strict=True):
        if merge["run"] not in logged:
            events.emit("merge", durable=True, **merge, eval_losses=row[: merge["run"]])


def _end(registry: Registry, run: RunRecord, events: EventWriter, status: str, message: str | None) -> str:
    if message:
        events.emit(
            "log", durable=True, level="warning", message=f"{message}; `backprop resume {run.id}` continues the multi-run"
        )
    registry.update(run.id, status=status, ended_at=time.time(), reason=None, heartbeat=time.time())
    return status


class _Evaluator:
    """The base model with the multi-run's LoRA layout: loss of any adapter weights on any examples."""

    def __init__(self, settings: Settings, adapter_dir: Path, spec: dict[str, Any]):
        import torch
        from peft import PeftModel

        from training.models import load_model, load_tokenizer, resolve_model
        from training.packing import ChatEncoder

        source = resolve_model(settings.model, settings.home)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(source)
        self.model = PeftModel.from_pretrained(load_model(source, device=self.device), adapter_dir).eval()
        self.encoder = ChatEncoder(self.tokenizer, settings.training.max_seq_length, settings.training.response_only)
        self.t = settings.training

    def loss(self, weights: dict[str, Any], examples: list[Example]) -> float:
        from peft import set_peft_model_state_dict

        from training.trainer import mean_loss

        set_peft_model_state_dict(self.model, weights)
        encoded = [self.encoder(e) for e in examples]
        return round(mean_loss(self.model, encoded, self.t.batch_size, self.t.max_seq_length, self.t.packing,
                               self.tokenizer.pad_token_id, self.device), 6)  # fmt: skip

    def release(self) -> None:
        """Free the model and its GPU memory."""
        import gc

        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _publish_adapter(run: RunRecord, state_dir: Path, evaluator: _Evaluator | None, tasks: list[Task]) -> None:
    """RUN_DIR/adapter: the merged weights in a standard peft folder (config and tokenizer from the last child)."""
    state = _load_state(state_dir)
    last_child_adapter = Path(run.path.parent / state.children[str(len(tasks))] / "adapter")
    staging = Path(tempfile.mkdtemp(prefix=".adapter.", dir=run.path))
    try:
        for item in last_child_adapter.iterdir():
            if item.is_file() and item.name != "adapter_model.safetensors":
                shutil.copy2(item, staging / item.name)
        shutil.copy2(state_dir / state.merged, staging / "adapter_model.safetensors")
        atomic.publish_dir(staging, run.path / "adapter")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _adapter_weights(adapter_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(adapter_dir / "adapter_model.safetensors")


def _load_tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(path)


def _save_tensors(path: Path, tensors: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    atomic.fsync_dir(path.parent)  # the rename itself must be on disk before state.json names the file


def _load_state(state_dir: Path) -> MultiRunProgress:
    path = state_dir / "state.json"
    state = MultiRunProgress(**json.loads(path.read_text())) if path.exists() else MultiRunProgress()
    if state.next_run > 1 and state.merged is None:  # saved by a version with one unversioned file
        state.merged = "merged.safetensors"
    return state


def _merged_name(i: int) -> str:
    return f"merged-{i:04d}.safetensors"


def _init_name(i: int) -> str:
    """Run i's initialisation (i >= 2); the child's spec names it, so it stays until that child has finished."""
    return f"init-{i:04d}.safetensors"


def _drop_old_versions(state_dir: Path, state: MultiRunProgress) -> None:
    """After a commit: merged adapters other than the current one, and the initialisations of finished runs."""
    for path in state_dir.iterdir():
        match = _VERSIONED.fullmatch(path.name)
        if match and (path.name != state.merged if match[1] == "merged" else int(match[2]) < state.next_run):
            path.unlink(missing_ok=True)


def _crash_point(point: str, i: int) -> None:
    """Fault injection for the crash tests (a power cut here): off unless CRASH_AT_ENV names this point and run."""
    if os.environ.get(CRASH_AT_ENV) == f"{point}:{i}":
        os.kill(os.getpid(), signal.SIGKILL)


def _write_examples(path: Path, examples: list[Example]) -> None:
    atomic.write_text(path, "".join(json.dumps(e.to_record()) + "\n" for e in examples))  # tool definitions kept
