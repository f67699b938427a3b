"""Jobs under the governor, with real worker processes: queueing, pausing while hot, time boxes, scripts, stop.

A simulated sensor file (BACKPROPAGATE_TELEMETRY_FILE) stands in for GPU readings, so overheating and low
RAM happen on a CPU machine exactly as they would on a GPU one; everything else is real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
from conftest import DEMO_DATA, ROOT, backprop, wait_for

from training import jobs
from training.config import load_settings, nest_options
from training.errors import BackpropError
from training.events import read_events
from training.runs import ACTIVE, Registry, pid_alive

EXAMPLE_SCRIPT = ROOT / "assets" / "examples" / "train_script.py"


@pytest.fixture
def sensor(home, tmp_path, monkeypatch):
    """A simulated sensor: `sensor(temp=..., ram_available=...)` rewrites the readings every worker sees."""
    path = tmp_path / "sensor.json"

    def write(temp: float = 60, ram_available: float = 16384, cpu: float = 10, mem_free: float = 20000):
        readings = {"cpu": cpu, "ram_available": ram_available, "ram_total": 32768,
                    "gpus": [{"name": "Simulated GPU", "temp": temp, "util": 90, "mem_used": 24000 - mem_free,
                              "mem_total": 24000, "power": 250, "power_limit": 300}]}  # fmt: skip
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(readings))
        os.replace(tmp, path)  # atomic, like a real sensor: a reader never sees half a reading

    write()
    monkeypatch.setenv("BACKPROPAGATE_TELEMETRY_FILE", str(path))
    monkeypatch.setenv("BACKPROPAGATE_TELEMETRY_INTERVAL_S", "0.2")
    monkeypatch.setenv("BACKPROPAGATE_GPU__COOL_DOWN_SECONDS", "0.5")
    return write


def submit(steps: int, **options) -> str:
    settings = load_settings(**nest_options({"model": "demo", "steps": steps, **options}))
    return jobs.submit_train(settings, str(DEMO_DATA)).id


def events_of(registry: Registry, run_id: str) -> list[dict]:
    return read_events(registry.get(run_id).path / "events.jsonl")[0]


def kinds(registry: Registry, run_id: str) -> list[str]:
    return [e["event"] for e in events_of(registry, run_id)]


def wait_done(registry: Registry, run_id: str, timeout: float = 240):
    def ended():
        run = registry.get(run_id)
        return run if run.status not in ("queued", "running", "paused") else None

    return wait_for(ended, timeout, "the run to end")


# ---------------------------------------------------------------------------- the governor, as pure functions


def test_admission_picks_the_gpu_with_most_free_memory_and_names_what_is_missing():
    from training.governor import check_resources
    from training.telemetry import GpuReading, Sample

    settings = load_settings()  # defaults: 4 GB RAM, 2500 MB VRAM, 85 °C, 95% CPU
    gpus = [GpuReading(0, "a", mem_used=7000, mem_total=8000, temp=50), GpuReading(1, "b", mem_used=100, mem_total=8000, temp=50)]
    ok = check_resources(Sample(0, cpu=10, ram_used=0, ram_total=32768, ram_available=16384, gpus=gpus), settings)
    assert ok.reason is None and ok.gpu.index == 1

    low_ram = check_resources(Sample(0, cpu=10, ram_used=0, ram_total=32768, ram_available=2048), settings)
    assert "free RAM 2.0 GB < 4 GB" in low_ram.reason
    busy = check_resources(Sample(0, cpu=99, ram_used=0, ram_total=32768, ram_available=16384), settings)
    assert "CPU load 99%" in busy.reason
    full = [GpuReading(0, "a", mem_used=7000, mem_total=8000, temp=50)]
    assert "free VRAM 1000 MB < 2500 MB" in check_resources(Sample(0, 10, 0, 32768, 16384, full), settings).reason
    hot = [GpuReading(0, "a", mem_used=0, mem_total=8000, temp=90)]
    assert "90 °C > 85 °C" in check_resources(Sample(0, 10, 0, 32768, 16384, hot), settings).reason


def test_thermal_guard_pauses_above_the_limit_and_resumes_only_after_staying_cool():
    from training.governor import ThermalGuard

    guard = ThermalGuard(max_temp=85, margin=5, cool_seconds=30)
    assert guard.update(80, now=0) is None
    assert guard.update(86, now=1) == "pause"
    assert guard.update(82, now=2) is None  # cooler, but not 5 °C below the limit
    assert guard.update(80, now=3) is None  # cool enough: the 30 s start now
    assert guard.update(84, now=20) is None  # warmed up again: the count restarts
    assert guard.update(79, now=21) is None
    assert guard.update(79, now=50) is None
    assert guard.update(79, now=51) == "resume"


def test_gpu_memory_limit_becomes_a_cuda_memory_fraction():
    from training.governor import cuda_memory_fraction

    assert cuda_memory_fraction("80%", 24000) == pytest.approx(0.8)
    assert cuda_memory_fraction("12GB", 24576) == pytest.approx(0.5)
    assert cuda_memory_fraction("12", 24576) == pytest.approx(0.5)
    assert cuda_memory_fraction(None, 24576) is None


def test_governor_settings_come_from_camel_case_config_keys_and_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "backprop.config.json").write_text(
        json.dumps(
            {
                "maxRunMinutes": 5,
                "maxParallel": 2,
                "gpuMemoryLimit": "80%",
                "minFreeRamGB": 2,
                "gpu": {"probe": "none", "minFreeVramMB": 1000, "maxTempC": 80},
            }
        )  # fmt: skip
    )
    monkeypatch.setenv("BACKPROPAGATE_GPU__MAX_TEMP_C", "75")
    settings = load_settings()
    assert (settings.max_run_minutes, settings.max_parallel, settings.min_free_ram_gb) == (5, 2, 2)
    assert settings.gpu_memory_limit == "80%"
    assert (settings.gpu.probe, settings.gpu.min_free_vram_mb, settings.gpu.max_temp_c) == ("none", 1000, 75)


# ---------------------------------------------------------------------------- real jobs


@pytest.mark.slow
def test_an_overheating_gpu_pauses_a_real_job_which_resumes_when_it_cools(home, sensor):
    registry = Registry(home)
    run_id = submit(5000)
    wait_for(lambda: registry.get(run_id).step >= 5, what="training to start")
    sensor(temp=95)
    wait_for(lambda: registry.get(run_id).status == "paused", what="the pause")
    assert "95 °C > 85 °C" in registry.get(run_id).reason
    wait_for(lambda: kinds(registry, run_id).count("telemetry") >= kinds(registry, run_id).index("paused") + 3, what="telemetry")
    sensor(temp=70)  # 5 °C below the limit or more, for cool_down_seconds
    wait_for(lambda: "resumed" in kinds(registry, run_id), what="the resume")
    wait_for(lambda: (k := kinds(registry, run_id))[k.index("resumed") :].count("step") >= 3, what="steps after the resume")
    assert jobs.stop(registry, run_id).status == "stopped"

    events = events_of(registry, run_id)
    order = [e["event"] for e in events]
    paused, resumed = order.index("paused"), order.index("resumed")
    assert "step" not in order[paused:resumed]  # not one step while hot
    assert any(e["event"] == "telemetry" and e["gpus"][0]["temp"] == 95 for e in events[paused:resumed])
    assert "step" in order[resumed:]
    telemetry = next(e for e in events if e["event"] == "telemetry")
    assert {"cpu", "ram_used", "ram_total", "gpus"} <= set(telemetry)
    assert {"index", "name", "util", "mem_used", "mem_total", "temp", "power", "power_limit"} <= set(telemetry["gpus"][0])


@pytest.mark.slow
def test_a_pause_longer_than_the_limit_stops_the_job_with_a_checkpoint_and_a_code(home, sensor, monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_GPU__MAX_PAUSE_MINUTES", "0.01")
    registry = Registry(home)
    run_id = submit(5000)
    wait_for(lambda: registry.get(run_id).step >= 3, what="training to start")
    sensor(temp=99)
    run = wait_done(registry, run_id)
    assert run.status == "failed" and run.error_code == "RUNTIME_GPU_TEMPERATURE_CRITICAL"
    assert registry.checkpoints(run_id)[-1].step == run.step  # nothing learned is lost
    failed = [e for e in events_of(registry, run_id) if e["event"] == "failed"]
    assert failed[-1]["code"] == "RUNTIME_GPU_TEMPERATURE_CRITICAL" and failed[-1]["hint"]


@pytest.mark.slow
def test_max_parallel_one_runs_three_submissions_one_after_another_in_order(home):
    registry = Registry(home)
    ids = [submit(10, save_every=0) for _ in range(3)]
    runs = [wait_done(registry, run_id) for run_id in ids]
    assert [r.status for r in runs] == ["completed"] * 3
    for earlier, later in zip(runs, runs[1:], strict=False):
        assert earlier.ended_at <= later.started_at  # never two at once, first in first out
    queued = [e for e in events_of(registry, ids[2]) if e["event"] == "queued"]
    assert queued and "waiting" in queued[0]["reason"]


@pytest.mark.slow
def test_low_ram_keeps_a_job_queued_with_its_reason_until_memory_frees(home, sensor):
    registry = Registry(home)
    sensor(ram_available=1024)
    run_id = submit(5, min_free_ram_gb=4)
    wait_for(lambda: registry.get(run_id).reason, what="a queue reason")
    run = registry.get(run_id)
    assert run.status == "queued" and "free RAM 1.0 GB < 4 GB" in run.reason
    status = backprop("status", run_id, check=True).stdout
    assert "queued" in status and "free RAM" in status
    sensor(ram_available=8192)
    assert wait_done(registry, run_id).status == "completed"


def test_status_reports_cpu_ram_and_every_gpu(home, sensor):
    out = backprop("status", check=True).stdout
    assert "CPU" in out and "RAM" in out and "GPU 0 Simulated GPU" in out and "60 °C" in out
    data = json.loads(backprop("status", "--json", check=True).stdout)
    assert data["gpus"][0]["temp"] == 60 and data["ram_total"] == 32768


def test_without_a_gpu_status_says_so_and_reports_cpu_and_ram(home):
    out = backprop("status", "--gpu-probe", "auto", check=True).stdout
    if "GPU 0" in out:
        pytest.skip("this machine has an NVIDIA GPU")
    assert "no NVIDIA GPU found" in out and "CPU" in out and "RAM" in out


# ---------------------------------------------------------------------------- any script


def write_script(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def test_a_script_run_turns_its_output_into_events_and_checkpoints(home, tmp_path):
    script = write_script(
        tmp_path / "speaker.py",
        """
        import json, sys
        args = sys.argv[1:]
        assert args[:2] == ["--run-id", args[1]] and "--max-minutes" in args, args
        print("warming up", flush=True)
        print(json.dumps({"event": "started", "max_steps": 2}))
        print(json.dumps({"step": 1, "loss": 2.5}))
        print(json.dumps({"event": "checkpoint_saved", "path": "../outside.pt", "step": 1}))
        open("ckpt.pt", "w").write("weights")
        print(json.dumps({"event": "checkpoint_saved", "path": "ckpt.pt", "step": 2}))
        print(json.dumps({"step": 2, "loss": 1.5}))
        print("extra args:", args[args.index("--max-minutes") + 2:])
    """,
    )
    out = backprop("run", str(script), "--name", "speaker", "--json", "--", "--lr", "0.1", check=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    registry = Registry(home)
    run = registry.get(summary["run_id"])
    assert (run.kind, run.name, run.status) == ("script", "speaker", "completed")
    assert (run.step, run.max_steps, run.final_loss) == (2, 2, 1.5)
    assert [Path(c.path).name for c in registry.checkpoints(run.id)] == ["ckpt.pt"]  # the '..' path was refused
    events = events_of(registry, run.id)
    assert [e["loss"] for e in events if e["event"] == "step"] == [2.5, 1.5]
    messages = [e["message"] for e in events if e["event"] == "log"]
    assert "warming up" in messages and "extra args: ['--lr', '0.1']" in messages
    assert any("refused checkpoint path '../outside.pt'" in m for m in messages)
    listed = backprop("list", check=True).stdout
    assert "script" in listed and "speaker" in listed


def test_a_failing_script_ends_failed_with_its_last_words(home, tmp_path):
    script = write_script(tmp_path / "broken.py", "import sys\nprint('loading data')\nsys.exit('data file missing')\n")
    out = backprop("run", str(script))
    assert out.returncode == 2
    assert "RUNTIME_SCRIPT_FAILED" in out.stderr and "data file missing" in out.stderr


@pytest.mark.slow
def test_the_example_script_trains_checkpoints_and_resumes_after_its_time_box(home):
    # A 0.3 s time box, shorter than importing torch: it counts from the script's `started` message, so start-up
    # never uses it up.
    registry = Registry(home)
    args = ["--", "--steps", "10000000", "--log-every", "1"]
    out = backprop("run", str(EXAMPLE_SCRIPT), "-m", "0.005", "-c", "0.005", "--json", *args)
    assert out.returncode == 3, out.stderr
    run = registry.get(json.loads(out.stdout.strip().splitlines()[-1])["run_id"])
    assert run.status == "timeboxed" and run.step > 0
    saved = registry.checkpoints(run.id)
    assert saved and Path(saved[-1].path).exists()
    events = events_of(registry, run.id)
    clock = next(i for i, e in enumerate(events) if e.get("message", "").startswith("time box: 0.005 min"))
    assert [e["event"] for e in events[:clock]].count("step") == 0  # the clock started before the first step

    again = backprop("resume", run.id, "--max-run-minutes", "0.1", "--json")
    assert again.returncode == 3
    resumed = registry.get(run.id)
    assert resumed.status == "timeboxed" and resumed.step > saved[-1].step  # it went on from the checkpoint
    events = events_of(registry, run.id)
    commands = [" ".join(e["command"]) for e in events if e["event"] == "started"]
    assert f"--resume-from {saved[-1].path}" in commands[-1]
    assert f"resumed from {saved[-1].path} at step {saved[-1].step}" in [e.get("message") for e in events]
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert losses[-1] < losses[0]  # it really learns


def test_a_script_that_never_reports_its_start_is_time_boxed_from_its_launch(home, tmp_path, monkeypatch):
    """The time box waits for a script's first step message, but not for ever: a silent script is
    time-boxed from its launch once the start-up allowance (here 1 s) has passed."""
    monkeypatch.setenv("BACKPROPAGATE_SCRIPT_STARTUP_S", "1")
    script = write_script(tmp_path / "silent.py", "import time\nwhile True:\n    time.sleep(0.05)\n")
    out = backprop("run", str(script), "--max-run-minutes", "0.001", "--json")
    assert out.returncode == 3, out.stderr
    run = Registry(home).get(json.loads(out.stdout.strip().splitlines()[-1])["run_id"])
    assert run.status == "timeboxed"
    messages = [e.get("message", "") for e in events_of(Registry(home), run.id)]
    assert any("sent no step message in the 1 s since its launch" in m for m in messages), messages


@pytest.mark.slow
def test_a_hot_gpu_pauses_a_script_with_sigstop_and_sigcont(home, sensor):
    registry = Registry(home)
    settings = load_settings()
    run_id = jobs.submit_script(settings, str(EXAMPLE_SCRIPT), ["--steps", "100000000"]).id
    wait_for(lambda: registry.get(run_id).step >= 20, what="the script to train")
    worker = psutil.Process(registry.get(run_id).pid)
    script = wait_for(lambda: worker.children(), what="the script process")[0]
    sensor(temp=95)
    wait_for(lambda: registry.get(run_id).status == "paused", what="the pause")
    assert wait_for(lambda: script.status() == psutil.STATUS_STOPPED, what="SIGSTOP")
    sensor(temp=60)
    wait_for(lambda: registry.get(run_id).status == "running", what="the resume")
    assert script.status() != psutil.STATUS_STOPPED
    step = registry.get(run_id).step
    wait_for(lambda: registry.get(run_id).step > step, what="training to go on")
    assert jobs.stop(registry, run_id).status == "stopped"


@pytest.mark.slow
def test_stop_is_graceful_first(home):
    registry = Registry(home)
    run_id = jobs.submit_script(load_settings(), str(EXAMPLE_SCRIPT), ["--steps", "100000000"]).id
    wait_for(lambda: registry.get(run_id).step >= 20, what="the script to train")
    out = backprop("stop", run_id, check=True)
    run = registry.get(run_id)
    assert run.status == "stopped" and "stopped" in out.stdout
    events = events_of(registry, run_id)
    assert events[-2]["event"] == "checkpoint_saved" or any(e["event"] == "checkpoint_saved" for e in events[-5:])
    assert "forced" not in json.dumps(events[-3:])


def test_a_stop_the_moment_a_job_starts_ends_it_stopped_and_a_resume_is_not_stopped_by_it(home):
    """Start, then Stop at once: the worker does not listen for signals yet, so the stop waits in the run's folder for
    it instead of killing it (which would leave the run `interrupted`). The next start of the run forgets it."""
    registry = Registry(home)
    run = jobs.submit_train(load_settings(**nest_options({"model": "demo", "steps": 2})), str(DEMO_DATA), plan=False)
    assert jobs.stop(registry, run.id, grace=120).status == "stopped"
    jobs.resume(registry, run.id)
    assert wait_for(lambda: registry.get(run.id).status not in ACTIVE and registry.get(run.id), timeout=300,
                    what="the resumed run to end").status == "completed"  # fmt: skip


def test_stop_forces_a_job_that_ignores_it_after_the_grace_period(home, tmp_path, monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_STOP_GRACE_SECONDS", "0.5")
    script = write_script(
        tmp_path / "stubborn.py",
        """
        import json, signal, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        step = 0
        while True:
            step += 1
            print(json.dumps({"step": step, "loss": 1.0}), flush=True)
            time.sleep(0.05)
    """,
    )
    registry = Registry(home)
    run_id = jobs.submit_script(load_settings(), str(script)).id
    wait_for(lambda: registry.get(run_id).step >= 3, what="the script to run")
    worker = psutil.Process(registry.get(run_id).pid)
    child = wait_for(lambda: worker.children(), what="the script process")[0]
    run = jobs.stop(registry, run_id, grace=0.5)
    assert run.status == "stopped"
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert any("forced with SIGKILL" in e.get("message", "") for e in events_of(registry, run_id))


def test_a_script_that_does_not_exist_is_a_coded_error(home):
    out = backprop("run", "no_such_script.py")
    assert out.returncode == 1 and "INPUT_SCRIPT_NOT_FOUND" in out.stderr


def test_stopping_a_finished_run_is_a_coded_error(home, tmp_path):
    script = write_script(tmp_path / "quick.py", "print('done')\n")
    out = backprop("run", str(script), "--json", check=True)
    run_id = json.loads(out.stdout.strip().splitlines()[-1])["run_id"]
    stopped = backprop("stop", run_id)
    assert stopped.returncode == 2 and "STATE_RUN_NOT_ACTIVE" in stopped.stderr


RESUMER = """
import sys, time
from pathlib import Path
from training import jobs
from training.errors import BackpropError
from training.runs import Registry

