"""The GPU path for real: bf16 training, the automatic batch size, the governor's GPU, NVML telemetry, a real CUDA OOM.

Marked `gpu`; without CUDA every test here is skipped. The GPU check runs them: `python -m pytest -m gpu tests/test_gpu.py`.
They need only torch, transformers, peft, accelerate, the engine's core dependencies and the tiny demo model.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DATA, ROOT, backprop

from training import Trainer, checkpoints
from training.config import load_settings, nest_options
from training.control import Control
from training.errors import BackpropError
from training.events import read_events
from training.runs import Registry
from training.telemetry import make_gpu_probe
from training.trainer import new_train_run, run_training

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")]

# Our own loop on every machine: unsloth (when its wheels are there) has its own test in the GPU check.
ENGINE = {"use_unsloth": False}


def events_of(run_dir: Path) -> list[dict]:
    events, _ = read_events(run_dir / "events.jsonl")
    return events


def test_the_demo_model_trains_on_cuda_in_bf16_with_an_automatic_batch_size_and_falling_loss(home):
    registry = Registry(home)
    settings = load_settings(**nest_options({"model": "demo", "steps": 40, **ENGINE}))  # no batch size: chosen by VRAM
    run = new_train_run(registry, settings, str(DEMO_DATA))

    embedding_dtypes: set[torch.dtype] = set()

    def record(module, _inputs, output):
        if isinstance(module, torch.nn.Embedding) and isinstance(output, torch.Tensor):
            embedding_dtypes.add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        result = run_training(run, registry, control=Control())
    finally:
        hook.remove()
    assert result.status == "completed" and result.steps == 40
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert embedding_dtypes == {torch.bfloat16}  # the model computed in bf16 (H100: bf16 supported)

    events = events_of(run.path)
    started = next(e for e in events if e["event"] == "started")
    assert started["device"] == "cuda"
    auto = [e for e in events if e["event"] == "log" and "auto batch size" in e["message"]]
    assert len(auto) == 1 and auto[0]["free_vram_gb"] > 1
    assert json.loads((run.path / "spec.json").read_text())["auto_batch_size"] == auto[0]["batch_size"]
    assert not [e for e in events if e["event"] == "log" and "out of memory" in e["message"]]
    completed = next(e for e in events if e["event"] == "completed")
    assert completed.get("peak_vram_mb") is None or completed["peak_vram_mb"] > 0


def test_a_governed_run_gets_the_gpu_and_its_telemetry_carries_nvml_readings(home):
    result = Trainer("demo").train(DEMO_DATA, steps=20, telemetry_interval_s=0.2, **ENGINE)
    assert result.status == "completed"

    run = Registry(home).get(result.run_id)
    assert run.gpu_index in {g.index for g in make_gpu_probe().read()}  # the governor's pick: most free VRAM
    events = events_of(run.path)
    assert next(e for e in events if e["event"] == "started")["device"] == "cuda"
    readings = [g for e in events if e["event"] == "telemetry" for g in e["gpus"]]
    assert readings, "no GPU in any telemetry event"
    ours = [g for g in readings if g["index"] == run.gpu_index]
    assert ours and all(g["name"] and g["mem_total"] and g["mem_total"] > 0 for g in ours)
    for key in ("util", "mem_used", "temp", "power"):
        assert any(g[key] is not None for g in ours), f"NVML gave no {key}"


def test_a_script_sees_only_the_gpu_the_governor_picked(home, tmp_path):
    script = tmp_path / "which_gpu.py"
    script.write_text(
        textwrap.dedent("""
        import json, os
        import torch
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        print(f"visible={visible} count={torch.cuda.device_count()}", flush=True)
        print(json.dumps({"step": 1, "loss": 1.0}))
        """)
    )
    summary = json.loads(backprop("run", str(script), "--json", check=True).stdout.strip().splitlines()[-1])
    run = Registry(home).get(summary["run_id"])
    assert run.status == "completed" and run.gpu_index is not None
    messages = [e["message"] for e in events_of(run.path) if e["event"] == "log"]
    assert f"visible={run.gpu_index} count=1" in messages, messages


def long_conversations(path: Path, count: int = 400) -> Path:
    """Conversations of ~250 tokens each (the demo corpus in slices): four make a packed row of ~1000 tokens."""
    corpus = " ".join((ROOT / "assets" / "demo" / "corpus.txt").read_text(encoding="utf-8").split())
    rows = []
    for i in range(count):
        start = (i * 997) % max(1, len(corpus) - 2000)
        answer = corpus[start : start + 1000]
        rows.append({"messages": [{"role": "user", "content": f"Tell me more, part {i}."},
                                  {"role": "assistant", "content": answer}]})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_real_cuda_oom_under_a_memory_limit_recovers_or_ends_with_a_checkpoint(home, tmp_path):
    """32 packed rows of 1024 tokens need ~2.4 GB of activations (training/memory.py); a 0.9 GB cap on this process's
    CUDA memory (gpu_memory_limit, set by the worker) makes the full batch run out, while a quarter or an eighth fits."""
    data = long_conversations(tmp_path / "long.jsonl")
    options = {"steps": 3, "batch_size": 32, "max_seq_length": 1024, "gpu_memory_limit": "0.9",
               "gradient_checkpointing": False, **ENGINE}  # fmt: skip
    registry = Registry(home)
    try:
        result = Trainer("demo").train(data, **options)
        error = None
    except BackpropError as exc:
        result, error = None, exc
    run = registry.list()[0] if result is None else registry.get(result.run_id)
    events = events_of(run.path)

    ooms = [e for e in events if e["event"] == "log" and "out of memory" in e["message"]]
    assert ooms, "the memory limit never caused an out-of-memory error"
    assert [e["oom_splits"] for e in ooms] == list(range(1, len(ooms) + 1))
    if error is None:
        assert result.status == "completed" and result.steps == 3
        assert ooms[-1]["rows"] >= 4
    else:
        assert error.code == "RUNTIME_OOM_RECOVERY_EXHAUSTED"
        assert run.status == "failed" and run.error_code == "RUNTIME_OOM_RECOVERY_EXHAUSTED"
        saved = registry.checkpoints(run.id)
        assert saved and checkpoints.is_readable(Path(saved[-1].path)), "no checkpoint of the last good step"


def test_dpo_trains_on_cuda_in_bf16_and_scores_answers_as_the_cpu_does(home, tmp_path):
    """Preference training on CUDA: answer log-probabilities (chunked head loss, bf16 weights) agree with the CPU's
    fp32 ones to bf16 precision, and a DPO run learns to prefer the held-out pairs' chosen answers."""
    from training.datasets import load_dataset
    from training.models import load_model, load_tokenizer, resolve_model
    from training.preference import PairEncoder, answer_logps, batches

    rows = [json.loads(line)["messages"] for line in DEMO_DATA.open()]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"prompt": m[0]["content"], "chosen": m[1]["content"],
                                              "rejected": "I do not know."}) + "\n" for m in rows))  # fmt: skip
    source = resolve_model("demo", home)
    tokenizer = load_tokenizer(source)
    pairs = [PairEncoder(tokenizer, 128)(e) for e in load_dataset(pairs_file).examples]
    (_held, batch), *_ = batches(pairs, rows=4, max_seq_length=128, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        cpu = answer_logps(load_model(source, dtype=torch.float32, device="cpu"), batch, "cpu")
        cuda = answer_logps(load_model(source, dtype=torch.bfloat16, device="cuda"), batch, "cuda").float().cpu()
    assert torch.allclose(cuda, cpu, rtol=0.05, atol=0.5)

    result = Trainer("demo", **ENGINE).train(pairs_file, steps=20, method="dpo", lr=1e-3, validation_split=0.25)
    assert result.status == "completed"
    evals = [e for e in events_of(result.run_dir) if e["event"] == "eval"]
    assert evals[-1]["eval_reward_accuracy"] >= 0.9, evals[-1]
    assert next(e for e in events_of(result.run_dir) if e["event"] == "started")["device"] == "cuda"
