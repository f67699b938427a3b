"""Training for real on the tiny model: loss falls, adapters load, resume continues, a SIGKILL loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEMO_DATA, backprop

from training import Trainer, checkpoints
from training.events import read_events
from training.runs import Registry


def step_losses(run_dir) -> dict[int, float]:
    events, _ = read_events(run_dir / "events.jsonl")
    return {e["step"]: e["loss"] for e in events if e["event"] == "step"}


def test_training_lowers_loss_and_writes_a_loadable_adapter(home):
    result = Trainer("demo").train(DEMO_DATA, steps=40, validation_split=0.1, eval_every=20)
    assert result.status == "completed" and result.steps == 40
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert result.eval_loss is not None

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(home / "models" / "demo-v1")
    tuned = PeftModel.from_pretrained(base, result.adapter_path)
    assert any("lora_A" in name for name, _ in tuned.named_parameters())

    run = Registry(home).get(result.run_id)
    assert run.status == "completed" and run.step == 40 and run.final_loss == pytest.approx(result.final_loss)
    assert run.dataset_sha256 and len(run.dataset_sha256) == 64
    events, _ = read_events(run.path / "events.jsonl")
    kinds = [e["event"] for e in events if e["event"] not in ("log", "telemetry")]
    assert kinds[0] == "started" and kinds[-1] == "completed" and "eval" in kinds and "checkpoint_saved" in kinds
    step = next(e for e in events if e["event"] == "step")
    assert {"step", "max_steps", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(step)


def test_response_only_loss_trains_on_assistant_tokens_only(home):
    from transformers import AutoTokenizer

    from training.datasets import load_dataset
    from training.packing import IGNORE, ChatEncoder

    tokenizer = AutoTokenizer.from_pretrained(home / "models" / "demo-v1")
    example = load_dataset(DEMO_DATA).examples[0]
    encoded = ChatEncoder(tokenizer, 128, response_only=True)(example)
    trained = tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE])
    assert trained == "The capital of France is Paris.<|im_end|>\n"
    everything = ChatEncoder(tokenizer, 128, response_only=False)(example)
    assert IGNORE not in everything.labels


def test_packing_keeps_examples_apart():
    """Two packed examples give the same loss as each alone: attention does not cross the boundary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.packing import Encoded, collate

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()  # fmt: skip
    a, b = Encoded(list(range(1, 9)), list(range(1, 9))), Encoded(list(range(20, 31)), list(range(20, 31)))

    def logits(rows):
        batch = collate(rows, 0, packing=True)
        with torch.no_grad():
            return model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits

    packed = logits([[a, b]])[0]
    alone_b = logits([[b]])[0]
    assert torch.allclose(packed[len(a) :], alone_b, atol=1e-5)


@pytest.mark.slow
def test_resume_continues_the_step_count_and_the_loss_curve(home):
    registry = Registry(home)
    # With LoRA dropout every step draws random numbers: the resumed steps match only if the generators were restored.
    full = Trainer("demo").train(DEMO_DATA, steps=30, save_every=10, seed=3, lora_dropout=0.1)

    # The same run, stopped after step 20 by a time box, then resumed: it ends where the uninterrupted one did.
    from training.config import load_settings, nest_options
    from training.trainer import Control, new_train_run, run_training

    settings = load_settings(**nest_options({"model": "demo", "steps": 30, "save_every": 10, "seed": 3, "lora_dropout": 0.1}))
    run = new_train_run(registry, settings, str(DEMO_DATA))
    stop_after_20 = Control()
    partial = run_training(run, registry, control=stop_after_20,
                           on_event=lambda e: e["event"] == "step" and e["step"] == 20 and stop_after_20.stop.set())  # fmt: skip
    assert partial.status == "stopped" and partial.steps == 20
    assert [c.step for c in registry.checkpoints(run.id)] == [10, 20]

    resumed = Trainer().resume(run.id)  # in a worker process, like `backprop resume`
    assert resumed.status == "completed" and resumed.steps == 30
    losses = step_losses(run.path)
    assert sorted(losses) == list(range(1, 31))
    reference = step_losses(full.run_dir)
    for step in (1, 20, 21, 30):
        assert losses[step] == pytest.approx(reference[step], rel=1e-3, abs=1e-4), step


