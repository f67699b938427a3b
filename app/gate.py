"""The one ASGI gate in front of the whole web app (pages, the /_event websocket, /_upload, /api/*), in two layers.

`protect` is what app/app.py hands Reflex (rx.App(api_transformer=...)): it wraps the app Reflex serves on one port,
so each check covers every route.

1. HostCheck, always on, signed in or not: other websites must not drive the local app.
   - The Host (and X-Forwarded-Host, when a proxy sets one) must name this app: localhost, 127.0.0.1, [::1] or ui.host
     on the app's port (with ui.host 0.0.0.0: any address of this machine), the tunnel's public host, or a name in
     ui.allowed_hosts. This stops DNS rebinding (a page of evil.example whose name now resolves to 127.0.0.1).
   - An Origin, whenever a request carries one, must be the app's own (http(s)://an allowed host). Browsers send it on
     every websocket handshake (required here), every POST, and every cross-site fetch, so another site's page can
     neither open the event channel, upload, post a form nor read an answer (Reflex answers CORS with '*').
     Clients that are not browsers (curl, scripts) send no Origin and pass on the Host alone.
   Refused: 403 with UI_HOST_NOT_ALLOWED or UI_ORIGIN_NOT_ALLOWED; a websocket is closed before it is accepted.

2. AuthGate, only with ui.auth:
   GET  /login        the sign-in form (served here, so it needs nothing behind the gate)
   POST /api/login    password -> session cookie (HttpOnly, SameSite=Strict), or the form again with why not
   POST /api/logout   forget the cookie
   /ping, /favicon.svg, /logo.svg   open (health check, and what the sign-in form shows)
   anything else      needs a valid session: pages redirect to /login, other requests get 401 UI_AUTH_REQUIRED,
                      a websocket is closed before it is accepted
"""

from __future__ import annotations

import html
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import psutil
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from app.auth import COOKIE, Auth, LoginLimiter, check_password
from training.config import Settings, UiSettings, load_settings
from training.errors import BackpropError

OPEN_PATHS = {"/ping", "/favicon.svg", "/logo.svg"}
MAX_LOGIN_BODY = 8192
LOOPBACK = ("localhost", "127.0.0.1", "::1")
ANY_ADDRESS = ("0.0.0.0", "::", "")  # ui.host values that listen everywhere but name no host
DEFAULT_PORT = {"http": 80, "ws": 80, "https": 443, "wss": 443}

Scope = dict[str, Any]
log = logging.getLogger("backprop.gate")


def protect(app: Any, settings: Settings | None = None) -> Any:
    """The whole gate: the Host/Origin check always, then the sign-in when ui.auth is on."""
    settings = settings or load_settings()
    auth = Auth.from_settings(settings)
    return HostCheck(AuthGate(app, auth) if auth.enabled else app, AllowedHosts.from_settings(settings.ui))


# --- layer 1: the Host and Origin check --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllowedHosts:
    """The names this app answers to: `local` ones on the app's own ports, `named` ones on their port (None: any)."""

    local: frozenset[str]
    ports: frozenset[int]
    named: frozenset[tuple[str, int | None]]

    @classmethod
    def from_settings(cls, ui: UiSettings) -> AllowedHosts:
        local = set(LOOPBACK)
        if _name(ui.host) in ANY_ADDRESS:
            local |= _machine_addresses()  # names, such as the machine's own, go in ui.allowed_hosts
        else:
            local.add(_name(ui.host))
        named = set()
        for entry in ui.allowed_hosts:
            # Also take a pasted address ('https://name/'), keeping only its host and port.
            parsed = split_authority(urlsplit(entry).netloc if "://" in entry else entry.rstrip("/"), None)
            if parsed is None:
                raise BackpropError("CONFIG_INVALID", reason=f"ui.allowed_hosts: '{entry}' is not a host name or name:port")
            named.add(parsed)
        return cls(frozenset(local), frozenset({ui.port}), frozenset(named))

    def allows(self, name: str, port: int | None, scope: Scope) -> bool:
        if (name, port) in self.named or (name, None) in self.named:
            return True
        server = scope.get("server") or (None, None)
        # The port the server listens on counts too: in dev mode the pages' port (ui.port) and the server's differ.
        ports = self.ports | ({int(server[1])} if server[1] else set())
        return name in self.local and port in ports


