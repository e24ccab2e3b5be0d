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
from typing import Any

from .errors import V2PError, shown
from .option_table import MAX_SECONDS, OPTION, OPTIONS, Option
from .option_table import WINDOWS_OSTYPES as WINDOWS_OSTYPES  # pveconfig's
from .spec import VMSpec

VMIDS = (100, 999_999_999)  # PVE's range
VM_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,61}[A-Za-z0-9])?")
BRIDGE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,15}", re.ASCII)


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


# What each kind of option takes from a library caller: (test, in words). Numbers have none here:
# their range checks (check_whole, check_seconds) refuse every other type too, in their words.
_TEXT = (lambda v: isinstance(v, str), "text (a str)")
_TYPES: dict[str, tuple[Any, str]] = {
    "bridges": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()),
                "a dict of text to text"),
    "rules": (lambda v: isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v), "a list of text"),
    "bool": (lambda v: isinstance(v, bool), "True or False"),
    "extra": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a dict"),
    **{kind: _TEXT for kind in ("choice", "text", "device", "vm-name", "bridge")},
}


def _check_type(option: Option, value: object) -> None:
    """``value`` of the type ``option`` takes, before any value check reads it: a caller's wrong type
    is one ``OptionError`` naming the keyword, never a TypeError from deep inside."""
    if option.kind not in _TYPES or value is None and option.optional:
        return
    test, words = _TYPES[option.kind]
    if not test(value):
        optional = " or None" if option.optional else ""
        raise OptionError(f"{option.keyword}={_shown(value)}: must be {words}{optional}")


def check_option(option: Option, value: Any, label: str | None = None) -> Any:
    """``value`` checked as ``option`` takes it, an ``OptionError`` in the words of ``label`` (its
    CLI flag unless given: a plan gives its key); returns it as kept (seconds a float, rules a tuple)."""
    label = label or option.flag or option.keyword
    if value is None and option.optional:
        return None
    kind = option.kind
    if kind == "choice" and value not in option.choices:
        choices = option.choices
        hint = f"use {option.choices_are}: {', '.join(choices)}" if option.choices_are else \
            f"use {choices[0]} or {choices[1]}" if len(choices) == 2 else f"use one of {', '.join(choices)}"
        raise OptionError(f"unknown {label} {value!r}", hint=hint)
    if kind in ("text", "device"):
        check_text(label, value)
    if kind == "device" and not value.startswith("/"):
        raise OptionError(f"{label} {value!r} is not an absolute device path")
    if kind == "vm-name" and not VM_NAME.fullmatch(value):
        raise OptionError(f"{label} {value!r} is not a valid VM name",
                          hint="use letters, digits, '-' and '.' (a DNS name, as PVE requires)")
    if kind == "bridge":
        _check_bridge(label, value)
    if kind == "bridges":
        for network, bridge in value.items():
            _check_bridge(f"{label} {_shown(f'{network}={bridge}', True)}", bridge)
    if kind == "rules":
        return tuple(value)
    if kind == "whole":
        return check_whole(label, value, option.bounds, option.unit)
    if kind == "seconds":
        return check_seconds(label, value, zero=option.zero)
    return value


def _check_bridge(label: str, bridge: str) -> None:
    if not BRIDGE.fullmatch(bridge):
        raise OptionError(f"{label}: {_shown(bridge)} is not a bridge name", hint="a Linux bridge such as vmbr0")


def _default(keyword: str) -> Any:
    """The table's default for a ``MigrationOptions`` field (a fresh one where it is a dict)."""
    default = OPTION[keyword].default
    if isinstance(default, dict):
        return field(default_factory=dict)
    return field(default=default)


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


