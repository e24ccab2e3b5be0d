"""VolumeRef and the drive-value parser/printer on real PVE values.

The drive values are lines of qemu-server's own test configs (``src/test/cfg2cmd/*.conf``,
``src/test/snapshot-test/*.conf``, ``src/test/run_config2command_tests.pl`` fixtures),
kept verbatim: every storage layout PVE writes (dir, LVM, LVM-thin, RBD, ZFS over iSCSI,
btrfs, CIFS), ISO images, templates' base volumes, paths and empty CD-ROM drives.
"""

from __future__ import annotations

import pytest

from v2p import pveconfig
from v2p.volumes import (
    Drive,
    VolumeRef,
    disk_name,
    drive_is_cdrom,
    drive_volume,
    import_index,
    import_name,
    new_volume,
    new_volume_storage,
    parse_drive,
    parse_property_string,
    print_drive,
)

# (value, storage, content, vmid by name, folder, disk index, format); storage None: no volume id.
QEMU_SERVER_DRIVES = [
    ("local:100/vm-100-disk-0.raw,efitype=4m,pre-enrolled-keys=1,size=528K", "local", "images", 100, 100, 0, "raw"),
    ("local:8006/vm-8006-disk-1.qcow2,efitype=4m", "local", "images", 8006, 8006, 1, "qcow2"),
    ("local:100/base-100-disk-1.qcow2,size=128K", "local", "images", 100, 100, None, "qcow2"),
    ("local:108/vm-100-disk-1.raw,size=4M,version=v2.0", "local", "images", 100, 108, 1, "raw"),
    ("rbd:vm-111-disk-0,efitype=4m,pre-enrolled-keys=1,size=1M", "rbd", "images", 111, None, 0, None),
    ("dir:111/vm-111-disk-2.qcow2,size=1G", "dir", "images", 111, 111, 2, "qcow2"),
    ("lvmthinbig:vm-111-disk-0,size=32G", "lvmthinbig", "images", 111, None, 0, None),
    ("local-lvm:vm-8006-disk-0,cache=writeback,discard=on,size=104858K", "local-lvm", "images", 8006, None, 0, None),
    ("lvm-store:vm-8006-disk-0.qcow2,size=1G", "lvm-store", "images", 8006, None, 0, "qcow2"),
    ("zfs-over-iscsi-store:vm-8006-disk-0,cache=directsync,discard=on,size=104858K",
     "zfs-over-iscsi-store", "images", 8006, None, 0, None),
    ("krbd-store:vm-8006-disk-9,discard=on,size=104858K,cache=writeback,aio=io_uring",
     "krbd-store", "images", 8006, None, 9, None),
    ("btrfs-store:8006/vm-8006-disk-0.raw,cache=writethrough,discard=on,size=104858K",
     "btrfs-store", "images", 8006, 8006, 0, "raw"),
    ("myfs:179/vm-179-disk-2.qcow2,mbps_rd=7,mbps_wr=7,replicate=0,size=32G", "myfs", "images", 179, 179, 2, "qcow2"),
    ("myfs:179/vm-179-disk-3.vmdk,size=32G", "myfs", "images", 179, 179, 3, "vmdk"),
    ("myfs:179/vm-179-disk-4.qcow2,cache=none,discard=on,size=32G,ssd=1", "myfs", "images", 179, 179, 4, "qcow2"),
    ("mydir:1422/vm-1422-disk-8.qcow2", "mydir", "images", 1422, 1422, 8, "qcow2"),
    ("local:snapshotable-disk-1,discard=on,size=32G", "local", "images", None, None, None, None),
    ("lvm:vm-120-cloudinit,media=cdrom", "lvm", "images", 120, None, None, None),
    ("local:iso/zero.iso,media=cdrom,size=112M", "local", "iso", None, None, None, None),
    ("sani:iso/virtio-win-0.1.266.iso,media=cdrom,size=707456K", "sani", "iso", None, None, None, None),
    ("sani:iso/Win2016-1616-evaluation.ISO,media=cdrom,size=5198078K", "sani", "iso", None, None, None, None),
    ("cifs-store:iso/three.iso,size=112M", "cifs-store", "iso", None, None, None, None),
    ("none,media=cdrom", None, None, None, None, None, None),
    ("cdrom,media=cdrom", None, None, None, None, None, None),
    ("/dev/sdg,scsiblock=1,size=32G", None, None, None, None, None, None),
    ("/mnt/file.raw", None, None, None, None, None, None),
]


@pytest.mark.parametrize(("value", "storage", "content", "vmid", "folder", "index", "fmt"), QEMU_SERVER_DRIVES)
def test_a_real_drive_value_parses_and_prints_back(value: str, storage: str | None, content: str | None,
                                                   vmid: int | None, folder: int | None, index: int | None,
                                                   fmt: str | None) -> None:
    drive = parse_drive(value)
    assert print_drive(drive) == value
    assert drive.volume == value.split(",")[0]
    assert list(drive.options) == [part.partition("=")[0] for part in value.split(",")[1:]]
    assert drive.is_cdrom == ("media=cdrom" in value) == drive_is_cdrom(value)
    ref = drive.ref
    if storage is None:
        assert ref is None
        return
    assert ref is not None
    assert (ref.storage, ref.content, ref.vmid, ref.folder, ref.disk_index, ref.fmt) == \
        (storage, content, vmid, folder, index, fmt)
    assert str(ref) == drive.volume
    assert VolumeRef.parse(str(ref)) == ref


