"""Plans: many migrations described in one YAML file, checked before anything runs.

    defaults: {target: local, storage: local, bus: virtio}
    vms:
      - {source: vms/web01/web01.vmx, vmid: 120, name: web01}
      - {source: disks/win7.vmdk, vmid: auto, os: win7}

``Plan.load(path)`` reads a plan keeping each key's line and column, so every problem can be shown
as ``FILE:LINE:COLUMN: message``; ``Plan.problems()`` adds what only the world can say (missing
sources, unknown storages, a VM's preflight rule errors) without touching any target.
``Plan.status()`` reads the migrations' state files; ``Plan.run()`` hands the VMs to ``v2p.planrun``.
Not for: running migrations (``planrun``), nor deciding a VM's hardware (``options``, ``rules``).
The parts live by job: ``plan_model`` (the words: PlanVM, Problem, VMStatus), ``plan_yaml`` (YAML
with positions), ``plan_schema`` (the keys and the reader), ``plan_checks`` (against the world),
``plan_status`` (from the migration records).
"""


from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fsutil import read_regular
from .options import OptionError, check_text
from .plan_checks import Checker, Targets
from .plan_model import PlanError, PlanVM, Problem, VMStatus
from .plan_schema import KEYS, Reader
from .plan_status import status_of
from .plan_yaml import MAX_BYTES, from_data

if TYPE_CHECKING:
    from .planrun import PlanReport

__all__ = ["KEYS", "Plan", "PlanError", "PlanVM", "Problem", "VMStatus"]


class Plan:
    """A list of VMs to migrate, read from YAML (``load``) or a dict (``from_dict``)."""

    def __init__(self, path: Path | None, vms: list[PlanVM], *, problems: list[Problem] | None = None,
                 file: str | None = None, unbuilt: list[PlanVM] | None = None,
                 partial: set[int] | None = None) -> None:
        self.path = path
        self.vms = vms
        self.file = file or (str(path) if path is not None else "<plan>")
        self._read_problems = list(problems or [])  # what reading it found (a strict load raises them)
        self._unbuilt = unbuilt or []  # VMs left out for their problems: only their sources are checked
        self._partial = partial or set()  # VMs (by id) with a setting left out for its problem: no rule checks

    # -- reading -------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str], *, strict: bool = True, local_dir: str | None = None,
             accel: str | None = None) -> Plan:
        """Read the plan at ``path``. ``strict``: raise ``PlanError`` listing every problem of its
        text (else keep them for ``problems()`` and leave the broken VMs out). ``local_dir`` /
        ``accel``: for VMs on the local target whose plan names no ``dir`` (the CLI's --target-dir)."""
        file = check_text("plan", path, controls=True) or ""
        where = Path(os.path.abspath(file))
        raw = read_regular(file, MAX_BYTES, what="plan", error=OptionError)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
            raise PlanError([Problem(file, line, column, f"the plan is not UTF-8 text (byte {raw[exc.start]:#04x})")],
                            file=file) from None
        reader = Reader(file, where.parent, local_dir=local_dir, accel=accel)
        root = reader.parse(text)
        return cls(where, reader.vms_of(root, strict=strict), problems=reader.problems, file=file,
                   unbuilt=reader.unbuilt, partial=reader.partial)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base: str | os.PathLike[str], strict: bool = True,
                  local_dir: str | None = None, accel: str | None = None) -> Plan:
        """A plan from the data a YAML plan holds; relative sources are relative to ``base``."""
        reader = Reader("<plan>", Path(os.path.abspath(base)), local_dir=local_dir, accel=accel)
        return cls(None, reader.vms_of(from_data(data), strict=strict), problems=reader.problems, file="<plan>",
                   unbuilt=reader.unbuilt, partial=reader.partial)

    # -- checking --------------------------------------------------------------
    def problems(self) -> list[Problem]:
        """Every problem of the plan: its text's, then what the sources and targets say (missing or
        unreadable sources, unknown storages, VMIDs taken by other VMs, preflight rule errors).
        Touches nothing: no state file, no VM, no lock; a target that cannot be reached is one problem."""
        found = list(self._read_problems)
        self._checker().check(found)
        unique: dict[tuple[int, int, str, str], Problem] = {}
        for problem in found:
            unique.setdefault((problem.line, problem.column, problem.where, problem.message), problem)
        return sorted(unique.values(), key=lambda p: (p.line, p.column))

    def _checker(self, *, preflight: bool = True) -> Checker:
        return Checker(self.file, self.vms, unbuilt=self._unbuilt, partial=self._partial, preflight=preflight)

    # -- state -----------------------------------------------------------------
    def status(self) -> list[VMStatus]:
        """Each VM's state from its migration record (read-only, no lock: a running plan is shown)."""
        targets = Targets()
        return [status_of(vm, targets) for vm in self.vms]

    def run(self, **options: Any) -> PlanReport:
        """Run every VM of the plan (``v2p.planrun.run_plan``: parallel, dry_run, on_event, ...)."""
        from .planrun import run_plan

        if self._read_problems:
            raise PlanError(self._read_problems, file=self.file)
        # Every check validate makes, before anything is made: a VM with a problem fails at once (no
        # state folder, no lock, no VM); the others run.
        # (The run's own preflight is each migration's: a dry run's preview, a child's first stages.)
        checker = self._checker(preflight=False)
        checker.check([])
        refused = {}
        for vm in self.vms:
            found = sorted(checker.of_vm.get(id(vm), []), key=lambda p: (p.line, p.column))
            if found:
                more = f" (and {len(found) - 1} more: v2p plan validate {self.file})" if len(found) > 1 else ""
                refused[vm.name] = f"{found[0]}{more}"
        return run_plan(self.vms, refused=refused, **options)
