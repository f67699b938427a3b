"""Starting and stopping `backprop ui` (app/launch.py).

A stop signal to the launcher (SIGTERM from `kill`, SIGINT from Ctrl-C, SIGHUP from a closed terminal) stops the
Reflex server, its workers and the tunnel, and frees the port, while a training job started from the page trains on.
Each case runs a real `backprop ui --auth --share cloudflared` with the stand-in cloudflared of tests/test_auth.py on
PATH (a script that prints a trycloudflare.com address; no tunnel is opened) and a real job on the demo model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from conftest import backprop, wait_for
from test_auth import PASSWORD, TUNNEL, fake_cloudflared, sign_in_in_the_browser
from test_ui import CHROMIUM, browser, free_port, steps_shown  # noqa: F401 (browser: chromium, a fixture)

# The bound for server, workers and tunnel gone and the port free: the launcher's 4 s grace, then SIGKILL; the rest
# is headroom for a loaded machine (the time it took is printed).
STOP_WITHIN_S = 30


def refused_ui(*args: str, env: dict) -> subprocess.CompletedProcess:
    """`backprop ui ARGS` that should refuse to start; should it start anyway, its whole process group goes at the end."""
    command = [sys.executable, "-m", "training.cli", "ui", "--no-browser", "--port", str(free_port()), *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **env}, start_new_session=True)  # fmt: skip
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def test_dev_mode_with_sign_in_is_refused_before_anything_starts(home):
    """--dev serves the pages from a second server that the gate does not cover."""
    for args, env in ((("--dev", "--auth"), {}), (("--dev",), {"BACKPROPAGATE_UI__AUTH": "true"})):
        result = refused_ui(*args, env={"BACKPROPAGATE_UI__PASSWORD": PASSWORD, **env})
        assert result.returncode == 1 and "UI_DEV_AUTH_UNSUPPORTED" in result.stderr and "backprop ui --auth" in result.stderr


def test_a_malformed_allowed_host_is_refused_before_anything_starts(home):
    result = refused_ui(env={"BACKPROPAGATE_UI__ALLOWED_HOSTS": "a/b"})
    assert result.returncode == 1 and "CONFIG_INVALID" in result.stderr and "allowed_hosts" in result.stderr


@contextmanager
def stop_signals_not_ignored():
    """As from a terminal: a test run under nohup, or as a background job, would hand SIGHUP or SIGINT down ignored."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGHUP)}
    for sig, handler in previous.items():
        if handler is signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_status(run_id: str, env: dict) -> dict:
    return json.loads(backprop("status", run_id, "--json", env=env, check=True).stdout)


def port_free(port: int) -> bool:
    """Nothing listens on it: a new server could bind it."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_ends_server_workers_and_tunnel_and_frees_the_port_while_a_job_trains_on(sig, tmp_path, tiny_model_dir,
                                                                                              browser):  # noqa: F811 # fmt: skip
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (scripts/test installs it)")
    home = tmp_path / "home"
    shutil.copytree(tiny_model_dir, home / "models" / tiny_model_dir.name)
    port = free_port()
    env = {**os.environ, "PATH": fake_cloudflared(tmp_path), "BACKPROPAGATE_HOME": str(home),
           "BACKPROPAGATE_UI__OUTPUT_DIR": str(tmp_path / "sandbox"), "BACKPROPAGATE_UI__PASSWORD": PASSWORD,
           "BACKPROPAGATE_MIN_FREE_RAM_GB": "0.25", "BACKPROPAGATE_MAX_CPU_PERCENT": "100"}  # fmt: skip
    log = tmp_path / "ui.log"
    with log.open("wb") as out, stop_signals_not_ignored():
        launcher = subprocess.Popen(
            [sys.executable, "-m", "training.cli", "ui", "--auth", "--share", "cloudflared", "--no-browser", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True,
        )  # fmt: skip
    theirs: list[psutil.Process] = []
    run_id = None
    try:

        def shared() -> bool:
            assert launcher.poll() is None, f"backprop ui exited {launcher.returncode}:\n{log.read_text()[-3000:]}"
            return f"shared at https://{TUNNEL}" in log.read_text()

        wait_for(shared, 600, "the app to start and the tunnel to report its address")
        # A job started from the page: its worker is a child of the server's, in a process group of its own.
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        url = f"http://127.0.0.1:{port}/"
        sign_in_in_the_browser(page, url)
        page.goto(url)
        page.wait_for_selector("#start:not([disabled])")
        page.fill("#field-steps", "100000")
        page.click("#start")
        wait_for(lambda: steps_shown(page) >= 1, 180, "the job to train")
        run_id = page.inner_text("#train-run-id")
        page.context.close()
        job = psutil.Process(run_status(run_id, env)["pid"])

        tunnel = psutil.Process(int((tmp_path / "tunnel.pid").read_text()))
        (server,) = [p for p in psutil.Process(launcher.pid).children() if p != tunnel]
        group = os.getpgid(server.pid)
        theirs = [p for p in psutil.process_iter() if _pgid(p) == group] + [tunnel]
        assert len(theirs) >= 3  # reflex, its server worker(s), the tunnel
        assert job in server.children(recursive=True) and os.getpgid(job.pid) == job.pid != group

        os.kill(launcher.pid, sig)  # the launcher alone, as `kill <pid>` does
        sent = time.monotonic()
        wait_for(lambda: launcher.poll() is not None and not any(alive(p) for p in theirs) and port_free(port),
                 STOP_WITHIN_S, f"server, workers and tunnel to stop and port {port} to be free after {sig.name}")  # fmt: skip
        print(f"\n{sig.name}: {len(theirs)} processes stopped and port free after {time.monotonic() - sent:.1f} s")
        assert launcher.returncode == 128 + sig
        assert "Traceback" not in log.read_text()

        # The job trains on.
        step = run_status(run_id, env)["step"]
        wait_for(lambda: run_status(run_id, env)["step"] > step, 120, "the job to make another step")
        assert alive(job) and run_status(run_id, env)["status"] == "running"
    finally:
        if run_id is not None:
            backprop("stop", run_id, env=env)
        if launcher.poll() is None:  # a failed test leaves nothing behind
            launcher.terminate()
            try:
                launcher.wait(timeout=30)
            except subprocess.TimeoutExpired:
                launcher.kill()
        for process in theirs:
            if alive(process):
                process.kill()


def _pgid(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except OSError:
        return None
