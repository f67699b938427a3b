"""The governor with several GPUs: a job asking for N GPUs starts only when N pass admission (free VRAM, temperature),
gets those with the most free memory, sees exactly them in CUDA_VISIBLE_DEVICES, and takes one maxParallel slot per GPU.

Four simulated GPUs (BACKPROPAGATE_TELEMETRY_FILE) stand in for a multi-GPU machine; the jobs are real worker
processes running a real script under torchrun (gloo, on the CPU).
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from conftest import wait_for

from training import jobs
from training.config import load_settings, nest_options
from training.events import read_events
from training.governor import check_resources
from training.runs import Registry
from training.telemetry import GpuReading, Sample

GOOD, HOT, FULL, ROOMY = 0, 1, 2, 3  # the simulated machine's GPUs


def four_gpus(hot_temp: float = 95) -> list[dict]:
    """GPU 0 and 3 can take work (3 has the most free memory); GPU 1 is too hot, GPU 2 has too little free VRAM."""
    return [
        {"name": "Sim A", "temp": 60, "mem_used": 8000, "mem_total": 24000},
        {"name": "Sim B", "temp": hot_temp, "mem_used": 0, "mem_total": 24000},
        {"name": "Sim C", "temp": 50, "mem_used": 23000, "mem_total": 24000},
        {"name": "Sim D", "temp": 55, "mem_used": 1000, "mem_total": 24000},
    ]


def sample_of(gpus: list[dict]) -> Sample:
    readings = [
        GpuReading(i, g["name"], mem_used=g["mem_used"], mem_total=g["mem_total"], temp=g["temp"]) for i, g in enumerate(gpus)
    ]
    return Sample(0, cpu=10, ram_used=0, ram_total=32768, ram_available=16384, gpus=readings)


def settings_for(nproc: int | str, **options):
    return load_settings(**nest_options({"nproc": nproc, **options}))


# ---------------------------------------------------------------------------- admission, as a pure function


def test_a_two_gpu_job_gets_the_two_good_gpus_most_free_memory_first():
    admission = check_resources(sample_of(four_gpus()), settings_for(2))
    assert admission.reason is None
    assert [g.index for g in admission.gpus] == [ROOMY, GOOD] and admission.nproc == 2
    assert admission.gpu.index == ROOMY  # a one-GPU view of the same choice


def test_a_three_gpu_job_waits_and_says_which_gpus_fail_admission():
    admission = check_resources(sample_of(four_gpus()), settings_for(3))
    assert admission.gpus == [] and admission.reason.startswith("needs 3 GPUs, 2 of 4 pass admission")
    assert "GPU 1 at 95 °C > 85 °C (gpu.maxTempC)" in admission.reason
    assert "GPU 2 free VRAM 1000 MB < 2500 MB (gpu.minFreeVramMB)" in admission.reason


def test_auto_takes_every_gpu_that_passes_and_none_that_a_running_job_holds():
    admission = check_resources(sample_of(four_gpus()), settings_for("auto"))
    assert [g.index for g in admission.gpus] == [ROOMY, GOOD] and admission.nproc == 2
    held = check_resources(sample_of(four_gpus()), settings_for("auto"), busy={ROOMY})
    assert [g.index for g in held.gpus] == [GOOD]
    none_left = check_resources(sample_of(four_gpus()), settings_for("auto"), busy={ROOMY, GOOD})
    assert none_left.reason and "GPU 1 at 95 °C" in none_left.reason


def test_gpus_no_running_job_holds_come_first():
    admission = check_resources(sample_of(four_gpus()), settings_for(1), busy={ROOMY})
    assert [g.index for g in admission.gpus] == [GOOD]


def test_on_a_cpu_machine_nproc_processes_are_admitted_as_one_job():
    cpu_only = Sample(0, cpu=10, ram_used=0, ram_total=32768, ram_available=16384)
    assert (check_resources(cpu_only, settings_for(2)).reason, check_resources(cpu_only, settings_for(2)).nproc) == (None, 2)
    assert check_resources(cpu_only, settings_for("auto")).nproc == 1


# ---------------------------------------------------------------------------- real jobs on four simulated GPUs

# Each rank reports the GPUs it may see, then waits (when told to) until the test lets it finish.
SCRIPT = """
import json, os, sys, time
import torch.distributed as dist
torchrun = "RANK" in os.environ  # a one-GPU job runs the script plainly
if torchrun:
    dist.init_process_group("gloo")
