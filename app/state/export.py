"""The Export page: a run (or folder) to a LoRA adapter, a merged model or a GGUF verified by llama.cpp; Ollama; hub."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import reflex as rx
from safetensors import safe_open

from app.folders import exports_dir, root
from app.state.errors import handler
from app.state.form import setter
from training.config import load_settings
from training.errors import BackpropError
from training.export import export, resolve_source
from training.hub import push
from training.models import resolve_model
from training.runs import Registry
from training.sandbox import inside, safe_name

# Bits per weight of each GGUF quantization, for the size estimates (f16 tensors for norms are ignored).
BITS = {"f32": 32.0, "f16": 16.0, "q8_0": 8.5, "q6_k": 6.56, "q5_k_m": 5.69, "q4_k_m": 4.85, "q4_0": 4.55}


def _parameters(source: str, home: Path) -> int:
    """Parameters of the model an export writes (a run's or adapter's base, or a model folder), from the safetensors
    headers: no weights are read."""
    src = resolve_source(source, Registry(home))
    if src.adapter_dir is not None:
        base = json.loads((src.adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        model_dir = Path(resolve_model(base, home).path)
    else:
        assert src.merged_dir is not None
        model_dir = src.merged_dir
    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "np") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def destination(source: str, fmt: str, quantization: str) -> Path | None:
    """Where the web app writes an export: a run of the sandbox keeps it in its own folder (the engine's default);
    anything else (a run started from the command line, a folder) exports into the sandbox's exports/ folder."""
    src = resolve_source(source, Registry(load_settings().home))
    if src.run is not None and src.run.path.resolve().is_relative_to(root()):
        return None
    folder = Path(str(source)).expanduser().resolve()
    label = src.run.id if src.run is not None else folder.name
    if src.run is None and folder.name == "adapter":  # a run's adapter/ folder: named after its run folder
        label = f"{folder.parent.name}-adapter"
    name = f"{label}-{fmt}" + (f"-{quantization}" if fmt == "gguf" else "")
    return inside(exports_dir(), safe_name(name))


class ExportState(rx.State):
    runs: list[str] = []
    source: str = ""
    folder: str = ""  # or a folder: an adapter, a model, a run's folder
    format: str = "gguf"
    quantization: str = "q8_0"
    estimates: list[str] = []
    ollama_name: str = ""
    register: bool = False
    hub_repo: str = ""
    private: bool = True
    busy: bool = False
    stage: str = ""
    result: dict[str, str] = {}
    error: str = ""  # shown under Export
    hub_error: str = ""  # shown under Push to the hub

    @handler()
    def load(self):
        runs = [r for r in Registry(load_settings().home).list() if r.status == "completed" and (r.path / "adapter").exists()]
        self.runs = [r.id for r in runs]
        wanted = self.router.url.query_parameters.get("run", "")  # /export?run=ID from a run's page
        if wanted in self.runs:
            self.source, self.folder = wanted, ""
        elif self.source not in self.runs:
            self.source = self.runs[0] if self.runs else ""
        self._estimate()

    set_format = setter("format")
    set_quantization = setter("quantization")
    set_ollama_name = setter("ollama_name")
    set_register = setter("register", bool)
    set_hub_repo = setter("hub_repo")
    set_private = setter("private", bool)

    @handler()
    def set_source(self, value: str):
        self.source = value
        self._estimate()

    @handler()
    def set_folder(self, value: str):
        self.folder = value
        self._estimate()

    @property
    def chosen(self) -> str:
        """What is exported: the folder typed in, if any, else the run picked."""
        return self.folder.strip() or self.source

    def _estimate(self) -> None:
        self.estimates = []
        if not self.chosen:
            return
        try:
            params = _parameters(self.chosen, load_settings().home)
        except (BackpropError, OSError, KeyError, json.JSONDecodeError):
            return
        if not params:  # no weights found (a base model not downloaded): no estimate rather than zeros
            return
        self.estimates = [f"{q}: about {params * bits / 8 / 2**20:.1f} MiB" for q, bits in BITS.items()]

    @handler(background=True, busy="busy")
    async def start(self):
        async with self:
            if not self.chosen:
                return
            self.result, self.stage = {}, "starting"
            source, fmt, quantization = self.chosen, self.format, self.quantization
            name, register = self.ollama_name.strip() or None, self.register
        output = await asyncio.to_thread(destination, source, fmt, quantization)
        stages: list[str] = []
        job = asyncio.create_task(asyncio.to_thread(
            export, source, fmt, quantization=quantization, output=output, ollama_name=name, register_ollama=register,
            on_event=lambda e: stages.append(e.get("stage", "")) if e["event"] == "export_progress" else None,
        ))  # fmt: skip
        while not job.done():
            await asyncio.sleep(0.3)
            async with self:
                self.stage = stages[-1] if stages else self.stage
        result = job.result()
        v = result.verification or {}
        async with self:
            self.stage = ""
            self.result = {
                "path": result.file or result.path,
                "size": f"{result.size_bytes / 2**20:.1f} MiB",
                "verification": ("passed" if v.get("ok") else "failed") + ": " + ", ".join(
                    f"{k} {v[k]:.4f}" if isinstance(v[k], float) else f"{k} {v[k]}"
                    for k in ("tokenizer_match", "greedy_match", "max_logit_diff") if k in v
                ) if v else "not applicable",
                "ollama": f"registered as {result.ollama['name']}" if result.ollama else "",
            }  # fmt: skip

    @handler(background=True, busy="busy", error="hub_error")
    async def push_to_hub(self):
        async with self:
            if not self.chosen or not self.hub_repo.strip():
                return
            self.result, self.stage = {}, "uploading to the hub"
            source, repo, private, merged = self.chosen, self.hub_repo.strip(), self.private, self.format == "merged"
        done = await asyncio.to_thread(push, source, repo, private=private, merged=merged)
        async with self:
            self.stage, self.result = "", {"path": done["url"], "size": "", "verification": "", "ollama": ""}
