"""Multi-run multi-runs for real on the tiny model: SLAO merges, the forgetting matrix, crash-safe resume.

Crashes are real: the worker is SIGKILLed, by the test or at a named point of its own (CRASH_AT_ENV, the
multi-run's one fault-injection hook). A simulated sensor file stands in for GPU readings to pause a child.
"""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from conftest import DEMO_DATA, backprop, wait_for
from safetensors.torch import load_file

from training import jobs, runs, slao
from training.config import load_settings, nest_options
from training.errors import BackpropError
from training.events import read_events
from training.multi_run import CRASH_AT_ENV, forgetting_metrics, lr_factor
from training.runs import Registry


def multi_run(**options) -> str:
    settings = load_settings(**nest_options({"model": "demo", "save_every": 10, "seed": 7}))
    defaults = {"num_runs": 3, "steps_per_run": 30, "samples_per_run": 13, "validation": 0.25}
    return jobs.submit_multi_run(settings, [str(DEMO_DATA)], **{**defaults, **options}).id


def finished(registry: Registry, run_id: str, timeout: float = 400):
    def ended():
        run = registry.get(run_id)
        return run if run.status not in ("queued", "running", "paused") else None

    return wait_for(ended, timeout, "the multi-run")


def merge_events(registry: Registry, run_id: str) -> list[dict]:
    return [e for e in read_events(registry.get(run_id).path / "events.jsonl")[0] if e["event"] == "merge"]


def write_sensor(path, temp: float) -> None:
    """A simulated GPU sensor reading, replaced atomically (a reader never sees half of one)."""
    reading = {"cpu": 10, "ram_available": 16384, "ram_total": 32768,
               "gpus": [{"name": "Simulated GPU", "temp": temp, "util": 90, "mem_used": 4000, "mem_total": 24000}]}  # fmt: skip
    path.with_suffix(".tmp").write_text(json.dumps(reading))
    os.replace(path.with_suffix(".tmp"), path)


def test_bwt_and_average_loss_come_from_the_forgetting_matrix():
    matrix = [[1.0, None, None], [1.5, 0.8, None], [2.0, 1.0, 0.5]]
    metrics = forgetting_metrics(matrix)
    assert metrics["bwt"] == pytest.approx(((2.0 - 1.0) + (1.0 - 0.8)) / 2)
    assert metrics["average_loss"] == pytest.approx((2.0 + 1.0 + 0.5) / 3)


def test_learning_rate_schedules_across_runs():
    assert [lr_factor("constant", i, 4) for i in (1, 4)] == [1.0, 1.0]
    assert [lr_factor("linear", i, 4) for i in (1, 2, 3, 4)] == pytest.approx([1, 0.75, 0.5, 0.25])
    assert lr_factor("cosine", 1, 4) == 1.0 and lr_factor("cosine", 3, 4) == pytest.approx(0.5)


@pytest.mark.slow
def test_a_three_run_multi_run_merges_with_slao_and_measures_forgetting(home):
    registry = Registry(home)
    run = finished(registry, multi_run())
    assert run.status == "completed" and run.kind == "multi-run"
    children = registry.children(run.id)
    assert [c.status for c in children] == ["completed"] * 3 and all(c.step == 30 for c in children)

    # The result is exactly SLAO applied to the three fine-tuned adapters, in order.
    merged = None
    for i, child in enumerate(children, 1):
        merged, _ = slao.merge(merged, load_file(child.path / "adapter" / "adapter_model.safetensors"), i)
    result = load_file(run.path / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(result[k], merged[k], atol=1e-6) for k in merged)
    # Runs 2 and 3 started from orthonormal A and the previous run's fine-tuned B.
    start = json.loads((children[1].path / "spec.json").read_text())["init_adapter"]
    assert start.endswith("state/init-0002.safetensors")

    matrix = registry.forgetting(run.id)
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    assert [sum(v is not None for v in row) for row in matrix] == [1, 2, 3]  # row i: the tasks seen after run i
    assert all(v > 0 and math.isfinite(v) for row in matrix for v in row if v is not None)
    events = [json.loads(line) for line in (run.path / "events.jsonl").read_text().splitlines()]
    merges = [e for e in events if e["event"] == "merge"]
    assert [m["lam"] for m in merges] == pytest.approx([1.0, 1 / math.sqrt(2), 1 / math.sqrt(3)], abs=1e-6)
    assert [m["eval_losses"] for m in merges] == [[v for v in row if v is not None] for row in matrix]

    from training.generate import AdapterModel

    reply = AdapterModel(run.path / "adapter", home).reply([{"role": "user", "content": "What is the capital of Peru?"}],
                                                          max_new_tokens=16)  # fmt: skip
    assert reply.strip()  # the merged adapter loads with peft and generates

    shown = json.loads(backprop("show-run", run.id, "--json", check=True).stdout)
    assert shown["forgetting"] == matrix and shown["bwt"] == pytest.approx(forgetting_metrics(matrix)["bwt"])
    text = backprop("show-run", run.id, check=True).stdout
    assert "forgetting matrix" in text and "BWT" in text and "0.707" in text


