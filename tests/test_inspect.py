"""``v2p inspect`` tells every sample flavor apart (header reads only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FLAVORS, one_line_error


@pytest.mark.parametrize("flavor", FLAVORS)
def test_inspect_names_flavor_and_capacity(flavor, manifest, source_of, inproc):
    src = source_of(flavor)
    proc = inproc("inspect", str(src.descriptor), "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["flavor"] == manifest["flavors"][flavor]["flavor"]
    assert row["capacity"] == manifest["virtual_size"]
    assert row["format"] == "vmdk"
    # a monolithic file is its own (one) extent
    assert [Path(e["path"]) for e in row["extents"]] == \
        [(src.folder / Path(p).name).resolve() for p in manifest["flavors"][flavor]["extents"]]
    assert sum(e["sectors"] for e in row["extents"]) == manifest["sectors"]


def test_inspect_text_output(source_of, inproc):
    src = source_of("esxi")
    proc = inproc("inspect", str(src.descriptor))
    assert proc.returncode == 0, proc.stderr
    assert "flavor:    vmfs" in proc.stdout
    assert "capacity:  33554432 bytes" in proc.stdout
    assert "extent:    VMFS 65536 sectors esxi-flat.vmdk" in proc.stdout
    assert "adapter:   lsilogic" in proc.stdout
    assert "boot:      mbr" in proc.stdout and "verdict:   ok" in proc.stdout
    assert "note:      esxi.vmdk describes flat (raw) extents; converting them as raw data" in proc.stdout


def test_flat_extent_alone_is_raw_with_a_warning(source_of, inproc):
    src = source_of("esxi")
    proc = inproc("inspect", str(src.folder / "esxi-flat.vmdk"))
    assert proc.returncode == 0, proc.stderr
    assert "flavor:    flat extent" in proc.stdout
    assert "no VMDK descriptor found" in proc.stdout and "esxi.vmdk is beside it" in proc.stdout


def test_qcow2_is_named_and_taken_as_qcow2(tmp_path, manifest, samples, inproc):
    import subprocess

    out = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(samples / "guest.raw"), str(out)],
                   check=True)
    (row,) = json.loads(inproc("inspect", str(out), "--json").stdout)
    assert (row["flavor"], row["format"], row["capacity"]) == ("qcow2", "qcow2", manifest["virtual_size"])


def test_absolute_extent_is_refused(tmp_path, inproc):
    desc = tmp_path / "abs.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\nRW 8 FLAT "/etc/passwd" 0\n')
    line = one_line_error(inproc("inspect", str(desc)))
    assert "'/etc/passwd' is absolute: refused" in line


@pytest.mark.usefixtures("boots")
@pytest.mark.parametrize(("fmt", "options", "flavor", "magic", "rounded"), [
    # qemu's VHD writer rounds the size up to a CHS geometry; the other formats keep it exactly
    ("vpc", ["-o", "subformat=fixed"], "vhd", "DOS/MBR boot sector", True),
    ("vpc", [], "vhd", "Microsoft Disk Image", True),
    ("vhdx", [], "vhdx", "Microsoft Disk Image eXtended", False),
    ("vdi", [], "vdi", "VirtualBox Disk Image", False),
    ("qcow2", [], "qcow2", "QEMU QCOW", False),
])
def test_other_formats_are_named_and_converted_as_themselves(fmt, options, flavor, magic, rounded, tmp_path, inproc,
                                                              samples, manifest):
    import subprocess

    from conftest import guest_report

    image = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, *options, str(samples / "guest.raw"),
                    str(image)], check=True)
    (row,) = json.loads(inproc("inspect", "--json", str(image)).stdout)
    assert (row["flavor"], row["format"], row["verdict"]) == (flavor, fmt, "ok")
    assert (row["capacity"] > manifest["virtual_size"]) if rounded else (row["capacity"] == manifest["virtual_size"])
    assert magic in row["magic"]  # libmagic calls a fixed VHD an MBR disk: the parser knows better
    assert f"not a VMDK but a {flavor} image" in row["notes"][0]
    proc = inproc("migrate", str(image), "--vmid", "170", "--os", "l26", "--format", "raw")
    assert proc.returncode == 0, proc.stderr
    controller, _pci, marker = guest_report(inproc.serial(170))
    assert controller == "virtio-scsi"
    disk = inproc.disk(170, "raw").read_bytes()
    raw = (samples / "guest.raw").read_bytes()
    assert len(disk) == row["capacity"]
    assert disk[: len(raw)] == raw and not disk[len(raw):].strip(b"\0")  # a rounded-up tail is zeros
    # the guest reads the disk's last sector: past the marker (zeros) when the size was rounded up
    assert marker == ("<none>" if rounded else manifest["marker"])


@pytest.mark.parametrize("zeroed_grain", ["off", "on"])
def test_sparse_header_versions(zeroed_grain, tmp_path, inproc, samples):
    import subprocess

    out = tmp_path / "d.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"zeroed_grain={zeroed_grain}",
                    str(samples / "guest.raw"), str(out)], check=True)
    (row,) = json.loads(inproc("inspect", "--json", str(out)).stdout)
    assert row["header"]["version"] == (2 if zeroed_grain == "on" else 1)
    assert row["magic"].startswith("VMware4 disk image")
    assert row["flavor"] == "monolithicSparse"


def test_no_boot_signature_warns_and_suggests_preallocated_export(tmp_path, inproc):
    import subprocess

    raw = tmp_path / "data.raw"
    data = bytearray(4 << 20)
    data[1080:1082] = b"\x53\xef"  # an ext2 file system straight on the disk
    raw.write_bytes(bytes(data))
    sparse = tmp_path / "data.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(raw), str(sparse)], check=True)
    for path, growable in ((raw, False), (sparse, True)):
        (row,) = json.loads(inproc("inspect", "--json", str(path)).stdout)
        assert row["boot_signature"] == "none" and row["verdict"] == "warning"
        text = " ".join(row["warnings"])
        assert "no MBR or GPT boot signature" in text
        assert ("re-export it from VMware as a preallocated disk" in text) == growable


def test_gpt_disk_is_recognised(tmp_path, inproc):
    disk = bytearray(1 << 20)
    disk[510:512] = b"\x55\xaa"
    disk[512:520] = b"EFI PART"
    path = tmp_path / "gpt.raw"
    path.write_bytes(bytes(disk))
    (row,) = json.loads(inproc("inspect", "--json", str(path)).stdout)
    assert row["boot_signature"] == "gpt"


def test_folder_rows_hide_extents_and_show_refusals(tmp_path, inproc, samples):
    import shutil

    folder = tmp_path / "vm"
    shutil.copytree(samples / "twoGbMaxExtentFlat", folder)
    (folder / "broken.vmdk").write_text('# Disk DescriptorFile\ncreateType="vmfs"\nRW 8 VMFS "/etc/passwd"\n')
    (folder / "web01.nvram").write_bytes(b"NVRAM!!\n")  # not a disk: no row (a .vmx makes it a VM folder)
    proc = inproc("inspect", "--json", str(folder))
    rows = json.loads(proc.stdout)
    names = {r["path"].split("/")[-1]: r for r in rows}
    assert set(names) == {"twoGbMaxExtentFlat.vmdk", "broken.vmdk"}
    assert names["twoGbMaxExtentFlat.vmdk"]["verdict"] == "ok"
    assert names["broken.vmdk"]["verdict"] == "refused" and "absolute" in names["broken.vmdk"]["reason"]
    assert proc.returncode != 0 and "absolute: refused" in proc.stderr


def test_two_tib_sparse_header_inspects_in_milliseconds(tmp_path):
    """It reads the header and the grain directory, not the 128 MiB of grain tables
    (bench/speed_claims.py times it: milliseconds)."""
    import subprocess

    from v2p.inspect import inspect_disk

    def bytes_read() -> int:  # by this process, through read(2) and the like
        return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                        if line.startswith("rchar:")).split()[1])

    path = tmp_path / "big.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(path), "2T"], check=True)
    before = bytes_read()
    image = inspect_disk(path)
    read = bytes_read() - before
    assert image.capacity == 2 << 40 and image.flavor == "monolithicSparse"
    assert read < 64 << 20, read
