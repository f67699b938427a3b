"""Ollama: a Modelfile for an exported GGUF, and registering the model with an Ollama server.

`modelfile()` writes what Ollama needs to chat with a fine-tuned model the way it was trained:
- TEMPLATE: the model's own Jinja chat template, turned into Ollama's Go template syntax. We render the Jinja
  template with probe messages, cut the text around them into pieces (the text that opens a message, given the
  role before it, and the text that asks for the assistant's reply) and emit a Go template that puts the same
  pieces around each message. `render_like_ollama()` renders a chat from the same pieces, so checking it against
  transformers' rendering checks the Go template too. A template the pieces cannot reproduce gets no TEMPLATE:
  Ollama then picks one from the chat template inside the GGUF.
- PARAMETER stop: every end-of-turn token. A missing one is the classic bug of fine-tuned models in Ollama: the
  model answers, then goes on writing the user's next turn.
- PARAMETER num_ctx, and SYSTEM when given.

`register()` talks to the Ollama HTTP API (`OLLAMA_HOST`, default 127.0.0.1:11434) with the standard library only:
upload the GGUF as a blob unless the server has it, then create the model from it. With no server to reach but an
`ollama` binary on PATH, it runs `ollama create` instead.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from training.atomic import write_text
from training.errors import BackpropError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1:11434"
DEFAULT_PORT = 11434
MAX_DEFAULT_NUM_CTX = 4096  # Ollama allocates the KV cache for num_ctx up front: a 32k default would eat the RAM
# Tokens that end a turn in the common chat formats (ChatML, Llama 3, Phi-3, Gemma, Llama 2/Mistral, GPT-2 style).
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>", "<|end_of_text|>",
)  # fmt: skip

CONNECT_TIMEOUT_S = 2.0  # a refused connection fails at once; this bounds a host that does not answer at all
REQUEST_TIMEOUT_S = 30.0  # version probe and blob check
TRANSFER_TIMEOUT_S = 600.0  # per socket operation while uploading, and for the create call (it reads the whole GGUF)
CLI_TIMEOUT_S = 1800.0  # `ollama create` hashes, uploads and checks the GGUF itself
HASH_CHUNK = 1 << 20
# Ollama model names: [namespace/]model[:tag]. Also keeps a name from reading as an option to `ollama create`.
_MODEL_NAME = re.compile(
    r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,79})*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,79})?"
)

# --- the Modelfile --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelfileParts:
    """A Modelfile as data: what both `ollama create -f` (as text) and POST /api/create (as JSON) need."""

    source: str  # FROM: the GGUF file
    template: str | None = None  # None: Ollama picks a template from the chat template inside the GGUF
    system: str | None = None
    parameters: tuple[tuple[str, str], ...] = ()  # (name, value) in Modelfile order; `stop` repeats

    def text(self) -> str:
        lines = [f"FROM {_quote(self.source) if _needs_quotes(self.source) else self.source}"]
        if self.template is not None:
            lines.append(f"TEMPLATE {_quote(self.template, triple=True)}")
        lines += [f"PARAMETER {name} {_quote(value) if name == 'stop' else value}" for name, value in self.parameters]
        if self.system:
            lines.append(f"SYSTEM {_quote(self.system, triple=True)}")
        return "\n".join(lines) + "\n"

    def api_parameters(self) -> dict[str, Any]:
        """The `parameters` of POST /api/create: stop is a list, numbers are numbers (Ollama checks the types)."""
        params: dict[str, Any] = {}
        for name, value in self.parameters:
            if name == "stop":
                params.setdefault("stop", []).append(value)
            else:
                params[name] = _typed(value)
        return params


def modelfile(gguf_path: Path, model_dir: Path, *, num_ctx: int | None = None, system: str | None = None) -> str:
    """The Modelfile text for `gguf_path`, exported from the HF model folder `model_dir`."""
    return modelfile_parts(gguf_path, model_dir, num_ctx=num_ctx, system=system).text()


def modelfile_parts(gguf_path: Path, model_dir: Path, *, num_ctx: int | None = None, system: str | None = None) -> ModelfileParts:
    from training.models import ModelSource, load_tokenizer

    model_dir = Path(model_dir)
    if num_ctx is not None and (not isinstance(num_ctx, int) or num_ctx < 1):
        raise _invalid(f"num_ctx must be a positive integer, not {num_ctx!r}", "Give the context length in tokens, e.g. 4096.")
    # The same tokenizer (and the same ChatML fallback) that training used, so the template is the trained one.
    tokenizer = load_tokenizer(ModelSource(str(model_dir), str(model_dir), True))
    pieces = chat_pieces(tokenizer)
    if pieces is None:
        log.warning("The chat template of %s cannot be expressed as an Ollama template; the Modelfile has no "
                    "TEMPLATE, so Ollama picks one from the chat template inside the GGUF", model_dir)  # fmt: skip
    parameters = [("stop", token) for token in stop_tokens(model_dir, tokenizer, pieces)]
    parameters.append(("num_ctx", str(num_ctx or default_num_ctx(model_dir))))
    return ModelfileParts(
        source=str(Path(gguf_path).resolve()),
        template=go_template(pieces) if pieces else None,
        system=system or None,
        parameters=tuple(parameters),
    )


def parse_modelfile(text: str) -> ModelfileParts:
    """Read back a Modelfile (FROM, TEMPLATE, SYSTEM, PARAMETER), quoting as Ollama's own parser does."""
    fields: dict[str, str] = {}
    parameters: list[tuple[str, str]] = []
    pending: tuple[str, str] | None = None  # a quoted value still open at the end of a line
    for line in text.splitlines():
        if pending is None:
            if not line.strip() or line.strip().startswith("#"):
                continue
            match = re.match(r"(\w+)[ \t]+(.*)", line.lstrip())
            if match is None:
                raise _invalid(f"cannot read the Modelfile line '{line.strip()}'", "Each line is COMMAND VALUE.")
            pending = (match[1].lower(), match[2])
        else:
            pending = (pending[0], pending[1] + "\n" + line)
        command, value = pending
        if command == "parameter":
            name, _, value = value.lstrip().partition(" ")
            command = f"parameter {name}"
        unquoted = _unquote(value.strip())
        if unquoted is None:
            continue  # a """ value goes on over the next lines
        pending = None
        if command.startswith("parameter "):
            parameters.append((command.split(" ", 1)[1], unquoted))
        elif command in ("from", "template", "system"):
            fields[command] = unquoted
        else:
            raise _invalid(f"the Modelfile command {command.upper()} is not supported here",
                           "Use FROM, TEMPLATE, SYSTEM and PARAMETER.")  # fmt: skip
    if pending is not None:
        raise _invalid(f"the Modelfile's {pending[0].upper()} value has no closing quote", 'Close it with """.')
    if "from" not in fields:
        raise _invalid("the Modelfile has no FROM line", "Start it with FROM /path/to/model.gguf.")
    return ModelfileParts(fields["from"], fields.get("template"), fields.get("system"), tuple(parameters))


