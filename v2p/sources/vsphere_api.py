"""Talking to vCenter or an ESXi host for the vSphere source: where it is and who logs in
(``VsphereUri`` from ``vsphere://[USER@]HOST[:PORT]/DC/vm/FOLDER.../NAME?fingerprint=...``), the
session (``Session``: pyvmomi's ``SmartConnect`` with TLS verified, or pinned by the certificate's SHA-256,
or skipped only when ``insecure`` is asked for), and reading inventory properties in one
PropertyCollector call (``RetrieveContents``: never pyvmomi's per-property ``Fetch``, which vcsim 0.24
answers with a panic for an unset property and which costs a round trip per attribute).

The password comes from ``$V2P_VSPHERE_PASSWORD`` or the 0600 secrets file (``$V2P_VSPHERE_SECRETS``, else
``$XDG_CONFIG_HOME/v2p/vsphere-secrets``, a ``password = ...`` line), through ``v2p.credentials``; never
from the URI (it ends up in the state file and in ``ps``), never in a message.

Not here: what a VM's hardware means (``vsphere.py``), printing a listing (``cli_vsphere.py``).
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import socket
import ssl
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from .. import credentials
from ..credentials import yes_no
from ..errors import SourceError
from ..options import OptionError

SCHEME = "vsphere"
DEFAULT_PORT = 443
USER_ENV = "V2P_VSPHERE_USER"
HOST_ENV = "V2P_VSPHERE_HOST"
PASSWORD_ENV = "V2P_VSPHERE_PASSWORD"
SECRETS_ENV = "V2P_VSPHERE_SECRETS"
SECRETS_FILE = "vSphere secrets file"
QUERY_KEYS = ("fingerprint", "insecure", "timeout", "parallel")
PARALLEL = 2  # disks downloaded at once from one ESXi host (``?parallel=N``)
_FINGERPRINT_HINT = "the SHA-256 of vCenter's certificate: openssl s_client -connect HOST:443 </dev/null | " \
                    "openssl x509 -noout -fingerprint -sha256"


@dataclass(frozen=True)
class VsphereUri:
    """A ``vsphere://`` URI taken apart: the endpoint, the user, and the inventory path it names
    (``("DC0", "vm", "web01")``; empty for the whole inventory). Holds no secret."""

    host: str
    port: int
    user: str
    path: tuple[str, ...]
    fingerprint: str | None = None
    insecure: bool = False
    timeout: float = 60.0
    parallel: int = PARALLEL  # how a run downloads, not which VM: not in ``str()`` (the state file's source)

    @property
    def inventory_path(self) -> str:
        """The path as vSphere's SearchIndex takes it: names joined by ``/``, a ``/`` inside a name as ``%2f``."""
        return "/".join(name.replace("%", "%25").replace("/", "%2f") for name in self.path)

    def at(self, path: Sequence[str]) -> VsphereUri:
        """The same endpoint and user, naming ``path``."""
        return VsphereUri(self.host, self.port, self.user, tuple(path), self.fingerprint, self.insecure, self.timeout,
                          self.parallel)

    @property
    def short(self) -> str:
        """``vsphere://HOST[:PORT]/PATH``: for messages (no user, no query)."""
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        return f"{SCHEME}://{self.host}{port}" + "".join("/" + quote(name, safe=" ") for name in self.path)

    def __str__(self) -> str:
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        path = "".join("/" + quote(name, safe=" ") for name in self.path)
        query = "&".join(part for part in (f"fingerprint={self.fingerprint}" if self.fingerprint else "",
                                           "insecure=1" if self.insecure else "") if part)
        return f"{SCHEME}://{quote(self.user, safe='@')}@{self.host}{port}{path}" + (f"?{query}" if query else "")


