"""What a user asks for in one migration, with the defaults the seed procedure uses.

Windows guests start on IDE (no virtio driver yet), everything else on SCSI;
NIC model follows the same split (e1000 for Windows, virtio otherwise).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import numbers
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import V2PError, shown
from .spec import VMSpec

WINDOWS_OSTYPES = {"wxp", "w2k", "w2k3", "w2k8", "wvista", "win7", "win8", "win10", "win11"}
OSTYPES = WINDOWS_OSTYPES | {"l24", "l26", "solaris", "other"}
BUSES = ("ide", "sata", "scsi", "virtio")
FORMATS = ("qcow2", "raw")
COPIERS = ("qemu-img", "dd")
BIOSES = ("seabios", "ovmf")  # PVE's bios values v2p may set
SCSIHW = ("lsi", "lsi53c810", "megasas", "pvscsi", "virtio-scsi-pci", "virtio-scsi-single")


# A day: longer waits are typing mistakes, and timer calls overflow on huge values.
MAX_SECONDS = 86400.0
CORES = (1, 512)
MEMORY = (16, 4 << 20)  # MiB: 16 MiB - 4 TiB
BWLIMIT = (1, 1 << 30)  # KiB/s: up to 1 TiB/s
VMIDS = (100, 999_999_999)  # PVE's range


class OptionError(V2PError):
    """An option value v2p cannot use."""


def check_seconds(option: str, value: object, *, zero: bool = False, typed: str | None = None) -> float:
    """A finite number of seconds, positive (or 0 when ``zero``), at most a day.

    NaN compares false with everything, so a range check alone would let it
    through (and a NaN timeout ends every wait at once): test finiteness first.
    ``typed`` is the text the user gave, shown in the error instead of ``value``.
    """
    shown = _shown(value if typed is None else typed, typed is not None)
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero):
        what = "0 or a positive number" if zero else "a positive number"
        raise OptionError(f"{option} {shown}: must be {what} of seconds")
    if number > MAX_SECONDS:
        raise OptionError(f"{option} {shown}: must be at most {MAX_SECONDS:g} seconds (a day)")
    return number


def check_whole(option: str, value: object, bounds: tuple[int, int], unit: str = "", *,
                typed: str | None = None) -> int:
    """A whole number (not a bool, not a float) within ``bounds``."""
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        unit = f" {unit}" if unit else ""
        raise OptionError(f"{option} {_shown(value if typed is None else typed, typed is not None)}: "
                          f"must be a whole number from {low} to {high}{unit}")
    return value


def parse_whole(text: str) -> int | None:
    """``text`` as a number if it is ASCII decimal digits only, else None.

    Python's int() also takes '+100', '1_000', ' 100 ' and other scripts'
    digits ('١٠٠'); none of these is a VMID or a count a user meant to type.
    """
    if not re.fullmatch(r"[0-9]+", text, flags=re.ASCII):
        return None
    digits = text.lstrip("0") or "0"
    # int() refuses strings over 4300 digits; anything this long is out of every range anyway.
    return int(digits) if len(digits) <= 18 else 10 ** 18


def parse_seconds(text: str) -> float | None:
    """``text`` as a float if written in ASCII (no '_', no blanks, no other scripts' digits), else None."""
    if not re.fullmatch(r"[0-9A-Za-z.+-]+", text, flags=re.ASCII):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _shown(value: object, typed: bool = False) -> str:
    return shown(value, typed=typed)


# What each kind of MigrationOptions field takes, by its annotation: (test, in words).
_KINDS: dict[str, tuple[Any, str]] = {
    "str": (lambda v: isinstance(v, str), "text (a str)"),
    "str | None": (lambda v: v is None or isinstance(v, str), "text (a str) or None"),
    "bool": (lambda v: isinstance(v, bool), "True or False"),
    # Numbers: their range checks (check_whole, check_seconds) refuse every other type too, in their words.
    "int | None": (lambda v: True, ""),
    "float": (lambda v: True, ""),
    "dict[str, str]": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str)
                                                             for k, x in v.items()),
                       "a dict of text to text"),
    "tuple[str, ...]": (lambda v: isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v),
                        "a list of text"),
    "dict[str, Any]": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a dict"),
}


def check_text(keyword: str, value: object, *, optional: bool = False, controls: bool = False,
               error: type[V2PError] | None = None) -> str | None:
    """``value`` as text a path or name may be: a str (or a path object) without NUL or (unless
    ``controls``) another control character, else an ``OptionError`` (or ``error``) naming ``keyword``."""
    if value is None and optional:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise (error or OptionError)(f"{keyword}={_shown(value)}: must be text (a str or a path)")
    if not value:
        raise (error or OptionError)(f"{keyword} is empty")
    if "\0" in value:
        raise (error or OptionError)(f"{keyword} {_shown(value)}: holds a NUL character, which no file name can")
    if not controls and any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        raise (error or OptionError)(f"{keyword} {_shown(value)}: holds a control character (a newline, a tab, "
                                     "...)", hint="no path or name v2p takes has one")
    return value


