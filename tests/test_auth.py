"""Authentication of the web app and `backprop ui --share`: passwords, sessions, the gate on every route.

The gate is tested in process (Starlette's TestClient, no sockets) and in front of the real app: `backprop ui --auth
--share cloudflared` with a stand-in cloudflared on PATH that prints an address and serves nothing, and a stand-in for
the tunnel's far end (a loopback TCP forwarder that chromium reaches under the tunnel's host name).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import DEMO_DATA, backprop, inside_app, wait_for
from starlette.testclient import TestClient, WebSocketDenialResponse
from test_gate import OWN_NAME, TUNNEL, http_request, real_matrix, websocket_handshake
from test_ui import free_port, upload

from app.auth import COOKIE, Auth, LoginLimiter, check_password, hash_password, session_secret
from app.gate import AuthGate, protect
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


@pytest.mark.parametrize(
    "content", ["", "\n", "00" * 16, "not hex at all", "ab" * 31], ids=["empty", "newline", "16-bytes", "not-hex", "31-bytes"]
)
def test_an_empty_short_or_garbled_session_secret_is_replaced_atomically_by_a_private_32_byte_one(tmp_path, content):
    path = tmp_path / "ui-session-secret"
    path.write_text(content)
    path.chmod(0o644)
    secret = session_secret(tmp_path)
    assert len(secret) == 32 and bytes.fromhex(path.read_text()) == secret  # never an empty or short signing key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and session_secret(tmp_path) == secret
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ui-session-secret.lock", "ui-session-secret"]  # no temp file left


def test_server_workers_starting_together_on_a_bad_secret_agree_on_one_new_secret(tmp_path):
    (tmp_path / "ui-session-secret").write_text("")
    code = f"from pathlib import Path; from app.auth import session_secret; print(session_secret(Path({str(tmp_path)!r})).hex())"
    workers = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    secrets = {w.communicate(timeout=120)[0].strip() for w in workers}
    assert len(secrets) == 1 and len(bytes.fromhex(secrets.pop())) == 32


def test_sessions_are_never_signed_with_a_short_key():
    with pytest.raises(ValueError):
        Auth(True, hash_password(PASSWORD), b"")
    with pytest.raises(ValueError):
        Auth(True, hash_password(PASSWORD), b"k" * 31)


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


@pytest.fixture
def gate(tmp_path):
    auth = Auth(True, hash_password(PASSWORD), session_secret(tmp_path), session_hours=1, max_failed_logins=3)
    return TestClient(AuthGate(inside_app, auth), base_url="http://127.0.0.1", follow_redirects=False)


def sign_in(client: TestClient, password: str = PASSWORD, next: str = "/") -> object:
    return client.post("/api/login", data={"password": password, "next": next})


def test_without_a_session_pages_redirect_to_sign_in_and_everything_else_is_refused(gate):
    page = gate.get("/runs", headers={"accept": "text/html"})
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/runs"
    upload = gate.post("/_upload", content=b"data")
    assert upload.status_code == 401 and upload.json()["code"] == "UI_AUTH_REQUIRED"
    with pytest.raises(WebSocketDenialResponse) as refused, gate.websocket_connect("/_event/?EIO=4&transport=websocket"):
        pass
    assert refused.value.status_code == 401 and refused.value.json()["code"] == "UI_AUTH_REQUIRED"  # before accept
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


def test_with_auth_off_only_the_host_and_origin_check_stands_in_front_of_the_app(home, monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_UI__AUTH", "false")
    client = TestClient(protect(inside_app, load_settings()), base_url="http://127.0.0.1:7862")
    own = {"origin": "http://127.0.0.1:7862"}
    assert client.get("/runs").text == "inside" and client.post("/_upload", headers=own).text == "inside"
    assert client.get("/login").text == "inside"  # no sign-in form: the app's own routes
    assert client.post("/_upload", headers={"origin": "http://evil.example"}).status_code == 403


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
echo "INF |  https://{host}  |" >&2
exec sleep 600
"""


def fake_cloudflared(base: Path) -> str:
    """Puts the stand-in cloudflared in base/bin (it notes its pid and arguments in base); returns a PATH with it first."""
    bin_dir = base / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = FAKE_CLOUDFLARED.format(pidfile=base / "tunnel.pid", argsfile=base / "tunnel.args", host=TUNNEL)
    (bin_dir / "cloudflared").write_text(script)
    (bin_dir / "cloudflared").chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


