"""Secrets and TLS pinning for whatever remote end v2p logs in to (a Proxmox VE node today, a vCenter
tomorrow): a secret from the caller, the environment or a 0600 secrets file (never from a URL or a
settings file, both end up where others read them), checked before it is sent; a secret sent only to
the endpoint it was configured for; a certificate pinned by its SHA-256 fingerprint, skipped only when
``insecure`` is asked for.

Each user of it says its own words (``what``: "PVE secrets file"; the variables it reads); the rules
are here once. Not here: where an endpoint is (``targets.pve_settings``), talking to it
(``targets.pve_transport``).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from requests.adapters import HTTPAdapter

from .fsutil import read_regular
from .options import OptionError

FILE_LIMIT = 1 << 20  # a settings or secrets file: a few lines each
FINGERPRINT = re.compile(r"[0-9a-fA-F]{2}(?::?[0-9a-fA-F]{2}){31}")  # SHA-256, with or without colons
# A key that holds a secret wherever it appears (a plan's, a URL's query): refused, never echoed.
SECRET_NAME = re.compile(r"(^|[_-])(pass(word|wd)?|secret|token|api[_-]?key|credentials?)($|[_-])", re.IGNORECASE)


def yes_no(value: str, where: str) -> bool:
    """A setting's yes/no value (``1``/``0``, ``yes``/``no``, ``true``/``false``, ``on``/``off``, empty: no)."""
    if value.lower() in ("1", "yes", "true", "on"):
        return True
    if value.lower() in ("0", "no", "false", "off", ""):
        return False
    raise OptionError(f"{where}: {value!r} is not a yes/no value", hint="use 1 or 0")


def clean_secret(value: str, where: str, *, token: bool, service: str = "PVE") -> str:
    """``value`` without the one line end a file leaves (``\\n``, ``\\r\\n``); refused, never echoed, when
    anything else in it is a control character (or, for a token, which travels in an HTTP header, not
    printable ASCII). ``service``: whose secret it is, for the hint."""
    if not isinstance(value, str):
        raise OptionError(f"{where}: the secret is not a string")
    value = value[:-2] if value.endswith("\r\n") else value[:-1] if value.endswith("\n") else value
    if token:
        bad = any(not 0x21 <= ord(char) <= 0x7e for char in value)
        allowed = "printable ASCII without spaces"
    else:
        bad = any(unicodedata.category(char) in ("Cc", "Zl", "Zp") for char in value)
        allowed = "no control characters"
    if bad:
        raise OptionError(f"{where}: the secret holds a control or other character a secret cannot have "
                          f"(a line break inside it?): refused", hint=f"a {service} secret is {allowed}; "
                          "copy it again from the node")
    if value:
        _SEEN.add(value)
    return value


_SEEN: set[str] = set()  # every secret read in this process: a log file masks them (``logfile``)


def secrets_seen() -> frozenset[str]:
    """The secrets ``clean_secret`` has passed in this process, for whatever must never show them."""
    return frozenset(_SEEN)


def read_operators_file(path: Path, what: str) -> str:
    """The operator's own file (it may be a link, e.g. to a mounted secret): a regular file read
    without blocking (a FIFO there would hang every command) and bounded, as UTF-8 text."""
    try:
        return read_regular(path, FILE_LIMIT, what=what, error=OptionError).decode()
    except UnicodeDecodeError:
        raise OptionError(f"{path}: the {what} is not UTF-8 text") from None


def read_secrets_file(path: Path, *, what: str, service: str = "PVE") -> dict[str, str]:
    """``key = value`` lines (``token``, ``password``); refused if others may read it. ``what`` names
    the file in messages ("PVE secrets file")."""
    try:
        info = path.stat()
    except OSError as exc:
        raise OptionError(f"{path}: cannot read the {what}: {exc.strerror}") from None
    text = read_operators_file(path, what)
    if info.st_mode & 0o077:
        raise OptionError(f"{path}: the {what} is readable by others", hint=f"chmod 600 {path}")
    found: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or key.strip() not in ("token", "password"):
            raise OptionError(f"{path}:{number}: expected 'token = SECRET' or 'password = SECRET'")
        found[key.strip()] = clean_secret(value.strip(), f"{path}:{number}", token=key.strip() == "token",
                                          service=service)
    return found


def config_home(env: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME``, else ``~/.config``, as ``env`` says."""
    return Path(env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".config"))


def find_secret(env: Mapping[str, str], variable: str, key: str, secrets_file: Path, *, named: bool, what: str,
                service: str = "PVE") -> str | None:
    """The secret ``$variable`` holds, else the ``key`` line of ``secrets_file`` (read when it exists, or
    when ``named``: the environment named it, so its absence is an error); None when neither has one."""
    if env.get(variable) and env[variable] not in ("\n", "\r\n"):
        return clean_secret(env[variable], f"${variable}", token=key == "token", service=service)
    if secrets_file.exists() or named:
        return read_secrets_file(secrets_file, what=what, service=service).get(key) or None
    return None


def fingerprint(value: str, where: str, *, hint: str) -> str:
    """A SHA-256 certificate fingerprint as urllib3 compares it (64 hex digits, lower case, no colons)."""
    if not FINGERPRINT.fullmatch(value):
        raise OptionError(f"{where}: fingerprint {value!r} is not a SHA-256 (64 hex digits)", hint=hint)
    return value.replace(":", "").lower()


@dataclass(frozen=True)
class Endpoint:
    """Where a secret goes and how the peer is checked: a secret configured for one endpoint is sent
    to that one only."""

    host: str
    port: str
    insecure: bool
    fingerprint: str

    @classmethod
    def of(cls, values: Mapping[str, str], default_port: int) -> Endpoint:
        """The endpoint ``host``/``port``/``insecure``/``fingerprint`` settings (as written) describe."""
        port = values.get("port") or str(default_port)
        return cls(values.get("host", "").lower(), str(int(port)) if port.isdigit() else port,
                   values.get("insecure", "").lower() in ("1", "yes", "true", "on"),
                   values.get("fingerprint", "").replace(":", "").lower())


class FingerprintAdapter(HTTPAdapter):
    """Accept exactly the peer certificate whose SHA-256 is ``fingerprint`` (urllib3 checks the
    digest of the certificate the server presented, on every new connection)."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["assert_fingerprint"] = self.fingerprint
        super().init_poolmanager(*args, **kwargs)


def pinned(session: Any, prefix: str, fingerprint: str | None, *, insecure: bool) -> Any:
    """``session`` (a ``requests.Session``) accepting only the certificate ``fingerprint`` for URLs
    starting with ``prefix``; unchanged without a fingerprint, or when ``insecure`` was asked for."""
    if fingerprint and not insecure:
        session.mount(prefix, FingerprintAdapter(fingerprint))
    return session


def verifies(*, fingerprint: str | None, insecure: bool) -> bool:
    """Whether requests checks the peer against the CA store (no pin, and not ``insecure``)."""
    return not (insecure or fingerprint)


def tls_refusal(exc: Exception) -> str | None:
    """Why a connection's TLS check refused the peer: ``pin`` (not the pinned certificate), ``untrusted``
    (no CA vouches for it), None (something else went wrong)."""
    text = str(exc)
    if "Fingerprints did not match" in text:
        return "pin"
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return "untrusted"
    return None
