"""`backprop eval`: did the fine-tune help? A real demo SFT run measured against its own base model on held-out data.

The held-out questions must be answerable from what the run learned, so the data is the demo's capitals asked four ways:
a question held out in one wording was trained in the others. The base model (the demo model is random weights) answers
none of them.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DATA, backprop

from training.evaluate import evaluate_run, exact_match, f1_score
from training.runs import Registry

WORDINGS = ("What is the capital of {}?", "Which city is the capital of {}?", "Name the capital of {}.",
            "Tell me the capital city of {}.")  # fmt: skip
CAPITALS = [(m[0]["content"].removeprefix("What is the capital of ").removesuffix("?"), m[1]["content"])
            for m in (json.loads(line)["messages"] for line in DEMO_DATA.open())]  # fmt: skip


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One demo SFT run (the demo's 300 steps) on the capitals asked four ways, 10% held out; its home and env."""
    base = tmp_path_factory.mktemp("evaluate")
    home = base / "home"
    shutil.copytree(tiny_model_dir, home / "models" / tiny_model_dir.name)
    env = {"BACKPROPAGATE_HOME": str(home), "BACKPROPAGATE_MIN_FREE_RAM_GB": "0.25", "BACKPROPAGATE_MAX_CPU_PERCENT": "100"}
    data = write_jsonl(base / "capitals-4-ways.jsonl", [chat(w.format(c), a) for c, a in CAPITALS for w in WORDINGS])
    # No time box (--max-run-minutes 0): on a busy machine the 300 steps take longer, never fewer.
    out = backprop("train", "--model", "demo", "--data", str(data), "--validation-split", "0.1", "--max-run-minutes", "0",
                   "--json", env=env, check=True, timeout=1800)  # fmt: skip
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed"
    return {"home": home, "env": env, "run_id": summary["run_id"], "base": base}


def eval_json(trained: dict, *args: str) -> dict:
    out = backprop("eval", trained["run_id"], *args, "--json", env=trained["env"], check=True)
    return json.loads(out.stdout)


def test_after_the_demo_sft_run_the_tuned_model_answers_held_out_questions_and_the_base_model_does_not(trained):
    report = eval_json(trained)
    base, tuned = report["base"], report["tuned"]
    assert set(base) == set(tuned) == {"loss", "perplexity", "exact_match", "f1"}
    assert tuned["exact_match"] >= 0.8 and base["exact_match"] <= 0.1, (base, tuned)
    assert tuned["f1"] > base["f1"] and tuned["loss"] < base["loss"]
    assert tuned["perplexity"] == pytest.approx(math.exp(tuned["loss"]), rel=1e-4)
    assert report["data"] == {"source": "validation split", "kind": "chat", "examples": 16}  # 10% of 160 rows
    # The same masking as the trainer: on the run's own validation split, the tuned loss is the run's eval loss.
    run = Registry(trained["home"]).get(trained["run_id"])
    assert tuned["loss"] == pytest.approx(run.eval_loss, rel=1e-3, abs=1e-5)
    shown = report["examples"]
    assert len(shown) == 5 and all(set(e) == {"prompt", "reference", "base", "tuned"} for e in shown)
    assert sum(e["tuned"] == e["reference"] for e in shown) >= 4 and not any(e["base"] == e["reference"] for e in shown)
    # Stored with the run, whole: the registry gives back exactly what was printed.
    assert Registry(trained["home"]).latest_evaluation(trained["run_id"]) == report
    assert report["run_id"] == trained["run_id"] and report["created_at"] > 0 and report["id"]


def test_any_file_can_be_the_held_out_data_and_the_terminal_shows_a_table_and_answers(trained):
    report = eval_json(trained, "--data", str(DEMO_DATA), "--max-examples", "12", "--shown", "2")
    assert report["data"]["source"] == str(DEMO_DATA) and report["data"]["examples"] == 12
    assert report["tuned"]["exact_match"] > report["base"]["exact_match"] and len(report["examples"]) == 2
    assert [e["prompt"] for e in report["examples"]] == [q for q in (json.loads(line)["messages"][0]["content"]
                                                                     for line in DEMO_DATA.open())][:2]  # fmt: skip
    out = backprop("eval", trained["run_id"][:6], "--data", str(DEMO_DATA), "--max-examples", "3", env=trained["env"],
                   check=True)  # fmt: skip
    assert "exact match" in out.stdout and "perplexity" in out.stdout and "What is the capital of France?" in out.stdout
    assert len(Registry(trained["home"]).evaluations(trained["run_id"])) >= 2  # every evaluation is kept, newest first


def test_preference_data_is_scored_by_reward_accuracy_and_margin(trained):
    """Pairs whose chosen answer names the right capital and rejected one a wrong one: the tuned model prefers the
    chosen answers, far more often than the base model does."""
    rows = [{"prompt": WORDINGS[1].format(c), "chosen": a, "rejected": CAPITALS[(i + 1) % len(CAPITALS)][1]}
            for i, (c, a) in enumerate(CAPITALS[:20])]  # fmt: skip
    report = eval_json(trained, "--data", str(write_jsonl(trained["base"] / "pairs.jsonl", rows)))
    base, tuned = report["base"], report["tuned"]
    assert report["data"]["kind"] == "preference" and report["data"]["examples"] == 20
    assert set(tuned) == {"loss", "perplexity", "reward_accuracy", "reward_margin"}
    assert tuned["reward_accuracy"] >= 0.9 and tuned["reward_margin"] > 0 and tuned["reward_accuracy"] > base["reward_accuracy"]
    assert tuned["loss"] < base["loss"]
    assert report["examples"][0]["rejected"] == rows[0]["rejected"] and report["examples"][0]["reference"] == rows[0]["chosen"]