@pytest.mark.slow
def test_a_multi_run_killed_in_its_last_run_resumes_to_the_same_adapter(home):
    registry = Registry(home)
    reference = finished(registry, multi_run(name="reference"))
    assert reference.status == "completed"

    run_id = multi_run(name="killed")

    def third_run_checkpointed():
        children = registry.children(run_id)
        return len(children) == 3 and registry.checkpoints(children[2].id) and children[2].step >= 10

    wait_for(third_run_checkpointed, 400, "a checkpoint in run 3")
    os.killpg(registry.get(run_id).pid, signal.SIGKILL)
    wait_for(lambda: registry.get(run_id).status == "interrupted", 30, "the multi-run to show interrupted")
    assert registry.children(run_id)[2].status == "interrupted"

    out = backprop("resume", run_id, "--json", timeout=400)
    assert out.returncode == 0, out.stderr
    resumed = registry.get(run_id)
    assert resumed.status == "completed" and len(registry.children(run_id)) == 3  # run 3 continued, not restarted
    expected = load_file(reference.path / "adapter" / "adapter_model.safetensors")
    actual = load_file(resumed.path / "adapter" / "adapter_model.safetensors")
    for key in expected:
        assert torch.allclose(actual[key], expected[key], rtol=1e-4, atol=1e-5), key
    flat = [[v for row in registry.forgetting(r) for v in row if v is not None] for r in (run_id, reference.id)]
    assert flat[0] == pytest.approx(flat[1], rel=1e-3)


def test_bad_multi_run_inputs_are_coded_errors(home, tmp_path):
    settings = load_settings(model="demo")
    with pytest.raises(BackpropError) as error:
        jobs.submit_multi_run(settings, [str(DEMO_DATA)], num_runs=0)
    assert error.value.code == "INPUT_INVALID_ARGUMENT" and "at least one run" in error.value.message
    out = backprop("multi-run", "--model", "demo", "--data", str(DEMO_DATA), "--runs", "4", "--samples", "20")
    assert out.returncode == 1 and "INPUT_DATASET_TOO_SMALL" in out.stderr and "need 80 rows" in out.stderr
    out = backprop("multi-run", "--model", "demo", "--data", str(DEMO_DATA), "--data", str(DEMO_DATA), "--runs", "3")
    assert out.returncode == 1 and "2 datasets but --runs 3" in out.stderr
    assert Registry(home).list() == []  # nothing half-registered


