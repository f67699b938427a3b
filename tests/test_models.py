"""Models: the built-in demo model is deterministic and self-healing; names resolve; ChatML is the fallback."""

from __future__ import annotations

import json

import pytest

from training.demo_model import build_demo_model, demo_model_path
from training.errors import BackpropError
from training.models import ALIASES, load_tokenizer, resolve_model


def test_the_demo_model_is_built_deterministically(tmp_path, tiny_model_dir):
    again = build_demo_model(tmp_path / "demo-v1")
    first = json.loads((tiny_model_dir / "manifest.json").read_text())["files"]
    second = json.loads((again / "manifest.json").read_text())["files"]
    assert first == second and "model.safetensors" in first and "tokenizer.json" in first


def test_a_damaged_demo_model_is_rebuilt(home):
    path = demo_model_path(home)
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # a torn download or a full disk
    assert demo_model_path(home) == path
    assert weights.read_bytes() == good


def test_model_names_resolve_to_demo_local_folders_and_hub_ids(home, tmp_path):
    assert resolve_model("demo", home).path == str(home / "models" / "demo-v1")
    local = resolve_model(str(home / "models" / "demo-v1"))
    assert local.is_local and local.path.endswith("demo-v1")
    assert resolve_model("qwen2.5-0.5b").path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert ALIASES["mistral-7b"] == "mistralai/Mistral-7B-Instruct-v0.3"
    hub = resolve_model("someone/their-model")
    assert not hub.is_local and hub.path == "someone/their-model"
    (tmp_path / "empty").mkdir()
    for bad in (str(tmp_path / "empty"), "not a model", "./missing"):
        with pytest.raises(BackpropError) as caught:
            resolve_model(bad)
        assert caught.value.code == "INPUT_MODEL_NOT_FOUND"


def test_a_tokenizer_without_a_chat_template_gets_chatml(home, tmp_path):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(home / "models" / "demo-v1")
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "plain")
    (tmp_path / "plain" / "chat_template.jinja").unlink(missing_ok=True)
    (tmp_path / "plain" / "config.json").write_text("{}")
    tokenizer = load_tokenizer(resolve_model(str(tmp_path / "plain")))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
