"""seSparse delta extents checked against their real layout (qemu's
VMDKSESparseConstHeader): every region the constant header declares lies
inside the file and clear of the others, and every grain table and grain in
use lies inside its region and inside the file. The fixture writes a distinct
value into every offset and size, so a reader that takes one field for
another is caught."""

from __future__ import annotations

import os
import random
import struct
import subprocess
from pathlib import Path

import pytest

import vmdkgen
from conftest import V2P, one_line_error
from v2p.errors import SourceError
from v2p.inspect import inspect_disk

CAPACITY = 80_000  # sectors: three grain tables' worth (16 MiB each), the last one partial
GRAINS = {0: 1, 9_000: 2, 4_200: 3, 9_999: 4}  # grain index -> fill byte; written in this order
REGIONS = ["volatile_header", "journal_header", "journal", "grain_dir", "grain_tables", "free_bitmap", "backmap"]
LABELS = {"volatile_header": "volatile header", "journal_header": "journal header", "journal": "journal",
          "grain_dir": "grain directory", "grain_tables": "grain tables", "free_bitmap": "free bitmap",
          "backmap": "backmap"}


def write(folder: Path, *, backmap: bool = True) -> tuple[Path, Path, dict[str, int]]:
    """A vmfs base of zeros and one seSparse snapshot: (snapshot descriptor, delta file, header)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "disk-flat.vmdk").write_bytes(bytes(CAPACITY * 512))
    vmdkgen.write_descriptor(folder / "disk.vmdk", "vmfs", [f'RW {CAPACITY} VMFS "disk-flat.vmdk"'],
                             vmdkgen.BASE_CID)
    delta = folder / "disk-000001-sesparse.vmdk"
    fields = vmdkgen.write_sesparse_delta(delta, CAPACITY, {i: bytes([b]) * 4096 for i, b in GRAINS.items()},
                                          backmap=backmap)
    top = folder / "disk-000001.vmdk"
    vmdkgen.write_descriptor(top, "seSparse", [f'RW {CAPACITY} SESPARSE "{delta.name}"'], vmdkgen.SNAPSHOT_CID,
                             parent_cid=vmdkgen.BASE_CID, parent_hint="disk.vmdk")
    return top, delta, fields


def refused(top: Path) -> str:
    with pytest.raises(SourceError) as caught:
        inspect_disk(top, check_boot=False)
    return str(caught.value)


def qemu_reads(top: Path) -> bool:
    """Whether qemu-img itself reads the consolidated disk, and reads it right."""
    out = top.with_name("qemu-read.raw")
    proc = subprocess.run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", str(top), str(out)],
                          capture_output=True, text=True)
    if proc.returncode:
        return False
    expected = bytearray(CAPACITY * 512)
    for index, fill in GRAINS.items():
        expected[index * 4096:(index + 1) * 4096] = bytes([fill]) * 4096
    assert out.read_bytes() == expected
    return True


def test_fixture_writes_a_distinct_value_into_every_offset_and_size(tmp_path):
    _top, delta, fields = write(tmp_path)
    layout = [fields[name] for name in vmdkgen.SESPARSE_FIELDS[10:]]
    assert len(set(layout)) == len(layout) == 16
    assert not set(layout) & {fields["capacity"], fields["grain_size"], fields["grain_table_size"], 0}
    # the header on disk holds exactly these values, in qemu's field order
    values = struct.unpack_from(f"<{len(vmdkgen.SESPARSE_FIELDS)}Q", delta.read_bytes())
    assert dict(zip(vmdkgen.SESPARSE_FIELDS, values, strict=True)) == fields


def test_valid_sesparse_is_accepted_and_qemu_agrees(tmp_path):
    top, _delta, _fields = write(tmp_path)
    image = inspect_disk(top, check_boot=False)
    assert image.flavor == "seSparse" and len(image.chain) == 2
    assert qemu_reads(top)


def test_valid_sesparse_with_zero_backmap_fields_migrates_byte_exact(tmp_path, v2p: V2P):
    """Read from the backmap fields, the old check found the grain directory at 0 and refused."""
    rng = random.Random(16)
    base = rng.randbytes(8 << 20)
    changes = {0: rng.randbytes(5000), (3 << 20) + 77: rng.randbytes(9000), (8 << 20) - 4096: b"end" * 1000}
    top, expected = vmdkgen.make_chain(tmp_path / "vm", base, "seSparse", changes, backmap=False)
    delta = tmp_path / "vm" / "disk-000001-sesparse.vmdk"
    assert struct.unpack_from("<2Q", delta.read_bytes(), vmdkgen.SESPARSE_FIELDS.index("backmap_offset") * 8) \
        == (0, 0)
    proc = v2p("migrate", str(top), "--vmid", "171", "--format", "raw", "--no-boot-check")
    assert proc.returncode == 0, proc.stderr
    assert v2p.disk(171, "raw").read_bytes() == expected != base


def test_truncated_sesparse_is_refused_though_its_backmap_fits(tmp_path, v2p: V2P):
    top, delta, fields = write(tmp_path)
    size = delta.stat().st_size
    with open(delta, "r+b") as out:
        out.truncate(size - 4096)  # the last grain written is gone; the metadata is whole
    assert (fields["backmap_offset"] + fields["backmap_size"]) * 512 <= size - 4096
    message = refused(top)
    assert delta.name in message and "past the end" in message and "cut short" in message
    line = one_line_error(v2p("migrate", str(top), "--vmid", "172", "--no-boot-check"))
    assert delta.name in line and "cut short" in line


@pytest.mark.parametrize("region", REGIONS)
def test_each_region_past_the_end_of_the_file_is_refused(tmp_path, region):
    top, delta, fields = write(tmp_path)
    sectors = delta.stat().st_size // 512
    # the region now ends one sector past the end of the file
    vmdkgen.set_sesparse_field(delta, f"{region}_offset", sectors - fields[f"{region}_size"] + 1)
    message = refused(top)
    assert f"seSparse {LABELS[region]} " in message and "past the end" in message, message


@pytest.mark.parametrize("region", REGIONS)
def test_each_region_overlapping_another_is_refused(tmp_path, region):
    top, delta, fields = write(tmp_path)
    # moved one sector into the region before it (the volatile header into the constant header)
    vmdkgen.set_sesparse_field(delta, f"{region}_offset", fields[f"{region}_offset"] - 1)
    message = refused(top)
    assert "overlap" in message and LABELS[region] in message, message


def test_grains_region_overlapping_the_metadata_is_refused(tmp_path):
    top, delta, fields = write(tmp_path)
    vmdkgen.set_sesparse_field(delta, "grains_offset", fields["backmap_offset"] + 1)
    assert "backmap and grains overlap" in refused(top)


def test_a_grain_past_the_declared_grains_region_is_refused(tmp_path):
    top, delta, _fields = write(tmp_path)
    vmdkgen.set_sesparse_field(delta, "grains_size", 3 * 8)  # four grains are in use
    message = refused(top)
    assert "grain 3 lies past the 24-sector grains region" in message, message


def test_a_grain_table_past_the_declared_grain_tables_region_is_refused(tmp_path):
    top, delta, _fields = write(tmp_path)
    vmdkgen.set_sesparse_field(delta, "grain_tables_size", 64)  # tables 0, 1 and 2 are in use
    assert "points at grain table 2, past the 64-sector grain tables region" in refused(top)


def test_a_grain_directory_too_small_for_the_capacity_is_refused(tmp_path):
    top, delta, _fields = write(tmp_path)
    vmdkgen.set_sesparse_field(delta, "grain_dir_size", 0)
    assert "empty grain directory" in refused(top)


def test_the_grains_region_may_extend_past_the_file(tmp_path):
    """ESX declares the grains region at the full capacity and grows the file as grains are written."""
    top, delta, fields = write(tmp_path)
    assert (fields["grains_offset"] + fields["grains_size"]) * 512 > delta.stat().st_size
    inspect_disk(top, check_boot=False)
    assert qemu_reads(top)


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("flags", 1, "flags 0x1"),
    ("reserved1", 0x200, "reserved1 0x200"),
])
def test_header_variants_qemu_cannot_read_are_refused(tmp_path, field, value, reason):
    top, delta, _fields = write(tmp_path)
    vmdkgen.set_sesparse_field(delta, field, value)
    assert not qemu_reads(top)
    message = refused(top)
    assert reason in message and "qemu-img cannot read" in message


def test_dirty_journal_is_refused(tmp_path):
    top, delta, fields = write(tmp_path)
    with open(delta, "r+b") as out:
        out.seek(fields["volatile_header_offset"] * 512 + 24)  # replay_journal
        out.write(struct.pack("<Q", 1))
    assert not qemu_reads(top)
    assert "journal still needs replaying" in refused(top)


def test_unknown_grain_table_entry_is_refused(tmp_path):
    top, delta, fields = write(tmp_path)
    with open(delta, "r+b") as out:
        out.seek(fields["grain_tables_offset"] * 512 + 8 * 5)  # table 0, entry 5
        out.write(struct.pack("<Q", 0x5000000000000000))
    assert "entry of unknown type" in refused(top)


def test_big_grain_tables_are_checked_quickly(tmp_path):
    """A 64 GiB delta with every grain of its first 256 tables allocated (1 Mi grains) inspects in a
    second or two: the grain tables are checked a byte column at a time, not an entry at a time."""

    capacity = 64 << 21  # 64 GiB in sectors
    grains = 256 * 4096
    delta = tmp_path / "big-sesparse.vmdk"
    # the tables are written by hand, the grains left as a hole: their placement is what is checked
    fields = vmdkgen.write_sesparse_delta(delta, capacity, {0: bytes(4096)})
    with open(delta, "r+b") as out:
        gd = [vmdkgen.SESPARSE_GD_ALLOCATED | n for n in range(256)]
        out.seek(fields["grain_dir_offset"] * 512)
        out.write(struct.pack(f"<{len(gd)}Q", *gd))
        out.seek(fields["grain_tables_offset"] * 512)
        for table in range(256):
            out.write(struct.pack("<4096Q", *(vmdkgen._sesparse_gte(table * 4096 + i) for i in range(4096))))
        out.truncate((fields["grains_offset"] + grains * 8) * 512)
    vmdkgen.set_sesparse_field(delta, "grains_size", grains * 8)
    from v2p.inspect import vmdk

    assert vmdk.check_sesparse_extent(delta, delta.name) == capacity  # seconds: bench/speed_claims.py
    os.truncate(delta, (fields["grains_offset"] + grains * 8 - 1) * 512)
    with pytest.raises(SourceError, match="grain 1048575 lies past the end"):
        vmdk.check_sesparse_extent(delta, delta.name)
