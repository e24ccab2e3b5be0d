"""When a boot check is over, and how it ended: the decision engine, fed what a target sees.

Pure: a target (or the driver dance) feeds ``BootWatch`` the guest's serial text, the firmware's
log text, the resets, QEMU's events and ``GuestIO`` samples as time goes on; ``look`` says
``up``, ``failed`` or ``unconfirmed`` once it can. This module starts, reads and stops nothing.

The signs are ones real guests give (Linux, Windows, BSDs), not only our stand-ins:

Failure (``failed``), checked first:

* a Windows STOP code on EMS (``*** STOP: 0x0000007B`` XP..2008R2, ``Stop code: NAME`` 8+);
* the firmware finding nothing bootable: SeaBIOS ``No bootable device.`` (src/boot.c,
  ``boot_fail``), OVMF ``BdsDxe: No bootable option or device was found.`` (edk2
  OvmfPkg/Library/PlatformBootManagerLib/BdsPlatform.c, ``PlatformBootManagerUnableToBoot``,
  printed on the console: the serial port here) — in either text; an OVMF built with the UEFI
  shell (Debian's) has it as its last boot option (PlatformBootManagerLib, ``PlatformRegisterFvBootOption``
  of "EFI Internal Shell") and starts it instead: ``BdsDxe: starting Boot0002 "EFI Internal
  Shell"`` (MdeModulePkg/Universal/BdsDxe/BdsEntry.c) is the same failure (measured: a BIOS-only
  disk under OVMF);
* GRUB stranded: ``grub rescue>``, ``error: no such partition``, ``error: unknown filesystem``;
* Linux ``Kernel panic - not syncing``;
* a guest panic event (QEMU ``GUEST_PANICKED``, from a pvpanic device; or a SHUTDOWN whose
  reason is ``guest-panic``);
* a reset loop: ``BOOT_LOOP_RESETS`` (3) resets (a Windows bugcheck restarts by default).

Up (``up``), each named in the verdict's signal:

* serial: a getty login prompt, systemd reaching its multi-user or graphical target, Windows
  SAC — at once;
* the guest powering itself off through ACPI (local: QMP ``SHUTDOWN`` with reason
  ``guest-shutdown``; firmware and boot sectors do not speak ACPI) — at once;
* block I/O: the boot disk (the first key of ``boot: order=``) has read ``OS_READ_BYTES`` since
  the last reset (a firmware or a stuck boot sector reads KiB, a boot loader its own few hundred
  KiB, an OS its kernel and initrd, Windows its boot drivers: MiB; measured in bench/README.md,
  "Boot signs"), then ``SETTLE`` seconds passed with no reset and no failure sign (a Windows that
  bugchecks 0x7B has read tens of MiB first; its automatic restart is a reset);
* network: bytes sent on a NIC that is not in the boot order (no firmware PXE sends there:
  qemu-server starts QEMU with ``-boot strict=on``, v2p's local command line gives such NICs no
  option ROM), then the same settle.

Otherwise, at the timeout: ``unconfirmed``, the signal says what was seen. A guest that stops on
its own for another reason (PVE cannot tell why) is up only if a block I/O or network sign was
already seen, else unconfirmed.

``BootWatch.signs`` keeps every sign seen: name -> ``{"at": seconds after start, "value": ...}``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from .pveconfig import DISK_KEY, parse_boot_order
from .targets.base import BOOT_FAILED, BOOT_UNCONFIRMED, BOOT_UP, BootReport, GuestIO
from .testhooks import settle_seconds
from .volumes import drive_is_cdrom

# A Windows bugcheck as EMS prints it (XP..2008R2 "*** STOP: 0x...", 8+ "Stop code: NAME"),
# and as our stand-in prints it.
STOP_CODE = r"(?:\*\*\* )?STOP:? 0x[0-9A-Fa-f]{8}[^\r\n]*|Stop code: [A-Z0-9_]+"
READY = (
    ("login prompt", re.compile(r"(?m)^(?!Last login)(?:[A-Za-z0-9][\w.-]* )?login: ")),
    ("systemd target", re.compile(r"Reached target [^\n]*?(?:Multi-User System|Graphical Interface)")),
    ("Windows SAC", re.compile(r"(?m)SAC started and initialized|^SAC>")),
)
# Failure signs in the guest's or the firmware's text: (sign name, pattern).
FAILURES = (
    ("no bootable device", re.compile(r"No bootable device|No bootable option or device was found"
                                      r"|BdsDxe: starting Boot[0-9A-Fa-f]{4} \"EFI Internal Shell\"")),
    ("grub rescue", re.compile(r"grub rescue>|error: no such partition|error: unknown filesystem")),
    ("kernel panic", re.compile(r"Kernel panic - not syncing[^\n]*")),
)
# SeaBIOS's debug port at the moment it jumps to a boot sector (src/boot.c, ``call_boot_entry``).
HANDOVER = re.compile(r"Booting from [0-9a-fA-F]{4}:[0-9a-fA-F]{4}")
BOOT_LOOP_RESETS = 3
# seconds a guest must run, without reset or failure, after a block I/O or network sign (the test suite's
# v2p processes may shorten it: testhooks.settle_seconds)
SETTLE = settle_seconds(20.0)
OS_READ_BYTES = 8 << 20  # boot disk reads that only an OS loading itself makes (bench/README.md)
_ESCAPES = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>78])|\r")

# QMP events a target passes on (QEMU qapi/run-state.json); SHUTDOWN's ``reason`` tells who.
SHUTDOWN, RESET, GUEST_PANICKED = "SHUTDOWN", "RESET", "GUEST_PANICKED"
# A VM that stopped and nobody can say why (PVE's status only turns ``stopped``).
STOPPED = "STOPPED"


def clean(text: str) -> str:
    """Serial output without terminal escapes and carriage returns (systemd colours its status)."""
    return _ESCAPES.sub("", text)


def stop_code(output: str) -> str | None:
    match = re.search(STOP_CODE, output)
    return match.group(0).strip() if match else None


def ready_sign(output: str) -> str | None:
    """The name of the first readiness sign in ``output``, if any."""
    text = clean(output)
    for name, pattern in READY:
        if pattern.search(text):
            return name
    return None


def failure_sign(output: str) -> tuple[str, str] | None:
    """(sign name, the text that said so) of the first failure sign in ``output``, if any."""
    text = clean(output)
    code = stop_code(text)
    if code:
        return "STOP code", code
    for name, pattern in FAILURES:
        match = pattern.search(text)
        if match:
            return name, match.group(0).strip()
    return None


def mib(count: int) -> str:
    """A byte count as people read it: ``512 bytes``, ``36 KiB``, ``8.0 MiB``, ``41 MiB``."""
    if count < 1 << 10:
        return f"{count} bytes"
    if count < 1 << 20:
        return f"{count >> 10} KiB"
    return f"{count / (1 << 20):.1f} MiB" if count < 10 << 20 else f"{count >> 20} MiB"


def boot_devices(config: Mapping[str, str]) -> tuple[str | None, tuple[str, ...]]:
    """(the boot disk's key, the NICs in the boot order) of a VM config: ``BootWatch``'s
    ``boot_disk`` and ``boot_nics``. The boot disk is the first disk of ``boot: order=`` that is
    not a CD-ROM."""
    order = parse_boot_order(config)
    disks = [key for key in order if DISK_KEY.match(key) and not drive_is_cdrom(config.get(key, ""))]
    return (disks[0] if disks else None), tuple(key for key in order if re.fullmatch(r"net\d+", key))


@dataclass
class Verdict:
    """How a boot check ended: ``outcome`` up | failed | unconfirmed, ``signal`` what said so."""

    outcome: str
    signal: str


class BootWatch:
    """Reads one boot as it happens; ``look`` returns a verdict once there is one (and then the
    same one on every later call).

    ``boot_disk``: the config key of the disk the firmware boots (its block I/O sign), None if
    none. ``boot_nics``: NICs in the boot order (a firmware may PXE there: no network sign).
    ``resets_seen``: whether the target passes the guest's resets on. Where it cannot (PVE's API
    shows none), a boot loop is one long boot that keeps reading its disk, so the block I/O sign
    there also needs the reads to level off: the settle starts over whenever the boot disk has read
    another ``os_read_bytes`` (another boot's worth) within it.
    """

    def __init__(self, vmid: int, *, timeout: float, settle: float = SETTLE, started: float,
                 boot_disk: str | None = None, boot_nics: Collection[str] = (),
                 os_read_bytes: int = OS_READ_BYTES, serial_log: str = "", resets_seen: bool = True) -> None:
        self.vmid = vmid
        self.timeout = timeout
        self.settle = settle
        self.started = started
        self.boot_disk = boot_disk
        self.boot_nics = frozenset(boot_nics)
        self.os_read_bytes = os_read_bytes
        self.serial_log = serial_log
        self.resets_seen = resets_seen
        self.resets = 0
        self.signs: dict[str, dict[str, Any]] = {}
        self.io = GuestIO()  # the last sample
        self._base = GuestIO()  # the counters at the last reset: a sign counts what came after
        self._candidate: tuple[str, float] | None = None  # (signal, since) of an unsettled I/O sign
        self._disk_mark: int | None = None  # the boot disk's reads when its sign's settle began
        self._restarts = 0  # settles started over by more reads (resets_seen False)
        self._stopped: tuple[str, str | None] | None = None  # (event, reason)
        self._panicked = False
        self._ready: str | None = None  # a positive sign fed through ``ready``
        self._verdict: Verdict | None = None

    # -- feeding ----------------------------------------------------------
    def observe_io(self, now: float, io: GuestIO) -> None:
        """A sample of the VM's counters (``Target.guest_io``)."""
        self.io = io
        if io.panicked:
            self._panic(now, "pvpanic")
        if self.boot_disk is not None:
            read = io.reads.get(self.boot_disk, 0) - self._base.reads.get(self.boot_disk, 0)
            if read >= self.os_read_bytes:
                self._sign(now, "boot disk reads", read)
                again = self._disk_mark is not None and read - self._disk_mark >= self.os_read_bytes
                if self._candidate is None or (again and not self.resets_seen):
                    if again:
                        self._restarts += 1
                        self._sign(now, "boot disk kept reading", read)
                    self._candidate, self._disk_mark = (f"boot disk reads ({mib(read)})", now), read
        for nic, count in sorted(io.sent.items()):
            sent = count - self._base.sent.get(nic, 0)
            if nic not in self.boot_nics and sent > 0:
                self._sign(now, "network", {nic: sent})
                self._candidate = self._candidate or (f"the guest sent {sent} bytes on {nic}", now)

    def event(self, now: float, name: str, data: Mapping[str, Any] | None = None) -> None:
        """A QMP event (``SHUTDOWN`` with its ``reason``, ``RESET``, ``GUEST_PANICKED``), or
        ``STOPPED`` for a VM seen stopped without a reason. A RESET should rather come through
        ``reset`` (with the firmware log); here it counts the same."""
        reason = (data or {}).get("reason")
        if name == GUEST_PANICKED or (name == SHUTDOWN and reason == "guest-panic"):
            self._panic(now, str((data or {}).get("action", reason or "")))
        elif name == RESET:
            self.reset(now, "")
        elif name in (SHUTDOWN, STOPPED) and self._stopped is None:
            self._stopped = (name, None if reason is None else str(reason))
            self._sign(now, "stopped", reason or "on its own")

    def ready(self, now: float, sign: str, value: Any = True) -> None:
        """A positive sign the target read elsewhere (the guest agent answering): up at the next
        ``look``, unless that look finds a failure sign first."""
        self._sign(now, sign, value)
        if self._ready is None:
            self._ready = sign if value is True else f"{sign} ({value})"

    def reset(self, now: float, firmware: str = "") -> None:
        """The guest reset (QMP ``RESET``): an I/O sign starts over from the counters now."""
        self.resets += 1
        self._sign(now, "resets", self.resets)
        self.signs["resets"]["value"] = self.resets  # when the first came, how many in all
        self._base = self.io
        self._candidate, self._disk_mark = None, None

    # -- deciding ---------------------------------------------------------
    def look(self, serial: str, firmware: str, now: float) -> Verdict | None:
        """The verdict, from everything fed so far and the texts now; None while there is none."""
        if self._verdict is None:
            self._verdict = self._decide(serial, firmware, now)
        return self._verdict

    def _decide(self, serial: str, firmware: str, now: float) -> Verdict | None:
        handover = HANDOVER.search(firmware)
        if handover:
            self._sign(now, "firmware handover", handover.group(0))
        for text in (serial, firmware):
            failure = failure_sign(text)
            if failure:
                self._sign(now, failure[0], failure[1])
                return Verdict(BOOT_FAILED, failure[1] if failure[0] == "STOP code"
                               else f"{_FAILURE_WORDS[failure[0]]}: {failure[1]}")
        if self._panicked:
            return Verdict(BOOT_FAILED, "the guest reported a panic (pvpanic)")
        if self.resets >= BOOT_LOOP_RESETS:
            return Verdict(BOOT_FAILED, f"the guest reset {self.resets} times while booting (a boot loop)")
        sign = ready_sign(serial)
        if sign:
            self._sign(now, sign, True)
            return Verdict(BOOT_UP, f"{sign} on the serial console")
        if self._ready is not None:
            return Verdict(BOOT_UP, self._ready)
        if self._stopped is not None:
            return self._stopped_verdict(now)
        if self._candidate is not None and now - self._candidate[1] >= self.settle:
            calm = "without a reset" if self.resets_seen else "with its reads levelled off (no resets seen here)"
            return Verdict(BOOT_UP, f"{self._candidate[0]}, then {self.settle:g}s {calm}")
        if now - self.started >= self.timeout:
            return Verdict(BOOT_UNCONFIRMED, f"no sign of an OS within {self.timeout:g}s: {self.seen()}")
        return None

    def _stopped_verdict(self, now: float) -> Verdict:
        event, reason = self._stopped or (STOPPED, None)
        if reason == "guest-shutdown":
            self._sign(now, "ACPI power-off", True)
            return Verdict(BOOT_UP, "the guest shut itself down (ACPI)")
        if reason is None and self._candidate is not None:
            return Verdict(BOOT_UP, f"{self._candidate[0]}, then the guest stopped on its own")
        how = f"the VM stopped ({reason})" if reason else "the VM stopped on its own"
        return Verdict(BOOT_UNCONFIRMED, f"{how} with no sign of an OS: {self.seen()}")

    def seen(self) -> str:
        """What was seen, in words, for an unconfirmed boot."""
        words = []
        if self.boot_disk is not None:
            words.append(f"{self.boot_disk} read {mib(self.io.reads.get(self.boot_disk, 0))}")
        sent = sum(count for nic, count in self.io.sent.items() if nic not in self.boot_nics)
        if self.io.sent:
            words.append(f"{sent} bytes sent")
        if "firmware handover" in self.signs:
            words.append(f"the firmware handed over at {self.signs['firmware handover']['at']}s")
        if self.resets:
            words.append(f"{self.resets} reset(s)")
        if self._restarts:
            words.append(f"its reads never levelled off ({self._restarts + 1} boots' worth): resets cannot be "
                         "seen here, so a boot loop looks the same")
        return ", ".join(words) or "nothing"

    def report(self, now: float, *, serial: str = "", firmware: str = "", accel: str = "",
               notes: list[str] | None = None) -> BootReport:
        """The ``BootReport`` of this watch as it stands (``look`` must have given a verdict)."""
        verdict = self._verdict or Verdict(BOOT_UNCONFIRMED, f"the check ended early: {self.seen()}")
        signs = dict(self.signs)
        if self.boot_disk is not None:
            signs["boot disk read in all"] = {"at": round(now - self.started, 2),
                                              "value": self.io.reads.get(self.boot_disk, 0)}
        return BootReport(outcome=verdict.outcome, seconds=round(now - self.started, 2), signal=verdict.signal,
                          serial=serial, firmware=firmware, resets=self.resets, accel=accel,
                          notes=list(notes or []), signs=signs)

    # -- helpers ----------------------------------------------------------
    def _panic(self, now: float, how: str) -> None:
        self._panicked = True
        self._sign(now, "guest panic", how or True)

    def _sign(self, now: float, name: str, value: Any) -> None:
        if name in self.signs:  # when a sign first appeared is what the table wants
            return
        self.signs[name] = {"at": round(now - self.started, 2), "value": value}


_FAILURE_WORDS = {
    "no bootable device": "the firmware found nothing to boot",
    "grub rescue": "the boot loader is stranded",
    "kernel panic": "the kernel panicked",
}