def default_num_ctx(model_dir: Path) -> int:
    config = _read_json(Path(model_dir) / "config.json")
    trained = config.get("max_position_embeddings") or config.get("n_positions") or MAX_DEFAULT_NUM_CTX
    return min(int(trained), MAX_DEFAULT_NUM_CTX)


def stop_tokens(model_dir: Path, tokenizer: Any, pieces: ChatPieces | None = None) -> list[str]:
    """Every token that ends a turn: the eos tokens of the model, the template's own and the well-known ones."""
    model_dir = Path(model_dir)
    eos_ids = [
        *_as_list(_read_json(model_dir / "generation_config.json").get("eos_token_id")),
        *_as_list(_read_json(model_dir / "config.json").get("eos_token_id")),
    ]
    candidates = [_token_text(tokenizer, i) for i in eos_ids]
    candidates.append(tokenizer.eos_token)  # tokenizer_config.json's
    if pieces is not None:
        # The first special token after an assistant's reply is how this template ends a turn, whatever its name.
        candidates.append(_first_special_token(pieces.openings.get(("assistant", "user"), ""), tokenizer))
    vocab = tokenizer.get_vocab()
    candidates += [token for token in END_OF_TURN_TOKENS if token in vocab]
    return list(dict.fromkeys(token for token in candidates if token))


