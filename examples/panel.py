"""A hosting panel's migration backend in the standard library over v2p's library API, safe by default.

    V2P_PANEL_TOKEN=... python examples/panel.py --source-root /vms [--source-root ...]
        [--target local | --target pve://v2p@pve!migrate@pve1/pve1] [--target-dir DIR] [--port 8080]

    Every request: Authorization: Bearer <the token from $V2P_PANEL_TOKEN or --token-file (mode 600)>
    POST /migrations              {"source": "/vms/web01/web01.vmx", "vmid": 120,
                                   "options": {"ostype": "l26", "networks": {"VM Network": "vmbr0"}}}
                                  -> 202 and the migration's status; 409 while that VMID runs here
    GET  /migrations/<vmid>       -> {"vmid", "state", "stage", "percent", "done", "total",
                                      "result": {...} once finished, "error"/"hint"/"type" once failed}
    POST /migrations/<vmid>/cancel -> 202; the migration stops soon, resumable: POST it again
    GET  /migrations              -> every migration this panel started

What a request may not do: name the target (the operator's --target is the only one, and its PVE secret
goes nowhere else), read a file outside the --source-root folders (every file the source reads, after
every link), or pass an option outside OPTIONS (no device, force, storage, drivers ISO, ignored rules).
Bodies, JSON nesting and fields are bounded; every answer, refusals included, is JSON. Files and folders
the panel makes are its user's alone (umask 077). Run it as a user that can read only the source
folders, behind a TLS proxy: it listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import re
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, v2p not installed

from v2p import Migration, V2PError, make_target  # noqa: E402
from v2p.api import Target  # noqa: E402
from v2p.sources import Source, open_source  # noqa: E402

log = logging.getLogger("panel")
WORKERS = 2  # migrations at once: each converts with qemu-img, and the machine has other work
TOKEN_ENV = "V2P_PANEL_TOKEN"
MAX_BODY = 64 << 10  # bytes: a request is a path, a VMID and a few options
MAX_DEPTH = 3  # request -> options -> networks
MAX_TEXT = 4096  # characters in any string (a path at most PATH_MAX)
VMIDS = (100, 999_999_999)  # PVE's range
# The options a request may set, with the type each must have; the rest (device, force, storage,
# drivers_iso, ignore_rules, copy_with, keep_on_failure, ...) are the operator's, not a client's.
OPTIONS: dict[str, type] = {"ostype": str, "name": str, "bus": str, "cores": int, "sockets": int, "memory": int,
                            "networks": dict, "bridge": str, "start": bool, "boot_check": bool, "bwlimit": int}
JSON_TYPES = {str: "a string", int: "a whole number", bool: "true or false", dict: "an object"}


class Refused(Exception):
    """A request the panel answers with ``status`` and a JSON error."""

    def __init__(self, status: HTTPStatus, error: str, hint: str | None = None) -> None:
        super().__init__(error)
        self.status, self.body = status, {"error": error, **({"hint": hint} if hint else {})}


def _depth(value: Any, limit: int) -> int:
    """How deep ``value`` nests, counted no further than ``limit + 1``."""
    if limit < 0 or not isinstance(value, dict | list):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


def _text(name: str, value: Any, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit or not value.isprintable():  # no \n, NUL, \ud800
        raise Refused(HTTPStatus.BAD_REQUEST, f"{name} must be a string of 1 to {limit} printable characters")
    return value


def check_request(request: Any) -> tuple[str, int | Literal["auto"], dict[str, Any]]:
    """The request's source, VMID and options, each of the type and size it must be."""
    if not isinstance(request, dict):
        raise Refused(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    if _depth(request, MAX_DEPTH) > MAX_DEPTH:
        raise Refused(HTTPStatus.BAD_REQUEST, f"the body nests deeper than {MAX_DEPTH} levels")
    if "target" in request:
        raise Refused(HTTPStatus.BAD_REQUEST, "target: a request cannot name the target",
                      hint="the panel migrates to the target its operator configured")
    unknown = sorted(set(request) - {"source", "vmid", "options"})
    if unknown:
        raise Refused(HTTPStatus.BAD_REQUEST, f"unknown field {_text('a field name', unknown[0], 64)!r}",
                      hint="fields: source, vmid, options")
    source = _text("source", request.get("source"))
    vmid = request.get("vmid")
    if vmid != "auto" and (isinstance(vmid, bool) or not isinstance(vmid, int) or not VMIDS[0] <= vmid <= VMIDS[1]):
        raise Refused(HTTPStatus.BAD_REQUEST, f"vmid must be a whole number from {VMIDS[0]} to {VMIDS[1]}, "
                      'or "auto"')
    options = request.get("options", {})
    if not isinstance(options, dict):
        raise Refused(HTTPStatus.BAD_REQUEST, "options must be an object")
    for key, value in options.items():
        kind = OPTIONS.get(key)
        if kind is None:
            raise Refused(HTTPStatus.BAD_REQUEST, f"option {_text('an option name', key, 64)!r} is not one a "
                          "request may set", hint="allowed: " + ", ".join(OPTIONS))
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise Refused(HTTPStatus.BAD_REQUEST, f"option {key} must be {JSON_TYPES[kind]}")
        if isinstance(value, str):
            _text(f"option {key}", value, 64)
        elif isinstance(value, dict):
            if len(value) > 32:
                raise Refused(HTTPStatus.BAD_REQUEST, f"option {key}: at most 32 names")
            for network, bridge in value.items():
                _text(f"option {key}", network, 64)
                _text(f"option {key}", bridge, 64)
    return source, vmid, options


class Panel:
    """The migrations this panel started, by VMID, and the workers that run them."""

    def __init__(self, new_target: Callable[[], Target], roots: list[Path]) -> None:
        self.new_target, self.roots = new_target, roots
        self.migrations: dict[int, Migration] = {}
        self.lock = threading.Lock()
        self.workers = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="migration")

    def _inside(self, path: str) -> Path | None:
        """``path`` after every link, when that is under a source root; else None."""
        real = Path(os.path.realpath(path))
        return real if any(real == root or root in real.parents for root in self.roots) else None

    def source(self, given: str) -> Source:
        """The source at ``given``: it and every file it reads (descriptors, extents, parents, OVF
        disks) resolve, after every link, under a source root."""
        outside = Refused(HTTPStatus.BAD_REQUEST, f"source {given!r}: not in a folder this panel migrates from "
                          "(or a file it reads is outside one, through a link or a descriptor)")
        real = self._inside(given) if os.path.isabs(given) else None
        if real is None:
            raise outside
        try:
            source = open_source(real)
            files = [str(entry["path"]) for entry in source.fingerprint()]
        except OSError as exc:
            raise Refused(HTTPStatus.BAD_REQUEST, f"source {given!r}: cannot read it: {exc.strerror}") from None
        if not all(self._inside(path) for path in files):
            raise outside
        return source

    def start(self, request: Any) -> tuple[HTTPStatus, dict[str, Any]]:
        given, vmid, options = check_request(request)
        try:
            # Made here, in the request: a wrong source, VMID or option is the caller's error (400).
            source = self.source(given)  # outside the lock: it reads every disk's headers
            with self.lock:
                running = self.migrations.get(vmid) if isinstance(vmid, int) else None
                if running is not None and running.status.state in ("ready", "running"):
                    raise Refused(HTTPStatus.CONFLICT, f"VMID {vmid} is being migrated", hint="cancel it first")
                migration = Migration(source, vmid, target=self.new_target(), **options)
                self.migrations[migration.vmid] = migration
        except V2PError as exc:
            return HTTPStatus.BAD_REQUEST, {"error": exc.message, "hint": exc.hint, "type": type(exc).__name__}
        self.workers.submit(self._run, migration)
        return HTTPStatus.ACCEPTED, migration.status.to_dict()

    @staticmethod
    def _run(migration: Migration) -> None:
        try:
            migration.run()
        except V2PError as exc:  # kept in migration.status for GET to show
            log.info("VMID %s: %s", migration.vmid, exc)
        except Exception as exc:  # a bug, not a refusal: one line in the log, the trace at DEBUG
            log.error("VMID %s failed: %s: %s", migration.vmid, type(exc).__name__, exc)
            log.debug("VMID %s", migration.vmid, exc_info=True)

    def get(self, path: str, suffix: str = "") -> Migration:
        match = re.fullmatch(r"/migrations/([0-9]{1,9})" + suffix, path)  # [0-9]: \d takes any script's digits
        with self.lock:
            migration = self.migrations.get(int(match.group(1))) if match else None
        if migration is None:
            raise Refused(HTTPStatus.NOT_FOUND, f"no migration at {path[:80]!r}")
        return migration


