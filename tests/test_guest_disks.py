"""The sample BIOS guest reports every disk it sees: a local-target VM with three disks
(scsi0 boot + scsi1 on virtio-scsi, sata0 on AHCI) boots under TCG and prints one
``v2p-guest: disk 0x8N sectors=... marker=...`` line per disk, its usual lines unchanged.

SeaBIOS numbers the drives in boot order: 80h is the boot disk, then disks with a
bootindex in that order, then the others as SeaBIOS found them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import DISK_LINE, GUEST_LINE, MARKER_LINE, vm_with_disks
from v2p.targets.local import LocalTarget

VMID = 130
# Data disks: size and last-sector marker, each distinct from the boot disk's.
DATA_DISKS = {"scsi1": (16, "V2P-DISK-SCSI1"), "sata0": (24, "V2P-DISK-SATA0")}


def three_disk_vm(tmp_path: Path, samples: Path, boot: str) -> LocalTarget:
    target = LocalTarget(tmp_path / "target", accel="tcg")
    config = {"name": "disks", "memory": "128", "scsihw": "virtio-scsi-pci", "boot": boot}
    return vm_with_disks(target, samples, VMID, "scsi0", DATA_DISKS, config)


@pytest.mark.parametrize(("boot", "order"), [
    # only the boot disk has a bootindex: SeaBIOS 1.16 finds the AHCI disk before the second virtio-scsi one
    ("order=scsi0", ["scsi0", "sata0", "scsi1"]),
    ("order=scsi0;scsi1;sata0", ["scsi0", "scsi1", "sata0"]),
])
@pytest.mark.usefixtures("boots")
def test_guest_reports_every_disk(tmp_path: Path, samples: Path, manifest: dict[str, Any],
                                  boot: str, order: list[str]) -> None:
    target = three_disk_vm(tmp_path, samples, boot)
    report = target.boot_check(VMID, timeout=60)
    serial = report.serial
    assert report.outcome == "up", serial[-2000:]  # the guest shut itself down (ACPI)
    # the guest's first lines are as before
    expected = manifest["expected_serial"]
    boot_line, marker_line = GUEST_LINE.search(serial), MARKER_LINE.search(serial)
    assert boot_line and boot_line.group(1) == "virtio-scsi"
    assert marker_line and marker_line.group(1) == manifest["marker"]
    assert expected["sectors"] + "\n" in serial
    lines = DISK_LINE.findall(serial)
    wanted = {"scsi0": (str(manifest["sectors"]), manifest["marker"])}
    wanted.update({key: (str(mib << 11), marker) for key, (mib, marker) in DATA_DISKS.items()})
    assert lines == [(f"8{i}", *wanted[key]) for i, key in enumerate(order)], serial[-2000:]
    # ... and come before the poweroff line, which stays the last
    assert serial.rindex("v2p-guest: disk 0x") < serial.index(expected["poweroff"])
    assert serial.rstrip().endswith(expected["poweroff"])
