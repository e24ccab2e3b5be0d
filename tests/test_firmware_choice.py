"""The firmware a migrated VM gets from its boot disk's partition table (issue 17, item 3).

A loose disk only UEFI can boot (GPT, an EFI system partition, no BIOS boot code that has
anything to boot) gets OVMF, q35 and an efidisk, with an info finding saying why; a hybrid GPT
disk and an MBR disk stay on SeaBIOS; ``--bios`` / ``bios:`` / ``MigrationOptions.bios``
override; a .vmx whose firmware its boot disk cannot boot by gets a ``firmware-mismatch``
warning and keeps its firmware. The disks are partitioned by the real sfdisk, their BIOS
boot code is syslinux's (Debian's syslinux-common) or the sample guest's own boot sector.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import V2P
from v2p import api
from v2p.inspect import inspect_disk
from v2p.inspect.bootsector import layout
from v2p.options import MigrationOptions, OptionError
from v2p.plan import Plan
from v2p.sources.disk import DiskSource

MiB = 1 << 20
FIXTURES = Path(__file__).parent / "fixtures"
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr")  # Debian's syslinux-common: real BIOS boot code


def sfdisk_disk(path: Path, script: str, *, code: bytes = b"", mib: int = 8) -> Path:
    """A raw disk of ``mib`` MiB partitioned by sfdisk from ``script``, with ``code`` in the MBR's
    boot code area first (sfdisk keeps it, as grub-install's or syslinux's code stays there)."""
    assert len(code) <= 440
    with open(path, "wb") as handle:
        handle.truncate(mib * MiB)
        handle.write(code)
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True, capture_output=True)
    return path


def boot_code(name: str) -> bytes:
    """syslinux's MBR code ``name`` (mbr.bin: boots the active MBR partition, as Windows' code does;
    gptmbr.bin: boots the GPT partition with the legacy BIOS bootable attribute)."""
    return (SYSLINUX_MBR / name).read_bytes()[:440]


def guest_code(samples: Path) -> bytes:
    """The sample BIOS guest's own boot sector code."""
    return (samples / "guest.raw").read_bytes()[:440]


def inspected(path: Path, **options: Any) -> api.VMReport:
    """What migrate would make of the loose disk at ``path``: config and findings (no target)."""
    return api.inspect_vm(DiskSource(path), vmid=301, **options)


def findings(report: api.VMReport) -> dict[str, tuple[str, str]]:
    return {f.id: (f.severity, f.message) for f in report.findings}


# --- the layouts the real tools write ------------------------------------------------------------

def test_the_efi_sample_is_uefi_only_and_the_bios_sample_is_bios(samples: Path) -> None:
    efi = inspect_disk(samples / "efi" / "efi.vmdk")
    assert (efi.boot_signature, efi.boot_firmware) == ("gpt", "efi")
    assert efi.boot_detail == "GPT, an EFI system partition, no BIOS boot code"
    assert efi.to_dict()["boot_firmware"] == "efi"
    plain = inspect_disk(samples / "guest.raw")
    assert (plain.boot_signature, plain.boot_firmware) == ("mbr", "bios")


def test_gpt_with_esp_and_no_boot_code_is_uefi_only(tmp_path: Path) -> None:
    disk = sfdisk_disk(tmp_path / "uefi.img", f"label: gpt\nsize=4M, type={ESP}\ntype={LINUX_FS}\n")
    assert inspect_disk(disk).boot_firmware == "efi"


def test_hybrid_gpt_with_a_bios_boot_partition_boots_both_ways(tmp_path: Path, samples: Path) -> None:
    """GRUB's layout for BIOS on GPT (its core.img in the BIOS boot partition), beside an ESP."""
    disk = sfdisk_disk(tmp_path / "hybrid.img", f"label: gpt\nsize=1M, type={BIOS_BOOT}\nsize=4M, type={ESP}\n",
                       code=guest_code(samples))
    image = inspect_disk(disk)
    assert image.boot_firmware == "both"
    assert "BIOS boot code and a BIOS boot partition" in image.boot_detail