rank, release = dist.get_rank() if torchrun else 0, os.environ.get("RELEASE_FILE")
if rank == 0:
    print(json.dumps({"event": "started", "max_steps": 1}), flush=True)
    print(json.dumps({"event": "log", "message": "visible=" + os.environ.get("CUDA_VISIBLE_DEVICES", "")}), flush=True)
    print(json.dumps({"step": 1, "loss": 1.0, "world": dist.get_world_size() if torchrun else 1}), flush=True)
while release and not os.path.exists(release):
    time.sleep(0.05)
if torchrun:
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.fixture
def machine(home, tmp_path, monkeypatch):
    """Four simulated GPUs every worker sees; `machine(gpus)` rewrites them."""
    path = tmp_path / "sensor.json"

    def write(gpus: list[dict]) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"cpu": 10, "ram_available": 16384, "ram_total": 32768, "gpus": gpus}))
        os.replace(tmp, path)

    write(four_gpus())
    monkeypatch.setenv("BACKPROPAGATE_TELEMETRY_FILE", str(path))
    monkeypatch.setenv("BACKPROPAGATE_TELEMETRY_INTERVAL_S", "0.2")
    return write


def submit(script, nproc: int, **options) -> str:
    return jobs.submit_script(settings_for(nproc, **options), str(script)).id


def messages(registry: Registry, run_id: str) -> list[str]:
    return [e.get("message", "") for e in read_events(registry.get(run_id).path / "events.jsonl")[0]]


def ended(registry: Registry, run_id: str):
    run = registry.get(run_id)
    return run if run.status not in ("queued", "running", "paused") else None


@pytest.mark.slow
def test_a_multi_gpu_job_sees_its_gpus_and_a_bigger_one_waits_until_enough_pass(home, machine, tmp_path):
    registry = Registry(home)
    script = tmp_path / "report.py"
    script.write_text(textwrap.dedent(SCRIPT))

    two = submit(script, 2)
    run = wait_for(lambda: ended(registry, two), 120, "the 2-GPU job")
    assert run.status == "completed", run.error_message
    assert (run.gpus, run.gpu_index) == (f"{ROOMY},{GOOD}", ROOMY)
    assert f"visible={ROOMY},{GOOD}" in messages(registry, two)  # CUDA_VISIBLE_DEVICES lists them all

    three = submit(script, 3)
    wait_for(lambda: registry.get(three).reason, what="a queue reason")
    waiting = registry.get(three)
    assert waiting.status == "queued" and waiting.reason.startswith("needs 3 GPUs, 2 of 4 pass admission")
    assert "GPU 1 at 95 °C" in waiting.reason and "GPU 2 free VRAM 1000 MB" in waiting.reason
    machine(four_gpus(hot_temp=60))  # GPU 1 cools down: three GPUs pass now
    run = wait_for(lambda: ended(registry, three), 120, "the 3-GPU job")
    assert run.status == "completed" and run.gpus == f"{HOT},{ROOMY},{GOOD}"  # GPU 1 is empty: most free memory


@pytest.mark.slow
def test_max_parallel_counts_gpus_so_a_two_gpu_job_fills_two_slots(home, machine, tmp_path, monkeypatch):
    registry = Registry(home)
    script = tmp_path / "hold.py"
    script.write_text(textwrap.dedent(SCRIPT))
    release = tmp_path / "release"
    monkeypatch.setenv("RELEASE_FILE", str(release))

    big = submit(script, 2, max_parallel=2)
    wait_for(lambda: registry.get(big).step >= 1, 120, "the 2-GPU job to run")
    small = submit(script, 1, max_parallel=2)
    wait_for(lambda: registry.get(small).reason, what="a queue reason")
    assert registry.get(small).status == "queued"
    assert registry.get(small).reason == "waiting: 1 running job holds 2 GPUs (maxParallel 2 counts GPUs)"
    release.touch()
    assert wait_for(lambda: ended(registry, big), 120, "the 2-GPU job").status == "completed"
    run = wait_for(lambda: ended(registry, small), 120, "the 1-GPU job")
    assert run.status == "completed" and run.gpus == str(ROOMY)
    assert run.started_at >= registry.get(big).ended_at  # it waited for the two GPUs' slots
