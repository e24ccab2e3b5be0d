"""The v2p error hierarchy.

Every failure a user can meet is a ``V2PError`` with a message a sysadmin can
act on: what went wrong, which file or VM, and (as ``hint``) what to do. The
CLI prints ``str(error)`` on one line and exits non-zero; library users catch
the subclass that matters to them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any


class V2PError(Exception):
    """Base of every error v2p raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message


class Cancelled(V2PError):
    """The migration was cancelled (``Migration.cancel()``); what it made is kept, a rerun resumes."""

    exit_code = 130  # as for Ctrl-C: stopped on request, resumable


class SourceError(V2PError):
    """The source disk is missing, unreadable, or not something v2p can migrate."""

    exit_code = 2


class UnsafeSourceError(SourceError):
    """The source would make a tool read outside its folder or misbehave."""


class ToolError(V2PError):
    """An external program (qemu-img, qemu-system-x86_64, ...) failed or timed out."""

    exit_code = 3


class TargetError(V2PError):
    """The target refused an operation or is in a state we cannot work with."""

    exit_code = 4


class NoSpaceError(TargetError):
    """A storage (or the staging folder) has less room than the disks need."""


class VMIDExistsError(TargetError):
    """The VMID asked for is already taken on the target."""


# What to do about a VMID some guest already has: never "remove it", which may not be v2p's to remove.
VMID_TAKEN_HINT = "use --vmid auto, or pick another free --vmid"


class TaskStillRunning(TargetError):
    """A target's task outlived v2p's wait for it: it goes on there (a PVE worker does not stop with
    v2p), so what it makes is left for a rerun, which waits for it, not cleaned up under it."""


class ForeignVMError(TargetError):
    """The VM was not made by v2p (no record of a migration whose tag it carries): v2p leaves it
    alone unless told its name (``v2p vm rm VMID --force --confirm-name NAME``)."""


class NoSuchVMError(TargetError):
    """The VMID asked for does not exist on the target."""


class StateError(V2PError):
    """The state file is unreadable, of another version, or for another migration."""

    exit_code = 5


class LockedError(StateError):
    """Another v2p run holds the lock on this VMID."""


class VerifyError(V2PError):
    """The converted disk does not hold the same bytes as the source."""

    exit_code = 6


class BootCheckError(V2PError):
    """The migrated VM did not boot the way it should."""

    exit_code = 7


class DriversError(V2PError):
    """The virtio drivers ISO is missing or lacks the drivers the guest needs."""

    exit_code = 8


class DanceError(V2PError):
    """The IDE -> virtio driver dance failed (the VM is back on its IDE layout)."""

    exit_code = 9


class OperatorNeeded(V2PError):
    """The dance waits for an operator to confirm the guest has its drivers."""

    exit_code = 10


class RuleError(V2PError):
    """The VM breaks preflight rules (errors not ignored): nothing is created. ``findings`` holds
    each error (``rules.Finding``: its id, message, CLI hint and the library ``options`` it names);
    empty for a refusal made before the rules ran (``rules.refuse_counts``)."""

    exit_code = 11

    def __init__(self, message: str, *, hint: str | None = None, findings: Sequence[Any] = ()) -> None:
        super().__init__(message, hint=hint)
        self.findings = list(findings)


# A migration that finished, whose boot check saw neither a sign of a running OS nor of a failure:
# not an error (nothing is cleaned up, the VM stays), but never exit 0 ("boot not confirmed").
EXIT_BOOT_UNCONFIRMED = 12


def shown(value: object, *, typed: bool = False, limit: int = 40) -> str:
    """A value a user gave, for an error message on one line: a tidy ASCII word plain when it is
    what the user ``typed``, anything else quoted with every control character escaped (``'a\\nb'``),
    so no value can split a message, forge a second line or move the terminal's cursor; cut at
    ``limit`` characters."""
    if isinstance(value, str):
        if typed and len(value) <= limit and re.fullmatch(r"[-+0-9A-Za-z.]+", value, flags=re.ASCII):
            return value
        return repr(value if len(value) <= limit else value[:limit] + "...")
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:g}"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def shown_path(path: object) -> str:
    """A path for an error message: as it is when every character of it prints, else quoted and
    escaped as ``shown`` does (a newline in a file name must not split the message)."""
    text = str(path)
    if text and text.isprintable() and text == text.strip():
        return text
    return repr(text)


def one_line(text: str) -> str:
    """``text`` with every character that does not print (a newline, an escape sequence, a bidi
    override) written as its escape: what goes to a terminal or a log as one line stays one."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
