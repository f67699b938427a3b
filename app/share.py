"""`backprop ui --share`: publish the local app through a tunnel and say its public address.

Tried in order (or the one asked for): cloudflared (a free trycloudflare.com address, no account), ngrok (needs its
auth token configured), or `ssh:user@host` for an SSH reverse tunnel to a host you control (or a service such as
localhost.run that prints an address). The tunnel is a child process; stopping `backprop ui` stops it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

from training.errors import BackpropError

URL = re.compile(r"https://[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s\"']*")
IGNORED = re.compile(r"https://(www\.)?(cloudflare\.com|developers\.cloudflare\.com|ngrok\.com|dashboard\.ngrok\.com)")


@dataclass
class Tunnel:
    process: subprocess.Popen
    url: str
    tool: str

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


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


def open_tunnel(port: int, how: str = "auto", wait_s: float = 30.0) -> Tunnel:
    """Start the tunnel and return once it printed its public https address; DEP_TUNNEL_UNAVAILABLE otherwise."""
    tools = [how] if how != "auto" else [t for t in ("cloudflared", "ngrok") if shutil.which(t)]
    if not tools:
        raise BackpropError("DEP_TUNNEL_UNAVAILABLE", reason="neither cloudflared nor ngrok is installed")
    problems = []
    for tool in tools:
        argv = command(tool, port)
        if shutil.which(argv[0]) is None:
            problems.append(f"{argv[0]} is not installed")
            continue
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        url = _first_url(process, wait_s)
        if url:
            return Tunnel(process, url, tool)
        process.terminate()
        problems.append(f"{tool} printed no public address within {wait_s:.0f} s")
    raise BackpropError("DEP_TUNNEL_UNAVAILABLE", reason="; ".join(problems))


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
