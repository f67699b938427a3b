"""Export a trained run (or an adapter / merged model folder) as a LoRA adapter, a merged model or a GGUF file.

    result = export("3f2a", "gguf", quantization="q4_k_m", ollama_name="my-model")

Every export is built in `<dest>.partial` and renamed into place only when complete and verified, so a failed
export never destroys an earlier one. Each holds a model card (README.md); merged exports are checked against
the adapter model (greedy tokens, and logits relative to their scale, on probe conversations), GGUF files against
transformers with llama.cpp itself. Exports are recorded in the registry and, for a run, announced in its events.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from training import atomic
from training.errors import BackpropError
from training.events import EventSink, EventWriter
from training.extras import require
from training.runs import Registry, RunRecord

FORMATS = ("lora", "merged", "gguf")
# The merged model is checked against base + adapter on these conversations (with and without a system prompt).
PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Write one sentence about rivers and the sea."}],
)
# base + adapter computes W·x + s·B·(A·x), the merged model (W + s·B·A)·x: the same function, rounded differently in
# float32. Rounding is relative to the size of the numbers, each matmul over `hidden` terms adds about eps·sqrt(hidden),
# and the layers add up, so the check is relative to the logits' scale (max |logit|) with a bound of
# eps·sqrt(hidden)·layers: an absolute 1e-4 held for the 3.7M demo model and refused the 30-layer SmolLM2-135M at 1.1e-4.
# Measured: demo (256 wide, 4 layers) 3.7e-7 against a bound of 7.6e-6; SmolLM2-135M-Instruct (576, 30) 3.3e-6 against
# 8.6e-5: the same ~20x margin at both scales. A real merge error (a layer left out, a wrong scale) moves logits by percent.
FLOAT32_EPS = 2.0**-23


def merge_tolerance(config: Any) -> float:
    """The largest max |logit difference| / max |logit| that float32 rounding explains for this model's shape."""
    return FLOAT32_EPS * math.sqrt(config.hidden_size) * config.num_hidden_layers


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class ExportResult:
    id: str
    run_id: str | None
    format: str
    quantization: str | None
    path: str  # the folder; for GGUF the .gguf file is `file`
    file: str | None
    size_bytes: int
    verification: dict[str, Any] | None
    ollama: dict[str, Any] | None
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Source:
    """What is being exported: an adapter (with its base model) or an already merged model folder."""

    label: str
    run: RunRecord | None
    adapter_dir: Path | None
    merged_dir: Path | None


def export(
    source: str | Path,
    fmt: str,
    *,
    quantization: str = "q4_k_m",
    output: Path | None = None,
    ollama_name: str | None = None,
    register_ollama: bool = False,
    system: str | None = None,
    num_ctx: int | None = None,
    home: Path | None = None,
    on_event: EventSink | None = None,
) -> ExportResult:
    from training.config import load_settings

    if fmt not in FORMATS:
        raise BackpropError(
            "INPUT_INVALID_ARGUMENT", reason=f"unknown export format '{fmt}'", hint=f"Use one of: {', '.join(FORMATS)}."
        )
    home = home or load_settings().home
    registry = Registry(home)
    src = resolve_source(source, registry)
    if fmt == "gguf":
        from training.gguf import QUANTIZATIONS

        require("export")  # before any merging: say at once what to install

        if quantization not in QUANTIZATIONS:
            raise BackpropError("INPUT_UNKNOWN_QUANTIZATION", quantization=quantization, choices=", ".join(QUANTIZATIONS))
    if fmt == "lora" and src.adapter_dir is None:
        raise BackpropError("INPUT_INVALID_ARGUMENT", reason=f"{src.label} is a merged model: it has no LoRA adapter",
                            hint="Export it as merged or gguf.")  # fmt: skip
    dest = output or _default_destination(src, fmt, quantization)
    events = EventWriter(src.run.path / "events.jsonl", also=on_event) if src.run else None

    def emit(event: str, **fields: Any) -> None:
        if events is not None:
            events.emit(event, **fields)
        elif on_event is not None:
            on_event({"t": time.time(), "event": event, **fields})

    qlabel = quantization if fmt == "gguf" else None
    emit("export_started", format=fmt, quantization=qlabel, path=str(dest))
    try:
        result = _export(src, fmt, quantization, Path(dest), ollama_name, register_ollama, system, num_ctx, home, emit)
        registry.add_export(result.to_dict())
        emit("exported", **{k: v for k, v in result.to_dict().items() if k != "verification"}, verified=_verified(result))
        return result
    except BackpropError as exc:
        emit("export_failed", format=fmt, quantization=qlabel, code=exc.code, message=exc.message, hint=exc.hint)
        raise
    except OSError as exc:
        error = BackpropError("RUNTIME_EXPORT_FAILED", path=dest, reason=exc)
        emit("export_failed", format=fmt, quantization=qlabel, code=error.code, message=error.message, hint=error.hint)
        raise error from exc
    finally:
        if events is not None:
            events.close()


