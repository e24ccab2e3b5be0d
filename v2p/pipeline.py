"""The runner: stages in order, each recorded in the state file, resumable.

On every run the runner walks the stages; a stage whose record is present and
still holds is skipped, and from the first one that is missing or no longer
holds, that stage and every one after it run again. A lock keeps two runs off
one VMID; a finished migration is never re-run over an existing VM.

A run that fails with an error while the VM and its disks are being made
(create to attach, before a guest ever ran on them) removes what this migration
made (its VM, by its tag, and the volumes its disk sinks wrote) and its record,
so a rerun starts clean; ``keep_on_failure`` keeps them for a rerun that
resumes. An interruption keeps them too, as does any failure once the disks
are attached (the boot check's, the dance's): the VM is migrated by then.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid
from pathlib import Path
from typing import Any

from . import interrupts, pveconfig
from .boot_outcomes import BootFailed
from .convert import same_files
from .errors import (
    VMID_TAKEN_HINT,
    BootCheckError,
    Cancelled,
    DanceError,
    LockedError,
    OperatorNeeded,
    SourceError,
    StateError,
    TaskStillRunning,
    V2PError,
    VMIDExistsError,
    shown,
)
from .events import Event, EventHandler, ignore
from .fsutil import remove_tree, scratch_dir
from .option_table import OPTION
from .options import MigrationOptions, check_vmid
from .preview import Preview, PreviewDisk, PreviewStage
from .sizing import SpaceNeed
from .sources import Source, open_source
from .spec import VMSpec
from .stage_checks import create_config, preflight_checks
from .stage_context import Context, disk_stage
from .stages import STAGES, Stage, stage_kind, stages_for
from .state import MigrationState, VmidLock, check_fields, now
from .targets.base import Target
from .testhooks import hold_point
from .volumes import VolumeRef, drive_is_cdrom, drive_volume

# Stages that must not run again once the disks are attached to the VM.
BEFORE_THE_GUEST = ("inspect", "preflight", "create", "convert", "verify")
# Stages that make things on the target: an error in one of them removes what the migration made.
MAKING = ("create", "convert", "verify", "attach")
# Errors after which everything stays: the VM is migrated and the user wants to look at it (the
# dance has rolled back already), the dance waits for an operator, or a target's task still works
# on the VM (a disk import that outlived its wait: the rerun waits for it, ``Target.settle``).
KEEPS_ALL = (BootCheckError, DanceError, OperatorNeeded, TaskStillRunning)


def request_of(source: Source, vmid: int, options: MigrationOptions, target: Target) -> dict[str, Any]:
    return {"source": source.describe(), "vmid": vmid, "options": options.identity(),
            "target": target.describe()}


class Pipeline:
    """Runs (or resumes) the migration of ``source`` to ``vmid`` on ``target``."""

    def __init__(self, source: Source | str | os.PathLike[str], vmid: int, options: MigrationOptions,
                 target: Target, *, emit: EventHandler = ignore) -> None:
        self.source = source if isinstance(source, Source) else open_source(source)
        self.vmid = check_vmid(vmid)
        self.options = options
        self.target = target
        self.emit = emit
        self.state = MigrationState(target.state_dir(), vmid)
        self._warned = len(target.task_warnings())  # the target's task warnings shown so far

    def plan(self) -> list[tuple[str, str, bool]]:
        """(stage, summary, already done) for each stage this run will do, from ``preview`` (which
        makes the real run's checks, touching nothing, and raises what the real run would)."""
        return self.preview().plan()

    def preview(self, *, locked: bool = True) -> Preview:
        """The real run up to its first stage that makes something, with nothing made: the record
        read (a resume, a finished migration, other settings: the run's own refusals), the inspection
        and the preflight's checks (``stage_checks.preflight_checks``: no upload, no shutdown), without
        a lock, a state file, a VM or a volume; the source's own files are read in a scratch folder.
        Raises the ``V2PError`` the real run would raise before it made anything (``locked``: a
        ``LockedError`` too while another run holds the VMID)."""
        if locked:
            self._check_unlocked()
        request = self._request()
        records: dict[str, Any] = {}
        migration_id = ""
        if self.state.load() and not self._stale(request):
            check_records(self.state)
            done = self._finished_already(request)
            if done is not None:
                return self._previewed(None, done)
            self._check_resumable(request)
            records, migration_id = self.state.stages, str(self.state.data.get("migration_id") or "")
        elif self.target.vm_exists(self.vmid):
            raise VMIDExistsError(f"VMID {self.vmid} already exists on the {self.target.kind} target",
                                  hint=VMID_TAKEN_HINT)
        seen: list[Event] = []
        with scratch_dir("preview") as scratch, self.source.opened(seen.append):
            spec = self.options.hardware(self._spec())
            ctx = Context(self.source, self.vmid, self.options.resolved(spec), self.target, migration_id,
                          Path(scratch) / "work", seen.append, spec, chosen_ostype=self.options.chosen_ostype(spec),
                          recorded=set(records))
            try:
                stages: list[PreviewStage] = []
                rerun = False
                for stage in stages_for(len(spec.disks)):
                    record = records.get(stage.name)
                    if record is not None and not rerun and stage.holds(ctx, record["result"]):
                        ctx.records[stage.name] = record["result"]
                    else:
                        self._may_rerun(ctx, stage)
                        rerun = True
                        if stage.name == "inspect":  # the inspect stage makes nothing: run as it is
                            ctx.records["inspect"] = stage.run(ctx)
                        elif stage.name == "preflight":
                            ctx.records["preflight"] = preflight_checks(ctx, upload=False)
                    if stage.applies(ctx.options):
                        stages.append(PreviewStage(stage.name, stage.summary, done=not rerun))
                return self._previewed(ctx, None, stages=stages, seen=seen)
            finally:
                ctx.close_inputs()

    def _check_unlocked(self) -> None:
        """The run's ``LockedError`` while another run holds the VMID's lock, asked without making the
        lock file: a shared lock tried and let go at once on the file, if there is one."""
        path = VmidLock(self.target.state_dir(), self.vmid).path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return  # none (or not a file v2p made): the run makes or refuses it itself
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"VMID {self.vmid} is locked by another v2p run ({path})",
                              hint="wait for it to finish") from None
        finally:
            os.close(fd)

    def _previewed(self, ctx: Context | None, done: str | None, *, stages: list[PreviewStage] | None = None,
                   seen: list[Event] | None = None) -> Preview:
        """The ``Preview`` of what ``ctx`` found (None: a finished migration, ``done`` says so)."""
        reached: dict[str, Any] = {"kind": self.target.kind, "place": self.target.place(),
                                   "version": self.target.version(), "rights": [], "bridges_known": False}
        if ctx is None:
            spec = self.options.hardware(VMSpec.from_dict(self.state.stages["inspect"]["result"]["spec"]))
            options = self.options.resolved(spec)
            return Preview(self.vmid, self.source.describe(), spec.name, spec.sockets, spec.cores, spec.memory_mib,
                           spec.firmware, str(options.ostype), {}, reached, nothing_to_do=done,
                           where=options.device or f"storage {options.storage}",
                           stages=[PreviewStage(s.name, s.summary, True) for s in stages_for(len(spec.disks))
                                   if s.applies(options)])
        spec, options = ctx.spec, ctx.options
        preflight = ctx.records.get("preflight", {})
        reached["rights"] = list(preflight.get("rights") or [])
        reached["bridges_known"] = self.target.bridges() is not None
        rooms = {int(room["disk"]): room for room in preflight.get("disks") or [] if isinstance(room, dict)}
        assert options.ostype is not None
        keys = {disk.label: key for disk, key in pveconfig.disk_keys(spec, options, ostype=options.ostype)}
        inspected = ctx.records["inspect"]["disks"]
        disks = []
        for index, disk in enumerate(ctx.disks()):
            row, room = inspected[index], rooms.get(index, {})
            disks.append(PreviewDisk(index, disk.label, str(row.get("source", disk.source)), int(row["capacity"]),
                                     str(row.get("flavor", "")), keys.get(disk.label),
                                     room.get("volid") or ctx.sink(index).volid, room.get("storage"),
                                     room.get("required_bytes"), room.get("free_bytes")))
        space = SpaceNeed()  # the sums the preflight made of the same rooms
        for room in rooms.values():
            space.add(room)
        storages = {storage: {"required_bytes": needed, "free_bytes": free}
                    for storage, (needed, free) in space.held.items()}
        config = self._config(ctx, disks)
        return Preview(self.vmid, self.source.describe(), config.get("name", spec.name), spec.sockets, spec.cores,
                       spec.memory_mib, spec.firmware, options.ostype, config, reached,
                       findings=list(preflight.get("findings") or []), disks=disks,
                       storage=str(preflight.get("storage") or options.device or options.storage),
                       format=str(preflight.get("format") or ""), required_bytes=preflight.get("required_bytes"),
                       free_bytes=preflight.get("free_bytes"), storages=storages,
                       bridges=list(preflight.get("bridges") or []),
                       drivers_iso=preflight.get("drivers_iso") if options.needs_dance else None,
                       driver_folders=dict(preflight.get("driver_folders") or {}) if options.needs_dance else {},
                       stages=stages or [], warnings=[e.message for e in seen or [] if e.kind == "warning"],
                       where=options.device or f"storage {options.storage}")

    @staticmethod
    def _config(ctx: Context, disks: list[PreviewDisk]) -> dict[str, str]:
        """The config the create and attach stages write (the recorded one, once created)."""
        created = ctx.records.get("create", {}).get("config")
        config = dict(created) if isinstance(created, dict) else create_config(ctx)
        if ctx.spec.firmware == "efi" and "efidisk0" not in config:
            config["efidisk0"] = pveconfig.efidisk(ctx.options.storage, secure_boot=ctx.spec.secure_boot)
        placed = [disk for disk in disks if disk.key is not None and disk.volid]
        for disk in placed:
            assert disk.key is not None and disk.volid is not None
            config[disk.key] = pveconfig.disk_value(disk.volid, disk.capacity)
        if placed:
            config["boot"] = pveconfig.boot_order([disk.key for disk in placed if disk.key])
        return config

    def _may_rerun(self, ctx: Context, stage: Stage) -> None:
        """Refuse to run ``stage`` again over a VM whose disks the guest owns (the run's own refusal)."""
        if ctx.guest_owns_disk and stage_kind(stage.name) in BEFORE_THE_GUEST:
            # The guest may have booted from this disk: redoing these would wipe what it wrote.
            raise StateError(
                f"VMID {self.vmid}: the {stage.name} stage would have to run again, over a VM whose "
                "disk is already attached (the source or the written disk changed since)",
                hint=f"to start over from the source, remove the VM first: v2p vm rm {self.vmid}")

    def _request(self) -> dict[str, Any]:
        return request_of(self.source, self.vmid, self.options, self.target)

    def run(self) -> dict[str, Any]:
        # The source's session (if its kind has one) is closed however the run ends, Ctrl-C included.
        with VmidLock(self.target.state_dir(), self.vmid), self.source.opened(self.emit):
            return self._run_locked()

    def _run_locked(self) -> dict[str, Any]:
        request = self._request()
        tasks = self.target.capabilities.tasks  # work of an earlier run may outlive it on the target
        for volid, left in (self.target.retry_leftovers(holding=self.vmid) if tasks else {}).items():
            self.emit(Event("warning", "cleanup", f"{volid} (VMID {left['vmid']}) is still left on the target: "
                            f"deleting it failed since {left['since']}: {left['error']}; retried on every run"))
        for suffix in ("", ".dance"):
            MigrationState(self.state.directory, self.vmid, suffix).remove_temporaries()
        self.target.remove_temporaries(self.vmid)
        if self.state.load() and self._stale(request):
            self.state.remove()
            self.state.data = {}
        if self.state.data:
            check_records(self.state)
            done = self._already_done(request)
            if done is not None:
                return done
            self._check_resumable(request)
            self.emit(Event("info", "resume", f"resuming the migration of VMID {self.vmid}"))
            # E.g. the disk import of a run killed in attach.
            for upid in self.target.settle(self.vmid) if tasks else []:
                self.emit(Event("info", "resume", f"waited for {upid}, left running by an earlier run"))
        else:
            if self.target.vm_exists(self.vmid):
                raise VMIDExistsError(f"VMID {self.vmid} already exists on the {self.target.kind} target",
                                      hint=VMID_TAKEN_HINT)
            self.state.start(request, migration_id=uuid.uuid4().hex[:12])
            hold_point("state-created")
        workdir = self.target.state_dir() / f"{self.vmid}.work"
        stage_name = "inspect"
        ctx: Context | None = None
        try:
            spec = self.options.hardware(self._spec())
            ctx = Context(self.source, self.vmid, self.options.resolved(spec), self.target,
                          self.state.data["migration_id"], workdir, self.emit, spec,
                          chosen_ostype=self.options.chosen_ostype(spec), recorded=set(self.state.stages),
                          saved_progress=self.state.data.get("progress"), on_checkpoint=self.state.checkpoint)
            rerun = False
            for stage in stages_for(len(spec.disks)):
                stage_name = stage.name
                interrupts.check()  # a cancel between stages stops here, not a stage later
                record = self.state.stages.get(stage.name)
                holds = record is not None and not rerun and stage.holds(ctx, record["result"])
                if not stage.applies(ctx.options):
                    # Nothing to do for this VM (no driver dance for a Linux VM, no boot check asked): recorded
                    # as skipped as it always was, but not announced, as a dry run does not list it.
                    if not holds:
                        rerun = True
                        self.state.record(stage.name, stage.run(ctx), seconds=0.0)
                        hold_point(stage.name)
                    ctx.records[stage.name] = self.state.stages[stage.name]["result"]
                    continue
                if holds:
                    assert record is not None
                    ctx.records[stage.name] = record["result"]
                    self.emit(Event("stage-skip", stage.name, f"done at {record['finished_at']}",
                                    data=record["result"], disk=stage.disk))
                    continue
                self._may_rerun(ctx, stage)
                rerun = True
                self.emit(Event("stage-start", stage.name, stage.summary, disk=stage.disk))
                started, waited = time.monotonic(), len(self.target.tasks_waited())
                result = stage.run(ctx)
                seconds = time.monotonic() - started
                self._task_warnings(stage.name)
                result.update(self._made_by(stage.name, waited))
                self.state.record(stage.name, result, seconds=seconds)
                ctx.records[stage.name] = result
                self.emit(Event("stage-done", stage.name, f"{seconds:.2f}s", data=result, disk=stage.disk))
                hold_point(stage.name)
        except BaseException as exc:
            self._task_warnings(stage_name)
            if isinstance(exc, BootFailed):  # what the failed boot showed, for `status` (a rerun boots again)
                with contextlib.suppress(OSError, V2PError):  # the error itself must still reach the user
                    self.state.record(stage_name, exc.record, seconds=float(exc.record.get("seconds") or 0.0))
            if ctx is not None and self._cleans_up(stage_name, exc):
                self._clean_up(stage_name, exc, workdir, ctx)
            else:
                self._failed(stage_name, exc, workdir)
            raise
        finally:
            if ctx is not None:
                ctx.close_inputs()  # the source files pinned since inspection
        interrupts.settle()  # every stage is done: a Ctrl-C from here on no longer stops a migrated VM's run
        self.state.data["finished"] = True
        self.state.data["finished_at"] = self.state.stages["finish"]["finished_at"]
        self.state.save()
        remove_tree(workdir)
        self._release(ctx)
        return self.state.data

    def _spec(self) -> VMSpec:
        """The VM's hardware, from the source now; once the disks are the guest's, the recorded one
        serves if the source has gone (moved away after its disks were copied)."""
        try:
            return self.source.spec()
        except SourceError:
            recorded = self.state.stages.get("inspect", {}).get("result", {}).get("spec")
            if "attach" not in self.state.stages or not isinstance(recorded, dict):
                raise
            return VMSpec.from_dict(recorded)

    def _task_warnings(self, stage: str) -> None:
        """The target's tasks' warnings not shown yet, as warnings of ``stage``: they succeeded."""
        found = self.target.task_warnings()
        for text in found[self._warned:]:
            self.emit(Event("warning", stage, text))
        self._warned = len(found)

    def _made_by(self, stage: str, waited: int) -> dict[str, Any]:
        """For the record of ``stage``: the target's tasks it waited for (PVE UPIDs) and, for
        the stages that make the VM and attach its disks, the volumes its config names now."""
        made: dict[str, Any] = {}
        upids = self.target.tasks_waited()[waited:]
        if upids:
            made["upids"] = upids
        if stage in ("create", "attach"):
            config = self.target.get_config(self.vmid)
            made["volids"] = sorted(
                drive_volume(value) for key, value in config.items()
                if (pveconfig.DISK_KEY.match(key) or key in ("efidisk0", "tpmstate0"))
                and not drive_is_cdrom(value) and VolumeRef.maybe(drive_volume(value)))
        return made

    def _release(self, ctx: Context) -> None:
        """Copies only the migration needed (an upload, a staging file) go once it is finished
        (a finished migration is never resumed, so nothing reads them again)."""
        for index in range(len(ctx.disks())):
            try:
                ctx.sink(index).release()
            except V2PError as exc:
                self.emit(Event("warning", "finish", f"disk {index}: could not remove its staging copies: {exc}"))

    def _cleans_up(self, stage: str, exc: BaseException) -> bool:
        """An error (not an interruption or a cancel) in a stage that makes things, before any guest ran on
        the disks: what the migration made is of no use as it stands."""
        return (isinstance(exc, V2PError) and not isinstance(exc, (*KEEPS_ALL, Cancelled))
                and interrupts.received() is None and stage_kind(stage) in MAKING and "attach" not in self.state.stages)

    def _clean_up(self, stage: str, exc: BaseException, workdir: Path, ctx: Context) -> None:
        """Remove the VM if it carries this migration's tag and every volume its disk sinks wrote,
        then the record (``keep_on_failure``: keep them all and say so). Never a VM it did not make."""
        assert isinstance(exc, V2PError)
        ours, written, removed = False, [], False
        try:
            ours = self.target.vm_exists(self.vmid) and \
                ctx.migration_id in pveconfig.tagged_by(self.target.get_config(self.vmid))
            written = [index for index in range(len(ctx.disks()))
                       if disk_stage("convert", index) in (*self.state.stages, stage)]
            if not ours and not written:  # the VMID was taken, the create refused: nothing of ours
                self._failed(stage, exc, workdir)
                return
            if ctx.options.keep_on_failure:
                self._note(exc, f"kept for a rerun, which resumes: {_made(self.vmid, ours, written)} "
                           "(--keep-on-failure)")
                self._keep(stage, exc)
                return
            if ours:
                self.target.destroy_vm(self.vmid)
                self._task_warnings("cleanup")
                removed = True
            for index in written:
                ctx.sink(index).remove()
        except (V2PError, OSError) as failed:
            with contextlib.suppress(V2PError, OSError):  # the VM may be gone, its uploads not
                removed = removed or (ours and not self.target.vm_exists(self.vmid))
            kept = "its disks" if removed else _made(self.vmid, ours, written) if ours or written else "what it made"
            self._note(exc, (f"removed VM {self.vmid}, " if removed else "") + f"kept for a rerun: {kept}")
            exc.add_note(f"removing it failed: {failed}; run the same command again to resume, "
                         f"or remove it: v2p vm rm {self.vmid}")
            self._keep(stage, exc)
            return
        self.state.remove()
        remove_tree(workdir)
        self._note(exc, f"removed {_made(self.vmid, ours, written)}")

    def _note(self, exc: V2PError, text: str) -> None:
        """What became of the VM, on the error's own line (``v2p: error: ...; removed VM 150``)."""
        exc.message = f"{exc.message}; {text}"
        self.emit(Event("info", "cleanup", text))

    def _failed(self, stage: str, exc: BaseException, workdir: Path) -> None:
        """A run that made nothing on the target leaves no record (a refused source is not an
        unfinished migration); one that did notes where and why it stopped, for ``v2p status``.

        The create stage's VM exists before its record does: a run stopped in that stage by anything
        but its own error (a signal, a cancel; on PVE the create task may even finish afterwards)
        keeps the record, so that the rerun knows the VM by the migration id in its description.
        """
        stopped_in_create = stage_kind(stage) == "create" and \
            not (isinstance(exc, V2PError) and not isinstance(exc, Cancelled))
        if "create" not in self.state.stages and not stopped_in_create and not self._vm_is_ours():
            self.state.remove()
            remove_tree(workdir)
            return
        self._keep(stage, exc)

    def _vm_is_ours(self) -> bool:
        """Whether the VMID holds the VM this record's migration created (never any other VM)."""
        migration_id = self.state.data.get("migration_id")
        if not isinstance(migration_id, str):
            return False
        try:
            return self.target.vm_exists(self.vmid) and \
                migration_id in pveconfig.tagged_by(self.target.get_config(self.vmid))
        except (V2PError, OSError):
            return False

    def _keep(self, stage: str, exc: BaseException) -> None:
        """Note in the record where and why the run stopped, for ``v2p status`` and the rerun."""
        reason = str(exc) if isinstance(exc, V2PError) else \
            "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        self.state.data["failed"] = {"stage": stage, "error": reason, "at": now()}
        with contextlib.suppress(OSError, V2PError):  # the state file may be what failed
            self.state.save()

    def _already_done(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """A finished migration asked for again: the same source and settings are nothing to do
        (scripts, plans and panels rerun what they asked for); anything else onto that VM is refused."""
        message = self._finished_already(request)
        if message is None:
            return None
        self.emit(Event("info", "finish", message))
        return {**self.state.data, "nothing_to_do": message}

    def _finished_already(self, request: dict[str, Any]) -> str | None:
        """Why a finished migration asked for again is nothing to do (None: it is not finished); its
        refusal when the settings or the source differ."""
        data = self.state.data
        if not data["finished"]:
            return None
        source, when = data["request"]["source"], data.get("finished_at", "?")
        diff = _differences(data["request"], request)
        if diff:
            raise VMIDExistsError(
                f"VMID {self.vmid} already exists: it was migrated from {source} at {when} "
                f"with other settings ({', '.join(diff)})",
                hint=f"pick another --vmid, or remove it first: v2p vm rm {self.vmid}")
        if self._source_changed(data):
            raise VMIDExistsError(
                f"VMID {self.vmid} already exists: it was migrated from {source} at {when}, "
                "and that source has changed since",
                hint=f"to migrate it again, remove the VM first: v2p vm rm {self.vmid}")
        return f"VM {self.vmid} was already migrated from {source} at {when}; nothing to do"

    def _source_changed(self, data: dict[str, Any]) -> bool:
        recorded = data["stages"].get("inspect", {}).get("result", {}).get("files")
        try:
            current = self.source.fingerprint()
        except (V2PError, OSError):
            return False  # moved or deleted after the migration: the VM is still the one it made
        return not same_files(recorded, current)

    def _stale(self, request: dict[str, Any]) -> bool:
        """A record that means nothing now: its VM was removed since it finished,
        or it stopped before creating anything and the user now asks differently."""
        data = self.state.data
        if data.get("finished"):
            return not self.target.vm_exists(self.vmid)
        return "create" not in data.get("stages", {}) and data.get("request") != request \
            and not self._vm_is_ours()  # a VM the record made, though its create was never recorded

    def _check_resumable(self, request: dict[str, Any]) -> None:
        recorded = self.state.data["request"]
        diff = _differences(recorded, request, values=True)
        if diff:
            # Every option that is not volatile shapes a stage that has run (the VM's config, its disks'
            # keys and format, the drivers): a changed one is a new migration, not a resumed one.
            stage = self.state.data.get("failed", {}).get("stage")
            where = f" (it stopped in {stage})" if isinstance(stage, str) else ""
            raise StateError(
                f"VMID {self.vmid} has an unfinished migration of {recorded.get('source')}{where} "
                f"with different settings: {'; '.join(diff)}",
                hint=f"to resume it, rerun it with the settings it started with; to start over with the new "
                     f"ones, discard it (and the VM it made) first: v2p vm rm {self.vmid}")


def _made(vmid: int, ours: bool, written: list[int]) -> str:
    """What a failed migration made, in its error line's words."""
    if not ours:
        return "the disks it wrote"
    return f"VM {vmid} and its disks" if written else f"VM {vmid}"


def _differences(recorded: dict[str, Any], request: dict[str, Any], *, values: bool = False) -> list[str]:
    """What differs between two requests, in the user's words: ``source``, an option by its CLI
    flag (``--os``; a library-only option by its keyword), with both values when ``values``."""
    diff = sorted(k for k in set(recorded) | set(request) if recorded.get(k) != request.get(k))
    if "options" in diff:
        diff.remove("options")
        ro, no = recorded.get("options", {}), request["options"]
        for keyword in sorted(set(ro) | set(no)):
            if ro.get(keyword) == no.get(keyword):
                continue
            option = OPTION.get(keyword)
            name = option.flag if option is not None and option.flag else keyword
            diff.append(f"{name} {_said(ro.get(keyword))} then, {_said(no.get(keyword))} now" if values else name)
    return diff


def _said(value: object) -> str:
    """An option's recorded value, for a message: unset is "not given"."""
    if value is None or value in ((), [], {}):
        return "not given"
    if isinstance(value, bool):
        return "on" if value else "off"
    return shown(value, typed=True)


def check_records(state: MigrationState, stages: tuple[Stage, ...] = STAGES) -> None:
    """Every record a resumed run (or ``v2p status``) reads has the fields it reads:
    a damaged state file is one clear StateError, not a traceback later on."""
    data, damaged = state.data, state.damaged
    check_fields(data["request"], {"source": str, "vmid": int, "options": dict, "target": dict},
                 "request.", damaged)
    known = {stage.name: stage for stage in stages}
    for name, record in data["stages"].items():
        kind = stage_kind(name)
        if kind not in known or (kind != name and not name.partition(":")[2].isdigit()):
            raise damaged(f"it records an unknown stage {name!r}")
        check_fields(record["result"], known[kind].fields, f"stages.{name}.result.", damaged)
