"""VMDK's binary extents, checked before qemu-img reads them: the hosted sparse header (KDMV, also
streamOptimized), VMFS's COWD (vmfsSparse) and seSparse, each header sane and its tables inside the file.

Not for: the text descriptor that names the extents (``vmdk``).
"""

from __future__ import annotations

import array
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import SourceError
from .files import open_regular
from .model import SECTOR

KDMV = b"KDMV"
COWD = b"COWD"
SESPARSE_MAGIC = 0x00000000CAFEBABE

FLAG_COMPRESSED = 0x10000
COMPRESSION_DEFLATE = 1
# VMFS6's limit is 62 TiB; leave headroom but refuse what no VMware wrote.
MAX_CAPACITY = 64 << 40

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
