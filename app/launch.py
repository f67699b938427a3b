"""`backprop ui`: serve the production build of the web app on one port (pages, /_event, /_upload), open a browser.

Reflex builds the frontend with bun, which the set-up installs from the npm registry into ./node_modules (Reflex's
own installer downloads from the web, which is not always reachable). Everything the app writes goes to its
sandbox, BACKPROPAGATE_UI__OUTPUT_DIR, checked here before anything starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
import webbrowser
from pathlib import Path

from training.config import load_settings
from training.errors import BackpropError
from training.sandbox import sandbox_root

ROOT = Path(__file__).resolve().parent.parent  # where rxconfig.py lives


def reflex_environment() -> dict[str, str]:
    """Offline-safe Reflex: system bun from node_modules, no telemetry, no version check, the npm registry only."""
    bun_dir = ROOT / "node_modules" / ".bin"
    if not (bun_dir / "bun").exists():
        raise BackpropError("DEP_MISSING", package="bun", reason=f"not found in {bun_dir}",
                            install="nothing: run scripts/setup (it runs `npm install` for bun)")  # fmt: skip
    return {
        **os.environ,
        "PATH": f"{bun_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "REFLEX_USE_SYSTEM_BUN": "1",
        "REFLEX_TELEMETRY_ENABLED": "false",
        "REFLEX_CHECK_LATEST_VERSION": "0",
        "NPM_CONFIG_REGISTRY": os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org"),
        "REFLEX_UPLOADED_FILES_DIR": str(sandbox_root(load_settings().ui.output_dir) / "uploads"),
        "PYTHONUNBUFFERED": "1",
    }


def serve(host: str | None = None, port: int | None = None, dev: bool = False, open_browser: bool = True) -> int:
    settings = load_settings()
    sandbox_root(settings.ui.output_dir)  # refuse a forbidden sandbox before building anything
    host, port = host or settings.ui.host, port or settings.ui.port
    command = [sys.executable, "-m", "reflex", "run", "--env", "dev" if dev else "prod", "--frontend-port", str(port),
               "--backend-host", host, "--loglevel", "warning"]  # fmt: skip
    if dev:
        command += ["--backend-port", str(port + 1)]
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    print(f"Backprop UI: building and starting on {url} (Ctrl-C stops it; running jobs go on)", file=sys.stderr)
    process = subprocess.Popen(command, cwd=ROOT, env=reflex_environment())
    if open_browser:
        threading.Thread(target=_open_when_up, args=(url, process), daemon=True).start()
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        return process.wait() or 130


def _open_when_up(url: str, process: subprocess.Popen) -> None:
    while process.poll() is None:
        try:
            urllib.request.urlopen(url + "ping", timeout=1)
        except OSError:
            time.sleep(0.5)
            continue
        webbrowser.open(url)
        return
