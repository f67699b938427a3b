"""The plan of a run (training/plan.py, `backprop plan`): every setting a user leaves unset is chosen from the model's
config, the dataset's token lengths and the machine, with a one-line reason; a value the user set wins and is checked;
a run that will not fit is refused before it starts.

The first half pins `propose` (pure arithmetic) on a grid of real model shapes (Qwen2.5 1.5B and 7B, Llama 3.1 70B
from their public config.json), dataset statistics and free memory. The second half runs the real command on locally
built models and data: the tokenizer's lengths, `backprop train` applying and recording the plan, the refusal, the
probe run.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import backprop, write_lines

from training.plan import GIB, DataFacts, Machine, ModelFacts, propose

QWEN_1_5B = ModelFacts.from_config("Qwen/Qwen2.5-1.5B-Instruct", {
    "hidden_size": 1536, "num_attention_heads": 12, "num_key_value_heads": 2, "intermediate_size": 8960,
    "num_hidden_layers": 28, "vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 32768})  # fmt: skip
QWEN_7B = ModelFacts.from_config("Qwen/Qwen2.5-7B-Instruct", {
    "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
    "num_hidden_layers": 28, "vocab_size": 152064, "tie_word_embeddings": False, "max_position_embeddings": 32768})  # fmt: skip
LLAMA_70B = ModelFacts.from_config("meta-llama/Llama-3.1-70B-Instruct", {
    "hidden_size": 8192, "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672,
    "num_hidden_layers": 80, "vocab_size": 128256, "max_position_embeddings": 131072})  # fmt: skip

H100 = Machine("cuda", "NVIDIA H100 80GB HBM3", 79 * GIB, 80 * GIB, gpus=1)
RTX_4090 = Machine("cuda", "NVIDIA GeForce RTX 4090", 23 * GIB, 24 * GIB, gpus=1)
RTX_3060 = Machine("cuda", "NVIDIA GeForce RTX 3060", 11.5 * GIB, 12 * GIB, gpus=1)
LAPTOP = Machine("cpu", "CPU", 12 * GIB, 16 * GIB, cores=8)


def chat_data(examples: int, p50: int = 300, longest: int = 500) -> DataFacts:
    """Token lengths spread evenly from p50/2 to `longest` (a sample of at most 2000, as data_facts keeps)."""
    n = min(examples, 2000)
    low = p50 // 2
    lengths = sorted(low + (longest - low) * i // max(1, n - 1) for i in range(n))
    return DataFacts(examples, tuple(lengths), path="chat.jsonl")


def choice(plan, name: str):
    return plan.choices[name].value


# ------------------------------------------------------------------------------------------ the rules, pinned


def test_the_plan_names_the_parameters_of_real_model_shapes():
    assert round(QWEN_1_5B.params / 1e9, 2) == 1.54  # Qwen2.5-1.5B: 1.54B (tied embeddings)
    assert round(QWEN_7B.params / 1e9, 2) == 7.62
    assert round(LLAMA_70B.params / 1e9, 1) == 70.6


def test_max_seq_length_covers_95_percent_of_the_examples_and_says_how_many_are_truncated():
    data = chat_data(1000, p50=300, longest=2000)
    plan = propose(QWEN_1_5B, data, H100)
    length = choice(plan, "max_seq_length")
    assert length % 64 == 0 and length >= data.percentile(95) and length - 64 < data.percentile(95)
    truncated = data.longer_than(length)
    assert 0 < truncated <= 50  # at most 5% are cut
    reason = plan.choices["max_seq_length"].reason
    assert f"p95 {data.percentile(95)}" in reason and f"{truncated} longer are truncated" in reason


def test_max_seq_length_never_exceeds_what_the_model_was_trained_for():
    short_model = ModelFacts.from_config("short", {"hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2,
                                                   "vocab_size": 1000, "max_position_embeddings": 512})  # fmt: skip
    plan = propose(short_model, chat_data(100, p50=1500, longest=3000), LAPTOP)
    assert choice(plan, "max_seq_length") == 512 and "capped at 512" in plan.choices["max_seq_length"].reason
    given = propose(short_model, chat_data(100), LAPTOP, given={"max_seq_length": 1024})
    assert [p.code for p in given.problems] == ["INPUT_INVALID_ARGUMENT"] and "512 positions" in given.problems[0].message


@pytest.mark.parametrize(
    ("machine", "batch", "accumulation"),
    [(H100, 16, 1), (RTX_4090, 4, 4)],
)
def test_the_micro_batch_is_what_fits_and_accumulation_keeps_an_effective_batch_of_16(machine, batch, accumulation):
    plan = propose(QWEN_1_5B, chat_data(5000), machine)
    assert (choice(plan, "batch_size"), choice(plan, "gradient_accumulation")) == (batch, accumulation)
    assert "fits in memory" in plan.choices["batch_size"].reason
    assert f"{batch} x {accumulation} = an effective batch of 16 rows" in plan.choices["gradient_accumulation"].reason
    assert plan.memory.fits and not plan.problems
    assert choice(plan, "qlora") is False and choice(plan, "gradient_checkpointing") is False


def test_a_model_whose_16_bit_weights_do_not_fit_gets_qlora_with_its_reason():
    plan = propose(QWEN_7B, chat_data(5000), RTX_3060)
    assert choice(plan, "qlora") is True
    assert "16-bit weights (14.2 GiB) and one row do not fit: 4-bit weights" in plan.choices["qlora"].reason
    assert choice(plan, "gradient_checkpointing") is True  # QLoRA recomputes activations (peft's kbit preparation)
    # 4-bit projections (3.5 GiB) + embeddings and head in float32, as peft's kbit preparation leaves them (4.1 GiB)
    assert 7 * GIB < plan.memory.weights < 7.5 * GIB and plan.memory.fits


def test_without_bitsandbytes_a_model_too_big_for_16_bit_is_flagged_with_what_to_change():
    plan = propose(QWEN_7B, chat_data(5000), RTX_3060, qlora_available=False)
    assert choice(plan, "qlora") is False and "bitsandbytes" in plan.choices["qlora"].reason
    [problem] = plan.problems
    assert problem.code == "INPUT_RUN_WONT_FIT" and "11.5 GiB of VRAM" not in problem.message
    assert problem.hint.startswith("Use --qlora (install the gpu extra for bitsandbytes) for 4-bit weights")


def test_activations_that_do_not_fit_turn_gradient_checkpointing_on():
    long_rows = chat_data(5000, p50=12000, longest=16000)  # the weights fit a 4090; 16k-token activations do not
    plan = propose(QWEN_1_5B, long_rows, RTX_4090)
    assert choice(plan, "qlora") is False
    assert choice(plan, "gradient_checkpointing") is True
    assert plan.choices["gradient_checkpointing"].reason == "one row's activations do not fit: recompute them in backward"
    assert (choice(plan, "batch_size"), choice(plan, "gradient_accumulation")) == (4, 4) and plan.memory.fits


def test_a_value_the_user_set_wins_and_a_batch_that_will_not_fit_says_which_one_would():
    plan = propose(QWEN_1_5B, chat_data(5000), RTX_4090, given={"batch_size": 64, "lr": 1e-3})
    assert plan.choices["batch_size"].given and choice(plan, "batch_size") == 64
    assert plan.choices["lr"].given and choice(plan, "lr") == 1e-3
    assert "batch_size" not in plan.options() and "lr" not in plan.options()
    [problem] = plan.problems
    assert problem.code == "INPUT_RUN_WONT_FIT"
    assert problem.hint.startswith("Use --batch-size 4 ")  # the largest that fits, as the plan itself would pick


def test_a_seventy_billion_model_on_one_h100_is_planned_in_4_bit_and_on_a_24_gb_card_is_refused():
    on_h100 = propose(LLAMA_70B, chat_data(5000), H100)
    assert choice(on_h100, "qlora") is True and on_h100.memory.fits and not on_h100.problems
    assert choice(on_h100, "lr") == 1e-4 and "large model" in on_h100.choices["lr"].reason
    on_4090 = propose(LLAMA_70B, chat_data(5000), RTX_4090)
    assert [p.code for p in on_4090.problems] == ["INPUT_RUN_WONT_FIT"]
    assert "smaller model" in on_4090.problems[0].hint or "--max-seq-length" in on_4090.problems[0].hint


@pytest.mark.parametrize(
    ("examples", "rank", "epochs"),
    [(120, 8, 3.0), (800, 16, 3.0), (5000, 16, 2.0), (120_000, 32, 1.0)],
)
def test_rank_and_passes_follow_the_dataset_size(examples, rank, epochs):
    plan = propose(QWEN_1_5B, chat_data(examples), H100)
    assert choice(plan, "lora_r") == rank and choice(plan, "lora_alpha") == 2 * rank
    assert choice(plan, "epochs") == epochs
    assert plan.steps is not None and plan.time is not None and plan.time.seconds > 0


def test_a_small_dataset_gets_a_smaller_effective_batch_so_an_epoch_has_enough_steps():
    plan = propose(QWEN_1_5B, chat_data(40, p50=60, longest=120), H100)
    effective = choice(plan, "batch_size") * choice(plan, "gradient_accumulation")
    assert effective < 16
    assert "at least 8 steps each" in plan.choices["gradient_accumulation"].reason


def test_several_gpus_share_the_effective_batch():
    two = Machine("cuda", "NVIDIA GeForce RTX 4090", 23 * GIB, 24 * GIB, gpus=2)
    plan = propose(QWEN_1_5B, chat_data(5000), two)
    assert choice(plan, "batch_size") * choice(plan, "gradient_accumulation") * 2 == 16
    assert "x 2 GPUs = an effective batch of 16" in plan.choices["gradient_accumulation"].reason


def test_fsdp_shards_the_frozen_weights_so_a_70b_model_trains_in_16_bit_on_eight_h100s():
    eight = Machine("cuda", "NVIDIA H100 80GB HBM3", 79 * GIB, 80 * GIB, gpus=8)
    ddp = propose(LLAMA_70B, chat_data(5000), eight)
    fsdp = propose(LLAMA_70B, chat_data(5000), eight, strategy="fsdp")
    assert choice(ddp, "qlora") is True  # whole 16-bit weights (131 GiB) on each GPU never fit
    assert choice(fsdp, "qlora") is False and fsdp.memory.weights == LLAMA_70B.params * 2 // 8
    assert "fsdp: each GPU holds 1/8 of the frozen weights" in fsdp.notes


def test_a_run_plans_for_the_gpus_it_will_use_not_every_gpu_the_machine_has(home, tiny_model_dir):
    from training.config import load_settings
    from training.plan import make_plan

    eight = Machine("cuda", "NVIDIA H100 80GB HBM3", 79 * GIB, 80 * GIB, gpus=8)
    one = make_plan(load_settings(model=str(tiny_model_dir)), None, machine=eight)  # nproc 1: one process, one GPU
    assert one.machine.gpus == 1 and not any("each GPU holds" in n for n in one.notes)
    every = load_settings(model=str(tiny_model_dir), distributed={"nproc": "auto", "strategy": "fsdp"})
    assert make_plan(every, None, machine=eight).machine.gpus == 8
    two_nodes = load_settings(model=str(tiny_model_dir), distributed={"nproc": 4, "nnodes": 2, "strategy": "fsdp"})
    planned = make_plan(two_nodes, None, machine=eight)
    assert planned.machine.gpus == 8 and "fsdp: each GPU holds 1/8 of the frozen weights" in planned.notes


def test_preference_methods_train_at_a_tenth_of_the_rate_and_a_pair_fills_two_sides_of_a_row():
    pairs = DataFacts(2000, tuple(range(100, 500, 2)) * 10, pairs=True)
    sft = propose(QWEN_1_5B, chat_data(2000), RTX_4090)
    dpo = propose(QWEN_1_5B, pairs, RTX_4090, method="dpo")
    assert choice(dpo, "lr") == pytest.approx(choice(sft, "lr") / 10)
    assert "DPO" in dpo.choices["lr"].reason
    assert "a side" in dpo.choices["max_seq_length"].reason
    assert f"({2 * choice(dpo, 'max_seq_length')} tokens a row)" in dpo.choices["batch_size"].reason


def test_on_a_cpu_there_is_no_qlora_and_the_runtime_counts():
    plan = propose(QWEN_1_5B, chat_data(500), LAPTOP)
    assert choice(plan, "qlora") is False and "QLoRA needs CUDA" in plan.choices["qlora"].reason
    assert plan.memory.runtime > 0 and plan.memory.weights == QWEN_1_5B.params * 4  # float32 on CPU
    assert plan.time.source.startswith("measured")
    refused = propose(QWEN_1_5B, chat_data(500), LAPTOP, given={"qlora": True})
    assert any("QLoRA (4-bit) needs an NVIDIA GPU" in p.message for p in refused.problems)


def test_a_models_tuned_defaults_win_over_the_rules_and_the_time_comes_from_the_table():
    preset = {"lr": 3e-3, "steps": 300, "batch_size": 2, "max_seq_length": 128}
    plan = propose(QWEN_1_5B, chat_data(40), H100, preset=preset)
    assert {k: choice(plan, k) for k in preset} == preset
    assert all(plan.choices[k].reason == "this model's tuned default" for k in preset)
    assert "epochs" not in plan.choices and plan.steps == 300
    assert plan.time.source == "assumed: 35% of an H100's bf16 peak"
    assert plan.time.tokens == 300 * 2 * choice(plan, "gradient_accumulation") * 128


# ------------------------------------------------------------------------------- the real command and train


@pytest.fixture
def chat_file(tmp_path):
    """60 conversations of growing length: a p95 the plan must cover."""
    rows = []
    for i in range(60):
        answer = " ".join(["Paris is the capital of France."] * (1 + i // 6))
        rows.append(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                             {"role": "assistant", "content": answer}]}))  # fmt: skip
    return write_lines(tmp_path / "chat.jsonl", rows)


def test_backprop_plan_measures_the_data_with_the_models_own_tokenizer(home, tiny_model_dir, chat_file):
    from training.datasets import load_dataset
    from training.models import ModelSource, load_tokenizer
    from training.packing import ChatEncoder

    out = backprop("plan", "--model", str(tiny_model_dir), "--data", str(chat_file), "--json", check=True)
    plan = json.loads(out.stdout)
    tokenizer = load_tokenizer(ModelSource("tiny", str(tiny_model_dir), True))
    encoder = ChatEncoder(tokenizer, 10**9, response_only=False)
    lengths = sorted(len(encoder(e)) for e in load_dataset(chat_file).examples)
    assert plan["data"]["examples"] == 60 and plan["data"]["max"] == lengths[-1]
    assert plan["data"]["p95"] == lengths[math.ceil(0.95 * 60) - 1]
    assert plan["choices"]["max_seq_length"]["value"] >= plan["data"]["p95"]
    assert plan["model"]["layers"] == 4 and plan["machine"]["device"] == "cpu"
    assert plan["memory"]["fits"] and plan["problems"] == []
    text = backprop("plan", "--model", str(tiny_model_dir), "--data", str(chat_file), "--batch-size", "3", check=True).stdout
    assert "batch_size              3           (yours) set by you" in text
    assert "max_seq_length" in text and "covers" in text and "memory    ~" in text and "time      ~" in text


def test_train_applies_the_plan_for_what_is_unset_and_records_it(home, tiny_model_dir, chat_file):
    out = backprop("train", "--model", str(tiny_model_dir), "--data", str(chat_file), "--steps", "2", "--lr", "0.001",
                   check=True)  # fmt: skip
    [spec_path] = list((home / "runs").glob("*/spec.json"))
    spec = json.loads(spec_path.read_text())
    plan, settings = spec["plan"], spec["settings"]
    assert plan["choices"]["lr"] == {"value": 0.001, "reason": "set by you", "given": True}
    assert plan["choices"]["steps"]["given"] is True
    for name, key in (("max_seq_length", "max_seq_length"), ("batch_size", "batch_size"),
                      ("gradient_accumulation", "gradient_accumulation")):  # fmt: skip
        assert settings["training"][key] == plan["choices"][name]["value"]
        assert not plan["choices"][name]["given"] and plan["choices"][name]["reason"]
    assert settings["lora"]["r"] == plan["choices"]["lora_r"]["value"] == 8  # 60 examples: a small adapter
    assert settings["training"]["learning_rate"] == 0.001
    # The command says what the plan chose, and why, before the progress bar (what the user set is not repeated).
    assert f"plan  max_seq_length {settings['training']['max_seq_length']}: covers" in out.stderr
    assert "lr 0.001" not in out.stderr and "GiB peak of" in out.stderr
    out = backprop("show-run", spec_path.parent.name, "--json", check=True)
    assert json.loads(out.stdout)["status"] == "completed"


def test_a_run_that_will_not_fit_is_refused_before_it_starts_and_no_plan_starts_it_anyway(home, chat_file, tmp_path):
    tight = tmp_path / "readings.json"
    tight.write_text(json.dumps({"ram_total": 400, "ram_available": 300}))  # MiB: less than the runtime alone
    env = {"BACKPROPAGATE_TELEMETRY_FILE": str(tight), "BACKPROPAGATE_MIN_FREE_RAM_GB": "0"}
    out = backprop("train", "--model", "demo", "--data", str(chat_file), "--steps", "1", env=env)
    assert out.returncode == 1 and "[INPUT_RUN_WONT_FIT]" in out.stderr and "of RAM is usable at most" in out.stderr
    assert "--no-plan" in out.stderr
    assert not list(home.glob("runs/*/spec.json"))  # no run was registered
    started = backprop("train", "--model", "demo", "--data", str(chat_file), "--steps", "1", "--no-plan", env=env)
    assert started.returncode == 0, started.stderr
    [spec_path] = list((home / "runs").glob("*/spec.json"))
    assert "plan" not in json.loads(spec_path.read_text())


def test_the_probe_measures_the_speed_with_ten_real_steps(home):
    out = backprop("plan", "--model", "demo", "--probe", "--json", check=True)
    plan = json.loads(out.stdout)
    assert plan["time"]["source"] == "measured: a 10-step probe run"
    assert plan["time"]["tokens_per_second"] > 0
    assert not list(home.glob("runs/*"))  # the probe keeps nothing