def test_gpt_with_syslinux_gptmbr_and_a_legacy_bootable_partition_is_bios_bootable(tmp_path: Path) -> None:
    disk = sfdisk_disk(tmp_path / "gptmbr.img",
                       f"label: gpt\nsize=4M, type={ESP}\ntype={LINUX_FS}, attrs=\"LegacyBIOSBootable\"\n",
                       code=boot_code("gptmbr.bin"))
    assert inspect_disk(disk).boot_firmware == "both"


def test_mbr_code_with_nothing_to_boot_does_not_make_a_gpt_disk_bios_bootable(tmp_path: Path) -> None:
    """Windows writes its MBR code into a GPT disk's protective MBR too; that code boots the active
    MBR partition and a protective MBR has none. syslinux's mbr.bin is such code."""
    disk = sfdisk_disk(tmp_path / "windows-like.img", f"label: gpt\nsize=4M, type={ESP}\ntype={LINUX_FS}\n",
                       code=boot_code("mbr.bin"))
    image = inspect_disk(disk)
    assert image.boot_firmware == "efi"
    assert "MBR boot code with nothing to boot" in image.boot_detail


def test_grub_boot_img_on_gpt_without_a_bios_boot_partition_counts_as_bios(tmp_path: Path) -> None:
    """grub-install --force on GPT without a BIOS boot partition: boot.img loads core.img from sector
    lists. Its code is recognised by its "GRUB " string (grub-core/boot/i386/pc/boot.S)."""
    code = bytes(0x17C) + b"GRUB \0Geom\0Hard Disk\0Read\0 Error\r\n\0"
    disk = sfdisk_disk(tmp_path / "grub.img", f"label: gpt\nsize=4M, type={ESP}\n", code=code)
    assert inspect_disk(disk).boot_firmware == "both"


def test_mbr_disks(tmp_path: Path, samples: Path) -> None:
    plain = sfdisk_disk(tmp_path / "mbr.img", "label: dos\ntype=83, bootable\n", code=guest_code(samples))
    assert inspect_disk(plain).boot_firmware == "bios"
    # an MBR disk with an ESP (type 0xEF) and no boot code: UEFI boots it, BIOS has no code to run
    esp_only = sfdisk_disk(tmp_path / "mbr-esp.img", "label: dos\nsize=4M, type=ef\n")
    assert inspect_disk(esp_only).boot_firmware == "efi"


def test_a_gpt_whose_esp_entry_lies_beyond_the_usual_sectors_is_read_there(tmp_path: Path) -> None:
    """A 512-entry table with the ESP as partition 200: its entry is in sector 51, past the 34
    sectors inspect reads first; it reads on as far as the header says."""
    disk = tmp_path / "far.img"
    sfdisk_disk(disk, f"label: gpt\ntable-length: 512\n{disk}200 : size=4M, type={ESP}\n")
    assert layout(disk.read_bytes()[:34 * 512]).efi is False
    assert inspect_disk(disk).boot_firmware == "efi"


def test_no_boot_signature(tmp_path: Path) -> None:
    assert layout(bytes(34 * 512)).firmware == "none"


# --- the decision and its findings ---------------------------------------------------------------

def test_loose_uefi_disk_gets_ovmf_q35_and_an_efidisk(samples: Path) -> None:
    report = inspected(samples / "efi" / "efi.vmdk")
    assert report.spec is not None and report.spec.firmware == "efi"
    assert report.config["bios"] == "ovmf"
    assert report.config["machine"] == "q35"
    assert report.config["efidisk0"] == "<storage>:1,efitype=4m,pre-enrolled-keys=0"
    severity, message = findings(report)["uefi-disk"]
    assert severity == "info"
    assert "GPT, an EFI system partition, no BIOS boot code: only UEFI can boot it" in message
    assert "firmware-mismatch" not in findings(report)


