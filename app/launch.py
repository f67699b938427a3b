"""`backprop ui`: serve the production build of the web app on one port (pages, /_event, /_upload), open a browser;
`--auth` puts every route behind a sign-in (app/gate.py), `--share` publishes it through a tunnel (app/share.py).

Reflex builds the frontend with bun, which the set-up installs from the npm registry into ./node_modules (Reflex's
own installer downloads from the web, which is not always reachable). Everything the app writes goes to its
sandbox, BACKPROPAGATE_UI__OUTPUT_DIR, checked here before anything starts.
"""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
import threading
import time
import urllib.request
import webbrowser
from pathlib import Path

from training.config import Settings, load_settings
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


def serve(host: str | None = None, port: int | None = None, dev: bool = False, open_browser: bool = True,
          auth: bool = False, share: str | None = None) -> int:  # fmt: skip
    """Build and serve the app; with `auth` every route needs a sign-in; `share` publishes it through a tunnel."""
    settings = load_settings()
    sandbox_root(settings.ui.output_dir)  # refuse a forbidden sandbox before building anything
    host, port = host or settings.ui.host, port or settings.ui.port
    auth = auth or settings.ui.auth
    if share is not None and not auth:
        if settings.security.require_auth_for_share:
            raise BackpropError("UI_SHARE_REQUIRES_AUTH")
        print("WARNING: sharing the web app WITHOUT authentication: anyone with the address can train, read your "
              "datasets and delete runs. Ctrl-C now to stop (5 s).", file=sys.stderr)  # fmt: skip
        time.sleep(5)
    env = reflex_environment() | (auth_environment(settings) if auth else {})
    command = [sys.executable, "-m", "reflex", "run", "--env", "dev" if dev else "prod", "--frontend-port", str(port),
               "--backend-host", host, "--loglevel", "warning"]  # fmt: skip
    if dev:
        command += ["--backend-port", str(port + 1)]
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    print(f"Backprop UI: building and starting on {url}{' (sign-in required)' if auth else ''} "
          "(Ctrl-C stops it; running jobs go on)", file=sys.stderr)  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    tunnel = None
    try:
        if share is not None:
            if not _wait_until_up(url, process):
                return process.wait()
            from app.share import open_tunnel

            tunnel = open_tunnel(port, share)
            print(f"Backprop UI: shared at {tunnel.url} (through {tunnel.tool})", file=sys.stderr, flush=True)
        if open_browser:
            threading.Thread(target=_open_when_up, args=(url, process), daemon=True).start()
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        return process.wait() or 130
    except BackpropError:
        process.terminate()
        process.wait()
        raise
    finally:
        if tunnel is not None:
            tunnel.close()


def auth_environment(settings: Settings) -> dict[str, str]:
    """What the server needs to check sign-ins: the password's hash only (asked for here if none is configured)."""
    from app.auth import hash_password

    ui = settings.ui
    stored = ui.password_hash
    if not stored:
        password = ui.password.get_secret_value() if ui.password is not None else ""
        if not password and sys.stdin.isatty():
            password = getpass.getpass("Password for the web app: ")
            if password and getpass.getpass("Again: ") != password:
                raise BackpropError("CONFIG_INVALID", reason="the two passwords differ")
        if not password:
            raise BackpropError("UI_AUTH_PASSWORD_MISSING")
        stored = hash_password(password)
    return {"BACKPROPAGATE_UI__AUTH": "true", "BACKPROPAGATE_UI__PASSWORD_HASH": stored, "BACKPROPAGATE_UI__PASSWORD": ""}


def _wait_until_up(url: str, process: subprocess.Popen) -> bool:
    while process.poll() is None:
        try:
            urllib.request.urlopen(url + "ping", timeout=1)
            return True
        except OSError:
            time.sleep(0.5)
    return False


def _open_when_up(url: str, process: subprocess.Popen) -> None:
    if _wait_until_up(url, process):
        webbrowser.open(url)
