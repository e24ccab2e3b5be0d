"""VMDK headers and text descriptors, parsed by v2p itself.

qemu-img's own parser follows any extent path and trusts any capacity, so v2p
reads the header and descriptor here, checks them, and only then lets qemu-img
near the data. This module parses; ``validate_extents`` checks what a parsed
descriptor points at. Nothing here writes.
"""

from __future__ import annotations

import array
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SourceError, UnsafeSourceError
from .model import SECTOR, Extent, ExtentKind

KDMV = b"KDMV"
COWD = b"COWD"
SESPARSE_MAGIC = 0x00000000CAFEBABE

FLAG_COMPRESSED = 0x10000
FLAG_MARKERS = 0x20000
COMPRESSION_DEFLATE = 1

# Descriptors are a few hundred bytes; twoGbMaxExtent ones grow by a line per
# 2 GiB. Anything far larger is not a descriptor and is not read whole.
MAX_DESCRIPTOR = 1 << 20
# VMFS6's limit is 62 TiB; leave headroom but refuse what no VMware wrote.
MAX_CAPACITY = 64 << 40

_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_COWD = struct.Struct("<4sIIIIIII")
_SESPARSE = struct.Struct("<QQQQQQ")
GD_AT_END = 0xFFFFFFFFFFFFFFFF
COWD_GT_ENTRIES = 4096


