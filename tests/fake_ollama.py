"""A stand-in for an Ollama server on 127.0.0.1: its version, blob and create endpoints, checking what Ollama checks
(the blob's sha256, that a create request names uploaded blobs, a template and stop words)."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOllama:
    """Ollama's version, blob and create endpoints on 127.0.0.1, checking what a real server checks."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.blobs: dict[str, bytes] = {}
        self.created: list[dict] = []
        self.create_error: str | None = None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, body: dict | None = None):
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                fake.requests.append(("GET", self.path))
                self.reply(200, {"version": "0.12.6"}) if self.path == "/api/version" else self.reply(404)

            def do_HEAD(self):
                fake.requests.append(("HEAD", self.path))
                self.send_response(200 if self.path.removeprefix("/api/blobs/") in fake.blobs else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self):
                fake.requests.append(("POST", self.path))
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path.startswith("/api/blobs/"):
                    digest = self.path.removeprefix("/api/blobs/")
                    if f"sha256:{hashlib.sha256(body).hexdigest()}" != digest:
                        return self.reply(400, {"error": "digest mismatch"})
                    fake.blobs[digest] = body
                    return self.reply(201)
                request = json.loads(body)
                fake.created.append(request)
                if fake.create_error:
                    return self.reply(500, {"error": fake.create_error})
                missing = [d for d in request["files"].values() if d not in fake.blobs]
                if missing or not request.get("template") or not request["parameters"].get("stop"):
                    return self.reply(400, {"error": f"bad create request (missing blobs {missing})"})
                self.reply(200, {"status": "success"})

        return Handler

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