# --- the chat template, cut into pieces -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatPieces:
    """A chat template as literal text around the messages.

    A chat renders as: bos, then for each message the opening for (previous role, role) and the content, then
    after a final user message the generation text (the end of the user's turn and the start of the reply).
    A final assistant message stays open, so Ollama continues it (transformers' continue_final_message).
    """

    openings: dict[tuple[str, str], str]  # (previous role, "" for the first message; role) -> text before the content
    generation: str
    bos: str = ""  # the BOS text the tokenizer adds by itself; Ollama adds it too, so the Go template leaves it out
    system: str = "turn"  # "turn": its own turn; "folded": put before the first user message; "dropped": ignored


def chat_pieces(tokenizer: Any) -> ChatPieces | None:
    """Cut the tokenizer's chat template into pieces; None when the pieces cannot reproduce it exactly."""
    render = _renderer(tokenizer)
    bos = _added_bos(tokenizer)
    u1, a1, u2, a2 = _probe("user", 1), _probe("assistant", 1), _probe("user", 2), _probe("assistant", 2)
    try:
        turns = _cut(render([u1, a1, u2, a2]), [u1, a1, u2, a2], bos)
        ask = _cut(render([u1, a1, u2], generation=True), [u1, a1, u2], bos)
        if bos and not render([u1]).startswith(bos):
            bos = ""  # the template does not write the BOS text: nothing to leave out
    except Exception as exc:  # a template that cannot render a plain user/assistant chat
        log.debug("chat template failed on a plain chat: %s", exc)
        return None
    if turns is None or ask is None or turns[1] != turns[3]:
        return None
    openings = {("", "user"): turns[0], ("user", "assistant"): turns[1], ("assistant", "user"): turns[2]}
    system = _system_openings(render, openings[("", "user")], bos)
    if system is None:
        return None
    mode, system_openings = system
    pieces = ChatPieces({**system_openings, **openings}, generation=ask[3], bos=bos, system=mode)
    return pieces if _reproduces(pieces, render) else None


def _system_openings(render: Callable[..., str], first_user: str, bos: str) -> tuple[str, dict[tuple[str, str], str]] | None:
    s, u1, a1 = _probe("system", 1), _probe("user", 1), _probe("assistant", 1)
    try:
        text = render([s, u1, a1])
    except Exception:  # the template refuses a system turn: put the system text in front of the first user message
        return "folded", {("", "system"): first_user, ("system", "user"): "\n\n"}
    if s["content"] not in text:
        return "dropped", {("", "system"): "", ("system", "user"): first_user}
    cut = _cut(text, [s, u1, a1], bos)
    return None if cut is None else ("turn", {("", "system"): cut[0], ("system", "user"): cut[1]})


def render_like_ollama(pieces: ChatPieces, messages: list[dict[str, str]], system: str | None = None) -> str:
    """The prompt text Ollama builds for `messages` with the Go template from `go_template(pieces)`, BOS included.

    Like Ollama: the Modelfile's SYSTEM goes first when the chat has no system message, and consecutive
    messages of one role are joined with a blank line.
    """
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    messages = _collate(messages)
    out, previous = [pieces.bos], ""
    for n, message in enumerate(messages):
        out += [pieces.openings.get((previous, message["role"]), ""), message["content"]]
        if n == len(messages) - 1 and message["role"] == "user":
            out.append(pieces.generation)
        previous = message["role"]
    return "".join(out)


def go_template(pieces: ChatPieces) -> str:
    """Ollama's TEMPLATE (Go text/template) doing what `render_like_ollama` does. One line: Go's whitespace
    trimming ({{- -}}) would also eat the newlines inside the pieces."""
    branches = "".join(
        _action(f'{"if" if n == 0 else "else if"} and (eq $prev "{previous}") (eq .Role "{role}")') + _literal(text)
        for n, ((previous, role), text) in enumerate(pieces.openings.items())
    )
    return "".join([
        _action('$prev := ""'),
        _action("range $i, $_ := .Messages"),
        _action("$last := eq (len (slice $.Messages $i)) 1"),
        branches, _action("end"),
        _action(".Content"),
        _action('if and $last (eq .Role "user")'), _literal(pieces.generation), _action("end"),
        _action("$prev = .Role"),
        _action("end"),
    ])  # fmt: skip


