"""What a user asks for in one migration, with the defaults the seed procedure uses.

Windows guests start on IDE (no virtio driver yet), everything else on SCSI;
NIC model follows the same split (e1000 for Windows, virtio otherwise).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import V2PError

WINDOWS_OSTYPES = {"wxp", "w2k", "w2k3", "w2k8", "wvista", "win7", "win8", "win10", "win11"}
OSTYPES = WINDOWS_OSTYPES | {"l24", "l26", "solaris", "other"}
BUSES = ("ide", "sata", "scsi", "virtio")
FORMATS = ("qcow2", "raw")
COPIERS = ("qemu-img", "dd")
SCSIHW = ("lsi", "lsi53c810", "megasas", "pvscsi", "virtio-scsi-pci", "virtio-scsi-single")


class OptionError(V2PError):
    """An option value v2p cannot use."""


@dataclass
class MigrationOptions:
    """Everything that shapes the migrated VM (part of the state file's request)."""

    ostype: str = "l26"
    bus: str | None = None
    fmt: str | None = None  # None: the storage's preferred format (qcow2 on dir, raw elsewhere)
    name: str | None = None
    cores: int = 1
    memory: int = 512  # MiB, as PVE counts
    scsihw: str = "virtio-scsi-pci"
    start: bool = False
    boot_check: bool = True
    boot_timeout: float = 60.0
    bwlimit: int | None = None  # KiB/s, as PVE counts
    storage: str = "local"
    device: str | None = None  # a block device to write the disk onto, instead of a storage
    copy_with: str = "qemu-img"  # or "dd" (raw/flat sources only)
    verify: bool = True
    force: bool = False  # overwrite a block device that carries data or is held open
    drivers_iso: str | None = None  # virtio-win ISO for the Windows driver dance
    net_drivers: bool = True  # also bring in NetKVM and move the NIC to virtio
    arch: str = "amd64"  # the Windows guest's architecture (virtio-win folder name)
    dance_wait: float = 600.0  # boot 1: how long to wait for the guest's driver signal
    shutdown_timeout: float = 120.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ostype not in OSTYPES:
            raise OptionError(f"unknown --os {self.ostype!r}",
                              hint="use a PVE ostype: " + ", ".join(sorted(OSTYPES)))
        if self.bus is not None and self.bus not in BUSES:
            raise OptionError(f"unknown --bus {self.bus!r}", hint="use one of " + ", ".join(BUSES))
        if self.fmt is not None and self.fmt not in FORMATS:
            raise OptionError(f"unknown --format {self.fmt!r}", hint="use qcow2 or raw")
        if self.scsihw not in SCSIHW:
            raise OptionError(f"unknown --scsihw {self.scsihw!r}", hint="use one of " + ", ".join(SCSIHW))
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,61}[A-Za-z0-9])?", self.name):
            raise OptionError(f"--name {self.name!r} is not a valid VM name",
                              hint="use letters, digits, '-' and '.' (a DNS name, as PVE requires)")
        if self.copy_with == "dd" and self.bwlimit:
            raise OptionError("--bwlimit does not apply to --copy-with dd", hint="leave one of them out")
        if not 1 <= self.cores <= 512:
            raise OptionError(f"--cores {self.cores} is out of range (1-512)")
        if not 16 <= self.memory <= 4 << 20:
            raise OptionError(f"--memory {self.memory} MiB is out of range (16 MiB - 4 TiB)")
        if self.bwlimit is not None and self.bwlimit <= 0:
            raise OptionError("--bwlimit must be a positive number of KiB/s")
        if self.copy_with not in COPIERS:
            raise OptionError(f"unknown --copy-with {self.copy_with!r}", hint="use qemu-img or dd")
        if self.arch not in ("amd64", "x86", "ARM64"):
            raise OptionError(f"unknown --arch {self.arch!r}", hint="use amd64 or x86")
        if self.device is not None and not self.device.startswith("/"):
            raise OptionError(f"--to-device {self.device!r} is not an absolute device path")

    @property
    def is_windows(self) -> bool:
        return self.ostype in WINDOWS_OSTYPES

    @property
    def disk_bus(self) -> str:
        return self.bus or ("ide" if self.is_windows else "scsi")

    @property
    def needs_dance(self) -> bool:
        """Windows onto a virtio bus: it must get its driver on IDE first."""
        return self.is_windows and self.bus in ("virtio", "scsi")

    @property
    def attach_bus(self) -> str:
        """The bus the converted disk is attached to first (IDE when a dance follows)."""
        return "ide" if self.needs_dance else self.disk_bus

    @property
    def nic_model(self) -> str:
        return "e1000" if self.is_windows else "virtio"

    def identity(self) -> dict[str, Any]:
        """The options a resumed run must repeat exactly (start/boot-check may change)."""
        data = asdict(self)
        # verify and boot_check may change too: the stages they govern check them in holds().
        for volatile in ("start", "boot_check", "boot_timeout", "bwlimit", "verify", "force", "drivers_iso",
                         "dance_wait", "shutdown_timeout"):
            data.pop(volatile)
        return data


def check_vmid(vmid: int) -> int:
    """PVE's VMID range (100 - 999999999)."""
    if not 100 <= vmid <= 999_999_999:
        raise OptionError(f"VMID {vmid} is out of range", hint="PVE VMIDs run from 100 to 999999999")
    return vmid


def mac_for_nic(vmid: int, index: int) -> str:
    """A stable MAC in Proxmox's range for NIC ``index`` that v2p adds itself."""
    digest = hashlib.sha256(f"{vmid}:net{index}".encode()).digest()
    return "BC:24:11:" + ":".join(f"{b:02X}" for b in digest[:3])


def mac_for(vmid: int, source: Path) -> str:
    """A stable MAC in Proxmox's range (BC:24:11) for a VM without one of its own."""
    digest = hashlib.sha256(f"{vmid}:{os.path.abspath(source)}".encode()).digest()
    return "BC:24:11:" + ":".join(f"{b:02X}" for b in digest[:3])
