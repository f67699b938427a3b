"""Exports of a really trained run: adapter, merged (logits parity), GGUF loaded by llama.cpp, hub errors, chat."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
from conftest import DEMO_DATA, backprop

from training.errors import BackpropError
from training.export import export
from training.runs import Registry

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One demo run trained for real (in this process), shared by the tests of this module: (home, run id)."""
    from training.config import load_settings, nest_options
    from training.trainer import new_train_run, run_training

    home = tmp_path_factory.mktemp("export") / "home"
    shutil.copytree(tiny_model_dir, home / "models" / tiny_model_dir.name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BACKPROPAGATE_HOME", str(home))
        settings = load_settings(**nest_options({"model": "demo", "steps": 120, "save_every": 0, "validation_split": 0.1}))
        registry = Registry(home)
        run = new_train_run(registry, settings, str(DEMO_DATA), name="capitals")
        assert run_training(run, registry).status == "completed"
    return home, run.id


@pytest.fixture
def env(trained, monkeypatch, tmp_path):
    home, run_id = trained
    monkeypatch.setenv("BACKPROPAGATE_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return Registry(home), run_id


def test_lora_export_is_the_adapter_with_a_model_card(env):
    registry, run_id = env
    result = export(run_id, "lora")
    folder = Path(result.path)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in folder.iterdir()}
    run = registry.get(run_id)
    card = (folder / "README.md").read_text()
    for expected in ("`demo`", run.dataset_sha256, "capitals.jsonl", f"{run.final_loss:.4f}", f"{run.eval_loss:.4f}",
                     "learning_rate | 0.003", "export format | lora"):  # fmt: skip
        assert expected in card, expected
    recorded = registry.exports(run_id)[0]
    assert (recorded["format"], recorded["path"], recorded["size_bytes"]) == ("lora", str(folder), result.size_bytes)
    events = [json.loads(line) for line in (run.path / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events][-2:] == ["export_started", "exported"]


def test_merged_export_loads_with_transformers_and_predicts_what_the_adapter_does(env):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    registry, run_id = env
    result = export(run_id, "merged")
    check = result.verification
    assert check["ok"] and check["relative_logit_diff"] <= check["tolerance"] and check["greedy_positions"] > 0
    merged_dir = Path(result.path)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in merged.generation_config.eos_token_id
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(registry.home / "models" / "demo-v1"), registry.get(run_id).path / "adapter"
    ).eval()
    probe = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.allclose(merged(**probe).logits, adapter(**probe).logits, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["f16", "q8_0", "q4_k_m"])
def test_gguf_export_is_loaded_and_checked_by_llama_cpp(env, quantization):
    from llama_cpp import Llama

    registry, run_id = env
    out = backprop("export", run_id, "--format", "gguf", "--quantization", quantization, "--json", check=True)
    result = json.loads(out.stdout)
    gguf_file = Path(result["file"])
    assert gguf_file.name == f"capitals.{quantization}.gguf" and gguf_file.stat().st_size > 0
    v = result["verification"]
    assert v["ok"] and v["tokenizer_match"]
    if quantization in ("f16", "q8_0"):
        assert v["greedy_match"]
    llm = Llama(model_path=str(gguf_file), n_ctx=128, verbose=False)
    assert llm.tokenize(b"<|im_end|>", add_bos=False, special=True) == [llm.token_eos()]
    folder = gguf_file.parent
    modelfile = (folder / "Modelfile").read_text()
    assert f"FROM ./{gguf_file.name}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    card = (folder / "README.md").read_text()
    assert "ollama create" in card and "llama-cli -m" in card and quantization in card
    assert json.loads((folder / "verification.json").read_text())["ok"]
    assert any(e["format"] == "gguf" and e["quantization"] == quantization for e in registry.exports(run_id))


@pytest.mark.slow
def test_generate_answers_with_the_adapter_and_with_the_gguf(env):
    _, run_id = env
    adapter = backprop("generate", run_id, "What is the capital of France?", check=True).stdout.strip()
    assert adapter == "The capital of France is Paris."
    backprop("export", run_id, "--format", "gguf", "--quantization", "f16", check=True)
    gguf = backprop("generate", run_id, "What is the capital of France?", "--use", "gguf", check=True).stdout.strip()
    assert gguf == adapter


def test_a_failed_export_leaves_the_earlier_one_intact(env, tmp_path):
    registry, run_id = env
    first = export(run_id, "lora", output=tmp_path / "mine")
    before = {p.name: p.read_bytes() for p in Path(first.path).iterdir()}
    with pytest.raises(BackpropError) as error:
        export(run_id, "gguf", quantization="q3_imaginary", output=tmp_path / "mine")
    assert error.value.code == "INPUT_UNKNOWN_QUANTIZATION" and "q4_k_m" in error.value.hint
    # An unsupported architecture fails inside the conversion, after the staging folder exists.
    gpt2 = tmp_path / "gpt2"
    _save_tiny_gpt2(gpt2)
    with pytest.raises(BackpropError) as error:
        export(gpt2, "gguf", quantization="f16", output=tmp_path / "mine")
    assert error.value.code == "INPUT_UNSUPPORTED_ARCHITECTURE" and "GPT2LMHeadModel" in error.value.message
    assert {p.name: p.read_bytes() for p in Path(first.path).iterdir()} == before
    assert not list(tmp_path.glob("*.partial"))


def _save_tiny_gpt2(folder: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from training.demo_model import demo_model_path

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=1024)).save_pretrained(folder)
    PreTrainedTokenizerFast.from_pretrained(demo_model_path()).save_pretrained(folder)


