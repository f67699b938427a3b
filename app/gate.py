"""The ASGI gate in front of the whole web app (pages, the /_event websocket, /_upload): no session, no entry.

It wraps the app Reflex serves on one port (rx.App(api_transformer=...)), so one check covers every route. With
authentication off it passes everything through untouched. With it on:

  GET  /login        the sign-in form (served here, so it needs nothing behind the gate)
  POST /api/login    password -> session cookie (HttpOnly, SameSite=Strict), or the form again with why not
  POST /api/logout   forget the cookie
  /ping, /favicon.svg, /logo.svg   open (health check, and what the sign-in form shows)
  anything else      needs a valid session: pages redirect to /login, other requests get 401 UI_AUTH_REQUIRED,
                     a websocket is closed before it is accepted
"""

from __future__ import annotations

import html
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, quote

from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from app.auth import COOKIE, Auth, LoginLimiter, check_password
from training.errors import BackpropError

OPEN_PATHS = {"/ping", "/favicon.svg", "/logo.svg"}
MAX_LOGIN_BODY = 8192

Scope = dict[str, Any]


class AuthGate:
    def __init__(self, app: Any, auth: Auth):
        self.app, self.auth = app, auth
        self.limiter = LoginLimiter(auth.max_failed_logins)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or not self.auth.enabled:
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
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 4401})  # before accept: the handshake fails
        if scope["method"] == "GET" and "text/html" in _header(scope, "accept"):
            return await RedirectResponse(f"/login?next={quote(path)}", status_code=303)(scope, receive, send)
        error = BackpropError("UI_AUTH_REQUIRED")
        body = {"code": error.code, "message": error.message, "hint": error.hint}
        return await JSONResponse(body, status_code=401)(scope, receive, send)

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
