"""Settings precedence: defaults < backprop.config.json < BACKPROPAGATE_* env < CLI flags."""

from __future__ import annotations

import json

import pytest

from training.config import load_settings, nest_options
from training.errors import BackpropError


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in list(__import__("os").environ):
        if key.startswith("BACKPROPAGATE_"):
            monkeypatch.delenv(key)
    return tmp_path


def test_each_layer_overrides_the_one_below(clean_env, monkeypatch):
    assert load_settings().lora.r == 16
    assert load_settings().model == "Qwen/Qwen2.5-0.5B-Instruct"

    (clean_env / "backprop.config.json").write_text(json.dumps({"lora": {"r": 8, "alpha": 4}, "training": {"seed": 1}}))
    settings = load_settings()
    assert (settings.lora.r, settings.lora.alpha, settings.training.seed) == (8, 4, 1)

    monkeypatch.setenv("BACKPROPAGATE_LORA__R", "32")
    settings = load_settings()
    assert (settings.lora.r, settings.lora.alpha) == (32, 4)  # env wins for r; the file still sets alpha

    settings = load_settings(**nest_options({"lora_r": 64, "lr": 1e-3, "seed": None}))
    assert (settings.lora.r, settings.lora.alpha, settings.training.learning_rate, settings.training.seed) == (64, 4, 1e-3, 1)


def test_config_file_path_can_be_set_by_env(clean_env, monkeypatch):
    other = clean_env / "elsewhere.json"
    other.write_text(json.dumps({"model": "demo"}))
    monkeypatch.setenv("BACKPROPAGATE_CONFIG", str(other))
    assert load_settings().model == "demo"


def test_bad_settings_are_coded_errors(clean_env, monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_LORA__R", "0")
    with pytest.raises(BackpropError) as caught:
        load_settings()
    assert caught.value.code == "CONFIG_INVALID" and "lora.r" in caught.value.message and caught.value.exit_code == 1
    monkeypatch.delenv("BACKPROPAGATE_LORA__R")

    monkeypatch.setenv("BACKPROPAGATE_LORA", "{not json")  # a section given whole must be JSON
    with pytest.raises(BackpropError) as caught:
        load_settings()
    assert caught.value.code == "CONFIG_INVALID" and "lora" in caught.value.message
    monkeypatch.delenv("BACKPROPAGATE_LORA")

    (clean_env / "backprop.config.json").write_text("{not json")
    with pytest.raises(BackpropError) as caught:
        load_settings()
    assert caught.value.code == "CONFIG_FILE_UNREADABLE"

    with pytest.raises(BackpropError) as caught:
        nest_options({"lora_rank": 4})
    assert caught.value.code == "INPUT_INVALID_ARGUMENT"