def test_bad_export_inputs_give_coded_errors(env, tmp_path):
    unknown = backprop("export", "nosuchrun", "--format", "lora")
    assert unknown.returncode == 1 and "INPUT_RUN_NOT_FOUND" in unknown.stderr
    blocker = tmp_path / "a-file"  # a folder cannot be made inside a file, not even by root
    blocker.write_text("")
    unwritable = backprop("export", env[1], "--format", "lora", "--output", str(blocker / "out"))
    assert unwritable.returncode == 1 and "INPUT_OUTPUT_NOT_WRITABLE" in unwritable.stderr


def test_an_unfinished_run_has_no_adapter_to_export(home):
    registry = Registry(home)
    run = registry.create("train", {"params": {}}, model="demo")
    out = backprop("export", run.id, "--format", "merged")
    assert out.returncode == 2 and "STATE_NO_ADAPTER" in out.stderr


# ---------------------------------------------------------------------------- the hub


class _Unauthorized(http.server.BaseHTTPRequestHandler):
    """A stand-in hub that refuses every token, on loopback."""

    def _refuse(self) -> None:
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _refuse

    def log_message(self, *args: object) -> None:
        pass


def test_push_without_a_token_says_how_to_get_one(env, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = backprop("push", env[1], "--repo", "me/capitals", env={"HF_TOKEN": ""})
    assert out.returncode == 2 and "DEP_HUB_AUTH_FAILED" in out.stderr and "HF_TOKEN" in out.stderr


def test_push_with_a_rejected_token_is_an_auth_error_and_never_prints_the_token(env):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        token = "hf_" + "x" * 30
        hub = {"HF_TOKEN": token, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_OFFLINE": "0"}
        out = backprop("push", env[1], "--repo", "me/capitals", env=hub)
    finally:
        server.shutdown()
        server.server_close()
    assert out.returncode == 2 and "DEP_HUB_AUTH_FAILED" in out.stderr
    assert token not in out.stdout + out.stderr


def test_push_offline_fails_fast_with_a_clear_error(env, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("hf_" + "y" * 30)
    # conftest points the hub at a closed loopback port; the timeout guards against retry loops (a hang fails the test).
    args = ("push", env[1], "--repo", "me/capitals", "--token-file", str(token_file))
    out = backprop(*args, env={"HF_HUB_OFFLINE": "0"}, timeout=60)
    assert out.returncode == 2 and "DEP_HUB_UNREACHABLE" in out.stderr, out.stderr


@pytest.mark.slow
def test_export_with_ollama_registers_the_verified_gguf(env):
    from test_ollama import FakeOllama

    _, run_id = env
    with FakeOllama() as ollama:
        out = backprop("export", run_id, "--format", "gguf", "-q", "q8_0", "--ollama-name", "capitals", "--json",
                       env={"OLLAMA_HOST": ollama.host}, check=True)  # fmt: skip
    result = json.loads(out.stdout)
    assert result["ollama"]["method"] == "api" and result["ollama"]["name"] == "capitals"
    created = ollama.created[-1]
    assert created["model"] == "capitals" and created["files"] == {"capitals.q8_0.gguf": result["ollama"]["digest"]}
    assert "<|im_end|>" in created["parameters"]["stop"]
    assert ollama.blobs[result["ollama"]["digest"]] == Path(result["file"]).read_bytes()


def test_export_with_ollama_and_no_server_is_a_coded_error(env, tmp_path):
    out = backprop("export", env[1], "--format", "gguf", "-q", "f16", "--ollama", "--output", str(tmp_path / "g"),
                   env={"OLLAMA_HOST": "127.0.0.1:9", "PATH": str(tmp_path)})  # fmt: skip
    assert out.returncode == 2 and "DEP_OLLAMA_REGISTRATION_FAILED" in out.stderr and "ollama serve" in out.stderr


class _NotFound(_Unauthorized):
    """A stand-in hub that knows no repository."""

    def _refuse(self) -> None:
        body = json.dumps({"error": "Repository Not Found"}).encode()
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _refuse


def test_push_to_a_repository_that_does_not_exist_says_so(env):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        hub = {"HF_TOKEN": "hf_" + "z" * 30, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_OFFLINE": "0"}
        out = backprop("push", env[1], "--repo", "someone-else/capitals", env=hub)
    finally:
        server.shutdown()
        server.server_close()
    assert out.returncode == 1 and "INPUT_HUB_REPO_NOT_FOUND" in out.stderr and "someone-else/capitals" in out.stderr


def test_push_uploads_the_adapter_and_its_model_card_to_a_private_repository(env):
    """Through the stand-in hub (tests/fake_hub.py): create_repo, the preupload and commit API, and the LFS batch API
    for the safetensors. HF_HUB_DISABLE_XET: with hf_xet installed the client would send LFS files through Xet, which
    the stand-in does not speak; the commit is the same either way."""
    from fake_hub import FakeHub

    registry, run_id = env
    adapter = registry.get(run_id).path / "adapter"
    token = "hf_" + "p" * 30
    with FakeHub() as hub:
        online = {"HF_TOKEN": token, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
        out = backprop("push", run_id, "--repo", "me/tiny", "--private", "--json", env=online)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert (result["url"], result["private"]) == (f"{hub.endpoint}/me/tiny", True) and result["commit"]
    assert [(c["name"], c["organization"], c["visibility"]) for c in hub.created] == [("tiny", "me", "private")]
    files = hub.pushed["me/tiny"]
    assert files["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()  # as an LFS object
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"]
    card = files["README.md"].decode()
    assert registry.get(run_id).dataset_sha256 in card and "export format | lora" in card  # the model card
    assert hub.authorizations == {f"Bearer {token}"} and token not in out.stdout + out.stderr
    assert [c["summary"] for c in hub.commits] == ["Upload from Backprop"]


def test_the_library_exports_the_last_run(env, tmp_path):
    from training import Trainer

    result = Trainer().export("lora", run_id=env[1], output=tmp_path / "from-python")
    assert (tmp_path / "from-python" / "adapter_model.safetensors").exists() and result.format == "lora"


@pytest.mark.slow
def test_chat_keeps_a_conversation_in_the_terminal(env):
    import subprocess
    import sys

    chat = subprocess.run(
        [sys.executable, "-m", "training.cli", "chat", env[1]],
        input="What is the capital of France?\n/reset\nWhat is the capital of Japan?\n", capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert "The capital of France is Paris." in chat.stdout and "The capital of Japan is Tokyo." in chat.stdout
