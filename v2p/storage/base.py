"""The storage interface: where a converted disk's bytes go.

A storage is named like a PVE storage (``local``, ``vmdata``) and names its
volumes like PVE (``vm-<vmid>-disk-<n>``). Each kind (dir, lvm, lvmthin,
block) is one module. The convert stage writes into ``allocate()``'s
volume under a temporary name where the kind allows one, and ``commit()``
gives it the final name once it is verified.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Volume:
    """A volume on a storage: PVE's volume id and where its bytes live."""

    volid: str
    path: Path
    fmt: str  # "qcow2" or "raw"
    is_block: bool = False  # a block device: written in place with qemu-img convert -n

    @property
    def size(self) -> int:
        """Bytes the volume holds (a block device's size, a file's length)."""
        if self.is_block:
            return block_size(self.path)
        return self.path.stat().st_size


def block_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


class Storage(abc.ABC):
    """One configured storage."""

    kind = "storage"

    def __init__(self, name: str, options: dict[str, str]) -> None:
        self.name = name
        self.options = options

    @abc.abstractmethod
    def formats(self) -> tuple[str, ...]:
        """Disk formats this storage holds, the preferred first."""

    @abc.abstractmethod
    def volume(self, vmid: int, index: int, fmt: str, *, partial: bool = False) -> Volume:
        """The volume for disk ``index`` of ``vmid`` (its temporary twin if ``partial``); no I/O."""

    @abc.abstractmethod
    def path_of(self, volid: str) -> Path:
        """Where the bytes of ``volid`` live (for the QEMU command line)."""

    @abc.abstractmethod
    def free_bytes(self) -> int:
        """Room left for new volumes."""

    def required_bytes(self, capacity: int, measured: int) -> int:
        """Room a disk of ``capacity`` bytes needs here (``measured``: qemu-img measure)."""
        return measured

    @abc.abstractmethod
    def allocate(self, vmid: int, index: int, fmt: str, capacity: int, *, force: bool = False) -> Volume:
        """Make (or check) the temporary volume the converter writes into."""

    def check(self, capacity: int, *, force: bool) -> None:
        """Refuse, before anything is written, a storage that cannot take a disk of ``capacity`` bytes
        (beyond free space, which ``free_bytes`` answers). Nothing to check by default."""
        return None

    def check_vm(self, vmid: int) -> None:
        """Refuse, before anything is written, a place for ``vmid``'s volumes that v2p must not
        write to (a folder that is a link, another user's, or writable by others). Nothing by default."""
        return None

    def remove_vm(self, vmid: int) -> None:
        """Delete every volume of ``vmid`` this storage holds. Nothing by default (a user's device)."""
        return None

    def reads_as_zero(self, volume: Volume) -> bool:
        """Whether a freshly allocated ``volume`` is known to read as zeros everywhere."""
        return not volume.is_block

    @abc.abstractmethod
    def commit(self, partial: Volume, final: Volume) -> None:
        """Give a verified temporary volume its final name."""

    @abc.abstractmethod
    def exists(self, volume: Volume) -> bool: ...

    @abc.abstractmethod
    def remove(self, volume: Volume) -> None: ...

    def describe(self) -> str:
        return f"{self.kind}: {self.name}"

    def create_empty(self, vmid: int, index: int, size: int) -> Volume:
        """A new, empty volume of ``size`` bytes in this storage's preferred format."""
        from ..runner import run

        fmt = self.formats()[0]
        partial = self.allocate(vmid, index, fmt, size)
        if not partial.is_block:
            run(["qemu-img", "create", "-q", "-f", fmt, str(partial.path), str(size)], timeout=60)
        final = self.volume(vmid, index, fmt)
        self.commit(partial, final)
        return final
