"""Other websites cannot drive the local app (app/gate.py): Host and Origin are checked on every route, signed in or not.

The matrix Host x Origin x route, with sign-in off and on, runs twice: in process against the ASGI gate with a tiny
app behind it, and over real sockets (HTTP requests, websocket handshakes) against `backprop ui` (sign-in off here;
tests/test_auth.py runs it with sign-in on, behind a stand-in tunnel). Both print their table. Then chromium still
uses the app on 127.0.0.1 and on localhost: the event websocket and an upload.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import socket
import urllib.parse
from pathlib import Path

import psutil
import pytest
from conftest import DEMO_DATA, inside_app, wait_for
from starlette.testclient import TestClient, WebSocketDenialResponse
from test_ui import CHROMIUM, Server, browser, upload  # noqa: F401 (browser: chromium, a fixture)

from app.gate import AllowedHosts, protect
from training.config import load_settings
from training.errors import BackpropError

PASSWORD = "correct horse battery staple"
PORT = 7862
TUNNEL = "quiet-river-1234.trycloudflare.com"  # what a --share tunnel's public host looks like
OWN_NAME = "studio.lan"  # a name of the user's own, given in ui.allowed_hosts

# Host headers: the names this app answers to, and requests that merely reach its port.
SERVED = ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", TUNNEL, OWN_NAME + ":{port}"]
NOT_SERVED = ["evil.example:{port}", "localhost:1", "127.0.0.1"]  # DNS rebinding; another port; port 80
# Origins: the app's own pages (or no browser at all), and other sites' pages.
OWN = [None, "http://127.0.0.1:{port}", "http://localhost:{port}", f"https://{TUNNEL}"]
FOREIGN = ["http://evil.example", "http://localhost:3000", "null", f"https://{TUNNEL}.evil.example"]
ROUTES = ["page", "event", "upload", "login", "ping"]


def expected(route: str, host: str, origin: str | None, auth: bool) -> str:
    """The specification: host first, then origin (a websocket must name one), then sign-in when it is on."""
    if host in NOT_SERVED:
        return "403 UI_HOST_NOT_ALLOWED"
    if origin in FOREIGN or (origin is None and route == "event"):
        return "403 UI_ORIGIN_NOT_ALLOWED"
    if not auth or route == "ping":
        return "served"
    return {"page": "303 sign-in", "login": "303 signed in"}.get(route, "401 UI_AUTH_REQUIRED")


MATRIX = [(host, origin, route) for host in SERVED + NOT_SERVED for origin in OWN + FOREIGN for route in ROUTES]


def outcome(status: int, headers: dict[str, str], body: bytes) -> str:
    """What a request came to, in the words of `expected`."""
    if status in (401, 403):
        try:
            return f"{status} {json.loads(body)['code']}"
        except (ValueError, KeyError):
            return f"{status} without a code"
    if status == 303:
        return "303 signed in" if "set-cookie" in headers else "303 sign-in" if "/login" in headers["location"] else "303"
    return "served"  # whatever the app behind the gate answered


def table(results: dict[tuple[str, str | None, str], str], port: int) -> str:
    short = {"served": "ok", "403 UI_HOST_NOT_ALLOWED": "403 host", "403 UI_ORIGIN_NOT_ALLOWED": "403 origin",
             "401 UI_AUTH_REQUIRED": "401 auth", "303 sign-in": "303 login", "303 signed in": "303 cookie"}  # fmt: skip
    lines = [f"{'Host':<36} {'Origin':<44} " + " ".join(f"{r:<11}" for r in ROUTES)]
    for host in SERVED + NOT_SERVED:
        for origin in OWN + FOREIGN:
            cells = [short.get(results[host, origin, r], results[host, origin, r]) for r in ROUTES]
            lines.append(
                f"{host.format(port=port):<36} {str(origin).format(port=port):<44} " + " ".join(f"{c:<11}" for c in cells)
            )
    return "\n".join(lines)


# --- in process: the ASGI gate with a tiny app behind it ---------------------------------------------------------------


def gate_settings(monkeypatch, home: Path, auth: bool):
    monkeypatch.setenv("BACKPROPAGATE_HOME", str(home))
    monkeypatch.setenv("BACKPROPAGATE_UI__PORT", str(PORT))
    monkeypatch.setenv("BACKPROPAGATE_UI__ALLOWED_HOSTS", f"{OWN_NAME},{TUNNEL}")
    monkeypatch.setenv("BACKPROPAGATE_UI__AUTH", str(auth).lower())
    monkeypatch.setenv("BACKPROPAGATE_UI__PASSWORD", PASSWORD)
    return load_settings()


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        home = tmp_path_factory.mktemp("gate")
        return {auth: TestClient(protect(inside_app, gate_settings(monkeypatch, home, auth)), base_url=f"http://127.0.0.1:{PORT}",
                                 follow_redirects=False) for auth in (False, True)}  # fmt: skip


def in_process(client: TestClient, route: str, host: str, origin: str | None) -> str:
    client.cookies.clear()  # each case without a session: signing in is one of the cases
    headers = {"host": host.format(port=PORT), "accept": "text/html"} | ({"origin": origin.format(port=PORT)} if origin else {})
    if route == "event":
        try:
            with client.websocket_connect(f"ws://127.0.0.1:{PORT}/_event/?EIO=4&transport=websocket", headers=headers) as ws:
                return "served" if ws.receive_text() == "inside" else "?"
        except WebSocketDenialResponse as denied:  # refused before accept, with the coded answer
            return outcome(denied.status_code, dict(denied.headers), denied.content)
    if route == "page":
        response = client.get("/runs", headers=headers)
    elif route == "upload":
        response = client.post("/_upload", content=b"data", headers=headers)
    elif route == "login":
        response = client.post("/api/login", data={"password": PASSWORD, "next": "/"}, headers=headers)
    else:
        response = client.get("/ping", headers=headers)
    return outcome(response.status_code, dict(response.headers), response.content)


@pytest.mark.parametrize("auth", [False, True], ids=["auth-off", "auth-on"])
def test_host_origin_and_route_matrix_in_process(clients, auth, capsys):
    results = {(host, origin, route): in_process(clients[auth], route, host, origin) for host, origin, route in MATRIX}
    with capsys.disabled():
        print(f"\nThe gate in process, sign-in {'on' if auth else 'off'}:\n{table(results, PORT)}")
    wrong = {case: (got, expected(case[2], case[0], case[1], auth)) for case, got in results.items()
             if got != expected(case[2], case[0], case[1], auth)}  # fmt: skip
    assert not wrong, f"{len(wrong)} of {len(MATRIX)} cases differ (got, expected): {wrong}"


def test_a_refused_request_says_why_with_a_code_and_a_hint_naming_the_setting(clients):
    page = clients[False].get("/", headers={"host": f"evil.example:{PORT}"})
    assert page.status_code == 403
    body = page.json()
    assert body["code"] == "UI_HOST_NOT_ALLOWED" and "evil.example" in body["message"] and "ui.allowed_hosts" in body["hint"]
    post = clients[False].post("/_upload", headers={"origin": "http://evil.example"})
    assert post.json()["code"] == "UI_ORIGIN_NOT_ALLOWED" and "ui.allowed_hosts" in post.json()["hint"]


def test_a_websocket_is_closed_before_accept_where_the_server_cannot_answer_a_refusal(clients):
    """Servers without the ASGI websocket denial extension: the handshake is closed, never accepted."""
    gate = clients[True].app

    async def run(headers: list) -> list[dict]:
        sent: list[dict] = []

        async def receive():
            return {"type": "websocket.connect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "websocket", "path": "/_event/", "headers": headers, "server": ("127.0.0.1", PORT), "scheme": "ws"}
        await gate(scope, receive, send)
        return sent

    refused_host = asyncio.run(run([(b"host", b"evil.example"), (b"origin", b"http://evil.example")]))
    no_session = asyncio.run(run([(b"host", f"127.0.0.1:{PORT}".encode()), (b"origin", f"http://127.0.0.1:{PORT}".encode())]))
    assert refused_host == [{"type": "websocket.close", "code": 4403}]
    assert no_session == [{"type": "websocket.close", "code": 4401}]


def test_a_host_forwarded_by_a_proxy_must_be_served_too(clients):
    client, host = clients[False], {"host": f"127.0.0.1:{PORT}"}
    assert client.get("/ping", headers=host | {"x-forwarded-host": TUNNEL}).status_code == 200
    assert client.get("/ping", headers=host | {"x-forwarded-host": "evil.example"}).json()["code"] == "UI_HOST_NOT_ALLOWED"


def test_allowed_hosts_take_names_ports_and_pasted_addresses_and_refuse_garbage(monkeypatch, tmp_path):
    monkeypatch.setenv("BACKPROPAGATE_UI__ALLOWED_HOSTS", "Studio.LAN, box.lan:8443, https://pasted.example/")
    monkeypatch.setenv("BACKPROPAGATE_UI__HOST", "192.168.1.5")
    allowed = AllowedHosts.from_settings(load_settings().ui)
    scope = {"server": ("127.0.0.1", PORT)}
    assert allowed.allows("studio.lan", 1234, scope) and allowed.allows("pasted.example", 443, scope)  # any port
    assert allowed.allows("box.lan", 8443, scope) and not allowed.allows("box.lan", 80, scope)  # only that port
    assert allowed.allows("192.168.1.5", 7862, scope) and not allowed.allows("192.168.1.5", 22, scope)  # ui.host
    monkeypatch.setenv("BACKPROPAGATE_UI__ALLOWED_HOSTS", '["ok.lan", "bad host"]')
    with pytest.raises(BackpropError) as err:
        AllowedHosts.from_settings(load_settings().ui)
    assert err.value.code == "CONFIG_INVALID" and "bad host" in str(err.value)


def test_listening_on_every_address_answers_to_this_machine_s_addresses_only(monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_UI__HOST", "0.0.0.0")
    allowed = AllowedHosts.from_settings(load_settings().ui)
    scope = {"server": ("0.0.0.0", str(PORT))}  # as granian reports it: the bound address, the port as text
    addresses = [a.address.split("%")[0].lower() for addrs in psutil.net_if_addrs().values() for a in addrs
                 if a.family in (socket.AF_INET, socket.AF_INET6)]  # fmt: skip
    assert addresses and all(allowed.allows(a, PORT, scope) for a in addresses)  # what a browser on the LAN types
    assert not allowed.allows("evil.example", PORT, scope) and not allowed.allows("0.0.0.0", PORT, scope)
    assert not allowed.allows(addresses[0], 22, scope)  # on the app's port only


# --- for real: `backprop ui` over sockets, and in chromium ------------------------------------------------------------


@pytest.fixture(scope="module")
def open_app(tmp_path_factory, tiny_model_dir):
    """`backprop ui` with sign-in off (the default), answering to one name of the user's own besides loopback."""
    base = tmp_path_factory.mktemp("gate-real")
    home = base / "home"
    shutil.copytree(tiny_model_dir, home / "models" / tiny_model_dir.name)
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home), "BACKPROPAGATE_UI__OUTPUT_DIR": str(base / "sandbox"),
           "BACKPROPAGATE_UI__ALLOWED_HOSTS": f"{OWN_NAME},{TUNNEL}", "BACKPROPAGATE_MIN_FREE_RAM_GB": "0.25"}  # fmt: skip
    env.pop("BACKPROPAGATE_UI__AUTH", None)
    ui = Server(base, env)
    ui.start()
    try:
        yield ui
    finally:
        ui.stop()


