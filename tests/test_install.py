"""Install in parts: the core alone (engine + CLI, no web stack, no compiler) trains, and a feature whose extra is
missing says exactly what to install. scripts/test builds that core-only environment in .venv-core."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import DEMO_DATA

CORE = os.environ.get("BACKPROP_CORE_VENV")
pytestmark = pytest.mark.skipif(not CORE, reason="needs the core-only environment that scripts/test builds (.venv-core)")


def core(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(CORE) / "bin" / "backprop"), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})  # fmt: skip


def test_the_core_install_holds_no_extra(home):
    probe = "import importlib.util as u; print([m for m in ('reflex', 'jwt', 'gguf', 'llama_cpp') if u.find_spec(m)])"
    out = subprocess.run([str(Path(CORE) / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_core_alone_trains_the_demo_model_and_export_says_what_to_install(home):
    env = {"BACKPROPAGATE_HOME": str(home)}
    trained = core("train", "--model", "demo", "--data", str(DEMO_DATA), "--steps", "3", "--json", env=env)
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and Path(summary["adapter"]).is_dir()

    gguf = core("export", summary["run_id"], "--format", "gguf", env=env)
    assert gguf.returncode == 2
    assert "[DEP_MISSING]" in gguf.stderr and "pip install 'backprop[export]'" in gguf.stderr
    assert not (Path(summary["run_dir"]) / "exports" / "gguf").exists()  # failed before merging anything

    lora = core("export", summary["run_id"], "--format", "lora", "--json", env=env)  # needs no extra
    assert lora.returncode == 0, lora.stderr

    ui = core("ui", "--no-browser", env=env)
    assert ui.returncode == 2 and "pip install 'backprop[ui]'" in ui.stderr
