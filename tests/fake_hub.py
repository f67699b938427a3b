"""A stand-in for the Hugging Face Hub on 127.0.0.1 serving dataset repositories from folders on disk: the repo info,
tree and paths-info API and file downloads (HEAD with the commit and etag headers, GET with ranges), as much as the
`datasets` library and the hub client use to load a dataset. Unknown repos and files answer 404 with the hub's codes."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serve `repos` ({"owner/name": folder}) at `endpoint`; `requests` records (method, path) of every request."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def downloads(self) -> list[str]:
        """The repository files whose contents were fetched."""
        return sorted(
            {p.split(f"/resolve/{COMMIT}/", 1)[1] for m, p in self.requests if m == "GET" and f"/resolve/{COMMIT}/" in p}
        )

    def _entry(self, folder: Path, path: str) -> dict:
        target = folder / path
        if target.is_dir():
            return {"type": "directory", "path": path, "oid": _oid(path.encode())}
        data = target.read_bytes()
        return {"type": "file", "path": path, "size": len(data), "oid": _oid(data)}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status: int, body: object = None, headers: dict | None = None, error: str | None = None):
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if error:
                    self.send_header("X-Error-Code", error)
                    self.send_header("X-Error-Message", error)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def route(self) -> None:
                fake.requests.append((self.command, self.path))
                url = urlparse(self.path)
                parts = [unquote(p) for p in url.path.strip("/").split("/")]
                if parts[:2] == ["api", "datasets"] and len(parts) >= 4:
                    return self.api(f"{parts[2]}/{parts[3]}", parts[4:], parse_qs(url.query))
                if parts[:1] == ["datasets"] and len(parts) >= 5 and parts[3] == "resolve":
                    return self.resolve(f"{parts[1]}/{parts[2]}", "/".join(parts[5:]), parts[4])
                self.reply(404, {"error": "not found"}, error="RepoNotFound")

            def api(self, repo: str, rest: list[str], query: dict) -> None:
                folder = fake.repos.get(repo)
                if folder is None:
                    return self.reply(404, {"error": f"Repository {repo} not found"}, error="RepoNotFound")
                files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                if not rest or rest[0] == "revision":
                    siblings = [{"rfilename": f} for f in files]
                    info = {"id": repo, "_id": repo, "sha": COMMIT, "private": False, "tags": [], "downloads": 0}
                    return self.reply(200, {**info, "siblings": siblings, "lastModified": "2025-01-01T00:00:00.000Z"})
                if rest[0] == "tree":
                    base = "/".join(rest[2:])
                    below = folder / base if base else folder
                    if not below.is_dir():
                        return self.reply(404, {"error": "not found"}, error="EntryNotFound")
                    recursive = query.get("recursive", ["false"])[0].lower() == "true"
                    found = below.rglob("*") if recursive else below.iterdir()
                    return self.reply(200, [fake._entry(folder, p.relative_to(folder).as_posix()) for p in sorted(found)])
                if rest[0] == "paths-info":
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length).decode()
                    asked = json.loads(body).get("paths", []) if body.startswith("{") else parse_qs(body).get("paths", [])
                    return self.reply(200, [fake._entry(folder, p) for p in asked if (folder / p).exists()])
                self.reply(404, {"error": "not found"}, error="EntryNotFound")

            def resolve(self, repo: str, path: str, revision: str) -> None:
                folder = fake.repos.get(repo)
                if folder is None:
                    return self.reply(404, {"error": f"Repository {repo} not found"}, error="RepoNotFound")
                target = folder / path
                if revision not in ("main", COMMIT) or not path or not target.is_file():
                    return self.reply(404, {"error": f"{path} not found"}, error="EntryNotFound")
                data = target.read_bytes()
                start, end = 0, len(data) - 1
                status = 200
                if self.headers.get("Range", "").startswith("bytes="):
                    first, _, last = self.headers["Range"][6:].partition("-")
                    start, end = int(first or 0), min(int(last) if last else len(data) - 1, len(data) - 1)
                    status = 206
                chunk = data[start : end + 1]
                self.send_response(status)
                self.send_header("Content-Length", str(len(chunk)))
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("ETag", f'"{_oid(data)}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(chunk)

            do_GET = do_HEAD = do_POST = route

        return Handler

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
