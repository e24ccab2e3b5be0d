"""What each kind of PVE storage can hold as a VM disk, read from pve-storage's plugins: the
formats a disk may have there, and the kinds that hold no VM disk at all on a release.

* ``BTRFSPlugin`` (``plugindata``: ``format => [{ raw => 1, subvol => 1 }, 'raw']``): raw disks only
  (``subvol`` is a container's); a qcow2 asked for is refused, never switched to raw behind the user's back;
* ``CephFSPlugin`` (``plugindata``: content ``vztmpl, iso, backup, snippets, import``): no ``images``
  content, so never a VM disk (RBD is Ceph's storage for them);
* ``GlusterfsPlugin``: dropped by libpve-storage-perl 9.0.1 (PVE 9.0, debian/changelog: "drop support for
  accessing Gluster based storage directly"); a node of 9.x cannot use such a storage;
* the directory kinds (``Plugin.pm``: raw, qcow2, vmdk) take qcow2 or raw; every other kind raw volumes.

Not here: the upload's ``import`` content (``pve_import``), on-node writing (``pve_node``).
"""

from __future__ import annotations

from typing import Any

from ..errors import TargetError
from ..options import OptionError

FILE_KINDS = {"dir", "nfs", "cifs", "glusterfs", "cephfs", "btrfs"}  # storages with a path (files)
RAW_ONLY_FILES = {"btrfs"}
NO_DISKS = {"cephfs": "CephFS holds no VM disks in PVE (no 'images' content; use an RBD storage)"}
GLUSTER_GONE = (9, 0)


def disk_format(storage: str, info: dict[str, Any], fmt: str | None, *, release: tuple[int, ...]) -> str:
    """The format of a VM disk on PVE storage ``storage`` (``info``: its entry of ``GET /nodes/{node}/storage``):
    ``fmt`` if the storage can hold it, else its own; one-line refusals for a storage that holds no VM disk."""
    kind = str(info.get("type"))
    if kind in NO_DISKS:
        raise TargetError(f"PVE storage {storage} is {kind}: {NO_DISKS[kind]}",
                          hint="choose another --storage (see: pvesm status --content images)")
    if kind == "glusterfs" and release >= GLUSTER_GONE:
        raise TargetError(f"PVE storage {storage} is glusterfs, which PVE {'.'.join(map(str, release[:2]))} no "
                          "longer supports (libpve-storage-perl 9.0.1 dropped it)",
                          hint="mount the volume on the node and add it as a dir storage, or choose another --storage")
    formats = ["raw"] if kind in RAW_ONLY_FILES or kind not in FILE_KINDS else ["qcow2", "raw"]
    chosen = fmt or formats[0]
    if chosen not in formats:
        hint = "add --format raw (or leave --format out)" if formats == ["raw"] else \
            "leave --format out to get the storage's own format"
        raise OptionError(f"--format {chosen}: PVE storage {storage} ({kind}) holds "
                          f"{'/'.join(formats)} volumes only", hint=hint)
    return chosen
