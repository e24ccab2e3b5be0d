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
import resource
import stat
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..errors import SourceError, UnsafeSourceError
from .model import SECTOR, Extent, ExtentKind

KDMV = b"KDMV"
COWD = b"COWD"
SESPARSE_MAGIC = 0x00000000CAFEBABE

FLAG_COMPRESSED = 0x10000
COMPRESSION_DEFLATE = 1

# Descriptors are a few hundred bytes; twoGbMaxExtent ones grow by a line per
# 2 GiB. Anything far larger is not a descriptor and is not read whole.
MAX_DESCRIPTOR = 1 << 20
# VMFS6's limit is 62 TiB; leave headroom but refuse what no VMware wrote.
MAX_CAPACITY = 64 << 40

# qemu's vmdk driver opens every extent line of every link of a chain at once,
# one file descriptor each, and its open time grows with the square of their
# number (qemu-img 7.2 here: 1,000 one-sector extents open in about 1 s, 2,000
# in 2-3 s, 4,096 in 8-20 s, 6,000 in 26 s, close to the 30 s ``qemu-img info``
# gets). 2,048 keeps every qemu-img call within seconds and still takes a
# 4 TiB twoGbMaxExtent disk (VMware's extents are 2047 MiB: 2,049 of them make
# 4 TiB, so 4 TiB minus 2 GiB).
MAX_EXTENTS = 2048
# Descriptors qemu opens besides the extents (one per chain link), and the
# output, the other end of the chain and stdio: kept free below ``ulimit -n``.
FD_HEADROOM = 32
# qemu reads at most 1 MiB - 1 bytes of a descriptor and silently drops the rest.
QEMU_DESCRIPTOR_MAX = (1 << 20) - 1
# qemu scans an extent's file name with sscanf("%511[^\n\r\"]"): a longer path is
# cut, and the cut path is opened.
QEMU_PATH_MAX = 511
# What Python's str.splitlines (and so a VM config reader) takes for a line break.
_LINE_BREAK = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")

_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_COWD = struct.Struct("<4sIIIIIII")
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


