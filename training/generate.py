"""Chat with a model: a run's LoRA adapter, a merged or plain Hugging Face model folder, or a GGUF file.

    model = load_chat_model("3f2a")          # a run id (or prefix), run folder, adapter, model folder or .gguf
    for piece in model.stream([{"role": "user", "content": "Hi"}]):
        print(piece, end="", flush=True)
    model.reply(messages)                    # the same, joined into one string

Every engine applies the model's own chat template (with the assistant's generation prompt), stops at any
end-of-turn token (<|im_end|>, <|eot_id|>, eos, ...) and never shows special tokens. `temperature=0` is
greedy decoding; otherwise the next token is sampled at that temperature from the top-p nucleus (no top-k,
no repetition penalty), so the same settings mean the same thing on both backends.

Backends: transformers (+ peft for adapters) with a plain token loop over the KV cache, so a reply streams
without threads and stops computing as soon as its reader stops; llama.cpp (llama-cpp-python) for GGUF files.
"""

from __future__ import annotations

import inspect
import json
import random
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from training.errors import BackpropError
from training.extras import require

Message = dict[str, str]

DEFAULT_MAX_NEW_TOKENS = 256
GGUF_CONTEXT = 4096  # llama.cpp context for GGUF chats, capped at the model's own training context
# Texts that end a turn in common chat templates (or a whole document); any of them in the vocabulary stops a reply.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class ChatModel(ABC):
    """A model that answers chat messages, piece by piece or all at once."""

    context_length: int | None = None  # tokens; a longer chat is refused, a long reply is cut to fit
    description: str = "a model"  # what is loaded, in words: "the tuned adapter ... on ...", "the model ...", ...

    def stream(
        self,
        messages: list[Message],
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[str]:
        """The reply as text pieces, as they are generated. Bad arguments raise at once, not at the first piece."""
        _check_request(messages, max_new_tokens, temperature, top_p)
        prompt = self.prompt_ids(messages)
        budget = _token_budget(len(prompt), max_new_tokens, self.context_length)
        return _skip_leading_whitespace(self._pieces(prompt, budget, temperature, top_p, seed))

    @abstractmethod
    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The token ids of the chat so far, rendered with the chat template and the assistant's generation prompt."""

    @abstractmethod
    def _pieces(
        self, prompt: list[int], max_new_tokens: int, temperature: float, top_p: float, seed: int | None
    ) -> Iterator[str]:
        """Generate after `prompt`, yielding text pieces, until an end-of-turn token or `max_new_tokens`."""

    def reply(
        self,
        messages: list[Message],
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> str:
        """The whole reply: the stream joined, trailing whitespace removed."""
        return "".join(self.stream(messages, max_new_tokens, temperature, top_p, seed)).rstrip()

    @abstractmethod
    def close(self) -> None:
        """Free the model's memory; the object is unusable afterwards."""

    def __enter__(self) -> ChatModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------------
# transformers


class HFModel(ChatModel):
    """A Hugging Face causal LM: a plain or merged model folder (or any name training.models resolves, e.g. `demo`)."""

    def __init__(self, model_dir: str | Path, home: Path | None = None, *, device: str | None = None):
        from training.models import load_model, load_tokenizer, resolve_model

        source = resolve_model(str(model_dir), home)
        self.description = f"the model {source.name}"
        tokenizer = load_tokenizer(source)  # may add ChatML tokens: the model then gets rows for them
        self._setup(load_model(source, device=_default_device(device), tokenizer=tokenizer), tokenizer)

    def _setup(self, model: Any, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.stop_ids = end_of_turn_ids(model, tokenizer)
        self.context_length: int | None = getattr(model.config, "max_position_embeddings", None)
        # Only the last position's logits are needed; computing all of them costs prompt length x vocabulary.
        parameters = inspect.signature(getattr(model, "get_base_model", lambda: model)().forward).parameters
        self._forward_options = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        # transformers 5 names the KV cache `cache` and warns (mid-reply) about the older `past_key_values`.
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The token ids of the chat so far, rendered with the chat template and the assistant's generation prompt."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template already holds any bos

    def _pieces(
        self, prompt: list[int], max_new_tokens: int, temperature: float, top_p: float, seed: int | None
    ) -> Iterator[str]:
        return _text_pieces(self._generate(prompt, max_new_tokens, _Sampler(temperature, top_p, seed)), self._decode)

    def _generate(self, prompt: list[int], max_new_tokens: int, sample: _Sampler) -> Iterator[int]:
        """Token ids one at a time, feeding each back through the KV cache, until an end-of-turn token."""
        import torch

        device = self.model.device
        input_ids, cache = torch.tensor([prompt], device=device), None
        for _ in range(max_new_tokens):
            # Inference mode only around the forward pass: a generator must not leave it switched on for its reader.
            with torch.inference_mode():
                options = {self._cache_name: cache, **self._forward_options}
                out = self.model(input_ids=input_ids, use_cache=True, **options)
                token = sample(out.logits[0, -1])
            if token in self.stop_ids:
                return
            yield token
            input_ids, cache = torch.tensor([[token]], device=device), out[self._cache_name]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def close(self) -> None:
        self.model = None


class AdapterModel(HFModel):
    """A base model with a LoRA adapter on top (a run's `adapter/` or a checkpoint folder)."""

    def __init__(self, adapter_dir: str | Path, home: Path | None = None, *, device: str | None = None):
        from training.hf_imports import peft_class
        from training.models import load_model, load_tokenizer, resolve_model

        adapter_dir = Path(adapter_dir)
        config_path = adapter_dir / "adapter_config.json"
        if not config_path.is_file():
            raise BackpropError("INPUT_MODEL_NOT_FOUND", model=str(adapter_dir))
        self.base_model = _adapter_base(adapter_dir)  # a local folder or hub id
        self.description = f"the tuned adapter {adapter_dir} on {self.base_model}"
        base = resolve_model(self.base_model, home)
        # The trainer saves the tokenizer beside the adapter (it may have gained chat tokens); others use the base's.
        has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(resolve_model(str(adapter_dir)) if has_tokenizer else base)
        loaded_base = load_model(base, device=_default_device(device), tokenizer=tokenizer)
        model = peft_class("PeftModel").from_pretrained(loaded_base, adapter_dir)
        self._setup(model, tokenizer)


def end_of_turn_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token id that ends a reply: the generation config's eos ids, the tokenizer's eos, end-of-turn tokens."""
    ids: set[int] = set()
    for eos in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    vocab = tokenizer.get_vocab()  # not convert_tokens_to_ids: that maps an unknown text to unk, a real token
    ids.update(vocab[text] for text in END_OF_TURN_TOKENS if text in vocab)
    return ids


class _Sampler:
    """Picks the next token from logits: argmax at temperature 0, else temperature + top-p sampling."""

    def __init__(self, temperature: float, top_p: float, seed: int | None):
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.generator: Any = None  # its own RNG: a seeded reply is repeatable whatever else uses torch's global one

    def __call__(self, logits: Any) -> int:
        import torch

        if self.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        if self.generator is None:
            self.generator = torch.Generator(device=probs.device)
            self.generator.manual_seed(self.seed if self.seed is not None else random.randrange(2**63))
        return int(torch.multinomial(probs, 1, generator=self.generator))


# ---------------------------------------------------------------------------------------------------------------------
# llama.cpp


class GGUFModel(ChatModel):
    """A GGUF file run by llama.cpp, chatting with the chat template embedded in the file (ChatML when none).

    One llama.cpp context serves one reply at a time: a second stream waits until the first one is finished
    or closed (`close()` on the iterator, or dropping it).
    """

    def __init__(self, gguf_path: str | Path, *, n_ctx: int = GGUF_CONTEXT, n_gpu_layers: int = -1):
        require("export", "llama_cpp")
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from training.demo_model import CHATML_TEMPLATE

        path = Path(gguf_path)
        if not path.is_file():
            raise BackpropError("INPUT_MODEL_NOT_FOUND", model=str(path))
        self.description = f"the GGUF file {path}"
        try:
            # A context longer than the model was trained with only costs memory (and makes llama.cpp complain).
            n_ctx = min(n_ctx, _trained_context(path) or n_ctx)
            # n_gpu_layers=-1 offloads every layer when llama.cpp was built with GPU support; CPU builds ignore it.
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, verbose=False)
        except (ValueError, RuntimeError, OSError) as e:  # not a GGUF file, or llama-cpp-python's "Failed to load model"
            raise BackpropError(
                "DEP_MODEL_LOAD_FAILED", model=str(path), reason=str(e), hint="Check that the file is a complete GGUF model."
            ) from e
        self.context_length = self.llm.n_ctx()
        # Rendered here rather than by create_chat_completion: that one swaps some well-known templates for its own
        # formatters and falls back to Llama 2's format without one; this is always the file's own template.
        self.chat_template: str = self.llm.metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE
        self._format = Jinja2ChatFormatter(
            self.chat_template, eos_token=self._token_text(self.llm.token_eos()), bos_token=self._token_text(self.llm.token_bos())
        )
        self._lock = threading.Lock()  # one llama.cpp context: one reply at a time

    def _token_text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The token ids of the chat so far, rendered with the chat template and the assistant's generation prompt."""
        text = self._format(messages=messages).prompt
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)  # the template holds any bos

    def _pieces(
        self, prompt: list[int], max_new_tokens: int, temperature: float, top_p: float, seed: int | None
    ) -> Iterator[str]:
        return self._generate(prompt, max_new_tokens, temperature, top_p, seed)

    def _generate(
        self, prompt: list[int], max_new_tokens: int, temperature: float, top_p: float, seed: int | None
    ) -> Iterator[str]:
        # llama.cpp ends a completion at any end-of-generation token of the vocabulary (eos, eot, <|im_end|>,
        # <|endoftext|>, ...) and leaves special tokens out of the text, so nothing else is needed to stop cleanly.
        with self._lock:
            chunks = self.llm.create_completion(
                prompt,
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=0,  # off, like min_p, typical_p and the repeat penalty: only temperature and top-p apply
                min_p=0.0,
                typical_p=1.0,
                repeat_penalty=1.0,
                seed=seed if seed is not None else random.randrange(2**31),  # llama-cpp-python's own default repeats
                stream=True,
            )
            for chunk in chunks:
                if piece := chunk["choices"][0]["text"]:
                    yield piece

    def close(self) -> None:
        self.llm.close()


# ---------------------------------------------------------------------------------------------------------------------
# choosing the engine


def load_chat_model(source: str | Path, home: Path | None = None, *, base: bool = False, device: str | None = None) -> ChatModel:
    """The engine for `source`: a run id (or unambiguous prefix), a run folder, an adapter or checkpoint folder
    (adapter_config.json), a merged or plain model folder (config.json), a .gguf file or a folder holding exactly
    one, or a model name that training.models resolves (`demo`, a preset, a hub id).

    `base=True` loads the model that a run or adapter was tuned from instead, for side-by-side comparisons.
    """
    from training.config import load_settings

    home = Path(home) if home is not None else load_settings().home
    path = _locate(source, home)
    if path is not None and (path / "adapter_config.json").is_file():
        return HFModel(_adapter_base(path), home, device=device) if base else AdapterModel(path, home, device=device)
    if base:
        raise BackpropError(
            "INPUT_INVALID_ARGUMENT",
            reason=f"{source} is not a run or an adapter, so it has no base model to compare with",
            hint="Give a run id, a run folder or an adapter folder.",
        )
    if path is not None and path.suffix.lower() == ".gguf":
        return GGUFModel(path)
    # A model folder, or a name: resolve_model raises INPUT_MODEL_NOT_FOUND for what is neither.
    return HFModel(path if path is not None else str(source), home, device=device)


def _locate(source: str | Path, home: Path) -> Path | None:
    """The file or folder that holds the model (adapter folder, model folder or .gguf file); None for a model name."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir():
        if (path / "spec.json").is_file():  # a run folder: its final adapter
            return _run_adapter(path, path.name, "not finished")
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    if path.exists() or path.suffix.lower() == ".gguf":
        raise BackpropError("INPUT_MODEL_NOT_FOUND", model=str(source))
    run = _find_run(str(source), home)
    return _run_adapter(run.path, run.id, run.status) if run is not None else None


def _find_run(run_id: str, home: Path) -> Any:
    """The registry's run for an id or prefix, or None; an ambiguous prefix is an error of its own."""
    from training.runs import Registry

    if not (home / "runs.db").is_file() or not run_id or Path(run_id).name != run_id:
        return None  # no registry yet (do not create one just to look), or a path rather than an id
    try:
        return Registry(home).get(run_id)
    except BackpropError as e:
        if e.code == "INPUT_RUN_NOT_FOUND":
            return None
        raise


def _adapter_base(adapter_dir: Path) -> str:
    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def _run_adapter(run_dir: Path, run_id: str, status: str) -> Path:
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise BackpropError("STATE_NO_ADAPTER", run_id=run_id, status=status)
    return adapter


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _check_request(messages: list[Message], max_new_tokens: int, temperature: float, top_p: float) -> None:
    problem = None
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages):
        problem = "messages must be a non-empty list of {'role': ..., 'content': ...} objects"
    elif max_new_tokens < 1:
        problem = f"max_new_tokens must be at least 1, not {max_new_tokens}"
    elif temperature < 0:
        problem = f"temperature must be 0 (greedy) or more, not {temperature}"
    elif not 0 < top_p <= 1:
        problem = f"top_p must be in (0, 1], not {top_p}"
    if problem:
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason=problem, hint="See training/generate.py for the chat options.")


