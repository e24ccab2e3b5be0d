"""Directory storage: qcow2 or raw files in PVE's layout ``images/<vmid>/``."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..errors import TargetError
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
        name = f"vm-{vmid}-disk-{index}.{fmt}"
        path = self.root / "images" / str(vmid) / name
        if partial:
            path = path.with_name(f".{name}.v2p-partial")
        return Volume(f"{self.name}:{vmid}/{name}", path, fmt)

    def path_of(self, volid: str) -> Path:
        storage, _, rest = volid.partition(":")
        if storage == self.name and re.fullmatch(r"iso/[^/]+\.iso", rest):
            return self.root / "template" / rest  # PVE's ISO layout: template/iso/NAME.iso
        if storage != self.name or not re.fullmatch(r"\d+/vm-\d+-disk-\d+\.(qcow2|raw)", rest):
            raise TargetError(f"volume {volid!r} is not a volume of storage {self.name}")
        return self.root / "images" / rest

    def free_bytes(self) -> int:
        folder = self.root
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        stat = os.statvfs(folder)
        return stat.f_bavail * stat.f_frsize

    def required_bytes(self, capacity: int, measured: int) -> int:
        return int(measured * (1 + MARGIN_FRACTION)) + MARGIN_BYTES

    def allocate(self, vmid: int, index: int, fmt: str, capacity: int, *, force: bool = False) -> Volume:
        partial = self.volume(vmid, index, fmt, partial=True)
        partial.path.parent.mkdir(parents=True, exist_ok=True)
        partial.path.unlink(missing_ok=True)
        self.volume(vmid, index, fmt).path.unlink(missing_ok=True)
        return partial

    def commit(self, partial: Volume, final: Volume) -> None:
        os.replace(partial.path, final.path)
        fd = os.open(final.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def exists(self, volume: Volume) -> bool:
        return volume.path.exists()

    def remove(self, volume: Volume) -> None:
        volume.path.unlink(missing_ok=True)

    def remove_vm(self, vmid: int) -> None:
        shutil.rmtree(self.root / "images" / str(vmid), ignore_errors=True)
