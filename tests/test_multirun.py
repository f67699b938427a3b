"""Multi-run campaigns for real on the tiny model: SLAO merges, the forgetting matrix, crash-safe resume."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from conftest import DEMO_DATA, backprop, wait_for
from safetensors.torch import load_file

from training import jobs, slao
from training.config import load_settings, nest_options
from training.errors import BackpropError
from training.multirun import forgetting_metrics, lr_factor
from training.runs import Registry


def campaign(**options) -> str:
    settings = load_settings(**nest_options({"model": "demo", "save_every": 10, "seed": 7}))
    defaults = {"num_runs": 3, "steps_per_run": 30, "samples_per_run": 13, "validation": 0.25}
    return jobs.submit_campaign(settings, [str(DEMO_DATA)], **{**defaults, **options}).id


def finished(registry: Registry, run_id: str, timeout: float = 400):
    def ended():
        run = registry.get(run_id)
        return run if run.status not in ("queued", "running", "paused") else None

    return wait_for(ended, timeout, "the campaign")


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
def test_a_three_run_campaign_merges_with_slao_and_measures_forgetting(home):
    registry = Registry(home)
    run = finished(registry, campaign())
    assert run.status == "completed" and run.kind == "multirun"
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
    assert start.endswith("next_init.safetensors")

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
def test_a_campaign_killed_in_its_last_run_resumes_to_the_same_adapter(home):
    registry = Registry(home)
    reference = finished(registry, campaign(name="reference"))
    assert reference.status == "completed"

    run_id = campaign(name="killed")

    def third_run_checkpointed():
        children = registry.children(run_id)
        return len(children) == 3 and registry.checkpoints(children[2].id) and children[2].step >= 10

    wait_for(third_run_checkpointed, 400, "a checkpoint in run 3")
    os.killpg(registry.get(run_id).pid, signal.SIGKILL)
    wait_for(lambda: registry.get(run_id).status == "interrupted", 30, "the campaign to show interrupted")
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


def test_bad_campaign_inputs_are_coded_errors(home, tmp_path):
    settings = load_settings(model="demo")
    with pytest.raises(BackpropError) as error:
        jobs.submit_campaign(settings, [str(DEMO_DATA)], num_runs=0)
    assert error.value.code == "INPUT_INVALID_ARGUMENT" and "at least one run" in error.value.message
    out = backprop("multi-run", "--model", "demo", "--data", str(DEMO_DATA), "--runs", "4", "--samples", "20")
    assert out.returncode == 1 and "INPUT_DATASET_TOO_SMALL" in out.stderr and "need 80 rows" in out.stderr
    out = backprop("multi-run", "--model", "demo", "--data", str(DEMO_DATA), "--data", str(DEMO_DATA), "--runs", "3")
    assert out.returncode == 1 and "2 datasets but --runs 3" in out.stderr
    assert Registry(home).list() == []  # nothing half-registered