def test_a_checkpoint_keeps_every_random_generator_and_restores_them(tmp_path):
    """CPU, Python and numpy generators here; the CUDA ones (dropout on a GPU draws from them) where there is a GPU."""
    import random

    import numpy
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model = get_peft_model(LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                        num_attention_heads=4, num_key_value_heads=2)),
                           LoraConfig(r=2, target_modules="all-linear"))  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    cuda = torch.cuda.is_available()

    def draw() -> list:
        values = [torch.rand(4).tolist(), random.random(), numpy.random.rand()]
        return values + [torch.rand(4, device="cuda").tolist()] if cuda else values

    torch.manual_seed(5), random.seed(5), numpy.random.seed(5)
    path = checkpoints.save(tmp_path, model, optimizer, scheduler, checkpoints.TrainerState(7, 7, 100, 1.5))
    saved = torch.load(path / "optimizer.pt", weights_only=False)
    assert {"torch_rng", "cuda_rng", "python_rng", "numpy_rng"} <= set(saved)
    assert (saved["cuda_rng"] is not None) == cuda
    expected = draw()
    torch.manual_seed(9), random.seed(9), numpy.random.seed(9)  # training after the checkpoint moved them on
    if cuda:
        torch.cuda.manual_seed_all(9)
    assert draw() != expected
    state = checkpoints.load(path, model, optimizer, scheduler)
    assert state.step == 7
    assert draw() == expected  # the next step draws exactly what it would have without the interruption


@pytest.mark.slow
def test_sigkill_mid_run_leaves_registry_and_checkpoint_and_resume_finishes(home):
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.cli", "train", "--model", "demo", "--steps", "400", "--save-every", "20", "--json",
         "--max-run-minutes", "0"],  # no time box: on a busy machine the steps take longer, never fewer
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy(),
    )  # fmt: skip
    registry = Registry(home)
    deadline = time.time() + 180
    run = None
    while time.time() < deadline:
        runs = registry.list()
        if runs and registry.checkpoints(runs[0].id) and runs[0].step >= 30:
            run = runs[0]
            break
        time.sleep(0.2)
    assert run is not None, proc.stderr.read().decode() if proc.poll() is not None else "no checkpoint in time"
    os.kill(run.pid, signal.SIGKILL)  # the worker process, which trains; the CLI only follows it
    proc.wait(timeout=180)
    assert proc.returncode == 3  # the CLI saw the run end early
    after = Registry(home).get(run.id)  # a fresh connection: the database is readable
    assert after.status == "interrupted"
    saved = registry.checkpoints(run.id)
    assert saved and all(checkpoints.is_readable(Path(c.path)) for c in saved)

    listed = json.loads(backprop("list", "--json", check=True).stdout)
    assert [r["status"] for r in listed] == ["interrupted"]

    done = backprop("resume", run.id[:6], "--json", check=True, timeout=900)  # the timeout only guards against a hang
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["steps"] == 400
    assert sorted(step_losses(run.path)) == list(range(1, 401))


@pytest.mark.slow
def test_resuming_after_the_dataset_file_changed_is_refused_unless_allowed(home, tmp_path):
    import hashlib
    import shutil

    from training.config import load_settings, nest_options
    from training.errors import BackpropError
    from training.trainer import Control, new_train_run, run_training

    data = shutil.copy(DEMO_DATA, tmp_path / "capitals.jsonl")
    registry = Registry(home)
    settings = load_settings(**nest_options({"model": "demo", "steps": 12, "save_every": 4}))
    run = new_train_run(registry, settings, str(data))
    stop_after_4 = Control()
    partial = run_training(run, registry, control=stop_after_4,
                           on_event=lambda e: e["event"] == "step" and e["step"] == 4 and stop_after_4.stop.set())  # fmt: skip
    assert partial.status == "stopped" and partial.steps == 4
    assert registry.get(run.id).dataset_sha256 == hashlib.sha256(data.read_bytes()).hexdigest()

    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[::-1]) + "\n")  # the same rows in another order: batch 5 would be other rows
    changed = hashlib.sha256(data.read_bytes()).hexdigest()
    with pytest.raises(BackpropError) as caught:
        Trainer().resume(run.id)  # refused before a worker starts
    assert caught.value.code == "INPUT_DATASET_CHANGED" and str(data) in caught.value.message
    assert "--allow-changed-data" in caught.value.hint and caught.value.exit_code == 1
    assert registry.get(run.id).status == "stopped"  # untouched: still resumable

    with pytest.raises(BackpropError) as caught:  # the trainer itself checks too (in-process, or a file changed later)
        run_training(registry.get(run.id), registry)
    assert caught.value.code == "INPUT_DATASET_CHANGED"
    assert (registry.get(run.id).status, registry.get(run.id).error_code) == ("failed", "INPUT_DATASET_CHANGED")
    assert registry.get(run.id).step == 4  # nothing trained on the other data

    done = Trainer().resume(run.id, allow_changed_data=True)
    assert done.status == "completed" and done.steps == 12
    assert registry.get(run.id).dataset_sha256 == changed  # later resumes compare with the data it trained on last
    events, _ = read_events(run.path / "events.jsonl")
    assert any("changed since the run started" in e.get("message", "") and e["level"] == "warning" for e in events)


