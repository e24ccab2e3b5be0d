"""VMDK headers and text descriptors, parsed by v2p itself.

qemu-img's own parser follows any extent path and trusts any capacity, so v2p
reads the header and descriptor here, checks them, and only then lets qemu-img
near the data. This module parses; ``validate_extents`` checks what a parsed
descriptor points at. Nothing here writes.
"""

from __future__ import annotations

import os
import re
import struct
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


@dataclass(frozen=True)
class SparseHeader:
    """The fields of a hosted sparse (KDMV) extent header v2p uses."""

    version: int
    flags: int
    capacity: int  # sectors
    grain_size: int  # sectors
    descriptor_offset: int  # sectors
    descriptor_size: int  # sectors
    gd_offset: int
    compress_algorithm: int

    @property
    def stream_optimized(self) -> bool:
        # Decided by compression, not gdOffset: qemu writes a real gdOffset
        # for streamOptimized, VMware writes GD_AT_END with a footer.
        return bool(self.flags & FLAG_COMPRESSED) and self.compress_algorithm == COMPRESSION_DEFLATE


def parse_sparse_header(data: bytes, name: str) -> SparseHeader:
    """Parse the first 512 bytes of a KDMV file; raise SourceError when they cannot be one."""
    if len(data) < _HEADER.size:
        raise SourceError(f"{name}: VMDK sparse header is truncated ({len(data)} bytes)",
                          hint="the copy off the datastore is incomplete; copy it again")
    (magic, version, flags, capacity, grain, desc_off, desc_size, _gtes, _rgd, gd_off,
     _overhead, _unclean, _eol, compress) = _HEADER.unpack_from(data)
    if magic != KDMV:
        raise SourceError(f"{name}: not a VMDK sparse extent")
    if version not in (1, 2, 3):
        raise SourceError(f"{name}: unknown VMDK sparse header version {version}")
    if grain == 0 or grain & (grain - 1) or grain > 2048:
        raise SourceError(f"{name}: VMDK header has an impossible grain size of {grain} sectors")
    if capacity * SECTOR > MAX_CAPACITY:
        raise SourceError(f"{name}: VMDK header claims a capacity of {capacity} sectors, "
                          f"more than any VMware disk can have")
    return SparseHeader(version, flags, capacity, grain, desc_off, desc_size, gd_off, compress)


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


_EXTENT = re.compile(
    r"^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)"
    r"(?:\s+\"([^\"]*)\"(?:\s+(\d+))?)?\s*$"
)
_KEYVAL = re.compile(r"^([A-Za-z0-9_.]+)\s*=\s*(.*?)\s*$")

DESCRIPTOR_HEAD = b"# Disk DescriptorFile"


def looks_like_descriptor(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf")
    return text.startswith(DESCRIPTOR_HEAD) or (
        b"createType" in text[:4096] and b"\x00" not in text[:text.find(b"createType")]
    )


def parse_descriptor(data: bytes, name: str) -> Descriptor:
    """Parse descriptor text (NUL padding, CRLF and odd quoting allowed)."""
    data = data.split(b"\x00", 1)[0]
    try:
        text = data.decode("utf-8")
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


def resolve_inside(folder: Path, fname: str, name: str) -> Path:
    """The path of extent/parent ``fname`` named in ``name``; refuse anything leaving ``folder``."""
    if not fname:
        raise UnsafeSourceError(f"{name}: extent line names an empty file")
    if fname.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", fname):
        raise UnsafeSourceError(f"{name}: extent path {fname!r} is absolute: refused",
                                hint="extents must sit beside their descriptor")
    parts = re.split(r"[\\/]", fname)
    if ".." in parts:
        raise UnsafeSourceError(f"{name}: extent path {fname!r} leaves the image folder: refused")
    if "\x00" in fname:
        raise UnsafeSourceError(f"{name}: extent path contains a NUL byte: refused")
    candidate = folder.joinpath(*parts)
    real_folder = Path(os.path.realpath(folder))
    real = Path(os.path.realpath(candidate))
    if real != real_folder and real_folder not in real.parents:
        raise UnsafeSourceError(
            f"{name}: extent {fname!r} is a link leading out of the image folder (to {real}): refused")
    return real


def validate_extents(desc: Descriptor, descriptor_path: Path) -> tuple[Extent, ...]:
    """Turn the descriptor's extent lines into checked ``Extent``s."""
    name = descriptor_path.name
    folder = descriptor_path.parent
    if not desc.extents:
        raise SourceError(f"{name}: descriptor lists no extents")
    extents: list[Extent] = []
    for access, sectors, kind_name, fname, offset in desc.extents:
        if access != "RW":
            raise UnsafeSourceError(
                f"{name}: extent {fname!r} is {access}; qemu-img aborts on such extents: refused",
                hint="make the extent RW in a copy of the descriptor if its data is wanted")
        try:
            kind = ExtentKind(kind_name)
        except ValueError:
            raise SourceError(f"{name}: unknown extent type {kind_name}") from None
        if sectors == 0:
            raise SourceError(f"{name}: extent {fname!r} has zero sectors")
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
        elif offset:
            raise SourceError(f"{name}: sparse extent {fname!r} cannot have an offset")
        extents.append(Extent(sectors, kind, path, start))
    total = sum(e.sectors for e in extents) * SECTOR
    if total > MAX_CAPACITY:
        raise SourceError(f"{name}: extents add up to {total} bytes, more than any VMware disk can have")
    return tuple(extents)
