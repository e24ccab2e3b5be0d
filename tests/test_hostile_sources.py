"""Hostile and odd sources answer in one line, and quickly: a .vmx declaring a codec that is not a
text encoding, VMs of thousands of disks or dozens of NICs (.vmx and OVF), an OVA whose raw disk
member is gigabytes. Real files in tmp_path, real qemu-img disks, the real CLI where it matters."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from conftest import V2P, one_line_error
from v2p import api
from v2p.errors import RuleError, SourceError
from v2p.sources.ovf import OvaSource
from v2p.sources.vmx import VmxSource, parse_vmx, sniff

MiB = 1 << 20

BASE_VMX = """\
config.version = "8"
virtualHW.version = "19"
displayName = "box"
guestOS = "ubuntu-64"
memsize = "512"
"""


def qemu_disk(path: Path, size: int = MiB, fmt: str = "vmdk") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
    return path


# -- .encoding -----------------------------------------------------------------------------------------

# Every one of these is a codec Python knows, but none decodes bytes to text line by line: bytes-to-
# bytes transforms, "undefined" (always raises), punycode/idna (host names), UTF-16/32 and ISO-2022
# (a newline is not the byte 0x0a in them).
NOT_TEXT = ["rot13", "hex", "zlib", "base64", "uu", "bz2", "punycode", "undefined", "quopri", "idna",
            "utf-16", "UTF-32-LE", "iso2022_jp", "unicode_escape", "raw_unicode_escape", "utf-7"]


@pytest.mark.parametrize("label", NOT_TEXT)
def test_non_text_encoding_is_refused_in_one_line(label: str) -> None:
    data = f'.encoding = "{label}"\n{BASE_VMX}'.encode()
    with pytest.raises(SourceError) as exc:
        parse_vmx(data, "vm.vmx")
    text = str(exc.value)
    assert "\n" not in text
    assert f"vm.vmx:1: .encoding {label!r} is not a text encoding a .vmx can be written in: refused" in text
    assert sniff(data) is False  # picking a source by content does not raise either


def test_unknown_and_absurd_labels_are_one_line() -> None:
    for label, shown in (("klingon", "'klingon'"), ("x" * 300, repr("x" * 40) + "...")):
        with pytest.raises(SourceError) as exc:
            parse_vmx(f'{BASE_VMX}.encoding = "{label}"\n'.encode(), "vm.vmx")
        assert f"vm.vmx:6: .encoding {shown} is not an encoding v2p knows" in str(exc.value)


@pytest.mark.parametrize(("label", "name"), [("windows-1252", "Caf\u00e9 \u20ac"), ("Shift_JIS", "\u30b5\u30fc\u30d0"),
                                             ("GBK", "\u670d\u52a1\u5668"), ("ISO-8859-2", "Za\u017c\u00f3\u0142"),
                                             ("UTF-8", "caf\u00e9 \u2603")])
def test_text_encodings_vmware_writes_still_read(label: str, name: str) -> None:
    data = f'.encoding = "{label}"\nconfig.version = "8"\n'.encode() + \
        f'displayName = "{name} |22q|22"\n'.encode(label)
    assert parse_vmx(data, "vm.vmx").get("displayName") == f'{name} "q"'


def test_bytes_the_declared_encoding_cannot_decode_are_one_line() -> None:
    data = b'.encoding = "Shift_JIS"\nconfig.version = "8"\ndisplayName = "\x81\x7f"\n'
    with pytest.raises(SourceError) as exc:
        parse_vmx(data, "vm.vmx")
    assert "vm.vmx:3: not shift_jis text (byte 0x81): not a .vmx file" in str(exc.value)


def test_cli_inspect_of_a_rot13_vmx_is_one_line(tmp_path: Path, v2p: V2P) -> None:
    qemu_disk(tmp_path / "d.vmdk")
    vmx = tmp_path / "vm.vmx"
    vmx.write_text(f'.encoding = "rot13"\n{BASE_VMX}scsi0.present = "TRUE"\nscsi0:0.present = "TRUE"\n'
                   'scsi0:0.fileName = "d.vmdk"\n')
    proc = v2p("inspect", str(vmx))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert ".encoding 'rot13' is not a text encoding" in proc.stdout + proc.stderr
    line = one_line_error(v2p("migrate", str(vmx), "--vmid", "120"))
    assert ".encoding 'rot13' is not a text encoding" in line
    assert not (v2p.target / "images").exists()


# -- too many disks / NICs ---------------------------------------------------------------------------


def many_disks_vmx(folder: Path, count: int, *, real: int = 1) -> Path:
    """A .vmx with ``count`` disks: the first ``real`` are qemu-img disks, the rest name files that do
    not exist, so any disk v2p looks at before refusing the count shows as "missing"."""
    lines = [BASE_VMX]
    for index in range(count):
        bus, unit = divmod(index, 100)
        name = f"d{index}.vmdk"
        if index < real:
            qemu_disk(folder / name)
        lines.append(f'scsi{bus}:{unit}.present = "TRUE"\nscsi{bus}:{unit}.fileName = "{name}"\n')
    path = folder / "vm.vmx"
    path.write_text("".join(lines))
    return path


def test_vmx_of_10000_disks_is_refused_before_any_disk_is_read(tmp_path: Path, v2p: V2P) -> None:
    vmx = many_disks_vmx(tmp_path, 10_000)
    with pytest.raises(RuleError) as exc:
        VmxSource(vmx).spec()
    assert "VM box: too-many-disks: 10000 disks, more than any bus holds (SCSI 31)" in str(exc.value)
    report = api.inspect_vm(vmx)
    assert report.verdict == "refused" and isinstance(report.error, RuleError) and not report.disks
    line = one_line_error(v2p("migrate", str(vmx), "--vmid", "120"))
    assert "too-many-disks: 10000 disks" in line and "is missing" not in line


def test_vmx_of_32_disks_is_refused_by_count_31_are_inspected(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(RuleError, match="too-many-disks: 32 disks"):
        VmxSource(many_disks_vmx(tmp_path / "a", 32, real=0)).spec()
    # 31 fit SCSI: every disk is looked at, so the first missing one is what is reported
    with pytest.raises(SourceError, match="disk .d1.vmdk. is missing"):
        VmxSource(many_disks_vmx(tmp_path / "b", 31, real=1)).spec()


def test_disks_on_an_absent_controller_do_not_count(tmp_path: Path) -> None:
    vmx = many_disks_vmx(tmp_path, 31, real=31)
    with vmx.open("a") as out:  # VMware does not show disks on a controller that is not present either
        out.write('scsi0.present = "TRUE"\nscsi1.present = "FALSE"\n')
        out.write("".join(f'scsi1:{unit}.present = "TRUE"\nscsi1:{unit}.fileName = "gone{unit}.vmdk"\n'
                          for unit in range(9)))
    spec = VmxSource(vmx).spec()
    assert len(spec.disks) == 31


def nics_vmx(folder: Path, count: int) -> Path:
    qemu_disk(folder / "d.vmdk")
    text = BASE_VMX + 'scsi0.present = "TRUE"\nscsi0:0.present = "TRUE"\nscsi0:0.fileName = "d.vmdk"\n'
    for port in range(count):
        text += (f'ethernet{port}.present = "TRUE"\nethernet{port}.virtualDev = "vmxnet3"\n'
                 f'ethernet{port}.networkName = "VM Network"\n')
    path = folder / "vm.vmx"
    path.write_text(text)
    return path


def test_vmx_with_40_nics_is_refused_by_a_rule(tmp_path: Path, v2p: V2P) -> None:
    vmx = nics_vmx(tmp_path, 40)
    report = api.inspect_vm(vmx, bridge="vmbr0")
    assert report.verdict == "refused"
    assert "too-many-nics: 40 NICs, more than PVE's net0..net31" in str(report.error)
    line = one_line_error(v2p("migrate", str(vmx), "--vmid", "120", "--bridge", "vmbr0"))
    assert "too-many-nics" in line
    assert not (v2p.target / "images").exists() and not (v2p.target / "qemu-server" / "120.conf").exists()


def test_vmx_with_32_nics_passes(tmp_path: Path) -> None:
    report = api.inspect_vm(nics_vmx(tmp_path, 32), bridge="vmbr0")
    assert report.error is None, report.error
    assert "net31" in report.config and "net32" not in report.config


# -- OVF ---------------------------------------------------------------------------------------------

OVF_HEAD = """\
<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
"""


def ovf_text(disks: int, nics: int, *, disk_size: int = MiB) -> str:
    refs = "".join(f'<File ovf:id="f{i}" ovf:href="d{i}.img"/>' for i in range(disks))
    section = "".join(f'<Disk ovf:diskId="vmdisk{i}" ovf:fileRef="f{i}" ovf:capacity="{disk_size}"/>'
                      for i in range(disks))
    items = ['<Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType>'
             '<rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>',
             '<Item><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>'
             '<rasd:VirtualQuantity>512</rasd:VirtualQuantity></Item>']
    controllers = max(1, -(-disks // 15))
    for c in range(controllers):
        items.append(f'<Item><rasd:InstanceID>c{c}</rasd:InstanceID><rasd:ResourceType>6</rasd:ResourceType>'
                     f'<rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType><rasd:Address>{c}</rasd:Address>'
                     '</Item>')
    for i in range(disks):
        items.append(f'<Item><rasd:InstanceID>disk{i}</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType>'
                     f'<rasd:Parent>c{i // 15}</rasd:Parent><rasd:AddressOnParent>{i % 15}</rasd:AddressOnParent>'
                     f'<rasd:HostResource>ovf:/disk/vmdisk{i}</rasd:HostResource></Item>')
    for n in range(nics):
        items.append(f'<Item><rasd:InstanceID>n{n}</rasd:InstanceID><rasd:ResourceType>10</rasd:ResourceType>'
                     '<rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>'
                     '<rasd:Connection>VM Network</rasd:Connection></Item>')
    return (OVF_HEAD + f"<References>{refs}</References><DiskSection><Info>d</Info>{section}</DiskSection>"
            '<VirtualSystem ovf:id="box"><Info>v</Info><Name>box</Name><VirtualHardwareSection><Info>h</Info>'
            '<System><vssd:VirtualSystemType xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/'
            'CIM_VirtualSystemSettingData">vmx-19</vssd:VirtualSystemType></System>'
            + "".join(items) + "</VirtualHardwareSection></VirtualSystem></Envelope>\n")


def test_ovf_of_10000_disks_is_refused_before_any_file_is_looked_at(tmp_path: Path) -> None:
    # None of the d*.img files exist: a file looked at first would say "missing"
    ovf = tmp_path / "box.ovf"
    ovf.write_text(ovf_text(10_000, 1))
    report = api.inspect_vm(ovf, bridge="vmbr0")
    assert isinstance(report.error, RuleError), report.error
    assert "VM box: too-many-disks: 10000 disks, more than any bus holds (SCSI 31)" in str(report.error)


def test_ovf_of_32_disks_is_refused_by_count(tmp_path: Path) -> None:
    ovf = tmp_path / "box.ovf"
    ovf.write_text(ovf_text(32, 1))
    report = api.inspect_vm(ovf, bridge="vmbr0")
    assert "too-many-disks: 32 disks" in str(report.error)


def test_ovf_with_40_nics_is_refused_by_the_rule(tmp_path: Path, v2p: V2P) -> None:
    ovf = tmp_path / "box.ovf"
    ovf.write_text(ovf_text(1, 40))
    (tmp_path / "d0.img").write_bytes(bytes(510) + b"\x55\xaa" + bytes(MiB - 512))  # an MBR's signature
    report = api.inspect_vm(ovf, bridge="vmbr0")
    assert "too-many-nics: 40 NICs" in str(report.error)
    line = one_line_error(v2p("migrate", str(ovf), "--vmid", "120", "--bridge", "vmbr0"))
    assert "too-many-nics" in line
    ovf.write_text(ovf_text(1, 32))
    assert api.inspect_vm(ovf, bridge="vmbr0").error is None


def test_ovf_of_100000_controllers_is_refused_quickly(tmp_path: Path, v2p: V2P) -> None:
    # Numbering controllers without an Address costs time growing with their square: 100,000 took hours.
    ovf = tmp_path / "box.ovf"
    item = ('<Item><rasd:InstanceID>x</rasd:InstanceID><rasd:ResourceType>6</rasd:ResourceType>'
            '<rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType></Item>')
    text = ovf_text(1, 1).replace("</VirtualHardwareSection>", item * 100_000 + "</VirtualHardwareSection>")
    ovf.write_text(text)
    proc = v2p("inspect", str(ovf), "--bridge", "vmbr0", timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "100005 hardware items, more than 2000: not one VM's hardware: refused" in proc.stdout + proc.stderr


# -- OVA: disk members read in place, checked before their bytes are read ------------------------------

GiB = 1 << 30


def write_ova(path: Path, members: list[tuple[str, bytes | int]], head: bytes = b"") -> Path:
    """A tar built by hand: a member given as an int is that many bytes long, ``head`` first and the
    rest a hole (so a 4 GiB disk member costs no disk space)."""
    with path.open("wb") as out:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            out.write(info.tobuf(format=tarfile.GNU_FORMAT))
            start = out.tell()
            out.write(head if isinstance(data, int) else data)
            out.seek(start + -(-info.size // 512) * 512)
        out.write(bytes(1024))
        out.truncate()
    return path


MBR = bytes(446) + bytes([0x80, 0, 2, 0, 0x83, 0, 0, 0, 1, 0, 0, 0]) + (4096).to_bytes(4, "little") + \
    bytes(48) + b"\x55\xaa"


def disk_ova(folder: Path, member: bytes | int, *, capacity: int, name: str = "box-disk1.img",
             manifest: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ovf = ovf_text(1, 1, disk_size=capacity).replace('ovf:href="d0.img"', f'ovf:href="{name}"').encode()
    members: list[tuple[str, bytes | int]] = [("box.ovf", ovf)]
    if manifest:
        data = member if isinstance(member, bytes) else MBR + bytes(member - len(MBR))
        members.append(("box.mf", f"SHA256(box.ovf)= {hashlib.sha256(ovf).hexdigest()}\n"
                                   f"SHA256({name})= {hashlib.sha256(data).hexdigest()}\n".encode()))
    members.append((name, member))
    return write_ova(folder / "box.ova", members, head=MBR)


def test_ova_raw_member_of_4_gib_is_read_in_place_not_copied(tmp_path: Path) -> None:
    ova = disk_ova(tmp_path / "pkg", 4 * GiB, capacity=4 * GiB)
    assert ova.stat().st_blocks * 512 < 16 * MiB  # the hole really is one
    source = OvaSource(ova)
    disk = source.spec().disks[0]
    work = tmp_path / "work"
    given = source.disk_input(disk, work)
    window = json.loads(given.endpoint.filename.removeprefix("json:"))
    assert given.endpoint.fmt == "raw" and window["driver"] == "raw" and window["size"] == 4 * GiB
    # the archive as first read, pinned (pinned.py): qemu-img gets its open descriptor
    assert window["file"]["driver"] == "file" and window["file"]["filename"].startswith("/dev/fd/")
    assert os.path.samefile(window["file"]["filename"], ova)
    assert given.capacity == 4 * GiB and given.flavor == "raw"
    assert not work.exists(), "the member was copied out"
    # qemu reads exactly the member's bytes through the window: its MBR, then the hole
    proc = subprocess.run(["qemu-img", "dd", "-f", "raw", "-O", "raw", "bs=512", "count=1",
                           f"if={given.endpoint.filename}", f"of={tmp_path / 'mbr'}"], capture_output=True, text=True,
                          pass_fds=given.endpoint.fds)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "mbr").read_bytes() == MBR


def test_cli_inspect_of_a_4_gib_ova_copies_nothing(tmp_path: Path, v2p: V2P) -> None:
    ova = disk_ova(tmp_path / "pkg", 4 * GiB, capacity=4 * GiB)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = v2p("inspect", "--json", str(ova), "--bridge", "vmbr0", TMPDIR=str(scratch))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    row = (report[0] if isinstance(report, list) else report)["disks"][0]
    assert row["capacity"] == 4 * GiB and "read in place" in " ".join(row["notes"])


def test_ova_raw_member_checked_against_the_declared_capacity_first(tmp_path: Path) -> None:
    ova = disk_ova(tmp_path / "pkg", 16 * MiB, capacity=64 * MiB, manifest=True)
    source = OvaSource(ova)
    with pytest.raises(SourceError) as exc:
        source.disk_input(source.spec().disks[0], tmp_path / "work")
    assert (f"{ova}: member box-disk1.img: a raw disk of {16 * MiB} bytes, but the OVF declares a capacity of "
            f"{64 * MiB}: refused") in str(exc.value)
    assert not (tmp_path / "work").exists()


def test_ova_raw_member_still_checked_against_the_manifest(tmp_path: Path) -> None:
    ova = disk_ova(tmp_path / "pkg", 8 * MiB, capacity=8 * MiB, manifest=True)
    source = OvaSource(ova)
    given = source.disk_input(source.spec().disks[0], tmp_path / "work")
    assert given.capacity == 8 * MiB
    # one byte of the member changed inside the archive: the digest no longer matches
    with tarfile.open(ova) as tar:
        offset = tar.getmember("box-disk1.img").offset_data
    with ova.open("r+b") as out:
        out.seek(offset + 4 * MiB)
        out.write(b"\x01")
    source = OvaSource(ova)
    with pytest.raises(SourceError, match="box-disk1.img: its SHA256 does not match the manifest"):
        source.disk_input(source.spec().disks[0], tmp_path / "work")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(("member", "says"), [
    (b"QFI\xfb" + bytes([0, 0, 0, 3]) + (512).to_bytes(8, "big") + bytes(60), "is a qcow2 image with a backing file"),
    (b"QFI\xfb" + bytes([0, 0, 0, 3]) + bytes(24) + (1).to_bytes(4, "big") + bytes(40), "is an encrypted qcow2"),
    (b"COWD" + bytes(508), "is an ESX snapshot delta extent"),
    (bytes(4096), "with no boot sector, partition table or file system: not a disk image"),
    (MBR + bytes(100), "not a whole number of 512-byte sectors"),
    (b"", "is empty (0 bytes)"),
], ids=["qcow2-backing", "qcow2-encrypted", "cowd-delta", "zeros", "odd-size", "empty"])
def test_ova_member_refused_from_its_header_nothing_staged(member: bytes, says: str, tmp_path: Path) -> None:
    ova = disk_ova(tmp_path / "pkg", member + bytes(-len(member) % 512 if says != "not a whole number of "
                                                    "512-byte sectors" else 0), capacity=0)
    source = OvaSource(ova)
    with pytest.raises(SourceError) as exc:
        source.disk_input(source.spec().disks[0], tmp_path / "work")
    assert f"{ova}: member box-disk1.img" in str(exc.value) and says in str(exc.value)
    assert not (tmp_path / "work").exists()


def test_killed_inspect_of_an_ova_leaves_no_copy(tmp_path: Path, v2p: V2P) -> None:
    """A raw member of 4 GiB with a manifest: inspect reads it for its digest (seconds), copies
    nothing; killed half-way it leaves nothing in $TMPDIR."""
    ova = disk_ova(tmp_path / "pkg", 4 * GiB, capacity=4 * GiB, manifest=True)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = v2p.popen("inspect", str(ova), "--bridge", "vmbr0", TMPDIR=str(scratch))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and not any(scratch.iterdir()):
        time.sleep(0.05)
    time.sleep(1.0)
    proc.kill()
    proc.communicate()
    big = [p for p in scratch.rglob("*") if p.is_file() and p.stat().st_blocks * 512 > MiB]
    assert big == [], f"left behind: {big}"


def test_migrate_of_an_ova_raw_member_in_place_is_byte_identical(tmp_path: Path, v2p: V2P) -> None:
    data = MBR + bytes(range(256)) * 4096 * 7 + bytes(8 * MiB - len(MBR) - 256 * 4096 * 7)
    ova = disk_ova(tmp_path / "pkg", data, capacity=len(data), manifest=True)
    proc = v2p("migrate", str(ova), "--vmid", "120", "--bridge", "vmbr0", "--no-boot-check", "--format", "raw")
    assert proc.returncode == 0, proc.stderr
    disk = v2p.target / "images" / "120" / "vm-120-disk-0.raw"
    assert disk.read_bytes() == data
    assert not (v2p.target / "migrations" / "120.work").exists()
