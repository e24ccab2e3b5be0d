"""Files onto a PVE node's storages, apart from disks: the drivers ISO (found on the node, or uploaded
once under the name PVE stores it by), the storage that takes ISOs, and what to tell a user whose
storage lacks a content type (the ``pvesm set`` line that adds it, keeping the others).

Each function is handed the ``ProxmoxTarget`` and knows it through ``PveHost``; the upload itself
(pveproxy's form, the task that copies its spool) is ``ProxmoxTarget.upload``.
Not for: disks (``pve_import``, ``pve_node``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .. import drivers, pveconfig
from ..errors import DriversError, TargetError
from ..volumes import VolumeRef
from .base import ByteProgress
from .pve_host import PveHost
from .pve_kinds import FILE_KINDS
from .pve_space import ROOTFS, check_phases


def drivers_iso(target: PveHost, given: str | None, *, progress: ByteProgress | None = None,
                upload: bool = True) -> tuple[Path | None, str]:
    """A volid (``local:iso/virtio-win.iso``) must be on the node; a local file is checked here
    and uploaded into a storage with ``iso`` content unless a file of its name and size is there
    (its name as PVE stores it: ``upload_name``). ``upload`` False: the room for it checked, nothing sent."""
    node = target.settings.node
    ref = VolumeRef.maybe(given) if given and not given.startswith("/") else None
    if given and ref:
        storage = ref.storage
        present = target.call("GET", f"nodes/{node}/storage/{storage}/content", content="iso") or []
        if not any(entry.get("volid") == given for entry in present):
            raise DriversError(f"drivers ISO {given}: no such ISO on PVE node {node}",
                               hint="upload virtio-win.iso there, or pass the local file: --drivers-iso PATH")
        if target.settings.on_node:  # the ISO's file is on this machine: checked like a local one
            info = target.call("GET", f"nodes/{node}/storage/{storage}/content/{quote(given, safe='')}") or {}
            if info.get("path") and Path(info["path"]).is_file():
                return Path(info["path"]), given
        return None, given
    path = drivers.locate(given)
    storage = iso_storage(target)
    name = upload_name(path.name, "iso")
    volid = f"{storage}:iso/{name}"
    present = target.call("GET", f"nodes/{node}/storage/{storage}/content", content="iso") or []
    same = [entry for entry in present if entry.get("volid") == volid]
    if same and int(same[0].get("size", -1)) != path.stat().st_size:
        raise DriversError(f"drivers ISO {path}: PVE node {node} has another {volid} (a different size)",
                           hint=f"use that one (--drivers-iso {volid}) or rename your file")
    if not same:
        size = path.stat().st_size
        check_phases(target, {f"the upload of {name} (pveproxy's spool, then its copy into {storage})":
                            {ROOTFS: size, storage: size}})
        if upload:
            target.upload(storage, "iso", path, name, progress=progress)
    return path, volid


def iso_storage(target: PveHost) -> str:
    """Where ISOs go: the import storage if it takes ISOs, else ``local``, else the first that does."""
    found: list[dict[str, Any]] = target.call("GET", f"nodes/{target.settings.node}/storage") or []
    takes = [str(entry["storage"]) for entry in found if "iso" in str(entry.get("content", "")).split(",")
             and usable(entry)]
    for name in (target.settings.import_storage, "local", *takes):
        if name in takes:
            return name
    where = next((name for name in (target.settings.import_storage, "local") if any(
        entry.get("storage") == name for entry in found)), target.settings.import_storage)
    raise TargetError(f"no storage on PVE node {target.settings.node} takes ISO images",
                      hint=content_hint(target, where, "iso", found))


def content_hint(target: PveHost, storage: str, content: str,
                 found: list[dict[str, Any]] | None = None) -> str:
    """What to do about ``storage`` lacking the ``content`` type: the ``pvesm set`` line that adds it
    and keeps every type the storage has (``--content`` replaces the list), or, for a storage PVE
    cannot upload into, that it cannot; and which storages of the node already have it."""
    node = target.settings.node
    if found is None:
        found = target.call("GET", f"nodes/{node}/storage") or []
    entry = next((e for e in found if e.get("storage") == storage), None)
    having = [str(e["storage"]) for e in found
              if content in str(e.get("content", "")).split(",") and usable(e)]
    if entry is None:
        advice = f"there is no storage {storage} on node {node}"
    elif entry.get("type") not in FILE_KINDS:
        # pve-storage PVE/API2/Storage/Status.pm, upload: "can't upload to storage type ..." (no path)
        advice = f"{storage} is of type {entry.get('type')}, which PVE cannot upload files into"
    else:
        current = [c for c in str(entry.get("content", "")).split(",") if c]
        advice = f"add it: {pveconfig.content_added(storage, current, content)}"
    if having:
        others = ", ".join(having)
        advice += f"; storages on node {node} with '{content}' content: {others}"
        if content == "import":
            advice += f" (choose one with import={having[0]} in the target URL)"
    else:
        advice += f"; no storage on node {node} has '{content}' content yet"
    return advice


def usable(entry: dict[str, Any]) -> bool:
    """A storage of ``GET /nodes/{node}/storage`` that is enabled and active there."""
    return bool(int(entry.get("enabled", 1) or 0)) and bool(int(entry.get("active", 1) or 0))


def upload_name(name: str, content: str) -> str:
    """The name PVE stores an upload of ``name`` under: pve-storage ``PVE/Storage.pm``,
    ``normalize_content_filename`` (each character but ``[a-zA-Z0-9_.-]`` becomes ``_``); an ISO
    also needs its extension (``PVE/API2/Storage/Status.pm``, ``upload``: ``$ISO_EXT_RE_0``)."""
    name = re.sub(r"[^a-zA-Z0-9_.-]", "_", name)
    if content == "iso" and not re.search(r"\.(?:iso|img)$", name, re.I):
        name += ".iso"
    return name