def test_bios_option_overrides_the_disk(samples: Path) -> None:
    report = inspected(samples / "efi" / "efi.vmdk", bios="seabios")
    assert report.config["bios"] == "seabios"
    assert "machine" not in report.config and "efidisk0" not in report.config
    severity, message = findings(report)["firmware-mismatch"]
    assert severity == "warning"
    assert message.startswith("--bios seabios, but boot disk ")
    assert message.endswith(": SeaBIOS cannot boot it; kept as asked")
    assert "uefi-disk" not in findings(report)
    # and the other way: --bios ovmf on the BIOS guest
    report = inspected(samples / "guest.raw", bios="ovmf")
    assert (report.config["bios"], report.config["machine"]) == ("ovmf", "q35")
    assert "efidisk0" in report.config
    assert findings(report)["firmware-mismatch"][1].startswith("--bios ovmf, but boot disk ")


def test_plain_bios_guest_and_hybrid_disk_stay_on_seabios(tmp_path: Path, samples: Path) -> None:
    hybrid = sfdisk_disk(tmp_path / "hybrid.img", f"label: gpt\nsize=1M, type={BIOS_BOOT}\nsize=4M, type={ESP}\n",
                         code=guest_code(samples))
    for disk in (samples / "guest.raw", hybrid):
        report = inspected(disk)
        assert report.config["bios"] == "seabios", disk
        assert "machine" not in report.config and "efidisk0" not in report.config
        assert not {"uefi-disk", "firmware-mismatch"} & set(findings(report)), disk


def write_vmx(folder: Path, disk: Path, firmware: str | None) -> Path:
    """A minimal .vmx with ``disk`` as scsi0:0 and ``firmware`` (None: no firmware line, BIOS)."""
    folder.mkdir()
    shutil.copy(disk, folder / disk.name)
    line = f'firmware = "{firmware}"\n' if firmware else ""
    vmx = folder / "vm.vmx"
    vmx.write_text(f'.encoding = "UTF-8"\nconfig.version = "8"\nvirtualHW.version = "19"\ndisplayName = "vm"\n'
                   f'guestOS = "debian11-64"\nmemsize = "512"\n{line}scsi0.present = "TRUE"\n'
                   f'scsi0.virtualDev = "pvscsi"\nscsi0:0.present = "TRUE"\nscsi0:0.fileName = "{disk.name}"\n')
    return vmx


def test_bios_vmx_with_a_uefi_only_disk_warns_and_keeps_bios(tmp_path: Path, samples: Path) -> None:
    vmx = write_vmx(tmp_path / "vm", samples / "efi" / "efi.raw", None)
    report = api.inspect_vm(vmx)
    assert report.config["bios"] == "seabios"
    severity, message = findings(report)["firmware-mismatch"]
    assert severity == "warning"
    assert message == ("the source says BIOS, but boot disk scsi0:0 (efi.raw): GPT, an EFI system partition, no "
                       "BIOS boot code: SeaBIOS cannot boot it; kept (--bios ovmf to change)")
    assert report.verdict == "warning"
    fixed = api.inspect_vm(vmx, bios="ovmf")
    assert fixed.config["bios"] == "ovmf" and "efidisk0" in fixed.config
    assert "firmware-mismatch" not in findings(fixed)


def test_efi_vmx_with_a_bios_only_disk_warns_and_keeps_efi(tmp_path: Path, samples: Path) -> None:
    vmx = write_vmx(tmp_path / "vm", samples / "guest.raw", "efi")
    report = api.inspect_vm(vmx)
    assert report.config["bios"] == "ovmf"
    severity, message = findings(report)["firmware-mismatch"]
    assert severity == "warning"
    assert message.startswith("the source says EFI, but boot disk scsi0:0 (guest.raw): MBR, boot code: OVMF will "
                              "most likely find no boot loader on it; kept (--bios seabios to change)")


