"""The PVE API over HTTPS on 127.0.0.1, as strict as PVE's own API server.

HTTP, authentication (tickets with CSRF tokens, API tokens), PVE's form
decoding, schema checks and fault injection live here; what an endpoint does
is in ``cluster.py``. Start one with ``PVESim(root).start()``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .acl import ALL_PRIVILEGES, Acl, acl_checks, acl_filter
from .cluster import Cluster, PVEError
from .multipart import Upload, UploadRefused, file_upload_multipart, parse_content_type
from .realvm import QemuRunner
from .schema import Endpoint, Schema

_SCHEMA: Schema | None = None


def shared_schema() -> Schema:
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = Schema.load()
    return _SCHEMA


def decode_urlencoded(data: str) -> dict[str, str | None]:
    """PVE::APIServer::AnyEvent::decode_urlencoded: pairs split on `&` AND `;`, and
    ``my ($k, $v) = split(/=/, $kv)`` keeps only the text up to a second raw `=`."""
    result: dict[str, str | None] = {}
    for pair in re.split(r"[&;]", data):
        if pair == "":
            continue
        fields = [f for f in pair.split("=")]
        while len(fields) > 1 and fields[-1] == "":
            fields.pop()  # Perl's split drops trailing empty fields
        key = urllib.parse.unquote_plus(fields[0])
        value = urllib.parse.unquote_plus(fields[1]) if len(fields) > 1 else None
        old = result.get(key)
        if value is not None and old is not None:
            value = f"{old}\0{value}"
        result[key] = value
    return result


def fingerprint(cert_pem: str) -> str:
    """The SHA256 fingerprint as PVE shows it (colon-separated upper-case hex)."""
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert_pem)).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


@dataclass
class Logged:
    method: str
    path: str
    params: dict[str, str | None]
    status: int
    errors: dict[str, str] | None


@dataclass
class _Fault:
    method: str
    path: re.Pattern[str]
    kind: str  # "error", "drop" or "hold"
    status: int = 500
    message: str = ""
    arrived: threading.Event = field(default_factory=threading.Event)  # "hold": the request is here
    release: threading.Event = field(default_factory=threading.Event)  # "hold": let it go on


# Each endpoint: (method, schema path template) -> Cluster method name.
ROUTES = {
    ("GET", "/version"): "version",
    ("GET", "/access/permissions"): "access_permissions",  # answered by PVESim (acl.py), not the cluster
    ("GET", "/nodes"): "nodes",
    ("GET", "/cluster/nextid"): "nextid",
    ("GET", "/cluster/resources"): "resources",
    ("GET", "/storage"): "storage_configs",
    ("GET", "/storage/{storage}"): "storage_config",
    ("GET", "/nodes/{node}/tasks"): "task_list",
    ("GET", "/nodes/{node}/tasks/{upid}/status"): "task_status",
    ("GET", "/nodes/{node}/tasks/{upid}/log"): "task_log",
    ("GET", "/nodes/{node}/storage"): "storage_list",
    ("GET", "/nodes/{node}/network"): "network_list",
    ("GET", "/nodes/{node}/status"): "node_status",
    ("GET", "/nodes/{node}/storage/{storage}/content"): "content_list",
    ("POST", "/nodes/{node}/storage/{storage}/content"): "content_alloc",
    ("GET", "/nodes/{node}/storage/{storage}/content/{volume}"): "content_get",
    ("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}"): "content_delete",
    ("POST", "/nodes/{node}/storage/{storage}/upload"): "upload",
    ("GET", "/nodes/{node}/qemu"): "vm_list",
    ("POST", "/nodes/{node}/qemu"): "create_vm",
    ("POST", "/nodes/{node}/qemu/{vmid}/agent/ping"): "agent_ping",
    ("GET", "/nodes/{node}/qemu/{vmid}/agent/get-osinfo"): "agent_osinfo",
    ("GET", "/nodes/{node}/qemu/{vmid}/config"): "get_config",
    ("POST", "/nodes/{node}/qemu/{vmid}/config"): "config_async",
    ("PUT", "/nodes/{node}/qemu/{vmid}/config"): "config_sync",
    ("GET", "/nodes/{node}/qemu/{vmid}/pending"): "pending",
    ("GET", "/nodes/{node}/qemu/{vmid}/status/current"): "status_current",
    ("POST", "/nodes/{node}/qemu/{vmid}/status/start"): "start",
    ("POST", "/nodes/{node}/qemu/{vmid}/status/stop"): "stop",
    ("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown"): "shutdown",
    ("DELETE", "/nodes/{node}/qemu/{vmid}"): "destroy",
}


class PVESim:
    """A simulated single-node PVE: ``start()`` serves it, ``url``/``fingerprint`` reach it.

    Accounts: ``users`` (userid -> password), ``tokens`` ("user@realm!id" -> secret) and
    ``privileges`` (userid or token id -> the privileges it has; absent means all).
    """

    def __init__(self, root: Path, *, node: str = "pve1", login_delay: float = 0.05,
                 schema: Schema | None = None, release: str | None = None, port: int = 0) -> None:
        self.root = root
        self.schema = schema or shared_schema()
        # release: "8.0" ... "9.1" (tests/pve_sim/releases.py); None is 9.1 with test-friendly storages.
        self.cluster = Cluster(root / "storage", node, release)
        self.listen_port = port
        self.login_delay = login_delay
        self.users: dict[str, str] = {"root@pam": "rootpw"}
        self.tokens: dict[str, str] = {"root@pam!v2p": "11111111-2222-3333-4444-555555555555"}
        self.privileges: dict[str, set[str]] = {}
        self.acl = Acl()  # per-path ACLs, roles, privsep tokens: for the ids it names (acl.py)
        self.tickets: dict[str, tuple[str, str]] = {}  # ticket -> (user, CSRF token)
        self.log: list[Logged] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self.port = 0
        self.fingerprint = ""
        self.cert_file = root / "tls" / "pve-ssl.pem"
        # The node's /var/tmp, on its root file system: pveproxy spools every upload there first
        # (pve-http-server AnyEvent.pm, get_upload_filename), then the upload task copies it.
        self.var_tmp = self.cluster.var_tmp  # root / "var-tmp"; its room: cluster.set_free("/", ...)

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> PVESim:
        sys.audit("pve_sim.start")  # tests/conftest.py checks that the test declared it (pve_sim marker)
        tls = self.cert_file.parent
        tls.mkdir(parents=True, exist_ok=True)
        key = tls / "pve-ssl.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(self.cert_file), "-days", "2", "-subj", f"/CN={self.cluster.node}",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True, timeout=60)
        self.fingerprint = fingerprint(self.cert_file.read_text())
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, key)
        sim = self

        class Handler(_Handler):
            simulator = sim
        httpd = ThreadingHTTPServer(("127.0.0.1", self.listen_port), Handler)
        httpd.daemon_threads = True
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        self._httpd = httpd
        self.port = httpd.server_address[1]
        # stop() waits for serve_forever to see the shutdown: at its poll interval (0.5 s by default,
        # half a second more for every test that starts the simulator)
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self.cluster.on_stop:
            for vm in list(self.cluster.vms.values()):
                if vm.status == "running":
                    self.cluster.on_stop(vm)

    def run_vms(self) -> QemuRunner:
        """Run started VMs for real under TCG (``QemuRunner.run_dir(vmid)/serial.log`` is the
        serial port); off by default, as most tests need only the API."""
        runner = QemuRunner(self.cluster, self.root / "run")
        self.cluster.on_start = runner.start
        self.cluster.on_stop = runner.stop
        self.cluster.on_powerdown = runner.powerdown
        self.cluster.is_running = runner.running
        self.cluster.qmp = runner.query
        self.cluster.nic_bytes = runner.nic_bytes
        return runner

    def __enter__(self) -> PVESim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/api2/json"

    # -- faults -------------------------------------------------------------------------

    def fail_next_task(self, task_type: str, message: str = "simulated task failure") -> None:
        """The next task of ``task_type`` (qmcreate, qmconfig, imgcopy, qmstart, ...) fails."""
        with self.cluster.tasks.lock:
            self.cluster.tasks.fail_next[task_type] = message

    def slow_next_task(self, task_type: str, seconds: float, *, logging: bool = False) -> None:
        """The next task of ``task_type`` takes ``seconds`` longer; ``logging``: it logs its progress
        meanwhile, as a disk import does."""
        with self.cluster.tasks.lock:
            self.cluster.tasks.slow_next[task_type] = seconds
            if logging:
                self.cluster.tasks.logging_next.add(task_type)

    def warn_next_task(self, task_type: str, *messages: str) -> None:
        """The next task of ``task_type`` (qmcreate, qmconfig, qmstart, qmdestroy, imgdel, ...) logs
        each message as ``WARN: ...`` and ends ``WARNINGS: n`` (as a ``log_warn`` in PVE's worker)."""
        with self.cluster.tasks.lock:
            self.cluster.tasks.warn_next[task_type] = list(messages) or ["simulated warning"]

    def fail_next_request(self, method: str, path: str, status: int = 500,
                          message: str = "simulated failure") -> None:
        """The next ``method`` request whose API path (after /api2/json) matches regex ``path``."""
        with self._lock:
            self._faults.append(_Fault(method, re.compile(path), "error", status, message))

    def drop_next_request(self, method: str, path: str) -> None:
        """The next matching request loses its connection half-way through its body."""
        with self._lock:
            self._faults.append(_Fault(method, re.compile(path), "drop"))

    def hold_next_request(self, method: str, path: str) -> _Fault:
        """The next matching request waits, received whole, until the test sets the returned fault's
        ``release`` (``arrived`` is set when it is there): a request still on its way to the node
        when its client died, handled afterwards as PVE handles any request it received."""
        fault = _Fault(method, re.compile(path), "hold")
        with self._lock:
            self._faults.append(fault)
        return fault

    def take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method == method and fault.path.search(path):
                    self._faults.remove(fault)
                    return fault
        return None

    # -- requests ---------------------------------------------------------------------

    @property
    def refused(self) -> list[Logged]:
        """Requests that failed schema validation (400)."""
        return [entry for entry in self.log if entry.status == 400]

    @property
    def unsimulated(self) -> list[Logged]:
        """Requests PVE would serve but the simulator does not (or paths PVE lacks): 501."""
        return [entry for entry in self.log if entry.status == 501]

    def volumes(self) -> list[str]:
        """Every volume id in every storage (import files included): what a cleanup must leave."""
        return [entry["volid"] for name in self.cluster.storages
                for entry in self.cluster.content_list({"storage": name}, "root@pam")]

    def login(self, params: dict[str, str | None]) -> dict[str, Any]:
        user = params.get("username") or ""
        if "@" not in user and params.get("realm"):
            user = f"{user}@{params['realm']}"
        if self.users.get(user) != params.get("password") or user not in self.users:
            time.sleep(self.login_delay)
            raise PVEError(401, "authentication failure")
        ticket = f"PVE:{user}:{int(time.time()):08X}::{base64.b64encode(secrets.token_bytes(32)).decode()}"
        csrf = f"{int(time.time()):08X}:{base64.b64encode(secrets.token_bytes(20)).decode().rstrip('=')}"
        with self._lock:
            self.tickets[ticket] = (user, csrf)
        return {"username": user, "ticket": ticket, "CSRFPreventionToken": csrf,
                "cap": {"vms": {}, "storage": {}, "nodes": {}, "access": {}, "dc": {}}}

    def authenticate(self, method: str, headers: Any) -> str:
        """The authenticated id (``user@realm`` or ``user@realm!token``), else 401."""
        auth = headers.get("Authorization", "")
        if auth.startswith("PVEAPIToken="):
            token_id, sep, secret = auth[len("PVEAPIToken="):].partition("=")
            if not sep:
                token_id, sep, secret = auth[len("PVEAPIToken="):].partition(":")
            if self.tokens.get(token_id) != secret.strip():
                raise PVEError(401, "invalid token value!")
            return token_id
        cookie = headers.get("Cookie", "")
        match = re.search(r"PVEAuthCookie=([^;]+)", cookie)
        if not match:
            raise PVEError(401, "No ticket")
        ticket = urllib.parse.unquote(match.group(1))
        if ticket not in self.tickets:
            raise PVEError(401, "invalid PVE ticket")
        user, csrf = self.tickets[ticket]
        if method != "GET" and headers.get("CSRFPreventionToken") != csrf:
            raise PVEError(401, "Permission denied - invalid csrf token")
        return user

    def access_permissions(self, p: dict[str, str], who: str) -> Any:
        """GET /access/permissions: the ACL's answer; for an id with a flat privilege set (``privileges``),
        that set on every path asked; everything for anyone else (the sim's root-like default)."""
        if self.acl.governs(who):
            return self.acl.answer(p, who)
        flat = self.privileges.get(p.get("userid") or who)
        held = {priv: 1 for priv in (ALL_PRIVILEGES if flat is None else sorted(flat))}
        return {p.get("path") or "/": held} if held else {}

    def check_permissions(self, who: str, endpoint: Endpoint, params: dict[str, str | None]) -> None:
        if self.acl.governs(who):
            acl_checks(self.acl, who, endpoint, params)
            return
        privs = self.privileges.get(who)
        if privs is None:
            return
        check = (endpoint.info.get("permissions") or {}).get("check") or _CODE_CHECKS.get(
            (endpoint.method, endpoint.template))
        if check is not None and not _allowed(check, privs):
            needed = re.sub(r"\{([\w-]+)\}", lambda m: params.get(m.group(1)) or m.group(0),
                            _first_perm(check))
            raise PVEError(403, f"Permission check failed ({needed})")


# Endpoints whose schema says `user: all` and check privileges in their code.
_CODE_CHECKS: dict[tuple[str, str], list[Any]] = {
    ("POST", "/nodes/{node}/qemu"): ["perm", "/vms/{vmid}", ["VM.Allocate"]],
    # PVE::API2::Storage::Content's delete, for anything but a backup.
    ("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}"): [
        "perm", "/storage/{storage}", ["Datastore.Allocate"]],
    # PVE::Storage::check_volume_access for a VM's disk.
    ("GET", "/nodes/{node}/storage/{storage}/content/{volume}"): [
        "or", ["perm", "/storage/{storage}", ["Datastore.Allocate"]],
        ["and", ["perm", "/storage/{storage}", ["Datastore.Audit"]], ["perm", "/vms/{owner}", ["VM.Config.Disk"]]]],
}


def _allowed(check: Any, privs: set[str]) -> bool:
    if not isinstance(check, list) or not check:
        return True
    head = check[0]
    if head == "perm":
        wanted = check[2] if len(check) > 2 else []
        any_of = "any" in check[3:] if len(check) > 3 else False
        return (any if any_of else all)(p in privs for p in wanted)
    if head == "and":
        return all(_allowed(c, privs) for c in check[1:])
    if head == "or":
        return any(_allowed(c, privs) for c in check[1:])
    return True


def _first_perm(check: Any) -> str:
    if isinstance(check, list) and check:
        if check[0] == "perm" and len(check) > 2:
            return f"{check[1]}, {', '.join(check[2])}"
        for sub in check[1:]:
            found = _first_perm(sub)
            if found:
                return found
    return ""


class _Handler(BaseHTTPRequestHandler):
    simulator: PVESim
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _send(self, status: int, body: dict[str, Any] | None, reason: str | None = None) -> None:
        payload = b"" if body is None else json.dumps(body).encode()
        self.send_response(status, (reason or "").split("\n")[0] or None)
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _send_raw(self, status: int, reason: str, payload: bytes) -> None:
        """``AnyEvent.pm``, ``error``: the message as the reason and the body, no JSON, no content type."""
        self.send_response(status, reason)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _upload_body(self, api_path: str, content_type: str, boundary: str | None, body: bytes,
                     query: dict[str, str | None]) -> Upload:
        """A multipart body, taken only by the upload call (``AnyEvent.pm``, ``authenticate_and_handle_request``:
        an ``isUpload`` request goes to ``file_upload_multipart``; any other path with a content type other
        than form-urlencoded or JSON is answered 506). An upload without a boundary or with a ``tmpfilename``
        query parameter dies there outside any answer (``unshift_read_header`` only warns, the client waits
        for nothing): the simulator answers 506 instead of leaving the client hanging."""
        given = {key: value for key, value in query.items() if value is not None}
        if not re.fullmatch(r"/nodes/[^/]+/storage/[^/]+/upload/?", api_path) or not boundary \
                or "tmpfilename" in given:
            raise UploadRefused(f"upload 'Content-Type '{content_type}' not implemented", status=506)
        self.simulator.var_tmp.mkdir(parents=True, exist_ok=True)
        return file_upload_multipart(body, boundary, given, self.simulator.var_tmp,
                                     room=self.simulator.cluster.spool_room())

    def _drop(self, length: int) -> None:
        self.rfile.read(length // 2)
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _handle(self, method: str) -> None:
        sim = self.simulator
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length", "0") or "0")
        if not url.path.startswith("/api2/json/"):
            self.rfile.read(length)
            self._send(404, None, "Not Found")
            return
        api_path = url.path[len("/api2/json"):]
        fault = sim.take_fault(method, api_path)
        if fault is not None and fault.kind == "drop":
            self._drop(length)
            return
        body = self.rfile.read(length)
        if fault is not None and fault.kind == "hold":
            fault.arrived.set()
            fault.release.wait(120)
            fault = None
        params: dict[str, str | None] = {}
        upload: Upload | None = None
        status, errors = 200, None
        try:
            content_type = self.headers.get("Content-Type", "")
            ct, boundary = parse_content_type(content_type)
            multipart = method in ("POST", "PUT") and ct == "multipart/form-data"
            if method in ("POST", "PUT") and not multipart:
                if content_type.startswith("application/json") and body:
                    params.update({k: _json_param(v) for k, v in json.loads(body).items()})
                else:
                    params.update(decode_urlencoded(body.decode("utf-8")))
            params.update(decode_urlencoded(url.query))
            if (method, api_path.rstrip("/")) == ("POST", "/access/ticket"):
                self._send(200, {"data": sim.login(params)})
                return
            who = sim.authenticate(method, self.headers)
            if multipart:  # read after authentication, as pveproxy reads an upload's body
                upload = self._upload_body(api_path, content_type, boundary, body, params)
                params = {**upload.params}
            segments = [urllib.parse.unquote(s) for s in api_path.split("/")]
            endpoint = sim.schema.resolve(method, segments)
            if endpoint is None:
                raise PVEError(501, f"Method '{method} {api_path}' not implemented")
            params.update(endpoint.path_params)
            errors = sim.schema.validate(endpoint, params)
            if errors:
                raise PVEError(400, "Parameter verification failed.", errors)
            sim.check_permissions(who, endpoint, params)
            if fault is not None:
                raise PVEError(fault.status, fault.message)
            route = ROUTES.get((method, endpoint.template))
            if route is None:
                raise PVEError(501, f"simulator: '{method} {endpoint.template}' is not simulated")
            given = {k: v for k, v in params.items() if v is not None}
            if route == "access_permissions":
                data = sim.access_permissions(given, who)
            elif route == "upload":
                if upload is None:
                    raise PVEError(500, "missing temporary file name")  # Status.pm, upload: no tmpfilename
                data = sim.cluster.upload(given, who, upload.spool)
            else:
                data = getattr(sim.cluster, route)(given, who)
            if sim.acl.governs(who):
                data = acl_filter(sim.acl, who, endpoint.method, endpoint.template, given, data)
            self._send(200, {"data": data})
        except UploadRefused as refused:
            status, reason, payload = refused.response()
            errors = {"multipart": refused.message}
            self._send_raw(status, reason, payload)
        except PVEError as error:
            status, errors = error.status, error.errors
            if error.status == 401 and error.message == "authentication failure":
                self._send(401, None, error.message)
            else:
                reply: dict[str, Any] = {"data": None, "message": error.message + "\n"}
                if error.errors:
                    reply["errors"] = error.errors
                self._send(error.status, reply, error.message)
        finally:
            if upload is not None and status != 200:  # no task took the spooled file
                upload.spool.unlink(missing_ok=True)
            shown = {k: ("***" if k == "password" else v) for k, v in params.items()}
            sim.log.append(Logged(method, api_path, shown, status, errors))


def _json_param(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)
