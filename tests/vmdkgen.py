"""Test-fixture generator for VMware ESX snapshot (delta) disks.

This is test support code, not part of v2p. ``qemu-img`` can read ESX snapshot
deltas ("vmfsSparse" COWD extents and "seSparse" extents) but cannot write
them, so the tests build them here with the standard library alone:

* :func:`write_cowd_delta` writes a vmfsSparse delta extent (``*-delta.vmdk``);
* :func:`write_sesparse_delta` writes a seSparse delta extent (``*-sesparse.vmdk``);
* :func:`write_descriptor` writes a text descriptor;
* :func:`make_chain` builds a base ``vmfs`` disk plus one snapshot on top of it
  and returns what the consolidated disk must read as.

The layouts follow what qemu's ``block/vmdk.c`` reads (``vmdk_open_vmfs_sparse``,
``vmdk_open_se_sparse`` and the checks there) and the COWD description in
libvmdk's "VMWare Virtual Disk Format (VMDK)" notes. qemu opens these extents
read-only, and only through a descriptor naming them.

In both writers ``grains`` maps a *grain index* (guest byte offset divided by
the grain size) to exactly one grain of data. Grains absent from the mapping
are unallocated and read from the parent. Grains (and, for seSparse, grain
tables) are placed in the file in the mapping's iteration order, so a test can
make the physical order differ from the guest order.

Run ``python tests/vmdkgen.py`` for a self-test against the installed qemu-img.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

SECTOR = 512

# --- vmfsSparse (COWD, "VMDK3" in qemu) -----------------------------------
COWD_MAGIC = b"COWD"  # qemu compares the first 4 bytes big-endian with 'C''O''W''D'
COWD_VERSION = 1
COWD_FLAGS = 3  # what ESX writes (libvmdk); qemu ignores it
COWD_HEADER_SECTORS = 4  # the header is 2048 bytes; the grain directory follows at sector 4
COWD_GT_ENTRIES = 4096  # fixed: qemu passes l2_size=4096 whatever the header says
COWD_GT_SECTORS = COWD_GT_ENTRIES * 4 // SECTOR  # 32 sectors = 16 KiB per grain table
COWD_DEFAULT_GRAIN_SECTORS = 1  # ESX vmfsSparse grains are one 512-byte sector
# magic, version, flags, capacity, grain, gd offset, gd entries, next free sector
_COWD_HEAD = struct.Struct("<4sIIIIIII")

# --- seSparse ----------------------------------------------------------------
SESPARSE_CONST_MAGIC = 0x00000000CAFEBABE
SESPARSE_VOLATILE_MAGIC = 0x00000000CAFECAFE
SESPARSE_VERSION = 0x0000000200000001  # qemu refuses anything else
SESPARSE_GRAIN_SECTORS = 8  # 4 KiB grains: qemu refuses anything else
SESPARSE_GT_SECTORS = 64  # 32 KiB grain tables: qemu refuses anything else
SESPARSE_GT_ENTRIES = SESPARSE_GT_SECTORS * SECTOR // 8  # 4096 u64 entries, 16 MiB of guest each
SESPARSE_GD_ALLOCATED = 0x1000000000000000  # GD entry: top nibble 1, low 32 bits = GT index
SESPARSE_GTE_ALLOCATED = 0x3000000000000000  # GT entry: top nibble 3, grain index scrambled below
# The constant header (qemu's VMDKSESparseConstHeader): these u64 fields, then 304 zero bytes.
SESPARSE_FIELDS = (
    "magic", "version", "capacity", "grain_size", "grain_table_size", "flags",
    "reserved1", "reserved2", "reserved3", "reserved4",
    "volatile_header_offset", "volatile_header_size", "journal_header_offset", "journal_header_size",
    "journal_offset", "journal_size", "grain_dir_offset", "grain_dir_size",
    "grain_tables_offset", "grain_tables_size", "free_bitmap_offset", "free_bitmap_size",
    "backmap_offset", "backmap_size", "grains_offset", "grains_size",
)
_SESPARSE_CONST = struct.Struct(f"<{len(SESPARSE_FIELDS)}Q304x")
_ALIGN = 8  # the grains start on a 4 KiB boundary here

Kind = Literal["vmfsSparse", "seSparse"]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _align(sectors: int, to: int = _ALIGN) -> int:
    return _ceil_div(sectors, to) * to


def _check_grains(capacity_sectors: int, grain_sectors: int, grains: Mapping[int, bytes]) -> int:
    """Validate ``grains``; return the number of grains the capacity spans."""
    if capacity_sectors <= 0:
        raise ValueError(f"capacity must be positive, not {capacity_sectors} sectors")
    count = _ceil_div(capacity_sectors, grain_sectors)
    size = grain_sectors * SECTOR
    for index, data in grains.items():
        if not 0 <= index < count:
            raise ValueError(f"grain {index} lies outside a {capacity_sectors}-sector disk "
                             f"({count} grains of {size} bytes)")
        if len(data) != size:
            raise ValueError(f"grain {index} holds {len(data)} bytes, a grain is {size}")
    return count


def write_cowd_delta(path: str | os.PathLike[str], capacity_sectors: int, grains: Mapping[int, bytes],
                     grain_sectors: int = COWD_DEFAULT_GRAIN_SECTORS, *,
                     preallocate_gts: bool = False) -> None:
    """Write an ESX vmfsSparse delta extent (COWD) to ``path``.

    ``grains`` maps grain index -> ``grain_sectors * 512`` bytes; grain ``i``
    covers guest bytes ``[i * grain_sectors * 512, (i + 1) * grain_sectors * 512)``.
    With the default ESX grain of one sector the index is simply the guest sector.

    Layout (all offsets in 512-byte sectors, all fields little-endian u32):

    * sector 0-3: 2048-byte header: "COWD", version 1, flags 3, capacity,
      grain size, grain directory offset (4), grain directory entries, next
      free sector; the rest (parent name, generations, name, description,
      dirty flag: libvmdk's layout for a child extent) is left zero;
    * sector 4: the grain directory, ``ceil(capacity / (4096 * grain))``
      entries, each the sector of a grain table or 0 (nothing here: read the
      parent), padded to whole sectors;
    * grain tables, 4096 entries (32 sectors) each, each entry the sector of a
      grain or 0. Only tables covering some grain are written unless
      ``preallocate_gts`` is true, in which case every table is;
    * the grains, in ``grains`` iteration order.
    """
    if grain_sectors <= 0 or grain_sectors > 0x200000:
        raise ValueError(f"grain of {grain_sectors} sectors: qemu accepts 1..{0x200000}")
    _check_grains(capacity_sectors, grain_sectors, grains)
    gt_span = COWD_GT_ENTRIES * grain_sectors  # guest sectors one grain table covers
    gd_entries = _ceil_div(capacity_sectors, gt_span)
    gd_offset = COWD_HEADER_SECTORS
    gd_sectors = _ceil_div(gd_entries * 4, SECTOR)

    used = range(gd_entries) if preallocate_gts else sorted({i // COWD_GT_ENTRIES for i in grains})
    cursor = gd_offset + gd_sectors
    gd = [0] * gd_entries
    tables: dict[int, list[int]] = {}
    for gd_index in used:
        gd[gd_index] = cursor
        tables[gd_index] = [0] * COWD_GT_ENTRIES
        cursor += COWD_GT_SECTORS
    placed: list[bytes] = []
    for index, data in grains.items():
        tables[index // COWD_GT_ENTRIES][index % COWD_GT_ENTRIES] = cursor
        placed.append(data)
        cursor += grain_sectors
    if cursor >= 1 << 32:
        raise ValueError("a COWD file cannot address more than 2 TiB")

    header = bytearray(COWD_HEADER_SECTORS * SECTOR)
    _COWD_HEAD.pack_into(header, 0, COWD_MAGIC, COWD_VERSION, COWD_FLAGS, capacity_sectors,
                         grain_sectors, gd_offset, gd_entries, cursor)
    with open(path, "wb") as out:
        out.write(header)
        out.write(struct.pack(f"<{gd_entries}I", *gd).ljust(gd_sectors * SECTOR, b"\0"))
        for gd_index in used:
            out.write(struct.pack(f"<{COWD_GT_ENTRIES}I", *tables[gd_index]))
        for data in placed:
            out.write(data)


def _sesparse_gte(grain_slot: int) -> int:
    """The GT entry for the grain stored in slot ``grain_slot`` of the grains region.

    qemu decodes bits 48-59 as the low 12 bits of the slot and bits 0-47 as the rest.
    """
    if grain_slot >> 60:
        raise ValueError("grain slot out of range")
    return SESPARSE_GTE_ALLOCATED | ((grain_slot & 0xFFF) << 48) | (grain_slot >> 12)


def write_sesparse_delta(path: str | os.PathLike[str], capacity_sectors: int,
                         grains: Mapping[int, bytes], *, backmap: bool = True) -> dict[str, int]:
    """Write an ESX seSparse delta extent to ``path``; return its constant header's fields.

    ``grains`` maps grain index -> 4096 bytes; grain ``i`` covers guest bytes
    ``[i * 4096, (i + 1) * 4096)``. A capacity that is not a multiple of
    8 sectors leaves the last grain partly past the end; it still takes 4096 bytes.
    With ``backmap`` false the backmap's offset and size are written as 0 (no
    backmap), which qemu accepts as it never reads it.

    Layout (offsets and sizes in the headers are in 512-byte sectors, every
    field little-endian u64), as ESX lays it out (qemu's commit 98eb9733f and
    the hostd.log dump quoted on qemu-devel): every region before the grains is
    preallocated inside the file, the grains region is declared at the full
    capacity and the file ends after the last grain written:

    * sector 0: const header: magic 0xcafebabe, version 0x200000001, capacity,
      grain size 8, grain table size 64, flags 0, four reserved 0, then
      offset/size pairs of the volatile header, journal header, journal,
      grain directory, grain tables, free bitmap, backmap and grains, then
      304 zero bytes (qemu rejects any non-zero flags, reserved or padding);
    * the volatile header: magic 0xcafecafe, next free grain table number,
      next transaction number 1, replay-journal 0 (qemu refuses a dirty
      journal), 480 zero bytes;
    * journal header, journal, free bitmap and backmap: reserved, left zero
      (qemu never reads them);
    * grain directory: ``ceil(capacity / (4096 * 8))`` entries, 0 or
      ``0x1000000000000000 | table number``; table ``n`` sits at
      ``grain tables offset + 64 * n``;
    * grain tables: space for every table is reserved, tables are numbered
      in order of first use; an entry is 0 (read the parent) or
      ``0x3`` in the top nibble with the grain's slot number split as qemu
      decodes it (slot bits 0-11 in entry bits 48-59, slot bits 12+ in 0-47);
      grain slot ``s`` sits at ``grains offset + 8 * s``;
    * grains, in ``grains`` iteration order.

    Every offset and size written differs from every other (and from the
    capacity and the grain and table sizes), regions getting a few spare
    sectors where needed, so a reader that takes one field for another fails.
    """
    grain_count = _check_grains(capacity_sectors, SESPARSE_GRAIN_SECTORS, grains)
    gd_entries = _ceil_div(capacity_sectors, SESPARSE_GT_ENTRIES * SESPARSE_GRAIN_SECTORS)

    taken = {capacity_sectors, SESPARSE_GRAIN_SECTORS, SESPARSE_GT_SECTORS}

    def distinct(value: int) -> int:
        while value in taken:
            value += 1
        taken.add(value)
        return value

    fields: dict[str, int] = {
        "magic": SESPARSE_CONST_MAGIC, "version": SESPARSE_VERSION, "capacity": capacity_sectors,
        "grain_size": SESPARSE_GRAIN_SECTORS, "grain_table_size": SESPARSE_GT_SECTORS,
        "flags": 0, "reserved1": 0, "reserved2": 0, "reserved3": 0, "reserved4": 0,
    }
    cursor = 1
    for region, minimum in (
        ("volatile_header", 1), ("journal_header", 2), ("journal", _ALIGN),
        ("grain_dir", _ceil_div(gd_entries * 8, SECTOR)), ("grain_tables", gd_entries * SESPARSE_GT_SECTORS),
        ("free_bitmap", _ceil_div(_ceil_div(grain_count, 8), SECTOR)),
        ("backmap", _ceil_div(grain_count * 8, SECTOR)),
    ):
        if region == "backmap" and not backmap:
            fields["backmap_offset"] = fields["backmap_size"] = 0
            continue
        fields[f"{region}_offset"] = distinct(cursor)
        fields[f"{region}_size"] = distinct(minimum)
        cursor = fields[f"{region}_offset"] + fields[f"{region}_size"]
    fields["grains_offset"] = distinct(_align(cursor))
    fields["grains_size"] = distinct(_align(capacity_sectors))
    assert list(fields) == list(SESPARSE_FIELDS)

    gd = [0] * gd_entries
    tables: list[list[int]] = []
    for slot, index in enumerate(grains):
        gd_index, gt_index = divmod(index, SESPARSE_GT_ENTRIES)
        if not gd[gd_index]:
            gd[gd_index] = SESPARSE_GD_ALLOCATED | len(tables)
            tables.append([0] * SESPARSE_GT_ENTRIES)
        tables[gd[gd_index] & 0xFFFFFFFF][gt_index] = _sesparse_gte(slot)

    volatile = struct.pack("<4Q", SESPARSE_VOLATILE_MAGIC, len(tables), 1, 0).ljust(SECTOR, b"\0")
    with open(path, "wb") as out:
        out.write(_SESPARSE_CONST.pack(*fields.values()))
        out.seek(fields["volatile_header_offset"] * SECTOR)
        out.write(volatile)
        out.seek(fields["grain_dir_offset"] * SECTOR)
        out.write(struct.pack(f"<{gd_entries}Q", *gd))
        out.seek(fields["grain_tables_offset"] * SECTOR)
        for table in tables:
            out.write(struct.pack(f"<{SESPARSE_GT_ENTRIES}Q", *table))
        out.seek(fields["grains_offset"] * SECTOR)
        for data in grains.values():
            out.write(data)
        # The preallocated regions read as zeros; the file reaches at least the grains region.
        out.truncate(max(out.tell(), fields["grains_offset"] * SECTOR))
    return fields


def set_sesparse_field(path: str | os.PathLike[str], field: str, value: int) -> None:
    """Overwrite one field of the constant header of the seSparse file at ``path``."""
    with open(path, "r+b") as out:
        out.seek(SESPARSE_FIELDS.index(field) * 8)
        out.write(struct.pack("<Q", value))


_EXTENT_SECTORS = re.compile(r"^\s*\S+\s+(\d+)\s")


def write_descriptor(path: str | os.PathLike[str], create_type: str, extents: list[str], cid: str,
                     parent_cid: str = "ffffffff", parent_hint: str | None = None,
                     extra: str = "") -> None:
    """Write a VMware text descriptor to ``path``.

    ``extents`` are whole extent lines, written as given (e.g.
    ``'RW 8192 VMFSSPARSE "disk-000001-delta.vmdk"'``); their sector counts
    are summed for the geometry (SCSI: 255 heads, 63 sectors per track).
    Nothing is validated, so tests can write broken descriptors too. ``extra``
    is appended verbatim after the disk database lines.

    qemu finds keys with ``strstr``: CID must come before parentCID, and
    ``createType="..."`` / ``parentFileNameHint="..."`` must have no spaces
    around ``=``, as written here.
    """
    capacity = 0
    for line in extents:
        match = _EXTENT_SECTORS.match(line)
        if match:
            capacity += int(match.group(1))
    heads, sectors = 255, 63
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        f"CID={cid}",
        f"parentCID={parent_cid}",
        f'createType="{create_type}"',
    ]
    if parent_hint is not None:
        lines.append(f'parentFileNameHint="{parent_hint}"')
    lines += ["", "# Extent description", *extents, "",
              "# The Disk Data Base", "#DDB", "",
              'ddb.adapterType = "lsilogic"',
              f'ddb.geometry.cylinders = "{capacity // (heads * sectors)}"',
              f'ddb.geometry.heads = "{heads}"',
              f'ddb.geometry.sectors = "{sectors}"',
              'ddb.virtualHWVersion = "14"']
    text = "\n".join(lines) + "\n"
    if extra:
        text += extra if extra.endswith("\n") else extra + "\n"
    Path(path).write_text(text, encoding="utf-8")


BASE_CID = "5d1e0b17"
SNAPSHOT_CID = "a7c3e912"


def make_chain(folder: str | os.PathLike[str], base_raw: bytes, kind: Kind,
               changes: Mapping[int, bytes], *, base_cid: str = BASE_CID,
               snapshot_cid: str = SNAPSHOT_CID, backmap: bool = True) -> tuple[Path, bytes]:
    """Build a base disk and one ESX snapshot on it in ``folder``.

    Files: ``disk.vmdk`` (createType "vmfs", ``RW n VMFS "disk-flat.vmdk"``),
    ``disk-flat.vmdk`` (= ``base_raw``), and the snapshot ``disk-000001.vmdk``
    with ``disk-000001-delta.vmdk`` (vmfsSparse, 512-byte grains) or
    ``disk-000001-sesparse.vmdk`` (seSparse, 4 KiB grains), parentCID = the
    base's CID, ``parentFileNameHint="disk.vmdk"``.

    ``changes`` maps a guest *byte offset* to bytes written there in the
    snapshot (any offset and length inside the disk, applied in order). Each
    grain a change touches is stored whole, its untouched bytes copied from
    the base as VMware's copy-on-write does; grains are allocated in order of
    first touch. ``base_raw`` must be a whole number of sectors.

    ``backmap`` is passed on to :func:`write_sesparse_delta`.

    Returns the snapshot descriptor's path and the bytes the consolidated disk
    must equal.
    """
    if not base_raw or len(base_raw) % SECTOR:
        raise ValueError(f"base of {len(base_raw)} bytes is not a positive whole number of sectors")
    if kind == "vmfsSparse":
        grain_bytes, extent_type, extent_name = SECTOR, "VMFSSPARSE", "disk-000001-delta.vmdk"
    elif kind == "seSparse":
        grain_bytes, extent_type, extent_name = (SESPARSE_GRAIN_SECTORS * SECTOR, "SESPARSE",
                                                 "disk-000001-sesparse.vmdk")
    else:
        raise ValueError(f"unknown snapshot kind {kind!r}")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    capacity = len(base_raw) // SECTOR

    (root / "disk-flat.vmdk").write_bytes(base_raw)
    write_descriptor(root / "disk.vmdk", "vmfs", [f'RW {capacity} VMFS "disk-flat.vmdk"'], base_cid)

    expected = bytearray(base_raw)
    touched: dict[int, None] = {}  # ordered set of grain indexes
    for offset, data in changes.items():
        if offset < 0 or offset + len(data) > len(expected):
            raise ValueError(f"change of {len(data)} bytes at {offset} lies outside the "
                             f"{len(expected)}-byte disk")
        if not data:
            continue
        expected[offset:offset + len(data)] = data
        for index in range(offset // grain_bytes, (offset + len(data) - 1) // grain_bytes + 1):
            touched.setdefault(index)
    grains = {index: bytes(expected[index * grain_bytes:(index + 1) * grain_bytes]).ljust(grain_bytes, b"\0")
              for index in touched}

    if kind == "vmfsSparse":
        write_cowd_delta(root / extent_name, capacity, grains)
    else:
        write_sesparse_delta(root / extent_name, capacity, grains, backmap=backmap)
    top = root / "disk-000001.vmdk"
    write_descriptor(top, kind, [f'RW {capacity} {extent_type} "{extent_name}"'], snapshot_cid,
                     parent_cid=base_cid, parent_hint="disk.vmdk")
    return top, bytes(expected)


# --- self-test ------------------------------------------------------------------


def _self_test() -> int:
    import json
    import random
    import subprocess
    import tempfile

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        print("$", " ".join(args))
        done = subprocess.run(args, capture_output=True, text=True)
        print((done.stdout + done.stderr).rstrip())
        return done

    rng = random.Random(20240517)
    mib = 1 << 20
    cases: list[tuple[str, Kind, int, dict[int, bytes]]] = []
    # vmfsSparse: 512-byte grains, a grain table covers 2 MiB -> 2 tables in 4 MiB.
    size = 4 * mib
    cases.append(("cowd-4m", "vmfsSparse", size, {
        2 * mib + 4096: rng.randbytes(8192),        # allocated first, in the second table
        0: rng.randbytes(SECTOR),                    # first grain
        size - SECTOR: rng.randbytes(SECTOR),        # last grain
        2 * mib - 1536: rng.randbytes(3072),         # across the grain-table boundary
        1_000_007: rng.randbytes(100),               # unaligned: partial grains copied from the base
        3 * mib: bytes(4096),                        # zeros over non-zero base data
    }))
    cases.append(("sesparse-4m", "seSparse", size, {
        mib + 4096 * 3: rng.randbytes(3 * 4096),
        0: rng.randbytes(4096),
        size - 4096: rng.randbytes(4096),
        2 * mib - 2048: rng.randbytes(4096),         # straddles two grains
        1_000_007: rng.randbytes(100),
        3 * mib: bytes(4096),
    }))
    # seSparse grain tables cover 16 MiB: 40 MiB + 3 sectors has 3 tables and a partial last grain.
    size = 40 * mib + 3 * SECTOR
    cases.append(("sesparse-40m", "seSparse", size, {
        33 * mib: rng.randbytes(4096),               # third table, allocated first
        16 * mib - 4096: rng.randbytes(8192),        # last grain of table 0 + first of table 1
        0: rng.randbytes(4096),
        size - 3 * SECTOR: rng.randbytes(3 * SECTOR),  # the partial last grain
    }))

    failures = 0
    with tempfile.TemporaryDirectory(prefix="vmdkgen-") as tmp:
        for name, kind, size, changes in cases:
            print(f"\n=== {name}: {kind}, {size} bytes, {len(changes)} changes ===")
            folder = Path(tmp) / name
            base = rng.randbytes(size)
            top, expected = make_chain(folder, base, kind, changes)
            want = folder / "expected.raw"
            want.write_bytes(expected)
            problems: list[str] = []

            info = run("qemu-img", "info", "--backing-chain", str(top))
            if info.returncode:
                problems.append("qemu-img info failed")
            chain_json = subprocess.run(["qemu-img", "info", "--output=json", "--backing-chain", str(top)],
                                        capture_output=True, text=True)
            if chain_json.returncode == 0:
                chain = json.loads(chain_json.stdout)
                if (len(chain) != 2 or chain[0].get("backing-filename") != "disk.vmdk"
                        or chain[0].get("virtual-size") != size
                        or Path(chain[1]["filename"]).name != "disk.vmdk"):
                    problems.append("qemu-img info does not show snapshot -> disk.vmdk")

            compare = run("qemu-img", "compare", "-f", "vmdk", "-F", "raw", str(top), str(want))
            if compare.returncode or "Images are identical." not in compare.stdout:
                problems.append("qemu-img compare: not identical")

            out = folder / "out.raw"
            convert = run("qemu-img", "convert", "-f", "vmdk", "-O", "raw", str(top), str(out))
            if convert.returncode or not out.exists() or out.read_bytes() != expected:
                problems.append("qemu-img convert output differs from the expected bytes")
            elif expected == base:
                problems.append("the snapshot changes nothing: the test proves nothing")
            else:
                print(f"convert: {out.name} == expected ({len(expected)} bytes)")

            for problem in problems:
                print(f"FAIL {name}: {problem}")
            failures += len(problems)
    print("\nall chains OK" if not failures else f"\n{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(_self_test())
