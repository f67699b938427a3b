"""Preference training (DPO, ORPO) for real on the demo model: pairs scored as two independent answers, a rule learned
from pairs alone, one copy of the base weights, and a SIGKILLed run that resumes on its curve."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_DATA, backprop, wait_for

from training import Trainer
from training.config import load_settings, nest_options
from training.events import read_events
from training.runs import Registry

CAPITALS = [(m[0]["content"], m[1]["content"]) for m in (json.loads(line)["messages"] for line in DEMO_DATA.open())]
RULE = "The capital of"  # chosen answers say the whole sentence; rejected ones only the city


def short(answer: str) -> str:
    return "It is " + answer.rsplit(" ", 1)[-1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def events_of(run_dir: Path, kind: str) -> list[dict]:
    events, _ = read_events(run_dir / "events.jsonl")
    return [e for e in events if e["event"] == kind]


def test_a_pair_scores_as_two_independent_answers_packed_side_by_side(home):
    """answer_logps of a packed batch equals each answer scored alone by a plain forward pass (full logits)."""
    import torch

    from training.datasets import load_dataset
    from training.models import load_model, load_tokenizer, resolve_model
    from training.preference import PairEncoder, answer_logps, batches, collate_pairs

    source = resolve_model("demo", home)
    tokenizer, model = load_tokenizer(source), load_model(source, dtype=torch.float32, device="cpu")
    pairs_file = write_jsonl(
        home.parent / "pairs.jsonl", [{"prompt": q, "chosen": a, "rejected": short(a)} for q, a in CAPITALS[:6]]
    )
    pairs = [PairEncoder(tokenizer, 128)(e) for e in load_dataset(pairs_file).examples]
    ((held, batch),) = batches(pairs, rows=2, max_seq_length=128, pad_id=tokenizer.pad_token_id)
    assert batch.input_ids.shape[0] == 2 and len(held) == 6  # three pairs to a row
    with torch.no_grad():
        sums = answer_logps(model, batch, "cpu", "chunked")
        for k, pair in enumerate(held):
            for side, answer in enumerate((pair.chosen, pair.rejected)):
                ids = torch.tensor([answer.input_ids])
                logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
                labels = torch.tensor(answer.labels[1:])
                alone = logps[labels != -100].gather(1, labels[labels != -100][:, None]).sum()
                assert float(sums[2 * k + side]) == pytest.approx(float(alone), rel=1e-4, abs=1e-4)
    assert collate_pairs([[pairs[0]]], tokenizer.pad_token_id).target_tokens == 1  # a pair is one unit of loss


def test_the_dpo_and_orpo_losses_and_rewards_are_the_papers_formulas():
    """DPO (Rafailov et al. 2023) and ORPO (Hong et al. 2024), worked out by hand for two pairs."""
    import math

    import torch

    from training.preference import PairScores, PreferenceLoss

    scores = PairScores(chosen=torch.tensor([-4.0, -9.0]), rejected=torch.tensor([-6.0, -8.0]),
                        reference_chosen=torch.tensor([-5.0, -9.0]), reference_rejected=torch.tensor([-5.0, -9.0]),
                        chosen_tokens=torch.tensor([4.0, 3.0]), rejected_tokens=torch.tensor([3.0, 4.0]))  # fmt: skip

    def logsigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    loss, metrics = PreferenceLoss("dpo", beta=0.5)(scores)
    margins = [0.5 * ((-4 + 5) - (-6 + 5)), 0.5 * ((-9 + 9) - (-8 + 9))]  # beta * (policy - reference) log-ratios
    assert float(loss) == pytest.approx(-sum(logsigmoid(m) for m in margins), rel=1e-6)
    assert metrics["reward_accuracy"] == 1 and metrics["reward_margin"] == pytest.approx(sum(margins))
    assert (metrics["chosen_logps"], metrics["rejected_logps"], metrics["pairs"]) == (-13.0, -14.0, 2.0)

    loss, metrics = PreferenceLoss("orpo", orpo_lambda=0.2)(scores)
    expected = 0.0
    for c, nc, r, nr in ((-4, 4, -6, 3), (-9, 3, -8, 4)):
        pc, pr = c / nc, r / nr  # mean token log-probabilities
        log_odds = (pc - math.log1p(-math.exp(pc))) - (pr - math.log1p(-math.exp(pr)))
        expected += -pc - 0.2 * logsigmoid(log_odds)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # Rewards are lambda * mean log-probabilities: pair 1 prefers chosen by 1 nat a token, pair 2 rejected by 1.
    assert metrics["reward_accuracy"] == 1 and metrics["reward_margin"] == pytest.approx(0.2 * (1 - 1), abs=1e-6)


def test_a_long_pair_keeps_the_same_prompt_tail_for_both_answers(home):
    from training.datasets import Example
    from training.models import load_tokenizer, resolve_model
    from training.preference import IGNORE, PairEncoder

    tokenizer = load_tokenizer(resolve_model("demo", home))
    prompt = [{"role": "user", "content": "Tell me about capitals. " * 30 + "Which one is in France?"}]
    example = Example(prompt + [{"role": "assistant", "content": "Paris, the capital of France, on the Seine."}], 7,
                      "preference", rejected=[{"role": "assistant", "content": "Paris."}], prompt_turns=1)  # fmt: skip
    encoder = PairEncoder(tokenizer, 64)
    pair = encoder(example)
    assert encoder.truncated == 1 and len(pair.chosen) == 64
    prompt_part = [t for t, label in zip(pair.chosen.input_ids, pair.chosen.labels, strict=True) if label == IGNORE]
    rejected_prompt = [t for t, label in zip(pair.rejected.input_ids, pair.rejected.labels, strict=True) if label == IGNORE]
    assert prompt_part[: len(rejected_prompt)] == rejected_prompt  # the rejected side sees exactly the chosen's prompt
    assert tokenizer.decode(pair.chosen.input_ids).rstrip().endswith("on the Seine.<|im_end|>")


def test_dpo_and_orpo_teach_a_rule_from_pairs_alone(home, tmp_path):
    """An SFT run learns both answer styles; DPO (and ORPO) on pairs where the chosen answer follows the rule then make
    the held-out pairs' chosen answer win (reward accuracy >= 0.9) and greedy answers follow the rule."""
    from training.generate import load_chat_model

    both_styles = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
                   for q, a in CAPITALS for answer in (a, short(a))]  # fmt: skip
    sft = Trainer("demo").train(write_jsonl(tmp_path / "both.jsonl", both_styles), steps=300, max_run_minutes=0)
    assert sft.status == "completed"
    pairs = write_jsonl(tmp_path / "rule.jsonl", [{"prompt": q, "chosen": a, "rejected": short(a)} for q, a in CAPITALS])

    for method in ("dpo", "orpo"):
        tuned = Trainer().train(pairs, steps=60, method=method, from_run=sft.run_id, validation_split=0.25, batch_size=4)
        assert tuned.status == "completed", method
        started = events_of(tuned.run_dir, "started")[0]
        assert started["method"] == method
        steps, evals = events_of(tuned.run_dir, "step"), events_of(tuned.run_dir, "eval")
        assert {"reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps"} <= set(steps[-1])
        assert evals[-1]["eval_reward_accuracy"] >= 0.9, (method, evals[-1])
        assert evals[-1]["eval_reward_margin"] > 0

        spec = json.loads((tuned.run_dir / "spec.json").read_text())
        assert spec["from_run"] == sft.run_id and spec["settings"]["training"]["method"] == method
        assert Registry(home).get(tuned.run_id).parent_id is None  # a run of its own, not a multi-run's child
        if method == "dpo":  # the reference is the adapter the run started from
            assert_reference_is_the_adapter(home, tuned.run_dir, sft.adapter_path, pairs)
        from training.datasets import load_dataset, split

        _train, held_out = split(load_dataset(pairs).examples, 0.25, spec["settings"]["training"]["seed"])
        with load_chat_model(tuned.run_id, home) as chat:
            answers = [chat.reply(e.prompt, max_new_tokens=24) for e in held_out]
        follows = sum(a.startswith(RULE) for a in answers)
        assert follows >= 0.9 * len(answers), (method, answers)


