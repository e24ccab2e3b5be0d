"""Storages: where converted disks go. ``storage.cfg`` in PVE's own syntax
names them; one module per kind (dir, lvm/lvmthin, block).

    dir: local
            path /var/lib/vz
    lvm: vmdata
            vgname vg_iscsi
            shared 1
            lvm-config devices { filter = [ "a|/dev/mapper/.*|", "r|.*|" ] }
    lvmthin: local-lvm
            vgname pve
            thinpool data
"""

from __future__ import annotations

from pathlib import Path

from ..errors import TargetError
from .base import Storage, Volume
from .block import BlockStorage
from .dir import DirStorage
from .lvm import LvmStorage, LvmThinStorage

__all__ = ["Storage", "Volume", "BlockStorage", "DirStorage", "LvmStorage", "LvmThinStorage",
           "parse_storage_cfg", "KINDS"]

KINDS: dict[str, type[Storage]] = {"dir": DirStorage, "lvm": LvmStorage, "lvmthin": LvmThinStorage}
REQUIRED = {"dir": ("path",), "lvm": ("vgname",), "lvmthin": ("vgname", "thinpool")}


def parse_storage_cfg(text: str, where: str) -> dict[str, Storage]:
    """Parse PVE's storage.cfg syntax (``kind: name`` then indented ``key value`` lines)."""
    storages: dict[str, Storage] = {}
    current: tuple[str, str, dict[str, str]] | None = None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            kind, sep, name = line.partition(":")
            if not sep or not name.strip():
                raise TargetError(f"{where}: line {number}: expected 'kind: name', got {line!r}")
            if kind.strip() not in KINDS:
                raise TargetError(f"{where}: line {number}: unknown storage type {kind.strip()!r}",
                                  hint="v2p knows dir, lvm and lvmthin")
            current = (kind.strip(), name.strip(), {})
            entries.append(current)
        elif current is None:
            raise TargetError(f"{where}: line {number}: option outside a storage section")
        else:
            key, _, value = line.strip().partition(" ")
            current[2][key] = value.strip()
    for kind, name, options in entries:
        missing = [key for key in REQUIRED[kind] if key not in options]
        if missing:
            raise TargetError(f"{where}: storage {name} ({kind}) needs {', '.join(missing)}")
        storages[name] = KINDS[kind](name, options)
    return storages


def default_dir_storage(root: Path) -> DirStorage:
    return DirStorage("local", {"path": str(root), "content": "images"})