def test_efi_ova_whose_disk_read_in_place_is_bios_only_warns() -> None:
    """The issue's OVA fixture: VMware's tools wrote an EFI VM around an MBR disk; its disk is read
    in place from the archive, and its first sectors through that same window."""
    report = api.inspect_vm(FIXTURES / "v2p-fixture.ova", bridge="vmbr0")
    assert report.config["bios"] == "ovmf"
    assert findings(report)["firmware-mismatch"] == (
        "warning", "the source says EFI, but boot disk nvme0:0 (file0): MBR, boot code: OVMF will most likely "
                   "find no boot loader on it; kept (--bios seabios to change)")


def test_matching_vmx_has_no_firmware_finding(tmp_path: Path, samples: Path) -> None:
    efi = api.inspect_vm(write_vmx(tmp_path / "efi", samples / "efi" / "efi.raw", "efi"))
    bios = api.inspect_vm(write_vmx(tmp_path / "bios", samples / "guest.raw", "bios"))
    for report in (efi, bios):
        assert not {"uefi-disk", "firmware-mismatch"} & set(findings(report))


def test_bios_option_in_the_library_and_in_plans(tmp_path: Path) -> None:
    assert MigrationOptions.of({"bios": "ovmf"}).bios == "ovmf"
    # a resumed run must ask for the same firmware; without --bios, records made before it match
    assert MigrationOptions(bios="ovmf").identity()["bios"] == "ovmf"
    assert "bios" not in MigrationOptions().identity()
    with pytest.raises(OptionError, match="unknown --bios 'uefi'"):
        MigrationOptions(bios="uefi")
    (tmp_path / "a.vmdk").write_bytes(b"")
    plan = Plan.from_dict({"defaults": {"bios": "ovmf"}, "vms": [{"source": "a.vmdk", "vmid": 130},
                                                                 {"source": "a.vmdk", "vmid": 131,
                                                                  "bios": "seabios"}]},
                          base=tmp_path, strict=False)
    assert [vm.options for vm in plan.vms] == [{"bios": "ovmf"}, {"bios": "seabios"}]
    plan = Plan.from_dict({"vms": [{"source": "a.vmdk", "vmid": 130, "bios": "uefi"}]}, base=tmp_path,
                          strict=False)
    assert any("unknown bios 'uefi'" in str(problem) for problem in plan.problems())


# --- end to end: the CLI on the local target, a real boot ----------------------------------------

def test_loose_uefi_disk_migrates_and_boots_under_ovmf(samples: Path, manifest: dict[str, Any], v2p: V2P) -> None:
    shown = v2p("inspect", str(samples / "efi" / "efi.vmdk")).stdout
    assert "  boot:      gpt, boots only by UEFI (GPT, an EFI system partition, no BIOS boot code)" in shown
    proc = v2p("migrate", str(samples / "efi" / "efi.vmdk"), "--vmid", "301")
    config = v2p.config(301)
    assert (config["bios"], config["machine"]) == ("ovmf", "q35"), proc.stdout + proc.stderr
    assert config["efidisk0"].startswith("local:301/vm-301-disk-1.qcow2,efitype=4m,pre-enrolled-keys=0")
    assert "uefi-disk: boot disk" in proc.stdout
    # The guest's own line, which it prints only once OVMF has started it.
    assert manifest["efi"]["expected_serial"]["up"] in v2p.serial(301), v2p.serial(301)[-2000:]


def test_bios_seabios_keeps_seabios_for_a_uefi_disk(samples: Path, v2p: V2P) -> None:
    proc = v2p("migrate", str(samples / "efi" / "efi.vmdk"), "--vmid", "302", "--bios", "seabios",
               "--no-boot-check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = v2p.config(302)
    assert config["bios"] == "seabios"
    assert "machine" not in config and "efidisk0" not in config
    assert "firmware-mismatch: --bios seabios, but boot disk" in proc.stdout