def http_request(port: int, method: str, path: str, headers: dict, body: bytes = b"") -> tuple[int, dict, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request(method, path, body=body, headers=headers | {"Content-Length": str(len(body))})
    response = connection.getresponse()
    result = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    connection.close()
    return result


def websocket_handshake(port: int, headers: dict) -> tuple[int, dict, bytes]:
    """A websocket upgrade on the app's event channel, as a browser sends it; the server's answer, parsed."""
    lines = ["GET /_event/?EIO=4&transport=websocket HTTP/1.1", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
             *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        found = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines if ":" in h)}
        if int(found.get("content-length", 0)) > len(body):  # a refusal's coded body
            s.settimeout(10)
            while len(body) < int(found["content-length"]):
                body += s.recv(65536)
        return int(status_line.split()[1]), found, body


def over_sockets(port: int, route: str, host: str, origin: str | None, cookie: str = "") -> str:
    headers = {"Host": host.format(port=port), "Accept": "text/html"}
    headers |= ({"Origin": origin.format(port=port)} if origin else {}) | ({"Cookie": cookie} if cookie else {})
    if route == "event":
        status, found, body = websocket_handshake(port, headers)
        return "served" if status == 101 else outcome(status, found, body)
    if route == "page":
        return outcome(*http_request(port, "GET", "/runs", headers))
    if route == "upload":
        return outcome(*http_request(port, "POST", "/_upload", headers, b"data"))
    if route == "login":
        form = urllib.parse.urlencode({"password": PASSWORD, "next": "/"}).encode()
        return outcome(
            *http_request(port, "POST", "/api/login", headers | {"Content-Type": "application/x-www-form-urlencoded"}, form)
        )
    return outcome(*http_request(port, "GET", "/ping", headers))