def check_bool(keyword: str, value: object) -> bool:
    """True or False only: 'yes', 1 or None are not a choice a caller made."""
    if not isinstance(value, bool):
        raise OptionError(f"{keyword}={_shown(value)}: must be True or False")
    return value


@dataclass
class MigrationOptions:
    """Everything that shapes the migrated VM (part of the state file's request)."""

    # None: what the source says (a .vmx's guestOS, numvcpus, memsize, ...); a loose disk says
    # nothing, so it gets l26, 1 socket x 1 core, 512 MiB.
    ostype: str | None = None
    bus: str | None = None
    fmt: str | None = None  # None: the storage's preferred format (qcow2 on dir, raw elsewhere)
    name: str | None = None
    cores: int | None = None  # per socket
    memory: int | None = None  # MiB, as PVE counts
    sockets: int | None = None
    networks: dict[str, str] = field(default_factory=dict)  # VMware network name -> bridge
    bridge: str | None = None  # for NICs whose network has no entry in ``networks``
    ignore_rules: tuple[str, ...] = ()
    scsihw: str = "virtio-scsi-pci"
    bios: str | None = None  # seabios | ovmf; None: the source's firmware (a loose disk: what it boots by)
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
    # On a failure while the VM and its disks are made, keep them for a rerun instead of removing them.
    keep_on_failure: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, keywords: dict[str, Any]) -> MigrationOptions:
        """Options from a library caller's keywords: an unknown keyword is an ``OptionError`` too."""
        known = {option.name for option in fields(cls)}
        for keyword in keywords:
            if keyword not in known:
                close = difflib.get_close_matches(str(keyword), sorted(known), n=1)
                raise OptionError(f"unknown keyword {_shown(keyword)}" + (f" (did you mean {close[0]}?)" if close
                                                                          else ""),
                                  hint="see MigrationOptions for the keywords migrate() takes")
        return cls(**keywords)

    def _check_types(self) -> None:
        """Each field of the type its annotation says, before any value check reads it: a caller's
        wrong type is one ``OptionError`` naming the keyword, never a TypeError from deep inside."""
        for option in fields(self):
            test, words = _KINDS[str(option.type)]
            value = getattr(self, option.name)
            if not test(value):
                raise OptionError(f"{option.name}={_shown(value)}: must be {words}")
        # Where a path or a name goes, no control character (a NUL, a newline into a config): as the
        # rest of the value checks, in the CLI's words (a plan says them in its own).
        for flag, value in (("--storage", self.storage), ("--to-device", self.device),
                            ("--drivers-iso", self.drivers_iso)):
            check_text(flag, value, optional=True)

    def __post_init__(self) -> None:
        self._check_types()
        if self.ostype is not None and self.ostype not in OSTYPES:
            raise OptionError(f"unknown --os {self.ostype!r}",
                              hint="use a PVE ostype: " + ", ".join(sorted(OSTYPES)))
        if self.bus is not None and self.bus not in BUSES:
            raise OptionError(f"unknown --bus {self.bus!r}", hint="use one of " + ", ".join(BUSES))
        if self.fmt is not None and self.fmt not in FORMATS:
            raise OptionError(f"unknown --format {self.fmt!r}", hint="use qcow2 or raw")
        if self.scsihw not in SCSIHW:
            raise OptionError(f"unknown --scsihw {self.scsihw!r}", hint="use one of " + ", ".join(SCSIHW))
        if self.bios is not None and self.bios not in BIOSES:
            raise OptionError(f"unknown --bios {self.bios!r}", hint="use seabios or ovmf")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,61}[A-Za-z0-9])?", self.name):
            raise OptionError(f"--name {self.name!r} is not a valid VM name",
                              hint="use letters, digits, '-' and '.' (a DNS name, as PVE requires)")
        if self.copy_with == "dd" and self.bwlimit:
            raise OptionError("--bwlimit does not apply to --copy-with dd", hint="leave one of them out")
        if self.cores is not None:
            check_whole("--cores", self.cores, CORES)
        if self.sockets is not None:
            check_whole("--sockets", self.sockets, (1, 16))
        if self.memory is not None:
            check_whole("--memory", self.memory, MEMORY, "MiB")
        bridges = [(f"--network {_shown(f'{network}={bridge}', True)}", bridge)
                   for network, bridge in self.networks.items()]
        for flag, bridge in [*bridges, ("--bridge", self.bridge or "vmbr0")]:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,15}", bridge, flags=re.ASCII):
                raise OptionError(f"{flag}: {_shown(bridge)} is not a bridge name",
                                  hint="a Linux bridge such as vmbr0")
        self.ignore_rules = tuple(self.ignore_rules)
        if self.bwlimit is not None:
            check_whole("--bwlimit", self.bwlimit, BWLIMIT, "KiB/s")
        self.boot_timeout = check_seconds("--boot-timeout", self.boot_timeout)
        self.dance_wait = check_seconds("--dance-wait", self.dance_wait)
        self.shutdown_timeout = check_seconds("--shutdown-timeout", self.shutdown_timeout, zero=True)
        if self.copy_with not in COPIERS:
            raise OptionError(f"unknown --copy-with {self.copy_with!r}", hint="use qemu-img or dd")
        if self.arch not in ("amd64", "x86", "ARM64"):
            raise OptionError(f"unknown --arch {self.arch!r}", hint="use amd64 or x86")
        if self.device is not None and not self.device.startswith("/"):
            raise OptionError(f"--to-device {self.device!r} is not an absolute device path")

    def hardware(self, spec: VMSpec) -> VMSpec:
        """``spec`` with the hardware the user asked for instead (--sockets, --cores, --memory, --bios)."""
        spec = replace(spec, sockets=self.sockets or spec.sockets, cores=self.cores or spec.cores,
                       memory_mib=self.memory or spec.memory_mib)
        if self.bios is None:
            return spec
        firmware = "efi" if self.bios == "ovmf" else "bios"
        return replace(spec, firmware=firmware, firmware_from="option",
                       secure_boot=spec.secure_boot and firmware == "efi")

    def chosen_ostype(self, spec: VMSpec) -> str | None:
        """The ostype the user decided (``--os``), or l26 for a loose disk that says nothing;
        None when the VM's own guest OS decides (and the rules judge it)."""
        return self.ostype or (None if spec.guest_os else "l26")

    def resolved(self, spec: VMSpec) -> MigrationOptions:
        """These options with what the user left out taken from the VM's own hardware."""
        ostype = self.chosen_ostype(spec) or spec.ostype
        return replace(self, ostype=ostype, sockets=self.sockets or spec.sockets,
                       cores=self.cores or spec.cores, memory=self.memory or spec.memory_mib)

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
                         "dance_wait", "shutdown_timeout", "keep_on_failure"):
            data.pop(volatile)
        if data["bios"] is None:  # as recorded before --bios existed: those records still match
            data.pop("bios")
        result: dict[str, Any] = json.loads(json.dumps(data))  # as the state file will give it back
        return result