def assert_reference_is_the_adapter(home: Path, run_dir: Path, adapter: Path, pairs: Path) -> None:
    from training.datasets import load_dataset, split
    from training.generate import AdapterModel
    from training.preference import pair_logps

    spec = json.loads((run_dir / "spec.json").read_text())
    train, held_out = split(load_dataset(pairs).examples, 0.25, spec["settings"]["training"]["seed"])
    saved = json.loads((run_dir / "reference_logps.json").read_text())["pairs"]
    with AdapterModel(adapter, home) as start:
        scored = pair_logps(start.model, start.tokenizer, train + held_out, "cpu", 128)
    assert [s for pair in saved for s in pair] == pytest.approx([s for pair in scored for s in pair], rel=1e-4, abs=1e-4)


def test_a_dpo_run_holds_one_copy_of_the_base_weights(home, tmp_path):
    """The reference is the starting model's log-probabilities, computed before the first step: while DPO trains,
    the process holds one transformers model and its parameters once (plus the LoRA weights)."""
    import torch
    from transformers import PreTrainedModel

    from training.trainer import new_train_run, run_training

    pairs = write_jsonl(tmp_path / "rule.jsonl", [{"prompt": q, "chosen": a, "rejected": short(a)} for q, a in CAPITALS])
    registry = Registry(home)
    run = new_train_run(registry, load_settings(**nest_options({"model": "demo", "method": "dpo", "steps": 3})), str(pairs))
    seen: dict[str, int] = {}

    def at_first_step(event: dict) -> None:
        if event["event"] == "step" and event["step"] == 1:
            gc.collect()  # what earlier tests in this process left is gone; what stays is this run's
            objects = gc.get_objects()
            models = [o for o in objects if isinstance(o, PreTrainedModel)]
            inner = {id(m) for o in models for m in o.modules() if m is not o}  # LlamaModel inside LlamaForCausalLM
            models = [o for o in models if id(o) not in inner]
            storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for o in models for p in o.parameters()}
            frozen = {p.untyped_storage().data_ptr() for o in models for p in o.parameters() if not p.requires_grad}
            seen.update(models=len(models), parameter_bytes=sum(storages.values()), frozen_storages=len(frozen))
            seen["all_tensor_bytes"] = sum(
                o.untyped_storage().nbytes() for o in {id(t): t for t in objects if isinstance(t, torch.Tensor)}.values()
                if o.is_floating_point() and o.numel() > 10_000 and not isinstance(o, torch.nn.Parameter)
            )  # fmt: skip

    result = run_training(run, registry, on_event=at_first_step)
    assert result.status == "completed"
    from training.models import load_model, resolve_model

    base_bytes = sum(p.numel() * p.element_size() for p in load_model(resolve_model("demo", home), device="cpu").parameters())
    assert seen["models"] == 1
    assert seen["parameter_bytes"] < 1.2 * base_bytes  # the base once, and the LoRA weights
    assert seen["all_tensor_bytes"] < 0.5 * base_bytes  # and no stray copy outside the model's parameters either