registry = Registry(Path(sys.argv[1]))
go = Path(sys.argv[3])
while not go.exists():  # every resumer waits here, ready, so that they all call resume at the same moment
    time.sleep(0.001)
try:
    print("started", jobs.resume(registry, sys.argv[2]).pid, flush=True)
except BackpropError as exc:
    print("refused", exc.code, flush=True)
"""


def test_concurrent_resumes_start_exactly_one_worker_and_the_others_get_a_coded_error(home, tmp_path):
    release = tmp_path / "release"
    script = write_script(
        tmp_path / "holds.py",
        f"""
        import json, pathlib, sys, time
        print(json.dumps({{"event": "started"}}), flush=True)
        while not pathlib.Path({str(release)!r}).exists():  # alive until the test releases it
            time.sleep(0.02)
        print(json.dumps({{"event": "timeboxed"}}), flush=True)
        sys.exit(3)
    """,
    )
    release.touch()
    registry = Registry(home)
    run_id = json.loads(backprop("run", str(script), "--json").stdout.strip().splitlines()[-1])["run_id"]
    assert registry.get(run_id).status == "timeboxed"

    try:
        for round_ in range(3):
            release.unlink()
            go = tmp_path / f"go-{round_}"
            resumers = [
                subprocess.Popen([sys.executable, "-c", RESUMER, str(home), run_id, str(go)], stdout=subprocess.PIPE, text=True)
                for _ in range(4)
            ]
            go.touch()
            outputs = [p.communicate(timeout=120)[0].split() for p in resumers]
            started = [o for o in outputs if o[0] == "started"]
            assert len(started) == 1, outputs
            assert sorted(o[1] for o in outputs if o[0] == "refused") == ["STATE_RUN_ACTIVE"] * 3, outputs
            worker = int(started[0][1])
            assert wait_for(lambda: registry.get(run_id).status == "running", what="the one worker to run")
            assert registry.get(run_id).pid == worker
            with pytest.raises(BackpropError) as caught:  # and a resume while that worker lives is refused too
                jobs.resume(registry, run_id)
            assert caught.value.code == "STATE_RUN_ACTIVE"
            release.touch()
            assert wait_done(registry, run_id).status == "timeboxed"
            wait_for(lambda pid=worker: not pid_alive(pid), what="the worker to exit")
    finally:
        release.touch()  # a failed round leaves no script waiting

    started_events = [e for e in events_of(registry, run_id) if e["event"] == "started"]
    assert len(started_events) == 1 + 3  # the first start and one per round: never two workers on the run


def test_a_run_taken_for_dead_while_its_worker_lives_is_not_resumed_twice(home, tmp_path):
    """A worker whose heartbeat went silent is marked interrupted by whoever looks, but while it lives a resume would
    start a second worker on the same run: refused, with its pid."""
    import time

    release = tmp_path / "release"
    script = write_script(
        tmp_path / "holds.py",
        f"""
        import json, pathlib, time
        print(json.dumps({{"event": "started"}}), flush=True)
        while not pathlib.Path({str(release)!r}).exists():
            time.sleep(0.02)
    """,
    )
    registry = Registry(home)
    run_id = jobs.submit_script(load_settings(), str(script)).id
    try:
        wait_for(lambda: registry.get(run_id).status == "running", what="the script to run")
        worker = registry.get(run_id).pid

        def silent() -> bool:  # a heartbeat older than STALE_HEARTBEAT_S, as from a hung worker
            registry.update(run_id, heartbeat=time.time() - 3600)
            return registry.get(run_id).status == "interrupted"

        wait_for(silent, what="the run to be taken for dead")
        with pytest.raises(BackpropError) as caught:
            jobs.resume(registry, run_id)
        assert caught.value.code == "STATE_RUN_ACTIVE" and f"worker (pid {worker}) is still alive" in caught.value.message
        assert f"kill {worker}" in caught.value.hint
    finally:
        release.touch()
    assert wait_for(lambda: not pid_alive(worker), what="the worker to exit")
    assert len([e for e in events_of(registry, run_id) if e["event"] == "started"]) == 1


def test_a_multi_runs_child_is_resumed_only_through_its_multi_run(home):
    """Its multi-run's worker trains it: a resume of the child alone would put a second trainer on it."""
    registry = Registry(home)
    parent = registry.create("multi-run", {})
    child = registry.create("train", {}, parent_id=parent.id)
    registry.update(child.id, status="stopped")
    with pytest.raises(BackpropError) as caught:
        jobs.resume(registry, child.id)
    assert caught.value.code == "STATE_NOT_RESUMABLE" and f"backprop resume {parent.id}" in caught.value.hint
    assert registry.get(child.id).status == "stopped"


def test_a_run_that_cannot_resume_says_so_before_its_data_is_compared(home, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(DEMO_DATA.read_text())
    registry = Registry(home)
    done = registry.create("train", {}, dataset=str(data))
    registry.update(done.id, status="completed", dataset_sha256="0" * 64)  # and the file differs from that hash
    with pytest.raises(BackpropError) as caught:
        jobs.resume(registry, done.id)
    assert caught.value.code == "STATE_NOT_RESUMABLE"