def parse_uri(uri: str, env: Mapping[str, str] | None = None) -> VsphereUri:
    """``vsphere://[USER@]HOST[:PORT][/DC[/vm/FOLDER.../NAME]][?fingerprint=SHA256&insecure=1&timeout=S&parallel=N]``;
    the user is also ``$V2P_VSPHERE_USER``. A password in the URI, or any key holding a secret, is refused."""
    env = os.environ if env is None else env
    parts = urlsplit(uri)
    where = f"the vSphere source {_shown(uri)}"
    if parts.scheme != SCHEME:
        raise OptionError(f"{where}: not a {SCHEME}:// URI")
    if parts.password is not None or ":" in parts.netloc.rpartition("@")[0]:
        raise OptionError(f"{where}: a password in the URI is refused (the URI is shown in ps, logs and the "
                          "state file)", hint=f"put it in ${PASSWORD_ENV} or in a 0600 secrets file "
                          f"(${SECRETS_ENV})")
    host = parts.hostname or ""
    if not host or not re.fullmatch(r"[A-Za-z0-9.\-:\[\]]+", host):
        raise OptionError(f"{where}: names no host", hint="vsphere://VCENTER/DATACENTER/vm/FOLDER/VM")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise OptionError(f"{where}: the port is not a port number") from None
    user = unquote(parts.username or "") or env.get(USER_ENV, "")
    if not user:
        raise OptionError(f"{where}: no user", hint=f"vsphere://USER@{host}/..., or set ${USER_ENV}")
    if any(unicode_control(char) for char in user):
        raise OptionError(f"{where}: the user name holds a control character")
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if credentials.SECRET_NAME.search(key):
            raise OptionError(f"{where}: a secret in the URI ({key}=...) is refused",
                              hint=f"put the password in ${PASSWORD_ENV} or ${SECRETS_ENV}")
        if key not in QUERY_KEYS:
            raise OptionError(f"{where}: unknown key {key!r}", hint="known: " + ", ".join(QUERY_KEYS))
        query[key] = value
    fingerprint = credentials.fingerprint(query["fingerprint"], where, hint=_FINGERPRINT_HINT) \
        if query.get("fingerprint") else None
    timeout = 60.0
    if "timeout" in query:
        try:
            timeout = float(query["timeout"])
        except ValueError:
            timeout = -1
        if not 0 < timeout <= 3600:
            raise OptionError(f"{where}: timeout {query['timeout']!r} is not a number of seconds up to 3600")
    parallel = PARALLEL
    if "parallel" in query:
        parallel = int(query["parallel"]) if query["parallel"].isdigit() and len(query["parallel"]) <= 2 else 0
        if not 1 <= parallel <= 16:
            raise OptionError(f"{where}: parallel {query['parallel']!r} is not a number of disks from 1 to 16")
    path = tuple(unquote(name) for name in parts.path.split("/") if name)
    return VsphereUri(host.lower(), port, user, path, fingerprint,
                      yes_no(query.get("insecure", ""), f"{where}: insecure"), timeout, parallel)


def unicode_control(char: str) -> bool:
    return ord(char) < 0x20 or ord(char) == 0x7f


def _shown(uri: str) -> str:
    """``uri`` for a message: a password someone put in it replaced by ``***``."""
    return re.sub(r"(//[^/@:]*):[^/@]*@", r"\1:***@", uri)


def find_password(where: VsphereUri, env: Mapping[str, str] | None = None) -> str:
    """The password for ``where``: ``$V2P_VSPHERE_PASSWORD``, else the secrets file's ``password`` line.
    With ``$V2P_VSPHERE_HOST`` set, that host's only: a URI naming another (a plan from someone else) is
    refused, not sent it."""
    env = os.environ if env is None else env
    configured = env.get(HOST_ENV, "").lower()
    if configured and configured not in (where.host, f"{where.host}:{where.port}"):
        raise OptionError(f"the vSphere source {where.host}:{where.port} is not the host this environment "
                          f"configures (${HOST_ENV} is {configured}): its password is not sent there",
                          hint=f"name {configured} in the URI, or change ${HOST_ENV}")
    path = Path(env[SECRETS_ENV]) if env.get(SECRETS_ENV) else \
        credentials.config_home(env) / "v2p" / "vsphere-secrets"
    value = credentials.find_secret(env, PASSWORD_ENV, "password", path, named=bool(env.get(SECRETS_ENV)),
                                    what=SECRETS_FILE, service="vSphere")
    if not value:
        value = _prompted(where)
    if not value:
        raise OptionError("no password for the vSphere source",
                          hint=f"set ${PASSWORD_ENV}, or put 'password = ...' in {path} (mode 600)")
    return value


_PROMPTED: dict[tuple[str, str, int], str] = {}  # asked once per process: a migration logs in more than once


def _prompted(where: VsphereUri) -> str:
    """The password typed at a terminal (not echoed), when neither the environment nor the secrets file
    has one and v2p runs at a terminal; "" otherwise (a plan's children, cron, a panel: no prompt)."""
    key = (where.user, where.host, where.port)
    if key not in _PROMPTED:
        if not (sys.stdin is not None and sys.stdin.isatty() and sys.stderr is not None and sys.stderr.isatty()):
            return ""
        _PROMPTED[key] = getpass.getpass(f"vSphere password for {where.user}@{where.host}: ", stream=sys.stderr)
    return _PROMPTED[key]


# -- TLS ------------------------------------------------------------------------------------------------

class PinMismatch(ssl.SSLError):
    """The peer's certificate is not the pinned one; ``seen`` is its SHA-256."""

    def __init__(self, seen: str) -> None:
        super().__init__(f"certificate SHA-256 {seen} is not the pinned one")
        self.seen = seen


class _PinnedContext(ssl.SSLContext):
    """Accepts exactly the certificate whose SHA-256 is ``pin``: checked after every handshake, on every
    connection (pyvmomi's own ``thumbprint`` is only consulted after a CA check failed, and its version
    probe ignores it)."""

    pin: str

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        der = sock.getpeercert(binary_form=True)
        seen = hashlib.sha256(der or b"").hexdigest()
        if seen != self.pin:
            sock.close()
            raise PinMismatch(seen)
        return sock


