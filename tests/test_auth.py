"""Authentication of the web app and `backprop ui --share`: passwords, sessions, the gate on every route.

The gate is tested in process (Starlette's TestClient, no sockets) and in front of the real app: `backprop ui --auth
--share cloudflared` with a stand-in cloudflared on PATH that prints an address and serves nothing.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import backprop, wait_for
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from app.auth import COOKIE, Auth, LoginLimiter, check_password, hash_password, session_secret
from app.gate import AuthGate
from training.config import load_settings
from training.errors import BackpropError

PASSWORD = "correct horse battery staple"


# --- passwords, sessions, rate limit ----------------------------------------------------------------------------------


def test_a_password_is_checked_against_its_salted_hash():
    stored = hash_password(PASSWORD)
    assert check_password(PASSWORD, stored) and not check_password("wrong", stored)
    assert hash_password(PASSWORD) != stored  # a new salt each time
    assert not check_password(PASSWORD, "not-a-hash") and not check_password(PASSWORD, "md5$00$00")


def test_the_session_secret_is_private_and_survives_restarts(tmp_path):
    secret = session_secret(tmp_path)
    assert len(secret) == 32 and session_secret(tmp_path) == secret
    assert stat.S_IMODE((tmp_path / "ui-session-secret").stat().st_mode) == 0o600


def test_a_session_is_valid_until_it_expires_and_only_with_our_secret():
    auth = Auth(True, hash_password(PASSWORD), b"k" * 32, session_hours=1)
    assert auth.valid(auth.issue())
    assert not auth.valid(auth.issue(now=time.time() - 2 * 3600))  # expired an hour ago
    assert not Auth(True, "", b"x" * 32).valid(auth.issue())  # signed by someone else
    token = auth.issue()
    assert not auth.valid(token[:-2] + ("AA" if token[-2:] != "AA" else "BB")) and not auth.valid(None)


def test_failed_logins_are_limited_per_client_for_a_minute():
    limiter = LoginLimiter(limit=3, window_s=60)
    for _ in range(3):
        limiter.failed("10.0.0.1", now=100.0)
    assert limiter.blocked("10.0.0.1", now=110.0) == pytest.approx(50.0)
    assert limiter.blocked("10.0.0.2", now=110.0) == 0  # another client is not affected
    assert limiter.blocked("10.0.0.1", now=161.0) == 0  # the window has passed


def test_auth_without_a_password_is_a_coded_error(home, monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_UI__AUTH", "true")
    with pytest.raises(BackpropError) as err:
        Auth.from_settings(load_settings())
    assert err.value.code == "UI_AUTH_PASSWORD_MISSING"
    monkeypatch.setenv("BACKPROPAGATE_UI__PASSWORD", PASSWORD)
    auth = Auth.from_settings(load_settings())
    assert auth.enabled and check_password(PASSWORD, auth.password_hash)


# --- the gate, in process ---------------------------------------------------------------------------------------------


async def inner_app(scope, receive, send):
    """What the gate protects: answers 'inside' over HTTP, accepts websockets."""
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "inside"})
        await send({"type": "websocket.close", "code": 1000})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"inside"})


@pytest.fixture
def gate(tmp_path):
    auth = Auth(True, hash_password(PASSWORD), session_secret(tmp_path), session_hours=1, max_failed_logins=3)
    return TestClient(AuthGate(inner_app, auth), base_url="http://127.0.0.1", follow_redirects=False)


def sign_in(client: TestClient, password: str = PASSWORD, next: str = "/") -> object:
    return client.post("/api/login", data={"password": password, "next": next})


def test_without_a_session_pages_redirect_to_sign_in_and_everything_else_is_refused(gate):
    page = gate.get("/runs", headers={"accept": "text/html"})
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/runs"
    upload = gate.post("/_upload", content=b"data")
    assert upload.status_code == 401 and upload.json()["code"] == "UI_AUTH_REQUIRED"
    with pytest.raises(WebSocketDisconnect) as closed, gate.websocket_connect("/_event/?EIO=4&transport=websocket"):
        pass
    assert closed.value.code == 4401  # closed before it was accepted
    assert gate.get("/ping").text == "inside"  # the health check stays open
    assert 'name="password"' in gate.get("/login").text


def test_signing_in_sets_a_strict_http_only_cookie_that_opens_every_route(gate):
    response = sign_in(gate, next="/runs")
    assert response.status_code == 303 and response.headers["location"] == "/runs"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert gate.get("/runs", headers={"accept": "text/html"}).text == "inside"
    assert gate.post("/_upload", content=b"data").text == "inside"
    session = {"cookie": f"{COOKIE}={gate.cookies[COOKIE]}"}  # the test client's websockets do not send its cookies
    with gate.websocket_connect("/_event/?EIO=4&transport=websocket", headers=session) as ws:
        assert ws.receive_text() == "inside"
    gate.post("/api/logout")
    assert gate.get("/runs", headers={"accept": "text/html"}).status_code == 303


def test_a_wrong_password_says_so_and_repeated_failures_are_throttled(gate):
    wrong = sign_in(gate, "guess")
    assert wrong.status_code == 401 and "Wrong password." in wrong.text and COOKIE not in wrong.headers.get("set-cookie", "")
    sign_in(gate, "guess 2"), sign_in(gate, "guess 3")
    throttled = sign_in(gate)  # even the right password waits now
    assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) > 0 and "Too many" in throttled.text


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example"])
def test_sign_in_never_redirects_to_another_site(gate, target):
    assert sign_in(gate, next=target).headers["location"] == "/"


def test_with_auth_off_the_gate_passes_everything(tmp_path):
    client = TestClient(AuthGate(inner_app, Auth(enabled=False)), base_url="http://127.0.0.1")
    assert client.get("/runs").text == "inside" and client.post("/_upload").text == "inside"


# --- --share is refused without auth ---------------------------------------------------------------------------------


def test_share_without_auth_is_refused_before_anything_starts(home):
    result = backprop("ui", "--share", "--no-browser", timeout=60)
    assert result.returncode == 1 and "UI_SHARE_REQUIRES_AUTH" in result.stderr and "--auth" in result.stderr


def test_auth_without_a_password_and_no_terminal_is_refused(home):
    result = backprop("ui", "--auth", "--no-browser", timeout=60)
    assert result.returncode == 1 and "UI_AUTH_PASSWORD_MISSING" in result.stderr


# --- the real app behind the gate, shared through a stand-in tunnel ---------------------------------------------------

FAKE_CLOUDFLARED = """#!/bin/sh
# Stands in for cloudflared: prints a public address the way it does, then idles until stopped.
echo "$$" > "{pidfile}"
echo "$@" > "{argsfile}"
echo "INF Requesting new quick Tunnel on trycloudflare.com..." >&2
echo "INF |  https://quiet-river-1234.trycloudflare.com  |" >&2
exec sleep 600
"""


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir):
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("chromium is not installed (scripts/test installs it)")
    base = tmp_path_factory.mktemp("auth")
    bin_dir = base / "bin"
    bin_dir.mkdir()
    (bin_dir / "cloudflared").write_text(FAKE_CLOUDFLARED.format(pidfile=base / "tunnel.pid", argsfile=base / "tunnel.args"))
    (bin_dir / "cloudflared").chmod(0o755)
    home = base / "home"
    shutil.copytree(tiny_model_dir, home / "models" / tiny_model_dir.name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "BACKPROPAGATE_HOME": str(home),
           "BACKPROPAGATE_UI__OUTPUT_DIR": str(base / "sandbox"), "BACKPROPAGATE_UI__PASSWORD": PASSWORD}  # fmt: skip
    log = base / "ui.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "training.cli", "ui", "--auth", "--share", "cloudflared", "--no-browser", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=base, start_new_session=True,
        )  # fmt: skip

    def shared_address() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"backprop ui exited {process.returncode}:\n{log.read_text()[-3000:]}")
        return "shared at https://quiet-river-1234.trycloudflare.com" in log.read_text()

    try:
        wait_for(shared_address, 600, "the app to start and the tunnel to report its address")
        yield {"port": port, "base": base, "log": log, "process": process}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def raw_request(port: int, path: str, headers: dict | None = None, method: str = "GET") -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request(method, path, headers=headers or {})
    return connection.getresponse()


def websocket_handshake(port: int, cookie: str = "") -> str:
    """The first line of the server's answer to a websocket upgrade on the app's event channel."""
    request = (
        "GET /_event/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        + (f"Cookie: {cookie}\r\n" if cookie else "") + "\r\n"
    )  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request.encode())
        return s.recv(4096).decode("latin-1").splitlines()[0]


def test_the_tunnel_points_at_the_local_app(shared):
    args = (shared["base"] / "tunnel.args").read_text()
    assert f"--url http://127.0.0.1:{shared['port']}" in args


def test_every_route_of_the_real_app_needs_a_session(shared):
    port = shared["port"]
    page = raw_request(port, "/runs", {"Accept": "text/html"})
    assert page.status == 303 and page.getheader("location") == "/login?next=/runs"
    upload = raw_request(port, "/_upload", {"Content-Length": "0"}, method="POST")
    assert upload.status == 401 and json.loads(upload.read())["code"] == "UI_AUTH_REQUIRED"
    assert " 101 " not in websocket_handshake(port)  # refused before the upgrade
    assert raw_request(port, "/ping").status == 200


def test_a_user_signs_in_in_the_browser_and_the_app_works(shared):
    from playwright.sync_api import sync_playwright

    url = f"http://127.0.0.1:{shared['port']}/"
    with sync_playwright() as p:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=flags)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url + "dataset")
        assert "/login" in page.url
        page.fill("#password", "not it")
        page.click("#sign-in")
        assert "Wrong password." in page.inner_text("#login-error")
        page.fill("#password", PASSWORD)
        page.click("#sign-in")
        page.wait_for_url(re.compile(r".*/dataset/?$"))  # back where the user was going
        page.wait_for_selector("#upload-button")
        page.goto(url)  # the live parts need the event websocket: the detected format arrives through it
        wait_for(lambda: page.query_selector("#dataset-format") and page.inner_text("#dataset-format") == "openai", 60,
                 "the dataset format, over the websocket")  # fmt: skip
        cookie = next(c for c in page.context.cookies() if c["name"] == COOKIE)
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        browser.close()
    assert " 101 " in websocket_handshake(shared["port"], f"{COOKIE}={cookie['value']}")


def test_stopping_the_app_stops_the_tunnel(shared):
    pid = int((shared["base"] / "tunnel.pid").read_text())
    os.killpg(shared["process"].pid, signal.SIGTERM)
    shared["process"].wait(timeout=30)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], 30,
             "the tunnel to stop")  # fmt: skip
