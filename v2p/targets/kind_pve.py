"""The ``proxmox`` target kind: a Proxmox VE node, named ``pve://[USER@REALM[!TOKENID]@]HOST[:PORT]/NODE?...``,
``pve`` (every setting from the environment or pve.conf) or ``{"kind": "proxmox", "url": ...}``.

Its URL is read by ``pve_settings``; here only what the table needs: building the target (proxmoxer is
imported then, not before), what a plan may not write in a URL, a plan's ``node:`` folded into the URL,
and which URLs share one VMID space (a cluster, whichever node they name).

Not here: the target itself (``proxmox``), its settings (``pve_settings``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ..errors import shown
from ..options import OptionError
from .kinds import TargetKind, TargetOptions, register, unknown_dict

if TYPE_CHECKING:
    from .proxmox import ProxmoxTarget

_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")


def _from_url(url: str, options: TargetOptions) -> ProxmoxTarget:
    from .proxmox import ProxmoxTarget  # proxmoxer and requests: loaded when a PVE target is made, not before
    from .pve_settings import target_from_url

    try:
        settings = target_from_url(url, None if options.env is None else dict(options.env), secret=options.secret)
    except ValueError as exc:  # what urllib refuses: an unclosed [IPv6 address, a port out of range
        raise OptionError(f"--target {shown(url)}: not a URL v2p can read ({exc})",
                          hint="pve://[USER@REALM[!TOKENID]@]HOST[:PORT]/NODE") from None
    return ProxmoxTarget(settings)


def _from_dict(settings: dict[str, Any], options: TargetOptions) -> ProxmoxTarget:
    if "url" not in settings:
        raise unknown_dict("proxmox")
    return _from_url(str(settings["url"]), options)


def _refusal(url: str) -> str | None:
    """A password or a secret query key in the URL (the plan is a file others read)."""
    from ..credentials import SECRET_NAME

    if url == "pve":
        return None
    parts = urlsplit(url)
    if ":" in parts.netloc.rpartition("@")[0]:
        return "the URL carries a password: refused"
    for key, _value in parse_qsl(parts.query, keep_blank_values=True):
        if SECRET_NAME.search(key):
            return f"the URL carries a secret ({key}=...): refused"
    return None


def _with_node(url: str, node: str | None) -> tuple[str, str | None]:
    """``url`` going to ``node`` (None: the one it names, if any), and that node."""
    if node is None:
        return url, (urlsplit(url).path.strip("/") or None) if url != "pve" else None
    if not _NODE.fullmatch(node):
        raise OptionError(f"{node!r} is not a PVE node name")
    parts = urlsplit("pve://" if url == "pve" else url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + node, parts.query, "")), node


def _cluster(url: str) -> str:
    """Every node of one cluster shares its VMIDs: the host, without the user."""
    return "pve:" + urlsplit(url).netloc.rpartition("@")[2] if url.startswith("pve://") else url


USAGE = ("pve://[USER@REALM[!TOKENID]@]HOST[:PORT]/NODE[?storage=...&fingerprint=...] (the secret from "
         "$V2P_PVE_TOKEN or $V2P_PVE_PASSWORD, never the command line)")
KIND = register(TargetKind("proxmox", "pve://HOST/NODE", USAGE, '{"kind": "proxmox", "url": "pve://..."}',
                           _from_url, _from_dict, words=("pve",), schemes=("pve",), keys=("url",), refusal=_refusal,
                           with_node=_with_node, cluster=_cluster))