def test_the_dpo_reference_pass_shows_its_progress_and_a_stop_ends_it_at_the_next_batch(home, tmp_path):
    """On a big model the reference pass takes minutes before the first step: it reports the pairs scored with an ETA,
    and a stop does not wait for it to finish."""
    from training.control import Control
    from training.trainer import new_train_run, run_training

    pairs = write_jsonl(tmp_path / "rule.jsonl", [{"prompt": q, "chosen": a, "rejected": short(a)} for q, a in CAPITALS])
    registry = Registry(home)
    settings = load_settings(**nest_options({"model": "demo", "method": "dpo", "steps": 2, "batch_size": 1,
                                             "max_seq_length": 64}))  # fmt: skip
    result = run_training(new_train_run(registry, settings, str(pairs)), registry)
    progress = events_of(result.run_dir, "reference")
    total = len(CAPITALS)  # the train and the held-out pairs
    assert progress[0]["done"] < total and progress[-1]["done"] == total  # the first batch at once, and the last
    assert all(e["total"] == total and e["message"] == f"DPO reference: {e['done']} / {total} pairs" and e["eta_s"] >= 0
               for e in progress)  # fmt: skip

    stop = Control()
    run = new_train_run(registry, settings, str(pairs))
    result = run_training(run, registry, control=stop, on_event=lambda e: e["event"] == "reference" and stop.stop.set())
    assert (result.status, result.steps) == ("stopped", 0) and registry.get(run.id).status == "stopped"
    assert [e["done"] for e in events_of(result.run_dir, "reference")] == [progress[0]["done"]]  # no batch after the stop
    assert not (result.run_dir / "reference_logps.json").exists()  # a resume scores the pairs again


def test_the_cli_draws_the_reference_pass_as_one_line():
    import io

    from training.cli.follow import StageLine

    plain = io.StringIO()
    line = StageLine(plain)
    line.show({"event": "reference", "done": 4, "total": 21, "eta_s": 130.0, "message": "DPO reference: 4 / 21 pairs"})
    line.show({"event": "reference", "done": 21, "total": 21, "eta_s": 0.0, "message": "DPO reference: 21 / 21 pairs"})
    assert plain.getvalue().splitlines() == ["DPO reference 4 / 21 pairs, ETA 2:10", "DPO reference: 21 pairs scored"]