def resolve_source(source: str | Path, registry: Registry) -> _Source:
    """A run id (or prefix), or a folder holding an adapter (adapter_config.json) or a model (config.json), or a run's
    folder (its adapter/ is exported)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "adapter" / "adapter_config.json").exists():
            path = path / "adapter"
        if (path / "adapter_config.json").exists():
            return _Source(str(path), None, path.resolve(), None)
        if (path / "config.json").exists():
            return _Source(str(path), None, None, path.resolve())
        raise BackpropError("INPUT_MODEL_NOT_FOUND", model=str(source))
    run = registry.get(str(source))
    adapter = run.path / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise BackpropError("STATE_NO_ADAPTER", run_id=run.id, status=run.status)
    return _Source(f"run {run.id}", run, adapter, None)


def _default_destination(src: _Source, fmt: str, quantization: str) -> Path:
    name = fmt if fmt != "gguf" else f"gguf-{quantization}"
    if src.run is not None:
        return src.run.path / "exports" / name
    base = src.adapter_dir or src.merged_dir
    assert base is not None
    return base.parent / f"{base.name}-{name}"


def _export(src: _Source, fmt: str, quantization: str, dest: Path, ollama_name: str | None, register_ollama: bool,
            system: str | None, num_ctx: int | None, home: Path, emit: Any) -> ExportResult:  # fmt: skip
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # a leftover from an export that crashed
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:
        raise BackpropError("INPUT_OUTPUT_NOT_WRITABLE", path=dest.parent, reason=exc) from exc
    verification: dict[str, Any] | None = None
    ollama: dict[str, Any] | None = None
    file: Path | None = None
    try:
        if fmt == "lora":
            assert src.adapter_dir is not None
            for item in src.adapter_dir.iterdir():
                if item.is_file():
                    shutil.copy2(item, staging / item.name)
        elif fmt == "merged":
            emit("export_progress", stage="merge")
            verification = merge(src, staging, home)
        else:
            file, verification, modelfile_text = _gguf(src, staging, quantization, system, num_ctx, home, emit)
        write_model_card(staging, src, fmt, quantization if fmt == "gguf" else None, verification, file.name if file else None)
        if verification is not None:
            atomic.write_json(staging / "verification.json", verification)
        atomic.publish_dir(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if file is not None:
        file = dest / file.name
        if ollama_name or register_ollama:
            from training.ollama import register

            emit("export_progress", stage="ollama")
            ollama = register(file, modelfile_text, ollama_name or _ollama_name(src))
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    return ExportResult(
        id=f"{int(time.time() * 1000):x}", run_id=src.run.id if src.run else None, format=fmt,
        quantization=quantization if fmt == "gguf" else None, path=str(dest), file=str(file) if file else None,
        size_bytes=size, verification=verification, ollama=ollama, created_at=time.time(),
    )  # fmt: skip


# ---------------------------------------------------------------------------- merged


def merge(src: _Source, target: Path, home: Path) -> dict[str, Any]:
    """Fold the LoRA weights into the base model and save it (safetensors, tokenizer, chat template, generation config).

    The merged model must predict what base + adapter predicts (see `merge_check`)."""
    import torch

    from training.hf_imports import peft_class
    from training.models import load_model, load_tokenizer, resolve_model

    if src.merged_dir is not None:  # already merged: copy it
        for item in src.merged_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, target / item.name)
        return {"ok": True, "note": "source was already a merged model"}
    assert src.adapter_dir is not None
    base_name = json.loads((src.adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = resolve_model(base_name, home)
    has_tokenizer = (src.adapter_dir / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(resolve_model(str(src.adapter_dir)) if has_tokenizer else base)
    base_model = load_model(base, dtype=torch.float32, device="cpu", tokenizer=tokenizer)  # sized for added tokens
    model = peft_class("PeftModel").from_pretrained(base_model, src.adapter_dir).eval()
    probes = [tokenizer.apply_chat_template(c, add_generation_prompt=True, return_tensors="pt", return_dict=True)
              for c in PROBE_CONVERSATIONS]  # fmt: skip
    with torch.no_grad():
        expected = [model(**probe).logits[0] for probe in probes]
        merged = model.merge_and_unload().eval()
        actual = [merged(**probe).logits[0] for probe in probes]
    report = merge_check(expected, actual, merge_tolerance(merged.config))
    if not report["ok"]:
        raise BackpropError("RUNTIME_MERGE_MISMATCH", difference=f"{report['relative_logit_diff']:.2e}",
                            tolerance=f"{report['tolerance']:.2e}", flips=report["greedy_flips"],
                            positions=report["greedy_positions"])  # fmt: skip
    saved_dtype = getattr(merged.config, "dtype", None) or getattr(merged.config, "torch_dtype", None)
    if saved_dtype in (torch.bfloat16, torch.float16, "bfloat16", "float16"):
        merged = merged.to(getattr(torch, str(saved_dtype).replace("torch.", "")))  # keep the base model's size on disk
    merged.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    merged.generation_config.eos_token_id = _end_of_turn_ids(tokenizer) or merged.generation_config.eos_token_id
    merged.generation_config.save_pretrained(target)
    return report


def merge_check(expected: list[Any], actual: list[Any], tolerance: float) -> dict[str, Any]:
    """Compare the merged model's logits (`actual`, one [positions, vocabulary] tensor per probe) with base + adapter's.

    The check: the largest difference relative to the logits' scale is within `tolerance` (see merge_tolerance).
    Reported beside it, where the greedy next token differs: within the bound a token can only flip where the top two
    logits are within twice the difference (a tie at this precision), so a flip says where, not whether."""
    scale = max(float(e.abs().max()) for e in expected) or 1.0
    difference = max(float((e.double() - a.double()).abs().max()) for e, a in zip(expected, actual, strict=True))
    positions = sum(e.shape[0] for e in expected)
    flips = sum(int((e.argmax(-1) != a.argmax(-1)).sum()) for e, a in zip(expected, actual, strict=True))
    relative = difference / scale
    return {"ok": relative <= tolerance, "relative_logit_diff": relative, "max_logit_diff": difference,
            "logit_scale": scale, "tolerance": tolerance, "greedy_positions": positions, "greedy_flips": flips,
            "probes": [c[-1]["content"] for c in PROBE_CONVERSATIONS]}  # fmt: skip


def _end_of_turn_ids(tokenizer: Any) -> list[int]:
    """eos plus the chat template's end-of-turn token, so generation stops at the end of a reply."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


