"""An example source kind, for tests only: one raw disk served over HTTP behind a session cookie.

``testhttp://HOST:PORT/NAME`` is the disk at ``http://HOST:PORT/NAME``; the cookie comes from the
environment (``TESTHTTP_COOKIE``), as a vCenter session would come from a login. It is what
docs/HACKING.md's "Adding a source kind" sketches, and it touches nothing outside this file: it
registers itself (``register(SourceKind(...))``), answers the disk's facts from a HEAD request (no
byte of the disk read), and hands the copier an endpoint over qemu's ``http`` driver whose cookie
travels as a qemu secret (``cookie-secret``), never on an argv. The endpoint is not ``rereadable``:
the pipeline reads it once.

``DiskServer`` is the test's own server: it answers 403 without the right cookie, serves byte ranges
(qemu's curl driver needs them) and records every range it sent.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from v2p.endpoint import DiskEndpoint
from v2p.errors import SourceError
from v2p.sources import DiskFacts, Source, SourceKind, register
from v2p.spec import DiskSpec, NicSpec, VMSpec

COOKIE_ENV = "TESTHTTP_COOKIE"
SECRET_ID = "testhttp-cookie"
CLOSED: list[str] = []  # every source's describe() as its close() ran (what a test checks)


class HttpDiskSource(Source):
    """A raw disk on an HTTP server that wants a cookie."""

    kind = "testhttp"
    rereadable = False  # a download: the pipeline reads it once (bench/remote_source.py turns it on to compare)

    def __init__(self, uri: str) -> None:
        parsed = urllib.parse.urlsplit(uri)
        if not parsed.hostname or not parsed.port or not parsed.path.strip("/"):
            raise SourceError(f"{uri}: expected testhttp://HOST:PORT/NAME")
        self.uri = uri
        self.host, self.port, self.path = parsed.hostname, parsed.port, parsed.path
        self._capacity: int | None = None

    def _cookie(self) -> str:
        cookie = os.environ.get(COOKIE_ENV)
        if not cookie:
            raise SourceError(f"{self.uri}: no session cookie", hint=f"set {COOKIE_ENV}")
        return cookie

    def capacity(self) -> int:
        """The disk's size, from a HEAD request (no byte of the disk is read)."""
        if self._capacity is None:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
            try:
                connection.request("HEAD", self.path, headers={"Cookie": self._cookie()})
                response = connection.getresponse()
            except OSError as exc:
                raise SourceError(f"{self.uri}: {exc}") from None
            finally:
                connection.close()
            if response.status != 200:
                raise SourceError(f"{self.uri}: the server answered {response.status} {response.reason}",
                                  hint=f"check {COOKIE_ENV}")
            self._capacity = int(response.getheader("Content-Length") or 0)
        return self._capacity

    def describe(self) -> str:
        return self.uri

    def spec(self) -> VMSpec:
        name = Path(self.path).name
        disk = DiskSpec(controller="scsi", bus=0, unit=0, source=name, capacity=self.capacity(), boot=True)
        return VMSpec(name="testhttp", disks=[disk], nics=[NicSpec(model="e1000")])

    def disk_facts(self, disk: DiskSpec, workdir: Path) -> DiskFacts:
        return DiskFacts(self.capacity(), "raw", messages=(("note", f"{disk.source} is read over HTTP"),))

    def disk_endpoint(self, disk: DiskSpec, workdir: Path) -> DiskEndpoint:
        url = f"http://{self.host}:{self.port}{self.path}"
        # readahead 0: qemu-img asks for what it copies, and nothing of it twice (the default 256 KiB
        # overlaps each next request).
        spec = {"driver": "raw", "file": {"driver": "http", "url": url, "cookie-secret": SECRET_ID, "readahead": 0}}
        return DiskEndpoint("raw", "json:" + json.dumps(spec), self.capacity(), "raw",
                            secrets={SECRET_ID: self._cookie().encode()}, rereadable=self.rereadable,
                            parallel=1)  # QEMU 7.2's curl driver can hang with requests in parallel

    def fingerprint(self) -> list[dict[str, Any]]:
        return [{"path": self.uri, "size": self.capacity(), "mtime_ns": 0}]

    def close(self) -> None:
        CLOSED.append(self.uri)
        super().close()


KIND = register(SourceKind("testhttp", HttpDiskSource, schemes=("testhttp",)))


class DiskServer:
    """``path`` served at ``http://127.0.0.1:PORT/NAME`` to requests with ``Cookie: cookie``, in a thread.

    ``ranges`` lists the (start, end) byte ranges sent (end exclusive), ``refused`` counts 403s.
    """

    def __init__(self, path: Path, cookie: str) -> None:
        self.path, self.cookie = path, cookie
        self.ranges: list[tuple[int, int]] = []
        self.refused = 0
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
                pass

            def _allowed(self) -> bool:
                if self.headers.get("Cookie") == server.cookie and self.path == "/" + server.path.name:
                    return True
                with server.lock:
                    server.refused += 1
                self.send_response(403)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return False

            def do_HEAD(self) -> None:  # noqa: N802 (http.server's name)
                if self._allowed():
                    self.send_response(200)
                    self.send_header("Content-Length", str(server.path.stat().st_size))
                    self.send_header("Accept-Ranges", "bytes")
                    self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                if not self._allowed():
                    return
                size = server.path.stat().st_size
                start, end = 0, size
                wanted = self.headers.get("Range", "")
                if wanted.startswith("bytes="):
                    first, _, last = wanted.removeprefix("bytes=").partition("-")
                    start, end = int(first), min(size, int(last) + 1 if last else size)
                with open(server.path, "rb") as handle:
                    handle.seek(start)
                    data = handle.read(end - start)
                with server.lock:
                    server.ranges.append((start, end))
                self.send_response(206 if wanted else 200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                if wanted:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def uri(self) -> str:
        return f"testhttp://127.0.0.1:{self.httpd.server_address[1]}/{self.path.name}"

    def bytes_sent(self) -> int:
        return sum(end - start for start, end in self.ranges)

    def overlaps(self) -> list[tuple[int, int]]:
        """Ranges sent more than once (a byte read twice from the source)."""
        twice, reach = [], 0
        for start, end in sorted(self.ranges):
            if start < reach:
                twice.append((start, min(reach, end)))
            reach = max(reach, end)
        return twice

    def __enter__(self) -> DiskServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
