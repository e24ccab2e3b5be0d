"""A hosting panel's migration backend in ~150 lines of standard library over v2p's library API.

    python examples/panel.py [--port 8080] [--target-dir DIR] [--accel tcg]

    POST /migrations              {"source": "/vms/web01/web01.vmx", "vmid": 120,
                                   "target": "pve://root@pam!v2p@pve1/pve1",   (optional; default local)
                                   "options": {"ostype": "l26", "networks": {"VM Network": "vmbr0"}}}
                                  -> 202 and the migration's status; 409 while that VMID runs here
    GET  /migrations/<vmid>       -> {"vmid", "state", "stage", "percent", "done", "total",
                                      "result": {...} once finished, "error"/"hint"/"type" once failed}
    POST /migrations/<vmid>/cancel -> 202; the migration stops soon, resumable: POST it again
    GET  /migrations              -> every migration this panel started

Migrations run on a small pool of worker threads (two at a time, each its own VMID); the
request handlers only read ``Migration.status``, a snapshot that is safe to take from any
thread. A PVE target's secret comes from the panel's environment (``V2P_PVE_TOKEN``), never
from a request. Not for production as it stands: no authentication, no TLS.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, v2p not installed

from v2p import Migration, V2PError  # noqa: E402

log = logging.getLogger("panel")
WORKERS = 2  # migrations at once: each converts with qemu-img, and the machine has other work


class Panel:
    """The migrations this panel started, by VMID, and the workers that run them."""

    def __init__(self, default_target: str | dict[str, Any]) -> None:
        self.default_target = default_target
        self.migrations: dict[int, Migration] = {}
        self.lock = threading.Lock()
        self.workers = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="migration")

    def start(self, request: dict[str, Any]) -> tuple[HTTPStatus, dict[str, Any]]:
        options, vmid = request.get("options") or {}, request.get("vmid")
        if not isinstance(request.get("source"), str) or not isinstance(options, dict) \
                or not (isinstance(vmid, int) or vmid == "auto"):
            return HTTPStatus.BAD_REQUEST, {"error": "source (a path) and vmid (a number or \"auto\") are required; "
                                            "options must be an object"}
        with self.lock:
            running = self.migrations.get(vmid) if isinstance(vmid, int) else None
            if running is not None and running.status.state in ("ready", "running"):
                return HTTPStatus.CONFLICT, {"error": f"VMID {vmid} is being migrated", "hint": "cancel it first"}
            try:
                # Made here, in the request: a wrong source, VMID or option is the caller's error (400).
                migration = Migration(request["source"], vmid, target=request.get("target", self.default_target),
                                      **options)
            except V2PError as exc:
                return HTTPStatus.BAD_REQUEST, {"error": exc.message, "hint": exc.hint, "type": type(exc).__name__}
            except TypeError as exc:  # an option the library does not know
                return HTTPStatus.BAD_REQUEST, {"error": str(exc)}
            self.migrations[migration.vmid] = migration
        self.workers.submit(self._run, migration)
        return HTTPStatus.ACCEPTED, migration.status.to_dict()

    @staticmethod
    def _run(migration: Migration) -> None:
        try:
            migration.run()
        except V2PError as exc:  # kept in migration.status for GET to show
            log.info("VMID %s: %s", migration.vmid, exc)
        except Exception:  # a bug, not a refusal: keep the worker alive and the trace in the log
            log.exception("VMID %s failed", migration.vmid)

    def get(self, vmid: int) -> Migration | None:
        with self.lock:
            return self.migrations.get(vmid)


class Handler(BaseHTTPRequestHandler):
    panel: Panel  # set on the subclass made by serve()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") == "/migrations":
            with self.panel.lock:
                listed = [m.status.to_dict() for m in self.panel.migrations.values()]
            return self._send(HTTPStatus.OK, listed)
        match = re.fullmatch(r"/migrations/(\d+)", self.path)
        migration = self.panel.get(int(match.group(1))) if match else None
        if migration is None:
            return self._send(HTTPStatus.NOT_FOUND, {"error": f"no migration at {self.path}"})
        return self._send(HTTPStatus.OK, migration.status.to_dict())

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") == "/migrations":
            try:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                return self._send(HTTPStatus.BAD_REQUEST, {"error": "the body is not JSON"})
            if not isinstance(request, dict):
                return self._send(HTTPStatus.BAD_REQUEST, {"error": "the body must be a JSON object"})
            return self._send(*self.panel.start(request))
        match = re.fullmatch(r"/migrations/(\d+)/cancel", self.path)
        migration = self.panel.get(int(match.group(1))) if match else None
        if migration is None:
            return self._send(HTTPStatus.NOT_FOUND, {"error": f"no migration at {self.path}"})
        migration.cancel()
        return self._send(HTTPStatus.ACCEPTED, migration.status.to_dict())

    def _send(self, status: HTTPStatus, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug(format, *args)


def serve(port: int, default_target: str | dict[str, Any]) -> ThreadingHTTPServer:
    handler = type("PanelHandler", (Handler,), {"panel": Panel(default_target)})
    return ThreadingHTTPServer(("127.0.0.1", port), handler)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="0: any free port (printed on start)")
    parser.add_argument("--target-dir", help="the local target's folder (default: v2p's)")
    parser.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="panel: %(levelname)s: %(message)s")
    target: dict[str, Any] = {"kind": "local", "accel": args.accel}
    if args.target_dir:
        target["dir"] = args.target_dir
    server = serve(args.port, target)
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
