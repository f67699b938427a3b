"""Ollama: the Modelfile reproduces the model's chat template and stops at every end of turn; registration talks
HTTP to a real local server that behaves like Ollama's blob and create endpoints."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from fake_ollama import FakeOllama

from training.errors import BackpropError
from training.models import ModelSource, load_tokenizer
from training.ollama import (
    ChatPieces,
    ModelfileParts,
    chat_pieces,
    file_digest,
    go_template,
    modelfile,
    modelfile_parts,
    ollama_url,
    parse_modelfile,
    register,
    render_like_ollama,
)

# Chat templates in the style of well-known model families, written for these tests.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Mistral v0.1 style: no system role (the template raises), strict user/assistant alternation.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
# Qwen 2.5 style: a default system turn when the chat has none.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Mistral v0.3 style: the system prompt goes into the LAST user message, which no fixed pieces can express.
SYSTEM_IN_LAST_USER_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{% if loop.last and system is defined %}{{ '[INST] ' + system + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
)

SYSTEM = {"role": "system", "content": "You answer in one word."}
CHAT = [
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "Capital of Japan?"},
]
PREFILL = [*CHAT, {"role": "assistant", "content": "Tok"}]  # a final assistant message is continued


def hf_render(tokenizer, messages: list[dict]) -> str:
    """What transformers renders: a reply prompt after a user message, a continued final assistant message."""
    asks = messages[-1]["role"] == "user"
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=asks, continue_final_message=not asks)


def model_variant(base: Path, target: Path, template: str, specials: list[str], bos: str, eos: str, eos_ids: list[str]) -> Path:
    """A copy of the demo model folder (configs and tokenizer, no weights) with another chat template and special
    tokens; the tokenizer puts `bos` in front of every text, as Llama and Mistral tokenizers do."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    target.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(base / name, target / name)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"bos_token": bos, "eos_token": eos, "additional_special_tokens": specials})
    bos_id = tokenizer.convert_tokens_to_ids(bos)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    tokenizer.chat_template = template
    tokenizer.save_pretrained(target)
    generation = json.loads((target / "generation_config.json").read_text())
    generation["eos_token_id"] = [tokenizer.convert_tokens_to_ids(t) for t in eos_ids]
    (target / "generation_config.json").write_text(json.dumps(generation))
    return target


def tokenizer_of(model_dir: Path):
    return load_tokenizer(ModelSource(str(model_dir), str(model_dir), True))


# --- the Modelfile of the demo model (ChatML) -----------------------------------------------------------------------


def test_demo_modelfile_has_source_template_stops_context_and_system(tiny_model_dir, tmp_path):
    gguf = tmp_path / "demo.gguf"
    text = modelfile(gguf, tiny_model_dir, system="You answer in one word.")
    lines = text.splitlines()
    assert lines[0] == f"FROM {gguf.resolve()}"
    assert lines[1].startswith('TEMPLATE """') and "{{range $i, $_ := .Messages}}" in text
    assert 'PARAMETER stop "<|im_end|>"' in lines  # the template's end of turn
    assert 'PARAMETER stop "<|endoftext|>"' in lines  # the second eos of generation_config.json
    assert "PARAMETER num_ctx 1024" in lines  # the demo model's max_position_embeddings, under the 4096 cap
    assert lines[-1] == 'SYSTEM """You answer in one word."""'

    shorter = modelfile(gguf, tiny_model_dir, num_ctx=512)
    assert "PARAMETER num_ctx 512" in shorter.splitlines() and "SYSTEM" not in shorter


