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

import os
import re
from pathlib import Path

from ..errors import TargetError, shown
from .base import Storage, Volume
from .block import BlockStorage
from .dir import DirStorage
from .lvm import LvmStorage, LvmThinStorage

__all__ = ["Storage", "Volume", "BlockStorage", "DirStorage", "LvmStorage", "LvmThinStorage",
           "check_storage", "parse_storage_cfg", "KINDS"]

KINDS: dict[str, type[Storage]] = {"dir": DirStorage, "lvm": LvmStorage, "lvmthin": LvmThinStorage}
REQUIRED = {"dir": ("path",), "lvm": ("vgname",), "lvmthin": ("vgname", "thinpool")}
# PVE's storage id (pve-common, PVE/JSONSchema.pm, parse_storage_id: m/^[a-z][a-z0-9\-\_\.]*[a-z0-9]$/i),
# without Perl's '$' that also matches before a final newline.
STORAGE_ID = re.compile(r"[a-z][a-z0-9_.-]*[a-z0-9]", re.IGNORECASE | re.ASCII)
OPTION_KEY = re.compile(r"[a-z][a-z0-9-]*", re.ASCII)
# LVM's own rule for VG and LV names (lvm(8), VALID NAMES): these characters, not starting with '-'.
LVM_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]*", re.ASCII)


def check_storage(name: str, kind: str, options: dict[str, str], where: str = "") -> None:
    """Refuse a storage entry that storage.cfg cannot hold as meant: a name PVE would refuse, a value
    with a control character (a newline would start a line of its own: ``path /x\\n\\tpath /etc``),
    a ``path`` that is not absolute, a volume group or thin pool LVM would not name so. Errors name the
    ``v2p storage add`` option (``--path``) unless ``where`` (``FILE: line N``) says where it was read."""
    at = f"{where}: " if where else ""
    if not STORAGE_ID.fullmatch(name):
        raise TargetError(f"{at}storage name {shown(name)} is not a PVE storage id",
                          hint="letters, digits, '-', '_' and '.', starting with a letter and ending with a letter "
                          "or digit (at least 2 characters)")
    if kind not in KINDS:
        raise TargetError(f"{at}unknown storage type {shown(kind)}", hint="v2p knows dir, lvm and lvmthin")
    for key, value in options.items():
        said = f"{at}{key}" if where else f"--{key}"
        if not OPTION_KEY.fullmatch(key):
            raise TargetError(f"{at}storage option {shown(key)} is not an option name")
        if not value or value != value.strip() or not value.isprintable():
            raise TargetError(f"{said} {shown(value, limit=80)}: empty, or with a control character or blanks "
                              "around it: refused", hint="one line of text, as storage.cfg holds it")
        if key == "path" and not os.path.isabs(value):
            raise TargetError(f"{said} {shown(value, limit=80)}: not an absolute path",
                              hint=f"give the folder from /: {os.path.abspath(value)}" if not where else None)
        if key in ("vgname", "thinpool") and not LVM_NAME.fullmatch(value):
            raise TargetError(f"{said} {shown(value, limit=80)}: not an LVM name",
                              hint="letters, digits, '+', '_', '.', '-' (not first)")


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
            if key in current[2]:  # a second one would quietly win: say which line is wrong
                raise TargetError(f"{where}: line {number}: storage {current[1]} sets {key} twice")
            current[2][key] = value.strip()
            if value.strip():  # a bare key is a flag (``disable``)
                check_storage(current[1], current[0], {key: current[2][key]}, f"{where}: line {number}")
    for kind, name, options in entries:
        check_storage(name, kind, {}, where)
        missing = [key for key in REQUIRED[kind] if key not in options]
        if missing:
            raise TargetError(f"{where}: storage {name} ({kind}) needs {', '.join(missing)}")
        storages[name] = KINDS[kind](name, options)
    return storages


def default_dir_storage(root: Path) -> DirStorage:
    return DirStorage("local", {"path": str(root), "content": "images"})