def did_you_mean(word: str, choices: Any) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``word``, or nothing when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class MigrationOptions:
    """Everything that shapes the migrated VM (part of the state file's request); what each field
    means, its default and its range are in ``option_table.OPTIONS``."""

    # None: what the source says (a .vmx's guestOS, numvcpus, memsize, ...); a loose disk says
    # nothing, so it gets l26, 1 socket x 1 core, 512 MiB.
    ostype: str | None = _default("ostype")
    bus: str | None = _default("bus")
    fmt: str | None = _default("fmt")  # None: the storage's preferred format (qcow2 on dir, raw elsewhere)
    name: str | None = _default("name")
    cores: int | None = _default("cores")  # per socket
    memory: int | None = _default("memory")  # MiB, as PVE counts
    sockets: int | None = _default("sockets")
    networks: dict[str, str] = _default("networks")  # VMware network name -> bridge
    bridge: str | None = _default("bridge")  # for NICs whose network has no entry in ``networks``
    ignore_rules: tuple[str, ...] = _default("ignore_rules")
    scsihw: str = _default("scsihw")
    bios: str | None = _default("bios")  # seabios | ovmf; None: the source's firmware (a loose disk: what it boots by)
    start: bool = _default("start")
    boot_check: bool = _default("boot_check")
    boot_timeout: float = _default("boot_timeout")
    bwlimit: int | None = _default("bwlimit")  # KiB/s, as PVE counts
    storage: str = _default("storage")
    device: str | None = _default("device")  # a block device to write the disk onto, instead of a storage
    copy_with: str = _default("copy_with")  # or "dd" (raw/flat sources only)
    verify: bool = _default("verify")
    force: bool = _default("force")  # overwrite a block device that carries data or is held open
    drivers_iso: str | None = _default("drivers_iso")  # virtio-win ISO for the Windows driver dance
    net_drivers: bool = _default("net_drivers")  # also bring in NetKVM and move the NIC to virtio
    arch: str = _default("arch")  # the Windows guest's architecture (virtio-win folder name)
    dance_wait: float = _default("dance_wait")  # boot 1: how long to wait for the guest's driver signal
    shutdown_timeout: float = _default("shutdown_timeout")
    shutdown: bool = _default("shutdown")  # a running source VM: shut it down (else it is refused)
    shutdown_wait: float = _default("shutdown_wait")  # for its guest to shut down, then powered off
    # On a failure while the VM and its disks are made, keep them for a rerun instead of removing them.
    keep_on_failure: bool = _default("keep_on_failure")
    extra: dict[str, Any] = _default("extra")

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

    def __post_init__(self) -> None:
        # Every type first: a value check may read another option (copy_with with bwlimit).
        for option in OPTIONS:
            _check_type(option, getattr(self, option.keyword))
        for option in OPTIONS:
            setattr(self, option.keyword, check_option(option, getattr(self, option.keyword)))
        if self.copy_with == "dd" and self.bwlimit:
            raise OptionError("--bwlimit does not apply to --copy-with dd", hint="leave one of them out")

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
    def needs_dance(self) -> bool:
        """Windows onto a virtio bus: it must get its driver on IDE first."""
        return self.is_windows and self.bus in ("virtio", "scsi")

    @property
    def nic_model(self) -> str:
        return "e1000" if self.is_windows else "virtio"

    def identity(self) -> dict[str, Any]:
        """The options a resumed run must repeat exactly (start/boot-check may change)."""
        data = asdict(self)
        # verify and boot_check may change too: the stages they govern check them in holds().
        for option in OPTIONS:
            if option.volatile:
                data.pop(option.keyword)
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


# PVE's own prefix (datacenter.cfg ``mac_prefix``'s default): qemu-server gives a NIC without a MAC
# PVE::Tools::random_ether_addr($dc->{mac_prefix}), the prefix followed by random bytes.
MAC_PREFIX = "BC:24:11"
# Where a preview (dry run, vm inspect) shows a MAC the migration will generate.
MAC_PLACEHOLDER = f"{MAC_PREFIX}:<random>"


def mac_for_nic(seed: str | None, index: int) -> str:
    """The MAC v2p gives NIC ``index`` that has none: PVE's prefix, then three bytes from the
    migration's random ``seed`` (its ``migration_id``, kept in the state file), so every rerun of
    that migration agrees and two migrations (two clusters) do not. None (a preview, no migration
    yet): ``MAC_PLACEHOLDER``."""
    if seed is None:
        return MAC_PLACEHOLDER
    digest = hashlib.sha256(f"{seed}:net{index}".encode()).digest()
    return f"{MAC_PREFIX}:" + ":".join(f"{b:02X}" for b in digest[:3])

