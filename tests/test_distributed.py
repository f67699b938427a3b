"""Training on several processes (issue 12): torchrun launches the ranks, accelerate/DDP on gloo, real processes.

Every test trains the demo model for a few steps on two CPU processes; the tolerance of the equivalence test is
1e-4 relative on each step's loss, and on the adapter 1e-3 of each tensor's largest weight under DDP, 3e-3 under FSDP
(fp32; Adam amplifies the summation-order noise of the gradients a little, and FSDP gathers in another order)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DATA, backprop, wait_for

from training import jobs
from training.config import load_settings, nest_options
from training.distributed import World, free_port, shard
from training.events import read_events
from training.runs import Registry, pid_alive

pytestmark = pytest.mark.slow

# The strategies that shard: FSDP2 through torch, ZeRO through DeepSpeed (the `dist` extra).
SHARDED = [
    "fsdp",
    pytest.param("deepspeed-zero3", marks=pytest.mark.extra("dist")),
    pytest.param("deepspeed-zero2", marks=pytest.mark.extra("dist")),
]


SMALL = {"model": "demo", "max_seq_length": 64, "telemetry_interval_s": 0, "collective_timeout_s": 30}


def _submit(**options) -> tuple[Registry, str]:
    settings = load_settings(**nest_options({**SMALL, **options}))
    run = jobs.submit_train(settings, str(DEMO_DATA))
    return Registry(settings.home), run.id


def _events(registry: Registry, run_id: str, kind: str) -> list[dict]:
    return [e for e in read_events(registry.get(run_id).path / "events.jsonl")[0] if e["event"] == kind]


def _finish(registry: Registry, run_id: str) -> str:
    return wait_for(lambda: registry.get(run_id).status not in ("queued", "running", "paused") and registry.get(run_id).status,
                    timeout=300, what=f"run {run_id} to end")  # fmt: skip


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_each_rank_takes_its_rows_of_the_global_batch_and_an_empty_share_counts_for_nothing():
    rows = list(range(5))
    assert [shard(rows, World(rank=r, world_size=2))[0] for r in (0, 1)] == [[0, 2, 4], [1, 3]]
    assert shard([7], World(rank=1, world_size=2)) == ([7], False)  # joins the all-reduce with weight 0


def test_two_processes_at_batch_b_train_exactly_as_one_process_at_batch_2b(home):
    registry, two = _submit(steps=4, batch_size=2, nproc=2, telemetry_interval_s=0.5)
    assert _finish(registry, two) == "completed"
    registry, one = _submit(steps=4, batch_size=4, nproc=1)
    assert _finish(registry, one) == "completed"

    started = _events(registry, two, "started")[0]
    assert (started["world_size"], started["strategy"], started["devices"]) == (2, "ddp", ["cpu", "cpu"])
    assert _events(registry, one, "started")[0]["world_size"] == 1
    shown = json.loads(backprop("show-run", two, "--json").stdout)
    assert (shown["world_size"], shown["strategy"], shown["devices"]) == (2, "ddp", ["cpu", "cpu"])
    curve2 = [e["loss"] for e in _events(registry, two, "step")]
    curve1 = [e["loss"] for e in _events(registry, one, "step")]
    assert len(curve2) == len(curve1) == 4
    assert curve2 == pytest.approx(curve1, rel=1e-4)
    a2, a1 = _adapter(registry.get(two).path / "adapter"), _adapter(registry.get(one).path / "adapter")
    assert a2.keys() == a1.keys()
    worst = max(float((a2[k] - a1[k]).abs().max() / a1[k].abs().max().clamp(min=1e-12)) for k in a1)
    assert worst < 1e-3, worst
    # Rank 0 alone wrote the run; rank 1's output is in its own log.
    assert len(_events(registry, two, "started")) == 1
    assert (registry.get(two).path / "rank-1.log").exists()
    # Rank 0 tracked it (TensorBoard, as `auto` picks when nothing else is configured): every step, once.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.tracking import read_tracking

    tracking = read_tracking(registry.get(two).path)
    assert set(tracking) == {"tensorboard"}
    accumulator = EventAccumulator(tracking["tensorboard"])
    accumulator.Reload()
    assert [s.value for s in accumulator.Scalars("train/loss")] == pytest.approx(curve2, rel=1e-5)
    assert [s.step for s in accumulator.Scalars("train/loss")] == [1, 2, 3, 4]
    # The worker samples the machine; rank 0 hands its telemetry events (those written while it lives) to the trackers.
    assert 0 < len(accumulator.Scalars("system/cpu_percent")) <= len(_events(registry, two, "telemetry"))


@pytest.mark.parametrize("strategy", ["ddp", *SHARDED[:2]])
def test_a_time_box_and_a_stop_reach_both_ranks_with_one_checkpoint_and_resume_continues(home, strategy):
    registry, run_id = _submit(steps=500, batch_size=2, nproc=2, save_every=0, max_run_minutes=0.04, strategy=strategy)
    assert _finish(registry, run_id) == "timeboxed"
    steps = _events(registry, run_id, "step")
    saved = registry.checkpoints(run_id)
    assert len(saved) == 1 and saved[0].step == steps[-1]["step"] == registry.get(run_id).step
    assert [p.name for p in (registry.get(run_id).path / "checkpoints").iterdir()] == [Path(saved[0].path).name]

    # Its batch position counts global batches of two processes: resuming on one is refused before anything starts.
    from training.errors import BackpropError

    with pytest.raises(BackpropError) as refused:
        jobs.resume(registry, run_id, {"distributed": {"nproc": 1}})
    assert refused.value.code == "INPUT_WORLD_SIZE_CHANGED" and registry.get(run_id).status == "timeboxed"

    # Resumed (no time box now), then stopped by the user: again one checkpoint, at the step reached.
    jobs.resume(registry, run_id, {"max_run_minutes": 0})
    at = steps[-1]["step"]
    wait_for(lambda: len(_events(registry, run_id, "step")) >= len(steps) + 2, what="two more steps")
    jobs.request_stop(registry, run_id)
    assert _finish(registry, run_id) == "stopped"
    after = _events(registry, run_id, "step")
    assert [e["step"] for e in after[len(steps) :]] == list(range(at + 1, after[-1]["step"] + 1))
    assert _events(registry, run_id, "started")[-1]["resumed_from"] == at
    saved = registry.checkpoints(run_id)
    assert saved[-1].step == after[-1]["step"] and sum(c.step > at for c in saved) == 1


@pytest.mark.parametrize("strategy", SHARDED)
def test_a_sharded_strategy_trains_as_one_process(home, strategy):
    """FSDP2, DeepSpeed ZeRO-3 and ZeRO-2 on two gloo processes: losses, evals and adapter match one process; FSDP
    and ZeRO-3 hold half of the frozen weights on each rank."""
    options = {"steps": 4, "validation_split": 0.2, "eval_every": 2}
    registry, sharded = _submit(**options, batch_size=2, nproc=2, strategy=strategy)
    assert _finish(registry, sharded) == "completed"
    registry, one = _submit(**options, batch_size=4, nproc=1)
    assert _finish(registry, one) == "completed"

    started = _events(registry, sharded, "started")[0]
    assert started["strategy"] == strategy
    assert started["trainable_params"] == _events(registry, one, "started")[0]["trainable_params"] > 0
    shares = [e for e in _events(registry, sharded, "log") if "frozen_local" in e]
    if strategy != "deepspeed-zero2":
        assert len(shares) == 1 and shares[0]["frozen_local"] / shares[0]["frozen_total"] == pytest.approx(0.5, abs=0.01)
    curve = [e["loss"] for e in _events(registry, sharded, "step")]
    assert curve == pytest.approx([e["loss"] for e in _events(registry, one, "step")], rel=1e-4)
    evals = [e["eval_loss"] for e in _events(registry, sharded, "eval")]  # at step 2 and at the end
    assert len(evals) == 2 and evals == pytest.approx([e["eval_loss"] for e in _events(registry, one, "eval")], rel=1e-4)
    assert registry.get(sharded).eval_loss == pytest.approx(registry.get(one).eval_loss, rel=1e-4)  # every rank evaluated
    a2, a1 = _adapter(registry.get(sharded).path / "adapter"), _adapter(registry.get(one).path / "adapter")
    assert a2.keys() == a1.keys()
    assert max(float((a2[k] - a1[k]).abs().max() / a1[k].abs().max().clamp(min=1e-12)) for k in a1) < 3e-3


def test_an_oom_on_one_rank_halves_the_batch_on_every_rank_and_trains_as_if_nothing_happened(home, monkeypatch):
    from training.rank import OOM_AT_ENV

    monkeypatch.setenv(OOM_AT_ENV, "1:2")  # rank 1 runs out of memory in step 2; rank 0 does not
    registry, run_id = _submit(steps=4, batch_size=4, nproc=2, packing=False)
    assert _finish(registry, run_id) == "completed"
    monkeypatch.delenv(OOM_AT_ENV)
    registry, reference = _submit(steps=4, batch_size=4, nproc=2, packing=False)
    assert _finish(registry, reference) == "completed"

    warnings = [e for e in _events(registry, run_id, "log") if "out of memory" in e["message"]]
    assert [(w["step"], w["rows"]) for w in warnings] == [(2, 2)]  # said once, by rank 0, for both ranks
    curve = [e["loss"] for e in _events(registry, run_id, "step")]
    assert curve == pytest.approx([e["loss"] for e in _events(registry, reference, "step")], rel=1e-4)


def _rank_pid(run_id: str, rank: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"BACKPROP_RUN_ID={run_id}".encode() in env and f"RANK={rank}".encode() in env and b"training.rank" in cmd:
            return int(entry.name)
    return None


def test_a_killed_rank_ends_the_run_interrupted_without_a_hang_and_resume_finishes_it(home):
    registry, run_id = _submit(steps=40, batch_size=2, nproc=2, save_every=2, collective_timeout_s=30)
    wait_for(lambda: _events(registry, run_id, "checkpoint_saved"), what="a first checkpoint")
    os.kill(wait_for(lambda: _rank_pid(run_id, 1), what="rank 1"), signal.SIGKILL)
    assert _finish(registry, run_id) == "interrupted"
    checkpointed = registry.checkpoints(run_id)[-1].step
    assert checkpointed >= 2
    assert _rank_pid(run_id, 0) is None  # the surviving rank exited too

    wait_for(lambda: not pid_alive(registry.get(run_id).pid), what="the worker to exit")  # it writes the status last
    jobs.resume(registry, run_id)
    assert _finish(registry, run_id) == "completed"
    assert _events(registry, run_id, "started")[-1]["resumed_from"] == checkpointed
    assert registry.get(run_id).step == 40


def test_two_machines_on_loopback_train_one_run_together(home, tmp_path):
    """Machine 1's launch is a run of its own home's registry: it ends `completed` once its ranks finished; machine 0's
    run holds the events, checkpoints and adapter."""
    import shutil

    home1 = tmp_path / "machine1"
    shutil.copytree(home / "models", home1 / "models")
    port = free_port()
    common = {"steps": 3, "batch_size": 2, "nproc": 1, "nnodes": 2, "master_addr": "127.0.0.1", "master_port": port}
    registry0, run0 = _submit(**common, node_rank=0)
    registry1, run1 = _submit(**common, node_rank=1, home=str(home1))
    assert _finish(registry0, run0) == "completed"
    assert _finish(registry1, run1) == "completed"
    assert _events(registry0, run0, "started")[0]["world_size"] == 2
    assert (registry0.get(run0).path / "adapter").is_dir()
    assert not (registry1.get(run1).path / "adapter").exists() and not _events(registry1, run1, "step")


def test_a_two_run_slao_campaign_on_two_processes_merges_exactly_its_children(home):
    from safetensors.torch import load_file

    from training import slao

    settings = load_settings(**nest_options({**SMALL, "nproc": 2, "batch_size": 2, "seed": 7}))
    run_id = jobs.submit_multi_run(settings, [str(DEMO_DATA)], num_runs=2, steps_per_run=4, samples_per_run=13,
                                   validation=0.25).id  # fmt: skip
    registry = Registry(settings.home)
    assert _finish(registry, run_id) == "completed"
    children = registry.children(run_id)
    assert [c.status for c in children] == ["completed", "completed"]
    for child in children:  # each child trained on both ranks; its rank 0 wrote it, the campaign relayed it
        started = _events(registry, child.id, "started")[0]
        assert (started["world_size"], started["devices"]) == (2, ["cpu", "cpu"])
        assert (child.path / "rank-1.log").exists()
    relayed = _events(registry, run_id, "step")
    assert [(e["run"], e["run_step"]) for e in relayed] == [(r, s) for r in (1, 2) for s in (1, 2, 3, 4)]
    assert [e["step"] for e in relayed] == list(range(1, 9))

    merged = None
    for i, child in enumerate(children, 1):
        merged, _ = slao.merge(merged, load_file(child.path / "adapter" / "adapter_model.safetensors"), i)
    result = load_file(registry.get(run_id).path / "adapter" / "adapter_model.safetensors")
    assert result.keys() == merged.keys()
    assert all(torch.allclose(result[k], merged[k], atol=1e-6) for k in merged)
    assert len(registry.forgetting(run_id)) == 2


def test_qlora_under_fsdp_and_a_multi_machine_multi_run_are_refused_with_a_code_before_anything_is_queued(home):
    from training.errors import BackpropError
    from training.runs import Registry

    with pytest.raises(BackpropError) as refused:
        _submit(steps=2, batch_size=2, nproc=2, strategy="fsdp", qlora=True)
    assert refused.value.code == "INPUT_STRATEGY_UNSUPPORTED" and "4-bit" in refused.value.message
    settings = load_settings(**nest_options({"model": "demo", "nproc": 1, "nnodes": 2}))
    with pytest.raises(BackpropError) as refused:
        jobs.submit_multi_run(settings, [str(DEMO_DATA)], num_runs=2, steps_per_run=2)
    assert refused.value.code == "INPUT_INVALID_ARGUMENT" and "one machine" in refused.value.message
    assert Registry(settings.home).list() == []