def test_modelfile_text_reads_back_as_ollama_reads_it(tiny_model_dir, tmp_path):
    parts = modelfile_parts(tmp_path / "my model.gguf", tiny_model_dir, system="Line one.\n  Line two, indented. ")
    assert parse_modelfile(parts.text()) == parts
    assert parts.api_parameters() == {"stop": ["<|im_end|>", "<|endoftext|>"], "num_ctx": 1024}

    tricky = ModelfileParts(" /odd path.gguf", template='{{ .Content }} "quoted"\n', system='"', parameters=(("stop", "a b"),))
    assert parse_modelfile(tricky.text()) == tricky
    with pytest.raises(BackpropError) as err:
        ModelfileParts("/m.gguf", system='say """ here').text()
    assert err.value.code == "INPUT_INVALID_ARGUMENT"


def test_chatml_pieces_reproduce_transformers_exactly(tiny_model_dir):
    tokenizer = tokenizer_of(tiny_model_dir)
    pieces = chat_pieces(tokenizer)
    assert pieces is not None and pieces.system == "turn" and pieces.bos == ""
    for messages in ([SYSTEM, *CHAT], CHAT, CHAT[:1], [SYSTEM, *PREFILL], PREFILL):
        assert render_like_ollama(pieces, messages) == hf_render(tokenizer, messages)
    # Ollama puts the Modelfile's SYSTEM first when the chat has none.
    assert render_like_ollama(pieces, CHAT, system=SYSTEM["content"]) == hf_render(tokenizer, [SYSTEM, *CHAT])
    assert render_like_ollama(pieces, [SYSTEM, *CHAT], system="ignored") == hf_render(tokenizer, [SYSTEM, *CHAT])


# --- other chat formats ------------------------------------------------------------------------------------------------


def test_llama3_style_template_without_the_bos_ollama_adds_itself(tiny_model_dir, tmp_path):
    specials = ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    folder = model_variant(tiny_model_dir, tmp_path / "llama3", LLAMA3_TEMPLATE, specials, bos="<|begin_of_text|>",
                           eos="<|eot_id|>", eos_ids=["<|end_of_text|>", "<|eot_id|>"])  # fmt: skip
    tokenizer = tokenizer_of(folder)
    pieces = chat_pieces(tokenizer)
    assert pieces is not None and pieces.system == "turn"
    assert pieces.bos == "<|begin_of_text|>"  # the tokenizer adds it, and so will Ollama's
    for messages in ([SYSTEM, *CHAT], CHAT, [SYSTEM, *PREFILL], PREFILL):
        assert render_like_ollama(pieces, messages) == hf_render(tokenizer, messages)

    lines = modelfile(tmp_path / "llama3.gguf", folder).splitlines()
    assert {'PARAMETER stop "<|eot_id|>"', 'PARAMETER stop "<|end_of_text|>"'} <= set(lines)
    assert "<|begin_of_text|>" not in "\n".join(lines)  # no double BOS
    assert "PARAMETER num_ctx 1024" in lines


def test_mistral_style_template_gets_the_system_prompt_in_the_first_user_message(tiny_model_dir, tmp_path):
    folder = model_variant(tiny_model_dir, tmp_path / "mistral", MISTRAL_TEMPLATE, [], bos="<s>", eos="</s>",
                           eos_ids=["</s>"])  # fmt: skip
    tokenizer = tokenizer_of(folder)
    pieces = chat_pieces(tokenizer)
    assert pieces is not None and pieces.system == "folded" and pieces.bos == "<s>"
    for messages in (CHAT, PREFILL):
        assert render_like_ollama(pieces, messages) == hf_render(tokenizer, messages)
    folded = [{"role": "user", "content": f"{SYSTEM['content']}\n\n{CHAT[0]['content']}"}, *CHAT[1:]]
    assert render_like_ollama(pieces, [SYSTEM, *CHAT]) == hf_render(tokenizer, folded)
    assert render_like_ollama(pieces, CHAT) == "<s>[INST] Capital of France? [/INST]Paris</s>[INST] Capital of Japan? [/INST]"

    text = modelfile(tmp_path / "mistral.gguf", folder)
    assert 'PARAMETER stop "</s>"' in text.splitlines()
    assert "<s>" not in text.replace("</s>", "")


