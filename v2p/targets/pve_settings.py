"""Where a Proxmox VE target is and who v2p is there: ``PveSettings`` from a ``pve://`` URL, the
``V2P_PVE_*`` environment and the settings file, in that order; the secret from the caller, the environment
or the 0600 secrets file, never from a URL or the settings file (both end up where others read them).

A secret goes only to the host it was configured for: the environment's (and the secrets file's) is the
host the environment configures, unless the caller vouches for the URL by passing the environment itself
(the CLI does: its ``--target`` is the operator's own). A URL from anyone else gets no secret but one the
caller passes.

The rules for secrets and pinning (what a secret may hold, the 0600 file, whose secret goes where) are
``v2p.credentials``'; here the PVE names for them.

Not here: talking to PVE (``pve_transport``), the target itself (``proxmox``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from .. import credentials
from ..credentials import Endpoint, read_operators_file, yes_no
from ..options import OptionError

DEFAULT_PORT = 8006
TOKEN_ENV = "V2P_PVE_TOKEN"
PASSWORD_ENV = "V2P_PVE_PASSWORD"
SECRETS_ENV = "V2P_PVE_SECRETS"
SECRETS_FILE = "PVE secrets file"


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


def clean_secret(value: str, where: str, *, token: bool) -> str:
    """A PVE secret as ``credentials.clean_secret`` accepts it."""
    return credentials.clean_secret(value, where, token=token)


def read_secrets_file(path: Path) -> dict[str, str]:
    """``key = value`` lines (``token``, ``password``); refused if others may read it."""
    return credentials.read_secrets_file(path, what=SECRETS_FILE)


def _default_secrets_file(env: dict[str, str]) -> Path:
    return credentials.config_home(env) / "v2p" / "pve-secrets"


# Every setting but the secret, by the name the URL query, the config file and (upper-cased, - as _,
# V2P_PVE_ before it) the environment use: V2P_PVE_HOST, V2P_PVE_NODE, V2P_PVE_ON_NODE, ...
SETTINGS = ("host", "port", "node", "user", "storage", "import", "fingerprint", "insecure", "timeout", "on-node",
            "backend")
CONFIG_ENV = "V2P_PVE_CONFIG"


def _env_name(key: str) -> str:
    return "V2P_PVE_" + key.upper().replace("-", "_")


def read_config_file(path: Path) -> dict[str, str]:
    """``key = value`` lines of the settings above; secrets are refused (they go in pve-secrets)."""
    text = read_operators_file(path, "PVE settings file")
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


def _no_secret_in_user(user: str, where: str) -> None:
    """A password (``user:pw``) or token secret (``user!id=SECRET``, PVE's own spelling) in the user
    part ends up in argv and records: refused without echoing it."""
    if ":" in user or "=" in user:
        what = "a token secret" if "=" in user else "a password"
        raise OptionError(f"{where} carries {what}: refused (it would show in the process list "
                          "and the state file)", hint=f"put it in ${TOKEN_ENV} or ${PASSWORD_ENV} instead")


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
    _no_secret_in_user(userinfo, where)
    _no_secret_in_user(unquote(userinfo), where)
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


def target_from_url(url: str, env: dict[str, str] | None = None, *, secret: str | None = None) -> PveSettings:
    """Settings from ``pve://[user@realm[!tokenid]@]host[:port][/node]?storage=NAME``, over the
    environment (``V2P_PVE_HOST``, ``V2P_PVE_NODE``, ...), over the settings file
    (``$V2P_PVE_CONFIG``, else ``$XDG_CONFIG_HOME/v2p/pve.conf``); ``url`` may be just ``pve``.

    Query keys: ``storage`` (disks), ``import`` (the storage uploads go to), ``fingerprint``,
    ``insecure``, ``timeout``, ``on-node``. The secret comes from ``env`` (``V2P_PVE_TOKEN`` with a
    token id, else ``V2P_PVE_PASSWORD``) or the secrets file (``$V2P_PVE_SECRETS``, else
    ``$XDG_CONFIG_HOME/v2p/pve-secrets``). No node anywhere: the target asks PVE (one node only).

    Whose secret goes where: ``secret``, when given, is this URL's. Else passing ``env`` says that
    environment's secret belongs to whatever host the URL names (the CLI passes its own: the URL is the
    operator's). With ``env`` left out (the process environment), its secret goes only to the host it
    configures: a URL naming another host, port, fingerprint or ``insecure`` is refused, not sent it.
    """
    vouched = env is not None
    env = dict(os.environ) if env is None else env
    config = Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else credentials.config_home(env) / "v2p" / "pve.conf"
    values = read_config_file(config) if env.get(CONFIG_ENV) or config.exists() else {}
    values.update({key: env[_env_name(key)] for key in SETTINGS if env.get(_env_name(key))})
    configured = dict(values)
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
    _no_secret_in_user(user, where)
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
        settings.fingerprint = credentials.fingerprint(values["fingerprint"], where,
                                                       hint="see: pvenode cert info on the node")
    settings.insecure = yes_no(values.get("insecure", ""), f"{where}: insecure")
    settings.on_node = yes_no(values.get("on-node", ""), f"{where}: on-node")
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
        if secret is not None:
            settings.secret = clean_secret(secret, "the secret given for the PVE target", token=bool(settings.token_id))
            if not settings.secret:
                raise OptionError("the secret given for the PVE target is empty")
        else:
            if not vouched:
                _configured_here(settings, configured)
            settings.secret = _secret(settings, env)
    return settings


def _configured_here(settings: PveSettings, configured: dict[str, str]) -> None:
    """Refuse unless ``settings`` talk to the host the environment (or pve.conf) configures, checked the
    way it says: the environment's secret is that host's, not a URL's from somewhere else."""
    wanted = Endpoint.of(configured, DEFAULT_PORT)
    if Endpoint(settings.host.lower(), str(settings.port), settings.insecure, settings.fingerprint or "") == wanted \
            and wanted.host:
        return
    there = f"{wanted.host}:{wanted.port}" if wanted.host else "no host"
    raise OptionError(f"the PVE target {settings.host}:{settings.port} is not the host this environment configures "
                      f"({there}, with its certificate check): its secret is not sent there",
                      hint="pass that host's secret yourself (make_target(url, secret=...)), or configure the host: "
                      f"${_env_name('host')} or 'host =' in pve.conf")


def _secret(settings: PveSettings, env: dict[str, str]) -> str:
    name, key = (TOKEN_ENV, "token") if settings.token_id else (PASSWORD_ENV, "password")
    path = Path(env[SECRETS_ENV]) if env.get(SECRETS_ENV) else _default_secrets_file(env)
    value = credentials.find_secret(env, name, key, path, named=bool(env.get(SECRETS_ENV)), what=SECRETS_FILE)
    if value:
        return value
    what = f"the secret of API token {settings.user}!{settings.token_id}" if settings.token_id \
        else f"the password of {settings.user}"
    raise OptionError(f"no {key} for the PVE target: {what} is needed",
                      hint=f"set ${name}, or put '{key} = ...' in {path} (mode 600)")
