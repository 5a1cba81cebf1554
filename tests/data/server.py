"""A tiny HTTP server on 127.0.0.1 for download tests: static files with Range, a fake Cityscapes."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

USER, PASSWORD, COOKIE = "alice", "s3cret-Pa55", "csrftoken=abc; sessionid=ok123"


class Handler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}  # path -> bytes
    packages: dict[int, tuple[str, bytes]] = {}  # Cityscapes packageID -> (name, bytes)
    corrupt_once: set[str] = set()  # paths served with flipped bytes the first time
    cut_once: set[str] = set()  # paths whose first answer breaks off half-way (connection dropped)
    no_range: set[str] = set()  # paths served whole (200) even when a Range is asked for
    requests: list[str] = []
    ranges: list[str | None] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, body: bytes, status: int = 200, headers: dict | None = None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _serve_bytes(self, data: bytes, path: str = ""):
        rng = self.headers.get("Range")
        Handler.ranges.append(rng)
        if path in Handler.cut_once:
            Handler.cut_once.discard(path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return None
        if rng and path not in Handler.no_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                return self._send(b"", 416)
            return self._send(
                data[start:], 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            )
        return self._send(data)

    def do_GET(self):  # noqa: N802 - http.server API
        url = urlparse(self.path)
        Handler.requests.append(self.path)
        if url.path in Handler.files:
            data = Handler.files[url.path]
            if url.path in Handler.corrupt_once:
                Handler.corrupt_once.discard(url.path)
                data = bytes(b ^ 0xFF for b in data)
            return self._serve_bytes(data, url.path)
        if url.path == "/login/":
            return self._send(b"<form>login</form>")
        if url.path in ("/file-handling/", "/md5-sum/"):
            if "sessionid=ok123" not in (self.headers.get("Cookie") or ""):
                return self._send(b"login required", 302, {"Location": "/login/"})
            pid = int(parse_qs(url.query)["packageID"][0])
            name, data = Handler.packages[pid]
            if url.path == "/md5-sum/":
                return self._send(f"{hashlib.md5(data).hexdigest()}  {name}".encode())
            return self._serve_bytes(data)
        return self._send(b"not found", 404)

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        form = parse_qs(body)
        if (
            urlparse(self.path).path == "/login/"
            and form.get("username") == [USER]
            and form.get("password") == [PASSWORD]
        ):
            return self._send(b"", 302, {"Location": "/", "Set-Cookie": "sessionid=ok123; Path=/"})
        return self._send(b"<form>Bad credentials</form>", 200)


class LocalServer:
    def __init__(self):
        Handler.files, Handler.packages, Handler.corrupt_once, Handler.requests = {}, {}, set(), []
        Handler.cut_once, Handler.no_range, Handler.ranges = set(), set(), []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add(self, path: str, data: bytes | Path) -> str:
        Handler.files[path] = data.read_bytes() if isinstance(data, Path) else data
        return self.url + path

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