# ---------------------------------------------------------------------------- GGUF


def _gguf(src: _Source, staging: Path, quantization: str, system: str | None, num_ctx: int | None, home: Path,
          emit: Any) -> tuple[Path, dict[str, Any], str]:  # fmt: skip
    """Merge (in a scratch folder), convert, verify with llama.cpp; write a Modelfile beside the file."""
    from training import gguf
    from training.ollama import modelfile_parts

    with tempfile.TemporaryDirectory(prefix=".merge-", dir=staging.parent) as scratch:
        merged_dir = src.merged_dir or Path(scratch)
        if src.merged_dir is None:
            emit("export_progress", stage="merge")
            merge(src, merged_dir, home)
        file = staging / f"{_file_stem(src)}.{quantization}.gguf"
        emit("export_progress", stage="convert" if quantization in gguf.DIRECT_QUANTIZATIONS else "quantize")
        gguf.convert(merged_dir, file, quantization)
        emit("export_progress", stage="verify")
        verification = gguf.verify(file, merged_dir, quantization)
        parts = modelfile_parts(file, merged_dir, num_ctx=num_ctx, system=system)
        # FROM relative to the Modelfile, so the export folder can be moved or copied to another machine.
        text = dataclasses.replace(parts, source=f"./{file.name}").text()
        atomic.write_text(staging / "Modelfile", text)
        # The model card needs these, and the merged folder is gone after this block.
        verification["base_model"] = _base_model_name(src)
    return file, verification, text


