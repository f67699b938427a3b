"""Several processes, GPUs or machines: torchrun starts one process per rank, accelerate drives them.

    torchrun_command(settings, run_dir)        # the launch line (the worker runs it; --print-launch prints it)
    world = World.from_env()                   # rank, local_rank, world_size, read from torchrun's environment
    decision = world.broadcast_decision(code)  # rank 0's step-boundary decision, the same on every rank

The loop stays Backprop's own: at each step boundary rank 0 decides (continue, stop, time box, pause, early stop) and
one broadcast carries the decision, so every rank stops at the same step and the run keeps ONE complete checkpoint.
Rank 0 learns of stop and pause from the worker (its agent) through RUN_DIR/control.json (see ControlFile).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training import atomic
from training.config import Settings
from training.control import Control

# Step-boundary decisions (rank 0 decides, `broadcast_decision` carries them).
CONTINUE, STOP, FAIL, TIMEBOX, PAUSE, EARLY_STOP = range(6)
CONTROL_FILE = "control.json"
# How the model is spread over the ranks: a copy each, or the frozen weights sharded (FSDP2; DeepSpeed ZeRO-3), or
# only the optimizer state and gradients partitioned (ZeRO-2).
STRATEGIES = ("ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3")
BUCKET_ELEMENTS = 1 << 25  # gradients all-reduced together: at most this many elements (128 MiB in fp32) at a time


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the rendezvous binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def nproc_value(settings: Settings, nproc: int | None = None) -> int | str:
    """Processes on this machine: `nproc` when given (the governor's count for 'auto'), else the setting; 'auto'
    unresolved becomes torchrun's own 'gpu' (one process per visible GPU)."""
    value = nproc if nproc is not None else settings.distributed.nproc
    return "gpu" if value == "auto" else int(value)


def is_distributed(settings: Settings) -> bool:
    """Does this job run under torchrun (several processes here, or a part of a multi-machine run)?"""
    d = settings.distributed
    return d.nnodes > 1 or d.nproc == "auto" or int(d.nproc) > 1


def world_size(settings: Settings) -> int | None:
    """The processes of a job over every machine (None for `--nproc auto`: known once GPUs are admitted)."""
    d = settings.distributed
    return None if d.nproc == "auto" else int(d.nproc) * d.nnodes


def check_strategy(settings: Settings) -> None:
    """Refuse a strategy Backprop cannot drive here, with its reason (at submit time, and again in each rank)."""
    from training.errors import BackpropError
    from training.extras import require

    strategy = settings.distributed.strategy
    if strategy.startswith("deepspeed"):
        require("dist", "deepspeed")
    if strategy != "ddp" and settings.training.qlora:
        raise BackpropError("INPUT_STRATEGY_UNSUPPORTED", strategy=strategy,
                            reason="4-bit (QLoRA) weights are not sharded here; train 16-bit weights with a sharded "
                            "strategy, or QLoRA with --strategy ddp")  # fmt: skip


def check_supported(settings: Settings, kind: str) -> None:
    """Refuse, before anything is queued, what several processes cannot do yet: say so rather than train otherwise."""
    from training.errors import BackpropError

    if is_distributed(settings):
        check_strategy(settings)
    if kind == "multi-run" and settings.distributed.nnodes > 1:
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason="a multi-run trains on the GPUs of one machine",
                            hint="Drop --nnodes for multi-runs (--nproc N works); single runs span machines.")  # fmt: skip


def torchrun_command(
    settings: Settings,
    run_dir: Path | str | None,
    *,
    module: str | None = "training.rank",
    script_args: list[str] | None = None,
    nproc: int | None = None,
    port: int | None = None,
) -> list[str]:
    """The torchrun launch line of a job: `python -m torch.distributed.run ... -m MODULE RUN_DIR [ARGS]`.

    With `module=None`, `script_args` is the program and its arguments (`backprop run script.py --nproc N`). One machine
    with master_port 0 gets a free loopback port; several machines need the fixed port of machine 0."""
    d = settings.distributed
    port = port or d.master_port or (free_port() if d.nnodes == 1 else 29500)
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc_value(settings, nproc)),
        "--nnodes", str(d.nnodes), "--node-rank", str(d.node_rank),
        "--master-addr", d.master_addr if d.nnodes > 1 else "127.0.0.1", "--master-port", str(port),
        "--max-restarts", "0",  # a dead rank ends the run (interrupted); `backprop resume` continues it
    ]  # fmt: skip
    if module is None:
        return [*command, *(script_args or [])]
    return [*command, "-m", module, *([str(run_dir)] if run_dir is not None else []), *(script_args or [])]


