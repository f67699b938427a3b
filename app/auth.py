"""Who may use the web app: a password, checked once at login, then a signed session cookie on every request.

- Password: `ui.password` (BACKPROPAGATE_UI__PASSWORD), or its scrypt hash `ui.password_hash`, which is what
  `backprop ui --auth` hands the server after asking for the password. Compared in constant time.
- Session: a JWT (HS256, pyjwt) that expires after `ui.session_hours`, signed with a random secret kept in the
  Backprop home with mode 0600, so a restart of `backprop ui` does not log everyone out.
- Failed logins: at most `ui.max_failed_logins` a minute per client address; then the gate answers 429.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import secrets
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import jwt

from training import atomic
from training.config import Settings
from training.errors import BackpropError

COOKIE = "backprop_session"
SCRYPT = {"n": 2**14, "r": 8, "p": 1}
SECRET_BYTES = 32  # HS256 wants a key at least as long as its hash


def hash_password(password: str, salt: bytes | None = None) -> str:
    """'scrypt$<salt hex>$<hash hex>': what may be stored or passed on instead of the password."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def check_password(password: str, stored_hash: str) -> bool:
    try:
        scheme, salt, expected = stored_hash.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    return hmac.compare_digest(hash_password(password, bytes.fromhex(salt)), stored_hash)


def session_secret(home: Path) -> bytes:
    """The signing secret, made once (readable by this user only) and reused, so sessions survive restarts.

    A file that is missing, empty, not hex or shorter than SECRET_BYTES would sign cookies with a weak or empty key:
    it is replaced, atomically, by a new random secret (sessions signed with the old one end)."""
    path = home / "ui-session-secret"
    secret = _read_secret(path)
    if secret is not None:
        return secret
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".ui-session-secret.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the server's workers start together: one of them writes, all use its secret
        secret = _read_secret(path)
        if secret is None:
            secret = secrets.token_bytes(SECRET_BYTES)
            atomic.write_text(path, secret.hex(), mode=0o600)
    return secret


def _read_secret(path: Path) -> bytes | None:
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except (FileNotFoundError, ValueError):  # missing, or not hex
        return None
    return secret if len(secret) >= SECRET_BYTES else None


@dataclass
class Auth:
    """What the gate needs: whether auth is on, the password's hash, the signing secret and the session length."""

    enabled: bool
    password_hash: str = ""
    secret: bytes = b""
    session_hours: float = 12.0
    max_failed_logins: int = 5

    def __post_init__(self) -> None:
        if self.enabled and len(self.secret) < SECRET_BYTES:  # never sign sessions with an empty or short key
            raise ValueError(f"the session secret must be at least {SECRET_BYTES} bytes")

    @classmethod
    def from_settings(cls, settings: Settings) -> Auth:
        ui = settings.ui
        if not ui.auth:
            return cls(enabled=False)
        if ui.password_hash:
            stored = ui.password_hash
        elif ui.password is not None and ui.password.get_secret_value():
            stored = hash_password(ui.password.get_secret_value())
        else:
            raise BackpropError("UI_AUTH_PASSWORD_MISSING")
        return cls(True, stored, session_secret(settings.home), ui.session_hours, ui.max_failed_logins)

    def issue(self, now: float | None = None) -> str:
        now = now or time.time()
        return jwt.encode({"sub": "backprop-ui", "iat": int(now), "exp": int(now + self.session_hours * 3600)},
                          self.secret, algorithm="HS256")  # fmt: skip

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        try:
            jwt.decode(token, self.secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
            return True
        except jwt.InvalidTokenError:
            return False


class LoginLimiter:
    """Failed logins per client address in a sliding window; `blocked` says for how many seconds more."""

    def __init__(self, limit: int, window_s: float = 60.0):
        self.limit, self.window_s = limit, window_s
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def blocked(self, client: str, now: float | None = None) -> float:
        now = now or time.monotonic()
        failures = self._failures[client]
        while failures and now - failures[0] > self.window_s:
            failures.popleft()
        return self.window_s - (now - failures[0]) if len(failures) >= self.limit else 0.0

    def failed(self, client: str, now: float | None = None) -> None:
        self._failures[client].append(now or time.monotonic())

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)
