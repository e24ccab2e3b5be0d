"""The words of a plan: a VM as the plan says it, a problem with where it was written, a VM's status.

Not for: reading a plan (``plan_schema``), checking it (``plan_checks``) or running it (``planrun``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import V2PError, one_line


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a plan. ``line``/``column`` are 1-based; 0 when the plan came from a dict
    (then ``where`` names the place: ``vms[2].vmid``)."""

    file: str
    line: int
    column: int
    message: str
    where: str = ""

    def __str__(self) -> str:
        # One line whatever the plan's values hold (a source path with a newline in it).
        if self.line:
            return one_line(f"{self.file}:{self.line}:{self.column}: {self.message}")
        return one_line(f"{self.file}: {self.where}: {self.message}" if self.where else f"{self.file}: {self.message}")


class PlanError(V2PError):
    """A plan that cannot be used as it stands; ``problems`` lists every one."""

    exit_code = 2

    def __init__(self, problems: list[Problem], *, file: str) -> None:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{problems[0]}{more}", hint=f"see them all: v2p plan validate {file}")
        self.problems = problems


@dataclass
class PlanVM:
    """One VM of a plan, defaults already merged in."""

    name: str  # `name:` or the source file's stem; unique in the plan
    source: str  # a URI as written, or an absolute path (a relative one is relative to the plan file's folder)
    vmid: int | Literal["auto"]
    target: str | dict[str, Any]  # what api.make_target takes
    node: str | None  # PVE node (already folded into a pve:// target URL; kept for limits)
    options: dict[str, Any]  # MigrationOptions keyword arguments
    line: int  # where the VM starts in the plan file (for messages)
    # Where each of its keys was written, the defaults' own for keys it did not set (for messages).
    positions: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)
    where: str = field(default="", repr=False, compare=False)  # vms[N]: its place in the plan


@dataclass
class VMStatus:
    """Where one VM of a plan stands, from its migration record (``state``: not started, running,
    unfinished, interrupted, failed, finished, other (its VMID holds another source's migration),
    unreadable, unknown (its target could not be asked)); ``boot``: how its boot check ended, once
    it did (up, unconfirmed, failed, skipped; "" before), ``boot_signal`` what was seen; ``percent``:
    how far the copy of the disk it stopped (or is) in got, from the record's checkpoint (None
    without one)."""

    name: str
    vmid: int | None  # None: an ``auto`` VM not started yet, or a target that could not be asked
    state: str
    stage: str | None = None  # the last stage recorded
    detail: str = ""
    boot: str = ""
    boot_signal: str = ""
    percent: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vmid": self.vmid, "state": self.state, "stage": self.stage,
                "detail": self.detail, "boot": self.boot or None, "boot_signal": self.boot_signal or None,
                "percent": None if self.percent is None else round(self.percent, 1)}