def file_kind(mode: int) -> str | None:
    """What a non-regular file is, in a user's words; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, what in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return what
    return "a special file"


def refuse_line_break(text: str, name: str | None = None, what: str = "") -> None:
    """Refuse a path with a line break: it cannot go, one line each, into a VM
    config or a descriptor qemu-img reads. ``name`` is the file that names it."""
    if _LINE_BREAK.search(text):
        where = f"{name}: {what} " if name else ""
        raise SourceError(f"{where}{text!r}: a file name with a line break cannot go into a VM config "
                          "or a qemu-img descriptor", hint="rename it")


def open_regular(path: Path, name: str) -> BinaryIO:
    """Open ``path`` to read its headers, refusing anything but a regular file.

    The type is taken from the open descriptor, so a FIFO put in the file's
    place after any earlier check is still refused, and O_NONBLOCK keeps that
    open from waiting for a writer that never comes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError(f"{name}: cannot open: {exc.strerror}") from None
    kind = file_kind(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise SourceError(f"{name} is {kind}, not a regular file")
    return os.fdopen(fd, "rb")


def _size(src: BinaryIO) -> int:
    return os.fstat(src.fileno()).st_size


def check_sparse_extent(path: Path, name: str) -> SparseHeader:
    """Read and check a KDMV extent: header sane, grain directory inside the file.

    A grain directory that cannot fit in the file is how an absurd capacity
    gives itself away: qemu-img would accept it and then convert for ever.
    """
    with open_regular(path, name) as src:
        return check_sparse_stream(src, _size(src), name)


def check_sparse_stream(src: BinaryIO, size: int, name: str) -> SparseHeader:
    """``check_sparse_extent`` on an open file of ``size`` bytes whose position 0 is the
    header: a whole file, or a bounded view of a member inside an archive (an OVA)."""
    src.seek(0)
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
    _check_grain_tables(src, name, header, gd_offset, size)
    return header


# Grain tables are read only while they add up to this much (a ~256 GiB disk
# with 64 KiB grains); past it only the grain directory is checked, so a
# multi-TiB header still inspects in milliseconds.
GT_SCAN_BUDGET = 32 << 20


def _cut_short(name: str, size: int) -> SourceError:
    return SourceError(f"{name}: grain tables point past the end of the {size}-byte file "
                       "(file cut short)", hint="the copy is incomplete; copy it again")


def _words(data: bytes, code: str) -> array.array[int]:
    words = array.array(code, data)
    if sys.byteorder != "little":
        words.byteswap()
    return words


def _check_grain_tables(src: BinaryIO, name: str, header: SparseHeader, gd_offset: int, size: int) -> None:
    """Every grain table, and (within budget) every grain, must lie inside the file."""
    gt_bytes = header.gtes_per_gt * 4
    src.seek(gd_offset * SECTOR)
    tables = sorted({entry for entry in _words(src.read(header.gd_bytes), "I") if entry})
    if tables and tables[-1] * SECTOR + gt_bytes > size:
        raise _cut_short(name, size)
    if len(tables) * gt_bytes > GT_SCAN_BUDGET:
        return
    last = 0
    for table in tables:
        src.seek(table * SECTOR)
        last = max(last, max(_words(src.read(gt_bytes), "I"), default=0))
    # entry 1 marks a zeroed grain (version 2+), not a location
    grain_end = (last + (1 if header.stream_optimized else header.grain_size)) * SECTOR
    if last > 1 and grain_end > size:
        raise _cut_short(name, size)


def check_cowd_extent(path: Path, name: str) -> int:
    """Check an ESX vmfsSparse (COWD) delta extent; return its capacity in sectors."""
    with open_regular(path, name) as src:
        size = _size(src)
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


# seSparse, as qemu's block/vmdk.c reads it (VMDKSESparseConstHeader): the
# constant header in sector 0 is 26 little-endian u64 fields, then 304 zero
# bytes; offsets and sizes are in sectors.
SESPARSE_FIELDS = (
    "magic", "version", "capacity", "grain_size", "grain_table_size", "flags",
    "reserved1", "reserved2", "reserved3", "reserved4",
    "volatile_header_offset", "volatile_header_size",
    "journal_header_offset", "journal_header_size",
    "journal_offset", "journal_size",
    "grain_dir_offset", "grain_dir_size",
    "grain_tables_offset", "grain_tables_size",
    "free_bitmap_offset", "free_bitmap_size",
    "backmap_offset", "backmap_size",
    "grains_offset", "grains_size",
)
_SESPARSE_CONST = struct.Struct(f"<{len(SESPARSE_FIELDS)}Q304s")
_SESPARSE_VOLATILE = struct.Struct("<4Q480s")
SESPARSE_VOLATILE_MAGIC = 0x00000000CAFECAFE
SESPARSE_VERSION = 0x0000000200000001
SESPARSE_GRAIN = 8  # sectors
SESPARSE_GT_SECTORS = 64
SESPARSE_GT_ENTRIES = SESPARSE_GT_SECTORS * SECTOR // 8
# ESX preallocates every region before the grains (the grain tables for the
# whole capacity included), so each must lie inside the file; only the grains
# region is declared at its full size and filled as the guest writes.
_SESPARSE_REGIONS = (
    ("volatile header", "volatile_header"), ("journal header", "journal_header"),
    ("journal", "journal"), ("grain directory", "grain_dir"), ("grain tables", "grain_tables"),
    ("free bitmap", "free_bitmap"), ("backmap", "backmap"),
)
# qemu refuses a grain directory of more entries than this ("L1 size too big")
# and a grain table past this sector (it keeps table offsets in 32 bits).
_QEMU_L1_MAX = 32 * 1024 * 1024
_QEMU_L2_SECTOR_MAX = 0xFFFFFFFF
_ZERO_TO_FF = bytes([0xFF]) + bytes(255)


def check_sesparse_extent(path: Path, name: str) -> int:
    """Check an ESX seSparse delta extent; return its capacity in sectors.

    Every region the header declares must lie inside the file and clear of the
    others, the grain directory must cover the capacity, and every grain table
    and grain it points at must lie inside its region and inside the file: a
    grain past the end would read as zeros in qemu-img, not fail.
    """
    with open_regular(path, name) as src:
        size = _size(src)
        data = src.read(SECTOR)
        if len(data) < SECTOR or struct.unpack_from("<Q", data)[0] != SESPARSE_MAGIC:
            raise SourceError(f"{name}: seSparse delta extent has no seSparse header")
        *values, pad = _SESPARSE_CONST.unpack(data)
        head = dict(zip(SESPARSE_FIELDS, values, strict=True))
        capacity = head["capacity"]
        _check_capacity(capacity, name)
        if (head["version"] != SESPARSE_VERSION or head["grain_size"] != SESPARSE_GRAIN
                or head["grain_table_size"] != SESPARSE_GT_SECTORS):
            raise SourceError(f"{name}: seSparse header version {head['version']:#x} / grain "
                              f"{head['grain_size']} / table size {head['grain_table_size']} "
                              "is not one v2p knows")
        unknown = [key for key in ("flags", "reserved1", "reserved2", "reserved3", "reserved4") if head[key]]
        if unknown or any(pad):
            what = ", ".join(f"{key} {head[key]:#x}" for key in unknown) or "non-zero header padding"
            raise SourceError(f"{name}: seSparse header has {what}: a variant qemu-img cannot read",
                              hint="consolidate the snapshots in VMware and migrate the base disk")
        _check_sesparse_regions(name, head, size)
        src.seek(head["volatile_header_offset"] * SECTOR)
        magic, _free_gt, _txn, replay, vpad = _SESPARSE_VOLATILE.unpack(src.read(SECTOR))
        if magic != SESPARSE_VOLATILE_MAGIC or any(vpad):
            raise SourceError(f"{name}: seSparse volatile header is damaged (magic {magic:#x})")
        if replay:
            raise SourceError(f"{name}: seSparse journal still needs replaying (ESXi did not close "
                              "the snapshot cleanly); qemu-img cannot replay it",
                              hint="power the VM on and off once in ESXi, or consolidate its "
                                   "snapshots, then copy the files again")
        _check_sesparse_tables(src, name, head, size)
    return int(capacity)


def _check_sesparse_regions(name: str, head: dict[str, int], size: int) -> None:
    spans = [("constant header", 0, 1)]
    for label, key in _SESPARSE_REGIONS:
        offset, sectors = head[f"{key}_offset"], head[f"{key}_size"]
        if sectors == 0 and key not in ("volatile_header", "grain_dir"):
            continue  # absent: qemu never reads the journal, bitmap or backmap
        if sectors == 0:
            raise SourceError(f"{name}: seSparse header declares an empty {label}")
        if (offset + sectors) * SECTOR > size:
            raise SourceError(
                f"{name}: seSparse {label} (sectors {offset}-{offset + sectors - 1}) lies past the "
                f"end of the {size}-byte file (cut short?)", hint="the copy is incomplete; copy it again")
        spans.append((label, offset, sectors))
    if head["grains_size"]:
        spans.append(("grains", head["grains_offset"], head["grains_size"]))
    spans.sort(key=lambda span: span[1])
    for (first, start, length), (second, next_start, _n) in zip(spans, spans[1:], strict=False):
        if start + length > next_start:
            raise SourceError(f"{name}: seSparse {first} and {second} overlap (corrupt header)")
    needed = -(-head["capacity"] // (SESPARSE_GT_ENTRIES * SESPARSE_GRAIN))
    entries = head["grain_dir_size"] * SECTOR // 8
    if entries < needed:
        raise SourceError(f"{name}: seSparse grain directory of {entries} entries cannot cover "
                          f"{head['capacity']} sectors (it needs {needed}): corrupt header")
    if entries > _QEMU_L1_MAX:
        raise SourceError(f"{name}: seSparse grain directory of {entries} entries is more than "
                          f"qemu-img reads ({_QEMU_L1_MAX})")


def _check_sesparse_tables(src: BinaryIO, name: str, head: dict[str, int], size: int) -> None:
    needed = -(-head["capacity"] // (SESPARSE_GT_ENTRIES * SESPARSE_GRAIN))
    src.seek(head["grain_dir_offset"] * SECTOR)
    tables: set[int] = set()
    for index, entry in enumerate(_words(src.read(needed * 8), "Q")):
        if not entry:
            continue
        if entry >> 32 != 0x10000000:
            raise SourceError(f"{name}: seSparse grain directory entry {index} is {entry:#x}, "
                              "not a grain table (corrupt)")
        tables.add(entry & 0xFFFFFFFF)
    if not tables:
        return
    last_table = max(tables)
    if (last_table + 1) * SESPARSE_GT_SECTORS > head["grain_tables_size"]:
        raise SourceError(f"{name}: seSparse grain directory points at grain table {last_table}, "
                          f"past the {head['grain_tables_size']}-sector grain tables region (corrupt)")
    if head["grain_tables_offset"] + last_table * SESPARSE_GT_SECTORS > _QEMU_L2_SECTOR_MAX:
        raise SourceError(f"{name}: seSparse grain table {last_table} lies beyond the 2 TiB "
                          "qemu-img can address in a grain table offset")
    if len(tables) * SESPARSE_GT_SECTORS * SECTOR > GT_SCAN_BUDGET:
        return
    last = -1
    for table in sorted(tables):
        src.seek((head["grain_tables_offset"] + table * SESPARSE_GT_SECTORS) * SECTOR)
        raw = src.read(SESPARSE_GT_SECTORS * SECTOR)
        # An entry's type is its top nibble (the high half of its last byte):
        # 0 unallocated (and then all zero), 1 unmapped, 2 zero, 3 a grain;
        # qemu fails the read on anything else. Checked a column of bytes at a
        # time: a Python loop over every entry of every table would be slow.
        tops = raw[7::8]
        if any(top >> 4 > 3 for top in set(tops)):
            raise SourceError(f"{name}: seSparse grain table {table} holds an entry of unknown "
                              "type (corrupt)")
        unallocated = int.from_bytes(tops.translate(_ZERO_TO_FF), "little")
        if any(int.from_bytes(raw[column::8], "little") & unallocated for column in range(7)):
            raise SourceError(f"{name}: seSparse grain table {table} holds a malformed "
                              "unallocated entry (corrupt)")
        if any(top >> 4 == 3 for top in set(tops)):
            last = max(last, max(((entry >> 48) & 0xFFF) | ((entry & 0xFFFFFFFFFFFF) << 12)
                                 for entry in _words(raw, "Q") if entry >> 60 == 3))
    if last < 0:
        return
    end = (last + 1) * SESPARSE_GRAIN
    if end > head["grains_size"]:
        raise SourceError(f"{name}: seSparse grain {last} lies past the {head['grains_size']}-sector "
                          "grains region (corrupt)")
    if (head["grains_offset"] + end) * SECTOR > size:
        raise SourceError(f"{name}: seSparse grain {last} lies past the end of the {size}-byte file "
                          "(file cut short)", hint="the copy is incomplete; copy it again")


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


def resolve_inside(folder: Path, fname: str, name: str, what: str = "extent", *,
                   real_folder: Path | None = None) -> Path:
    """The path of the ``what`` file ``fname`` named in ``name``; refuse anything leaving ``folder``
    (``real_folder``, its real path, if the caller has it already)."""
    if not fname:
        raise UnsafeSourceError(f"{name}: {what} line names an empty file")
    if "\x00" in fname:
        raise UnsafeSourceError(f"{name}: {what} path contains a NUL byte: refused")
    refuse_line_break(fname, name, what)
    if fname.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", fname):
        raise UnsafeSourceError(f"{name}: {what} path {fname!r} is absolute: refused",
                                hint=f"the {what} must sit beside the descriptor, named relatively")
    parts = re.split(r"[\\/]", fname)
    if ".." in parts:
        raise UnsafeSourceError(f"{name}: {what} path {fname!r} leaves the image folder: refused")
    if real_folder is None:
        real_folder = Path(os.path.realpath(folder))
    real = _plain_entry(real_folder, parts)
    if real is None:
        real = Path(os.path.realpath(folder.joinpath(*parts)))
        if real != real_folder and real_folder not in real.parents:
            raise UnsafeSourceError(
                f"{name}: {what} {fname!r} is a link leading out of the image folder (to {real}): refused")
    refuse_line_break(str(real), name, f"{what} {fname!r} is")
    return real


def _plain_entry(real_folder: Path, parts: list[str]) -> Path | None:
    """``real_folder/name`` when ``parts`` is one plain name that is not a link
    there: its real path without the lstat of every folder above it that
    realpath does (thousands of extents make that add up)."""
    if len(parts) != 1 or parts[0] in ("", ".", ".."):
        return None
    entry = real_folder / parts[0]
    try:
        if stat.S_ISLNK(os.lstat(entry).st_mode):
            return None
    except OSError:
        return None
    return entry


def stat_named(path: Path, name: str, what: str, fname: str, *, missing_hint: str) -> os.stat_result:
    """Stat the ``what`` file ``fname`` (at ``path``) that ``name`` names: present, and a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SourceError(f"{name}: {what} {fname!r} is missing", hint=missing_hint) from None
    except OSError as exc:
        raise SourceError(f"{name}: {what} {fname!r} cannot be read: {exc.strerror}") from None
    kind = file_kind(st.st_mode)
    if kind is not None:
        raise SourceError(f"{name}: {what} {fname!r} is {kind}, not a regular file")
    return st


def check_open_files(extents: int, links: int, name: str) -> None:
    """Refuse a chain of ``links`` descriptors and ``extents`` extent lines in all
    that qemu-img could not open at once in reasonable time.

    qemu-img opens a file per extent line and per link, and inherits the pinned source
    files v2p hands it (at most one per extent or link, see pinned.py): all of them must fit under
    the hard ``ulimit -n``, as far as which v2p raises its own (inherited) soft limit."""
    if extents > MAX_EXTENTS:
        raise SourceError(
            f"{name}: the disk has {extents} extents (snapshot chain included); v2p takes at most "
            f"{MAX_EXTENTS}, as qemu-img opens every one at once and slows down with the square of "
            "their number", hint="convert it to a single file in VMware first: "
                                 "vmware-vdiskmanager -r DISK.vmdk -t 0 ONE.vmdk")
    opened = 2 * (extents + links)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if limit != resource.RLIM_INFINITY and opened + FD_HEADROOM > limit:
        raise SourceError(f"{name}: qemu-img would hold {opened} files open at once for this disk, "
                          f"more than this process may open (ulimit -n is {limit})",
                          hint=f"raise the limit (ulimit -n {max(4096, 2 * opened)}) and run again")


def validate_extents(desc: Descriptor, descriptor_path: Path, *, extents_above: int = 0,
                     links_above: int = 0, seen: dict[Path, os.stat_result] | None = None) -> tuple[Extent, ...]:
    """Turn the descriptor's extent lines into checked ``Extent``s.

    ``extents_above`` and ``links_above`` count the extent lines and links
    above this one in a snapshot chain: qemu-img opens the whole chain at once,
    so the whole chain is held to ``MAX_EXTENTS``, checked before any extent is
    looked at so an absurd descriptor is refused at once. Each file is
    resolved and stat'ed once, however often it is named.

    RDONLY extents are read like RW ones (v2p only reads); qemu-img aborts on
    them, which is one more reason it only ever sees v2p's own descriptor.
    ``seen`` (when given) gets each extent file's stat, as checked.
    """
    name = descriptor_path.name
    folder = descriptor_path.parent
    if not desc.extents:
        raise SourceError(f"{name}: descriptor lists no extents")
    check_open_files(extents_above + len(desc.extents), links_above + 1, name)
    real_folder = Path(os.path.realpath(folder))
    real_descriptor = Path(os.path.realpath(descriptor_path))
    files: dict[str, tuple[Path, os.stat_result]] = {}
    extents: list[Extent] = []
    seen_sparse: set[Path] = set()
    # What v2p's own descriptor for qemu-img will take: its header (naming this
    # descriptor and a parent of v2p's, at most PATH_MAX), then a line per
    # extent with its absolute path (a ZERO extent reads a file of v2p's).
    described = 512 + len(os.fsencode(real_descriptor)) + 4096
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
            described += len(f'RW {sectors} FLAT "" 0\n') + QEMU_PATH_MAX
            extents.append(Extent(sectors, kind, None))
            continue
        if fname is None:
            raise SourceError(f"{name}: {kind_name} extent line names no file")
        if fname not in files:
            path = resolve_inside(folder, fname, name, real_folder=real_folder)
            _check_qemu_path(path, name, fname)
            files[fname] = path, stat_named(path, name, "extent file", fname,
                                            missing_hint="copy every file of the VM folder, not just the .vmdk")
        path, st = files[fname]
        if seen is not None:
            seen[path] = st
        described += len(f'RW {sectors} {kind_name} "" {offset or 0}\n'.encode()) + len(os.fsencode(path))
        if path == real_descriptor and kind.is_raw:
            raise UnsafeSourceError(f"{name}: flat extent points back at its own descriptor: refused")
        start = offset or 0
        if kind.is_raw:
            need = (start + sectors) * SECTOR
            if st.st_size < need:
                raise SourceError(
                    f"{name}: extent {fname!r} holds {st.st_size} bytes, the descriptor says "
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
    if described > QEMU_DESCRIPTOR_MAX:
        raise SourceError(f"{name}: the descriptor v2p writes for qemu-img would take about {described} "
                          f"bytes with these {len(extents)} extents' full paths; qemu-img reads at most "
                          f"{QEMU_DESCRIPTOR_MAX} and drops the rest",
                          hint="move the VM folder to a shorter path, or consolidate the disk in VMware")
    return tuple(extents)


def _check_qemu_path(path: Path, name: str, fname: str) -> None:
    """The absolute path must fit, as it is, in an extent line qemu-img parses."""
    raw = os.fsencode(path)
    if b'"' in raw:
        raise SourceError(f"{name}: extent {fname!r} is {str(path)!r}: a path with a double quote cannot "
                          "go into a qemu-img descriptor", hint="rename the file or folder")
    if len(raw) > QEMU_PATH_MAX:
        raise SourceError(f"{name}: extent {fname!r} has a {len(raw)}-byte path ({path}); qemu-img "
                          f"reads at most {QEMU_PATH_MAX} bytes of an extent's path",
                          hint="move the VM folder to a shorter path")


_SPARSE_CHECKS = {
    ExtentKind.SPARSE: lambda path, name: check_sparse_extent(path, name).capacity,
    ExtentKind.VMFSSPARSE: check_cowd_extent,
    ExtentKind.SESPARSE: check_sesparse_extent,
}