class Handler(BaseHTTPRequestHandler):
    panel: Panel  # set on the subclass made by serve()
    token: bytes
    timeout = 10  # seconds a client may take to send its request: a slow one holds a thread

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self._post)

    def _get(self) -> tuple[HTTPStatus, Any]:
        if self.path.rstrip("/") == "/migrations":
            with self.panel.lock:
                return HTTPStatus.OK, [m.status.to_dict() for m in self.panel.migrations.values()]
        return HTTPStatus.OK, self.panel.get(self.path).status.to_dict()

    def _post(self) -> tuple[HTTPStatus, Any]:
        if self.path.rstrip("/") == "/migrations":
            return self.panel.start(self._body())
        migration = self.panel.get(self.path, "/cancel")
        migration.cancel()
        return HTTPStatus.ACCEPTED, migration.status.to_dict()

    def _answer(self, handle: Callable[[], tuple[HTTPStatus, Any]]) -> None:
        self.close_connection = True  # one request a connection: an unread body never becomes the next one
        try:
            given = self.headers.get("Authorization", "").encode("latin-1", "replace")
            if not hmac.compare_digest(given, b"Bearer " + self.token):
                raise Refused(HTTPStatus.UNAUTHORIZED, "a bearer token is needed",
                              hint="Authorization: Bearer <the panel's token>")
            self._send(*handle())
        except Refused as refused:
            self._send(refused.status, refused.body)
        except Exception as exc:  # a bug: the client still gets JSON, the log one line
            log.error("%s %s: %s: %s", self.command, self.path[:80], type(exc).__name__, exc)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "the panel failed on this request"})

    def _body(self) -> Any:
        if self.headers.get("Transfer-Encoding"):
            raise Refused(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not chunked")
        length = self.headers.get("Content-Length")
        if length is None:
            raise Refused(HTTPStatus.LENGTH_REQUIRED, "a body needs a Content-Length")
        if not re.fullmatch(r"[0-9]{1,12}", length.strip()):
            raise Refused(HTTPStatus.BAD_REQUEST, "Content-Length is not a number of bytes")
        if int(length) > MAX_BODY:
            raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is over {MAX_BODY} bytes")
        try:
            data = self.rfile.read(int(length))
        except TimeoutError:
            raise Refused(HTTPStatus.REQUEST_TIMEOUT, "the body did not arrive in time") from None
        if len(data) != int(length):
            raise Refused(HTTPStatus.BAD_REQUEST, "the body is shorter than its Content-Length")
        try:
            return json.loads(data, parse_constant=_no_constant)
        except (ValueError, RecursionError):  # not JSON, a 5,000-digit number, NaN, or nested past the stack
            raise Refused(HTTPStatus.BAD_REQUEST, "the body is not JSON within the panel's limits") from None

    def _send(self, status: HTTPStatus, body: Any) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == HTTPStatus.UNAUTHORIZED:
                self.send_header("WWW-Authenticate", "Bearer")
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client left: nothing to answer
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a request line over 64 KiB, a bad header, an unknown method) as JSON."""
        self.close_connection = True
        self._send(HTTPStatus(code), {"error": message or HTTPStatus(code).phrase})

    def finish(self) -> None:
        """Read what the client still sends (a refused body, the rest of a 64 MiB line) for a moment before
        closing: closing on unread bytes resets the connection, and the client would lose the answer."""
        super().finish()
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(1)
            deadline, left = time.monotonic() + 3, 256 << 20
            while left > 0 and time.monotonic() < deadline and (chunk := self.connection.recv(1 << 16)):
                left -= len(chunk)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug(format, *args)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def read_token(path: str | None) -> bytes:
    """The panel's bearer token: --token-file (mode 600, one line) or $V2P_PANEL_TOKEN."""
    if path:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o077:
            raise SystemExit(f"panel: {path}: the token file must be a regular file only you read (chmod 600)")
        with open(path, encoding="ascii", errors="replace") as file:
            token = file.read(4096)
    else:
        token = os.environ.get(TOKEN_ENV, "")
    token = token[:-2] if token.endswith("\r\n") else token[:-1] if token.endswith("\n") else token
    if not re.fullmatch(r"[\x21-\x7e]{16,}", token):
        raise SystemExit(f"panel: no token: set ${TOKEN_ENV} or --token-file to 16 or more printable ASCII "
                         "characters (e.g. from: openssl rand -hex 32); the panel does not run open")
    return token.encode()