# Probe chats: the pieces must reproduce transformers' rendering of each, or we emit no TEMPLATE.
_PROBES: list[tuple[list[tuple[str, str]], bool]] = [  # ((role, content) messages, asks for a reply)
    ([("user", "What is the capital of France?")], True),
    ([("system", "Answer briefly."), ("user", "What is the capital of France?")], True),
    ([("user", "Capital of France?"), ("assistant", "Paris."), ("user", "And of Italy?")], True),
    ([("system", "Be brief."), ("user", "France?"), ("assistant", "Paris."), ("user", "Italy?"), ("assistant", "Rome."),
      ("user", "Spain?")], True),
    ([("user", "Capital of France?"), ("assistant", "The capital is")], False),
    ([("system", "Be brief."), ("user", "France?"), ("assistant", "Paris."), ("user", "Italy?"), ("assistant", "Ro")],
     False),
]  # fmt: skip


def _reproduces(pieces: ChatPieces, render: Callable[..., str]) -> bool:
    for probe, asks in _PROBES:
        messages = [{"role": role, "content": content} for role, content in probe]
        try:
            expected = render(_as_template_sees(pieces, messages), generation=asks, continue_final=not asks)
        except Exception as exc:
            log.debug("chat template failed on a probe chat: %s", exc)
            return False
        if render_like_ollama(pieces, messages) != expected:
            log.debug("pieces do not reproduce the chat template:\n%r\n%r", render_like_ollama(pieces, messages), expected)
            return False
    return True


