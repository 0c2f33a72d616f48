"""Loopback servers in the URL layouts the hub downloads from: a bucket tree (GCS) and a Hugging Face endpoint.

Both serve files the tests write, on 127.0.0.1, and can misbehave on purpose (stop mid-file,
lie about a hash) so the cache's checks can be shown to work.
"""
from __future__ import annotations

import base64
import hashlib
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Faults:
    """What the server does wrong: stop a GET after ``cut_after`` bytes (once), send a wrong md5, refuse Range."""

    cut_after: int | None = None
    wrong_md5: bool = False
    no_range: bool = False
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Range header)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(root: Path, faults: Faults, layout: str) -> type[BaseHTTPRequestHandler]:
    commit = "0123456789abcdef0123456789abcdef01234567"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest's output clean
            pass

        def _file(self) -> Path | None:
            path = self.path.split("?")[0]
            if layout == "hf":  # /{org}/{repo}/resolve/{revision}/{filename}
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if not m:
                    return None
                path = f"/{m.group(1)}/{m.group(3)}"
            f = root / path.lstrip("/")
            return f if f.is_file() and root in f.resolve().parents else None

        def _headers(self, f: Path, data: bytes, start: int, status: int) -> None:
            self.send_response(status)
            md5 = hashlib.md5(b"x" if faults.wrong_md5 else data).digest()
            if layout == "gcs":
                self.send_header("x-goog-hash", f"crc32c=AAAAAA==,md5={base64.b64encode(md5).decode()}")
            else:
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()

        def do_HEAD(self) -> None:
            with faults.lock:
                faults.requests.append(("HEAD", self.path, self.headers.get("Range", "")))
            f = self._file()
            if f is None:
                self.send_error(404)
                return
            self._headers(f, f.read_bytes(), 0, 200)

        def do_GET(self) -> None:
            rng = self.headers.get("Range", "")
            with faults.lock:
                faults.requests.append(("GET", self.path, rng))
            f = self._file()
            if f is None:
                self.send_error(404)
                return
            data = f.read_bytes()
            start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng and not faults.no_range else 0
            if start >= len(data) > 0:
                self.send_error(416)
                return
            self._headers(f, data, start, 206 if start else 200)
            body = data[start:]
            with faults.lock:
                cut, faults.cut_after = faults.cut_after, None
            if cut is not None:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@contextmanager
def serve(root: Path, layout: str = "gcs") -> Iterator[tuple[str, Faults]]:
    """Serve ``root`` on 127.0.0.1 (``layout`` gcs: a bucket tree; hf: ``/{repo}/resolve/{rev}/{file}``)."""
    faults = Faults()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(root.resolve(), faults, layout))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", faults
    finally:
        server.shutdown()
        server.server_close()