def serve(port: int, new_target: Callable[[], Target], roots: list[Path], token: bytes) -> ThreadingHTTPServer:
    handler = type("PanelHandler", (Handler,), {"panel": Panel(new_target, roots), "token": token})
    return ThreadingHTTPServer(("127.0.0.1", port), handler)


def main() -> int:
    os.umask(0o077)  # volumes, folders and records this process makes: its user's alone
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="0: any free port (printed on start)")
    parser.add_argument("--source-root", action="append", required=True, help="a folder sources may come from")
    parser.add_argument("--target", default="local", help="local, or pve://... (its secret: $V2P_PVE_TOKEN)")
    parser.add_argument("--target-dir", help="the local target's folder (default: v2p's)")
    parser.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    parser.add_argument("--token-file", help=f"the bearer token clients send (default: ${TOKEN_ENV})")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="panel: %(levelname)s: %(message)s")
    token = read_token(args.token_file)
    roots = [Path(os.path.realpath(root)) for root in args.source_root]
    if not all(root.is_dir() for root in roots):
        raise SystemExit("panel: every --source-root must be an existing folder")

    def new_target() -> Target:  # the operator's own target: its PVE secret comes from their environment
        return make_target(args.target, directory=args.target_dir, accel=args.accel, env=os.environ)

    try:
        new_target()
    except V2PError as exc:
        raise SystemExit(f"panel: {exc}") from None
    server = serve(args.port, new_target, roots, token)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        panel: Panel = server.RequestHandlerClass.panel  # type: ignore[attr-defined]
        for migration in list(panel.migrations.values()):
            migration.cancel()  # resumable; the workers end soon and the process with them
        panel.workers.shutdown(wait=True)
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