def test_a_disk_volume_is_printed_in_both_layouts() -> None:
    assert str(VolumeRef.disk("local", 120, 0, "qcow2")) == "local:120/vm-120-disk-0.qcow2"
    assert str(VolumeRef.disk("local-lvm", 102, 3)) == "local-lvm:vm-102-disk-3"
    assert disk_name(102, 3) == "vm-102-disk-3" and disk_name(5, 1, "raw") == "vm-5-disk-1.raw"
    for ref in (VolumeRef.disk("local", 120, 7, "raw"), VolumeRef.disk("vg", 120, 7)):
        assert ref.disk_of(120) == 7 and ref.owned_by(120)
        assert ref.disk_of(12) is None and not ref.owned_by(12)


def test_iso_and_import_volumes() -> None:
    iso = VolumeRef.iso("local", "virtio-win.iso")
    assert (str(iso), iso.content, iso.filename, iso.vmid) == \
        ("local:iso/virtio-win.iso", "iso", "virtio-win.iso", None)
    upload = VolumeRef.imported("local", import_name(130, 2))
    assert str(upload) == "local:import/v2p-130-disk-2.qcow2" and upload.content == "import"
    assert import_index(upload.filename, 130) == 2 and import_index(upload.filename, 13) is None
    assert import_index("vm-130-disk-2.qcow2", 130) is None


def test_only_the_folder_owner_owns_a_directory_volume() -> None:
    """pve-storage's dir layout: VMID/NAME; qemu-server's test config has local:108/vm-100-disk-1.raw."""
    odd = VolumeRef.parse("local:108/vm-100-disk-1.raw")
    assert not odd.owned_by(100) and not odd.owned_by(108)
    assert VolumeRef.parse("local:100/base-100-disk-0.raw").owned_by(100)
    assert VolumeRef.parse("local:100/base-100-disk-0.raw").disk_of(100) is None  # a template's, not a disk of it


@pytest.mark.parametrize("text", ["/dev/sdb", "none", "cdrom", "local:", ":vm-1-disk-0", "/mnt/a:b", ""])
def test_what_is_not_a_volume_id(text: str) -> None:
    assert VolumeRef.maybe(text) is None
    with pytest.raises(ValueError):
        VolumeRef.parse(text)


def test_a_new_volume_request_is_no_volume_id() -> None:
    value = pveconfig.efidisk("local-lvm", secure_boot=True)
    assert value == "local-lvm:1,efitype=4m,pre-enrolled-keys=1"
    drive = parse_drive(value)
    assert drive.ref is None and new_volume_storage(drive.volume) == "local-lvm"
    assert new_volume("big", 0) == "big:0" and new_volume_storage("local:100/vm-100-disk-0.raw") is None
    assert pveconfig.tpmstate("local") == "local:1,version=v2.0"


def test_the_volume_key_may_be_named() -> None:
    """qemu-server's default key is ``file`` (``volume`` its alias); printed without its name."""
    for value in ("file=local:iso/a.iso,media=cdrom", "media=cdrom,volume=local:iso/a.iso"):
        drive = parse_drive(value)
        assert drive == Drive("local:iso/a.iso", {"media": "cdrom"})
        assert print_drive(drive) == "local:iso/a.iso,media=cdrom"


@pytest.mark.parametrize("value", ["", "size=32G", "local:1/a.raw,size=1G,size=2G", "a,b", "file=,size=1G",
                                   "file=x,volume=y"])
def test_what_is_not_a_drive_value(value: str) -> None:
    with pytest.raises(ValueError):
        parse_drive(value)
    assert drive_volume(value) == "" and not drive_is_cdrom(value)


def test_drive_volume_reads_any_key_of_a_config() -> None:
    config = {"name": "web01", "boot": "order=scsi0",
              "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0", "scsi0": "local:100/vm-100-disk-0.qcow2,size=32G"}
    volumes = {key: drive_volume(value) for key, value in config.items()}
    assert volumes == {"name": "web01", "boot": "", "net0": "", "scsi0": "local:100/vm-100-disk-0.qcow2"}


def test_the_values_v2p_writes() -> None:
    assert pveconfig.disk_value("local:120/vm-120-disk-0.qcow2", 32 << 30) == "local:120/vm-120-disk-0.qcow2,size=32G"
    assert pveconfig.cdrom_value("none") == "none,media=cdrom"
    assert pveconfig.cdrom_value("local:iso/virtio-win.iso") == "local:iso/virtio-win.iso,media=cdrom"


@pytest.mark.parametrize(("value", "on"), [("1", True), ("0", False), ("enabled=1,fstrim_cloned_disks=1", True),
                                           ("1,type=virtio", True), ("fstrim_cloned_disks=1", False),
                                           ("type=isa,enabled=1", True), ("", False)])
def test_agent_enabled(value: str, on: bool) -> None:
    assert pveconfig.agent_enabled(value) is on


def test_property_strings() -> None:
    assert parse_property_string("virtio=BC:24:11:00:00:01,bridge=vmbr0,,") == \
        {"virtio": "BC:24:11:00:00:01", "bridge": "vmbr0"}
    with pytest.raises(ValueError):
        parse_property_string("a=1,b")