def _as_template_sees(pieces: ChatPieces, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The chat as the HF template would get it when system messages are folded into the first user one or dropped."""
    if pieces.system == "turn" or messages[0]["role"] != "system":
        return messages
    system, first, *rest = messages
    if pieces.system == "dropped":
        return [first, *rest]
    return [{"role": "user", "content": system["content"] + "\n\n" + first["content"]}, *rest]


def _renderer(tokenizer: Any) -> Callable[..., str]:
    def render(messages: list[dict[str, str]], *, generation: bool = False, continue_final: bool = False) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation, continue_final_message=continue_final
        )

    return render


def _probe(role: str, n: int) -> dict[str, str]:
    # Plain letters and digits: nothing a template would trim or escape, and text no template contains.
    return {"role": role, "content": f"PROBE{role.upper()}{n}X"}


def _cut(text: str, messages: list[dict[str, str]], bos: str) -> list[str] | None:
    """The text before, between and after the messages' contents, the BOS text left out; None if out of order."""
    text = text.removeprefix(bos) if bos else text
    pieces, start = [], 0
    for message in messages:
        at = text.find(message["content"], start)
        if at < 0:
            return None
        pieces.append(text[start:at])
        start = at + len(message["content"])
    return [*pieces, text[start:]]


def _added_bos(tokenizer: Any) -> str:
    """The BOS token's text when the tokenizer puts it in front of every text by itself (then the GGUF says so too)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return ""
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token if ids and ids[0] == bos_id else ""


def _collate(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for message in messages:
        if out and out[-1]["role"] == message["role"]:
            out[-1] = {"role": message["role"], "content": out[-1]["content"] + "\n\n" + message["content"]}
        else:
            out.append({"role": message["role"], "content": message["content"]})
    return out


def _action(code: str) -> str:
    return "{{" + code + "}}"


def _literal(text: str) -> str:
    """Text for a Go template: only "{{" would start an action, so it is written as an action printing it."""
    return text.replace("{{", '{{"{{"}}')


def _first_special_token(text: str, tokenizer: Any) -> str | None:
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content in text]
    return min(specials, key=text.find, default=None)


def _token_text(tokenizer: Any, token_id: Any) -> str | None:
    if not isinstance(token_id, int) or not 0 <= token_id < len(tokenizer):
        return None
    return tokenizer.convert_ids_to_tokens(token_id)


# --- Modelfile quoting, as Ollama's parser reads it: no escapes; a value ends at the line end where its quotes close -


def _needs_quotes(value: str) -> bool:
    return value == "" or value != value.strip() or "\n" in value or value.startswith('"')


def _quote(value: str, *, triple: bool = False) -> str:
    if '"""' in value:
        raise _invalid('a Modelfile value cannot contain """ (Ollama\'s Modelfile has no escapes)',
                       'Remove the """ from the system prompt or template.')  # fmt: skip
    if triple or '"' in value or "\n" in value:
        return f'"""{value}"""'
    return f'"{value}"'


def _unquote(value: str) -> str | None:
    """The value without its quotes; None while a quote is still open."""
    if value.startswith('"""'):
        return value[3:-3] if len(value) >= 6 and value.endswith('"""') else None
    if value.startswith('"'):
        return value[1:-1] if len(value) >= 2 and value.endswith('"') else None
    return value


def _typed(value: str) -> Any:
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


# --- registering with Ollama ----------------------------------------------------------------------------------------


def register(gguf_path: Path, modelfile_text: str | ModelfileParts, name: str, host: str | None = None) -> dict[str, Any]:
    """Create the Ollama model `name` from `gguf_path` with the Modelfile's template, parameters and system prompt.

    Over the HTTP API when the server answers; else with `ollama create` when the binary is on PATH.
    Returns {"method": "api" | "cli", "name", "digest", "host", ...}.
    """
    gguf_path = Path(gguf_path)
    parts = parse_modelfile(modelfile_text) if isinstance(modelfile_text, str) else modelfile_text
    if not gguf_path.is_file():
        raise _invalid(f"GGUF file not found: {gguf_path}", "Export the model to GGUF first.")
    if not _MODEL_NAME.fullmatch(name):
        raise _invalid(f"'{name}' is not a valid Ollama model name",
                       "Use letters, digits, '.', '_' and '-', optionally 'namespace/' before and ':tag' after.")  # fmt: skip
    base = ollama_url(host)
    try:
        version = _server_version(base, name)
    except _Unreachable as exc:
        return _register_with_cli(gguf_path, parts, name, base, reason=str(exc))
    digest = file_digest(gguf_path)
    uploaded = _ensure_blob(base, name, gguf_path, digest)
    _create(base, name, _create_request(name, gguf_path, digest, parts))
    return {"method": "api", "name": name, "digest": digest, "host": base, "uploaded": uploaded, "version": version}


def ollama_url(host: str | None = None) -> str:
    """The server's base URL from `host` or OLLAMA_HOST, read as the ollama CLI reads it: "host", "host:port",
    "http://host:port" (a scheme without a port means port 80 or 443, as in the CLI)."""
    value = (host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST).strip().rstrip("/")
    scheme, has_scheme, rest = value.partition("://")
    scheme = scheme.lower()
    if has_scheme:
        default_port = {"http": 80, "https": 443}.get(scheme)
    else:
        scheme, rest, default_port = "http", value, DEFAULT_PORT
    try:
        parts = urlsplit(f"{scheme}://{rest}")
        port = parts.port or default_port
    except ValueError:
        parts, port = None, None
    if parts is None or not parts.hostname or port is None:
        raise _invalid(f"cannot read the Ollama host '{value}'", "Set OLLAMA_HOST like 127.0.0.1:11434 or http://host:11434.")
    hostname = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{scheme}://{hostname}:{port}{parts.path}"


def file_digest(path: Path) -> str:
    """sha256:<hex> of the file, read in chunks (a GGUF can be many GB)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            sha.update(chunk)
    return f"sha256:{sha.hexdigest()}"


class _Unreachable(Exception):
    """No server answered at the host: the CLI may still get through (the desktop app starts one)."""


def _server_version(base: str, name: str) -> str:
    try:
        status, body = _request(base, "GET", "/api/version", timeout=REQUEST_TIMEOUT_S)
    except (OSError, http.client.HTTPException) as exc:
        raise _Unreachable(_describe(exc)) from exc
    if status != 200:
        raise _failed(base, name, f"GET /api/version answered {status}; is this an Ollama server? {_server_message(body)}")
    return str(_json(body).get("version", "unknown"))


def _ensure_blob(base: str, name: str, gguf_path: Path, digest: str) -> bool:
    """Upload the GGUF unless the server has it already; True if it was uploaded."""
    path = f"/api/blobs/{digest}"
    status, body = _call(base, name, "HEAD", path, timeout=REQUEST_TIMEOUT_S)
    if status == 200:
        return False
    if status != 404:
        raise _failed(base, name, f"HEAD {path} answered {status} {_server_message(body)}")
    size = gguf_path.stat().st_size
    headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
    with open(gguf_path, "rb") as f:  # http.client streams a file body in blocks
        status, body = _call(base, name, "POST", path, body=f, headers=headers, timeout=TRANSFER_TIMEOUT_S)
    if status not in (200, 201):
        raise _failed(base, name, f"uploading the GGUF answered {status} {_server_message(body)}")
    return True


def _create_request(name: str, gguf_path: Path, digest: str, parts: ModelfileParts) -> dict[str, Any]:
    # Ollama tells a GGUF by its file name here, so the name must end in .gguf.
    file_name = gguf_path.name if gguf_path.suffix.lower() == ".gguf" else f"{gguf_path.stem or 'model'}.gguf"
    request: dict[str, Any] = {"model": name, "files": {file_name: digest}, "stream": False}
    if parts.template is not None:
        request["template"] = parts.template
    if parts.system:
        request["system"] = parts.system
    if parts.parameters:
        request["parameters"] = parts.api_parameters()
    return request


def _create(base: str, name: str, request: dict[str, Any]) -> None:
    body = json.dumps(request).encode()
    headers = {"Content-Type": "application/json"}
    status, answer = _call(base, name, "POST", "/api/create", body=body, headers=headers, timeout=TRANSFER_TIMEOUT_S)
    # Without streaming the answer is one JSON object; a streaming server sends one per line, the last one counts.
    lines = [_json(line) for line in answer.splitlines() if line.strip()]
    errors = [line["error"] for line in lines if "error" in line]
    if status != 200 or errors or not lines or lines[-1].get("status") != "success":
        raise _failed(base, name, f"POST /api/create answered {status}: {errors[-1] if errors else _server_message(answer)}")


def _call(base: str, name: str, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
    """A request to a server that answered before: losing it now is a failure, not a reason to try the CLI."""
    try:
        return _request(base, method, path, **kwargs)
    except (OSError, http.client.HTTPException) as exc:
        raise _failed(base, name, f"{method} {path}: {_describe(exc)}") from exc


def _request(
    base: str, method: str, path: str, *, body: Any = None, headers: dict[str, str] | None = None, timeout: float
) -> tuple[int, bytes]:
    """One request on its own connection. http.client rather than urllib: urllib would follow HTTP(S)_PROXY and
    redirects, and nothing may go anywhere but the Ollama host."""
    url = urlsplit(base)
    connection_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(url.hostname, url.port, timeout=CONNECT_TIMEOUT_S, blocksize=HASH_CHUNK)
    try:
        connection.connect()
        connection.sock.settimeout(timeout)
        connection.request(method, url.path + path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _register_with_cli(gguf_path: Path, parts: ModelfileParts, name: str, base: str, reason: str) -> dict[str, Any]:
    binary = shutil.which("ollama")
    if binary is None:
        raise _failed(base, name, f"{reason}, and there is no `ollama` command on PATH")
    path = gguf_path.parent / "Modelfile"
    write_text(path, parts.text())
    env = {**os.environ, "OLLAMA_HOST": base}  # the CLI talks to the same server, never another one
    try:
        result = subprocess.run(
            [binary, "create", name, "-f", str(path)],
            capture_output=True, text=True, timeout=CLI_TIMEOUT_S, cwd=gguf_path.parent, env=env,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _failed(base, name, f"{reason}; `ollama create` failed: {_describe(exc)}") from exc
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise _failed(base, name, f"{reason}; `ollama create` exited {result.returncode}: {output[:300]}")
    return {"method": "cli", "name": name, "digest": file_digest(gguf_path), "host": base, "modelfile": str(path)}


def _failed(base: str, name: str, reason: str) -> BackpropError:
    return BackpropError("DEP_OLLAMA_REGISTRATION_FAILED", host=base, name=name, reason=reason)


def _invalid(reason: str, hint: str) -> BackpropError:
    return BackpropError("INPUT_INVALID_ARGUMENT", reason=reason, hint=hint)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _server_message(body: bytes) -> str:
    """Ollama answers errors as {"error": "..."}; anything else is shown as text."""
    return str(_json(body).get("error") or body.decode("utf-8", "replace").strip()[:300])


def _json(data: bytes | str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _read_json(path: Path) -> dict[str, Any]:
    return _json(path.read_bytes()) if path.is_file() else {}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [] if value is None else [value]
