"""What inspection finds out about a disk: its flavor, extents and capacity.

Plain data, no I/O. ``DiskImage`` is what the rest of v2p is handed: every
path in it has been validated (inside the image's folder, present, big
enough), so later stages never need to look at a descriptor again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from ..pinned import FileId

SECTOR = 512


class Flavor(StrEnum):
    """The kinds of disk image v2p tells apart, named as VMware (or qemu) names them."""

    MONOLITHIC_SPARSE = "monolithicSparse"
    MONOLITHIC_FLAT = "monolithicFlat"
    TWO_GB_MAX_EXTENT_SPARSE = "twoGbMaxExtentSparse"
    TWO_GB_MAX_EXTENT_FLAT = "twoGbMaxExtentFlat"
    STREAM_OPTIMIZED = "streamOptimized"
    VMFS = "vmfs"
    VMFS_THIN = "vmfsThin"
    VMFS_EAGER_ZEROED_THICK = "vmfsEagerZeroedThick"
    VMFS_SPARSE = "vmfsSparse"
    SE_SPARSE = "seSparse"
    SPARSE_EXTENT = "sparse extent"
    FLAT_EXTENT = "flat extent"
    RAW = "raw"
    QCOW2 = "qcow2"
    VHD = "vhd"
    VHDX = "vhdx"
    VDI = "vdi"


class ExtentKind(StrEnum):
    FLAT = "FLAT"
    SPARSE = "SPARSE"
    ZERO = "ZERO"
    VMFS = "VMFS"
    VMFSSPARSE = "VMFSSPARSE"
    SESPARSE = "SESPARSE"

    @property
    def is_raw(self) -> bool:
        """The extent file holds the guest's bytes as they are (no grain tables)."""
        return self in (ExtentKind.FLAT, ExtentKind.VMFS)


@dataclass(frozen=True)
class Extent:
    """One extent line of a descriptor, its file resolved and checked."""

    sectors: int
    kind: ExtentKind
    path: Path | None  # None for ZERO extents
    offset: int = 0  # in sectors, into ``path``

    @property
    def size(self) -> int:
        return self.sectors * SECTOR


@dataclass(frozen=True)
class DiskImage:
    """A disk image v2p has inspected and found safe to hand to qemu-img.

    For a snapshot delta, ``parent`` is the (equally checked) disk below it;
    converting the top of the chain yields the consolidated disk.
    """

    path: Path
    flavor: Flavor
    qemu_format: str  # the -f qemu-img needs for ``path`` (after v2p's own rewrite)
    capacity: int  # virtual size in bytes
    extents: tuple[Extent, ...] = ()
    adapter_type: str | None = None
    create_type: str | None = None
    warnings: tuple[str, ...] = field(default=())  # worth a look before migrating
    notes: tuple[str, ...] = field(default=())  # what v2p will do differently from qemu-img
    cid: str | None = None
    parent_cid: str | None = None
    parent: DiskImage | None = None
    ddb: dict[str, str] = field(default_factory=dict)
    boot_signature: str | None = None  # "mbr", "gpt", "none"; None until checked
    # Which firmware can boot the disk (bootsector.BootLayout.firmware): "bios", "efi" (UEFI only),
    # "both", "none"; None until checked. ``boot_detail`` says what in its first sectors shows it.
    boot_firmware: str | None = None
    boot_detail: str = ""
    header: dict[str, int] = field(default_factory=dict)  # a KDMV header's version, flags, ...
    magic: str = ""  # libmagic's description of ``path``: the coarse first look
    ids: dict[Path, FileId] = field(default_factory=dict)  # this link's own files, as inspection found them
    named_link: bool = False  # ``path`` was a symbolic link the caller named: the one file pinned through a link

    @property
    def chain(self) -> tuple[DiskImage, ...]:
        """This disk, then its parent, grandparent, ... down to the base."""
        link: DiskImage | None = self
        out: list[DiskImage] = []
        while link is not None:
            out.append(link)
            link = link.parent
        return tuple(out)

    @property
    def own_files(self) -> tuple[Path, ...]:
        """This disk's descriptor and extents (not its parents')."""
        seen: dict[Path, None] = {self.path: None}
        for extent in self.extents:
            if extent.path is not None:
                seen.setdefault(extent.path, None)
        return tuple(seen)

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file whose bytes make up the disk, the top descriptor first."""
        seen: dict[Path, None] = {}
        for link in self.chain:
            for path in link.own_files:
                seen.setdefault(path, None)
        return tuple(seen)

    @property
    def file_ids(self) -> dict[Path, FileId]:
        """Every file of ``files`` with the identity inspection found it with."""
        out: dict[Path, FileId] = {}
        for link in self.chain:
            for path, ident in link.ids.items():
                out.setdefault(path, ident)
        return out

    @property
    def allocated(self) -> int:
        """Bytes the source files occupy on disk (sparse holes not counted)."""
        total = 0
        for path in self.files:
            try:
                total += path.stat().st_blocks * 512
            except OSError:
                pass
        return total

    @property
    def is_vmdk(self) -> bool:
        return self.qemu_format == "vmdk"

    @property
    def is_plain_raw(self) -> bool:
        """Raw data at known offsets, no chain: what dd can copy."""
        return self.parent is None and bool(self.extents) and all(
            e.kind.is_raw or e.kind is ExtentKind.ZERO for e in self.extents)

    @property
    def growable(self) -> bool:
        return any(e.kind in (ExtentKind.SPARSE, ExtentKind.VMFSSPARSE, ExtentKind.SESPARSE)
                   for e in self.extents)

    @property
    def messages(self) -> list[tuple[str, str]]:
        """("note" | "warning", text) for every link of the chain, notes first."""
        return [(kind, text) for link in self.chain
                for kind, texts in (("note", link.notes), ("warning", link.warnings)) for text in texts]

    @property
    def verdict(self) -> str:
        return "warning" if any(link.warnings for link in self.chain) else "ok"

    def to_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "flavor": self.flavor.value,
            "format": self.qemu_format,
            "capacity": self.capacity,
            "allocated": self.allocated,
            "create_type": self.create_type,
            "adapter_type": self.adapter_type,
            "cid": self.cid,
            "parent_cid": self.parent_cid,
            "extents": [
                {"sectors": e.sectors, "kind": e.kind.value,
                 "path": str(e.path) if e.path else None, "offset": e.offset}
                for e in self.extents
            ],
            "chain": [str(link.path) for link in self.chain],
            "ddb": dict(self.ddb),
            "boot_signature": self.boot_signature,
            "boot_firmware": self.boot_firmware,
            "boot_detail": self.boot_detail,
            "header": dict(self.header),
            "magic": self.magic,
            "verdict": self.verdict,
            "warnings": [text for kind, text in self.messages if kind == "warning"],
            "notes": [text for kind, text in self.messages if kind == "note"],
        }
