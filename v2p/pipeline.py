"""The runner: stages in order, each recorded in the state file, resumable.

On every run the runner walks the stages; a stage whose record is present and
still holds is skipped, and from the first one that is missing or no longer
holds, that stage and every one after it run again. A lock keeps two runs off
one VMID; a finished migration is never re-run over an existing VM.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from .errors import StateError, VMIDExistsError
from .events import Event, EventHandler, ignore
from .options import MigrationOptions, check_vmid
from .stages import STAGES, Context, Stage
from .state import MigrationState, VmidLock
from .targets.base import Target
from .testhooks import hold_point

# Stages that must not run again once the disk is attached to the VM.
BEFORE_THE_GUEST = ("inspect", "preflight", "create", "convert", "verify")


def request_of(source: Path, vmid: int, options: MigrationOptions, target: Target) -> dict[str, Any]:
    return {"source": str(source), "vmid": vmid, "options": options.identity(),
            "target": target.describe()}


class Pipeline:
    """Runs (or resumes) the migration of ``source`` to ``vmid`` on ``target``."""

    def __init__(self, source: Path, vmid: int, options: MigrationOptions, target: Target,
                 *, emit: EventHandler = ignore, stages: tuple[Stage, ...] = STAGES) -> None:
        self.source = Path(os.path.abspath(source))
        self.vmid = check_vmid(vmid)
        self.options = options
        self.target = target
        self.emit = emit
        self.stages = stages
        self.state = MigrationState(target.state_dir(), vmid)

    def plan(self) -> list[tuple[str, str, bool]]:
        """(stage, summary, already done) for each stage, touching nothing."""
        done: dict[str, Any] = {}
        if self.state.load() and self.state.data.get("request") == self._request():
            done = self.state.stages
        return [(s.name, s.summary, s.name in done) for s in self.stages]

    def _request(self) -> dict[str, Any]:
        return request_of(self.source, self.vmid, self.options, self.target)

    def run(self) -> dict[str, Any]:
        with VmidLock(self.target.state_dir(), self.vmid):
            return self._run_locked()

    def _run_locked(self) -> dict[str, Any]:
        request = self._request()
        if self.state.load() and self._stale(request):
            self.state.remove()
            self.state.data = {}
        if self.state.data:
            self._check_resumable(request)
            self.emit(Event("info", "resume", f"resuming the migration of VMID {self.vmid}"))
        else:
            if self.target.vm_exists(self.vmid):
                raise VMIDExistsError(f"VMID {self.vmid} already exists on the {self.target.kind} target",
                                      hint=f"pick another --vmid, or remove it: v2p vm rm {self.vmid}")
            self.state.start(request)
            self.state.data["migration_id"] = uuid.uuid4().hex[:12]
            self.state.save()
        ctx = Context(self.source, self.vmid, self.options, self.target,
                      self.state.data["migration_id"],
                      self.target.state_dir() / f"{self.vmid}.work", self.emit,
                      recorded=set(self.state.stages))
        rerun = False
        for stage in self.stages:
            record = self.state.stages.get(stage.name)
            if record is not None and not rerun and stage.holds(ctx, record["result"]):
                ctx.records[stage.name] = record["result"]
                self.emit(Event("stage-skip", stage.name, f"done at {record['finished_at']}"))
                continue
            if ctx.guest_owns_disk and stage.name in BEFORE_THE_GUEST:
                # The guest may have booted from this disk: redoing these would wipe what it wrote.
                raise StateError(
                    f"VMID {self.vmid}: the {stage.name} stage would have to run again, over a VM whose "
                    "disk is already attached (the source or the written disk changed since)",
                    hint=f"to start over from the source, remove the VM first: v2p vm rm {self.vmid}")
            rerun = True
            self.emit(Event("stage-start", stage.name, stage.summary))
            started = time.monotonic()
            result = stage.run(ctx)
            seconds = time.monotonic() - started
            self.state.record(stage.name, result, seconds=seconds)
            ctx.records[stage.name] = result
            self.emit(Event("stage-done", stage.name, f"{seconds:.2f}s", data=result))
            hold_point(stage.name)
        self.state.data["finished"] = True
        self.state.data["finished_at"] = self.state.stages["finish"]["finished_at"]
        self.state.save()
        _remove_tree(ctx.workdir)
        return self.state.data

    def _stale(self, request: dict[str, Any]) -> bool:
        """A record that means nothing now: its VM was removed since it finished,
        or it stopped before creating anything and the user now asks differently."""
        data = self.state.data
        if data.get("finished"):
            return not self.target.vm_exists(self.vmid)
        return "create" not in data.get("stages", {}) and data.get("request") != request

    def _check_resumable(self, request: dict[str, Any]) -> None:
        data = self.state.data
        if data.get("finished") and self.target.vm_exists(self.vmid):
            raise VMIDExistsError(
                f"VMID {self.vmid} already exists: it was migrated from "
                f"{data['request']['source']} at {data.get('finished_at')}",
                hint=f"pick another --vmid, or remove it first: v2p vm rm {self.vmid}")
        recorded = data.get("request", {})
        if recorded != request:
            diff = sorted(k for k in set(recorded) | set(request) if recorded.get(k) != request.get(k))
            if "options" in diff:
                diff.remove("options")
                ro, no = recorded.get("options", {}), request["options"]
                diff += [f"--{k}" for k in sorted(set(ro) | set(no)) if ro.get(k) != no.get(k)]
            raise StateError(
                f"VMID {self.vmid} has an unfinished migration of {recorded.get('source')} "
                f"with different settings ({', '.join(diff)})",
                hint=f"rerun it with the same settings to resume, or discard it: v2p vm rm {self.vmid}")


def _remove_tree(folder: Path) -> None:
    if folder.is_dir():
        for child in folder.iterdir():
            child.unlink(missing_ok=True)
        folder.rmdir()
