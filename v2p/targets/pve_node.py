"""Disks of a Proxmox VE target written on the node itself (``pve://...?on-node=1``).

v2p runs on the node, so what PVE reports as a storage's path is a path on this
machine, and a disk is converted straight into the storage, with no upload and no
``import-from``; the VM config then names the volume by its id
(``ide0=local-lvm:vm-102-disk-0``):

* a storage with PVE's directory layout (``dir``, ``nfs``, ``cifs``): ``qemu-img
  convert`` into a temporary file in ``images/<vmid>/`` that PVE's listing ignores
  (v2p's own ``DirStorage`` under the path PVE reports), renamed once verified;
* any other storage (``lvm``, ``lvmthin``, ``zfspool``, ``rbd`` with krbd; without it refused): a
  raw volume allocated through the API (``POST .../storage/{storage}/content``) and
  written in place at the path PVE reports for it (``GET .../content/{volume}``).

Not for: bringing bytes to a node from elsewhere (``RemoteImportSink`` uploads them).
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..endpoint import DiskEndpoint
from ..errors import NoSuchVMError, TargetError
from ..storage import DirStorage, Storage, Volume
from ..volumes import VolumeRef, drive_volume
from ..windows import Checkpoint, CopyProgress
from .base import ByteProgress, DiskSink
from .sink import StorageSink

if TYPE_CHECKING:
    from .pve_host import PveHost

# Storages whose disks are files in <path>/images/<vmid>/ (PVE's DirPlugin and its NFS/CIFS children).
DIR_LAYOUT = {"dir", "nfs", "cifs"}
# Storages whose disks are files, but not plainly there (btrfs keeps raw disks in subvolumes,
# glusterfs and cephfs are not mounted for images): only PVE itself writes them.
OTHER_FILES = {"btrfs", "glusterfs", "cephfs"}
# Where a volume takes room as data is written, not all of it when allocated.
THIN = {"lvmthin", "rbd"}
# Where a freshly allocated volume reads as zeros, so zero areas need not be written.
ZEROED = {"lvmthin", "zfspool", "rbd"}
# PVE allocates these itself (at create), with the lowest free vm-<vmid>-disk-<n> name.
_OWN_VOLUMES = ("efidisk0", "tpmstate0")
_DEVICE_WAIT = 10.0  # udev makes a new zvol's or LV's node a moment after the allocation returns


def _no_upload_hint() -> str:
    return "drop on-node=1 from the target URL to upload the disk instead"


def _not_here(target: PveHost, storage: str, path: str) -> TargetError:
    return TargetError(f"PVE storage {storage}'s path {path} is not on this machine: on-node=1 needs v2p to run "
                       f"on node {target.settings.node}", hint=_no_upload_hint())


class NodeDirStorage(DirStorage):
    """A PVE storage with the directory layout, at the path its configuration gives."""

    def __init__(self, target: PveHost, name: str, kind: str) -> None:
        config: dict[str, Any] = target.call("GET", f"storage/{name}") or {}
        overrides = str(config.get("content-dirs", ""))
        if re.search(r"(?:^|,)\s*images=", overrides):
            raise TargetError(f"PVE storage {name} keeps its disks in another folder (content-dirs {overrides}): "
                              "on-node=1 writes the standard images/ folder only", hint=_no_upload_hint())
        super().__init__(name, {"path": str(config.get("path", ""))})
        self.target, self.pve_kind = target, kind

    def _here(self) -> None:
        if not self.options["path"] or not self.root.is_dir():
            raise _not_here(self.target, self.name, self.options["path"] or "(none)")
        # An NFS/CIFS storage PVE has not mounted is an empty folder: files written there would
        # land on the node's own disk, where PVE never looks.
        if str(self.target.storage_status(self.name).get("active", 1)) != "1":
            raise TargetError(f"PVE storage {self.name} is not active on node {self.target.settings.node}",
                              hint=f"see: pvesm status --storage {self.name}")

    def check(self, capacity: int, *, force: bool) -> None:
        self._here()

    def allocate(self, vmid: int, index: int, fmt: str, capacity: int, *, force: bool = False) -> Volume:
        self._here()
        return super().allocate(vmid, index, fmt, capacity, force=force)

    def describe(self) -> str:
        return f"PVE {self.target.settings.node}:{self.name} ({self.pve_kind}, {self.root})"


class NodeVolumeStorage(Storage):
    """A PVE storage whose volumes PVE allocates (LVs, zvols, RBD images): raw volumes made and
    deleted through the API, written in place. A volume's path is known once it exists
    (``path_of`` asks PVE); ``volume()`` gives the volid only."""

    def __init__(self, target: PveHost, name: str, kind: str) -> None:
        super().__init__(name, {})
        self.target, self.pve_kind = target, kind

    @property
    def _content(self) -> str:
        return f"nodes/{self.target.settings.node}/storage/{self.name}/content"

    def formats(self) -> tuple[str, ...]:
        return ("raw",)

    def volume(self, vmid: int, index: int, fmt: str, *, partial: bool = False) -> Volume:
        # No temporary name (PVE cannot rename a volume): partial and final are one volume.
        volid = str(VolumeRef.disk(self.name, vmid, index))
        return Volume(volid, Path(volid), "raw", is_block=True)

    def path_of(self, volid: str) -> Path:
        info = self.target.call("GET", f"{self._content}/{quote(volid, safe='')}") or {}
        reported = str(info.get("path", ""))
        path = Path(reported)
        deadline = time.monotonic() + _DEVICE_WAIT
        while path.is_absolute() and reported.startswith("/dev/") and not path.exists() \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        if not path.is_absolute() or not path.exists():
            raise _not_here(self.target, self.name, reported or "(none)")
        return path

    def free_bytes(self) -> int:
        return int(self.target.storage_status(self.name).get("avail", 0))

    def required_bytes(self, capacity: int, measured: int) -> int:
        return measured if self.pve_kind in THIN else capacity

    def allocate(self, vmid: int, index: int, fmt: str, capacity: int, *, force: bool = False) -> Volume:
        volume = self.volume(vmid, index, fmt)
        if self.exists(volume):  # an earlier, unfinished write of this disk
            self.remove(volume)
        name = VolumeRef.parse(volume.volid).volname
        made = self.target.call("POST", self._content, vmid=vmid, filename=name,
                                size=str(-(-capacity // 1024)), format="raw")
        if made != volume.volid:
            raise TargetError(f"PVE storage {self.name} allocated {made!r} when asked for {volume.volid}")
        try:
            return Volume(volume.volid, self.path_of(volume.volid), "raw", is_block=True)
        except BaseException:
            self.remove(volume)
            raise

    def reads_as_zero(self, volume: Volume) -> bool:
        return self.pve_kind in ZEROED

    def commit(self, partial: Volume, final: Volume) -> None:
        """Written in place: nothing to rename."""

    def exists(self, volume: Volume) -> bool:
        vmid = VolumeRef.parse(volume.volid).vmid
        found = self.target.call("GET", self._content, **({"vmid": str(vmid)} if vmid is not None else {})) or []
        return any(entry.get("volid") == volume.volid for entry in found)

    def remove(self, volume: Volume) -> None:
        self.target.delete_volume(volume.volid)

    def describe(self) -> str:
        return f"PVE {self.target.settings.node}:{self.name} ({self.pve_kind})"


class OnNodeSink(DiskSink):
    """Disk ``index`` of VM ``vmid`` converted straight into PVE storage ``storage`` (of type ``kind``).

    Its volume is ``vm-<vmid>-disk-<n>``: ``n`` is the ``index``-th number the VM's own
    volumes (``efidisk0``, ``tpmstate0``, which PVE allocated at create with the lowest
    free number) leave free on this storage. The name is settled once the VM exists, so
    every sink made for the disk after the create names the same volume.
    """

    def __init__(self, target: PveHost, vmid: int, index: int, *, fmt: str, storage: str,
                 kind: str) -> None:
        if kind in OTHER_FILES:
            raise TargetError(f"PVE storage {storage} is {kind}: on-node=1 writes dir, nfs and cifs storages "
                              "and block storages (lvm, lvmthin, zfspool, ...)", hint=_no_upload_hint())
        if kind == "rbd" and not _krbd(target, storage):
            # pve-storage RBDPlugin.pm, path: without krbd a volume's path is an "rbd:pool/image:..." URI
            # for QEMU's librbd, not a device of this machine; with krbd it is /dev/rbd-pve/... (mapped).
            raise TargetError(f"PVE storage {storage} is rbd without krbd: its volumes are no devices on this "
                              "machine, and on-node=1 writes RBD volumes only where PVE maps them (krbd 1)",
                              hint=_no_upload_hint())
        self.target, self.vmid, self.index, self.fmt = target, vmid, index, fmt
        self.storage: Storage = NodeDirStorage(target, storage, kind) if kind in DIR_LAYOUT \
            else NodeVolumeStorage(target, storage, kind)
        self.in_place = kind not in DIR_LAYOUT
        self._settled: StorageSink | None = None

    def _config(self) -> dict[str, str] | None:
        try:
            return self.target.get_config(self.vmid)
        except NoSuchVMError:
            return None

    def _sink(self) -> StorageSink:
        if self._settled is not None:
            return self._settled
        config = self._config()
        taken = set()
        for key in _OWN_VOLUMES:
            ref = VolumeRef.maybe(drive_volume((config or {}).get(key, "")))
            number = ref.disk_of(self.vmid) if ref and ref.storage == self.storage.name else None
            if number is not None:
                taken.add(number)
        number = next(itertools.islice((n for n in itertools.count() if n not in taken), self.index, None))
        sink = StorageSink(self.storage, self.vmid, number, self.fmt)
        if config is not None:
            self._settled = sink
        return sink

    @property
    def volid(self) -> str:  # type: ignore[override]  # read-only: settled late (see the class docstring)
        return self._sink().volid

    def _refuse_theirs(self) -> None:
        """Never overwrite a volume the VM's config already names (v2p attaches its own only
        after they are written and verified, so such a volume is someone else's)."""
        volid = self.volid
        for key, value in (self._config() or {}).items():
            if drive_volume(value) == volid:
                raise TargetError(f"PVE storage {self.storage.name}: {volid} is already {key} of VM {self.vmid}: "
                                  f"disk {self.index} will not overwrite it",
                                  hint=f"detach it from VM {self.vmid}, or choose another --storage")

    # -- DiskSink --------------------------------------------------------------
    def check(self, src: DiskEndpoint, *, capacity: int) -> dict[str, Any]:
        # No name is needed to measure the room (the VM may not exist yet).
        return StorageSink(self.storage, self.vmid, self.index, self.fmt).check(src, capacity=capacity)

    def exists(self) -> bool:
        return self._sink().exists()

    def written(self) -> bool:
        return self._sink().written()

    def write(self, src: DiskEndpoint, *, capacity: int, progress: CopyProgress | None = None,
              bwlimit: int | None = None, start: Checkpoint | None = None,
              on_checkpoint: Callable[[Checkpoint], None] | None = None) -> None:
        self._refuse_theirs()
        self._sink().write(src, capacity=capacity, progress=progress, bwlimit=bwlimit, start=start,
                           on_checkpoint=on_checkpoint)

    def write_dd(self, src: DiskEndpoint, *, progress: CopyProgress | None = None, start: Checkpoint | None = None,
                 on_checkpoint: Callable[[Checkpoint], None] | None = None) -> None:
        self._refuse_theirs()
        self._sink().write_dd(src, progress=progress, start=start, on_checkpoint=on_checkpoint)

    def verify(self, src: DiskEndpoint, *, capacity: int, progress: ByteProgress | None = None) -> None:
        self._sink().verify(src, capacity=capacity, progress=progress)

    def commit(self, *, progress: ByteProgress | None = None) -> str:
        sink = self._sink()
        if self.in_place and not sink.exists():  # unlike a user's device, PVE's volume comes with the write
            raise TargetError(f"{self.storage.describe()}: nothing written for {sink.volid} to commit",
                              hint="run the same command again: the disk is written anew")
        return sink.commit()

    def remove(self) -> None:
        self._sink().remove()

    def fingerprint(self) -> dict[str, Any]:
        return self._sink().fingerprint()

    def __repr__(self) -> str:
        return f"OnNodeSink({self.storage.describe()}, disk {self.index} of VM {self.vmid}, {self.fmt})"


def _krbd(target: PveHost, storage: str) -> bool:
    """Whether RBD storage ``storage`` maps its volumes through the kernel (``krbd`` in its configuration)."""
    config: dict[str, Any] = target.call("GET", f"storage/{storage}") or {}
    return str(config.get("krbd", "0")) in ("1", "true")


def remove_temporaries(target: PveHost, vmid: int) -> None:
    """Delete the temporary files v2p left for VM ``vmid`` in the node's dir storages (a run
    killed mid-write): PVE does not list them, so its destroy leaves them."""
    node = target.settings.node
    for entry in target.call("GET", f"nodes/{node}/storage", content="images") or []:
        if entry.get("type") not in DIR_LAYOUT:
            continue
        try:
            storage = NodeDirStorage(target, str(entry["storage"]), str(entry["type"]))
        except TargetError:
            continue  # a storage whose folder v2p cannot know never held a file of v2p's
        folder = storage.volume(vmid, 0, "raw").path.parent
        for path in folder.glob(f".vm-{vmid}-disk-*.v2p-partial"):  # DirStorage.volume(..., partial=True)
            path.unlink(missing_ok=True)
