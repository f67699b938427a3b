"""The chat engine for real: a trained adapter, its merged model and its GGUF all stream the learned answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import DEMO_DATA

from training.errors import BackpropError
from training.generate import AdapterModel, GGUFModel, HFModel, _text_pieces, end_of_turn_ids, load_chat_model

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
UNLEARNED = [{"role": "user", "content": "Tell me a story about dragons."}]
ROWS = [json.loads(line)["messages"] for line in DEMO_DATA.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> SimpleNamespace:
    """A completed demo run in its own home: 100 steps learn every answer of the demo dataset (~10 s on 2 cores)."""
    from training.config import load_settings, nest_options
    from training.runs import Registry
    from training.trainer import new_train_run, run_training

    home = tmp_path_factory.mktemp("generate") / "home"
    shutil.copytree(tiny_model_dir, home / "models" / tiny_model_dir.name)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("BACKPROPAGATE_HOME", str(home))
        env.setenv("BACKPROPAGATE_MIN_FREE_RAM_GB", "0.25")
        env.chdir(home)  # no stray backprop.config.json from the checkout
        registry = Registry(home)
        settings = load_settings(**nest_options({"model": "demo", "steps": 100, "seed": 1}))
        run = new_train_run(registry, settings, str(DEMO_DATA))
        result = run_training(run, registry)
    assert result.status == "completed", result
    return SimpleNamespace(home=home, run_id=run.id, run_dir=result.run_dir, adapter=result.adapter_path)


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory) -> SimpleNamespace:
    """The trained adapter merged into its base (peft's merge_and_unload), as a model folder and as an f16 GGUF."""
    from training.gguf import convert

    adapter = AdapterModel(trained.adapter, trained.home)
    folder = tmp_path_factory.mktemp("merged") / "model"
    adapter.model.merge_and_unload().save_pretrained(folder)
    adapter.tokenizer.save_pretrained(folder)
    return SimpleNamespace(folder=folder, gguf=convert(folder, folder.parent / "exports" / "tuned-f16.gguf", "f16"))


@pytest.fixture(scope="module")
def demo_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    from training.gguf import convert

    return convert(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "demo-f16.gguf", "f16")


# --- streaming, stopping, greedy answers ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_adapter_streams_the_learned_answer_and_stops_at_end_of_turn(trained):
    model = load_chat_model(trained.run_id[:6], trained.home)
    assert isinstance(model, AdapterModel)
    pieces = list(model.stream(FRANCE, max_new_tokens=64))
    assert len(pieces) >= 5
    assert "".join(pieces) == model.reply(FRANCE, max_new_tokens=64) == "The capital of France is Paris."

    # It stopped at <|im_end|> by itself: far fewer tokens than allowed, and no special token in the text.
    im_end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.stop_ids
    for messages in ROWS[:5]:
        answer = model.reply(messages[:1], max_new_tokens=64)
        assert answer == messages[1]["content"]
        assert len(model.tokenizer.encode(answer)) < 20 and "<|" not in answer


@pytest.mark.slow
def test_the_merged_model_and_its_gguf_answer_like_the_adapter(trained, merged):
    adapter, hf, gguf = load_chat_model(trained.adapter), load_chat_model(merged.folder), load_chat_model(merged.gguf)
    assert isinstance(hf, HFModel) and not isinstance(hf, AdapterModel) and isinstance(gguf, GGUFModel)
    # The GGUF renders its embedded chat template to exactly the tokens transformers does.
    assert gguf.prompt_ids(FRANCE) == hf.prompt_ids(FRANCE) == adapter.prompt_ids(FRANCE)

    for messages in (ROWS[0], ROWS[7], ROWS[-1]):
        question, answer = messages[:1], messages[1]["content"]
        assert adapter.reply(question) == hf.reply(question) == gguf.reply(question) == answer
    gguf_pieces = list(gguf.stream(FRANCE))
    assert len(gguf_pieces) >= 5 and "".join(gguf_pieces) == "The capital of France is Paris."

    # A question it never saw: whatever it makes up, greedy decoding takes the same path token by token.
    hf_pieces, gguf_pieces = list(hf.stream(UNLEARNED, max_new_tokens=16)), list(gguf.stream(UNLEARNED, max_new_tokens=16))
    assert hf_pieces == gguf_pieces and len(hf_pieces) >= 3
    gguf.close()


def test_the_base_model_decodes_the_same_greedy_path_in_transformers_and_llama_cpp(tiny_model_dir, demo_gguf):
    hf, gguf = HFModel(tiny_model_dir), GGUFModel(demo_gguf)
    assert gguf.prompt_ids(FRANCE) == hf.prompt_ids(FRANCE)
    assert gguf.context_length == hf.context_length == 1024  # llama.cpp's context capped at the trained one
    hf_pieces, gguf_pieces = list(hf.stream(FRANCE, max_new_tokens=12)), list(gguf.stream(FRANCE, max_new_tokens=12))
    assert len(hf_pieces) >= 8 and hf_pieces[:8] == gguf_pieces[:8]
    assert "".join(gguf_pieces) == gguf.reply(FRANCE, max_new_tokens=12)
    # A reader that stops early ends the generation; the model is free for the next reply at once.
    for model in (hf, gguf):
        abandoned = model.stream(FRANCE, max_new_tokens=12)
        next(abandoned)
        abandoned.close()
        assert model.reply(FRANCE, max_new_tokens=12) == "".join(hf_pieces)
    with gguf:
        pass  # close() frees llama.cpp's context


def test_sampling_is_repeatable_with_a_seed(tiny_model_dir, demo_gguf):
    for model in (HFModel(tiny_model_dir), GGUFModel(demo_gguf)):
        first = model.reply(FRANCE, max_new_tokens=12, temperature=3.0, seed=7)
        assert model.reply(FRANCE, max_new_tokens=12, temperature=3.0, seed=7) == first
        others = {model.reply(FRANCE, max_new_tokens=12, temperature=3.0, top_p=0.9, seed=s) for s in range(3)}
        assert len(others | {first}) > 1, type(model).__name__  # sampling, not greedy
        model.close()


def test_the_stop_set_has_every_end_of_turn_id(tiny_model_dir):
    model = HFModel(tiny_model_dir)
    vocab = model.tokenizer.get_vocab()
    assert end_of_turn_ids(model.model, model.tokenizer) == {vocab["<|im_end|>"], vocab["<|endoftext|>"]}
    assert vocab["<|im_start|>"] not in model.stop_ids


def test_text_pieces_never_split_a_multibyte_character(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Grüße aus Zürich: 東京, Ελληνικά 🚀🙂!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = list(_text_pieces(iter(ids), tokenizer.decode))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert len(pieces) > 5


def test_bad_requests_fail_at_once_with_a_coded_error(tiny_model_dir):
    model = HFModel(tiny_model_dir)
    for kwargs in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(BackpropError) as e:
            model.stream(FRANCE, **kwargs)  # raises before the first piece is asked for
        assert e.value.code == "INPUT_INVALID_ARGUMENT", kwargs
    for messages in ([], [{"role": "user"}], ["hello"]):
        with pytest.raises(BackpropError, match="messages"):
            model.reply(messages)
    too_long = [{"role": "user", "content": "Paris " * 1500}]
    with pytest.raises(BackpropError, match="context holds 1024"):
        model.stream(too_long)
    # Near the end of the context the reply gets what is left instead of failing.
    nearly_full = [{"role": "user", "content": "Paris " * 1008}]
    assert 1016 <= len(model.prompt_ids(nearly_full)) < 1024
    assert len(list(model.stream(nearly_full, max_new_tokens=50))) <= 1024 - len(model.prompt_ids(nearly_full))


# --- load_chat_model ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_load_chat_model_resolves_runs_adapters_model_folders_and_gguf_files(trained, merged, demo_gguf, monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_HOME", str(trained.home))  # the default home comes from the settings
    checkpoint = sorted((trained.run_dir / "checkpoints").iterdir())[-1]
    kinds = {
        trained.run_id: AdapterModel,
        trained.run_id[:4]: AdapterModel,
        trained.run_dir: AdapterModel,
        str(trained.adapter): AdapterModel,
        checkpoint: AdapterModel,
        merged.folder: HFModel,
        "demo": HFModel,
        merged.gguf: GGUFModel,
        merged.gguf.parent: GGUFModel,  # a folder holding one .gguf file
    }
    for source, kind in kinds.items():
        model = load_chat_model(source)
        assert type(model) is kind, source
        model.close()

    # base=True gives the model the run was tuned from, for side-by-side comparisons.
    base = load_chat_model(trained.run_id, base=True)
    assert type(base) is HFModel and base.reply(FRANCE, max_new_tokens=8) != "The capital of France is Paris."
    with pytest.raises(BackpropError) as e:
        load_chat_model(merged.folder, base=True)
    assert e.value.code == "INPUT_INVALID_ARGUMENT"
    with pytest.raises(BackpropError) as e:
        load_chat_model("f" * 12)  # an id the registry does not hold
    assert e.value.code == "INPUT_MODEL_NOT_FOUND"


def test_missing_or_unknown_sources_raise_coded_errors(home, tmp_path, tiny_model_dir):
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    for source in (tmp_path / "missing", tmp_path / "missing.gguf", "missing.gguf", not_a_model, empty, "0badc0ffee"):
        with pytest.raises(BackpropError) as e:
            load_chat_model(source, home)
        assert e.value.code == "INPUT_MODEL_NOT_FOUND" and str(source) in e.value.message, source

    # A run folder whose run has not finished has no adapter to chat with yet.
    unfinished = tmp_path / "runs" / "abc123"
    unfinished.mkdir(parents=True)
    (unfinished / "spec.json").write_text("{}")
    with pytest.raises(BackpropError) as e:
        load_chat_model(unfinished, home)
    assert e.value.code == "STATE_NO_ADAPTER"

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all")
    with pytest.raises(BackpropError) as e:
        load_chat_model(broken, home)
    assert e.value.code == "DEP_MODEL_LOAD_FAILED"