def _file_stem(src: _Source) -> str:
    if src.run is not None:
        return f"{(src.run.name or src.run.id).replace(' ', '-')}"
    base = src.adapter_dir or src.merged_dir
    assert base is not None
    return base.name


def _ollama_name(src: _Source) -> str:
    return "backprop-" + _file_stem(src).lower()


def _verified(result: ExportResult) -> bool | None:
    return None if result.verification is None else bool(result.verification.get("ok"))


# ---------------------------------------------------------------------------- model card


def _base_model_name(src: _Source) -> str:
    if src.run is not None and src.run.model:
        return src.run.model
    if src.adapter_dir is not None:
        return json.loads((src.adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path", "?")
    assert src.merged_dir is not None
    return json.loads((src.merged_dir / "config.json").read_text()).get("_name_or_path") or src.merged_dir.name


def write_model_card(folder: Path, src: _Source, fmt: str, quantization: str | None, verification: dict[str, Any] | None,
                     gguf_file: str | None) -> None:  # fmt: skip
    """README.md of an export: what it is, how it was trained, how well, and how to run it."""
    run, base, name = src.run, _base_model_name(src), _file_stem(src)
    rows = {"base model": f"`{base}`", "export format": fmt + (f" ({quantization})" if quantization else "")}
    if run is not None:
        rows["run"] = f"`{run.id}`" + (f" ({run.name})" if run.name else "")
        rows["dataset"] = f"`{Path(run.dataset or '?').name}` (sha256 `{run.dataset_sha256 or '?'}`)"
        rows.update({"steps": str(run.step), "final train loss": _fmt(run.final_loss), "eval loss": _fmt(run.eval_loss)})
    if verification is not None:
        rows["verification"] = ("passed" if verification.get("ok") else "FAILED") + " (see verification.json)"
    lines = [f"# {name}", "", f"A LoRA fine-tune of `{base}` made with Backprop.", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows.items()]
    if run is not None and run.params:
        lines += ["", "## Hyperparameters", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(run.params.items()) if v is not None]
    to_gguf = "For Ollama or llama.cpp: `backprop export <this folder> --format gguf --quantization q4_k_m`."
    if gguf_file:
        usage = f"""With [Ollama](https://ollama.com) (the Modelfile beside it has the chat template and stop tokens):

```bash
ollama create {_ollama_name(src)} -f Modelfile
ollama run {_ollama_name(src)}
```

With llama.cpp:

```bash
llama-cli -m {gguf_file} -cnv
```"""
    elif fmt == "merged":
        usage = f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(".")
tokenizer = AutoTokenizer.from_pretrained(".")
```

{to_gguf}"""
    else:
        usage = f"""```python
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained(".")
```

{to_gguf}"""
    lines += ["", "## How to run it", "", usage, "", "Chat with it: `backprop chat <run id or this folder>`.", ""]
    atomic.write_text(folder / "README.md", "\n".join(lines))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