@dataclass(frozen=True)
class SparseHeader:
    """The fields of a hosted sparse (KDMV) extent header v2p uses."""

    version: int
    flags: int
    capacity: int  # sectors
    grain_size: int  # sectors
    descriptor_offset: int  # sectors
    descriptor_size: int  # sectors
    gtes_per_gt: int
    gd_offset: int
    compress_algorithm: int

    @property
    def stream_optimized(self) -> bool:
        # Decided by compression, not gdOffset: qemu writes a real gdOffset
        # for streamOptimized, VMware writes GD_AT_END with a footer.
        return bool(self.flags & FLAG_COMPRESSED) and self.compress_algorithm == COMPRESSION_DEFLATE

    @property
    def gd_bytes(self) -> int:
        entries = -(-self.capacity // (self.grain_size * self.gtes_per_gt))
        return entries * 4


def parse_sparse_header(data: bytes, name: str) -> SparseHeader:
    """Parse the first 512 bytes of a KDMV file; raise SourceError when they cannot be one."""
    if len(data) < _HEADER.size:
        raise SourceError(f"{name}: VMDK sparse header is truncated ({len(data)} bytes)",
                          hint="the copy off the datastore is incomplete; copy it again")
    (magic, version, flags, capacity, grain, desc_off, desc_size, gtes, _rgd, gd_off,
     _overhead, _unclean, _eol, compress) = _HEADER.unpack_from(data)
    if magic != KDMV:
        raise SourceError(f"{name}: not a VMDK sparse extent")
    if version not in (1, 2, 3):
        raise SourceError(f"{name}: unknown VMDK sparse header version {version}")
    if grain == 0 or grain & (grain - 1) or grain > 2048:
        raise SourceError(f"{name}: VMDK header has an impossible grain size of {grain} sectors")
    if not 1 <= gtes <= 512:
        raise SourceError(f"{name}: VMDK header has {gtes} entries per grain table (at most 512)")
    if compress not in (0, COMPRESSION_DEFLATE):
        raise SourceError(f"{name}: unknown VMDK compression algorithm {compress}")
    _check_capacity(capacity, name)
    return SparseHeader(version, flags, capacity, grain, desc_off, desc_size, gtes, gd_off, compress)


def _check_capacity(sectors: int, name: str) -> None:
    if sectors == 0:
        raise SourceError(f"{name}: header says the disk has 0 sectors")
    if sectors * SECTOR > MAX_CAPACITY:
        raise SourceError(f"{name}: header claims a capacity of {sectors} sectors "
                          f"({sectors * SECTOR >> 40} TiB), more than any VMware disk can have")


def check_sparse_extent(path: Path, name: str) -> SparseHeader:
    """Read and check a KDMV extent: header sane, grain directory inside the file.

    A grain directory that cannot fit in the file is how an absurd capacity
    gives itself away: qemu-img would accept it and then convert for ever.
    """
    size = path.stat().st_size
    with open(path, "rb") as src:
        header = parse_sparse_header(src.read(SECTOR), name)
        if size < 2 * SECTOR:
            raise SourceError(f"{name}: VMDK sparse file is cut short ({size} bytes)",
                              hint="the copy is incomplete; copy it again")
        gd_offset = header.gd_offset
        if gd_offset == GD_AT_END:
            # VMware's streamOptimized: the real header is the footer, 1 KiB before the end.
            src.seek(size - 2 * SECTOR)
            footer = src.read(SECTOR)
            if not footer.startswith(KDMV):
                raise SourceError(f"{name}: streamOptimized file has no footer (cut short?)",
                                  hint="the copy is incomplete; copy it again")
            gd_offset = parse_sparse_header(footer, name).gd_offset
    if gd_offset == 0 or gd_offset * SECTOR + header.gd_bytes > size:
        raise SourceError(
            f"{name}: the grain directory for {header.capacity} sectors does not fit in the "
            f"{size}-byte file (capacity corrupt or file cut short)",
            hint="copy the disk again; if it is this size on the datastore, the header is corrupt")
    _check_grain_tables(path, name, header, gd_offset, size)
    return header


# Grain tables are read only while they add up to this much (a ~256 GiB disk
# with 64 KiB grains); past it only the grain directory is checked, so a
# multi-TiB header still inspects in milliseconds.
GT_SCAN_BUDGET = 32 << 20


def _check_grain_tables(path: Path, name: str, header: SparseHeader, gd_offset: int, size: int) -> None:
    """Every grain table, and (within budget) every grain, must lie inside the file."""
    cut_short = SourceError(f"{name}: grain tables point past the end of the {size}-byte file "
                            "(file cut short)", hint="the copy is incomplete; copy it again")
    gt_bytes = header.gtes_per_gt * 4
    with open(path, "rb") as src:
        src.seek(gd_offset * SECTOR)
        directory = array.array("I", src.read(header.gd_bytes))
        if sys.byteorder != "little":
            directory.byteswap()
        tables = sorted({entry for entry in directory if entry})
        if tables and tables[-1] * SECTOR + gt_bytes > size:
            raise cut_short
        if len(tables) * gt_bytes > GT_SCAN_BUDGET:
            return
        last = 0
        for table in tables:
            src.seek(table * SECTOR)
            entries = array.array("I", src.read(gt_bytes))
            if sys.byteorder != "little":
                entries.byteswap()
            last = max(last, max(entries, default=0))
    # entry 1 marks a zeroed grain (version 2+), not a location
    grain_end = (last + (1 if header.stream_optimized else header.grain_size)) * SECTOR
    if last > 1 and grain_end > size:
        raise cut_short


def check_cowd_extent(path: Path, name: str) -> int:
    """Check an ESX vmfsSparse (COWD) delta extent; return its capacity in sectors."""
    size = path.stat().st_size
    with open(path, "rb") as src:
        data = src.read(_COWD.size)
    if len(data) < _COWD.size or not data.startswith(COWD):
        raise SourceError(f"{name}: vmfsSparse delta extent has no COWD header")
    _magic, version, _flags, capacity, grain, gd_offset, gd_entries, _file_sectors = _COWD.unpack(data)
    _check_capacity(capacity, name)
    if grain == 0 or grain > 2048:
        raise SourceError(f"{name}: COWD header has an impossible grain size of {grain} sectors")
    need = -(-capacity // (grain * COWD_GT_ENTRIES))
    if gd_entries < need or gd_offset * SECTOR + gd_entries * 4 > size:
        raise SourceError(f"{name}: COWD grain directory does not fit the file or the capacity "
                          "(cut short or corrupt)")
    return int(capacity)


def check_sesparse_extent(path: Path, name: str) -> int:
    """Check an ESX seSparse delta extent; return its capacity in sectors."""
    size = path.stat().st_size
    with open(path, "rb") as src:
        data = src.read(SECTOR)
    if len(data) < SECTOR or struct.unpack_from("<Q", data)[0] != SESPARSE_MAGIC:
        raise SourceError(f"{name}: seSparse delta extent has no seSparse header")
    _magic, version, capacity, grain, gt_size, _flags = _SESPARSE.unpack_from(data)
    _check_capacity(capacity, name)
    if version != 0x200000001 or grain != 8 or gt_size != 64:
        raise SourceError(f"{name}: seSparse header version {version:#x} / grain {grain} / "
                          f"table size {gt_size} is not one v2p knows")
    gd_offset, gd_size = struct.unpack_from("<QQ", data, 8 * 22)
    if gd_offset == 0 or (gd_offset + gd_size) * SECTOR > size:
        raise SourceError(f"{name}: seSparse grain directory lies outside the file (cut short?)")
    return int(capacity)


@dataclass
class Descriptor:
    """A parsed text descriptor: its keys, its extent lines as written, and the ddb."""

    fields: dict[str, str] = field(default_factory=dict)
    ddb: dict[str, str] = field(default_factory=dict)
    extents: list[tuple[str, int, str, str | None, int | None]] = field(default_factory=list)

    @property
    def create_type(self) -> str | None:
        return self.fields.get("createtype")

    @property
    def adapter_type(self) -> str | None:
        return self.ddb.get("ddb.adaptertype")

    @property
    def cid(self) -> str | None:
        value = self.fields.get("cid")
        return value.lower() if value else None

    @property
    def parent_cid(self) -> str | None:
        """The parent's CID, or None for a disk with no parent (ffffffff)."""
        value = (self.fields.get("parentcid") or NO_PARENT).lower()
        return None if value == NO_PARENT else value

    @property
    def parent_hint(self) -> str | None:
        return self.fields.get("parentfilenamehint")


_EXTENT = re.compile(
    r"^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)"
    r"(?:\s+\"([^\"]*)\"(?:\s+(\d+))?)?\s*$"
)
_KEYVAL = re.compile(r"^([A-Za-z0-9_.]+)\s*=\s*(.*?)\s*$")

DESCRIPTOR_HEAD = b"# Disk DescriptorFile"
NO_PARENT = "ffffffff"


def looks_like_descriptor(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf")
    return text.startswith(DESCRIPTOR_HEAD) or (
        b"createType" in text[:4096] and b"\x00" not in text[:text.find(b"createType")]
    )


def parse_descriptor(data: bytes, name: str) -> Descriptor:
    """Parse descriptor text (NUL padding, CRLF and odd quoting allowed)."""
    data = data.split(b"\x00", 1)[0]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{name}: descriptor is not text (bad byte at offset {exc.start})") from None
    desc = Descriptor()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _EXTENT.match(line)
        if match:
            access, sectors, kind, fname, offset = match.groups()
            desc.extents.append((access, int(sectors), kind, fname,
                                 int(offset) if offset is not None else None))
            continue
        match = _KEYVAL.match(line)
        if match:
            key, value = match.groups()
            value = _unquote(value)
            if key.lower().startswith("ddb."):
                desc.ddb[key.lower()] = value
            else:
                desc.fields[key.lower()] = value
            continue
        if re.match(r"^(RW|RDONLY|NOACCESS)\b", line):
            raise SourceError(f"{name}: line {number}: malformed extent line: {line[:80]!r}")
        raise SourceError(f"{name}: line {number}: not a descriptor line: {line[:80]!r}")
    if desc.create_type is None:
        raise SourceError(f"{name}: descriptor has no createType")
    return desc


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def resolve_inside(folder: Path, fname: str, name: str, what: str = "extent") -> Path:
    """The path of the ``what`` file ``fname`` named in ``name``; refuse anything leaving ``folder``."""
    if not fname:
        raise UnsafeSourceError(f"{name}: {what} line names an empty file")
    if "\x00" in fname:
        raise UnsafeSourceError(f"{name}: {what} path contains a NUL byte: refused")
    if fname.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", fname):
        raise UnsafeSourceError(f"{name}: {what} path {fname!r} is absolute: refused",
                                hint=f"the {what} must sit beside the descriptor, named relatively")
    parts = re.split(r"[\\/]", fname)
    if ".." in parts:
        raise UnsafeSourceError(f"{name}: {what} path {fname!r} leaves the image folder: refused")
    candidate = folder.joinpath(*parts)
    real_folder = Path(os.path.realpath(folder))
    real = Path(os.path.realpath(candidate))
    if real != real_folder and real_folder not in real.parents:
        raise UnsafeSourceError(
            f"{name}: {what} {fname!r} is a link leading out of the image folder (to {real}): refused")
    return real


def validate_extents(desc: Descriptor, descriptor_path: Path) -> tuple[Extent, ...]:
    """Turn the descriptor's extent lines into checked ``Extent``s.

    RDONLY extents are read like RW ones (v2p only reads); qemu-img aborts on
    them, which is one more reason it only ever sees v2p's own descriptor.
    """
    name = descriptor_path.name
    folder = descriptor_path.parent
    if not desc.extents:
        raise SourceError(f"{name}: descriptor lists no extents")
    extents: list[Extent] = []
    seen_sparse: set[Path] = set()
    for access, sectors, kind_name, fname, offset in desc.extents:
        if access == "NOACCESS":
            raise UnsafeSourceError(
                f"{name}: extent {fname!r} is NOACCESS: its data may not be read, so the disk "
                "cannot be copied whole: refused")
        try:
            kind = ExtentKind(kind_name)
        except ValueError:
            raise SourceError(f"{name}: unknown extent type {kind_name}") from None
        if sectors == 0:
            raise SourceError(f"{name}: extent {fname!r} has zero sectors")
        if sectors * SECTOR > MAX_CAPACITY:
            raise SourceError(f"{name}: extent {fname!r} claims {sectors} sectors, "
                              "more than any VMware disk can have")
        if kind is ExtentKind.ZERO:
            extents.append(Extent(sectors, kind, None))
            continue
        if fname is None:
            raise SourceError(f"{name}: {kind_name} extent line names no file")
        path = resolve_inside(folder, fname, name)
        if not path.exists():
            raise SourceError(f"{name}: extent file {fname!r} is missing",
                              hint="copy every file of the VM folder, not just the .vmdk")
        if not path.is_file():
            raise SourceError(f"{name}: extent {fname!r} is not a regular file")
        if path == Path(os.path.realpath(descriptor_path)) and kind.is_raw:
            raise UnsafeSourceError(f"{name}: flat extent points back at its own descriptor: refused")
        start = offset or 0
        if kind.is_raw:
            need = (start + sectors) * SECTOR
            have = path.stat().st_size
            if have < need:
                raise SourceError(
                    f"{name}: extent {fname!r} holds {have} bytes, the descriptor says "
                    f"{need} (size mismatch)", hint="the flat file is truncated or belongs to another disk")
        else:
            if offset:
                raise SourceError(f"{name}: sparse extent {fname!r} cannot have an offset")
            if path in seen_sparse:
                raise SourceError(f"{name}: sparse extent {fname!r} is listed twice")
            seen_sparse.add(path)
            held = _SPARSE_CHECKS[kind](path, fname)
            if held != sectors:
                raise SourceError(f"{name}: extent {fname!r} holds {held} sectors, the descriptor "
                                  f"says {sectors} (capacity mismatch)")
        extents.append(Extent(sectors, kind, path, start))
    total = sum(e.sectors for e in extents) * SECTOR
    if total > MAX_CAPACITY:
        raise SourceError(f"{name}: extents add up to {total} bytes, more than any VMware disk can have")
    return tuple(extents)


_SPARSE_CHECKS = {
    ExtentKind.SPARSE: lambda path, name: check_sparse_extent(path, name).capacity,
    ExtentKind.VMFSSPARSE: check_cowd_extent,
    ExtentKind.SESPARSE: check_sesparse_extent,
}