class HostCheck:
    """Refuses requests for a host the app does not serve, and requests made by another site's page."""

    def __init__(self, app: Any, allowed: AllowedHosts):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            refusal = self.refusal(scope)
            if refusal is not None:
                return await _refuse(refusal, 403, 4403, scope, receive, send)
        return await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> BackpropError | None:
        default_port = DEFAULT_PORT.get(scope.get("scheme", "http"), 80)
        for host in [_header(scope, "host"), *_forwarded_hosts(scope)]:
            parsed = split_authority(host, default_port)
            if parsed is None or not self.allowed.allows(*parsed, scope):
                return _refused("UI_HOST_NOT_ALLOWED", host=host)
        origin = _header(scope, "origin")
        if not origin:
            # Browsers always send one on a websocket handshake; only non-browser clients omit it elsewhere.
            return _refused("UI_ORIGIN_NOT_ALLOWED", origin="(none)") if scope["type"] == "websocket" else None
        parts = urlsplit(origin)
        parsed = split_authority(parts.netloc, DEFAULT_PORT[parts.scheme]) if parts.scheme in ("http", "https") else None
        if parsed is None or parts.path not in ("", "/") or not self.allowed.allows(*parsed, scope):
            return _refused("UI_ORIGIN_NOT_ALLOWED", origin=origin)
        return None


def split_authority(authority: str, default_port: int | None) -> tuple[str, int | None] | None:
    """'name:port', '[v6]:port' or a bare name -> (lowercase name, port or default_port); None if it is not one."""
    if not authority or any(c in authority for c in "@/?#\\ \t"):
        return None
    try:
        parts = urlsplit("//" + authority)
        name, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number, an unclosed bracket
        return None
    return (_name(name), port if port is not None else default_port) if name else None


