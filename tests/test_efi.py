"""UEFI VMs on the local target, for real: OVMF from flash (code read-only, the VM's
efidisk0 as its variable store) boots the sample EFI guest under TCG from
virtio-scsi and SATA; Secure Boot with Microsoft's keys refuses it (it is unsigned)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from targetwatch import observe
from v2p.errors import TargetError
from v2p.targets import efi
from v2p.targets.local import LocalTarget

pytestmark = pytest.mark.slow  # every test here boots a guest (requesting `boots`) or runs a storage end to end

VMID = 120
BOOT_TIMEOUT = 120.0


@pytest.fixture
def target(tmp_path: Path) -> LocalTarget:
    return LocalTarget(tmp_path / "target", accel="tcg")


def efi_vm(target: LocalTarget, samples: Path, manifest: dict[str, Any], bus: str, *,
           secure: bool = False, efidisk_fmt: str | None = None, efitype: str = "4m",
           **extra: str) -> dict[str, str]:
    """VM ``VMID``: the sample EFI disk on ``bus`` (scsi0 on virtio-scsi, or sata0), an
    efidisk0 made by ``efi.create_efidisk``; returns its config."""
    storage = target.storage("local")
    disk = storage.volume(VMID, 0, "raw")
    disk.path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(samples / manifest["efi"]["raw"], disk.path)
    efidisk = efi.create_efidisk(storage, VMID, secure=secure, fmt=efidisk_fmt, efitype=efitype)
    config = {"name": "efi-guest", "memory": "256", "bios": "ovmf", "scsihw": "virtio-scsi-pci",
              "efidisk0": efi.efidisk_value(efidisk, secure=secure, efitype=efitype),
              bus: disk.volid, "boot": f"order={bus}", **extra}
    target.create_vm(VMID, config)
    return config


def efidisk_path(target: LocalTarget) -> Path:
    volid = target.get_config(VMID)["efidisk0"].split(",")[0]
    return target.volume_file(volid)[0]


@pytest.mark.usefixtures("boots")
@pytest.mark.parametrize("bus", ["scsi0", "sata0"])
def test_efi_guest_boots_under_ovmf(target: LocalTarget, samples: Path, manifest: dict[str, Any],
                                    bus: str) -> None:
    efi_vm(target, samples, manifest, bus)
    report = target.boot_check(VMID, timeout=BOOT_TIMEOUT)
    assert report.outcome == "up", report  # the guest shut itself down (ACPI)
    assert manifest["efi"]["expected_serial"]["up"] in report.serial, report.serial[-2000:]
    argv = target.command_line(VMID, "tcg")
    assert f"readonly=on,file={efi.OVMF_DIR / 'OVMF_CODE_4M.fd'}" in " ".join(argv)


@pytest.mark.usefixtures("boots")
def test_efitype_2m(target: LocalTarget, samples: Path, manifest: dict[str, Any]) -> None:
    """Older PVE VMs: the 2 MiB OVMF with its 128 KiB vars store; an efidisk0 without
    efitype means 2m, as on PVE."""
    config = efi_vm(target, samples, manifest, "scsi0", efitype="2m")
    assert ",size=128K" in config["efidisk0"]
    target.set_config(VMID, {"efidisk0": config["efidisk0"].replace("efitype=2m,", "")})
    argv = " ".join(target.command_line(VMID, "tcg"))
    assert f"file={efi.OVMF_DIR / 'OVMF_CODE.fd'}" in argv
    report = target.boot_check(VMID, timeout=BOOT_TIMEOUT)
    assert manifest["efi"]["expected_serial"]["up"] in report.serial, report.serial[-2000:]


@pytest.mark.usefixtures("boots")
def test_efidisk_holds_the_variables(target: LocalTarget, samples: Path, manifest: dict[str, Any]) -> None:
    """The firmware writes its boot entries into efidisk0 (it is the vars flash, not a
    throwaway copy), and boots from it again."""
    efi_vm(target, samples, manifest, "scsi0")
    vars_path = efidisk_path(target)
    _code, template = efi.ovmf_files(False)
    assert vars_path.suffix == ".qcow2"
    before = _raw_bytes(vars_path, "qcow2")
    assert before == template.read_bytes()
    assert target.boot_check(VMID, timeout=BOOT_TIMEOUT).outcome == "up"
    after = _raw_bytes(vars_path, "qcow2")
    assert after != before
    # OVMF records the disk it booted as a Boot#### variable (UTF-16 name in the store).
    assert "Boot0001".encode("utf-16-le") in after
    second = target.boot_check(VMID, timeout=BOOT_TIMEOUT)
    assert manifest["efi"]["expected_serial"]["up"] in second.serial


@pytest.mark.usefixtures("boots")
def test_raw_efidisk_bigger_than_the_flash(target: LocalTarget, samples: Path,
                                           manifest: dict[str, Any]) -> None:
    """A raw vars volume rounded up (as an LV is, to whole extents) boots with its first
    bytes as the flash, where create_efidisk put the template: OVMF keeps its boot entry
    there and the rest stays untouched (without a size limit QEMU maps the whole volume
    and OVMF finds, and reformats, a store in its tail)."""
    efi_vm(target, samples, manifest, "scsi0", efidisk_fmt="raw")
    vars_path = efidisk_path(target)
    flash = efi.ovmf_files(False)[1].stat().st_size
    with open(vars_path, "r+b") as f:
        f.truncate(4 << 20)
    report = target.boot_check(VMID, timeout=BOOT_TIMEOUT)
    assert manifest["efi"]["expected_serial"]["up"] in report.serial, report.serial[-2000:]
    data = vars_path.read_bytes()
    assert "Boot0001".encode("utf-16-le") in data[:flash]
    assert data[flash:] == bytes(len(data) - flash)


@pytest.mark.usefixtures("boots")
def test_ovmf_without_efidisk_boots_with_throwaway_variables(
        target: LocalTarget, samples: Path, manifest: dict[str, Any]) -> None:
    efi_vm(target, samples, manifest, "scsi0")
    target.set_config(VMID, {}, delete=("efidisk0",))
    assert "snapshot=on" in " ".join(target.command_line(VMID, "tcg"))
    report = target.boot_check(VMID, timeout=BOOT_TIMEOUT)
    assert manifest["efi"]["expected_serial"]["up"] in report.serial, report.serial[-2000:]


@pytest.mark.usefixtures("boots")
def test_secure_boot_refuses_the_unsigned_guest(target: LocalTarget, samples: Path,
                                                manifest: dict[str, Any]) -> None:
    """pre-enrolled-keys=1: OVMF's Secure Boot build with Microsoft's keys, on q35 with
    SMM; the sample guest is not signed, so it must not run."""
    efi_vm(target, samples, manifest, "scsi0", secure=True, machine="q35")
    argv = " ".join(target.command_line(VMID, "tcg"))
    assert "q35,smm=on" in argv and "OVMF_CODE_4M.ms.fd" in argv
    target.start(VMID, hold=True)
    try:
        seen, output = observe(target, VMID, timeout=BOOT_TIMEOUT, patterns={
            "denied": r"failed to load Boot\d+ \"UEFI QEMU QEMU HARDDISK[^\n]*Access Denied",
            "up": manifest["efi"]["expected_serial"]["up"]})
    finally:
        target.destroy_vm(VMID)
    assert seen == "denied", output[-2000:]


def test_secure_boot_on_i440fx_is_refused(target: LocalTarget, samples: Path,
                                          manifest: dict[str, Any]) -> None:
    efi_vm(target, samples, manifest, "scsi0", secure=True, machine="pc-i440fx-7.2")
    with pytest.raises(TargetError, match=r"VM 120: Secure Boot .* needs a q35 machine"):
        target.command_line(VMID, "tcg")


@pytest.mark.parametrize("machine", ["", "q35", "pc-q35-7.2"])
def test_secure_boot_machine_is_q35_with_smm(target: LocalTarget, samples: Path,
                                             manifest: dict[str, Any], machine: str) -> None:
    """No machine key (PVE's default would be i440fx) or any q35 spelling: q35 with SMM."""
    efi_vm(target, samples, manifest, "scsi0", secure=True, **({"machine": machine} if machine else {}))
    argv = target.command_line(VMID, "tcg")
    assert argv[argv.index("-machine") + 1] == "q35,smm=on"


def test_unknown_efitype_is_refused(target: LocalTarget, samples: Path, manifest: dict[str, Any]) -> None:
    config = efi_vm(target, samples, manifest, "scsi0")
    target.set_config(VMID, {"efidisk0": config["efidisk0"].replace("efitype=4m", "efitype=8m")})
    with pytest.raises(TargetError, match="VM 120: efidisk0 has efitype=8m, expected 4m or 2m"):
        target.command_line(VMID, "tcg")


def _raw_bytes(path: Path, fmt: str) -> bytes:
    """A volume's guest-visible bytes (qemu-img convert to raw)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vars.raw"
        subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out)], check=True)
        return out.read_bytes()