def test_default_system_turn_is_kept_when_the_chat_has_none(tiny_model_dir):
    tokenizer = tokenizer_of(tiny_model_dir)
    tokenizer.chat_template = DEFAULT_SYSTEM_TEMPLATE
    pieces = chat_pieces(tokenizer)
    assert pieces is not None
    assert pieces.openings[("", "user")].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    for messages in ([SYSTEM, *CHAT], CHAT, PREFILL):
        assert render_like_ollama(pieces, messages) == hf_render(tokenizer, messages)


def test_a_template_the_pieces_cannot_express_gets_no_template_but_all_stops(tiny_model_dir, tmp_path, caplog):
    tokenizer = tokenizer_of(tiny_model_dir)
    tokenizer.chat_template = SYSTEM_IN_LAST_USER_TEMPLATE
    assert chat_pieces(tokenizer) is None

    folder = tmp_path / "odd"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").write_text(SYSTEM_IN_LAST_USER_TEMPLATE)
    with caplog.at_level("WARNING", logger="training.ollama"):
        text = modelfile(tmp_path / "odd.gguf", folder)
    assert "TEMPLATE" not in text and "cannot be expressed" in caplog.text
    assert 'PARAMETER stop "<|im_end|>"' in text.splitlines()


def test_go_template_writes_braces_in_the_text_as_actions():
    pieces = ChatPieces(
        {("", "user"): "{{user}}: ", ("user", "assistant"): "\n", ("assistant", "user"): "\n{{user}}: "}, generation="\n"
    )
    template = go_template(pieces)
    assert '{{"{{"}}user}}: ' in template and "{{user}}" not in template.replace('{{"{{"}}user}}', "")
    assert render_like_ollama(pieces, CHAT) == "{{user}}: Capital of France?\nParis\n{{user}}: Capital of Japan?\n"


# --- registration ----------------------------------------------------------------------------------------------------


@pytest.fixture
def ollama():
    with FakeOllama() as server:
        yield server


@pytest.fixture
def fake_gguf(tmp_path) -> Path:
    """Registration is transport: the server does not parse the file. 3 MiB, so the upload takes several blocks."""
    path = tmp_path / "export" / "demo.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + os.urandom(3 * 1024 * 1024))
    return path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_register_uploads_the_blob_once_then_creates_the_model(ollama, fake_gguf, tiny_model_dir):
    parts = modelfile_parts(fake_gguf, tiny_model_dir)
    result = register(fake_gguf, parts.text(), "backprop-demo:latest", host=ollama.host)

    digest = f"sha256:{hashlib.sha256(fake_gguf.read_bytes()).hexdigest()}"
    assert result["method"] == "api" and result["name"] == "backprop-demo:latest" and result["digest"] == digest
    assert result["uploaded"] is True and result["version"] == "0.12.6"
    blob = f"/api/blobs/{digest}"
    assert ollama.requests == [("GET", "/api/version"), ("HEAD", blob), ("POST", blob), ("POST", "/api/create")]
    assert ollama.blobs[digest] == fake_gguf.read_bytes()
    assert ollama.created[0] == {
        "model": "backprop-demo:latest",
        "files": {"demo.gguf": digest},
        "template": parts.template,
        "parameters": {"stop": ["<|im_end|>", "<|endoftext|>"], "num_ctx": 1024},
        "stream": False,
    }

    again = register(fake_gguf, parts, "backprop-demo:v2", host=f"http://{ollama.host}")
    assert again["uploaded"] is False  # HEAD said the server has it
    assert ollama.requests[4:] == [("GET", "/api/version"), ("HEAD", blob), ("POST", "/api/create")]


