"""The .vmx source: VMware's key = "value" files written by hand from VMware's documented keys,
with real disks made by qemu-img (and the sample guest's ESXi disk), read into a VMSpec."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from v2p.errors import SourceError, UnsafeSourceError
from v2p.sources.vmx import MAX_VMX, VmxSource, parse_vmx, sniff
from v2p.spec import CdromSpec, DiskSpec, NicSpec, VMSpec

MiB = 1 << 20


def make_disk(folder: Path, name: str, size: int) -> Path:
    path = folder / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(path), str(size)], check=True)
    return path


def write_vmx(folder: Path, text: str, name: str = "vm.vmx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def one_line(exc: pytest.ExceptionInfo[SourceError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


WINDOWS_VMX = """\
    .encoding = "UTF-8"
    config.version = "8"
    virtualHW.version = "19"
    nvram = "win10.nvram"
    pciBridge0.present = "TRUE"
    svga.present = "TRUE"
    displayName = "Win10 Desktop"
    guestOS = "windows9-64"
    firmware = "efi"
    uefi.secureBoot.enabled = "TRUE"
    numvcpus = "4"
    cpuid.coresPerSocket = "2"
    memsize = "8192"
    uuid.bios = "56 4d 2a 3b 4c 5d 6e 7f-80 91 a2 b3 c4 d5 e6 f7"
    uuid.location = "56 4d 00 11 22 33 44 55-66 77 88 99 aa bb cc dd"
    vtpm.present = "TRUE"
    scsi0.virtualDev = "lsisas1068"
    scsi0.present = "TRUE"
    scsi0:0.deviceType = "scsi-hardDisk"
    scsi0:0.fileName = "win10.vmdk"
    scsi0:0.present = "TRUE"
    scsi0:1.fileName = "win10_1.vmdk"
    scsi0:1.mode = "independent-persistent"
    scsi0:1.present = "TRUE"
    sata0.present = "TRUE"
    sata0:0.deviceType = "disk"
    sata0:0.fileName = "win10_2.vmdk"
    sata0:0.present = "TRUE"
    sata0:1.deviceType = "cdrom-image"
    sata0:1.fileName = "/vmfs/volumes/datastore1/iso/en_windows_10.iso"
    sata0:1.present = "TRUE"
    ethernet0.virtualDev = "vmxnet3"
    ethernet0.networkName = "VM Network"
    ethernet0.addressType = "static"
    ethernet0.address = "00:50:56:aa:bb:cc"
    ethernet0.present = "TRUE"
    floppy0.present = "FALSE"
    sound.present = "FALSE"
    usb_xhci.present = "TRUE"
    usb_xhci:4.present = "TRUE"
    usb_xhci:4.deviceType = "hid"
    usb_xhci:6.present = "TRUE"
    usb_xhci:6.deviceType = "hub"
    tools.syncTime = "FALSE"
    """


@pytest.fixture
def windows_vm(tmp_path: Path) -> Path:
    folder = tmp_path / "Win10 Desktop"
    folder.mkdir()
    make_disk(folder, "win10.vmdk", 4 * MiB)
    make_disk(folder, "win10_1.vmdk", 2 * MiB)
    make_disk(folder, "win10_2.vmdk", 3 * MiB)
    return write_vmx(folder, WINDOWS_VMX, "Win10 Desktop.vmx")


def test_windows_efi_vm(windows_vm: Path) -> None:
    assert VmxSource(windows_vm).spec() == VMSpec(
        name="Win10 Desktop",
        uuid="564d2a3b-4c5d-6e7f-8091-a2b3c4d5e6f7",
        firmware="efi",
        secure_boot=True,
        sockets=2,
        cores=2,
        memory_mib=8192,
        guest_os="windows9-64",
        # VMware's order: SATA before SCSI; no boot keys, so the first disk boots
        disks=[
            DiskSpec("sata", 0, 0, "win10_2.vmdk", 3 * MiB, "ahci", boot=True),
            DiskSpec("scsi", 0, 0, "win10.vmdk", 4 * MiB, "lsisas1068"),
            DiskSpec("scsi", 0, 1, "win10_1.vmdk", 2 * MiB, "lsisas1068", mode="independent-persistent"),
        ],
        nics=[NicSpec("vmxnet3", "00:50:56:AA:BB:CC", "VM Network")],
        cdroms=[CdromSpec("sata", 0, 1, "/vmfs/volumes/datastore1/iso/en_windows_10.iso")],
        tpm=True,
    )


LINUX_VMX = """\
    .encoding = "UTF-8"
    config.version = "8"
    virtualHW.version = "14"
    displayName = "db01"
    guestOS = "debian11-64"
    numvcpus = "2"
    memsize = "2048"
    uuid.bios = "42 1a 0b 2c 3d 4e 5f 60-71 82 93 a4 b5 c6 d7 e8"
    scsi0.virtualDev = "pvscsi"
    scsi0.present = "TRUE"
    scsi0:0.fileName = "esxi.vmdk"
    scsi0:0.present = "TRUE"
    scsi0:1.deviceType = "scsi-hardDisk"
    scsi0:1.fileName = "db01_1.vmdk"
    scsi0:1.present = "TRUE"
    bios.bootOrder = "cdrom,hdd"
    bios.hddOrder = "scsi0:1,scsi0:0"
    ide1:0.present = "TRUE"
    ide1:0.deviceType = "atapi-cdrom"
    ide1:0.fileName = "auto detect"
    ethernet0.present = "TRUE"
    ethernet0.virtualDev = "vmxnet3"
    ethernet0.networkName = "LAN"
    ethernet0.addressType = "generated"
    ethernet0.generatedAddress = "00:0c:29:12:34:56"
    ethernet0.generatedAddressOffset = "0"
    ethernet1.present = "TRUE"
    ethernet1.virtualDev = "e1000"
    ethernet1.connectionType = "custom"
    ethernet1.vnet = "/dev/vmnet2"
    ethernet1.addressType = "generated"
    ethernet1.generatedAddress = "00:0c:29:12:34:60"
    ethernet2.present = "FALSE"
    ethernet2.generatedAddress = "00:0c:29:12:34:6a"
    """


@pytest.fixture
def linux_vm(tmp_path: Path, samples: Path) -> Path:
    folder = tmp_path / "db01"
    # the sample guest's ESXi disk: a descriptor and its -flat extent
    shutil.copytree(samples / "esxi", folder, copy_function=shutil.copy2)
    make_disk(folder, "db01_1.vmdk", 2 * MiB)
    return write_vmx(folder, LINUX_VMX, "db01.vmx")


def test_linux_bios_vm(linux_vm: Path, manifest) -> None:  # type: ignore[no-untyped-def]
    spec = VmxSource(linux_vm).spec()
    assert spec == VMSpec(
        name="db01",
        uuid="421a0b2c-3d4e-5f60-7182-93a4b5c6d7e8",
        sockets=2,
        cores=1,
        memory_mib=2048,
        guest_os="debian11-64",
        disks=[
            DiskSpec("scsi", 0, 0, "esxi.vmdk", manifest["virtual_size"], "pvscsi"),
            DiskSpec("scsi", 0, 1, "db01_1.vmdk", 2 * MiB, "pvscsi", boot=True),
        ],
        nics=[NicSpec("vmxnet3", "00:0C:29:12:34:56", "LAN"), NicSpec("e1000", "00:0C:29:12:34:60", "vmnet2")],
        cdroms=[CdromSpec("ide", 1, 0, None)],
    )
    assert spec.boot_disk() is spec.disks[1] and spec.ordered_disks()[0].source == "db01_1.vmdk"
    assert spec.ostype == "l26" and spec.vcpus == 2


def test_disk_input_and_fingerprint(linux_vm: Path, tmp_path: Path, manifest, samples) -> None:  # type: ignore[no-untyped-def]
    source = VmxSource(linux_vm)
    assert source.describe() == str(linux_vm)
    spec = source.spec()
    work = tmp_path / "work"
    esxi = source.disk_input(spec.disks[0], work)
    assert (esxi.capacity, esxi.flavor) == (manifest["virtual_size"], "vmfs")
    assert esxi.image is not None and esxi.image.path == linux_vm.parent / "esxi.vmdk"
    out = tmp_path / "esxi.raw"
    subprocess.run(["qemu-img", "convert", "-f", esxi.endpoint.fmt, "-O", "raw", esxi.endpoint.filename, str(out)],
                   check=True, pass_fds=esxi.endpoint.fds)
    assert out.read_bytes() == (samples / "guest.raw").read_bytes()
    data = source.disk_input(spec.disks[1], work)
    assert (data.capacity, data.flavor) == (2 * MiB, "monolithicSparse")
    # the empty data disk has no boot signature: inspection says so
    assert any("boot signature" in text for kind, text in data.messages if kind == "warning")

    prints = source.fingerprint()
    assert [Path(p["path"]).name for p in prints] == ["db01.vmx", "esxi.vmdk", "esxi-flat.vmdk", "db01_1.vmdk"]
    assert all(p["size"] == os.stat(p["path"]).st_size for p in prints)
    with open(linux_vm.parent / "esxi-flat.vmdk", "r+b") as flat:
        flat.write(b"x")
    assert source.fingerprint() != prints


def test_snapshot_delta_gives_the_consolidated_disk(tmp_path: Path) -> None:
    folder = tmp_path / "web01"
    folder.mkdir()
    make_disk(folder, "web01.vmdk", 5 * MiB)
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x11 0 1M", str(folder / "web01.vmdk")],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-b", "web01.vmdk", "-F", "vmdk",
                    "web01-000001.vmdk"], check=True, cwd=folder)
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x22 4M 1M", str(folder / "web01-000001.vmdk")],
                   check=True, capture_output=True)
    vmx = write_vmx(folder, """\
        displayName = "web01"
        memsize = "1024"
        scsi0.present = "TRUE"
        scsi0.virtualDev = "lsilogic"
        scsi0:0.present = "TRUE"
        scsi0:0.fileName = "web01-000001.vmdk"
        """, "web01.vmx")
    source = VmxSource(vmx)
    spec = source.spec()
    assert [(d.source, d.capacity) for d in spec.disks] == [("web01-000001.vmdk", 5 * MiB)]
    disk = source.disk_input(spec.disks[0], tmp_path / "work")
    assert disk.image is not None and [link.path.name for link in disk.image.chain] == \
        ["web01-000001.vmdk", "web01.vmdk"]
    out = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-f", disk.endpoint.fmt, "-O", "raw", disk.endpoint.filename, str(out)],
                   check=True, pass_fds=disk.endpoint.fds)
    assert out.read_bytes() == b"\x11" * MiB + bytes(3 * MiB) + b"\x22" * MiB
    assert [Path(p["path"]).name for p in source.fingerprint()] == \
        ["web01.vmx", "web01-000001.vmdk", "web01.vmdk"]


# --- the parser -------------------------------------------------------------------


def test_escapes_are_decoded() -> None:
    vmx = parse_vmx(b'displayName = "Web |22prod|22 |7C 01 caf|C3|A9 |zz|7c"\n', "x.vmx")
    assert vmx.get("displayname") == 'Web "prod" | 01 café |zz|'


def test_duplicate_keys_last_wins_and_keys_ignore_case(tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    make_disk(folder, "a.vmdk", MiB)
    make_disk(folder, "b.vmdk", 2 * MiB)
    vmx = write_vmx(folder, """\
        memsize = "1024"
        MEMSIZE = "4096"
        NumVCPUs = "8"
        CPUID.CoresPerSocket = "4"
        DisplayName = "first"
        displayname = "second"
        Firmware = "EFI"
        SCSI0.Present = "true"
        Scsi0.VirtualDev = "BusLogic"
        scsi0:0.PRESENT = "TRUE"
        scsi0:0.FILENAME = "a.vmdk"
        scsi0:0.fileName = "b.vmdk"
        Ethernet0.Present = "True"
        ETHERNET0.GENERATEDADDRESS = "00-0c-29-ab-cd-ef"
        """)
    spec = VmxSource(vmx).spec()
    assert (spec.name, spec.memory_mib, spec.sockets, spec.cores, spec.firmware) == ("second", 4096, 2, 4, "efi")
    assert spec.disks == [DiskSpec("scsi", 0, 0, "b.vmdk", 2 * MiB, "buslogic", boot=True)]
    # no virtualDev: VMware's default adapter (vlance); the MAC in upper-case colon form
    assert spec.nics == [NicSpec("vlance", "00:0C:29:AB:CD:EF", None)]


def test_comments_blank_lines_crlf_and_encoding() -> None:
    data = ('.encoding = "windows-1252"\r\n# a comment\r\n\r\n  \tguestOS = "other-64"   # trailing\r\n'
            'displayName = "Z\xfcrich"\r\n').encode("cp1252")
    vmx = parse_vmx(data, "x.vmx")
    assert (vmx.get("guestos"), vmx.get("displayname")) == ("other-64", "Zürich")
    assert vmx.where("displayName") == "x.vmx:5"


@pytest.mark.parametrize(("text", "line", "what"), [
    ('displayName = "a"\nthis is junk\n', 2, "not a .vmx setting"),
    ('displayName = "a"\n\nmemsize = "12\n', 3, "not a .vmx setting"),
    ('displayName = "a" "b"\n', 1, "not a .vmx setting"),
    ('= "a"\n', 1, "not a .vmx setting"),
    ('a = "1"\nb = "\x01"\n', 2, "control character"),
    ('.encoding = "klingon"\n', 1, "not an encoding"),
    ('a = "1"\nb = "\xe9"\n', 2, "not utf-8 text"),
])
def test_junk_is_refused_with_file_and_line(tmp_path: Path, text: str, line: int, what: str) -> None:
    path = tmp_path / "bad.vmx"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(SourceError) as exc:
        VmxSource(path).spec()
    assert one_line(exc).startswith(f"{path}:{line}: ") and what in str(exc.value)


def test_binary_big_and_vmdk_files_are_refused(tmp_path: Path) -> None:
    binary = tmp_path / "bin.vmx"
    binary.write_bytes(b'displayName = "a"\n\x00\x01\x02')
    with pytest.raises(SourceError, match=r"bin\.vmx: binary data \(a NUL byte at offset 18\)"):
        VmxSource(binary).spec()
    big = tmp_path / "big.vmx"
    big.write_bytes(b'displayName = "a"\n' + b"# padding\n" * (MAX_VMX // 10))
    with pytest.raises(SourceError, match=r"big\.vmx is larger than 4 MiB"):
        VmxSource(big).spec()
    disk = make_disk(tmp_path, "disk.vmx", MiB)
    with pytest.raises(SourceError, match=r"disk\.vmx is a VMDK disk, not a \.vmx"):
        VmxSource(disk).spec()
    empty = tmp_path / "empty.vmx"
    empty.write_text("# nothing\n\n")
    with pytest.raises(SourceError, match=r"empty\.vmx: no settings"):
        VmxSource(empty).spec()
    fifo = tmp_path / "fifo.vmx"
    os.mkfifo(fifo)
    with pytest.raises(SourceError, match=r"fifo\.vmx is a FIFO"):
        VmxSource(fifo).spec()
    with pytest.raises(SourceError, match=r"missing\.vmx: no such file"):
        VmxSource(tmp_path / "missing.vmx").spec()


@pytest.mark.parametrize(("lines", "what"), [
    ('numvcpus = "6"\ncpuid.coresPerSocket = "4"\n', r":1: numvcpus 6 is not a multiple of cpuid.coresPerSocket 4"),
    ('memsize = "lots"\n', r":1: memsize = 'lots' is not a positive whole number"),
    ('numvcpus = "0"\n', r":1: numvcpus = '0' is not a positive whole number"),
    ('firmware = "coreboot"\n', r":1: firmware = 'coreboot' is neither"),
    ('uuid.bios = "56 4d 2a"\n', r":1: uuid.bios = '56 4d 2a' is not 16 hex bytes"),
    ('vtpm.present = "maybe"\n', r":1: vtpm.present = 'maybe' is not TRUE or FALSE"),
    ('ethernet0.present = "TRUE"\nethernet0.address = "00:50:56:zz:00:01"\nethernet0.addressType = "static"\n',
     r":2: ethernet0.address: '00:50:56:zz:00:01' is not a MAC address"),
    ('scsi0:0.present = "TRUE"\n', r":1: scsi0:0 is a disk with no fileName"),
])
def test_bad_values_are_refused_with_file_and_line(tmp_path: Path, lines: str, what: str) -> None:
    path = tmp_path / "bad.vmx"
    path.write_text(lines)
    with pytest.raises(SourceError) as exc:
        VmxSource(path).spec()
    assert one_line(exc).startswith(str(path)) and what in str(exc.value)


def test_sniff_tells_a_vmx_from_other_files(windows_vm: Path, tmp_path: Path) -> None:
    assert sniff(windows_vm.read_bytes()[:1024])
    assert not sniff(make_disk(tmp_path, "d.vmdk", MiB).read_bytes()[:1024])
    assert not sniff(b"<?xml version='1.0'?><Envelope/>")


# --- disks that must not be read ----------------------------------------------------


def disk_vmx(folder: Path, file_name: str) -> Path:
    return write_vmx(folder, f"""\
        displayName = "vm"
        scsi0.present = "TRUE"
        scsi0:0.present = "TRUE"
        scsi0:0.fileName = "{file_name}"
        """)


def test_disk_outside_the_folder_is_refused(tmp_path: Path) -> None:
    outside = make_disk(tmp_path, "outside.vmdk", MiB)
    folder = tmp_path / "vm"
    (folder / "sub").mkdir(parents=True)
    (folder / "link.vmdk").symlink_to(outside)
    (folder / "sub" / "up").symlink_to(tmp_path)
    for name, what in [("../outside.vmdk", "leaves the image folder"), (str(outside), "is absolute"),
                       ("link.vmdk", "is a link leading out of the image folder"),
                       ("sub/up/outside.vmdk", "is a link leading out of the image folder"),
                       ("C:\\VMs\\outside.vmdk", "is absolute")]:
        vmx = disk_vmx(folder, name.replace("\\", "|5C"))
        with pytest.raises(UnsafeSourceError) as exc:
            VmxSource(vmx).spec()
        assert one_line(exc).startswith(f"{vmx}:4: scsi0:0: disk "), name
        assert what in str(exc.value) and "refused" in str(exc.value), name
        with pytest.raises(UnsafeSourceError):
            VmxSource(vmx).disk_input(DiskSpec("scsi", 0, 0, name), tmp_path / "work")


def test_a_link_inside_the_folder_is_fine(tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    make_disk(folder, "real.vmdk", 3 * MiB)
    (folder / "alias.vmdk").symlink_to("real.vmdk")
    assert [d.capacity for d in VmxSource(disk_vmx(folder, "alias.vmdk")).spec().disks] == [3 * MiB]


def test_missing_and_broken_disks_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    vmx = disk_vmx(folder, "gone.vmdk")
    with pytest.raises(SourceError) as exc:
        VmxSource(vmx).spec()
    assert one_line(exc).startswith(f"{vmx}:4: scsi0:0: disk 'gone.vmdk' is missing")
    (folder / "gone.vmdk").write_bytes(b"not a disk at all\n")
    with pytest.raises(SourceError) as exc:
        VmxSource(vmx).spec()
    assert one_line(exc).startswith(f"{vmx}: scsi0:0 (gone.vmdk): ") and "not a disk image" in str(exc.value)


def test_raw_device_maps_are_marked_not_read(tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    (folder / "lun.vmdk").write_text(textwrap.dedent("""\
        # Disk DescriptorFile
        version=1
        CID=fffffffe
        parentCID=ffffffff
        createType="vmfsPassthroughRawDeviceMap"
        RW 2097152 VMFSRDM "lun-rdmp.vmdk"
        ddb.adapterType = "lsilogic"
        """))
    make_disk(folder, "phys.vmdk", MiB)
    vmx = write_vmx(folder, """\
        scsi0.present = "TRUE"
        scsi0:0.present = "TRUE"
        scsi0:0.fileName = "lun.vmdk"
        scsi0:1.present = "TRUE"
        scsi0:1.deviceType = "rawDisk"
        scsi0:1.fileName = "phys.vmdk"
        """)
    source = VmxSource(vmx)
    disks = source.spec().disks
    assert [(d.label, d.rdm, d.capacity) for d in disks] == [("scsi0:0", True, 1 << 30), ("scsi0:1", True, 0)]
    with pytest.raises(UnsafeSourceError, match=r"scsi0:0 \(lun\.vmdk\) is a raw device map"):
        source.disk_input(disks[0], tmp_path / "work")
    assert [Path(p["path"]).name for p in source.fingerprint()] == ["vm.vmx", "lun.vmdk", "phys.vmdk"]


# --- devices ------------------------------------------------------------------------


def test_boot_order_names_a_disk(tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    for name in ("a.vmdk", "b.vmdk", "c.vmdk"):
        make_disk(folder, name, MiB)
    text = """\
        ide0:0.present = "TRUE"
        ide0:0.fileName = "a.vmdk"
        nvme0.present = "TRUE"
        nvme0:0.present = "TRUE"
        nvme0:0.fileName = "b.vmdk"
        sata0.present = "TRUE"
        sata0:3.present = "TRUE"
        sata0:3.fileName = "c.vmdk"
        """
    spec = VmxSource(write_vmx(folder, text + 'bios.bootOrder = "ethernet0,nvme0:0,hdd"\n')).spec()
    assert [(d.label, d.controller_model, d.boot) for d in spec.disks] == [
        ("ide0:0", None, False), ("sata0:3", "ahci", False), ("nvme0:0", "nvme", True)]
    spec = VmxSource(write_vmx(folder, text + 'bios.hddOrder = "scsi0:0,sata0:3"\n')).spec()
    assert [d.label for d in spec.disks if d.boot] == ["sata0:3"]
    spec = VmxSource(write_vmx(folder, text + 'bios.bootOrder = "hdd"\nbios.hddOrder = "nvme0:9"\n')).spec()
    assert [d.label for d in spec.disks if d.boot] == ["ide0:0"]


def test_shared_absent_and_odd_devices(tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    for name in ("a.vmdk", "b.vmdk", "c.vmdk", "d.vmdk"):
        make_disk(folder, name, MiB)
    vmx = write_vmx(folder, """\
        scsi0.present = "TRUE"
        scsi0:0.present = "TRUE"
        scsi0:0.fileName = "a.vmdk"
        scsi0:1.present = "TRUE"
        scsi0:1.fileName = "b.vmdk"
        scsi0:1.sharing = "multi-writer"
        scsi0:1.mode = "Independent-NonPersistent"
        scsi1.present = "TRUE"
        scsi1.sharedBus = "virtual"
        scsi1:0.present = "TRUE"
        scsi1:0.fileName = "c.vmdk"
        scsi2.present = "FALSE"
        scsi2:0.present = "TRUE"
        scsi2:0.fileName = "d.vmdk"
        scsi0:2.present = "FALSE"
        scsi0:2.fileName = "nowhere.vmdk"
        scsi0:3.present = "TRUE"
        scsi0:3.deviceType = "scsi-passthru"
        scsi0:3.fileName = "/vmfs/devices/genscsi/naa.600"
        ethernet0.present = "TRUE"
        ethernet0.connectionType = "nat"
        ethernet0.addressType = "static"
        ethernet0.generatedAddress = "00:0c:29:00:00:01"
        ethernet1.present = "TRUE"
        ethernet1.addressType = "vpx"
        ethernet1.generatedAddress = "00:50:56:80:00:02"
        ethernet1.dvs.portgroupId = "dvportgroup-42"
        usb:0.present = "TRUE"
        usb:0.deviceType = "hid"
        usb:1.present = "TRUE"
        usb:1.deviceType = "hub"
        usb:2.present = "TRUE"
        usb:2.deviceType = "host"
        usb.autoConnect.device0 = "vid:0x0781 pid:0x5581"
        pciPassthru0.present = "TRUE"
        pciPassthru0.id = "00000:004:00.0"
        pciPassthru1.present = "TRUE"
        pciPassthru1.vgpu = "grid_p40-2q"
        pciPassthru2.present = "FALSE"
        sound.present = "TRUE"
        sound.virtualDev = "hdaudio"
        serial0.present = "TRUE"
        serial0.fileName = "serial.log"
        encryption.keySafe = "vmware:key/list/(pair/(null/vmware-null..."
        encryption.data = "AAAA"
        """)
    spec = VmxSource(vmx).spec()
    assert [(d.label, d.mode, d.shared, d.capacity) for d in spec.disks] == [
        ("scsi0:0", "persistent", False, MiB), ("scsi0:1", "independent-nonpersistent", True, MiB),
        ("scsi1:0", "persistent", True, MiB)]
    # the key safe encrypts the VM's home files (a vTPM needs that); the disks themselves are plain
    assert spec.home_encrypted and not spec.encrypted
    # a static MAC with no address is no MAC: the generated one is all there is
    assert spec.nics == [NicSpec("vlance", "00:0C:29:00:00:01", "nat"),
                         NicSpec("vlance", "00:50:56:80:00:02", "dvportgroup-42")]
    assert spec.passthrough == [
        "scsi0:3: SCSI passthrough of host device /vmfs/devices/genscsi/naa.600",
        "pciPassthru0: PCI device 00000:004:00.0", "pciPassthru1: vGPU grid_p40-2q",
        "usb.autoconnect.device0: USB device vid:0x0781 pid:0x5581 connected from the host",
        "usb:2: USB device host"]
    assert spec.unmapped == [
        "scsi2:0 (d.vmdk): its controller scsi2 is not present, so VMware does not show it either",
        "sound: sound card (hdaudio)", "serial0: serial port (serial.log)"]