@pytest.mark.slow
def test_a_multi_run_killed_between_its_tensors_and_its_state_merges_every_run_exactly_once(home, monkeypatch):
    registry = Registry(home)
    options = {"num_runs": 2, "steps_per_run": 10}
    reference = finished(registry, multi_run(name="reference", **options))
    assert reference.status == "completed"

    def killed(run_id: str):
        return wait_for(lambda: registry.get(run_id).status == "interrupted" and registry.get(run_id), 400, "the kill")

    # Killed right after run 1's state was committed, before its merge event and forgetting row were written.
    monkeypatch.setenv(CRASH_AT_ENV, "committed:1")
    run = killed(multi_run(name="killed", **options))
    state_dir = run.path / "state"
    state = json.loads((state_dir / "state.json").read_text())
    assert (state["next_run"], state["merged"]) == (2, "merged-0001.safetensors")
    assert merge_events(registry, run.id) == [] and registry.forgetting(run.id) == []

    # Killed right after run 2's merged tensors reached the disk, before state.json named them.
    monkeypatch.setenv(CRASH_AT_ENV, "tensors:2")
    jobs.resume(registry, run.id)
    killed(run.id)
    state = json.loads((state_dir / "state.json").read_text())
    assert (state["next_run"], state["merged"]) == (2, "merged-0001.safetensors")
    assert (state_dir / "merged-0002.safetensors").exists()  # written, not committed
    assert [m["run"] for m in merge_events(registry, run.id)] == [1]  # the lost event, written again on resume

    monkeypatch.delenv(CRASH_AT_ENV)
    jobs.resume(registry, run.id)
    resumed = finished(registry, run.id)
    assert resumed.status == "completed" and [c.status for c in registry.children(run.id)] == ["completed"] * 2
    merges = merge_events(registry, run.id)
    assert [m["run"] for m in merges] == [1, 2] and [m["lam"] for m in merges] == pytest.approx([1, 1 / math.sqrt(2)])
    expected = load_file(reference.path / "adapter" / "adapter_model.safetensors")
    actual = load_file(resumed.path / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:  # run 2 merged once: merged twice, B would sit λ(2) further towards run 2's B
        assert torch.allclose(actual[key], expected[key], rtol=1e-5, atol=1e-7), key
    flat = [[v for row in registry.forgetting(r) for v in row if v is not None] for r in (run.id, reference.id)]
    assert len(flat[0]) == 3 and flat[0] == pytest.approx(flat[1], rel=1e-4)  # the whole matrix, each row once
    assert sorted(p.name for p in state_dir.glob("*.safetensors")) == ["merged-0002.safetensors"]  # old versions gone


@pytest.mark.parametrize(
    ("run_lora", "adapter_lora", "found"),
    [
        ({"r": 8}, {"r": 4}, "of another shape"),
        ({"r": 8}, {"r": 8, "target_modules": ["q_proj"]}, "missing weights"),
        ({"r": 8, "target_modules": ["q_proj"]}, {"r": 8}, "unexpected weights"),
    ],
)
def test_a_child_whose_initial_adapter_does_not_fit_its_model_is_refused_with_a_code(
    home, tmp_path, run_lora, adapter_lora, found
):
    from peft import LoraConfig, get_peft_model

    from training.models import load_model, resolve_model
    from training.trainer import new_train_run, run_training

    # A real peft adapter of the demo model, with another LoRA rank or other target modules than the run's.
    config = LoraConfig(**{"target_modules": "all-linear", **adapter_lora}, task_type="CAUSAL_LM")
    get_peft_model(load_model(resolve_model("demo", home)), config).save_pretrained(tmp_path / "other")
    lora = {"lora_r": run_lora["r"], "target_modules": run_lora.get("target_modules")}
    settings = load_settings(**nest_options({"model": "demo", "steps": 2, **lora}))
    registry = Registry(home)
    child = new_train_run(registry, settings, str(DEMO_DATA),
                          extra={"init_adapter": str(tmp_path / "other" / "adapter_model.safetensors")})  # fmt: skip
    with pytest.raises(BackpropError) as error:
        run_training(child, registry)
    assert error.value.code == "STATE_ADAPTER_MISMATCH" and found in error.value.message
    assert "other/adapter_model.safetensors" in error.value.message and error.value.hint
    run = registry.get(child.id)
    assert (run.status, run.error_code, run.step) == ("failed", "STATE_ADAPTER_MISMATCH", 0)


@pytest.mark.slow
def test_a_paused_child_keeps_its_heartbeat_and_is_never_taken_for_dead(home, tmp_path, monkeypatch):
    sensor = tmp_path / "sensor.json"
    write_sensor(sensor, temp=60)
    monkeypatch.setenv("BACKPROPAGATE_TELEMETRY_FILE", str(sensor))
    monkeypatch.setenv("BACKPROPAGATE_TELEMETRY_INTERVAL_S", "0.2")
    # This test's registry takes 15 s of silence for a dead worker (the watcher beats every 5 s).
    monkeypatch.setattr(runs, "STALE_HEARTBEAT_S", 15)
    registry = Registry(home)
    run_id = multi_run(num_runs=2, steps_per_run=5000)
    child = wait_for(lambda: (c := registry.children(run_id)) and c[0].step >= 2 and c[0], 400, "run 1 to train")
    write_sensor(sensor, temp=95)
    paused = wait_for(lambda: registry.get(child.id).status == "paused" and registry.get(child.id), 120, "the pause")

    def beaten_past_the_limit_while_held() -> bool:
        now = registry.get(child.id)  # each look applies the staleness check
        assert now.status == "paused" and now.step == paused.step, now.status
        return now.heartbeat > paused.heartbeat + 2 * runs.STALE_HEARTBEAT_S

    wait_for(beaten_past_the_limit_while_held, 300, "heartbeats while paused")
    assert registry.get(run_id).status == "paused"
    assert jobs.stop(registry, child.id).status == "stopped"  # a child's Stop stops the multi-run that trains it
    assert registry.get(run_id).status == "stopped"  # stopped with a checkpoint, never interrupted


def test_a_model_without_a_chat_template_is_refused_before_any_run(home, plain_model_dir):
    run = jobs.submit_multi_run(load_settings(model=str(plain_model_dir), max_run_minutes=0), [str(DEMO_DATA)], num_runs=2,
                               steps_per_run=2)  # fmt: skip
    events = list(jobs.follow(Registry(home), run.id))
    final = Registry(home).get(run.id)
    assert (final.status, final.error_code) == ("failed", "INPUT_MODEL_NO_CHAT_TEMPLATE")
    assert Registry(home).children(run.id) == []
    assert [e["code"] for e in events if e["event"] == "failed"] == ["INPUT_MODEL_NO_CHAT_TEMPLATE"]
