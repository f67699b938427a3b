"""`backprop ui --share`: publish the local app through a tunnel and say its public address.

Tried in order (or the one asked for): cloudflared (a free trycloudflare.com address, no account), ngrok (needs its
auth token configured), or `ssh:user@host` for an SSH reverse tunnel to a host you control (or a service such as
localhost.run that prints an address). The tunnel is a child process in a process group of its own, which
`backprop ui` stops with the server (app/launch.py). It opens before the app is up: none of these tools needs the
app to answer to print its address, and the app must know that address first, to answer to the tunnel's host
(app/gate.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from training.errors import BackpropError

URL = re.compile(r"https://[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s\"']*")
IGNORED = re.compile(r"https://(www\.)?(cloudflare\.com|developers\.cloudflare\.com|ngrok\.com|dashboard\.ngrok\.com)")

Start = Callable[..., subprocess.Popen]


@dataclass
class Tunnel:
    process: subprocess.Popen
    url: str
    tool: str

    @property
    def host(self) -> str:
        """The public host name, the Host header of every request that comes through the tunnel."""
        return urlsplit(self.url).hostname or ""


def command(tool: str, port: int) -> list[str]:
    local = f"http://127.0.0.1:{port}"
    if tool == "cloudflared":
        return ["cloudflared", "tunnel", "--no-autoupdate", "--url", local]
    if tool == "ngrok":
        return ["ngrok", "http", str(port), "--log", "stdout"]
    if tool.startswith("ssh:"):
        return ["ssh", "-o", "ServerAliveInterval=30", "-o", "ExitOnForwardFailure=yes", "-N", "-R",
                f"80:127.0.0.1:{port}", tool.removeprefix("ssh:")]  # fmt: skip
    raise BackpropError("DEP_TUNNEL_UNAVAILABLE", reason=f"unknown tunnel '{tool}' (cloudflared, ngrok or ssh:user@host)")


def open_tunnel(port: int, how: str = "auto", wait_s: float = 30.0, start: Start | None = None) -> Tunnel:
    """Start the tunnel and return once it printed its public https address; DEP_TUNNEL_UNAVAILABLE otherwise.

    `start` launches the process (the launcher's, which keeps track of it); by default, in a process group of its own."""
    start = start or (lambda argv, **kwargs: subprocess.Popen(argv, start_new_session=True, **kwargs))
    tools = [how] if how != "auto" else [t for t in ("cloudflared", "ngrok") if shutil.which(t)]
    if not tools:
        raise BackpropError("DEP_TUNNEL_UNAVAILABLE", reason="neither cloudflared nor ngrok is installed")
    problems = []
    for tool in tools:
        argv = command(tool, port)
        if shutil.which(argv[0]) is None:
            problems.append(f"{argv[0]} is not installed")
            continue
        process = start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        try:
            url = _first_url(process, wait_s)
        except BaseException:  # stopped while waiting: the tunnel goes too
            _end(process)
            raise
        if url:
            return Tunnel(process, url, tool)
        _end(process)
        problems.append(f"{tool} printed no public address within {wait_s:.0f} s")
    raise BackpropError("DEP_TUNNEL_UNAVAILABLE", reason="; ".join(problems))


def _end(process: subprocess.Popen) -> None:
    """Stop a tunnel that will not be used, its whole process group, and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _first_url(process: subprocess.Popen, wait_s: float) -> str | None:
    """Read the tunnel's output until it names its public address (the rest is drained so it never blocks)."""
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if not found:
                match = next((m.group(0) for m in URL.finditer(line) if not IGNORED.match(m.group(0))), None)
                if match:
                    found.append(match.rstrip(".,|"))
                    ready.set()
        ready.set()  # the process ended

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + wait_s
    while not ready.is_set() and time.monotonic() < deadline:
        ready.wait(0.2)
    return found[0] if found else None