def real_matrix(port: int, auth: bool, title: str) -> None:
    """Every case of the matrix against a real server, printed as a table; fails on any difference."""
    results = {(host, origin, route): over_sockets(port, route, host, origin) for host, origin, route in MATRIX}
    print(f"\n{title}:\n{table(results, port)}")
    wrong = {case: (got, expected(case[2], case[0], case[1], auth)) for case, got in results.items()
             if got != expected(case[2], case[0], case[1], auth)}  # fmt: skip
    assert not wrong, f"{len(wrong)} of {len(MATRIX)} cases differ (got, expected): {wrong}"


@pytest.mark.e2e
def test_host_origin_and_route_matrix_against_the_real_app_with_sign_in_off(open_app, capsys):
    with capsys.disabled():
        real_matrix(open_app.port, False, "backprop ui, sign-in off, real HTTP and websocket handshakes")


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["127.0.0.1", "localhost"])
def test_the_app_works_in_chromium_on_127_0_0_1_and_on_localhost(open_app, browser, name, tmp_path):  # noqa: F811
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (scripts/test installs it)")
    url = f"http://{name}:{open_app.port}/"
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    refused: list[str] = []
    page.on("response", lambda r: refused.append(f"{r.status} {r.url}") if r.status == 403 else None)
    page.goto(url)
    # The detected format comes from the server over the event websocket: the gate let the page's own origin in.
    wait_for(lambda: page.query_selector("#dataset-format") and page.inner_text("#dataset-format") == "openai", 120,
             f"the dataset format over the websocket on {name}")  # fmt: skip
    data = tmp_path / "chats.jsonl"
    data.write_text(DEMO_DATA.read_text())
    upload(page, {"url": url}, data)  # an upload: a POST with the page's Origin
    wait_for(lambda: page.query_selector("#dataset-stats") is not None, 120, f"the uploaded dataset's statistics on {name}")
    assert "openai" in page.inner_text("#dataset-stats") and not refused
    context.close()
