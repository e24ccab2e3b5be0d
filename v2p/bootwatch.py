"""When a boot check is over: what a booting guest shows, read in one place.

The signs are ones real guests give, not our stand-ins:

* up: a getty login prompt (``debian login: `` — agetty, busybox getty,
  mingetty all print ``<hostname> login: ``), systemd reaching its multi-user
  or graphical target, Windows' Emergency Management Services (SAC) on the
  serial port; or, for a guest that says nothing on its serial port, the
  firmware having handed over to the boot sector and the guest then running
  ``settle`` seconds without a reset;
* down: a Windows STOP code (``*** STOP: 0x0000007B``, ``Stop code:
  INACCESSIBLE_BOOT_DEVICE`` on EMS), the firmware finding no bootable disk,
  or a boot loop (resets).

Target-agnostic: a target feeds ``BootWatch`` the serial and firmware text
and the resets it sees; this module starts and stops nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BootCheckError

# A Windows bugcheck as EMS prints it (XP..2008R2 "*** STOP: 0x...", 8+ "Stop code: NAME"),
# and as our stand-in prints it.
STOP_CODE = r"(?:\*\*\* )?STOP:? 0x[0-9A-Fa-f]{8}[^\r\n]*|Stop code: [A-Z0-9_]+"
READY = (
    ("login prompt", re.compile(r"(?m)^(?!Last login)(?:[A-Za-z0-9][\w.-]* )?login: ")),
    ("systemd target", re.compile(r"Reached target [^\n]*?(?:Multi-User System|Graphical Interface)")),
    ("Windows SAC", re.compile(r"(?m)SAC started and initialized|^SAC>")),
)
NO_BOOTABLE = re.compile(r"No bootable device")
# SeaBIOS's debug port at the moment it jumps to a boot sector (or an option ROM's entry point).
HANDOVER = re.compile(r"Booting from [0-9a-fA-F]{4}:[0-9a-fA-F]{4}")
BOOT_LOOP_RESETS = 3
SETTLE = 20.0  # seconds a silent guest must run after the handover to count as up
_SILENT_FIRMWARE = 5.0  # SeaBIOS writes its debug log within a second; OVMF's release build never
_ESCAPES = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>78])|\r")


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


@dataclass
class Verdict:
    """How a boot check ended: ``outcome`` up | powered-off | running, ``signal`` what said so."""

    outcome: str
    signal: str


class BootWatch:
    """Reads one boot as it happens; ``look`` returns a verdict once there is one."""

    def __init__(self, vmid: int, *, timeout: float, settle: float, started: float, serial_log: str = "") -> None:
        self.vmid = vmid
        self.timeout = timeout
        self.settle = settle
        self.started = started
        self.serial_log = serial_log
        self.resets = 0
        self._handovers_before = 0  # handovers the firmware log held at the last reset
        self._handed_over_at: float | None = None

    def reset(self, now: float, firmware: str) -> None:
        self.resets += 1
        if self.resets >= BOOT_LOOP_RESETS:
            raise BootCheckError(f"VM {self.vmid} reset {self.resets} times while booting (a boot loop)",
                                 hint=f"see the guest's serial log: {self.serial_log}")
        self._handovers_before = len(HANDOVER.findall(firmware))
        self._handed_over_at = None

    def look(self, serial: str, firmware: str, now: float) -> Verdict | None:
        code = stop_code(serial)
        if code:
            raise BootCheckError(
                f"VM {self.vmid} stopped with {code}",
                hint="a Windows guest without the virtio driver: migrate it with its --os "
                     "(win7, win10, ...) so v2p installs the driver on IDE first")
        if NO_BOOTABLE.search(firmware):
            raise BootCheckError(
                f"VM {self.vmid}: the firmware found no bootable disk",
                hint="the disk has no boot sector on this bus; check `v2p inspect` "
                     "of the source and the VM's boot order")
        sign = ready_sign(serial)
        if sign:
            return Verdict("up", f"{sign} on the serial console")
        if self._handed_over_at is None:
            if len(HANDOVER.findall(firmware)) > self._handovers_before:
                self._handed_over_at = now
            elif not firmware and self.resets == 0 and now - self.started >= _SILENT_FIRMWARE:
                # A firmware that keeps no debug log (OVMF release builds): count from the start.
                self._handed_over_at = self.started
        if self._handed_over_at is not None and now - self._handed_over_at >= self.settle:
            return Verdict("up", f"ran {self.settle:g}s without a reset after the firmware handed over")
        if now - self.started >= self.timeout:
            return Verdict("running", f"no sign of readiness within {self.timeout:g}s")
        return None