def test_dpo_on_chat_data_or_bad_pairs_is_refused_with_a_code_and_a_line(home, tmp_path):
    result = backprop("train", "--model", "demo", "--data", str(DEMO_DATA), "--method", "dpo", "--steps", "2")
    assert result.returncode != 0 and "[INPUT_DATASET_NOT_PREFERENCE]" in result.stderr + result.stdout
    assert "line 1" in result.stderr + result.stdout
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
                                               {"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}])  # fmt: skip
    result = backprop("train", "--model", "demo", "--data", str(bad), "--method", "orpo", "--steps", "2")
    assert result.returncode != 0 and "[INPUT_DATASET_BAD_PAIR]" in result.stderr + result.stdout
    assert f"{bad}:2" in result.stderr + result.stdout


def test_a_sigkilled_dpo_run_from_another_run_resumes_on_the_same_curve(home, tmp_path):
    """Killed after a checkpoint, resumed: the steps after it equal an uninterrupted run's, and the reference
    log-probabilities are read back (the resumed model has moved on), not computed again."""
    sft = Trainer("demo").train(DEMO_DATA, steps=5)
    pairs = write_jsonl(tmp_path / "rule.jsonl", [{"prompt": q, "chosen": a, "rejected": short(a)} for q, a in CAPITALS])
    options = {"steps": 100, "method": "dpo", "save_every": 8, "batch_size": 4, "lr": 1e-3}
    full = Trainer().train(pairs, from_run=sft.run_id, **options)
    assert full.status == "completed"

    registry = Registry(home)
    args = ["train", "--data", str(pairs), "--from-run", sft.run_id, "--method", "dpo", "--steps", "100", "--save-every",
            "8", "--batch-size", "4", "--lr", "1e-3", "--json"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "training.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    known = {sft.run_id, full.run_id}
    run = wait_for(lambda: next((r for r in registry.list() if r.id not in known and registry.checkpoints(r.id)), None),
                   what="a checkpoint of the third run")  # fmt: skip
    os.kill(run.pid, signal.SIGKILL)
    proc.wait(timeout=120)
    assert Registry(home).get(run.id).status == "interrupted"

    done = backprop("resume", run.id, "--json", check=True, timeout=600)
    assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == "completed"
    losses = {e["step"]: e["loss"] for e in events_of(run.path, "step")}
    expected = {e["step"]: e["loss"] for e in events_of(full.run_dir, "step")}
    assert sorted(losses) == list(range(1, 101))
    for step in range(1, 101):
        assert losses[step] == pytest.approx(expected[step], rel=1e-3, abs=1e-4), step
    computed = [e for e in events_of(run.path, "log") if "reference log-probabilities" in e.get("message", "")]
    assert len(computed) == 1  # once, before the first step; the resumed session read them back


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", pytest.param("deepspeed-zero3", marks=pytest.mark.extra("dist"))])
def test_dpo_on_two_processes_trains_as_one_process_at_twice_the_batch(home, tmp_path, strategy):
    """The ranks split the reference pass and each global batch of pairs; losses and rewards match one process."""
    from training import jobs

    pairs = write_jsonl(tmp_path / "rule.jsonl", [{"prompt": q, "chosen": a, "rejected": short(a)} for q, a in CAPITALS])
    small = {"model": "demo", "method": "dpo", "steps": 4, "max_seq_length": 64, "telemetry_interval_s": 0,
             "collective_timeout_s": 30, "lr": 1e-3}  # fmt: skip
    registry = Registry(home)
    ids = {}
    for nproc, batch in ((2, 2), (1, 4)):
        settings = load_settings(**nest_options({**small, "nproc": nproc, "batch_size": batch, "strategy": strategy}))
        run_id = ids[nproc] = jobs.submit_train(settings, str(pairs)).id
        ended = wait_for(lambda: registry.get(run_id).status in ("completed", "failed", "interrupted"),  # noqa: B023
                         timeout=300, what="the run to end")  # fmt: skip
        assert ended and registry.get(run_id).status == "completed", events_of(registry.get(run_id).path, "failed")
    two, one = (events_of(registry.get(ids[n]).path, "step") for n in (2, 1))
    for key in ("loss", "reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps"):
        assert [e[key] for e in two] == pytest.approx([e[key] for e in one], rel=1e-3, abs=1e-4), key
    for run_id in ids.values():  # the progress of the reference pass counts every pair, however the ranks split them
        assert events_of(registry.get(run_id).path, "reference")[-1]["done"] == len(CAPITALS)


@pytest.mark.extra("track")
def test_reward_metrics_reach_tensorboard(home, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pairs = write_jsonl(tmp_path / "rule.jsonl", [{"prompt": q, "chosen": a, "rejected": short(a)} for q, a in CAPITALS])
    run = Trainer("demo").train(pairs, steps=4, method="dpo", report_to="tensorboard", validation_split=0.2, eval_every=2)
    assert run.status == "completed"
    steps = {e["step"]: e for e in events_of(run.run_dir, "step")}
    evals = {e["step"]: e for e in events_of(run.run_dir, "eval")}
    accumulator = EventAccumulator(str(run.run_dir / "tensorboard"))
    accumulator.Reload()
    for name in ("reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps"):
        logged = {s.step: s.value for s in accumulator.Scalars(f"train/{name}")}
        assert logged == pytest.approx({s: e[name] for s, e in steps.items()}, rel=1e-5)
        logged = {s.step: s.value for s in accumulator.Scalars(f"eval/{name}")}
        assert logged == pytest.approx({s: e[f"eval_{name}"] for s, e in evals.items()}, rel=1e-5)
