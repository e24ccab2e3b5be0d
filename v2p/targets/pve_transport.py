"""How v2p talks to PVE: form values as PVE reads them, the ticket login through the session pinned to
the node's certificate (the pin itself: ``v2p.credentials``), one-line connection errors, the file an upload streams,
and pvesh (proxmoxer's local backend) run through v2p's runner.

Not here: what the calls mean (``proxmox``), where the node is (``pve_settings``).
"""

from __future__ import annotations

import io
import os
import re
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import requests
from proxmoxer.backends.command_base import CommandBaseSession
from proxmoxer.backends.https import ProxmoxHTTPAuthBase

from ..credentials import tls_refusal
from ..errors import TargetError
from ..interrupts import check as check_interrupts
from ..runner import run, which
from .base import ByteProgress
from .pve_settings import PASSWORD_ENV

# The proxmoxer releases backend=local works with (pyproject.toml pins the same range; a test holds
# them equal). v2p gives proxmoxer's CommandBaseSession its own _exec, a method proxmoxer does not
# document, whose return shape changed in a minor release: ``(stdout, stderr)`` up to 2.2.0, ``(stdout,
# stderr, exit_code)`` from 2.3.0 (proxmoxer backends/command_base.py, CommandBaseSession.request;
# backends/local.py, LocalSession._exec). Its public local backend runs pvesh with a bare Popen (no
# log, no cancel, no parent-death signal, a child left running on timeout), so v2p keeps the seam
# and pins it, and a next minor release is checked before it is admitted.
PROXMOXER_RANGE = ">=2.3,<2.4"
_PROXMOXER_SERIES = (2, 3)


def form(values: dict[str, Any]) -> dict[str, str]:
    """Form values as PVE reads them: booleans 0/1, numbers as text; None left out.
    (requests percent-encodes the body, so ``;``, ``&`` and a second ``=`` survive.)"""
    out: dict[str, str] = {}
    for key, value in values.items():
        if value is None:
            continue
        out[key] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return out


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
    refused = tls_refusal(exc)
    if refused == "pin":
        return TargetError(f"PVE at {url}: the server's certificate does not have the pinned fingerprint",
                           hint="compare with 'pvenode cert info' on the node; refused")
    if refused == "untrusted":
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
        _require_proxmoxer_series()
        super().__init__(service="PVE", timeout=timeout)
        which("pvesh")  # a clear error off a PVE node, before any call

    def _exec(self, cmd: list[str]) -> tuple[str, str, int]:
        done = run(cmd, timeout=self.timeout, check=False)
        return done.stdout, done.stderr, done.returncode


def _require_proxmoxer_series() -> None:
    """The installed proxmoxer is of the series whose ``_exec`` shape ``_PveshSession`` gives, else a
    one-line refusal (pip honours the pin; a distro's python3-proxmoxer on the node does not)."""
    try:
        installed = version("proxmoxer")
    except PackageNotFoundError:  # imported without its metadata: nothing to judge it by
        installed = "(unknown release)"
    if tuple(int(part) for part in re.findall(r"\d+", installed)[:2]) != _PROXMOXER_SERIES:
        raise TargetError(f"proxmoxer {installed} is installed; backend=local needs proxmoxer{PROXMOXER_RANGE} "
                          "(it runs pvesh through a part of proxmoxer that changes between releases)",
                          hint=f"pip install 'proxmoxer{PROXMOXER_RANGE}' into v2p's environment, or use "
                               "the HTTPS API with on-node=1")


class UploadFile(io.FileIO):
    """The file of an upload, read by proxmoxer's session as it sends it (``ProxmoxHttpSession.request``
    takes any ``io.IOBase`` value of ``data`` as a file part, and streams it with requests-toolbelt).
    Its ``name`` is the name PVE gets (requests takes the part's ``filename`` from it); each read
    lets a cancelled migration stop, and reports the bytes read so far to ``progress``: every 1 %
    (at least 1 MiB), and every REPORT_EVERY seconds that moved 1 MiB or more (1 % of a big disk over
    a slow link is minutes), and at the end."""

    REPORT_EVERY = 2.0

    def __init__(self, path: Path, name: str, progress: ByteProgress | None = None) -> None:
        super().__init__(path, "rb")
        self.name = name
        self.total = os.fstat(self.fileno()).st_size
        self._progress, self._reported, self._when = progress, 0, time.monotonic()
        self._every = max(1 << 20, self.total // 100)

    def read(self, size: int | None = -1, /) -> bytes:
        check_interrupts()  # a cancelled migration stops its upload within a read
        chunk = super().read(size)
        if self._progress is not None and chunk:
            done = self.tell()
            moved = done - self._reported
            if moved >= self._every or done >= self.total or \
                    (moved >= 1 << 20 and time.monotonic() - self._when >= self.REPORT_EVERY):
                self._reported, self._when = done, time.monotonic()
                self._progress(done, self.total)
        return chunk
