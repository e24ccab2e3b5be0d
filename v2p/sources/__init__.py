"""Sources: what the user names, as a VM spec and readable disks. One module per kind, one table of kinds.

A source is named by a string: a URI whose scheme a kind registered (``vsphere://...`` tomorrow), or a
local path. ``open_source`` picks the kind: by the URI's scheme, else from the file itself (its first
bytes, not only its name): an OVA is a tar, an OVF an XML envelope, a ``.vmx`` VMware's
``key = "value"`` text, a folder holds one ``.vmx``; anything else is a disk. A new kind ``register``s
a ``SourceKind`` (its schemes, or how its files start) and touches nothing else.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import SourceError
from ..kindtable import KindTable
from .base import DiskFacts, DiskInput, LocalSource, Source
from .disk import DiskSource

__all__ = ["KINDS", "DiskFacts", "DiskInput", "DiskSource", "LocalSource", "Source", "SourceKind", "is_uri",
           "open_source", "register", "sniff"]


@dataclass(frozen=True)
class SourceKind:
    """One kind of source, as the table knows it."""

    name: str  # "vmx", "ova", ...: what ``sniff`` says
    open: Callable[[str], Source]  # an absolute path, or a URI of one of ``schemes``
    schemes: tuple[str, ...] = ()  # URI schemes it reads: ("vsphere",) for vsphere://...
    sniff: Callable[[bytes], bool] | None = None  # whether a local file's first 8 KiB are of this kind


KINDS: KindTable[SourceKind] = KindTable("source")  # by name; local files are sniffed in this order
register = KINDS.register


def is_uri(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` is a URI a registered kind reads (else it is a local path)."""
    return isinstance(source, str) and KINDS.by_scheme(source) is not None


def sniff(path: Path) -> str:
    """'ova', 'ovf', 'vmx' (a registered kind's name) or 'disk', from the file's own bytes."""
    try:
        with open(path, "rb", buffering=0) as handle:
            head = handle.read(8192)
    except OSError:
        return "disk"  # inspection says what is wrong with it, in its words
    return next((kind.name for kind in KINDS.values() if kind.sniff is not None and kind.sniff(head)), "disk")


def open_source(source: str | os.PathLike[str]) -> Source:
    """The source ``source`` names: a URI a kind registered, a disk, a ``.vmx`` (or a VM folder holding
    one), an ``.ovf`` or ``.ova``."""
    if isinstance(source, str):
        kind = KINDS.by_scheme(source)
        if kind is not None:
            return kind.open(source)
    where = Path(os.path.abspath(source))
    if where.is_dir():
        found = sorted(where.glob("*.vmx"))
        if len(found) != 1:
            raise SourceError(f"{source}: a folder to migrate must hold exactly one .vmx ({len(found)} found)",
                              hint="name the .vmx, or a disk, instead of the folder")
        where = found[0]
    elif not where.is_file():
        return DiskSource(where)  # missing, a FIFO, a device: inspection says what it is
    name = sniff(where)
    return KINDS[name].open(str(where)) if name in KINDS else DiskSource(where)


# -- the built-in kinds: opened lazily (an OVF's XML parser is not loaded to migrate a disk) -------------

_VMX_KEY = re.compile(rb'^\s*(\.encoding|config\.version|virtualhw\.version|displayname|guestos|memsize|numvcpus)'
                      rb'\s*=\s*"', re.IGNORECASE | re.MULTILINE)


def _is_ova(head: bytes) -> bool:
    return len(head) >= 262 and head[257:262] == b"ustar"


def _is_ovf(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    return text.startswith(b"<") and (b"Envelope" in head or b"<?xml" in text[:6])


def _is_vmx(head: bytes) -> bool:
    return b"\0" not in head and _VMX_KEY.search(head) is not None


def _open_ova(path: str) -> Source:
    from .ovf import OvaSource

    return OvaSource(Path(path))


def _open_ovf(path: str) -> Source:
    from .ovf import OvfSource

    return OvfSource(Path(path))


def _open_vmx(path: str) -> Source:
    from .vmx import VmxSource

    return VmxSource(Path(path))


def _open_vsphere(uri: str) -> Source:
    from .vsphere import VsphereSource

    return VsphereSource(uri)


register(SourceKind("ova", _open_ova, sniff=_is_ova))
register(SourceKind("ovf", _open_ovf, sniff=_is_ovf))
register(SourceKind("vmx", _open_vmx, sniff=_is_vmx))
register(SourceKind("vsphere", _open_vsphere, schemes=("vsphere",)))