def omp_threads(nproc: int, cores: int | None = None) -> int:
    """Threads per rank on CPU: the cores split evenly, at least one."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, nproc))


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> World:
        """The rank of this process as torchrun set it (a plain process: rank 0 of 1)."""
        env = dict(os.environ if env is None else env)
        return cls(
            rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env.get("WORLD_SIZE", 1)), local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        )  # fmt: skip

    def broadcast_decision(self, code: int, device: str = "cpu") -> int:
        """Rank 0's `code` on every rank (a one-int broadcast; the others' `code` is ignored)."""
        if not self.distributed:
            return code
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([code], dtype=torch.int64, device=device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def all_sum(self, value: float, device: str = "cpu") -> float:
        """The sum of `value` over every rank (fp64)."""
        if not self.distributed:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def average_gradients(self, params: list[Any]) -> None:
        """Average the gradients of `params` (whole on every rank) over the ranks: one all-reduce per bucket of at most
        BUCKET_ELEMENTS, after the step's last backward pass."""
        if not self.distributed:
            return
        import torch
        import torch.distributed as dist

        for bucket in _buckets([p.grad for p in params if p.grad is not None]):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= self.world_size
            for grad, part in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                grad.copy_(part.view_as(grad))

    def broadcast_tensors(self, tensors: list[Any]) -> None:
        """Rank 0's values of `tensors` on every rank, in place (the trainable weights start the same everywhere)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for tensor in tensors:
            dist.broadcast(tensor, src=0)

    def gather_devices(self, device: str) -> list[str]:
        """Every rank's device, in rank order (rank 0 reports them in the `started` event)."""
        name = device
        if device == "cuda":
            import torch

            index = torch.cuda.current_device()
            name = f"cuda:{index} {torch.cuda.get_device_name(index)}"
        if not self.distributed:
            return [name]
        import torch.distributed as dist

        names: list[Any] = [None] * self.world_size
        dist.all_gather_object(names, name)
        return [str(n) for n in names]

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _buckets(grads: list[Any]) -> Iterator[list[Any]]:
    bucket: list[Any] = []
    size = 0
    for grad in grads:
        if bucket and size + grad.numel() > BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(grad)
        size += grad.numel()
    if bucket:
        yield bucket


def process_group_kwargs(settings: Settings, device: str) -> dict[str, Any]:
    """How the process group starts: gloo on CPU, nccl on CUDA, every collective bounded by the timeout."""
    from datetime import timedelta

    timeout = timedelta(seconds=settings.distributed.collective_timeout_s)
    return {"backend": "nccl" if device == "cuda" else "gloo", "timeout": timeout}


def shard(rows: list, world: World) -> tuple[list, bool]:
    """Rank r's part of a global micro-batch: rows r, r+W, r+2W, ... (deterministic, balanced). A rank left without rows
    (the short last batch of an epoch) takes row 0 with weight 0, so that it still joins the gradient all-reduce:
    returns (rows, whether they count)."""
    mine = rows[world.rank :: world.world_size]
    if mine:
        return mine, True
    return rows[:1], False


def is_collective_failure(exc: BaseException) -> bool:
    """A peer rank died or a collective timed out (not a bug of this rank): the run is `interrupted`, not failed."""
    try:
        import torch.distributed as dist

        if isinstance(exc, dist.DistError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "connection closed", "connection reset", "timed out", "broken pipe")
    )