def test_bad_input_is_refused_with_codes(trained):
    env = trained["env"]
    unknown = backprop("eval", "nosuchrun", "--json", env=env)
    assert unknown.returncode == 1 and "[INPUT_RUN_NOT_FOUND]" in unknown.stderr and unknown.stdout == ""
    missing = backprop("eval", trained["run_id"], "--data", "nowhere.jsonl", env=env)
    assert missing.returncode == 1 and "[INPUT_DATASET_NOT_FOUND]" in missing.stderr
    bad = backprop("eval", trained["run_id"], "--max-examples", "0", env=env)
    assert bad.returncode == 1 and "[INPUT_INVALID_ARGUMENT]" in bad.stderr
    # A run that held nothing out is told to take --data, and then measures it.
    out = backprop("train", "--model", "demo", "--steps", "2", "--json", env=env, check=True)
    run_id = json.loads(out.stdout.strip().splitlines()[-1])["run_id"]
    no_split = backprop("eval", run_id, env=env)
    assert no_split.returncode == 1 and "[INPUT_INVALID_ARGUMENT]" in no_split.stderr and "--data" in no_split.stderr
    assert eval_json({**trained, "run_id": run_id}, "--data", str(DEMO_DATA), "--max-examples", "2")["data"]["examples"] == 2
    # A run without a final adapter (registered, never trained) has nothing to compare.
    from training.config import load_settings, nest_options
    from training.trainer import new_train_run

    queued = new_train_run(Registry(trained["home"]), load_settings(**nest_options({"model": "demo"})), str(DEMO_DATA))
    no_adapter = backprop("eval", queued.id, env=env)
    assert no_adapter.returncode == 2 and "[STATE_NO_ADAPTER]" in no_adapter.stderr


def test_a_multi_run_is_measured_per_task_and_overall(home, tmp_path):
    halves = [write_jsonl(tmp_path / f"part{i}.jsonl", [chat(w.format(c), a) for c, a in CAPITALS[i * 10 : i * 10 + 10]
                                                        for w in WORDINGS[:2]]) for i in range(2)]  # fmt: skip
    out = backprop("multi-run", "--model", "demo", "--data", str(halves[0]), "--data", str(halves[1]), "--steps", "10",
                   "--json", check=True, timeout=600)  # fmt: skip
    multi_run_id = json.loads(out.stdout.strip().splitlines()[-1])["run_id"]
    report = json.loads(backprop("eval", multi_run_id, "--json", check=True).stdout)
    assert [t["task"] for t in report["tasks"]] == ["part0", "part1"]
    assert sum(t["examples"] for t in report["tasks"]) == report["data"]["examples"] == 4  # 10% of each task's 20 rows
    for task in report["tasks"]:
        assert set(task["base"]) == set(task["tuned"]) == {"loss", "perplexity", "exact_match", "f1"}
        assert task["tuned"]["loss"] < task["base"]["loss"]
    # The overall loss is per token over both tasks: between the two tasks' losses.
    losses = sorted(t["tuned"]["loss"] for t in report["tasks"])
    assert losses[0] - 1e-6 <= report["tuned"]["loss"] <= losses[1] + 1e-6


def test_exact_match_ignores_whitespace_and_f1_counts_shared_words():
    assert exact_match("  The capital of France\n is Paris. ", "The capital of France is Paris.") == 1.0
    assert exact_match("the capital of France is Paris.", "The capital of France is Paris.") == 0.0  # case counts
    assert f1_score("Paris", "The capital of France is Paris.") == pytest.approx(2 * (1 * 1 / 6) / (1 + 1 / 6))
    assert f1_score("The capital of France is Paris!", "the capital of france is paris.") == 1.0  # lowercase, no punctuation
    assert f1_score("Berlin", "Paris") == 0.0 and f1_score("", "") == 1.0 and f1_score("", "Paris") == 0.0


def test_evaluations_are_stored_whole_with_their_run_and_leave_with_it(tmp_path):
    registry = Registry(tmp_path / "home")
    run = registry.create("train", {"settings": {}})
    first = registry.add_evaluation(run.id, {"base": {"loss": 2.0}, "tuned": {"loss": 1.0}, "examples": []})
    second = registry.add_evaluation(run.id, {"base": {"loss": 2.0}, "tuned": {"loss": 0.5}, "examples": []})
    assert registry.evaluations(run.id) == [second, first] and registry.latest_evaluation(run.id) == second
    assert Registry(tmp_path / "home").latest_evaluation(run.id)["tuned"] == {"loss": 0.5}  # another process reads it
    registry.delete(run.id)
    assert registry.evaluations(run.id) == [] and registry.latest_evaluation(run.id) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")
def test_on_cuda_the_report_agrees_with_the_one_measured_on_the_cpu(trained):
    """The GPU check runs this (pytest -m gpu tests/test_evaluate.py): the same run measured on CUDA and on the CPU."""
    registry = Registry(trained["home"])
    on_gpu = evaluate_run(registry, trained["run_id"], device="cuda")
    on_cpu = evaluate_run(registry, trained["run_id"], device="cpu")
    assert on_gpu["tuned"]["exact_match"] >= 0.8 and on_gpu["base"]["exact_match"] <= 0.1
    for side in ("base", "tuned"):
        assert on_gpu[side]["loss"] == pytest.approx(on_cpu[side]["loss"], rel=0.05, abs=0.01)
    assert [e["tuned"] for e in on_gpu["examples"]] == [e["tuned"] for e in on_cpu["examples"]]
