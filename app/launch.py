"""`backprop ui`: serve the production build of the web app on one port (pages, /_event, /_upload), open a browser;
`--auth` puts every route behind a sign-in (app/gate.py), `--share` publishes it through a tunnel (app/share.py).

Stopping: the launcher starts the server (and, with --share, the tunnel before it) each in a process group of its
own and stops those groups together whatever ends it: the server exiting, an error, or SIGTERM, SIGINT or SIGHUP
(`kill`, Ctrl-C, a closed terminal). Training jobs run in process groups of their own (training/jobs.py) and go on.

Reflex builds the frontend with bun, which the set-up installs from the npm registry into ./node_modules (Reflex's
own installer downloads from the web, which is not always reachable). Everything the app writes goes to its
sandbox, BACKPROPAGATE_UI__OUTPUT_DIR, checked here before anything starts.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import webbrowser
from pathlib import Path
from typing import Any

from app.auth import hash_password
from app.gate import AllowedHosts
from app.share import Tunnel, open_tunnel
from training.config import Settings, load_settings
from training.errors import BackpropError
from training.sandbox import sandbox_root

ROOT = Path(__file__).resolve().parent.parent  # where rxconfig.py lives
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_GRACE_S = 4.0  # then SIGKILL: all gone, and the port free, well within 10 s


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
    """Build and serve the app; with `auth` every route needs a sign-in; `share` publishes it through a tunnel.

    Returns the server's exit status, or 128 + the signal's number when a stop signal ended it."""
    settings = load_settings()
    host, port = host or settings.ui.host, port or settings.ui.port
    auth = auth or settings.ui.auth
    if dev and auth:  # dev mode serves the pages from a second port, which the gate does not cover
        raise BackpropError("UI_DEV_AUTH_UNSUPPORTED")
    sandbox_root(settings.ui.output_dir)  # refuse a forbidden sandbox before building anything
    AllowedHosts.from_settings(settings.ui)  # and a malformed ui.allowed_hosts entry
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
    try:
        with Children() as children:
            # The tunnel first: the server must know the tunnel's public host to answer to it (app/gate.py).
            tunnel = open_tunnel(port, share, start=children.start) if share is not None else None
            print(f"Backprop UI: building and starting on {url}{' (sign-in required)' if auth else ''} "
                  "(Ctrl-C stops it; running jobs go on)", file=sys.stderr)  # fmt: skip
            server = children.start(command, cwd=ROOT, env=env | gate_environment(settings, host, port, tunnel))
            if tunnel is not None:
                if not _wait_until_up(url, server):
                    return server.wait()
                print(f"Backprop UI: shared at {tunnel.url} (through {tunnel.tool})", file=sys.stderr, flush=True)
            if open_browser:
                threading.Thread(target=_open_when_up, args=(url, server), daemon=True).start()
            return server.wait()
    except Stopped as stop:
        return 128 + stop.signum


def gate_environment(settings: Settings, host: str, port: int, tunnel: Tunnel | None) -> dict[str, str]:
    """What the server's gate must know beyond the settings: the host and port given as flags, the tunnel's host."""
    allowed = [*settings.ui.allowed_hosts, *([tunnel.host] if tunnel is not None else [])]
    return {"BACKPROPAGATE_UI__HOST": host, "BACKPROPAGATE_UI__PORT": str(port),
            "BACKPROPAGATE_UI__ALLOWED_HOSTS": json.dumps(allowed)}  # fmt: skip


class Stopped(Exception):
    """SIGTERM, SIGINT or SIGHUP reached the launcher."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Children:
    """The server and the tunnel, each in a process group of its own, stopped together whatever ends the launcher.

    Inside `with`, a stop signal raises Stopped; on the way out every group gets SIGTERM, and SIGKILL after
    STOP_GRACE_S, until none is left. Training jobs run in process groups of their own (training/jobs.py): never here.
    """

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []
        self._previous: dict[int, Any] = {}
        self._starting = False
        self._pending: int | None = None

    def __enter__(self) -> Children:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's ignored SIGHUP stays ignored
                    self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        self._pending = self._pending or -1  # from here a signal only waits: the clean-up below must run whole
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C does not cut the clean-up short
        try:
            stop_groups(self.processes)
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def start(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Popen in a new process group; a signal that lands while it starts is acted on once its pid is known."""
        self._starting = True
        try:
            process = subprocess.Popen(argv, start_new_session=True, **kwargs)
            self.processes.append(process)
        finally:
            self._starting = False
        if self._pending is not None:  # a signal landed while it started
            raise Stopped(self._pending)
        return process

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._starting or self._pending is not None:  # one stop at a time; none in the middle of a Popen
            self._pending = self._pending or signum
            return
        self._pending = signum
        raise Stopped(signum)


def stop_groups(processes: list[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to every process group, SIGKILL to those still there after grace_s; returns when all are gone."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        alive = [p for p in processes if _group_alive(p)]
        for process in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)
        deadline = time.monotonic() + wait_s
        while any(_group_alive(p) for p in alive) and time.monotonic() < deadline:
            time.sleep(0.05)


def _group_alive(process: subprocess.Popen) -> bool:
    process.poll()  # reap the leader, or its zombie would count as alive
    try:
        os.killpg(process.pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def auth_environment(settings: Settings) -> dict[str, str]:
    """What the server needs to check sign-ins: the password's hash only (asked for here if none is configured)."""
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
