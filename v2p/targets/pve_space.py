"""Room on a PVE node for what the upload path puts there, counted where PVE puts it.

An upload lands twice before PVE imports it: pveproxy spools the request's file into
``/var/tmp/pveupload-*`` on the node's root file system (pve-http-server
``src/PVE/APIServer/AnyEvent.pm``, ``get_upload_filename``, written by ``file_upload_multipart``), and the
upload task then ``cp``\\ s it into the storage and only then unlinks the spool file (pve-storage
``src/PVE/API2/Storage/Status.pm``, ``upload``). ``import-from`` then copies the upload into a new volume
of the disk's storage while the upload stays (qemu-server ``create_disks``). The root file system's room
is ``GET /nodes/{node}/status``'s ``rootfs`` (pve-manager ``PVE/API2/Nodes.pm``, ``status``: ``df('/')``,
``avail`` being what an unprivileged writer may use). A directory storage on that file system (a fresh
install's ``local``, ``/var/lib/vz``) shares its room: PVE reports its ``total`` from the same ``df``.

Not here: the room on this machine for the staging file, nor whether a storage can take the content.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import NoSpaceError

if TYPE_CHECKING:
    from .pve_host import PveHost

ROOTFS = "/"  # the node's root file system, where /var/tmp is


def rootfs(target: PveHost) -> dict[str, Any]:
    """``rootfs`` of ``GET /nodes/{node}/status``: total, used, free, avail (bytes)."""
    found = target.call("GET", f"nodes/{target.settings.node}/status") or {}
    room: dict[str, Any] = found.get("rootfs") or {}
    return room


def check_phases(target: PveHost, phases: Mapping[str, Mapping[str, int]]) -> None:
    """Refuse, in one line, a step that needs more than a file system of the node has free. ``phases``:
    for each step (``what`` it is, as the message names it), the bytes it holds at once per place
    (``ROOTFS`` or a storage's name). Places on one file system are added up."""
    root = rootfs(target)
    statuses = {name: target.storage_status(name) for needs in phases.values() for name in needs if name != ROOTFS}

    def place(name: str) -> str:
        if name == ROOTFS:
            return ROOTFS
        status = statuses[name]
        on_root = status.get("type") == "dir" and root.get("total") is not None \
            and int(status.get("total", -1)) == int(root["total"])
        return ROOTFS if on_root else name

    node = target.settings.node
    for what, needs in phases.items():
        merged: dict[str, list[str]] = {}
        totals: dict[str, int] = {}
        for name, needed in needs.items():
            where = place(name)
            merged.setdefault(where, []).append(name)
            totals[where] = totals.get(where, 0) + needed
        for where, needed in totals.items():
            avail = int((root if where == ROOTFS else statuses[where]).get("avail", 0))
            if needed <= avail:
                continue
            if where == ROOTFS:
                shared = [name for name in merged[where] if name != ROOTFS]
                parts = (["/var/tmp"] if ROOTFS in merged[where] else []) + \
                    ([f"storage {', '.join(shared)}"] if shared else [])
                label = f"node {node}'s root file system ({' and '.join(parts)})"
                hint = "free space on the node's root file system (pveproxy spools every upload in /var/tmp)"
            else:
                label = f"PVE storage {where}"
                hint = "free some space or choose another --storage"
            raise NoSpaceError(f"not enough space on {label} for {what}: {needed} bytes needed, {avail} free",
                               hint=hint)