@pytest.mark.slow
def test_the_demo_model_learns_the_demo_dataset(home):
    """The promise of the README: `backprop train --model demo` halves the loss and learns the answers.

    (How long it takes is measured, not asserted: see the issue notes; on 2 CPU cores about 20 s.)"""
    out = backprop("train", "--model", "demo", "--json", check=True, timeout=600)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    losses = step_losses(Path(summary["run_dir"]))
    ordered = [losses[s] for s in sorted(losses)]
    assert summary["status"] == "completed"
    assert ordered[-1] <= 0.5 * ordered[0], (ordered[0], ordered[-1])

    from training.generate import AdapterModel

    model = AdapterModel(summary["adapter"], home)
    rows = [json.loads(line)["messages"] for line in DEMO_DATA.read_text().splitlines()]
    correct = sum(model.reply(m[:1], max_new_tokens=24) == m[1]["content"] for m in rows)
    assert correct >= 0.8 * len(rows), f"{correct}/{len(rows)} answers reproduced"


@pytest.mark.slow
def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint_and_exit_130(home):
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.cli", "train", "--model", "demo", "--steps", "400", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
    )  # fmt: skip
    registry = Registry(home)
    deadline = time.time() + 180
    while time.time() < deadline and not (registry.list() and registry.list()[0].step >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    summary = json.loads(out.strip().splitlines()[-1])
    run = registry.get(summary["run_id"])
    assert run.status == "stopped" and 3 <= run.step < 400
    assert [c.step for c in registry.checkpoints(run.id)] == [run.step]


@pytest.mark.slow
def test_a_time_box_ends_the_run_timeboxed_with_a_checkpoint_and_resume_finishes_it(home):
    # More steps than any machine makes in 6 s, so the time box, not the step count, ends both sessions.
    out = backprop("train", "--model", "demo", "--steps", "1000000", "--max-run-minutes", "0.1", "--json")
    assert out.returncode == 3, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    registry = Registry(home)
    run = registry.get(summary["run_id"])
    assert run.status == "timeboxed" and 0 < run.step < 1000000
    assert [c.step for c in registry.checkpoints(run.id)][-1] == run.step
    events, _ = read_events(run.path / "events.jsonl")
    clock = next(e for e in events if e.get("message", "").startswith("time box: 0.1 min of training"))
    first_step = next(e for e in events if e["event"] == "step")
    saved = next(e for e in events if e["event"] == "checkpoint_saved" and e["step"] == run.step)
    assert first_step["t"] >= clock["t"] >= next(e for e in events if e["event"] == "started")["t"]  # loading is not counted
    assert saved["t"] - clock["t"] >= 6 - 0.01  # the whole box was spent training

    done = backprop("resume", run.id, "--json", "--max-run-minutes", "0.1")
    assert done.returncode == 3
    assert registry.get(run.id).step > run.step  # it continued from the checkpoint


@pytest.mark.slow
def test_a_time_box_shorter_than_start_up_still_trains_a_step_per_session_so_resuming_finishes_the_run(home):
    """The time box starts at the first step: a box that would end before the model has loaded still lets every
    session train (at least one step and a checkpoint), so resuming again and again ends, never loops."""
    box = {"max_run_minutes": 1e-6}  # 60 microseconds
    result = Trainer("demo").train(DEMO_DATA, steps=3, save_every=0, **box)
    sessions = [result]
    while sessions[-1].status == "timeboxed" and len(sessions) <= 3:
        sessions.append(Trainer().resume(result.run_id, **box))
    assert sessions[-1].status == "completed" and sessions[-1].steps == 3
    reached = [s.steps for s in sessions]
    assert all(later > earlier for earlier, later in zip([0, *reached], reached, strict=False)), reached  # progress each time
    assert [s.status for s in sessions[:-1]] == ["timeboxed"] * (len(sessions) - 1)
    assert sorted(step_losses(result.run_dir)) == [1, 2, 3]


@pytest.mark.slow
def test_early_stopping_ends_a_run_whose_eval_loss_stops_improving(home):
    # The held-out capitals cannot be inferred from the others: once the model memorises its training rows, eval
    # loss rises, and with patience 1 the run ends at the first evaluation that is not a new best.
    result = Trainer("demo").train(DEMO_DATA, steps=300, validation_split=0.25, eval_every=10, early_stopping_patience=1)
    assert result.status == "completed" and result.steps < 300 and result.adapter_path is not None
    events, _ = read_events(result.run_dir / "events.jsonl")
    evals = [e["eval_loss"] for e in events if e["event"] == "eval"]
    assert any(e.get("message", "").startswith(f"early stopping at step {result.steps}") for e in events)
    assert evals[-2] >= min(evals[:-2])  # the evaluation that stopped it was no improvement
