"""The remote path's disk sink: a disk converted locally to qcow2, verified there, uploaded (with its
SHA-256, which PVE checks) into a storage's ``import`` content, and attached with ``import-from``, which
makes PVE copy it into a fresh volume of the disk's storage. The path that works for API tokens.

Not here: the on-node path (``pve_node``), the API calls themselves (``proxmox``).
"""

from __future__ import annotations

import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import convert
from ..endpoint import DiskEndpoint
from ..errors import NoSpaceError, TargetError
from ..storage import Volume
from ..volumes import Drive, VolumeRef, drive_volume, import_name, new_volume, print_drive
from ..windows import Checkpoint, CopyProgress, SinkCheckpoints, StaleCheckpoint, check_resumable
from .base import ByteProgress, DiskSink, compared
from .pve_releases import REMOTE_INSTEAD, REMOTE_PATH
from .pve_space import ROOTFS, check_phases

if TYPE_CHECKING:
    from .pve_host import PveHost

class RemoteImportSink(DiskSink):
    """Disk ``index`` of VM ``vmid``: converted locally to qcow2, uploaded into the import
    storage, attached with ``import-from`` (PVE copies it into ``storage`` as ``fmt``).

    ``volid`` is the value PVE needs to create the disk once (``STORAGE:0,import-from=...``):
    after the attach PVE's config names the volume it allocated. The staging file stays until
    ``remove`` so a committed disk can still be verified (PVE has no download of import volumes).
    """

    in_place = False

    def __init__(self, target: PveHost, vmid: int, index: int, *, fmt: str, storage: str) -> None:
        self.target, self.vmid, self.index, self.fmt, self.storage = target, vmid, index, fmt, storage
        self.import_storage = target.settings.import_storage
        self.filename = import_name(vmid, index)
        self.import_volid = str(VolumeRef.imported(self.import_storage, self.filename))
        self.volid = print_drive(Drive(new_volume(storage, 0), {"import-from": self.import_volid, "format": fmt}))

    @property
    def staging(self) -> Volume:
        return Volume(self.import_volid, self.target.staging_dir() / self.filename, "qcow2")

    def _content(self) -> list[dict[str, Any]]:
        return self.target.import_content(self.import_storage)

    def check(self, src: DiskEndpoint, *, capacity: int) -> dict[str, Any]:
        self.target.pve_release().require(REMOTE_PATH, path="the upload path (a disk uploaded, then import-from)",
                                      instead=REMOTE_INSTEAD)
        self._check_import_content()
        staged = convert.measure(src, "qcow2")
        final = convert.measure(src, self.fmt)
        staging = self.target.state_dir() / "staging"  # made by the write, not by a check (a dry run)
        local_free = shutil.disk_usage(existing_parent(staging)).free
        if staged > local_free:
            raise NoSpaceError(f"not enough space in {staging} to stage the disk: "
                              f"{staged} bytes needed, {local_free} free", hint="free some space")
        # Where the upload and the import take room on the node, step by step (``pve_space``): the
        # upload in /var/tmp and its copy in the import storage at once, then the upload and the import.
        imported = {self.import_storage: staged}
        imported[self.storage] = imported.get(self.storage, 0) + final
        check_phases(self.target, {
            f"the upload of {self.filename} (pveproxy's spool, then its copy into {self.import_storage})":
                {ROOTFS: staged, self.import_storage: staged},
            f"the import of {self.filename} into {self.storage} (the upload stays until it is done)": imported,
        })
        free = int(self.target.storage_status(self.storage).get("avail", 0))
        record: dict[str, Any] = {"storage": self._described(self.storage), "format": self.fmt,
                                  "required_bytes": imported[self.storage], "free_bytes": free}
        if self.import_storage != self.storage:  # every upload stays there until the migration ends
            record["also"] = [{"storage": self._described(self.import_storage), "required_bytes": staged,
                               "free_bytes": int(self.target.storage_status(self.import_storage).get("avail", 0))}]
        return record

    def _described(self, storage: str) -> str:
        return f"PVE {self.target.settings.node}:{storage}"

    def _check_import_content(self) -> None:
        """Refuse, before anything is made, an import storage without ``import`` in its content, which PVE
        refuses the upload for (pve-storage ``PVE/API2/Storage/Status.pm``, ``upload``; a storage type
        without a path cannot have it); the hint keeps the storage's content types and names the
        storages that have it."""
        info = self.target.storage_status(self.import_storage)
        content = [kind for kind in str(info.get("content", "")).split(",") if kind]
        if "import" in content:
            return
        raise TargetError(f"PVE storage {self.import_storage} ({info.get('type')}) on node "
                          f"{self.target.settings.node} cannot take disk uploads: its content types are "
                          f"{', '.join(content) or 'none'}, without 'import'",
                          hint=self.target.content_hint(self.import_storage, "import"))

    def exists(self) -> bool:
        return any(entry.get("volid") == self.import_volid for entry in self._content())

    def written(self) -> bool:
        return self.staging.path.exists() and not self.exists()

    def write(self, src: DiskEndpoint, *, capacity: int, progress: CopyProgress | None = None,
              bwlimit: int | None = None, start: Checkpoint | None = None,
              on_checkpoint: Callable[[Checkpoint], None] | None = None) -> None:
        staging = self.staging
        if start is not None:
            if self.exists() or not staging.path.is_file():
                raise StaleCheckpoint("its staging file is gone" if not self.exists() else "its upload began")
            check_resumable(staging, start)
        else:
            self._delete_upload()
            staging.path.unlink(missing_ok=True)
        checkpoints = SinkCheckpoints(staging, on_checkpoint, resumed=start is not None)
        with checkpoints.writing(lambda: staging.path.unlink(missing_ok=True)):
            convert.convert(src, staging, capacity=capacity, bwlimit=bwlimit, on_progress=progress, start=start,
                            on_checkpoint=checkpoints)

    def verify(self, src: DiskEndpoint, *, capacity: int, progress: ByteProgress | None = None) -> None:
        if not self.staging.path.exists():
            raise TargetError(f"nothing written for {self.import_volid} to verify (no staging file)",
                              hint="run the same command again: the disk is written anew")
        convert.compare(src, self.staging, capacity=capacity, on_progress=compared(progress, capacity))

    def commit(self, *, progress: ByteProgress | None = None) -> str:
        if self.exists():
            return self.volid
        path = self.staging.path
        if not path.exists():
            raise TargetError(f"nothing written for {self.import_volid} to commit",
                              hint="run the same command again: the disk is written anew")
        self.target.upload(self.import_storage, "import", path, self.filename, progress=progress)
        if not self.exists():
            raise TargetError(f"PVE upload of {self.filename} finished but {self.import_volid} is not there")
        return self.volid

    def attached(self, value: str) -> bool:
        """Whether a disk key's ``value`` in the VM config is what PVE made of ``volid``: a volume of
        this VM on ``storage`` (PVE rewrites ``STORAGE:0,import-from=...`` to the volume it allocated,
        so comparing with ``volid`` cannot tell; Attach needs this to know it is done)."""
        ref = VolumeRef.maybe(drive_volume(value))
        return ref is not None and ref.storage == self.storage and "import-from=" not in value and \
            ref.disk_of(self.vmid) is not None

    def _delete_upload(self) -> None:
        if self.exists():
            self.target.discard_volume(self.import_volid, self.vmid)

    def remove(self) -> None:
        try:
            self._delete_upload()
        finally:  # the local copy goes even when PVE keeps the upload (recorded as left over)
            self.staging.path.unlink(missing_ok=True)

    def release(self) -> None:
        # PVE copied the upload into the VM's own volume: neither copy is needed any more.
        self.remove()

    def fingerprint(self) -> dict[str, Any]:
        path = self.staging.path
        try:
            return convert.fingerprint(path) if stat.S_ISREG(path.stat().st_mode) else {}
        except OSError:
            return {}

    def __repr__(self) -> str:
        return f"RemoteImportSink({self.volid})"


def existing_parent(path: Path) -> Path:
    """``path``, or its nearest parent that exists (what a folder not made yet will be made on)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
