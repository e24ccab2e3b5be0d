"""UEFI firmware for VMs: which OVMF files a config needs, and its EFI vars disk.

A VM with ``bios: ovmf`` runs OVMF from two flash chips, as Proxmox does: the
firmware code read-only, and the VM's own variable store (``efidisk0``,
created from OVMF's VARS template) writable, so boot entries and Secure Boot
keys persist across boots. Here are the file choices and the efidisk; the
QEMU argv is ``qemu_cmdline``'s, the volume is a ``Storage``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import TargetError
from ..runner import run
from ..storage import Storage
from ..volumes import Drive, parse_drive, print_drive
from .base import VMConfig

OVMF_DIR = Path("/usr/share/OVMF")  # Debian's ovmf package
# efitype -> (code, vars template) without and with Secure Boot keys pre-enrolled.
# The Secure Boot code needs SMM (q35, smm=on); the plain code runs on pc and q35.
_FILES = {
    "4m": {False: ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
           True: ("OVMF_CODE_4M.ms.fd", "OVMF_VARS_4M.ms.fd")},
    "2m": {False: ("OVMF_CODE.fd", "OVMF_VARS.fd"),
           True: ("OVMF_CODE.secboot.fd", "OVMF_VARS.ms.fd")},
}
DEFAULT_EFITYPE = "4m"  # what v2p creates; PVE reads a missing efitype as 2m (older VMs)


@dataclass(frozen=True)
class Firmware:
    """The OVMF a VM boots: code and vars template paths, and whether Secure Boot is on."""

    code: Path
    vars_template: Path
    secure: bool
    efitype: str

    @property
    def vars_size(self) -> int:
        """Bytes of the vars flash: QEMU refuses a vars drive of any other size."""
        return self.vars_template.stat().st_size


def ovmf_files(secure: bool, efitype: str = DEFAULT_EFITYPE) -> tuple[Path, Path]:
    """(code, vars template) of OVMF for ``efitype`` (``4m`` or ``2m``), with Microsoft's
    Secure Boot keys pre-enrolled in the template when ``secure``."""
    if efitype not in _FILES:
        raise TargetError(f"unknown efitype {efitype!r}", hint="use 4m or 2m")
    code, template = (OVMF_DIR / name for name in _FILES[efitype][secure])
    for path in (code, template):
        if not path.exists():
            raise TargetError(f"UEFI firmware file {path} is missing", hint="apt-get install ovmf")
    return code, template


def efidisk_options(config: VMConfig) -> tuple[str, dict[str, str]] | None:
    """(volid, options) of the config's ``efidisk0``, or None without one."""
    value = config.get("efidisk0")
    if not value:
        return None
    try:
        drive = parse_drive(value)
    except ValueError as exc:
        raise TargetError(f"efidisk0: {exc}") from None
    return drive.volume, drive.options


def firmware(vmid: int, config: VMConfig) -> Firmware | None:
    """The OVMF a config asks for (None for SeaBIOS); ``efidisk0``'s ``efitype`` and
    ``pre-enrolled-keys`` pick the files, as on Proxmox."""
    if config.get("bios", "seabios") != "ovmf":
        return None
    disk = efidisk_options(config)
    options = disk[1] if disk else {}
    efitype = options.get("efitype", "2m" if disk else DEFAULT_EFITYPE)
    secure = options.get("pre-enrolled-keys", "0") == "1"
    if efitype not in _FILES:
        raise TargetError(f"VM {vmid}: efidisk0 has efitype={efitype}, expected 4m or 2m")
    code, template = ovmf_files(secure, efitype)
    return Firmware(code, template, secure, efitype)


def efidisk_value(volid: str, *, secure: bool, efitype: str = DEFAULT_EFITYPE) -> str:
    """The ``efidisk0`` config value for a vars volume made by ``create_efidisk``."""
    _code, template = ovmf_files(secure, efitype)
    size_kib = template.stat().st_size // 1024
    return print_drive(Drive(volid, {"efitype": efitype, "pre-enrolled-keys": str(int(secure)),
                                     "size": f"{size_kib}K"}))


def create_efidisk(storage: Storage, vmid: int, *, secure: bool, efitype: str = DEFAULT_EFITYPE,
                   index: int | None = None, fmt: str | None = None) -> str:
    """A new EFI vars volume for VM ``vmid`` on ``storage``, a copy of OVMF's template;
    returns its volid. ``index`` defaults to the first disk number free on the storage,
    ``fmt`` to the storage's preferred format."""
    _code, template = ovmf_files(secure, efitype)
    fmt = fmt or storage.formats()[0]
    if index is None:
        index = 0
        while any(storage.exists(storage.volume(vmid, index, f)) for f in storage.formats()):
            index += 1
    size = template.stat().st_size
    partial = storage.allocate(vmid, index, fmt, size)
    if partial.is_block:
        # An LV is rounded up to whole extents; qemu_cmdline gives the flash the template's size.
        run(["qemu-img", "convert", "-q", "-n", "-f", "raw", "-O", fmt, str(template), str(partial.path)],
            timeout=60)
    else:
        run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(template), str(partial.path)],
            timeout=60)
    final = storage.volume(vmid, index, fmt)
    storage.commit(partial, final)
    return final.volid
