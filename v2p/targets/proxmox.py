"""A Proxmox VE node as the target, driven over its HTTPS API (``proxmoxer``).

Where: ``pve://[user@realm[!tokenid]@]host[:port]/node?storage=local-lvm`` (``target_from_url``).
Secrets (an API token's secret, or a password) come from ``V2P_PVE_TOKEN`` /
``V2P_PVE_PASSWORD`` or a secrets file, never from the URL (it ends up in argv and
in state files), and are never logged nor ``describe()``d.

TLS is verified against the system CAs by default; PVE's self-signed certificate
is pinned with ``fingerprint=<SHA256 hex>`` (the peer's certificate digest is
checked on every connection, the ticket request included); ``insecure=1`` turns
checking off and only when asked.

Disks: PVE storages are not local ``Storage`` objects, so ``storage()`` refuses
and ``disk_sink`` is the only way bytes reach the node (``RemoteImportSink``):
``qemu-img convert`` into a local qcow2 staging file, compared with the source
there, then uploaded (with its SHA-256, which PVE checks) into a storage's
``import`` content; the VM config attaches it with ``import-from``, which makes
PVE copy it into a fresh volume of the disk's storage.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import requests
from proxmoxer import ResourceException
from proxmoxer.backends.command_base import CommandBaseSession, JsonSimpleSerializer
from proxmoxer.backends.https import JsonSerializer, ProxmoxHTTPApiTokenAuth, ProxmoxHTTPAuthBase, ProxmoxHttpSession
from proxmoxer.core import ProxmoxResource
from requests.adapters import HTTPAdapter

from .. import convert
from ..bootwatch import SETTLE, BootWatch
from ..convert import Source as QemuInput
from ..errors import NoSpaceError, NoSuchVMError, TargetError, VMIDExistsError
from ..fsutil import private_dir
from ..interrupts import check as check_interrupts
from ..options import OptionError
from ..runner import run, which
from ..storage import Storage, Volume
from .base import BootReport, DiskSink, Target, VMConfig
from .serialtap import SerialTap

DEFAULT_PORT = 8006
TOKEN_ENV = "V2P_PVE_TOKEN"
PASSWORD_ENV = "V2P_PVE_PASSWORD"
SECRETS_ENV = "V2P_PVE_SECRETS"
QEMU_RUN_ENV = "V2P_PVE_QEMU_RUN_DIR"  # where the node's qemu-server keeps VM sockets (tests point it elsewhere)
TASK_POLL = 0.5  # seconds between polls of a long task; short ones are polled sooner (TASK_FIRST_POLL, doubling)
TASK_FIRST_POLL = 0.05
_FINGERPRINT = re.compile(r"[0-9a-fA-F]{2}(?::?[0-9a-fA-F]{2}){31}")
# Storage types whose disks are files (qcow2 by default); all others hold raw volumes only.
_FILE_STORAGES = {"dir", "nfs", "cifs", "glusterfs", "cephfs", "btrfs"}


@dataclass
class PveSettings:
    """Where a PVE target is and how v2p logs in; ``secret`` never leaves this object."""

    host: str
    node: str
    port: int = DEFAULT_PORT
    user: str = "root@pam"
    token_id: str | None = None
    storage: str = "local-lvm"
    import_storage: str = "local"  # a storage with the ``import`` content type: uploads land there
    fingerprint: str | None = None
    insecure: bool = False
    timeout: float = 30.0
    on_node: bool = False  # v2p runs on the node: storage paths and VM serial sockets are local
    backend: str = "https"  # or "local": pvesh on the node itself, as root, no secret
    secret: str = field(default="", repr=False)

    def public(self) -> dict[str, str]:
        return {"kind": "proxmox", "host": self.host, "port": str(self.port), "node": self.node,
                "user": self.user + (f"!{self.token_id}" if self.token_id else "")}


def _bool(value: str, where: str) -> bool:
    if value.lower() in ("1", "yes", "true", "on"):
        return True
    if value.lower() in ("0", "no", "false", "off", ""):
        return False
    raise OptionError(f"{where}: {value!r} is not a yes/no value", hint="use 1 or 0")


def read_secrets_file(path: Path) -> dict[str, str]:
    """``key = value`` lines (``token``, ``password``); refused if others may read it."""
    try:
        info = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise OptionError(f"{path}: cannot read the PVE secrets file: {exc.strerror}") from None
    if info.st_mode & 0o077:
        raise OptionError(f"{path}: the PVE secrets file is readable by others",
                          hint=f"chmod 600 {path}")
    found: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or key.strip() not in ("token", "password"):
            raise OptionError(f"{path}:{number}: expected 'token = SECRET' or 'password = SECRET'")
        found[key.strip()] = value.strip()
    return found


def _config_home(env: dict[str, str]) -> Path:
    return Path(env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".config"))


def _default_secrets_file(env: dict[str, str]) -> Path:
    return _config_home(env) / "v2p" / "pve-secrets"


# Every setting but the secret, by the name the URL query, the config file and (upper-cased, - as _,
# V2P_PVE_ before it) the environment use: V2P_PVE_HOST, V2P_PVE_NODE, V2P_PVE_ON_NODE, ...
SETTINGS = ("host", "port", "node", "user", "storage", "import", "fingerprint", "insecure", "timeout", "on-node",
            "backend")
CONFIG_ENV = "V2P_PVE_CONFIG"


def _env_name(key: str) -> str:
    return "V2P_PVE_" + key.upper().replace("-", "_")


def read_config_file(path: Path) -> dict[str, str]:
    """``key = value`` lines of the settings above; secrets are refused (they go in pve-secrets)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise OptionError(f"{path}: cannot read the PVE settings file: {exc.strerror}") from None
    found: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        if key in ("token", "password", "secret"):
            raise OptionError(f"{path}:{number}: a {key} does not belong in the settings file",
                              hint=f"put it in {_default_secrets_file(dict(os.environ))} (mode 600) or ${TOKEN_ENV}")
        if not sep or key not in SETTINGS:
            raise OptionError(f"{path}:{number}: expected 'key = value' with a key of: {', '.join(SETTINGS)}")
        found[key] = value
    return found


