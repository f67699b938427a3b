"""Models: the built-in demo model is deterministic and self-healing; names resolve; ChatML is the fallback."""

from __future__ import annotations

import json
import subprocess
import sys

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


@pytest.mark.slow
@pytest.mark.extra("export")
def test_a_model_without_chatml_tokens_gets_them_with_trained_embedding_rows_and_its_adapter_exports(home, plain_model_dir):
    """The ChatML tokens a tokenizer lacked get rows in a resized embedding and output head; those rows are trained
    (the model learns to end its turn), saved with the adapter, and the adapter reloads, chats and exports."""
    from conftest import DEMO_DATA
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from training import Trainer
    from training.export import export
    from training.generate import AdapterModel

    base_size = len(AutoTokenizer.from_pretrained(plain_model_dir))
    assert "<|im_end|>" not in AutoTokenizer.from_pretrained(plain_model_dir).get_vocab()
    result = Trainer(str(plain_model_dir)).train(DEMO_DATA, steps=200, lr=3e-3, batch_size=2, max_seq_length=128, save_every=100)
    assert result.status == "completed" and result.losses[-1] < 0.5 * result.losses[0]

    adapter = result.adapter_path
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    new = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert len(tokenizer) == base_size + 2 and sorted(new) == [base_size, base_size + 1]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": new, "lm_head": new}
    tensors = load_file(adapter / "adapter_model.safetensors")
    shapes = [tuple(t.shape) for name, t in tensors.items() if "trainable_tokens" in name]
    assert sorted(shapes) == [(2, 128), (2, 128)]  # just the new rows, not whole embedding matrices

    rows = [json.loads(line)["messages"] for line in DEMO_DATA.read_text().splitlines()[:10]]
    with AdapterModel(adapter, home) as chat:  # an exact answer also means the reply ended at <|im_end|>
        correct = sum(chat.reply(m[:1], max_new_tokens=40) == m[1]["content"] for m in rows)
    assert correct >= 8, f"{correct}/10 answers reproduced"

    merged = export(result.run_id, "merged", home=home)
    assert merged.verification["ok"]  # base + adapter and the merged model predict the same
    gguf = export(result.run_id, "gguf", quantization="f16", home=home)
    assert gguf.verification["ok"] and gguf.verification["tokenizer_match"] and gguf.verification["greedy_match"]


def test_threads_of_a_fresh_process_can_load_tokenizers_and_peft_at_once(home):
    """The web app plans, counts tokens, chats and exports on threads: the first tokenizers and peft classes of a
    process, asked for together, all load (transformers' lazy first import, asked for by two threads at once, failed
    one with ImportError; importing peft resolves transformers' names too, and failed beside a tokenizer's load)."""
    code = (
        "import threading\n"
        "from training.hf_imports import peft_class\n"
        "from training.models import load_tokenizer, resolve_model\n"
        "source, errors = resolve_model('demo'), []\n"
        "def load(what):\n"
        "    try:\n"
        "        load_tokenizer(source) if what == 'tokenizer' else peft_class('PeftModel')\n"
        "    except Exception as exc:\n"
        "        errors.append(repr(exc))\n"
        "threads = [threading.Thread(target=load, args=(w,)) for w in ('tokenizer', 'peft', 'tokenizer', 'peft')]\n"
        "for t in threads: t.start()\n"
        "for t in threads: t.join()\n"
        "print(errors)\n"
    )
    for _ in range(3):  # without the lock, three runs in four of this failed on a 2-core machine
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