def check_vmid(vmid: object) -> int:
    """A whole number in PVE's VMID range (100 - 999999999); not a bool, float or string."""
    if isinstance(vmid, bool) or not isinstance(vmid, int):
        raise OptionError(f"VMID {_shown(vmid)} is not a whole number",
                          hint="PVE VMIDs are whole numbers from 100 to 999999999")
    if not VMIDS[0] <= vmid <= VMIDS[1]:
        raise OptionError(f"VMID {vmid} is out of range", hint="PVE VMIDs run from 100 to 999999999")
    return vmid


def parse_vmid(text: str) -> int:
    """A VMID as a user typed it: ASCII decimal digits only, in PVE's range."""
    vmid = parse_whole(text)
    if vmid is None and re.fullmatch(r"-[0-9]+", text, flags=re.ASCII):
        raise OptionError(f"VMID {text} is out of range", hint="PVE VMIDs run from 100 to 999999999")
    if vmid is None:
        raise OptionError(f"VMID {_shown(text, True)}: a VMID is written in the digits 0-9 only",
                          hint="PVE VMIDs run from 100 to 999999999")
    if not VMIDS[0] <= vmid <= VMIDS[1]:
        raise OptionError(f"VMID {_shown(text, True)} is out of range", hint="PVE VMIDs run from 100 to 999999999")
    return vmid


def mac_for_nic(vmid: int, index: int) -> str:
    """A stable MAC in Proxmox's range for NIC ``index`` that v2p adds itself."""
    digest = hashlib.sha256(f"{vmid}:net{index}".encode()).digest()
    return "BC:24:11:" + ":".join(f"{b:02X}" for b in digest[:3])


def mac_for(vmid: int, source: Path) -> str:
    """A stable MAC in Proxmox's range (BC:24:11) for a VM without one of its own."""
    digest = hashlib.sha256(f"{vmid}:{os.path.abspath(source)}".encode()).digest()
    return "BC:24:11:" + ":".join(f"{b:02X}" for b in digest[:3])