def test_register_reads_ollama_host_and_sends_the_system_prompt(ollama, fake_gguf, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", f"http://{ollama.host}")
    parts = modelfile_parts(fake_gguf, tiny_model_dir, system="You answer in one word.")
    assert register(fake_gguf, parts, "demo")["host"] == f"http://{ollama.host}"
    assert ollama.created[0]["system"] == "You answer in one word."


def test_an_error_from_the_server_is_reported_with_its_message(ollama, fake_gguf, tiny_model_dir):
    ollama.create_error = "invalid template: unexpected EOF"
    with pytest.raises(BackpropError) as err:
        register(fake_gguf, modelfile(fake_gguf, tiny_model_dir), "demo", host=ollama.host)
    assert err.value.code == "DEP_OLLAMA_REGISTRATION_FAILED"
    assert "invalid template: unexpected EOF" in err.value.message and ollama.host in err.value.message


def test_no_server_and_no_ollama_command_fails_fast(fake_gguf, tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    host = f"127.0.0.1:{closed_port()}"
    with pytest.raises(BackpropError) as err:  # a refused connection is an answer: no retry loop, no long timeout
        register(fake_gguf, modelfile(fake_gguf, tiny_model_dir), "demo", host=host)
    assert err.value.code == "DEP_OLLAMA_REGISTRATION_FAILED" and host in err.value.message
    assert "no `ollama` command" in err.value.message and err.value.retryable


def write_fake_ollama(folder: Path, script: str) -> None:
    folder.mkdir()
    (folder / "ollama").write_text("#!/bin/sh\n" + script)
    (folder / "ollama").chmod(0o755)


def test_no_server_falls_back_to_the_ollama_command(fake_gguf, tiny_model_dir, tmp_path, monkeypatch):
    log = tmp_path / "ollama.log"
    write_fake_ollama(tmp_path / "bin", f'printf "%s\\n" "$*" "$OLLAMA_HOST" > {log}\n/bin/cat "$4" >> {log}\n')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    host = f"127.0.0.1:{closed_port()}"
    text = modelfile(fake_gguf, tiny_model_dir)

    result = register(fake_gguf, text, "demo", host=host)
    written = fake_gguf.parent / "Modelfile"
    assert result == {"method": "cli", "name": "demo", "digest": file_digest(fake_gguf), "host": f"http://{host}",
                      "modelfile": str(written)}  # fmt: skip
    assert written.read_text() == text
    assert log.read_text() == f"create demo -f {written}\nhttp://{host}\n{text}"


def test_a_failing_ollama_command_is_reported(fake_gguf, tiny_model_dir, tmp_path, monkeypatch):
    write_fake_ollama(tmp_path / "bin", 'echo "Error: could not connect to ollama app, is it running?" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(BackpropError) as err:
        register(fake_gguf, modelfile(fake_gguf, tiny_model_dir), "demo", host=f"127.0.0.1:{closed_port()}")
    assert err.value.code == "DEP_OLLAMA_REGISTRATION_FAILED"
    assert "exited 1: Error: could not connect to ollama app" in err.value.message


def test_bad_names_and_hosts_are_input_errors(fake_gguf, tiny_model_dir):
    text = modelfile(fake_gguf, tiny_model_dir)
    for bad in ("-rm", "a b", "name:", ""):
        with pytest.raises(BackpropError) as err:
            register(fake_gguf, text, bad, host="127.0.0.1:9")
        assert err.value.code == "INPUT_INVALID_ARGUMENT"
    with pytest.raises(BackpropError) as err:
        ollama_url("127.0.0.1:port")
    assert err.value.code == "INPUT_INVALID_ARGUMENT"


@pytest.mark.parametrize(
    "value, url",
    [
        (None, "http://127.0.0.1:11434"),
        ("localhost", "http://localhost:11434"),
        ("0.0.0.0:8080", "http://0.0.0.0:8080"),
        ("http://gpu-box:11434/", "http://gpu-box:11434"),
        ("https://ollama.example", "https://ollama.example:443"),
        ("[::1]:11434", "http://[::1]:11434"),
    ],
)
def test_ollama_host_is_read_like_the_ollama_cli(value, url, monkeypatch):
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert ollama_url(value) == url