def _url_values(url: str) -> dict[str, str]:
    """The settings a ``pve://`` URL gives (``pve`` alone gives none)."""
    where = "the PVE target URL"
    if url == "pve":
        return {}
    parts = urlsplit(url)
    if parts.scheme != "pve":
        raise OptionError(f"{where} {url!r} does not start with pve://",
                          hint="pve://root@pam!v2p@pve.example.com/pve?storage=local-lvm")
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if ":" in userinfo:
        raise OptionError(f"{where} carries a password: refused (it would show in the process list "
                          "and the state file)", hint=f"put it in ${PASSWORD_ENV} or ${TOKEN_ENV} instead")
    found: dict[str, str] = {"user": unquote(userinfo)} if at else {}
    host, port = hostport, ""
    if hostport.startswith("["):  # an IPv6 literal
        host, _, rest = hostport[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        host = f"[{host}]"
    elif ":" in hostport:
        host, port = hostport.rsplit(":", 1)
    found.update({key: value for key, value in (("host", host), ("port", port), ("node", parts.path.strip("/")))
                  if value})
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key not in SETTINGS or key in ("host", "port", "node", "user"):
            raise OptionError(f"{where}: unknown setting {key!r}",
                              hint="known: storage, import, fingerprint, insecure, timeout, on-node, backend")
        found[key] = value
    return found


def target_from_url(url: str, env: dict[str, str] | None = None) -> PveSettings:
    """Settings from ``pve://[user@realm[!tokenid]@]host[:port][/node]?storage=NAME``, over the
    environment (``V2P_PVE_HOST``, ``V2P_PVE_NODE``, ...), over the settings file
    (``$V2P_PVE_CONFIG``, else ``$XDG_CONFIG_HOME/v2p/pve.conf``); ``url`` may be just ``pve``.

    Query keys: ``storage`` (disks), ``import`` (the storage uploads go to), ``fingerprint``,
    ``insecure``, ``timeout``, ``on-node``. The secret comes from ``env`` (``V2P_PVE_TOKEN`` with a
    token id, else ``V2P_PVE_PASSWORD``) or the secrets file (``$V2P_PVE_SECRETS``, else
    ``$XDG_CONFIG_HOME/v2p/pve-secrets``). No node anywhere: the target asks PVE (one node only).
    """
    env = dict(os.environ) if env is None else env
    config = Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else _config_home(env) / "v2p" / "pve.conf"
    values = read_config_file(config) if env.get(CONFIG_ENV) or config.exists() else {}
    values.update({key: env[_env_name(key)] for key in SETTINGS if env.get(_env_name(key))})
    values.update(_url_values(url))
    where = "the PVE target"
    settings = PveSettings(host="", node="")
    settings.backend = values.get("backend", "https")
    if settings.backend not in ("https", "local"):
        raise OptionError(f"{where}: backend {settings.backend!r} is not https or local",
                          hint="local: v2p runs as root on the node and calls pvesh")
    if settings.backend == "local":
        values.setdefault("host", "localhost")  # pvesh talks to this node's own API
        values["on-node"] = "1"
    user = values.get("user", settings.user)
    if "!" in user:
        user, settings.token_id = user.split("!", 1)
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", settings.token_id):
            raise OptionError(f"{where}: {settings.token_id!r} is not an API token id")
    if not re.fullmatch(r"[^\s@!:/]+@[A-Za-z0-9._-]+", user):
        raise OptionError(f"{where}: {user!r} is not user@realm", hint="root@pam, v2p@pve, ...")
    settings.user = user
    host = values.get("host", "")
    if not host or not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+", host):
        raise OptionError(f"{where} {url!r} names no host",
                          hint=f"pve://HOST/NODE, or set ${_env_name('host')}")
    settings.host = host
    port = values.get("port", "")
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise OptionError(f"{where}: port {port!r} is not a port number")
        settings.port = int(port)
    node = values.get("node", "")
    if node and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", node):
        raise OptionError(f"{where}: {node!r} is not a PVE node name", hint="the node's name is the path: pve://HOST/NODE")
    settings.node = node
    settings.storage = values.get("storage", settings.storage)
    settings.import_storage = values.get("import", settings.import_storage)
    if "fingerprint" in values:
        value = values["fingerprint"]
        if not _FINGERPRINT.fullmatch(value):
            raise OptionError(f"{where}: fingerprint {value!r} is not a SHA-256 (64 hex digits)",
                              hint="see: pvenode cert info on the node")
        settings.fingerprint = value.replace(":", "").lower()
    settings.insecure = _bool(values.get("insecure", ""), f"{where}: insecure")
    settings.on_node = _bool(values.get("on-node", ""), f"{where}: on-node")
    if "timeout" in values:
        try:
            settings.timeout = float(values["timeout"])
        except ValueError:
            raise OptionError(f"{where}: timeout {values['timeout']!r} is not a number of seconds") from None
        if not 0 < settings.timeout < 86400:
            raise OptionError(f"{where}: timeout {values['timeout']!r} is not a number of seconds")
    for name in (settings.storage, settings.import_storage):
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", name):
            raise OptionError(f"{where}: {name!r} is not a PVE storage id")
    if settings.backend == "https":  # pvesh runs as root: no secret
        settings.secret = _secret(settings, env)
    return settings


def _secret(settings: PveSettings, env: dict[str, str]) -> str:
    name, key = (TOKEN_ENV, "token") if settings.token_id else (PASSWORD_ENV, "password")
    if env.get(name):
        return env[name]
    path = Path(env[SECRETS_ENV]) if env.get(SECRETS_ENV) else _default_secrets_file(env)
    if path.exists() or env.get(SECRETS_ENV):
        value = read_secrets_file(path).get(key)
        if value:
            return value
    what = f"the secret of API token {settings.user}!{settings.token_id}" if settings.token_id \
        else f"the password of {settings.user}"
    raise OptionError(f"no {key} for the PVE target: {what} is needed",
                      hint=f"set ${name}, or put '{key} = ...' in {path} (mode 600)")


def form(values: dict[str, Any]) -> dict[str, str]:
    """Form values as PVE reads them: booleans 0/1, numbers as text; None left out.
    (requests percent-encodes the body, so ``;``, ``&`` and a second ``=`` survive.)"""
    out: dict[str, str] = {}
    for key, value in values.items():
        if value is None:
            continue
        out[key] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return out


class FingerprintAdapter(HTTPAdapter):
    """Accept exactly the peer certificate whose SHA-256 is ``fingerprint`` (urllib3 checks the
    digest of the certificate the server presented, on every new connection)."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["assert_fingerprint"] = self.fingerprint
        super().init_poolmanager(*args, **kwargs)


class _TicketAuth(ProxmoxHTTPAuthBase):  # type: ignore[misc]
    """User + password: a ticket fetched through v2p's own (pinned) session, renewed hourly.
    (proxmoxer's own password auth posts the password with a bare ``requests.post``, which
    would skip the fingerprint check.)"""

    renew_age = 3600.0

    def __init__(self, session: requests.Session, base_url: str, user: str, password: str,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._session, self._url, self._user, self._password = session, base_url, user, password
        self.ticket, self.csrf, self.birth = "", "", 0.0

    def login(self) -> None:
        try:
            resp = self._session.post(f"{self._url}/access/ticket", verify=self.verify_ssl,
                                      timeout=self.timeout,
                                      data={"username": self._user, "password": self._password})
        except requests.RequestException as exc:
            raise _connection_error(self._url, exc) from None
        if resp.status_code != 200:
            raise TargetError(f"PVE at {self._url}: logging in as {self._user} failed "
                              f"({resp.status_code} {resp.reason})",
                              hint=f"check the user and ${PASSWORD_ENV}; an API token is preferred")
        data = resp.json()["data"]
        self.ticket, self.csrf, self.birth = data["ticket"], data["CSRFPreventionToken"], time.monotonic()

    def get_cookies(self) -> Any:
        return requests.cookies.cookiejar_from_dict({"PVEAuthCookie": self.ticket})

    def __call__(self, req: Any) -> Any:
        if time.monotonic() - self.birth >= self.renew_age:
            self.login()
            req.headers.pop("Cookie", None)  # the expired ticket's; prepare_cookies keeps an existing one
            req.prepare_cookies(self.get_cookies())
        if req.method != "GET":
            req.headers["CSRFPreventionToken"] = self.csrf
        return req


def _connection_error(url: str, exc: Exception) -> TargetError:
    text = str(exc)
    if "Fingerprints did not match" in text:
        return TargetError(f"PVE at {url}: the server's certificate does not have the pinned fingerprint",
                           hint="compare with 'pvenode cert info' on the node; refused")
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return TargetError(f"PVE at {url}: its TLS certificate is not trusted",
                           hint="pin it: add ?fingerprint=<SHA-256 from 'pvenode cert info'> to the URL")
    # The text names the URL and the socket's complaint, never a header (where a token would be).
    reason = re.sub(r"\s+", " ", text)[-200:]
    return TargetError(f"the connection to PVE at {url} failed or broke off: {type(exc).__name__} ({reason})",
                       hint="check the host and port (8006 by default), then run the same command again")


class _PveshSession(CommandBaseSession):  # type: ignore[misc]
    """proxmoxer's local backend, with pvesh run through v2p's runner (logged, cancellable, no
    stray child); pvesh runs a call's worker task to its end before it returns."""

    def __init__(self, timeout: float) -> None:
        super().__init__(service="PVE", timeout=timeout)
        which("pvesh")  # a clear error off a PVE node, before any call

    def _exec(self, cmd: list[str]) -> tuple[str, str, int]:
        done = run(cmd, timeout=self.timeout, check=False)
        return done.stdout, done.stderr, done.returncode


class MultipartFile:
    """A multipart/form-data body streamed from a file: form fields, then the file (PVE's
    upload reads the file part last). Its length is known, so no chunked encoding.
    (Not an ``io`` object: requests would take its failing ``tell()`` for a body already read.)"""

    def __init__(self, fields: dict[str, str], name: str, path: Path) -> None:
        self.boundary = uuid.uuid4().hex
        head = b"".join(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
            for key, value in fields.items())
        head += (f'--{self.boundary}\r\nContent-Disposition: form-data; name="filename"; '
                 f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
        self._parts: list[bytes | Path] = [head, path, f"\r\n--{self.boundary}--\r\n".encode()]
        self._length = len(head) + path.stat().st_size + len(self._parts[2])  # type: ignore[arg-type]
        self._chunks = self._iterate()
        self._pending, self._offset = b"", 0  # the chunk being read, and how far

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self._length

    def _iterate(self) -> Iterator[bytes]:
        for part in self._parts:
            if isinstance(part, bytes):
                yield part
                continue
            with open(part, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    check_interrupts()  # a cancelled migration stops its upload within a MiB
                    yield chunk

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (at most one chunk: callers loop), b"" at the end."""
        while not self._pending:
            chunk = next(self._chunks, b"")
            if not chunk:
                return b""
            self._pending, self._offset = chunk, 0
        end = len(self._pending) if size < 0 else min(len(self._pending), self._offset + size)
        out = self._pending[self._offset:end]
        self._offset = end
        if end == len(self._pending):
            self._pending = b""
        return out


class ProxmoxTarget(Target):
    """VMs on one node of a PVE cluster."""

    kind = "proxmox"

    def efidisk(self, vmid: int, *, storage: str, secure: bool, index: int) -> str:
        """PVE allocates the variable store itself from ``STORAGE:1,...`` when the config is set."""
        return _pve_efidisk(storage, secure)

    def default_storage(self) -> str:
        return self.settings.storage

    def new_disk(self, vmid: int, config: VMConfig, *, storage: str, size: int) -> str:
        return f"{storage}:{max(1, size >> 30)}"  # PVE allocates a volume of that many GiB

    def remove_volume(self, vmid: int, volid: str) -> None:
        """A disk key deleted from a stopped VM's config became ``unusedN``: deleting that key
        destroys the volume (VM.Config.Disk suffices, no storage privilege)."""
        config = self.get_config(vmid)
        if any(value.split(",")[0] == volid for key, value in config.items() if not key.startswith("unused")):
            raise TargetError(f"VM {vmid}: volume {volid} is still in use")
        unused = [key for key, value in config.items() if key.startswith("unused") and value == volid]
        if unused:
            self.set_config(vmid, {}, delete=tuple(unused))

    def drivers_iso(self, given: str | None) -> tuple[Path | None, str]:
        """A volid (``local:iso/virtio-win.iso``) must be on the node; a local file is checked here
        and uploaded into a storage with ``iso`` content unless a file of its name and size is there."""
        from .. import drivers
        from ..errors import DriversError

        node = self.settings.node
        if given and ":" in given and not given.startswith("/"):
            storage = given.split(":", 1)[0]
            present = self.call("GET", f"nodes/{node}/storage/{storage}/content", content="iso") or []
            if not any(entry.get("volid") == given for entry in present):
                raise DriversError(f"drivers ISO {given}: no such ISO on PVE node {node}",
                                   hint="upload virtio-win.iso there, or pass the local file: --drivers-iso PATH")
            if self.settings.on_node:  # the ISO's file is on this machine: checked like a local one
                info = self.call("GET", f"nodes/{node}/storage/{storage}/content/{quote(given, safe='')}") or {}
                if info.get("path") and Path(info["path"]).is_file():
                    return Path(info["path"]), given
            return None, given
        path = drivers.locate(given)
        storage = self._iso_storage()
        volid = f"{storage}:iso/{path.name}"
        present = self.call("GET", f"nodes/{node}/storage/{storage}/content", content="iso") or []
        same = [entry for entry in present if entry.get("volid") == volid]
        if same and int(same[0].get("size", -1)) != path.stat().st_size:
            raise DriversError(f"drivers ISO {path}: PVE node {node} has another {volid} (a different size)",
                               hint=f"use that one (--drivers-iso {volid}) or rename your file")
        if not same:
            self.upload(storage, "iso", path, path.name)
        return path, volid

    def _iso_storage(self) -> str:
        """Where ISOs go: the import storage if it takes ISOs, else ``local``, else the first that does."""
        found: list[dict[str, Any]] = self.call("GET", f"nodes/{self.settings.node}/storage") or []
        takes = [str(entry["storage"]) for entry in found if "iso" in str(entry.get("content", "")).split(",")]
        for name in (self.settings.import_storage, "local", *takes):
            if name in takes:
                return name
        raise TargetError(f"no storage on PVE node {self.settings.node} takes ISO images",
                          hint="add the 'iso' content type to one (pvesm set local --content iso,...)")

    def upload(self, storage: str, content: str, path: Path, filename: str) -> None:
        """``path`` into ``storage``'s ``content`` (import, iso) as ``filename``, with its SHA-256, which
        PVE checks; waits for the upload's task."""
        if self.settings.backend == "local":
            raise TargetError(f"{path}: backend=local cannot upload files (pvesh takes no file body)",
                              hint=f"put it on the node's storage and name its volume, e.g. {storage}:{content}/"
                                   f"{filename}")
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                check_interrupts()
                digest.update(chunk)
        body = MultipartFile({"content": content, "checksum": digest.hexdigest(),
                              "checksum-algorithm": "sha256"}, filename, path)
        url = f"{self.base_url}/nodes/{self.settings.node}/storage/{storage}/upload"
        try:
            # requests' own request(): proxmoxer's would read the body into memory as a dict of fields.
            resp = requests.Session.request(self.session, "POST", url, data=body,
                                            headers={"Content-Type": body.content_type},
                                            cookies=self.session.auth.get_cookies(), verify=self.verify,
                                            timeout=max(self.settings.timeout, 600))
        except requests.RequestException as exc:
            raise _connection_error(self.base_url, exc) from None
        if resp.status_code >= 400:
            try:  # PVE's error body: {"data": null, "message": "...\n"}
                detail = str(resp.json().get("message") or "").strip()
            except ValueError:
                detail = resp.text[:300].strip()
            denied = resp.status_code in (401, 403)
            raise TargetError(f"PVE upload of {filename} to {storage}: {resp.status_code} {detail or resp.reason}",
                              hint=f"the API token needs Datastore.AllocateTemplate on /storage/{storage}" if denied
                              else f"storage {storage} needs the '{content}' content type "
                                   f"(pvesm set {storage} --content images,{content})")
        upid = resp.json().get("data")
        if isinstance(upid, str) and upid.startswith("UPID:"):
            self.wait_task(upid, what=f"upload {filename}")

    def __init__(self, settings: PveSettings, *, state_root: Path | None = None) -> None:
        self.settings = settings
        self._taps: dict[int, SerialTap] = {}
        self.base_url = f"https://{settings.host}:{settings.port}/api2/json"
        self._state_root = state_root
        self._waited: list[str] = []  # UPIDs of the tasks waited for: the state records them
        verify: bool = not (settings.insecure or settings.fingerprint)
        self.verify = verify
        if settings.backend == "local":
            self.session = _PveshSession(timeout=max(settings.timeout, 3600.0))
            self.api = ProxmoxResource(base_url="", session=self.session, serializer=JsonSimpleSerializer())
            if not settings.node:
                settings.node = self._only_node()
            return
        session = self._pinned(ProxmoxHttpSession())
        session.headers["accept"] = JsonSerializer().get_accept_types()
        if settings.token_id:
            session.auth = ProxmoxHTTPApiTokenAuth(settings.user, settings.token_id, settings.secret,
                                                   verify_ssl=verify, timeout=settings.timeout, service="PVE")
        else:
            auth = _TicketAuth(self._pinned(requests.Session()), self.base_url, settings.user, settings.secret,
                               verify_ssl=verify, timeout=settings.timeout, service="PVE")
            session.auth = auth
            self._login = auth
        self.session = session
        self.api = ProxmoxResource(base_url=self.base_url, session=session, serializer=JsonSerializer())
        if not settings.node:
            settings.node = self._only_node()

    def _only_node(self) -> str:
        """The node when the settings name none: a cluster of one has no doubt about it."""
        nodes = sorted(str(entry.get("node")) for entry in self.call("GET", "nodes") or [])
        if len(nodes) != 1:
            raise OptionError(f"PVE at {self.settings.host} has the nodes {', '.join(nodes) or '(none)'}: "
                              "name the one VMs go to", hint=f"pve://{self.settings.host}/NODE, or set V2P_PVE_NODE")
        return nodes[0]

    def _pinned(self, session: Any) -> Any:
        """``session`` with the certificate pin, if one is set."""
        settings = self.settings
        if settings.fingerprint and not settings.insecure:
            session.mount(f"https://{settings.host}:{settings.port}/", FingerprintAdapter(settings.fingerprint))
        return session

    def __repr__(self) -> str:
        return f"ProxmoxTarget({self.settings.host}:{self.settings.port}/{self.settings.node})"

    # -- the API -----------------------------------------------------------
    def call(self, method: str, path: str, **values: Any) -> Any:
        """One API call; failures become TargetError (the secret never appears in them)."""
        if getattr(self, "_login", None) is not None and not self._login.ticket:
            self._login.login()
        if self.settings.backend == "local":
            # pvesh takes a UPID's colons as they are (a slash inside a volume id stays escaped)
            path = path.replace("%3A", ":")
        resource = self.api(path.strip("/"))
        try:
            if method == "GET":
                return resource.get(**form(values))
            if method == "DELETE":
                return resource.delete(**form(values))
            return getattr(resource, method.lower())(**form(values))
        except ResourceException as exc:
            raise self._api_error(method, path, exc) from None
        except requests.RequestException as exc:
            raise _connection_error(self.base_url, exc) from None

    def _api_error(self, method: str, path: str, exc: ResourceException) -> TargetError:
        detail = str(getattr(exc, "content", "") or "")
        errors = getattr(exc, "errors", None)
        if errors:
            detail += " " + "; ".join(f"{key}: {value}" for key, value in dict(errors).items()) \
                if isinstance(errors, dict) else f" {errors}"
        status = getattr(exc, "status_code", 0)
        hint = "the API token needs the privileges for this call (VM.Allocate, Datastore.AllocateSpace, ...)" \
            if status in (401, 403) else None
        return TargetError(f"PVE {method} {path}: {status} {detail.strip()}", hint=hint)

    def wait_task(self, upid: str, *, what: str, timeout: float = 3600.0) -> None:
        """Poll a task until it stops; an exit status other than OK is a TargetError with its log's tail."""
        node = self.settings.node
        deadline = time.monotonic() + timeout
        path = f"nodes/{node}/tasks/{quote(upid, safe='')}"
        self._waited.append(upid)
        pause = TASK_FIRST_POLL  # most tasks (config, start, stop) end within a fraction of a second
        while True:
            check_interrupts()
            status = self.call("GET", f"{path}/status")
            if status.get("status") == "stopped":
                break
            if time.monotonic() > deadline:
                raise TargetError(f"PVE task {what} still running after {timeout:.0f} s ({upid})",
                                  hint="see the task log in the PVE web interface")
            time.sleep(pause)
            pause = min(pause * 2, TASK_POLL)
        exit_status = str(status.get("exitstatus", ""))
        if exit_status != "OK":
            lines = self.call("GET", f"{path}/log", start=0, limit=1000) or []
            tail = " | ".join(str(line.get("t", "")) for line in lines[-5:])
            raise TargetError(f"PVE task {what} failed: {exit_status}" + (f" ({tail})" if tail else ""),
                              hint="the node's task log has the whole story")

    def _task(self, result: Any, what: str) -> None:
        if isinstance(result, str) and result.startswith("UPID:"):
            self.wait_task(result, what=what)

    def _qemu(self, vmid: int) -> str:
        return f"nodes/{self.settings.node}/qemu/{vmid}"

    # -- layout ------------------------------------------------------------
    def describe(self) -> dict[str, str]:
        return self.settings.public()

    def state_dir(self) -> Path:
        if self._state_root is not None:
            return self._state_root
        base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        return Path(base) / "v2p" / "pve" / f"{self.settings.host}-{self.settings.node}"

    def staging_dir(self) -> Path:
        """Where disks are converted before their upload (ours alone)."""
        folder = self.state_dir() / "staging"
        folder.parent.mkdir(parents=True, exist_ok=True)
        return private_dir(folder)

    def storage(self, name: str) -> Storage:
        raise TargetError(f"storage {name!r} is on the PVE node {self.settings.host}, not on this machine",
                          hint="disks reach a PVE target through its disk sink only")

    def device_storage(self, device: str) -> Storage:
        raise TargetError(f"--device {device}: a block device of the PVE node cannot be written from here",
                          hint="leave --device out: the disk is uploaded into a PVE storage")

    def storage_status(self, name: str) -> dict[str, Any]:
        """The node's view of storage ``name``: type, content, avail (``GET /nodes/{node}/storage``)."""
        found: list[dict[str, Any]] = self.call("GET", f"nodes/{self.settings.node}/storage") or []
        for entry in found:
            if entry.get("storage") == name:
                return entry
        raise TargetError(f"no storage called {name!r} on PVE node {self.settings.node}",
                          hint=f"known: {', '.join(str(e.get('storage')) for e in found)}; see: pvesm status")

    def disk_sink(self, vmid: int, index: int, *, fmt: str | None, storage: str, device: str | None = None,
                  force: bool = False) -> DiskSink:
        if device:
            self.device_storage(device)
        info = self.storage_status(storage)
        formats = ["qcow2", "raw"] if info.get("type") in _FILE_STORAGES else ["raw"]
        chosen = fmt or formats[0]
        if chosen not in formats:
            raise OptionError(f"--format {chosen}: PVE storage {storage} ({info.get('type')}) holds "
                              f"{'/'.join(formats)} volumes only",
                              hint="leave --format out to get the storage's own format")
        if self.settings.on_node:
            from .pve_node import OnNodeSink  # the storage is on this machine: no upload, no import-from

            return OnNodeSink(self, vmid, index, fmt=chosen, storage=storage, kind=str(info.get("type")))
        return RemoteImportSink(self, vmid, index, fmt=chosen, storage=storage)

    # -- VMs ---------------------------------------------------------------
    def _resources(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call("GET", "cluster/resources", type="vm") or []
        return found

    def vm_exists(self, vmid: int) -> bool:
        # Cluster-wide, containers included: they share one ID space with VMs.
        return any(int(entry.get("vmid", -1)) == vmid for entry in self._resources())

    def list_vms(self) -> list[int]:
        return sorted(int(entry["vmid"]) for entry in self._resources()
                      if entry.get("type") == "qemu" and entry.get("node") == self.settings.node)

    def next_vmid(self, above: int = 0) -> int:
        # PVE's own pick first; past ``above`` (found taken since, or held by a migration record)
        # the lowest one no guest of the cluster has.
        found = int(self.call("GET", "cluster/nextid"))
        if found > above:
            return found
        taken = {int(entry.get("vmid", -1)) for entry in self._resources()}
        return next(vmid for vmid in range(above + 1, 1_000_000_000) if vmid not in taken)

    def tasks_waited(self) -> list[str]:
        return list(self._waited)

    def _require(self, vmid: int) -> None:
        if not any(int(entry.get("vmid", -1)) == vmid and entry.get("type") == "qemu"
                   and entry.get("node") == self.settings.node for entry in self._resources()):
            raise NoSuchVMError(f"VMID {vmid} does not exist on PVE node {self.settings.node}",
                                hint="see: v2p vm list")

    def create_vm(self, vmid: int, config: VMConfig) -> None:
        taken = [entry for entry in self._resources() if int(entry.get("vmid", -1)) == vmid]
        if taken:
            what = taken[0].get("type", "guest")
            raise VMIDExistsError(f"VMID {vmid} already exists on the PVE cluster ({what} on "
                                  f"{taken[0].get('node', '?')})", hint="pick another --vmid")
        try:
            self._task(self.call("POST", f"nodes/{self.settings.node}/qemu", vmid=vmid, **config),
                       f"create VM {vmid}")
        except TargetError as exc:
            if re.search(rf"\b(?:VM|CT) {vmid} already exists", exc.message):  # taken since we looked
                raise VMIDExistsError(exc.message, hint="pick another --vmid") from None
            raise

    def get_config(self, vmid: int) -> VMConfig:
        self._require(vmid)
        found = self.call("GET", f"{self._qemu(vmid)}/config")
        return {key: str(value) for key, value in found.items() if key != "digest"}

    def set_config(self, vmid: int, updates: VMConfig, delete: tuple[str, ...] = ()) -> None:
        self._require(vmid)
        values: dict[str, Any] = dict(updates)
        if delete:
            present = self.call("GET", f"{self._qemu(vmid)}/config")
            gone = [key for key in delete if key in present and key not in updates]
            if gone:  # PVE refuses to delete a key it does not have
                values["delete"] = ",".join(gone)
        if not values:
            return
        # POST runs as a task (an import-from or a new volume may take long); PUT would not wait.
        self._task(self.call("POST", f"{self._qemu(vmid)}/config", **values), f"configure VM {vmid}")

    def destroy_vm(self, vmid: int) -> None:
        self._require(vmid)
        if self.status(vmid) == "running":
            self._task(self.call("POST", f"{self._qemu(vmid)}/status/stop"), f"stop VM {vmid}")
        self._task(self.call("DELETE", self._qemu(vmid), purge=True, **{"destroy-unreferenced-disks": True}),
                   f"destroy VM {vmid}")
        # Its disks' uploads and staging files are v2p's own copies of this VM's disks.
        node, where = self.settings.node, self.settings.import_storage
        ours = re.compile(rf"{re.escape(where)}:import/v2p-{vmid}-disk-\d+\.qcow2")
        for entry in self.call("GET", f"nodes/{node}/storage/{where}/content", content="import") or []:
            if ours.fullmatch(str(entry.get("volid", ""))):
                self._task(self.call("DELETE", f"nodes/{node}/storage/{where}/content/"
                                     f"{quote(entry['volid'], safe='')}"), f"delete {entry['volid']}")
        for path in self.staging_dir().glob(f"v2p-{vmid}-disk-*.qcow2"):
            path.unlink(missing_ok=True)
        if self.settings.on_node:
            from .pve_node import remove_temporaries  # PVE's listing, so its destroy, never sees them

            remove_temporaries(self, vmid)

    # -- running -------------------------------------------------------------
    def status(self, vmid: int) -> str:
        self._require(vmid)
        current = self.call("GET", f"{self._qemu(vmid)}/status/current")
        return "running" if current.get("status") == "running" else "stopped"

    def _serial_socket(self, vmid: int) -> Path:
        return Path(os.environ.get(QEMU_RUN_ENV) or "/var/run/qemu-server") / f"{vmid}.serial0"

    def start(self, vmid: int, *, hold: bool = False) -> None:
        # A PVE VM never dies with this process: ``hold`` cannot be honoured, and ``held`` says so.
        if self.status(vmid) == "running":
            raise TargetError(f"VM {vmid} is already running")
        if self.settings.on_node:
            # On the node the guest's serial port is read from its socket (what `qm terminal` uses);
            # the port stays in the config: a COM port is harmless and Windows' EMS talks there.
            if self.get_config(vmid).get("serial0") != "socket":
                self.set_config(vmid, {"serial0": "socket"})
            self._close_tap(vmid)
            self._taps[vmid] = SerialTap(self._serial_socket(vmid))  # connects as soon as QEMU listens
        try:
            self._task(self.call("POST", f"{self._qemu(vmid)}/status/start"), f"start VM {vmid}")
        except BaseException:
            self._close_tap(vmid)
            raise

    def _close_tap(self, vmid: int) -> None:
        tap = self._taps.pop(vmid, None)
        if tap is not None:
            tap.close()

    def stop(self, vmid: int, *, timeout: float = 60.0) -> bool:
        if self.status(vmid) != "running":
            self._close_tap(vmid)
            return True
        try:
            self._task(self.call("POST", f"{self._qemu(vmid)}/status/shutdown", timeout=int(max(timeout, 1)),
                                 forceStop=False), f"shut down VM {vmid}")
        except TargetError:
            pass  # the guest ignored the power button: stopped hard below
        clean = self.status(vmid) != "running"
        if not clean:
            self._task(self.call("POST", f"{self._qemu(vmid)}/status/stop"), f"stop VM {vmid}")
        self._close_tap(vmid)
        return clean

    def guest_output(self, vmid: int) -> str:
        """The serial port since the VM was started, on the node (read from its socket); elsewhere ''
        (PVE offers a remote serial console only over a websocket, which v2p does not read)."""
        tap = self._taps.get(vmid)
        return tap.text() if tap is not None else ""

    def _agent(self, vmid: int) -> str | None:
        """The guest's OS as its QEMU guest agent names it, once the agent answers; else None."""
        try:
            self.call("POST", f"{self._qemu(vmid)}/agent/ping")
        except TargetError:
            return None
        try:
            info = self.call("GET", f"{self._qemu(vmid)}/agent/get-osinfo") or {}
        except TargetError:
            return "the guest"
        found = info.get("result", info) if isinstance(info, dict) else {}
        return str(found.get("pretty-name") or found.get("name") or "the guest")

    def observe(self, vmid: int, *, timeout: float, patterns: dict[str, str]) -> tuple[str, str]:
        """On the node: the serial output against ``patterns``; elsewhere only whether the VM stops."""
        deadline = time.monotonic() + timeout
        while True:
            check_interrupts()
            output = self.guest_output(vmid)
            for name, pattern in patterns.items():
                if output and re.search(pattern, output):
                    return name, output
            if self.status(vmid) != "running":
                return "stopped", self.guest_output(vmid)
            if time.monotonic() >= deadline:
                return "timeout", output
            time.sleep(0.5)

    def boot_check(self, vmid: int, *, timeout: float, settle: float = SETTLE) -> BootReport:
        """Start the VM and watch it. On the node: its serial port, read as the local target reads
        it (``bootwatch``: login prompt, systemd target, Windows SAC, a STOP code...); the guest
        agent, where the config has one; elsewhere only the VM's status (``running`` at the end)."""
        if self.status(vmid) == "running":
            self.stop(vmid, timeout=10)
        config = self.get_config(vmid)
        agent = config.get("agent", "0").split(",")[0] in ("1", "enabled=1")
        started = time.monotonic()
        self.start(vmid)
        notes = []
        if not self.settings.on_node and not agent:
            notes.append("no serial console (v2p is not on the node) and no guest agent: "
                         "only that the VM runs can be seen")
        watch = BootWatch(vmid, timeout=timeout, settle=settle, started=started,
                          serial_log=f"{self._serial_socket(vmid)} on node {self.settings.node}")

        def report(outcome: str, signal: str) -> BootReport:
            return BootReport(outcome, round(time.monotonic() - started, 2), signal=signal,
                              serial=self.guest_output(vmid), notes=notes)

        try:
            while True:
                check_interrupts()
                now = time.monotonic()
                if self.status(vmid) != "running":
                    return report("powered-off", "the guest powered off")
                if agent:
                    name = self._agent(vmid)
                    if name:
                        return report("up", f"the guest agent answered ({name})")
                if self.settings.on_node:
                    verdict = watch.look(self.guest_output(vmid), "", now)
                    if verdict is not None:
                        return report(verdict.outcome, verdict.signal)
                elif now - started >= (timeout if agent else min(settle, timeout)):
                    # Nothing more to learn without a console or an agent than that it keeps running.
                    return report("running", f"the VM still runs after {now - started:.0f}s")
                time.sleep(0.5)
        except BaseException:
            self.stop(vmid, timeout=5)
            raise


def _pve_efidisk(storage: str, secure: bool) -> str:
    from ..pveconfig import efidisk

    return efidisk(storage, secure_boot=secure)


class RemoteImportSink(DiskSink):
    """Disk ``index`` of VM ``vmid``: converted locally to qcow2, uploaded into the import
    storage, attached with ``import-from`` (PVE copies it into ``storage`` as ``fmt``).

    ``volid`` is the value PVE needs to create the disk once (``STORAGE:0,import-from=...``):
    after the attach PVE's config names the volume it allocated. The staging file stays until
    ``remove`` so a committed disk can still be verified (PVE has no download of import volumes).
    """

    in_place = False

    def __init__(self, target: ProxmoxTarget, vmid: int, index: int, *, fmt: str, storage: str) -> None:
        self.target, self.vmid, self.index, self.fmt, self.storage = target, vmid, index, fmt, storage
        self.import_storage = target.settings.import_storage
        self.filename = f"v2p-{vmid}-disk-{index}.qcow2"
        self.import_volid = f"{self.import_storage}:import/{self.filename}"
        self.volid = f"{storage}:0,import-from={self.import_volid},format={fmt}"

    @property
    def staging(self) -> Volume:
        return Volume(self.import_volid, self.target.staging_dir() / self.filename, "qcow2")

    def _content(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.target.call(
            "GET", f"nodes/{self.target.settings.node}/storage/{self.import_storage}/content",
            content="import") or []
        return found

    def check(self, src: QemuInput, *, capacity: int) -> dict[str, Any]:
        staged = convert.measure(src, "qcow2")
        final = convert.measure(src, self.fmt)
        local_free = shutil.disk_usage(self.target.staging_dir()).free
        if staged > local_free:
            raise NoSpaceError(f"not enough space in {self.target.staging_dir()} to stage the disk: "
                              f"{staged} bytes needed, {local_free} free", hint="free some space")
        rooms = {self.import_storage: staged}
        rooms[self.storage] = rooms.get(self.storage, 0) + final
        free = 0
        for name, needed in rooms.items():
            avail = int(self.target.storage_status(name).get("avail", 0))
            if needed > avail:
                raise NoSpaceError(f"not enough space on PVE storage {name}: {needed} bytes needed, "
                                  f"{avail} free", hint="free some space or choose another --storage")
            free = avail if name == self.storage else free
        return {"storage": f"PVE {self.target.settings.node}:{self.storage}", "format": self.fmt,
                "required_bytes": sum(rooms.values()) if self.storage == self.import_storage else final,
                "free_bytes": free}

    def exists(self) -> bool:
        return any(entry.get("volid") == self.import_volid for entry in self._content())

    def written(self) -> bool:
        return self.staging.path.exists() and not self.exists()

    def write(self, src: QemuInput, *, capacity: int, progress: Callable[[float], None] | None = None,
              bwlimit: int | None = None) -> None:
        self._delete_upload()
        staging = self.staging
        staging.path.unlink(missing_ok=True)
        try:
            convert.convert(src, staging, capacity=capacity, bwlimit=bwlimit, on_progress=progress)
        except BaseException:
            staging.path.unlink(missing_ok=True)
            raise

    def verify(self, src: QemuInput, *, capacity: int) -> None:
        if not self.staging.path.exists():
            raise TargetError(f"nothing written for {self.import_volid} to verify (no staging file)",
                              hint="run the same command again: the disk is written anew")
        convert.compare(src, self.staging, capacity=capacity)

    def commit(self) -> str:
        if self.exists():
            return self.volid
        path = self.staging.path
        if not path.exists():
            raise TargetError(f"nothing written for {self.import_volid} to commit",
                              hint="run the same command again: the disk is written anew")
        self.target.upload(self.import_storage, "import", path, self.filename)
        if not self.exists():
            raise TargetError(f"PVE upload of {self.filename} finished but {self.import_volid} is not there")
        return self.volid

    def attached(self, value: str) -> bool:
        """Whether a disk key's ``value`` in the VM config is what PVE made of ``volid``: a volume of
        this VM on ``storage`` (PVE rewrites ``STORAGE:0,import-from=...`` to the volume it allocated,
        so comparing with ``volid`` cannot tell; Attach needs this to know it is done)."""
        volume = value.split(",")[0]
        name, _, rest = volume.partition(":")
        return name == self.storage and "import-from=" not in value and \
            re.fullmatch(rf"(?:{self.vmid}/)?vm-{self.vmid}-disk-\d+(?:\.(?:raw|qcow2))?", rest) is not None

    def _delete_upload(self) -> None:
        if self.exists():
            node = self.target.settings.node
            self.target._task(self.target.call(
                "DELETE", f"nodes/{node}/storage/{self.import_storage}/content/{quote(self.import_volid, safe='')}"),
                f"delete {self.import_volid}")

    def remove(self) -> None:
        self._delete_upload()
        self.staging.path.unlink(missing_ok=True)

    def release(self) -> None:
        # PVE copied the upload into the VM's own volume: neither copy is needed any more.
        self.remove()

    def fingerprint(self) -> dict[str, Any]:
        path = self.staging.path
        try:
            return convert.fingerprint(path) if stat.S_ISREG(path.stat().st_mode) else {}
        except OSError:
            return {}

    def __repr__(self) -> str:
        return f"RemoteImportSink({self.volid})"