def _name(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()  # 'LOCALHOST.' and 'localhost' are the same host


def _machine_addresses() -> set[str]:
    """Every IP address of this machine: what a browser on the network may type to reach an app on 0.0.0.0.
    An address in the Host cannot come from DNS rebinding, which needs a name."""
    families = (socket.AF_INET, socket.AF_INET6)
    return {_name(a.address.split("%")[0]) for addrs in psutil.net_if_addrs().values() for a in addrs if a.family in families}


def _forwarded_hosts(scope: Scope) -> Iterable[str]:
    value = _header(scope, "x-forwarded-host")
    return [h.strip() for h in value.split(",")] if value else []


_logged: set[str] = set()


def _refused(code: str, **fields: str) -> BackpropError:
    error = BackpropError(code, **fields)
    if len(_logged) < 100 and error.message not in _logged:  # say it once in the server log, not once per retry
        _logged.add(error.message)
        log.warning("refused: %s", error)
    return error


# --- layer 2: sign-in -----------------------------------------------------------------------------------------------


class AuthGate:
    """Every route needs a session, except the sign-in form and the few open paths."""

    def __init__(self, app: Any, auth: Auth):
        self.app, self.auth = app, auth
        self.limiter = LoginLimiter(auth.max_failed_logins)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"]
        if scope["type"] == "http" and path == "/login":
            return await self._page(_query(scope, "next"))(scope, receive, send)
        if scope["type"] == "http" and path == "/api/login" and scope["method"] == "POST":
            return await (await self._login(scope, receive))(scope, receive, send)
        if scope["type"] == "http" and path == "/api/logout":
            response = RedirectResponse("/login", status_code=303)
            response.delete_cookie(COOKIE, path="/")
            return await response(scope, receive, send)
        if path in OPEN_PATHS or self.auth.valid(_cookie(scope)):
            return await self.app(scope, receive, send)
        if scope["type"] == "http" and scope["method"] == "GET" and "text/html" in _header(scope, "accept"):
            query = scope.get("query_string", b"").decode("latin-1")  # a shared /compare?runs=... link survives sign-in
            target = quote(path + (f"?{query}" if query else ""), safe="/")
            return await RedirectResponse(f"/login?next={target}", status_code=303)(scope, receive, send)
        return await _refuse(BackpropError("UI_AUTH_REQUIRED"), 401, 4401, scope, receive, send)

    async def _login(self, scope: Scope, receive: Any) -> Response:
        client = (scope.get("client") or ("unknown", 0))[0]
        form = parse_qs((await _body(receive)).decode("utf-8", "replace"))
        target = _safe_next(form.get("next", ["/"])[0])
        wait = self.limiter.blocked(client)
        if wait:
            return self._page(target, f"Too many failed attempts. Try again in {wait:.0f} s.", 429,
                              {"Retry-After": str(int(wait) + 1)})  # fmt: skip
        if not check_password(form.get("password", [""])[0], self.auth.password_hash):
            self.limiter.failed(client)
            return self._page(target, "Wrong password.", 401)
        self.limiter.succeeded(client)
        response = RedirectResponse(target, status_code=303)
        secure = scope.get("scheme") == "https" or _header(scope, "x-forwarded-proto") == "https"
        response.set_cookie(COOKIE, self.auth.issue(), max_age=int(self.auth.session_hours * 3600), path="/",
                            httponly=True, samesite="strict", secure=secure)  # fmt: skip
        return response

    def _page(self, target: str, error: str = "", status: int = 200, headers: dict | None = None) -> HTMLResponse:
        return HTMLResponse(LOGIN_PAGE.format(next=html.escape(_safe_next(target)), error=html.escape(error)),
                            status_code=status, headers=headers)  # fmt: skip


# --- helpers ----------------------------------------------------------------------------------------------------------


async def _refuse(error: BackpropError, status: int, close_code: int, scope: Scope, receive: Any, send: Any) -> None:
    """A coded JSON answer. A websocket is refused before it is accepted: with that answer as the handshake's
    response where the server can send one (the ASGI websocket denial extension), else closed (HTTP 403)."""
    body = {"code": error.code, "message": error.message, "hint": error.hint}
    if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
        return await send({"type": "websocket.close", "code": close_code})
    return await JSONResponse(body, status_code=status)(scope, receive, send)


async def _body(receive: Any) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_LOGIN_BODY:
            return b""
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _header(scope: Scope, name: str) -> str:
    wanted = name.encode()
    return next((v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == wanted), "")


def _cookie(scope: Scope) -> str | None:
    jar = SimpleCookie()
    try:
        jar.load(_header(scope, "cookie"))
    except Exception:  # a malformed cookie header is no session
        return None
    return jar[COOKIE].value if COOKIE in jar else None


def _query(scope: Scope, name: str) -> str:
    return parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name, ["/"])[0]


def _safe_next(target: str) -> str:
    """Only a path on this site: never another host ('//evil', 'https://...', backslashes)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in · Backprop</title><link rel="icon" href="/favicon.svg" type="image/svg+xml">
<style>
  :root {{ color-scheme: light dark; font-family: system-ui, sans-serif; }}
  body {{ display: grid; place-items: center; min-height: 100vh; margin: 0; background: Canvas; color: CanvasText; }}
  form {{ display: grid; gap: 12px; width: 300px; padding: 28px; border: 1px solid #8884; border-radius: 12px; }}
  h1 {{ display: flex; gap: 10px; align-items: center; font-size: 1.3rem; margin: 0 0 8px; }}
  input, button {{ font: inherit; padding: 8px 10px; border-radius: 6px; border: 1px solid #8888; }}
  button {{ background: #3e63dd; color: white; border: none; cursor: pointer; }}
  .error {{ color: #e5484d; font-size: 0.9rem; min-height: 1.2em; margin: 0; }}
</style></head>
<body><form method="post" action="/api/login">
  <h1><img src="/logo.svg" width="28" height="28" alt="">Backprop</h1>
  <label for="password">Password</label>
  <input id="password" name="password" type="password" autocomplete="current-password" autofocus required>
  <input type="hidden" name="next" value="{next}">
  <p class="error" id="login-error">{error}</p>
  <button type="submit" id="sign-in">Sign in</button>
</form></body></html>
"""