def _trained_context(gguf_path: Path) -> int | None:
    """The context length a GGUF model was trained with, read from the file's header."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    architecture = reader.get_field("general.architecture")
    field = reader.get_field(f"{architecture.contents()}.context_length") if architecture is not None else None
    return int(field.contents()) if field is not None else None


def _token_budget(prompt_tokens: int, max_new_tokens: int, context_length: int | None) -> int:
    """How many tokens the reply may have: max_new_tokens, or less where the context runs out."""
    if context_length is None:
        return max_new_tokens
    if prompt_tokens >= context_length:
        raise BackpropError(
            "INPUT_INVALID_ARGUMENT",
            reason=f"the conversation is {prompt_tokens} tokens long; the model's context holds {context_length}",
            hint="Start a new chat or shorten the messages.",
        )
    return min(max_new_tokens, context_length - prompt_tokens)


def _text_pieces(tokens: Iterator[int], decode: Any) -> Iterator[str]:
    """Text pieces from token ids: decode everything so far and emit what is new.

    Decoding the whole reply each time keeps multi-token characters and word joins right; a text ending in
    U+FFFD is half of a multi-byte character, so it waits for the next token.
    """
    ids: list[int] = []
    sent = ""
    for token in tokens:
        ids.append(token)
        text = decode(ids)
        if not text.endswith("\ufffd") and len(text) > len(sent):
            yield text[len(sent) :]
            sent = text
    text = decode(ids)
    if len(text) > len(sent):  # a reply cut off mid-character still shows what it has
        yield text[len(sent) :]


def _skip_leading_whitespace(pieces: Iterator[str]) -> Iterator[str]:
    """Drop whitespace before the first visible character: backends disagree about a leading space."""
    for piece in pieces:
        piece = piece.lstrip()
        if piece:
            yield piece
            break
    yield from pieces


def _default_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
