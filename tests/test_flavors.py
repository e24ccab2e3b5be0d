"""Flavors beyond what qemu-img writes: hand-written descriptors of every
createType v2p takes, multi-extent splits, snapshot chains (ESX vmfsSparse and
seSparse deltas, a Workstation hosted-sparse snapshot). Each is inspected,
migrated, and compared byte for byte; chains boot and the guest reports the
snapshot's own last-sector marker."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import vmdkgen
from conftest import V2P, guest_report

SNAP_MARKER = b"V2P-SNAPSHOT-LAST-SECTOR-OK"
DESC = '# Disk DescriptorFile\nversion=1\nCID=0badcafe\nparentCID=ffffffff\ncreateType="{ct}"\n{extents}\n' \
       'ddb.adapterType = "lsilogic"\nddb.virtualHWVersion = "14"\nddb.thinProvisioned = "1"\n' \
       'ddb.uuid = "60 00 C2 9a"\nddb.geometry.cylinders = "4"\nddb.geometry.heads = "255"\n' \
       'ddb.geometry.sectors = "63"\n'


@pytest.fixture(scope="session")
def guest_raw(samples: Path) -> bytes:
    return (samples / "guest.raw").read_bytes()


def inspect_json(v2p: V2P, path: Path) -> dict:
    proc = v2p("inspect", "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    return row


def migrate_raw(v2p: V2P, path: Path, vmid: int, *extra: str) -> bytes:
    proc = v2p("migrate", str(path), "--vmid", str(vmid), "--format", "raw", *extra)
    assert proc.returncode == 0, proc.stderr
    return v2p.disk(vmid, "raw").read_bytes()


def split(folder: Path, data: bytes, sizes: list[int], name: str) -> list[tuple[str, int]]:
    """Cut ``data`` into files of ``sizes`` bytes: [(file name, sectors)]."""
    out, at = [], 0
    for index, size in enumerate(sizes, start=1):
        fname = f"{name}-f{index:03d}.vmdk"
        (folder / fname).write_bytes(data[at:at + size])
        out.append((fname, size // 512))
        at += size
    assert at == len(data)
    return out


@pytest.mark.parametrize(("create_type", "kind", "flavor"), [
    ("vmfs", "VMFS", "vmfs"),
    ("vmfsThin", "VMFS", "vmfsThin"),
    ("vmfsEagerZeroedThick", "VMFS", "vmfsEagerZeroedThick"),
    ("vmfsPreallocated", "VMFS", "vmfs"),
    ("monolithicFlat", "FLAT", "monolithicFlat"),
])
def test_single_raw_extent_create_types(create_type, kind, flavor, tmp_path, v2p, guest_raw):
    folder = tmp_path / "vm"
    folder.mkdir()
    (folder / "d-flat.vmdk").write_bytes(guest_raw)
    path = folder / "d.vmdk"
    path.write_text(DESC.format(ct=create_type, extents=f'RW 65536 {kind} "d-flat.vmdk"'))
    row = inspect_json(v2p, path)
    assert (row["flavor"], row["capacity"], row["adapter_type"]) == (flavor, 33554432, "lsilogic")
    assert row["ddb"]["ddb.thinprovisioned"] == "1" and row["ddb"]["ddb.virtualhwversion"] == "14"
    assert row["boot_signature"] == "mbr"
    assert migrate_raw(v2p, path, 160, "--no-boot-check") == guest_raw


def test_two_gb_max_extent_flat_with_several_extents_and_a_zero_extent(tmp_path, v2p, guest_raw):
    folder = tmp_path / "vm"
    folder.mkdir()
    data = guest_raw
    parts = split(folder, data[: 24 << 20], [8 << 20, 8 << 20, 8 << 20], "d")
    # the disk's last 8 MiB as one file at an offset, and a ZERO extent in between
    tail = data[24 << 20:]
    (folder / "d-tail.vmdk").write_bytes(bytes(4096) + tail)
    lines = [f'RW {sectors} FLAT "{name}" 0' for name, sectors in parts[:2]]
    lines.append("RW 16384 ZERO")
    lines.append(f'RW {len(tail) // 512} FLAT "d-tail.vmdk" 8')
    path = folder / "d.vmdk"
    path.write_text(DESC.format(ct="twoGbMaxExtentFlat", extents="\n".join(lines)))
    expected = data[: 16 << 20] + bytes(8 << 20) + tail
    row = inspect_json(v2p, path)
    assert [e["kind"] for e in row["extents"]] == ["FLAT", "FLAT", "ZERO", "FLAT"]
    assert row["capacity"] == len(expected)
    assert migrate_raw(v2p, path, 161, "--no-boot-check") == expected


def test_two_gb_max_extent_sparse_with_several_extents(tmp_path, v2p, guest_raw):
    folder = tmp_path / "vm"
    folder.mkdir()
    data = guest_raw
    lines = []
    for name, sectors in split(tmp_path, data, [4 << 20, 12 << 20, 16 << 20], "part"):
        extent = f"d-s{len(lines) + 1:03d}.vmdk"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(tmp_path / name),
                        str(folder / extent)], check=True)
        lines.append(f'RW {sectors} SPARSE "{extent}"')
    path = folder / "d.vmdk"
    path.write_text(DESC.format(ct="twoGbMaxExtentSparse", extents="\n".join(lines)))
    row = inspect_json(v2p, path)
    assert row["flavor"] == "twoGbMaxExtentSparse" and len(row["extents"]) == 3
    proc = v2p("migrate", str(path), "--vmid", "162", "--os", "l26")
    assert proc.returncode == 0, proc.stderr
    assert guest_report(v2p.serial(162))[2] == "V2P-LAST-SECTOR-32MiB-OK"


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_five_gib_split_by_qemu_img_boots_and_reads_its_last_sector(subformat, tmp_path, v2p, guest_raw):
    raw = tmp_path / "big.raw"
    size = 5 << 30
    with open(raw, "wb") as handle:
        handle.write(guest_raw[: -512])
        handle.truncate(size)
        handle.seek(size - 512)
        handle.write(b"V2P-LAST-SECTOR-5GiB-OK".ljust(512, b"\0"))
    folder = tmp_path / "vm"
    folder.mkdir()
    path = folder / "big.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}",
                    str(raw), str(path)], check=True)
    row = inspect_json(v2p, path)
    assert row["flavor"] == subformat and len(row["extents"]) == 3 and row["capacity"] == size
    proc = v2p("migrate", str(path), "--vmid", "163", "--os", "l26")
    assert proc.returncode == 0, proc.stderr
    assert guest_report(v2p.serial(163)) == ("virtio-scsi", "1af4:1004", "V2P-LAST-SECTOR-5GiB-OK")
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw),
                              str(v2p.disk(163))], capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout


def snapshot_changes() -> dict[int, bytes]:
    last = (32 << 20) - 512
    return {
        1 << 20: b"snapshot data " * 300,        # inside the base's data region
        (8 << 20) + 100: b"\xa5" * 10_000,        # unaligned, over the pattern block
        last: SNAP_MARKER.ljust(512, b"\0"),      # the guest prints this
    }


@pytest.mark.parametrize("kind", ["vmfsSparse", "seSparse"])
def test_esx_snapshot_chain_is_consolidated(kind, tmp_path, v2p, guest_raw):
    top, expected = vmdkgen.make_chain(tmp_path / "vm", guest_raw, kind, snapshot_changes())
    row = inspect_json(v2p, top)
    assert row["flavor"] == kind
    assert [Path(p).name for p in row["chain"]] == ["disk-000001.vmdk", "disk.vmdk"]
    assert row["parent_cid"] == vmdkgen.BASE_CID
    proc = v2p("migrate", str(top), "--vmid", "164", "--os", "l26")
    assert proc.returncode == 0, proc.stderr
    assert "snapshot chain of 2" in proc.stdout
    assert guest_report(v2p.serial(164))[2] == SNAP_MARKER.decode()
    want = tmp_path / "expected.raw"
    want.write_bytes(expected)
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(want),
                              str(v2p.disk(164))], capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_three_level_chain_mixing_delta_kinds(tmp_path, v2p, guest_raw):
    folder = tmp_path / "vm"
    first, expected = vmdkgen.make_chain(folder, guest_raw, "vmfsSparse", {0x200000: b"one" * 200})
    capacity = len(guest_raw) // 512
    grain = 4096
    index = (len(expected) - grain) // grain
    block = bytearray(expected[index * grain:(index + 1) * grain])
    block[-512:] = b"V2P-THIRD-LEVEL-OK".ljust(512, b"\0")
    vmdkgen.write_sesparse_delta(folder / "disk-000002-sesparse.vmdk", capacity, {index: bytes(block)})
    vmdkgen.write_descriptor(folder / "disk-000002.vmdk", "seSparse",
                             [f'RW {capacity} SESPARSE "disk-000002-sesparse.vmdk"'], "0c0c0c0c",
                             parent_cid=vmdkgen.SNAPSHOT_CID, parent_hint=first.name)
    row = inspect_json(v2p, folder / "disk-000002.vmdk")
    assert len(row["chain"]) == 3
    # the folder view shows one disk, with its chain, not three
    proc = v2p("inspect", "--json", str(folder))
    rows = json.loads(proc.stdout)
    assert [Path(r["path"]).name for r in rows] == ["disk-000002.vmdk"]
    proc = v2p("migrate", str(folder / "disk-000002.vmdk"), "--vmid", "165", "--os", "win10")
    assert proc.returncode == 0, proc.stderr
    assert guest_report(v2p.serial(165)) == ("ide", "8086:7010", "V2P-THIRD-LEVEL-OK")


def test_workstation_hosted_sparse_snapshot(tmp_path, v2p, samples, guest_raw):
    folder = tmp_path / "vm"
    folder.mkdir()
    for item in (samples / "monolithicSparse").iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    child = folder / "monolithicSparse-000001.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-b", "monolithicSparse.vmdk", "-F", "vmdk",
                    str(child)], check=True, cwd=folder)
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", f"write -P 0x5a {(32 << 20) - 65536} 65536", str(child)],
                   check=True, capture_output=True)
    row = inspect_json(v2p, child)
    assert row["flavor"] == "monolithicSparse" and len(row["chain"]) == 2
    disk = migrate_raw(v2p, child, 166, "--no-boot-check")
    assert disk == guest_raw[: -65536] + b"\x5a" * 65536


def vmware_stream_optimized(samples: Path, folder: Path) -> Path:
    """qemu's streamOptimized rewritten the way VMware writes it: gdOffset
    GD_AT_END in the header, the real header as a footer before the EOS marker."""
    data = bytearray((samples / "streamOptimized" / "streamOptimized.vmdk").read_bytes())
    header = bytes(data[:512])
    data[56:64] = b"\xff" * 8
    footer_marker = (1).to_bytes(8, "little") + (0).to_bytes(4, "little") + (3).to_bytes(4, "little")
    data += footer_marker.ljust(512, b"\0") + header + bytes(512)
    path = folder / "exported.vmdk"
    path.write_bytes(bytes(data))
    return path


def test_vmware_stream_optimized_with_footer(tmp_path, v2p, samples):
    path = vmware_stream_optimized(samples, tmp_path)
    row = inspect_json(v2p, path)
    assert row["flavor"] == "streamOptimized" and row["boot_signature"] == "mbr"
    proc = v2p("migrate", str(path), "--vmid", "167", "--os", "win7")
    assert proc.returncode == 0, proc.stderr
    assert guest_report(v2p.serial(167)) == ("ide", "8086:7010", "V2P-LAST-SECTOR-32MiB-OK")


def test_embedded_parent_hint_without_parent_cid_is_not_followed(tmp_path, v2p, samples, guest_raw):
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"V2P-SECRET-OUTSIDE-" * 2000)
    folder = tmp_path / "vm"
    folder.mkdir()
    data = bytearray((samples / "monolithicSparse" / "monolithicSparse.vmdk").read_bytes())
    at = data.find(b"createType=")
    hint = f'parentFileNameHint="{secret}"\n'.encode()
    data[at:at] = hint
    del data[at + len(hint) + 400: at + len(hint) * 2 + 400]  # keep the file's layout
    path = folder / "d.vmdk"
    path.write_bytes(bytes(data))
    disk = migrate_raw(v2p, path, 168, "--no-boot-check")
    assert b"V2P-SECRET-OUTSIDE-" not in disk
    assert disk == guest_raw


@pytest.mark.parametrize(("create_type", "sample"), [
    ("monolithicSparse", "monolithicSparse"), ("streamOptimized", "streamOptimized")])
def test_text_descriptor_over_a_sparse_file(create_type, sample, tmp_path, v2p, samples, guest_raw):
    folder = tmp_path / "vm"
    folder.mkdir()
    (folder / "data.vmdk").write_bytes((samples / sample / f"{sample}.vmdk").read_bytes())
    path = folder / "d.vmdk"
    path.write_text(DESC.format(ct=create_type, extents='RW 65536 SPARSE "data.vmdk"'))
    row = inspect_json(v2p, path)
    assert row["flavor"] == create_type
    assert migrate_raw(v2p, path, 169, "--no-boot-check") == guest_raw