def tls_context(where: VsphereUri) -> ssl.SSLContext:
    """The system's CA store; a pin instead of it; no check at all only for ``insecure``."""
    if where.fingerprint and not where.insecure:
        pinned = _PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
        pinned.pin = where.fingerprint
        pinned.check_hostname = False
        pinned.verify_mode = ssl.CERT_NONE
        return pinned
    context = ssl.create_default_context()
    if where.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def peer_fingerprint(host: str, port: int, timeout: float = 10.0) -> str | None:
    """The SHA-256 of the certificate ``host:port`` presents (for a hint), None if it cannot be had."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host) as sock:
            der = sock.getpeercert(binary_form=True)
    except OSError:
        return None
    return hashlib.sha256(der).hexdigest() if der else None


# -- the session ----------------------------------------------------------------------------------------

@dataclass
class Session:
    """One login to vCenter/ESXi, from ``connect`` to ``close``."""

    where: VsphereUri
    password: str = field(repr=False)
    si: Any = field(default=None, repr=False)  # vim.ServiceInstance

    def connect(self) -> Session:
        from pyVim import connect as pyvim_connect
        from pyVmomi import vim

        connect: Any = pyvim_connect  # its stubs leave the calls untyped
        said = f"vsphere://{self.where.host}:{self.where.port}"
        try:
            self.si = connect.SmartConnect(protocol="https", host=self.where.host, port=self.where.port,
                                   user=self.where.user, pwd=self.password, sslContext=tls_context(self.where),
                                   httpConnectionTimeout=self.where.timeout)
        except vim.fault.InvalidLogin:
            raise SourceError(f"{said}: the login of {self.where.user} was refused (wrong user or password)",
                              hint=f"check ${PASSWORD_ENV} or the secrets file") from None
        except PinMismatch as exc:
            raise SourceError(f"{said}: the certificate is not the pinned one (its SHA-256 is {exc.seen}): "
                              "refused", hint="a new certificate, or another host: check it on the host, then "
                              "update ?fingerprint=") from None
        except ssl.SSLError as exc:
            if credentials.tls_refusal(exc) == "untrusted":
                seen = peer_fingerprint(self.where.host, self.where.port)
                raise SourceError(f"{said}: its certificate is not trusted by this machine's CA store: refused",
                                  hint="install its CA, or pin the certificate: ?fingerprint=SHA256"
                                  + (f" (it presents {seen}: check that on the host first)" if seen else ""),
                                  ) from None
            raise SourceError(f"{said}: TLS failed: {exc}") from None
        except OSError as exc:
            raise SourceError(f"{said}: cannot connect: {exc.strerror or exc}") from None
        except vim.fault.NoPermission:
            raise SourceError(f"{said}: {self.where.user} may not log in (NoPermission)") from None
        return self

    @property
    def content(self) -> Any:
        return self.si.RetrieveContent()

    @property
    def cookie(self) -> str:
        """The session cookie (``vmware_soap_session="..."``) the datastore file service wants."""
        return str(self.si._stub.cookie)

    def close(self) -> None:
        if self.si is not None:
            from pyVim import connect as pyvim_connect

            connect: Any = pyvim_connect
            try:
                connect.Disconnect(self.si)
            except Exception:  # noqa: BLE001 (a session that is gone already is closed)
                pass
            self.si = None

    def find(self, path: str) -> Any:
        """The managed entity at inventory ``path`` (``DC0/vm/web01``), None if there is none."""
        return self.content.searchIndex.FindByInventoryPath(path) if path else self.content.rootFolder

    def retrieve(self, types: Iterable[Any], paths: Mapping[Any, Sequence[str]], root: Any = None,
                 objects: Sequence[Any] = ()) -> list[tuple[Any, dict[str, Any]]]:
        """(object, {property path: value}) for every entity of ``types`` below ``root`` (the whole
        inventory by default), or for ``objects``; ``paths`` per type: the properties to read. One
        ``RetrieveContents`` call; a property that is unset is absent from its dict."""
        from pyVmomi import vim, vmodl

        collector: Any = vmodl.query.PropertyCollector
        prop_set = [collector.PropertySpec(type=kind, pathSet=list(wanted)) for kind, wanted in paths.items()]
        view = None
        if objects:
            object_set = [collector.ObjectSpec(obj=obj, skip=False) for obj in objects]
        else:
            view = self.content.viewManager.CreateContainerView(root or self.content.rootFolder, list(types), True)
            traverse = collector.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)
            object_set = [collector.ObjectSpec(obj=view, skip=True, selectSet=[traverse])]
        try:
            found = self.content.propertyCollector.RetrieveContents(
                [collector.FilterSpec(objectSet=object_set, propSet=prop_set)])
        finally:
            if view is not None:
                view.Destroy()
        return [(item.obj, {prop.name: prop.val for prop in item.propSet or ()}) for item in found or ()]
