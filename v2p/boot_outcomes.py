"""How a boot check ended, in the words and exit codes every report uses: ``boot_outcome`` reads the boot
stage's record (of any age), ``boot_words`` says it, ``boot_exit_code`` exits with it, ``failed_hint``
says what to do about a failed one.

Not for: the boot check itself (``stages.BootCheck``, ``bootwatch``).
"""

from __future__ import annotations

import re
from typing import Any

from .errors import EXIT_BOOT_UNCONFIRMED, BootCheckError
from .targets.base import BOOT_FAILED, BOOT_UNCONFIRMED, BOOT_UP

Record = dict[str, Any]


BOOT_SKIPPED = "skipped"  # no boot check (--no-boot-check): nothing was seen, nothing is claimed
# The targets' words before the three outcomes, in the records of migrations made before: a guest that
# powered itself off did so through ACPI, which only a running OS does; one still running at the end
# showed no sign either way.
_OLD_OUTCOMES = {"powered-off": (BOOT_UP, "the guest shut itself down"), "running": (BOOT_UNCONFIRMED, "")}
# What to do about a failed boot, by the sign that said so (the signal's words, bootwatch's names).
_FAILED_HINTS = (
    (re.compile(r"STOP:? 0x|Stop code|bugcheck", re.I),
     "a Windows guest without the virtio driver: migrate it with its --os (win7, win10, ...) so v2p "
     "installs the driver on IDE first"),
    (re.compile(r"bootable|boot option|boot device", re.I),
     "the firmware found nothing to boot: check the VM's boot order (v2p vm show), how the source "
     "boots (v2p inspect: a GPT disk with only an EFI system partition needs --bios ovmf, an MBR "
     "disk --bios seabios)"),
    (re.compile(r"grub|rescue|partition|filesystem", re.I),
     "the boot loader cannot find its files: check the disk order (v2p inspect) and the guest's "
     "boot loader configuration (the disk names it boots from)"),
    (re.compile(r"panic", re.I),
     "the guest's kernel panicked: see its last lines above (after a move from VMware, a storage "
     "driver missing from its initramfs is the usual cause: add virtio_scsi/virtio_blk to it in "
     "VMware first, or migrate with --bus sata)"),
    (re.compile(r"reset", re.I), "the guest restarts while booting: see its last lines above"),
)


def boot_outcome(record: Record | None) -> tuple[str, str]:
    """The boot stage's ``record`` (None: not run) as (``up`` | ``failed`` | ``unconfirmed`` |
    ``skipped``, what was seen): what the CLI, ``status``, the library's result and a plan report say.
    Read defensively: ``v2p status`` shows records of any age."""
    if not isinstance(record, dict):
        return BOOT_SKIPPED, ""
    outcome, signal = record.get("outcome"), str(record.get("signal") or "")
    if outcome in _OLD_OUTCOMES:
        outcome, said = _OLD_OUTCOMES[str(outcome)]
        signal = said or signal
    if outcome in (BOOT_UP, BOOT_FAILED, BOOT_UNCONFIRMED):
        return str(outcome), signal
    return BOOT_SKIPPED, ""


def boot_words(outcome: str, signal: str) -> str:
    """A boot outcome as every report says it: never "up" for one that was not seen to be up."""
    if outcome == BOOT_UP:
        return f"boot: up ({signal})" if signal else "boot: up"
    if outcome == BOOT_UNCONFIRMED:
        return f"boot not confirmed: {signal or 'no sign either way'}"
    if outcome == BOOT_FAILED:
        return f"boot failed: {signal}" if signal else "boot failed"
    return "boot not checked"


def boot_exit_code(outcome: str) -> int:
    """The exit code of a migration that ended with this boot outcome: 0 only for a boot seen up (or
    not checked), ``EXIT_BOOT_UNCONFIRMED`` for one seen neither up nor failed, 7 for a failed one."""
    if outcome == BOOT_UNCONFIRMED:
        return EXIT_BOOT_UNCONFIRMED
    return BootCheckError.exit_code if outcome == BOOT_FAILED else 0


def failed_hint(signal: str) -> str:
    for pattern, hint in _FAILED_HINTS:
        if pattern.search(signal):
            return hint
    return "see the guest's last lines above and its serial log; the VM is kept as it is"


class BootFailed(BootCheckError):
    """The boot check saw the guest fail; ``record`` is the boot stage's record of what it saw, kept
    in the state file (for ``v2p status`` and a plan's status) though the stage failed."""

    def __init__(self, message: str, *, hint: str | None, record: Record) -> None:
        super().__init__(message, hint=hint)
        self.record = record
