"""Sources: what the user names, as a VM spec and readable disks. One module per kind.

``open_source(path)`` picks the kind from the file itself (its first bytes,
not only its name): an OVA is a tar, an OVF an XML envelope, a ``.vmx`` VMware's
``key = "value"`` text, a folder holds one ``.vmx``; anything else is a disk.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import SourceError
from .base import DiskInput, Source
from .disk import DiskSource

__all__ = ["DiskInput", "DiskSource", "Source", "open_source", "sniff"]

_VMX_KEY = re.compile(rb'^\s*(\.encoding|config\.version|virtualhw\.version|displayname|guestos|memsize|numvcpus)'
                      rb'\s*=\s*"', re.IGNORECASE | re.MULTILINE)


def sniff(path: Path) -> str:
    """'ova', 'ovf', 'vmx' or 'disk', from the file's own bytes."""
    try:
        with open(path, "rb", buffering=0) as handle:
            head = handle.read(8192)
    except OSError:
        return "disk"  # inspection says what is wrong with it, in its words
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "ova"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if text.startswith(b"<") and (b"Envelope" in head or b"<?xml" in text[:6]):
        return "ovf"
    if b"\0" not in head and _VMX_KEY.search(head):
        return "vmx"
    return "disk"


def open_source(path: str | os.PathLike[str]) -> Source:
    """The source for ``path``: a disk, a ``.vmx`` (or a VM folder holding one), an ``.ovf`` or ``.ova``."""
    where = Path(os.path.abspath(path))
    if where.is_dir():
        found = sorted(where.glob("*.vmx"))
        if len(found) != 1:
            raise SourceError(f"{path}: a folder to migrate must hold exactly one .vmx ({len(found)} found)",
                              hint="name the .vmx, or a disk, instead of the folder")
        where = found[0]
    elif not where.is_file():
        return DiskSource(where)  # missing, a FIFO, a device: inspection says what it is
    kind = sniff(where)
    if kind == "vmx":
        from .vmx import VmxSource

        return VmxSource(where)
    if kind in ("ovf", "ova"):
        from .ovf import OvaSource, OvfSource

        return OvaSource(where) if kind == "ova" else OvfSource(where)
    return DiskSource(where)