class StandInTunnelEnd:
    """Stands in for the tunnel's public end: a TCP forwarder to the app on loopback that rewrites nothing.

    It listens on 127.0.0.2 on the app's own port, and chromium reaches it under the tunnel's host name
    (--host-resolver-rules): every request, the page's own calls to the server included, carries that Host and Origin,
    as through the real tunnel (which speaks https on port 443; this one http on the app's port)."""

    def __init__(self, app_port: int):
        self.app_port = app_port
        self.listener = socket.create_server(("127.0.0.2", app_port))
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> StandInTunnelEnd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.app_port))
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir):
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("chromium is not installed (scripts/test installs it)")
    base = tmp_path_factory.mktemp("auth")
    home = base / "home"
    shutil.copytree(tiny_model_dir, home / "models" / tiny_model_dir.name)
    port = free_port()
    env = {**os.environ, "PATH": fake_cloudflared(base), "BACKPROPAGATE_HOME": str(home),
           "BACKPROPAGATE_UI__OUTPUT_DIR": str(base / "sandbox"), "BACKPROPAGATE_UI__PASSWORD": PASSWORD,
           "BACKPROPAGATE_UI__ALLOWED_HOSTS": OWN_NAME}  # fmt: skip
    log = base / "ui.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "training.cli", "ui", "--auth", "--share", "cloudflared", "--no-browser", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=base, start_new_session=True,
        )  # fmt: skip

    def shared_address() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"backprop ui exited {process.returncode}:\n{log.read_text()[-3000:]}")
        return f"shared at https://{TUNNEL}" in log.read_text()

    try:
        wait_for(shared_address, 600, "the app to start and the tunnel to report its address")
        yield {"port": port, "base": base, "log": log, "process": process}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def own(port: int, cookie: str = "") -> dict[str, str]:
    """The headers of a request from the app's own page."""
    return {"Host": f"127.0.0.1:{port}", "Origin": f"http://127.0.0.1:{port}"} | ({"Cookie": cookie} if cookie else {})


def test_the_tunnel_points_at_the_local_app(shared):
    args = (shared["base"] / "tunnel.args").read_text()
    assert f"--url http://127.0.0.1:{shared['port']}" in args


def test_host_origin_and_route_matrix_against_the_real_app_with_sign_in_on(shared, capsys):
    # The tunnel's host is among the served ones without being configured: the launcher told the server.
    with capsys.disabled():
        real_matrix(shared["port"], True, "backprop ui --auth --share (stand-in tunnel), real HTTP and websocket handshakes")


def test_every_route_of_the_real_app_needs_a_session(shared):
    port = shared["port"]
    status, headers, _ = http_request(port, "GET", "/runs", own(port) | {"Accept": "text/html"})
    assert status == 303 and headers["location"] == "/login?next=/runs"
    status, _, body = http_request(port, "POST", "/_upload", own(port))
    assert status == 401 and json.loads(body)["code"] == "UI_AUTH_REQUIRED"
    assert websocket_handshake(port, own(port))[0] == 401  # refused before the upgrade
    assert http_request(port, "GET", "/ping", own(port))[0] == 200


def sign_in_in_the_browser(page, url: str) -> None:
    page.goto(url + "dataset")
    assert "/login" in page.url
    page.fill("#password", "not it")
    page.click("#sign-in")
    assert "Wrong password." in page.inner_text("#login-error")
    page.fill("#password", PASSWORD)
    page.click("#sign-in")
    page.wait_for_url(re.compile(r".*/dataset/?$"))  # back where the user was going
    page.wait_for_selector("#upload-button")


def the_app_works(page, url: str, data: Path) -> None:
    """The live parts need the event websocket (the detected format arrives through it); an upload is a POST."""
    page.goto(url)
    wait_for(lambda: page.query_selector("#dataset-format") and page.inner_text("#dataset-format") == "openai", 60,
             "the dataset format, over the websocket")  # fmt: skip
    data.write_text(DEMO_DATA.read_text())
    upload(page, {"url": url}, data)
    wait_for(lambda: page.query_selector("#dataset-stats") is not None, 120, "the uploaded dataset's statistics")


def chromium(p, *extra_flags: str):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", *extra_flags]
    return p.chromium.launch(executable_path="/usr/bin/chromium", args=flags)


def test_a_user_signs_in_in_the_browser_and_the_app_works(shared, tmp_path):
    from playwright.sync_api import sync_playwright

    url = f"http://127.0.0.1:{shared['port']}/"
    with sync_playwright() as p:
        browser = chromium(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        sign_in_in_the_browser(page, url)
        the_app_works(page, url, tmp_path / "chats.jsonl")
        cookie = next(c for c in page.context.cookies() if c["name"] == COOKIE)
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        browser.close()
    assert websocket_handshake(shared["port"], own(shared["port"], f"{COOKIE}={cookie['value']}"))[0] == 101


def test_through_the_tunnel_s_host_a_user_signs_in_and_the_app_works(shared, tmp_path):
    from playwright.sync_api import sync_playwright

    refused: list[str] = []
    with StandInTunnelEnd(shared["port"]), sync_playwright() as p:
        browser = chromium(p, f"--host-resolver-rules=MAP {TUNNEL} 127.0.0.2")
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("response", lambda r: refused.append(f"{r.status} {r.url}") if r.status == 403 else None)
        url = f"http://{TUNNEL}:{shared['port']}/"
        sign_in_in_the_browser(page, url)
        the_app_works(page, url, tmp_path / "chats.jsonl")
        browser.close()
    assert not refused


def test_stopping_the_app_stops_the_tunnel(shared):
    pid = int((shared["base"] / "tunnel.pid").read_text())
    os.killpg(shared["process"].pid, signal.SIGTERM)
    shared["process"].wait(timeout=30)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], 30,
             "the tunnel to stop")  # fmt: skip
