"""IDE disks on a q35 machine: its IDE buses are the ICH9 AHCI's ports, one unit each, so
ide1/ide3 cannot be unit 1 of a two-unit bus as on i440fx. A VM with disks on ide0, ide1
and ide3 and a CD-ROM on ide2 boots under TCG on q35 (and still on i440fx), and the guest
sees all three disks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import DISK_LINE, GUEST_LINE, MARKER_LINE, vm_with_disks
from v2p.targets import qemu_cmdline
from v2p.targets.local import LocalTarget

VMID = 140
DATA_DISKS = {"ide1": (16, "V2P-DISK-IDE1"), "ide3": (24, "V2P-DISK-IDE3")}


def cdrom(folder: Path) -> Path:
    content = folder / "cd"
    content.mkdir()
    (content / "README.TXT").write_text("a CD-ROM on ide2\n")
    iso = folder / "cd.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "V2PCD", "-o", str(iso), str(content)],
                   check=True, capture_output=True)
    return iso


def ide_vm(tmp_path: Path, samples: Path, machine: str | None) -> LocalTarget:
    target = LocalTarget(tmp_path / "target", accel="tcg")
    config = {"name": "ide4", "memory": "128", "boot": "order=ide0",
              "ide2": f"{cdrom(tmp_path)},media=cdrom"}
    if machine:
        config["machine"] = machine
    return vm_with_disks(target, samples, VMID, "ide0", DATA_DISKS, config)


@pytest.mark.parametrize(("machine", "controller"), [
    ("q35", ("sata", "8086:2922")),  # q35's IDE buses are its ICH9 AHCI ports
    ("pc-q35-7.2", ("sata", "8086:2922")),
    (None, ("ide", "8086:7010")),  # i440fx: PIIX3, two units per bus as before
])
@pytest.mark.usefixtures("boots")
def test_disks_on_ide0_ide1_ide3_and_a_cd_on_ide2_boot(tmp_path: Path, samples: Path, manifest: dict[str, Any],
                                                      machine: str | None, controller: tuple[str, str]) -> None:
    target = ide_vm(tmp_path, samples, machine)
    report = target.boot_check(VMID, timeout=90)
    serial = report.serial
    assert report.outcome == "up", f"{report.outcome}: {report.signal}\n{serial[-2000:]}"
    boot_line, marker_line = GUEST_LINE.search(serial), MARKER_LINE.search(serial)
    assert boot_line and (boot_line.group(1), boot_line.group(2)) == controller
    assert marker_line and marker_line.group(1) == manifest["marker"]
    seen = {marker: sectors for _drive, sectors, marker in DISK_LINE.findall(serial)}
    wanted = {manifest["marker"]: str(manifest["sectors"])}
    wanted.update({marker: str(mib << 11) for mib, marker in DATA_DISKS.values()})
    assert seen == wanted, serial[-2000:]


def ide_devices(machine: str | None) -> dict[str, str]:
    config = {"ide0": "/d0.raw", "ide1": "/d1.raw", "ide2": "/cd.iso,media=cdrom", "ide3": "/d3.raw",
              "boot": "order=ide0"}
    if machine:
        config["machine"] = machine
    argv = qemu_cmdline.build(1, config, "tcg", run_dir=Path("/run/x"), qmp_path=Path("/run/x/qmp"),
                              volume_file=lambda volid: (Path(volid), "raw"))
    devices = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-device" and argv[i + 1].startswith("ide-")]
    return {re.search(r"drive=drive-(ide\d)", d).group(1): re.search(r"bus=[^,]+,unit=\d", d).group(0)  # type: ignore[union-attr]
            for d in devices}


def test_ide_units_as_proxmox_places_them() -> None:
    # qemu-server's print_drivedevice_full: on q35 an odd index moves up two buses, unit 0
    assert ide_devices("q35") == {"ide0": "bus=ide.0,unit=0", "ide1": "bus=ide.2,unit=0",
                                  "ide2": "bus=ide.1,unit=0", "ide3": "bus=ide.3,unit=0"}
    assert ide_devices(None) == {"ide0": "bus=ide.0,unit=0", "ide1": "bus=ide.0,unit=1",
                                 "ide2": "bus=ide.1,unit=0", "ide3": "bus=ide.1,unit=1"}
