"""The source seam: what the user named, turned into a VM spec and readable disks.

One module per kind (``disk.py`` a loose disk, ``vmx.py``, ``ovf.py`` for
``.ovf`` and ``.ova``; later vSphere). The pipeline holds a ``Source`` and never
asks which kind it is, nor where the bytes live: it gets a ``VMSpec`` and, per
disk, a ``DiskInput`` qemu-img can read. Sources are read only, never written.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..inspect.bootsector import BootLayout
from ..inspect.model import DiskImage
from ..inspect.qemu_input import QemuInput
from ..spec import DiskSpec, VMSpec


@dataclass(frozen=True)
class DiskInput:
    """One disk, ready for the converter: what qemu-img reads and how big it is.

    ``image`` is the inspected disk when its bytes are local files v2p checked
    (the dd copier and ``inspect`` use it); ``messages`` are notes/warnings of
    the inspection, as ("note" | "warning", text); ``boot`` the boot layout of
    a disk that has no ``image``.
    """

    qemu: QemuInput
    capacity: int
    flavor: str
    image: DiskImage | None = None
    messages: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    boot: BootLayout | None = None  # a disk without ``image`` (read in place from an OVA): how it boots

    @property
    def boot_firmware(self) -> tuple[str, str] | None:
        """(which firmware can boot the disk, what shows it), as inspection found it; None if unread."""
        if self.image is not None and self.image.boot_firmware is not None:
            return self.image.boot_firmware, self.image.boot_detail
        return (self.boot.firmware, self.boot.detail) if self.boot is not None else None

    def close(self) -> None:
        """Let go of the source files held open for this disk (see pinned.py): nothing reads it after."""
        self.qemu.close()


class Source(abc.ABC):
    """A VM to migrate, as one kind of input describes it."""

    kind: str = "source"

    @abc.abstractmethod
    def describe(self) -> str:
        """What the user named (a path, later a vSphere inventory path): for messages and the state file."""

    @abc.abstractmethod
    def spec(self) -> VMSpec:
        """The VM's hardware and disks, from headers and descriptors only (fast, no disk data read).

        Unsafe or broken input is a ``SourceError`` (one line naming the file and what is wrong).
        """

    @abc.abstractmethod
    def disk_input(self, disk: DiskSpec, workdir: Path) -> DiskInput:
        """What qemu-img reads for ``disk``: inspected and validated, its files held open as they were
        inspected (``inspect.qemu_input.qemu_source``) until ``DiskInput.close()``. ``workdir`` is a private folder
        of this migration where the source may write descriptors or stage small files."""

    @abc.abstractmethod
    def fingerprint(self) -> list[dict[str, Any]]:
        """Size, mtime, device and inode of every file the source reads (``convert.file_identity``):
        a resumed run compares it to notice a source that changed or was swapped for another file."""

    def notices(self) -> list[str]:
        """Warnings about the source itself found by ``spec``/``disk_input`` (an OVA without a
        manifest, a file the manifest does not list, ...), for the user to see. None by default."""
        return []
