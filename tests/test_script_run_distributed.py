"""`backprop run script.py --nproc 2`: a user's own torch.distributed script (assets/examples/distributed_script.py,
gloo, two real ranks) launched through torchrun as a governed job: time-boxed, resumable from its checkpoint, and
paused as a whole (SIGSTOP reaches torchrun and every rank, each in a process group of its own)."""

from __future__ import annotations

import json
import os

import psutil
import pytest
from conftest import ROOT, backprop, wait_for

from training import jobs
from training.config import load_settings, nest_options
from training.events import read_events
from training.runs import Registry

DDP_SCRIPT = ROOT / "assets" / "examples" / "distributed_script.py"


def events_of(registry: Registry, run_id: str) -> list[dict]:
    return read_events(registry.get(run_id).path / "events.jsonl")[0]


def ranks_of(registry: Registry, run_id: str) -> list[psutil.Process]:
    """The script's rank processes (torchrun's children), found from the worker down."""
    worker = psutil.Process(registry.get(run_id).pid)
    return [p for p in worker.children(recursive=True) if "distributed_script.py" in " ".join(p.cmdline())
            and "torch.distributed.run" not in " ".join(p.cmdline())]  # fmt: skip


@pytest.mark.slow
def test_a_distributed_script_is_time_boxed_on_every_rank_and_resumes_from_its_checkpoint(home):
    registry = Registry(home)
    args = ["--", "--steps", "10000000", "--log-every", "1"]
    out = backprop("run", str(DDP_SCRIPT), "--nproc", "2", "-m", "0.005", "-c", "0.005", "--json", *args)
    assert out.returncode == 3, out.stderr
    run = registry.get(json.loads(out.stdout.strip().splitlines()[-1])["run_id"])
    assert run.status == "timeboxed" and run.step > 0
    saved = registry.checkpoints(run.id)
    assert saved and os.path.exists(saved[-1].path)
    events = events_of(registry, run.id)
    command = next(e["command"] for e in events if e["event"] == "started")
    assert command[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node", "2"] and str(DDP_SCRIPT) in command
    steps = [e for e in events if e["event"] == "step"]
    assert steps and {e["world_size"] for e in steps} == {2}  # rank 0 speaks for a world of two
    assert [e["step"] for e in steps] == sorted({e["step"] for e in steps})  # one message a step: rank 0's only

    again = backprop("resume", run.id, "--max-run-minutes", "0.02", "--json")
    assert again.returncode == 3, again.stderr
    resumed = registry.get(run.id)
    assert resumed.status == "timeboxed" and resumed.step > saved[-1].step  # it went on from the checkpoint
    events = events_of(registry, run.id)
    commands = [" ".join(e["command"]) for e in events if e["event"] == "started"]
    assert f"--resume-from {saved[-1].path}" in commands[-1]
    resumed_lines = [e for e in events if e.get("message") == f"resumed from {saved[-1].path} at step {saved[-1].step}"]
    assert len(resumed_lines) == 1  # both ranks loaded it; rank 0 said so
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert losses[-1] < losses[0]  # it really learns


@pytest.fixture
def sensor(home, tmp_path, monkeypatch):
    path = tmp_path / "sensor.json"

    def write(temp: float) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"gpus": [{"name": "Sim", "temp": temp, "mem_used": 0, "mem_total": 24000},
                                            {"name": "Sim", "temp": 50, "mem_used": 0, "mem_total": 24000}]}))  # fmt: skip
        os.replace(tmp, path)

    write(60)
    monkeypatch.setenv("BACKPROPAGATE_TELEMETRY_FILE", str(path))
    monkeypatch.setenv("BACKPROPAGATE_TELEMETRY_INTERVAL_S", "0.2")
    monkeypatch.setenv("BACKPROPAGATE_GPU__COOL_DOWN_SECONDS", "0.5")
    return write


@pytest.mark.slow
def test_a_hot_gpu_pauses_torchrun_and_every_rank_and_a_stop_ends_them_all_with_one_checkpoint(home, sensor):
    registry = Registry(home)
    settings = load_settings(**nest_options({"nproc": 2}))
    run_id = jobs.submit_script(settings, str(DDP_SCRIPT), ["--steps", "100000000", "--log-every", "1"]).id
    wait_for(lambda: registry.get(run_id).step >= 5, what="the ranks to train")
    ranks = ranks_of(registry, run_id)
    assert len(ranks) == 2 and len({os.getpgid(p.pid) for p in ranks}) == 2  # torchrun gives each rank its own group
    sensor(temp=95)  # the hotter of the job's two GPUs decides
    wait_for(lambda: registry.get(run_id).status == "paused", what="the pause")
    wait_for(lambda: all(p.status() == psutil.STATUS_STOPPED for p in ranks), what="SIGSTOP on every rank")
    sensor(temp=60)
    wait_for(lambda: registry.get(run_id).status == "running", what="the resume")
    assert all(p.status() != psutil.STATUS_STOPPED for p in ranks)
    step = registry.get(run_id).step
    wait_for(lambda: registry.get(run_id).step > step, what="training to go on")

    run = jobs.stop(registry, run_id)
    assert run.status == "stopped"
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks), what="the ranks to end")
    events = events_of(registry, run_id)
    assert "forced" not in json.dumps(events[-3:])  # every rank stopped at the same step, none had to be killed
    last = [e for e in events if e["event"] == "checkpoint_saved"][-1]
    assert last["step"] == registry.get(run_id).step and os.path.exists(last["path"])  # saved at the step it stopped