class ControlFile:
    """The agent (the governed worker) tells rank 0 about stop and pause through RUN_DIR/control.json, written
    atomically whenever its Control changes; rank 0 reads it at each step boundary. The time box is rank 0's own."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / CONTROL_FILE
        self._last: dict[str, Any] | None = None
        self._mtime: float | None = None

    def publish(self, control: Control) -> None:
        """Agent side: write the Control's stop and pause state when it changed."""
        state = {
            "stop": control.stop.is_set(), "stop_code": control.stop_code, "stop_message": control.stop_message,
            "pause": control.pause.is_set(), "pause_reason": control.pause_reason,
            "time_up": control.timed_out(),  # a multi-run's time box is the worker's, across its runs
        }  # fmt: skip
        if state != self._last:
            atomic.write_json(self.path, state)
            self._last = state

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self._last = None

    def apply(self, control: Control) -> None:
        """Rank 0 side: bring the local Control in line with what the agent wrote."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._mtime:
            return
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # never half-written (atomic), but a reader may race a rename on some file systems: read next time
        self._mtime = mtime
        if state.get("stop"):
            control.request_stop(state.get("stop_code"), state.get("stop_message") or "")
        if state.get("time_up") and not control.timed_out():
            control.deadline = time.monotonic()
        if state.get("pause"):
            control.request_pause(state.get("pause_reason") or "")
        else:
            control.release()


def run_ranks(
    run: Any, registry: Any, settings: Settings, control: Control, events: Any, on_poll: Callable[[], None] | None = None
) -> str:
    """The worker as the ranks' agent: start torchrun (one process a rank, in the worker's process group so that a
    forced stop reaches them all), pass stop and pause to rank 0, wait, and map torchrun's exit to the run's status.
    `on_poll` is called a few times a second while the ranks run (a multi-run relays its child's events there).

    On machine 0, rank 0 records the run's end itself; a run still `running` when torchrun returns lost a rank (killed,
    crashed, or a collective timed out): it is `interrupted`, and `backprop resume` continues from its last checkpoint.
    On another machine (node_rank > 0) this run's row stands for that machine's share: it ends `completed` when its
    ranks finished cleanly, `interrupted` otherwise; machine 0's run holds the events, checkpoints and adapter."""
    import subprocess

    d = settings.distributed
    _fetch_model_once(settings)
    channel = ControlFile(run.path)
    channel.clear()
    channel.publish(control)
    command = torchrun_command(settings, run.path, nproc=None if d.nproc == "auto" else int(d.nproc))
    env = {**os.environ, "BACKPROP_RUN_ID": run.id}  # names the run's rank processes (ps, tests)
    env.setdefault("OMP_NUM_THREADS", str(omp_threads(d.nproc if isinstance(d.nproc, int) else 1)))
    if d.node_rank > 0:
        registry.update(run.id, status="running", started_at=run.started_at or time.time(), heartbeat=time.time())
        events.emit("log", level="info", message=f"machine {d.node_rank} of {d.nnodes}: its ranks train with machine 0 "
                    f"({d.master_addr}:{d.master_port}), whose run holds the events, checkpoints and adapter")  # fmt: skip
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=env)
    try:
        while process.poll() is None:
            channel.publish(control)
            if on_poll is not None:
                on_poll()
            time.sleep(0.2)
    finally:
        if process.poll() is None:  # the worker itself is going down: take the ranks with it
            process.terminate()
            process.wait()
    code = process.returncode
    status = registry.get(run.id).status
    if d.node_rank > 0:
        status = "completed" if code == 0 else "interrupted"
        registry.update(run.id, status=status, ended_at=time.time(), reason=None)
    elif status in ("queued", "running", "paused"):
        status = "interrupted"
        message = f"a rank ended the run (torchrun exit {code}; see worker.log and rank-N.log in the run folder)"
        registry.update(run.id, status=status, ended_at=time.time(), reason=None, error_message=message)
        events.emit("log", durable=True, level="warning", message=f"{message}; `backprop resume {run.id}` continues it")
    channel.clear()
    return status


def _fetch_model_once(settings: Settings) -> None:
    """Download (or build, for the demo model) the model here, before the ranks start: N ranks fetching it at once
    would race. A model that cannot be had is left for rank 0 to report with its coded error."""
    from training.errors import BackpropError
    from training.models import resolve_model

    try:
        resolve_model(settings.model, settings.home)
    except BackpropError:
        pass
