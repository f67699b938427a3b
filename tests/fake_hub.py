"""A stand-in for the Hugging Face Hub on 127.0.0.1, as much of it as `huggingface_hub`, `transformers` and `datasets`
use to download and upload repositories.

Downloads: dataset and model repositories served from folders on disk (the repo info, tree and paths-info API, file
downloads: HEAD with the commit and etag headers, GET with ranges). Uploads: `create_repo`, README metadata
validation, the preupload and commit API (regular files travel base64 in the commit; *.safetensors and files over
10 MB go LFS, as the hub's default .gitattributes says, through the LFS batch API and a PUT; with hf_xet installed
the client uploads LFS files through Xet, which this stand-in does not speak: set HF_HUB_DISABLE_XET=1 for a push).
Pushed files are kept in memory (`pushed`, `created`). Unknown repos and files answer 404 with the hub's error codes.

Faults, for the download tests: `pause_at=(file, offset)` serves that file up to the offset, sets `paused` and waits
for `resume` (set on exit, so nothing hangs); `drop_at=(file, offset)` closes the connection at the offset, once.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
PUSHED_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
LFS_THRESHOLD = 10 * 1024 * 1024


class FakeHub:
    """Serve `repos` (datasets) and `models` ({"owner/name": folder}) at `endpoint`; `requests` records (method, path)
    of every request and `ranges` (path, Range header) of every ranged download."""

    def __init__(
        self,
        repos: dict[str, Path] | None = None,
        *,
        models: dict[str, Path] | None = None,
        pause_at: tuple[str, int] | None = None,
        drop_at: tuple[str, int] | None = None,
    ):
        self.repos = repos or {}
        self.models = models or {}
        self.requests: list[tuple[str, str]] = []
        self.ranges: list[tuple[str, str]] = []
        self.created: list[dict] = []  # the create_repo payloads
        self.pushed: dict[str, dict[str, bytes]] = {}  # repo -> {path: contents}, over all its commits
        self.commits: list[dict] = []  # each commit: repo, summary, paths
        self.authorizations: set[str] = set()
        self.lfs: dict[str, bytes] = {}  # uploaded LFS objects by sha256
        self.pause_at, self.drop_at = pause_at, drop_at
        self.paused, self.resume = threading.Event(), threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def downloads(self) -> list[str]:
        """The repository files whose contents were fetched."""
        return sorted(
            {p.split(f"/resolve/{COMMIT}/", 1)[1] for m, p in self.requests if m == "GET" and f"/resolve/{COMMIT}/" in p}
            | {p.split("/resolve/main/", 1)[1] for m, p in self.requests if m == "GET" and "/resolve/main/" in p}
        )

    def _entry(self, folder: Path, path: str) -> dict:
        target = folder / path
        if target.is_dir():
            return {"type": "directory", "path": path, "oid": _oid(path.encode())}
        data = target.read_bytes()
        entry = {"type": "file", "path": path, "size": len(data), "oid": _oid(data)}
        if _is_lfs(path, len(data)):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _blob(self, folder: Path, path: str) -> dict:
        entry = self._entry(folder, path)
        lfs = entry.get("lfs")
        lfs = {"lfs": {"sha256": lfs["oid"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}} if lfs else {}
        return {"size": entry["size"], "blobId": entry["oid"], **lfs}

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

            def body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def route(self) -> None:
                fake.requests.append((self.command, self.path))
                if self.headers.get("Authorization"):
                    fake.authorizations.add(self.headers["Authorization"])
                url = urlparse(self.path)
                parts = [unquote(p) for p in url.path.strip("/").split("/")]
                query = parse_qs(url.query)
                if parts[:2] == ["api", "datasets"] and len(parts) >= 4:
                    return self.api(fake.repos, f"{parts[2]}/{parts[3]}", parts[4:], query)
                if parts[:1] == ["datasets"] and len(parts) >= 5 and parts[3] == "resolve":
                    return self.resolve(fake.repos, f"{parts[1]}/{parts[2]}", "/".join(parts[5:]), parts[4])
                if parts[:3] == ["api", "repos", "create"]:
                    return self.create_repo()
                if parts == ["api", "validate-yaml"]:  # a README's metadata, checked before a commit
                    self.body()
                    return self.reply(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and len(parts) >= 5 and parts[4] in ("preupload", "commit"):
                    repo = f"{parts[2]}/{parts[3]}"
                    return self.preupload(repo) if parts[4] == "preupload" else self.commit(repo)
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    return self.api(fake.models, f"{parts[2]}/{parts[3]}", parts[4:], query)
                if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
                    return self.lfs_batch()
                if parts[:1] == ["lfs-upload"] and len(parts) == 2 and self.command == "PUT":
                    fake.lfs[parts[1]] = self.body()
                    return self.reply(200, {})
                if len(parts) >= 4 and parts[2] == "resolve":
                    return self.resolve(fake.models, f"{parts[0]}/{parts[1]}", "/".join(parts[4:]), parts[3])
                self.reply(404, {"error": "not found"}, error="RepoNotFound")

            # ---------------------------------------------------------------- downloads

            def api(self, repos: dict[str, Path], repo: str, rest: list[str], query: dict) -> None:
                folder = repos.get(repo)
                if folder is None:
                    return self.reply(404, {"error": f"Repository {repo} not found"}, error="RepoNotFound")
                files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                if not rest or rest[0] == "revision":
                    siblings = [{"rfilename": f} for f in files]
                    if query.get("blobs", ["false"])[0].lower() == "true":  # files_metadata=True
                        siblings = [{"rfilename": f, **fake._blob(folder, f)} for f in files]
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
                    body = self.body().decode()
                    asked = json.loads(body).get("paths", []) if body.startswith("{") else parse_qs(body).get("paths", [])
                    return self.reply(200, [fake._entry(folder, p) for p in asked if (folder / p).exists()])
                self.reply(404, {"error": "not found"}, error="EntryNotFound")

            def resolve(self, repos: dict[str, Path], repo: str, path: str, revision: str) -> None:
                folder = repos.get(repo)
                if folder is None:
                    return self.reply(404, {"error": f"Repository {repo} not found"}, error="RepoNotFound")
                target = folder / path
                if revision not in ("main", COMMIT) or not path or not target.is_file():
                    return self.reply(404, {"error": f"{path} not found"}, error="EntryNotFound")
                data = target.read_bytes()
                start, end = 0, len(data) - 1
                status = 200
                if self.headers.get("Range", "").startswith("bytes="):
                    fake.ranges.append((self.path, self.headers["Range"]))
                    first, _, last = self.headers["Range"][6:].partition("-")
                    start, end = int(first or 0), min(int(last) if last else len(data) - 1, len(data) - 1)
                    status = 206
                chunk = data[start : end + 1]
                self.send_response(status)
                self.send_header("Content-Length", str(len(chunk)))
                self.send_header("Content-Type", "application/octet-stream")
                etag = hashlib.sha256(data).hexdigest() if _is_lfs(path, len(data)) else _oid(data)
                if _is_lfs(path, len(data)):  # the hub names an LFS file's blob by its sha256
                    self.send_header("X-Linked-Etag", f'"{etag}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if self.command != "HEAD":
                    self.send_body(path, chunk, start)

            def send_body(self, path: str, chunk: bytes, start: int) -> None:
                """Write the file's bytes from `start`, pausing or dropping the connection where the faults say."""
                for fault in ("pause_at", "drop_at"):
                    name, offset = getattr(fake, fault) or (None, 0)
                    if name != path or not start < offset < start + len(chunk):
                        continue
                    try:
                        self.wfile.write(chunk[: offset - start])
                        self.wfile.flush()
                    except OSError:  # the client is gone
                        return
                    if fault == "drop_at":
                        fake.drop_at = None  # once
                        self.close_connection = True
                        return
                    fake.paused.set()
                    fake.resume.wait(timeout=300)
                    chunk, start = chunk[offset - start :], offset
                try:
                    self.wfile.write(chunk)
                except OSError:
                    pass

            # ---------------------------------------------------------------- uploads

            def create_repo(self) -> None:
                payload = json.loads(self.body() or b"{}")
                fake.created.append(payload)
                repo = f"{payload.get('organization')}/{payload['name']}"
                fake.pushed.setdefault(repo, {})
                self.reply(200, {"url": f"{fake.endpoint}/{repo}", "name": repo, "id": repo})

            def preupload(self, repo: str) -> None:
                if repo not in fake.pushed:
                    return self.reply(404, {"error": f"Repository {repo} not found"}, error="RepoNotFound")
                files = json.loads(self.body())["files"]
                modes = [{"path": f["path"], "uploadMode": "lfs" if _is_lfs(f["path"], f["size"]) else "regular",
                          "shouldIgnore": False, "oid": None} for f in files]  # fmt: skip
                self.reply(200, {"files": modes, "commitOid": PUSHED_COMMIT})

            def lfs_batch(self) -> None:
                objects = json.loads(self.body())["objects"]
                upload = {o["oid"]: {"upload": {"href": f"{fake.endpoint}/lfs-upload/{o['oid']}"}} for o in objects}
                actions = [{"oid": o["oid"], "size": o["size"], "actions": upload[o["oid"]]} for o in objects]
                self.reply(200, {"transfer": "basic", "objects": actions})

            def commit(self, repo: str) -> None:
                if repo not in fake.pushed:
                    return self.reply(404, {"error": f"Repository {repo} not found"}, error="RepoNotFound")
                lines = [json.loads(line) for line in self.body().decode().splitlines() if line.strip()]
                summary, paths = "", []
                for line in lines:
                    value = line["value"]
                    if line["key"] == "header":
                        summary = value.get("summary", "")
                    elif line["key"] == "file":
                        fake.pushed[repo][value["path"]] = base64.b64decode(value["content"])
                        paths.append(value["path"])
                    elif line["key"] == "lfsFile":
                        if value["oid"] not in fake.lfs:
                            return self.reply(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                        fake.pushed[repo][value["path"]] = fake.lfs[value["oid"]]
                        paths.append(value["path"])
                fake.commits.append({"repo": repo, "summary": summary, "paths": paths})
                url = f"{fake.endpoint}/{repo}/commit/{PUSHED_COMMIT}"
                self.reply(200, {"success": True, "commitOid": PUSHED_COMMIT, "commitUrl": url})

            do_GET = do_HEAD = do_POST = do_PUT = route

        return Handler

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.resume.set()  # a paused download ends
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _is_lfs(path: str, size: int) -> bool:
    return path.endswith(".safetensors") or size > LFS_THRESHOLD


def _oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
