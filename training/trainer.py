"""LoRA supervised fine-tuning: the training loop of one run.

`run_training(run, registry)` reads the run's spec.json, loads data and model, trains, and keeps the run's
events.jsonl and registry row current. The loop is plain PyTorch so that every step boundary is ours:
checkpoints, a time box, a graceful stop and (on CUDA) OOM recovery all happen between two steps.

Loss is summed over the tokens that carry it and divided by their count across all micro-batches of a
step, so gradient accumulation and packing give the same result as one large batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from training import atomic, checkpoints, memory, preference, slao
from training.checkpoints import TrainerState
from training.config import Settings, load_settings
from training.control import Control
from training.datasets import fetch_hub_dataset, hub_validation, load_dataset, require_preference, split
from training.distributed import CONTINUE, EARLY_STOP, FAIL, PAUSE, STOP, TIMEBOX, ControlFile, World, is_collective_failure
from training.download import DownloadEvents, download_model
from training.errors import BackpropError
from training.events import EventSink, EventWriter
from training.extras import require
from training.models import (
    ModelSource,
    attention_implementation,
    fit_embeddings,
    load_model,
    load_tokenizer,
    needs_gradient_checkpointing,
    new_tokens,
    resolve_model,
)
from training.packing import Batch, BatchPlan, ChatEncoder, collate, flatten
from training.runs import Registry, RunRecord

MAX_OOM_SPLITS = 3
PAUSE_BEAT_S = 2.0  # a paused distributed run: rank 0 repeats the pause this often, well inside any collective timeout


@dataclass
class TrainResult:
    run_id: str
    status: str
    steps: int
    final_loss: float | None
    eval_loss: float | None
    adapter_path: Path | None
    run_dir: Path
    losses: list[float] = field(default_factory=list)


def run_training(
    run: RunRecord,
    registry: Registry,
    *,
    control: Control | None = None,
    on_event: EventSink | None = None,
    events: EventWriter | None = None,
    world: World | None = None,
) -> TrainResult:
    """Train one registered run in this process (the worker calls this; so can a notebook).

    Under torchrun (training/rank.py) every rank calls it with its `world`; ranks other than 0 get a registry and
    events that write nothing, and rank 0 reads stop and pause from the worker through RUN_DIR/control.json."""
    control = control or Control()
    world = world or World()
    spec = json.loads((run.path / "spec.json").read_text())
    settings = load_settings(**spec["settings"], home=spec.get("home"))
    own_writer = events is None
    events = events or EventWriter(run.path / "events.jsonl", also=on_event)
    # The worker (the ranks' agent) keeps its own pid in the registry: stop and kill reach it, and it reaches the ranks.
    pid = {} if world.distributed else {"pid": os.getpid()}
    registry.update(run.id, status="running", **pid, heartbeat=time.time(), started_at=run.started_at or time.time())
    try:
        return _Loop(run, registry, settings, spec, events, control, world).run()
    except BackpropError as exc:
        _fail(run, registry, events, exc.code, exc.message, exc.hint)
        raise
    except KeyboardInterrupt:
        registry.update(run.id, status="stopped", ended_at=time.time())
        events.emit("log", durable=True, level="warning", message="interrupted before the first step")
        raise
    except Exception as exc:
        if world.distributed and is_collective_failure(exc):
            raise  # a rank died or a collective timed out: the worker marks the run interrupted, resume continues it
        _fail(run, registry, events, "RUNTIME_TRAINING_FAILED", str(exc))
        raise BackpropError("RUNTIME_TRAINING_FAILED", reason=exc) from exc
    finally:
        if own_writer:
            events.close()


def _fail(run: RunRecord, registry: Registry, events: EventWriter, code: str, message: str, hint: str | None = None) -> None:
    hint = hint or BackpropError(code, message).hint
    events.emit("failed", durable=True, code=code, message=message, hint=hint)
    registry.update(run.id, status="failed", ended_at=time.time(), error_code=code, error_message=message[:500])


class _Loop:
    def __init__(
        self,
        run: RunRecord,
        registry: Registry,
        settings: Settings,
        spec: dict[str, Any],
        events: EventWriter,
        control: Control,
        world: World | None = None,
    ):
        self.world = world or World()
        self.control_file = ControlFile(run.path) if self.world.distributed and self.world.is_main else None
        # Several ranks: the module whose forward is a batch's loss (FSDP's sharded root; under DeepSpeed, the engine).
        self.step_loss: Any = None
        strategy = settings.distributed.strategy if self.world.distributed else "ddp"
        # FSDP and ZeRO-3 shard the weights: every rank takes part in every forward pass, evaluation included.
        self.sharded = strategy in ("fsdp", "deepspeed-zero3")
        self.zero: Any = None  # --strategy deepspeed-*: the engine that runs the step (training/deepspeed_zero.py)
        self.zero_stage = {"deepspeed-zero2": 2, "deepspeed-zero3": 3}.get(strategy)
        self.resumed_from: Path | None = None  # the checkpoint this session started from (DeepSpeed reloads its part)
        self.early_stop = False
        self.pausing = False
        self.run_record = run
        self.registry = registry
        self.settings = settings
        self.t = settings.training
        self.spec = spec
        self.events = events
        self.control = control
        self.losses: list[float] = []
        self.evals: list[float] = []  # eval losses so far, for early stopping
        self.oom_splits = 0
        method = settings.training.method
        # DPO / ORPO: the loss of a batch's pairs (training/preference.py); None for supervised fine-tuning.
        self.preference = preference.PreferenceLoss(method, settings.training.beta, settings.training.orpo_lambda) \
            if method in preference.PREFERENCE_METHODS else None  # fmt: skip
        self.pair_metrics: dict[str, float] = {}  # this step's preference metrics, summed over its pairs

    # ------------------------------------------------------------------ setup

    def run(self) -> TrainResult:
        import torch

        from training.loss import loss_kernel

        t = self.t
        torch.manual_seed(t.seed)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.world.distributed:
            self._join_process_group()
        if self.device == "cuda" and t.use_unsloth and not self.world.distributed:
            _import_unsloth_first()
        # A .gguf file or ollama: model is imported into a cached folder on first use, said as log events.
        source = resolve_model(self.settings.model, self.settings.home,
                               on_progress=lambda message: self.events.emit("log", level="info", message=message))  # fmt: skip
        if not source.is_local:  # a hub model not cached yet downloads first, with `download` events (no time box yet)
            download_model(source.path, on_progress=DownloadEvents(source.path, self.events.emit))
        self.tokenizer = load_tokenizer(source)  # before the data: rows its chat template cannot render are refused by line
        fmt = self.spec.get("format")
        # So does a hub dataset's data: `download` events, a resumable fetch into the cache the loader reads.
        fetch_hub_dataset(self.spec["data"], DownloadEvents(str(self.spec["data"]), self.events.emit, what="dataset"))
        dataset = load_dataset(self.spec["data"], fmt, self.spec.get("skip_invalid", False), tokenizer=self.tokenizer)
        if dataset.report.error_count:
            self.events.emit("log", level="warning", message=f"skipped {dataset.report.error_count} invalid rows",
                             skipped=[e.describe(dataset.report.path) for e in dataset.report.errors[:50]])  # fmt: skip
        if self.preference is not None:
            require_preference(dataset, t.method)
        self._check_dataset(dataset.report.path, dataset.sha256, resuming=bool(self._saved_checkpoints()))
        train_examples, val_examples = split(dataset.examples, t.validation_split, t.seed)
        # A held-out set given with the run (multi-runs do this), else a hub dataset's own validation split unless a
        # fraction of the training rows was asked for.
        validation = self.spec.get("validation_data") or (None if t.validation_split else hub_validation(self.spec["data"]))
        if validation:
            val_examples = load_dataset(validation, fmt, tokenizer=self.tokenizer).examples

        self.model = self._load_lora_model(source)
        init = self.spec.get("init_adapter")
        if init and not Path(init).is_file() and not self._saved_checkpoints():
            raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"the adapter this run starts from is gone: {init}",
                                hint="Start a new run from an existing run or adapter.")  # fmt: skip
        if init and Path(init).is_file():  # start from given LoRA weights (a checkpoint, if any, still wins below)
            from peft import get_peft_model_state_dict, set_peft_model_state_dict
            from safetensors.torch import load_file

            weights = load_file(init)
            slao.check_fits(get_peft_model_state_dict(self.model), weights, init)
            set_peft_model_state_dict(self.model, weights)
        encoder = ChatEncoder(self.tokenizer, t.max_seq_length, t.response_only) if self.preference is None \
            else preference.PairEncoder(self.tokenizer, t.max_seq_length)  # fmt: skip
        train_encoded = [encoder(e) for e in train_examples]
        self.val_encoded = [encoder(e) for e in val_examples]
        if encoder.truncated:
            self.events.emit(
                "log",
                level="warning",
                message=f"{encoder.truncated} examples longer than {t.max_seq_length} tokens were truncated",
            )
        if encoder.fallbacks:
            self.events.emit(
                "log",
                level="warning",
                message=f"{encoder.fallbacks} conversations trained on every token (chat template not prefix-stable)",
            )
        if not any(e.target_tokens for e in train_encoded):
            raise BackpropError(
                "INPUT_DATASET_TOO_SMALL", path=dataset.report.path, reason="no trainable tokens after tokenization"
            )

        # One global batch of world_size x batch_size rows a micro-batch, split across the ranks (distributed.shard).
        rows = self._batch_size() * self.world.world_size
        pad_id = self.tokenizer.pad_token_id
        if self.preference is None:
            self.plan = BatchPlan(train_encoded, rows, t.max_seq_length, t.packing, t.seed, pad_id)
        else:  # a pair's two answers always share a row: up to twice max_seq_length tokens
            self.plan = BatchPlan(train_encoded, rows, 2 * t.max_seq_length, t.packing, t.seed, pad_id,
                                  collate_rows=lambda r: preference.collate_pairs(r, pad_id))  # fmt: skip
        self.train_pairs = train_encoded if self.preference is not None else []
        self._use_gradient_checkpointing()
        self.max_steps = t.steps or max(1, math.ceil(t.epochs * self.plan.batches_per_epoch / t.gradient_accumulation))
        self.optimizer = adamw([p for p in self.model.parameters() if p.requires_grad], t.learning_rate, t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        state = self._resume_state() or TrainerState(step=0, micro_batch=0, tokens_seen=0, loss=None)
        if self.world.distributed:
            self._prepare_ranks()
        if self.preference is not None and self.preference.method == "dpo":
            self._reference_logps(resuming=state.step > 0)
        devices = self.world.gather_devices(self.device)
        self.registry.update(self.run_record.id, max_steps=self.max_steps)
        self.events.emit("started", durable=True, model=self.settings.model, dataset=dataset.report.path,
                         examples=len(train_encoded), validation_examples=len(self.val_encoded), max_steps=self.max_steps,
                         resumed_from=state.step or None, device=self.device, trainable_params=self._trainable(),
                         world_size=self.world.world_size, strategy=self.settings.distributed.strategy if
                         self.world.distributed else None, devices=devices,
                         method=t.method, attention=self.attention, gradient_checkpointing=self.gradient_checkpointing,
                         loss_kernel=loss_kernel(self.model.get_base_model().get_output_embeddings(), self.device,
                                                 t.loss_kernel))  # fmt: skip
        return self._train(state)

    def _load_lora_model(self, source: ModelSource):
        import torch
        from peft import LoraConfig, get_peft_model

        lora, t = self.settings.lora, self.t
        use_bf16 = t.bf16 if t.bf16 is not None else (self.device == "cuda" and torch.cuda.is_bf16_supported())
        dtype = self.dtype = torch.bfloat16 if use_bf16 else torch.float32
        added = new_tokens(self.tokenizer)
        if self.device == "cuda" and t.use_unsloth and not added:
            model = self._load_unsloth(source, dtype)
            if model is not None:
                self.attention, self.gradient_checkpointing = "unsloth", True  # its own kernels and offloaded checkpointing
                return model
        quantization = None
        if t.qlora:
            quantization = _qlora_config(self.device, dtype)
        self.attention = attention_implementation(t.attention, self.device, dtype)
        self.gradient_checkpointing = quantization is not None  # prepare_model_for_kbit_training below turns it on
        # Sharded (FSDP, ZeRO-3): every rank reads the weights into host memory and keeps only its shard on the GPU.
        model = load_model(source, dtype=dtype, device="cpu" if self.sharded else self.device, quantization_config=quantization,
                           attn_implementation=self.attention)  # fmt: skip
        if fit_embeddings(model, self.tokenizer, for_training=True):
            message = (f"embeddings resized to {len(self.tokenizer)} tokens for the ChatML tokens the tokenizer lacked; "
                       "their rows are trained and saved with the adapter")  # fmt: skip
            self.events.emit("log", level="info", message=message)
        if quantization is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model.config.use_cache = False
        config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
            task_type="CAUSAL_LM", bias="none", trainable_token_indices=_token_rows(model, added) if added else None,
        )  # fmt: skip
        return get_peft_model(model, config)

    def _use_gradient_checkpointing(self) -> None:
        """Recompute activations in backward instead of keeping them: when `training.gradient_checkpointing` says so, or
        (unset, on CUDA) when a micro-batch's estimated activations would not fit in the VRAM free next to the weights."""
        wanted, reason = self.t.gradient_checkpointing, "training.gradient_checkpointing is on"
        if self.gradient_checkpointing or wanted is False:  # QLoRA and unsloth set up their own
            return
        if wanted is None:
            if self.device != "cuda":
                return
            import torch

            free, _total = torch.cuda.mem_get_info()
            shape, step = _step_estimate(self.model, self.settings.lora.r)
            rows, length = self.plan.batch_size, self._row_length()
            if not needs_gradient_checkpointing(free, shape, rows, length, **step):
                return
            need = memory.step_bytes(shape, rows, length, **step)
            reason = (f"a micro-batch of {rows} x {length} tokens needs ~{need / memory.GIB:.1f} GiB, "
                      f"{free / memory.GIB:.1f} GiB VRAM is free next to the weights")  # fmt: skip
        # Non-reentrant checkpointing works with frozen inputs; the input hook keeps peft's LoRA-only graphs connected.
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.enable_input_require_grads()
        self.gradient_checkpointing = True
        self.events.emit("log", level="info", message=f"gradient checkpointing on: {reason}")

    def _load_unsloth(self, source: ModelSource, dtype: Any):
        """The unsloth fast path, when its extra is installed; otherwise say so and use transformers."""
        try:
            from unsloth import FastLanguageModel  # type: ignore[import-not-found]
        except Exception as exc:  # not installed, or incompatible with this GPU/driver
            self.events.emit(
                "log", level="info", message=f"unsloth unavailable ({type(exc).__name__}); using transformers + peft"
            )
            return None
        lora, t = self.settings.lora, self.t
        model, _ = FastLanguageModel.from_pretrained(
            source.path, max_seq_length=t.max_seq_length, dtype=dtype, load_in_4bit=t.qlora
        )
        targets = lora.target_modules
        if targets == "all-linear":
            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        self.events.emit("log", level="info", message="using unsloth")
        return FastLanguageModel.get_peft_model(model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=targets, use_gradient_checkpointing="unsloth")  # fmt: skip

    def _batch_size(self, free_bytes: float | None = None) -> int:
        """The configured batch size; on CUDA, when not given, the one that fits the free VRAM (training/memory.py).

        `free_bytes` (free VRAM with the model loaded) is read from CUDA unless given. The choice is said in a `log`
        event and written into spec.json, so that a resumed run reads the same batches."""
        t = self.t
        if self.spec.get("batch_size_given", True) or (self.device != "cuda" and free_bytes is None):
            return t.batch_size
        if self.spec.get("auto_batch_size"):
            return int(self.spec["auto_batch_size"])
        import torch

        if free_bytes is None:
            free_bytes, _total = torch.cuda.mem_get_info()
        shape, step = _step_estimate(self.model, self.settings.lora.r)
        length = self._row_length()
        size = memory.auto_batch_size(free_bytes, shape, length, **step)
        needs = memory.step_bytes(shape, size, length, **step)
        self.events.emit("log", level="info", batch_size=size, free_vram_gb=round(free_bytes / memory.GIB, 2),
                         estimated_gb=round(needs / memory.GIB, 2),
                         message=f"auto batch size {size} from {free_bytes / memory.GIB:.1f} GiB free VRAM "
                         f"(~{needs / memory.GIB:.1f} GiB estimated for {size} x {length} tokens)")  # fmt: skip
        self.spec["auto_batch_size"] = size
        atomic.write_json(self.run_record.path / "spec.json", self.spec)
        return size

    def _row_length(self) -> int:
        """The most tokens a row of a micro-batch holds: a preference pair's two answers share a row."""
        return self.t.max_seq_length * (2 if self.preference is not None else 1)

    def _lr_factor(self, step: int) -> float:
        warmup = int(self.t.warmup_ratio * self.max_steps)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.max_steps - warmup)
        if self.t.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if self.t.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def _check_dataset(self, path: str, sha256: str, resuming: bool) -> None:
        """Record the data's hash when the run starts; continuing from a checkpoint on other data is refused
        (its batch positions would point at other rows), unless this start allows it."""
        recorded = self.run_record.dataset_sha256
        if resuming and recorded and recorded != sha256 and self.spec.get("allow_changed_data"):
            self.events.emit("log", durable=True, level="warning",
                             message=f"{path} changed since the run started (sha256 {recorded[:12]} then, {sha256[:12]} now); "
                             "continuing on the new data as allowed (--allow-changed-data)")  # fmt: skip
        else:
            check_dataset_unchanged(self.run_record, path, sha256, resuming)
        if recorded != sha256:
            self.registry.update(self.run_record.id, dataset_sha256=sha256)

    def _saved_checkpoints(self) -> list:
        return [c for c in self.registry.checkpoints(self.run_record.id) if checkpoints.is_readable(Path(c.path))]

    def _resume_state(self) -> TrainerState | None:
        if self.world.distributed:
            return self._resume_ranks()
        saved = self._saved_checkpoints()
        if not saved:
            return None
        latest = Path(saved[-1].path)
        recorded = checkpoints.recorded_world_size(latest)
        if recorded != 1:
            raise BackpropError("INPUT_WORLD_SIZE_CHANGED", run_id=self.run_record.id, recorded=recorded, current=1)
        state = checkpoints.load(latest, self.model, self.optimizer, self.scheduler)
        fit_optimizer_state(self.optimizer)  # saved on another machine (fused on CUDA, or not): step as this one does
        self.events.emit("log", level="info", message=f"resumed from checkpoint at step {state.step}")
        return state

    def _resume_ranks(self) -> TrainerState | None:
        """Rank 0 reads the last checkpoint and sends it to every rank (other machines may not see this run folder)."""
        saved = self._saved_checkpoints() if self.world.is_main else []
        contents = checkpoints.read(Path(saved[-1].path)) if saved else None
        if contents is not None and contents[0].world_size != self.world.world_size:
            contents = ("refused", contents[0].world_size)
        contents = self.world.broadcast_object(contents)
        if contents is None:
            return None
        if contents[0] == "refused":
            raise BackpropError("INPUT_WORLD_SIZE_CHANGED", run_id=self.run_record.id, recorded=contents[1],
                                current=self.world.world_size)  # fmt: skip
        state = checkpoints.apply(contents, self.model, self.optimizer, self.scheduler)
        fit_optimizer_state(self.optimizer)
        if self.zero_stage is not None:  # its optimizer state is the engine's, one part a rank: read once it exists
            self.resumed_from = Path(self.world.broadcast_object(saved[-1].path if saved else None))
        self.events.emit("log", level="info", message=f"resumed from checkpoint at step {state.step} on {self.world.world_size} "
                         "processes")  # fmt: skip
        return state

    def _join_process_group(self) -> None:
        """Join the ranks through accelerate (gloo on CPU, nccl on CUDA), every collective bounded by the timeout."""
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        from training.distributed import check_strategy, process_group_kwargs

        check_strategy(self.settings)
        group = InitProcessGroupKwargs(**process_group_kwargs(self.settings, self.device))
        self.accelerator = Accelerator(cpu=self.device == "cpu", kwargs_handlers=[group])
        if self.device == "cuda":
            import torch

            torch.cuda.set_device(self.accelerator.device)

    def _prepare_ranks(self) -> None:
        """Data parallel: every rank starts from rank 0's trainable weights, and their gradients are averaged once a
        step (World.average_gradients). The ranks compute through a module whose forward is a batch's summed loss:
        under FSDP it is the root unit (`target_loss` calls the decoder and head directly, so the peft model's own
        forward, where a root's gathers would hook in, never runs), each decoder layer a unit of its own; under
        DeepSpeed it is the engine's module, and the engine runs the step (training/deepspeed_zero.py)."""
        self.world.broadcast_tensors([p.data for p in self.model.parameters() if p.requires_grad])
        step_loss = _StepLoss(self.model, self.device, self.t.loss_kernel)
        if self.zero_stage is not None:
            from training.deepspeed_zero import Zero

            self.zero = Zero(step_loss, self.model, self.optimizer, self.scheduler, self.zero_stage, self.t.max_grad_norm,
                             self._batch_size())  # fmt: skip
            if self.resumed_from is not None:
                self.zero.load(self.resumed_from)
            self.step_loss = self.zero
            shares = self.zero.frozen_share() if self.zero_stage == 3 else None
        elif self.sharded:
            from training import fsdp

            shares = fsdp.shard(step_loss, self.model, self.device)
            self.step_loss = step_loss
        else:
            self.step_loss, shares = step_loss, None
        if shares is not None:
            local, total = shares
            self.events.emit("log", level="info", message=f"{self.settings.distributed.strategy}: each of "
                             f"{self.world.world_size} ranks holds about {local / max(1, total):.0%} of the frozen weights "
                             f"({local:,} of {total:,} on rank 0)", frozen_local=local, frozen_total=total)  # fmt: skip

    def _reference_logps(self, resuming: bool) -> None:
        """DPO's reference: the summed log-probabilities of every pair's answers under the model as the run starts (its
        adapter is the identity, or --from-run's), computed once before the first step and kept in
        RUN_DIR/reference_logps.json, which a resumed run reads back (its weights have moved on by then).

        The ranks split the pairs between them (each has the whole model) and sum the results; under FSDP or ZeRO-3
        every rank takes part in every pass, so they all go through every pair."""
        import torch

        path = self.run_record.path / "reference_logps.json"
        pairs = self.train_pairs + self.val_encoded
        sha256 = self.registry.get(self.run_record.id).dataset_sha256 if self.world.is_main else None
        saved = json.loads(path.read_text()) if self.world.is_main and path.exists() else None
        if not (saved and saved.get("sha256") == sha256 and len(saved["pairs"]) == len(pairs)):
            saved = None  # none yet, or for other data (a resume allowed to continue on changed data)
        if self.world.distributed:  # rank 0's folder and registry decide for every rank
            saved = self.world.broadcast_object(saved)
        if saved:
            scores = [tuple(s) for s in saved["pairs"]]
        elif resuming:  # the weights have moved on since the start: they cannot stand in for the reference
            raise BackpropError("STATE_NOT_RESUMABLE", run_id=self.run_record.id, reason="its DPO reference "
                                "(reference_logps.json) is missing or was computed on other data",
                                hint="Start a new DPO run; --from-run starts it from the same adapter.")  # fmt: skip
        else:
            started = time.perf_counter()
            split = self.world.distributed and not self.sharded
            mine = pairs[self.world.rank :: self.world.world_size] if split else pairs
            rows = max(1, self.plan.batch_size // self.world.world_size)
            # A stop ends the pass at its next batch when this process is the whole run; ranks finish it together.
            progress = _ReferenceProgress(self.events, len(pairs), self.world.world_size if split else 1,
                                          None if self.world.distributed else self.control)  # fmt: skip
            self.model.eval()
            try:
                mine_scores = preference.score_pairs(self._score_answers, mine, rows, self.t.max_seq_length,
                                                     self.tokenizer.pad_token_id, on_scored=progress)  # fmt: skip
            except _StoppedBeforeTraining:
                return  # nothing saved: the first step boundary ends the run as stopped, and a resume starts over
            finally:
                self.model.train()
            scores = mine_scores
            if split:
                table = torch.zeros((len(pairs), 2), dtype=torch.float64, device=self._collective_device())
                table[self.world.rank :: self.world.world_size] = torch.tensor(mine_scores, dtype=torch.float64).reshape(-1, 2)
                torch.distributed.all_reduce(table)
                scores = [tuple(row) for row in table.cpu().tolist()]
            if self.world.is_main:
                atomic.write_json(path, {"sha256": sha256, "pairs": [list(s) for s in scores]})
            seconds = time.perf_counter() - started
            self.events.emit("log", level="info", seconds=round(seconds, 3), message=f"reference log-probabilities of "
                             f"{len(pairs)} pairs computed in {seconds:.1f} s (the starting model; no second copy)")  # fmt: skip
        for pair, score in zip(pairs, scores, strict=True):
            pair.reference = (float(score[0]), float(score[1]))

    def _answer_sums(self, batch: Batch) -> Any:
        """Each answer's summed log-probability in a training pass (through the ranks' loss module when there is one)."""
        if self.step_loss is not None:
            return self.step_loss(batch.input_ids, batch.labels, batch.position_ids, batch.attention_mask,
                                  batch.sequence_ids)  # fmt: skip
        return preference.answer_logps(self.model, batch, self.device, self.t.loss_kernel)

    def _score_answers(self, batch: Batch) -> Any:
        """As `_answer_sums`, outside training (the reference, evaluation): through the model itself, which a rank may
        run alone, unless FSDP or ZeRO-3 shard it and every rank must take part (DeepSpeed's engine runs training only)."""
        if self.sharded:
            return self._answer_sums(batch)
        return preference.answer_logps(self.model, batch, self.device, self.t.loss_kernel)

    def _trainable(self) -> int:
        # ZeRO-3 leaves a rank a part of each tensor; `ds_numel` is the whole one's size.
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ the loop

    def _train(self, state: TrainerState) -> TrainResult:

        t = self.t
        run_id = self.run_record.id
        batches = self.plan.micro_batches(state.micro_batch)
        self.model.train()
        status = "completed"
        last_registry_write = 0.0
        rows = self.plan.row_batches(state.micro_batch) if self.world.distributed else None
        while state.step < self.max_steps:
            decision = self._decide(state)
            if decision != CONTINUE:
                status = {STOP: "stopped", FAIL: "failed", TIMEBOX: "timeboxed", EARLY_STOP: "completed"}[decision]
                break
            if self.control.start_clock():  # the time box counts training only: model and data are loaded by now
                minutes = self.control.time_box_s / 60
                self.events.emit("log", level="info", message=f"time box: {minutes:g} min of training from now")
            started = time.perf_counter()
            if rows is not None:  # this rank's share of each global micro-batch; the counts are the global ones
                shares = [self._share(next(rows)) for _ in range(t.gradient_accumulation)]
                micro, self.weights = [b for b, _w, _t, _n in shares], [w for _b, w, _t, _n in shares]
                targets, tokens = sum(n for _b, _w, n, _n in shares), sum(n for _b, _w, _t, n in shares)
            else:
                micro = [next(batches) for _ in range(t.gradient_accumulation)]
                targets = sum(b.target_tokens for b in micro)
                tokens = sum(b.tokens for b in micro)
            self.pair_metrics = {}
            loss_sum = self._accumulate(micro, max(1, targets), state)
            lr = self.scheduler.get_last_lr()[0]
            grad_norm = self._apply_gradients()
            loss = loss_sum / max(1, targets)
            if not math.isfinite(loss):
                raise BackpropError("RUNTIME_NAN_LOSS", value=loss, step=state.step + 1)
            elapsed = time.perf_counter() - started
            state = TrainerState(state.step + 1, state.micro_batch + len(micro), state.tokens_seen + tokens, loss)
            self.losses.append(loss)
            self.events.emit("step", step=state.step, max_steps=self.max_steps, loss=round(loss, 5), lr=lr,
                             grad_norm=round(float(grad_norm), 4), tokens=tokens, target_tokens=targets,
                             tokens_per_s=round(tokens / elapsed, 1), **self._step_metrics())  # fmt: skip
            now = time.time()
            if now - last_registry_write >= 1.0 or state.step == self.max_steps:
                self.registry.update(run_id, step=state.step, loss=loss, heartbeat=now)
                last_registry_write = now
            if t.eval_every and state.step % t.eval_every == 0 and state.step < self.max_steps:
                if self._no_longer_improving(self._evaluate(state.step)):
                    self.events.emit("log", level="info", message=f"early stopping at step {state.step}: eval loss has not "
                                     f"improved for {t.early_stopping_patience} evaluations")  # fmt: skip
                    if not self.world.distributed:
                        break
                    self.early_stop = True  # rank 0 alone evaluates; the next step boundary stops every rank
            if t.save_every and state.step % t.save_every == 0 and state.step < self.max_steps:
                self._checkpoint(state)
        return self._finish(state, status)

    def _apply_gradients(self) -> float:
        """Clip the gradients, step the optimizer and the schedule, zero the gradients; the norm before clipping."""
        import torch

        if self.zero is not None:
            return self.zero.step()  # the engine reduces, clips and steps (training/deepspeed_zero.py)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.t.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def _step_metrics(self) -> dict[str, float]:
        """A preference step's reward accuracy, margin and log-probabilities, means over the step's pairs on all ranks."""
        if self.preference is None:
            return {}
        if self.world.distributed:
            names = ["pairs", *preference.METRICS]
            self.pair_metrics = {n: self.world.all_sum(self.pair_metrics.get(n, 0.0), self._collective_device())
                                 for n in names}  # fmt: skip
        return preference.mean_metrics(self.pair_metrics)

    def _no_longer_improving(self, eval_loss: float | None) -> bool:
        patience = self.t.early_stopping_patience
        if not patience or eval_loss is None:
            return False
        self.evals.append(eval_loss)
        best_at = self.evals.index(min(self.evals))
        return len(self.evals) - 1 - best_at >= patience

    def _decide(self, state: TrainerState) -> int:
        """What happens at this step boundary: rank 0 decides from its Control, one broadcast tells every rank (alone,
        a process just decides). A pause holds here: paused by the governor (GPU too hot) until released."""
        while True:
            if self.control_file is not None:
                self.control_file.apply(self.control)
            decision = self.world.broadcast_decision(self._local_decision() if self.world.is_main else CONTINUE,
                                                     self._collective_device())  # fmt: skip
            if decision != PAUSE:
                if self.pausing:
                    self._end_pause(state)
                return decision
            if self.world.is_main:
                self._hold(state)

    def _local_decision(self) -> int:
        control = self.control
        if control.pause.is_set() and not control.stop.is_set() and not control.timed_out():
            return PAUSE
        if control.stop.is_set():
            return FAIL if control.stop_code else STOP
        if control.timed_out():
            return TIMEBOX
        return EARLY_STOP if self.early_stop else CONTINUE

    def _hold(self, state: TrainerState) -> None:
        """Wait while paused (alone: until released; several ranks: a beat at most, then the pause is said again)."""
        if not self.pausing:
            self.pausing = True
            reason = self.control.pause_reason
            self.events.emit("paused", durable=True, step=state.step, reason=reason)
            self.registry.update(self.run_record.id, status="paused", reason=reason, heartbeat=time.time())
        if not self.world.distributed:
            self.control.hold()
            return
        beat = time.monotonic() + PAUSE_BEAT_S
        while self.control.pause.is_set() and not self.control.stop.is_set() and not self.control.timed_out():
            if time.monotonic() >= beat:
                return
            self.control.stop.wait(0.1)
            if self.control_file is not None:
                self.control_file.apply(self.control)

    def _end_pause(self, state: TrainerState) -> None:
        self.pausing = False
        self.registry.update(self.run_record.id, status="running", reason=None, heartbeat=time.time())
        if not self.control.stop.is_set() and not self.control.timed_out():
            self.events.emit("resumed", durable=True, step=state.step, reason="GPU cooled down")

    def _collective_device(self) -> str:
        return str(self.accelerator.device) if self.world.distributed and self.device == "cuda" else "cpu"

    def _share(self, rows: list) -> tuple[Any, float, int, int]:
        """This rank's part of a global micro-batch: (its batch, its weight 1 or 0, the global target and token counts)."""
        from training.distributed import shard

        mine, counts = shard(rows, self.world)
        targets = sum(item.target_tokens for row in rows for item in row)
        tokens = sum(len(item) for row in rows for item in row)
        return self.plan.collate_rows(mine), 1.0 if counts else 0.0, targets, tokens

    def _accumulate(self, micro: list, targets: int, state: TrainerState) -> float:
        """Forward and backward over a step's micro-batches; out of memory, split them in halves and retry the step.

        After MAX_OOM_SPLITS halvings the run ends with RUNTIME_OOM_RECOVERY_EXHAUSTED and a checkpoint of the last
        completed step (`state`): nothing of the failed step has reached the weights or the optimizer."""
        import torch

        step = state.step + 1
        while True:
            self.pair_metrics = {}
            try:
                return self._forward_backward(micro, targets, step)
            except torch.OutOfMemoryError:
                pass  # recover outside the handler: its traceback still holds the failed pass's activations
            self.optimizer.zero_grad(set_to_none=True)
            if self.device == "cuda":
                torch.cuda.empty_cache()
            rows = max(1, self.plan.batch_size // self.world.world_size >> self.oom_splits)  # a pass, on each rank
            if self.oom_splits >= MAX_OOM_SPLITS:
                if state.step > 0 and not any(c.step == state.step for c in self.registry.checkpoints(self.run_record.id)):
                    self._checkpoint(state)
                kept = f"; the checkpoint of step {state.step} is kept" if state.step > 0 else ""
                raise BackpropError("RUNTIME_OOM_RECOVERY_EXHAUSTED", batch_size=rows,
                                    message=f"Out of GPU memory at step {step} even at batch size {rows}{kept}")  # fmt: skip
            self.oom_splits += 1
            rows = max(1, self.plan.batch_size // self.world.world_size >> self.oom_splits)  # a pass, on each rank
            self.events.emit("log", level="warning", step=step, oom_splits=self.oom_splits, rows=rows,
                             message=f"out of memory at step {step}: batch halved to {rows} rows a pass, "
                             f"accumulation doubled (x{2**self.oom_splits}); the step is retried")  # fmt: skip

    def _forward_backward(self, micro: list, targets: int, step: int) -> float:
        """The step's summed loss, gradients accumulated; each micro-batch in 2**oom_splits parts. Its own frame, so that
        an out-of-memory error leaves nothing of the pass alive once handled."""
        if self.step_loss is not None:
            return self._forward_backward_ranks(micro, targets, step)
        total = 0.0
        for index, batch in enumerate(micro):
            for part in _split(batch, 2**self.oom_splits):
                if self.control.before_forward is not None:
                    self.control.before_forward(step, index, int(part.input_ids.shape[0]))
                loss = self._loss(part) / targets
                loss.backward()
                total += float(loss.detach()) * targets
        return total

    def _forward_backward_ranks(self, micro: list, targets: int, step: int) -> float:
        """As `_forward_backward`, on this rank's shares. Each rank's loss is scaled by world_size / global targets and
        the gradients are averaged over the ranks after the step's last pass, so the result is the gradient of the
        global loss per target token: --nproc 2 --batch-size b trains as --nproc 1 --batch-size 2b.

        Under DDP the passes themselves run no collective: an out-of-memory error on any rank is known to every rank
        before the average (one all-reduced flag), and all of them halve the batch and retry the step together. Under
        FSDP or DeepSpeed a pass runs collectives of its own, so one rank cannot retry alone: RUNTIME_OOM_SHARDED."""
        import torch

        passes = [(i, part, self.weights[i]) for i, batch in enumerate(micro) for part in _split(batch, 2**self.oom_splits)]
        scale = self.world.world_size / targets
        total, out_of_memory = 0.0, False
        try:
            for k, (index, part, weight) in enumerate(passes):
                if self.control.before_forward is not None:
                    self.control.before_forward(step, index, int(part.input_ids.shape[0]))
                summed = self._loss(part, weight)
                if self.zero is not None:
                    self.zero.backward(summed * (weight * scale), boundary=k == len(passes) - 1)
                else:
                    (summed * (weight * scale)).backward()
                total += float(summed.detach()) * weight
        except torch.OutOfMemoryError:
            if self.sharded or self.zero is not None:
                raise BackpropError("RUNTIME_OOM_SHARDED", step=step, rank=self.world.rank,
                                    strategy=self.settings.distributed.strategy) from None  # fmt: skip
            out_of_memory = True  # said to every rank below, once this handler has let go of the pass's activations
        summed = None
        if self.world.all_sum(float(out_of_memory), self._collective_device()):
            raise torch.OutOfMemoryError(f"out of memory on a rank at step {step}")  # every rank: _accumulate retries
        if self.zero is None:  # the engine reduces its gradients itself, at the boundary
            self.world.average_gradients([p for p in self.model.parameters() if p.requires_grad])
        return self.world.all_sum(total, self._collective_device())

    def _loss(self, batch: Batch, weight: float = 1.0) -> Any:
        """A batch's summed loss: over its target tokens, or (DPO, ORPO) over its pairs, whose metrics are added to
        this step's with `weight` (0 for a rank's stand-in share, see distributed.shard)."""
        if self.preference is not None:
            loss, metrics = self.preference(preference.PairScores.of(self._answer_sums(batch), batch))
            preference.add_metrics(self.pair_metrics, metrics, weight)
            return loss
        if self.step_loss is not None:
            return self.step_loss(batch.input_ids, batch.labels, batch.position_ids, batch.attention_mask)
        return target_loss(self.model, batch, self.device, self.t.loss_kernel)

    def _evaluate(self, step: int) -> float | None:
        """The eval loss, on rank 0 (None elsewhere). Under DDP rank 0 alone computes it and the others wait at the next
        boundary; under FSDP or ZeRO-3 every rank takes part in each forward pass (the weights are gathered from all)."""
        if not self.val_encoded or not (self.world.is_main or self.sharded):
            return None
        self.model.eval()
        extra: dict[str, float] = {}
        if self.preference is not None:
            eval_loss, extra = self._evaluate_pairs()
        else:
            eval_loss = mean_loss(self.model, self.val_encoded, self.plan.batch_size, self.t.max_seq_length, self.t.packing,
                                  self.tokenizer.pad_token_id, self.device, self.t.loss_kernel,
                                  step_loss=self.step_loss if self.sharded else None)  # fmt: skip
        self.model.train()
        if not self.world.is_main:
            return None
        self.events.emit("eval", step=step, eval_loss=round(eval_loss, 5), **extra)
        self.registry.update(self.run_record.id, eval_loss=eval_loss)
        return eval_loss

    def _evaluate_pairs(self) -> tuple[float, dict[str, float]]:
        """The held-out pairs' mean loss and their eval_reward_accuracy, eval_reward_margin, eval_*_logps."""
        import torch

        total, metrics = 0.0, {}
        rows = max(1, self.plan.batch_size // self.world.world_size)
        with torch.no_grad():
            for _held, batch in preference.batches(self.val_encoded, rows, self.t.max_seq_length, self.tokenizer.pad_token_id):
                loss, more = self.preference(preference.PairScores.of(self._score_answers(batch), batch))
                total += float(loss)
                preference.add_metrics(metrics, more)
        return total / max(1.0, metrics.get("pairs", 0.0)), preference.mean_metrics(metrics, "eval_")

    def _checkpoint(self, state: TrainerState) -> Path | None:
        """Every rank calls it; rank 0 writes the checkpoint (every rank holds the same LoRA weights and optimizer
        state) and returns its path. Under DeepSpeed every rank also writes its part of the engine's optimizer state."""
        state = replace(state, world_size=self.world.world_size)
        run_dir = self.run_record.path
        if self.zero is not None:
            staging = self.world.broadcast_object(checkpoints.new_staging(run_dir, state.step) if self.world.is_main else None)
            self.zero.save(Path(staging))
            with self.zero.whole_adapter():
                path = checkpoints.save(run_dir, self.model, None, self.scheduler, state, staging=Path(staging)) \
                    if self.world.is_main else None  # fmt: skip
        elif self.world.is_main:
            path = checkpoints.save(run_dir, self.model, self.optimizer, self.scheduler, state)
        if not self.world.is_main:
            return None
        self.registry.add_checkpoint(self.run_record.id, state.step, path)
        self.registry.update(self.run_record.id, step=state.step, loss=state.loss, heartbeat=time.time())
        self.events.emit("checkpoint_saved", durable=True, path=str(path), step=state.step)
        for old in self.registry.checkpoints(self.run_record.id)[: -self.t.keep_checkpoints]:
            shutil.rmtree(old.path, ignore_errors=True)
            self.registry.remove_checkpoint(self.run_record.id, old.step)
        return path

    def _save_adapter(self) -> Path:
        """RUN_DIR/adapter, written by rank 0 (every rank calls it: ZeRO-3 gathers the LoRA weights first)."""
        adapter = self.run_record.path / "adapter"
        with self.zero.whole_adapter() if self.zero is not None else contextlib.nullcontext():
            if self.world.is_main:
                staging = Path(tempfile.mkdtemp(prefix=".adapter.", dir=self.run_record.path))
                # New tokens' rows are in the adapter already; the full (resized) embedding matrices stay out of it.
                self.model.save_pretrained(staging, save_embedding_layers=False)
                self.tokenizer.save_pretrained(staging)
                atomic.publish_dir(staging, adapter)
        return adapter

    def _finish(self, state: TrainerState, status: str) -> TrainResult:
        """Every rank calls it: the final evaluation, checkpoint and adapter may need them all; rank 0 records the end."""
        run_id, run_dir = self.run_record.id, self.run_record.path
        eval_loss = self._evaluate(state.step) if status == "completed" else None
        saved = state.step > 0 and any(c.step == state.step for c in self.registry.checkpoints(run_id))
        if state.step > 0 and not self.world.broadcast_object(saved):
            self._checkpoint(state)
        adapter = self._save_adapter() if status == "completed" else None
        if not self.world.is_main:
            return TrainResult(run_id, status, state.step, state.loss, None, None, run_dir, self.losses)
        if status == "completed":
            self.events.emit("completed", durable=True, step=state.step, final_loss=state.loss, eval_loss=eval_loss,
                             adapter=str(adapter), peak_vram_mb=_peak_vram_mb(self.device),
                             peak_rss_mb=_peak_rss_mb())  # fmt: skip
        else:
            self.events.emit(
                "log",
                durable=True,
                level="warning",
                message=f"run {status} at step {state.step}; `backprop resume {run_id}` continues it",
            )
        # One registry write ends the run: a reader that sees `failed` also sees its code.
        self.registry.update(run_id, step=state.step, loss=state.loss, reason=None, heartbeat=time.time(),
                             final_loss=state.loss if status == "completed" else None)  # fmt: skip
        if status == "failed" and self.control.stop_code:
            _fail(self.run_record, self.registry, self.events, self.control.stop_code, self.control.stop_message)
        else:
            self.registry.update(run_id, status=status, ended_at=time.time())
        return TrainResult(run_id, status, state.step, state.loss, eval_loss, adapter, run_dir, self.losses)


class _StoppedBeforeTraining(Exception):
    """A stop asked for while DPO computes its reference: the run ends `stopped` at step 0."""


@dataclass
class _ReferenceProgress:
    """`reference` events while DPO scores its pairs before the first step (a big model's pass takes minutes): the first
    batch's, then at most one a second, and the last. Ranks that split the pairs count rank 0's share `ranks` times.
    With a `control`, a stop ends the pass at the next batch."""

    events: EventWriter
    total: int
    ranks: int
    control: Control | None
    started: float = field(default_factory=time.monotonic)
    shown: float = -math.inf

    def __call__(self, scored: int) -> None:
        now = time.monotonic()
        done = min(self.total, scored * self.ranks)
        if done == self.total or now - self.shown >= 1.0:
            per_pair = (now - self.started) / max(1, done)
            self.events.emit("reference", done=done, total=self.total, eta_s=round(per_pair * (self.total - done), 1),
                             message=f"DPO reference: {done} / {self.total} pairs")  # fmt: skip
            self.shown = now
        if self.control is not None and self.control.stop.is_set() and done < self.total:
            raise _StoppedBeforeTraining


def _StepLoss(model: Any, device: str, kernel: str) -> Any:
    """A torch module whose forward is the summed target loss of a batch (`target_loss`), or of a preference batch each
    answer's summed log-probability: what the ranks compute through (FSDP's root unit, DeepSpeed's engine module)."""
    import torch

    class StepLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, input_ids: Any, labels: Any, position_ids: Any = None, attention_mask: Any = None, sequence_ids: Any = None
        ) -> Any:
            batch = Batch(input_ids, labels, position_ids, attention_mask, 0, 0, sequence_ids)
            if sequence_ids is not None:  # a preference batch: each answer's summed log-probability
                return preference.answer_logps(self.model, batch, device, kernel)
            return target_loss(self.model, batch, device, kernel)

    return StepLoss()


def check_dataset_unchanged(run: RunRecord, path: str, sha256: str | None, resuming: bool) -> None:
    """A run that continues from a checkpoint must read the data it started on: INPUT_DATASET_CHANGED otherwise."""
    if resuming and run.dataset_sha256 and sha256 and sha256 != run.dataset_sha256:
        raise BackpropError("INPUT_DATASET_CHANGED", path=path, run_id=run.id, recorded=run.dataset_sha256, current=sha256)


def target_loss(model: Any, batch: Batch, device: str, kernel: str = "auto") -> Any:
    """Summed cross-entropy over the tokens that carry loss; logits only where they are needed, a chunk at a time
    (training/loss.py; `kernel` is the `training.loss_kernel` setting)."""
    from training.loss import head_loss, loss_kernel

    base = model.get_base_model()
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if "flash" in str(getattr(base.config, "_attn_implementation", "")):
        batch = flatten(batch)  # packed examples stay apart under flash attention only in a single row
    hidden = decoder(
        input_ids=batch.input_ids.to(device),
        position_ids=None if batch.position_ids is None else batch.position_ids.to(device),
        attention_mask=None if batch.attention_mask is None else batch.attention_mask.to(device),
        use_cache=False,
    ).last_hidden_state
    labels = batch.labels.to(device)[:, 1:]
    keep = labels != -100
    return head_loss(hidden[:, :-1][keep], head, labels[keep], loss_kernel(head, device, kernel))


def mean_loss(
    model: Any,
    encoded: list,
    batch_size: int,
    max_len: int,
    packing: bool,
    pad_id: int,
    device: str,
    kernel: str = "auto",
    step_loss: Any = None,
) -> float:
    """Loss per target token over a set of encoded examples, in a fixed order (no gradients). `step_loss` (a sharded
    model's root module, whose forward is `target_loss`) computes it instead of the model itself when given."""
    import torch

    plan = BatchPlan(encoded, batch_size, max_len, packing, 0, pad_id)
    total = targets = 0.0
    with torch.no_grad():
        for rows in plan.epoch(0):
            batch = collate(rows, pad_id, packing)
            if step_loss is not None:
                total += float(step_loss(batch.input_ids, batch.labels, batch.position_ids, batch.attention_mask))
            else:
                total += float(target_loss(model, batch, device, kernel))
            targets += batch.target_tokens
    return total / max(1, targets)


def _step_estimate(model: Any, lora_r: int) -> tuple[memory.DecoderShape, dict[str, Any]]:
    """The model's shape and the keyword arguments of `memory.step_bytes` that describe its LoRA training step."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    frozen = next((p for p in model.parameters() if not p.requires_grad and p.is_floating_point()), None)
    adapter = next((p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n), None)
    head = model.get_output_embeddings()
    chunked = type(head) is torch.nn.Linear and not head.weight.requires_grad  # else the loss takes all logits at once
    return memory.DecoderShape.from_config(config), dict(
        element_bytes=frozen.element_size() if frozen is not None else 2,
        adapter_bytes=adapter.element_size() if adapter is not None else 4, lora_r=lora_r,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        logit_chunk_rows=memory.LOGIT_CHUNK_ROWS if chunked else None,
    )  # fmt: skip


def _import_unsloth_first() -> None:
    """unsloth patches transformers, peft and trl as it is imported: before them, or part of its speed is lost."""
    try:
        import unsloth  # type: ignore[import-not-found]  # noqa: F401
    except Exception:  # not installed, or unusable here: _load_unsloth says so and falls back to transformers + peft
        pass


def _peak_vram_mb(device: str) -> int | None:
    """The most CUDA memory this process's tensors held at once, in MiB; None off CUDA."""
    if device != "cuda":
        return None
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20)


def _peak_rss_mb() -> int | None:
    """The most resident memory this process held at once, in MiB (the CPU side of a run; Linux and macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10))


def adamw(params: list, lr: float, weight_decay: float, fused: bool | None = None) -> Any:
    """AdamW; fused (one kernel for all parameters) when they are all on CUDA, torch's default (foreach) otherwise."""
    import torch

    if fused is None:
        fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def fit_optimizer_state(optimizer: Any) -> None:
    """After loading a state dict saved by an optimizer fused or not: its groups' `fused` flag comes back with it, and
    the step counters where that flag kept them (the fused kernel wants them on the parameters' device, the others on
    the CPU). Make both as this machine's optimizer would have them."""
    import torch

    params = [p for group in optimizer.param_groups for p in group["params"]]
    fused = bool(params) and all(p.is_cuda for p in params)
    for group in optimizer.param_groups:
        group["fused"] = True if fused else None
        if fused:
            group["foreach"] = None
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=p.device if fused else "cpu", dtype=torch.float32)


def _split(batch, parts: int) -> list:
    """Split a micro-batch into `parts` smaller ones (rows first); used after a CUDA OOM.

    Only the loss inputs matter here: the step's token counts were taken from the unsplit batch."""
    if parts == 1 or batch.input_ids.shape[0] == 1:
        return [batch]

    n = batch.input_ids.shape[0]
    size = max(1, n // parts)
    out = []
    for i in range(0, n, size):
        sl = slice(i, i + size)
        ids = batch.input_ids[sl]
        labels = batch.labels[sl]
        real = int((labels[:, 1:] != -100).sum())
        rest = [None if t is None else t[sl] for t in (batch.position_ids, batch.attention_mask, batch.sequence_ids,
                                                         batch.reference)]  # fmt: skip
        out.append(Batch(ids, labels, rest[0], rest[1], int(ids.numel()), real, rest[2], rest[3]))
    return out


def _token_rows(model: Any, ids: list[int]) -> dict[str, list[int]]:
    """Rows to train of the input embeddings and, unless tied to them, of the output head: the tokens the model never saw
    need both, to read them and to predict them (the end of a turn above all)."""
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    rows = {names[id(model.get_input_embeddings())]: list(ids)}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        rows[names[id(head)]] = list(ids)
    return rows


def _qlora_config(device: str, dtype: Any):
    if device != "cuda":
        raise BackpropError(
            "INPUT_INVALID_ARGUMENT",
            reason="QLoRA (4-bit) needs an NVIDIA GPU",
            hint="Drop --qlora to train in full precision on CPU.",
        )
    require("gpu", "bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
    )


def new_train_run(
    registry: Registry,
    settings: Settings,
    data: str,
    *,
    fmt: str | None = None,
    skip_invalid: bool = False,
    name: str | None = None,
    parent_id: str | None = None,
    extra: dict[str, Any] | None = None,
    runs_root: Path | None = None,
) -> RunRecord:
    """Register a training run: its spec holds every setting, so resume needs nothing else.

    `extra` adds spec keys: `validation_data` (a held-out file), `init_adapter` (LoRA weights to start from)."""
    from training.models import apply_model_defaults

    settings = apply_model_defaults(settings)
    spec = {
        "data": str(Path(data).expanduser().resolve()) if Path(data).expanduser().exists() else data,
        "format": fmt,
        "skip_invalid": skip_invalid,
        "batch_size_given": "batch_size" in settings.training.model_fields_set,
        "settings": settings.model_dump(mode="json", exclude={"home", "ui"}),
        "params": {"model": settings.model, **settings.lora.model_dump(), **settings.training.model_dump()},
        **(extra or {}),
    }
    return registry.create("train", spec, model=settings.model, dataset=spec["data"], name=name, parent_id=parent_id,
                           runs_root=runs_root)  # fmt: skip
