"""Directory storage: qcow2 or raw files in PVE's layout ``images/<vmid>/``.

``images/`` and ``images/<vmid>/`` are v2p's own folders below the storage's
path: every write, rename and delete goes through them opened without
following links (``fsutil.open_dir``), so a link or a swapped folder planted
there never sends a disk, or a ``vm rm``, anywhere else.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path

from ..errors import TargetError
from ..fsutil import create_exclusive, own_dir, remove_tree_at
from ..volumes import VolumeRef, disk_name
from .base import Storage, Volume

# Room kept free beyond what qemu-img measure asks for: metadata growth,
# and a filesystem at 100 % helps nobody.
MARGIN_FRACTION = 0.02
MARGIN_BYTES = 1 << 20


class DirStorage(Storage):
    kind = "dir"

    @property
    def root(self) -> Path:
        return Path(self.options["path"])

    def formats(self) -> tuple[str, ...]:
        return ("qcow2", "raw")

    def volume(self, vmid: int, index: int, fmt: str, *, partial: bool = False) -> Volume:
        name = disk_name(vmid, index, fmt)
        path = self.root / "images" / str(vmid) / name
        if partial:
            path = path.with_name(f".{name}.v2p-partial")
        return Volume(str(VolumeRef.disk(self.name, vmid, index, fmt)), path, fmt)

    def path_of(self, volid: str) -> Path:
        ref = VolumeRef.maybe(volid)
        if ref and ref.storage == self.name and ref.content == "iso" and ref.volname.endswith(".iso"):
            return self.root / "template" / ref.volname  # PVE's ISO layout: template/iso/NAME.iso
        if ref is None or ref.storage != self.name or ref.folder is None or ref.disk_index is None \
                or ref.fmt not in ("qcow2", "raw"):
            raise TargetError(f"volume {volid!r} is not a volume of storage {self.name}")
        return self.root / "images" / ref.volname

    def free_bytes(self) -> int:
        folder = self.root
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        stat = os.statvfs(folder)
        return stat.f_bavail * stat.f_frsize

    def required_bytes(self, capacity: int, measured: int) -> int:
        return int(measured * (1 + MARGIN_FRACTION)) + MARGIN_BYTES

    def _folder(self, vmid: int, *, create: bool = True) -> contextlib.AbstractContextManager[int]:
        return own_dir(self.root, "images", str(vmid), create=create, private=False)

    def check_vm(self, vmid: int) -> None:
        with contextlib.suppress(FileNotFoundError), self._folder(vmid, create=False):
            pass  # every folder there is checked on the way; what is missing is made right later

    def allocate(self, vmid: int, index: int, fmt: str, capacity: int, *, force: bool = False) -> Volume:
        partial = self.volume(vmid, index, fmt, partial=True)
        with self._folder(vmid) as folder:
            for stale in (partial.path.name, self.volume(vmid, index, fmt).path.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stale, dir_fd=folder)
            # Made here, new and private, before qemu-img opens it by name in a folder only we can write to.
            os.close(create_exclusive(folder, partial.path.name)[1])
        return partial

    def commit(self, partial: Volume, final: Volume) -> None:
        with self._folder(self._vmid_of(final)) as folder:
            os.replace(partial.path.name, final.path.name, src_dir_fd=folder, dst_dir_fd=folder)
            os.fsync(folder)

    def exists(self, volume: Volume) -> bool:
        """A regular file at the volume's name (a link planted there is not a volume)."""
        try:
            with self._folder(self._vmid_of(volume), create=False) as folder:
                info = os.stat(volume.path.name, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return stat.S_ISREG(info.st_mode)

    def remove(self, volume: Volume) -> None:
        try:
            with self._folder(self._vmid_of(volume), create=False) as folder:
                os.unlink(volume.path.name, dir_fd=folder)
        except FileNotFoundError:
            return

    def remove_vm(self, vmid: int) -> None:
        try:
            with own_dir(self.root, "images", create=False, private=False) as images:
                remove_tree_at(images, str(vmid))
        except FileNotFoundError:
            return

    def _vmid_of(self, volume: Volume) -> int:
        if volume.path.parent != self.root / "images" / volume.path.parent.name \
                or not re.fullmatch(r"[0-9]+", volume.path.parent.name):
            raise TargetError(f"{volume.path} is not a volume of storage {self.name}")
        return int(volume.path.parent.name)
