"""The public library surface: everything the CLI can do, as functions.

    from v2p import migrate
    result = migrate("win7.vmdk", 102, ostype="win7", on_event=print)
    result = migrate("web01.vmx", "auto", target="pve://root@pam!v2p@pve1/pve1")  # the next free VMID

Progress arrives as ``Event``s through ``on_event`` (or ``Migration.events()``); errors are
``V2PError``s, each with a ``message`` and, apart, a ``hint`` for people. Nothing here prints
or exits; external commands are logged on the ``v2p.runner`` logger at DEBUG.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shlex
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import interrupts, pveconfig, rules
from .dance import DanceOptions, DriverDance
from .errors import (
    Cancelled,
    ForeignVMError,
    LockedError,
    NoSuchVMError,
    RuleError,
    SourceError,
    StateError,
    TargetError,
    V2PError,
    VMIDExistsError,
    shown,
    shown_path,
)
from .events import Event, EventHandler, ignore
from .fsutil import remove_tree, scratch_dir
from .inspect import DiskImage, Row, inspect_disk, inspect_paths
from .options import MigrationOptions, OptionError, check_bool, check_seconds, check_text, check_vmid
from .pipeline import Pipeline, check_records
from .sources import DiskSource, Source, open_source
from .spec import DiskSpec, VMSpec
from .stages import boot_layout, boot_outcome, check_drivers, check_rules
from .state import MigrationState, VmidLock, list_states
from .targets.base import Target
from .targets.factory import make_target
from .targets.kind_local import local_target
from .targets.local import LocalTarget

__all__ = ["LocalTarget", "Migration", "MigrationStatus", "Row", "Target", "TargetSpec", "VMReport", "dance",
           "inspect", "inspect_all", "inspect_paths", "inspect_vm", "local_target", "make_target", "migrate",
           "remove", "status"]

# What a target may be given as: a Target, or what ``make_target`` takes (a URL, "local", a dict).
TargetSpec = Target | str | dict[str, Any] | None


AUTO = "auto"  # the VMID that means: the next free one on the target
AUTO_TRIES = 5  # VMIDs tried when each is found taken by the time the VM is created


def as_target(target: TargetSpec) -> Target:
    """``target`` itself, or the target ``make_target`` builds from it (None: the local one)."""
    return target if isinstance(target, Target) else make_target(target)


@dataclass(frozen=True)
class MigrationStatus:
    """A snapshot of one migration, safe to read from any thread (``Migration.status``).

    ``state``: ``ready`` (not run yet), ``running``, ``finished``, ``failed``, ``cancelled``.
    ``done``/``total``: bytes of the VM's disks written so far / in all (``total`` is 0 until
    the inspect stage knows them); ``percent`` is ``done`` of ``total``.
    """

    vmid: int
    state: str = "ready"
    stage: str | None = None
    done: int = 0
    total: int = 0
    result: dict[str, Any] | None = None
    error: BaseException | None = None

    @property
    def percent(self) -> float:
        if self.state == "finished":
            return 100.0
        return round(100.0 * self.done / self.total, 1) if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """For a panel's JSON: the error as ``error`` (its message), ``hint`` and ``type``."""
        data: dict[str, Any] = {"vmid": self.vmid, "state": self.state, "stage": self.stage,
                                "percent": self.percent, "done": self.done, "total": self.total}
        if self.result is not None:
            data["result"] = {"finished_at": self.result.get("finished_at"),
                              "nothing_to_do": bool(self.result.get("nothing_to_do")),
                              "boot": self.result.get("boot"), "boot_signal": self.result.get("boot_signal"),
                              "config": self.result.get("stages", {}).get("finish", {}).get("result", {})
                              .get("config")}
        if self.error is not None:
            error = self.error
            data["error"] = error.message if isinstance(error, V2PError) else str(error) or type(error).__name__
            data["hint"] = error.hint if isinstance(error, V2PError) else None
            data["type"] = type(error).__name__
        return data


class _Progress:
    """Bytes written per disk, from the events (the status's done/total)."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}
        self.total: dict[int, int] = {}

    def see(self, event: Event) -> None:
        if event.stage == "inspect" and event.kind in ("stage-done", "stage-skip"):
            disks = event.data.get("disks")
            if isinstance(disks, list):
                self.total = {index: int(disk.get("capacity", 0)) for index, disk in enumerate(disks)}
        elif event.kind == "progress" and event.step is None and event.disk is not None and event.done is not None:
            self.done[event.disk] = event.done
            if event.total is not None:
                self.total.setdefault(event.disk, event.total)
        elif event.stage.startswith("convert") and event.kind in ("stage-done", "stage-skip") \
                and event.disk is not None:
            self.done[event.disk] = self.total.get(event.disk, 0)


class Migration:
    """One migration of ``source`` to ``vmid``; ``run()`` starts or resumes it.

    ``target``: a ``Target``, or what ``make_target`` takes (``"local"``, ``"pve://..."``,
    ``{"kind": "local", "dir": ...}``); None is the local target.

    ``vmid="auto"``: an earlier ``auto`` migration of the same source, unfinished (resumed) or finished
    with the same settings (nothing to do), keeps its VMID; else the target's next free VMID
    (``Target.next_vmid``) with no migration record, and the next one again, a few times, when
    creating the VM finds it taken. The chosen one is announced as an event and is ``.vmid``.

    Threads: ``run()`` (or ``events()``) in one thread; ``cancel()`` and ``status`` from any.
    Events reach ``on_event`` in the thread that runs the migration, in order, each with
    ``vmid`` set.
    """

    def __init__(self, source: str | os.PathLike[str] | Source, vmid: int | Literal["auto"], *,
                 target: TargetSpec = None, on_event: EventHandler = ignore, **options: Any) -> None:
        if not isinstance(source, Source):
            check_source(source)
        if vmid != AUTO:
            check_vmid(vmid)
        if not callable(on_event):
            raise OptionError(f"on_event={shown(on_event)}: must be a function taking an Event")
        self.target = as_target(target)
        options.setdefault("storage", self.target.default_storage())
        self.options = MigrationOptions.of(options)
        self._handler = on_event
        self._listeners: list[EventHandler] = []
        self._lock = threading.Lock()
        self._token = interrupts.CancelToken()
        self._progress = _Progress()
        self._status: MigrationStatus | None = None
        self.picked = vmid == AUTO  # a VMID v2p chose afresh: another may take it first
        if vmid == AUTO:
            source = source if isinstance(source, Source) else open_source(source)
            vmid = self._choose(source)
        self.pipeline = Pipeline(source, check_vmid(vmid), self.options, self.target, emit=self.emit)
        self._status = MigrationStatus(self.vmid)

    @property
    def vmid(self) -> int:
        return self.pipeline.vmid

    @property
    def status(self) -> MigrationStatus:
        """Where the migration is now: stage, bytes written, and its result or error once it ended."""
        with self._lock:
            assert self._status is not None
            return self._status

    def _update(self, **changes: Any) -> None:
        with self._lock:
            assert self._status is not None
            self._status = MigrationStatus(**{**vars(self._status), **changes})

    def emit(self, event: Event) -> None:
        """Pass ``event`` on (with this migration's VMID) to ``on_event`` and any ``events()`` reader."""
        if self._status is not None:  # once the VMID is known: every event from the pipeline on
            event = event.with_vmid(self.vmid)
            self._progress.see(event)
            stage = event.stage if event.kind in ("stage-start", "stage-done", "stage-skip", "progress") \
                else self._status.stage
            self._update(vmid=self.vmid, stage=stage, done=sum(self._progress.done.values()),
                         total=sum(self._progress.total.values()))
        self._handler(event)
        for listener in list(self._listeners):
            listener(event)

    def cancel(self) -> None:
        """Stop the migration running in another thread, soon (the external program it waits for is
        killed): its ``run()`` raises ``Cancelled``, what it made stays, and a later ``run()``
        resumes. Before ``run()``, the next ``run()`` stops at once."""
        self._token.cancel()

    def _choose(self, source: Source) -> int:
        earlier = self._earlier(source)
        if earlier is not None:
            self.picked = False
            self.emit(Event("info", "vmid", f"VMID {earlier}: the earlier migration of {source.describe()}",
                            vmid=earlier))
            return earlier
        vmid = self._free_vmid(0)
        self.emit(Event("info", "vmid", f"VMID {vmid}: the next free one on the {self.target.kind} target",
                        vmid=vmid))
        return vmid

    def _earlier(self, source: Source) -> int | None:
        return earlier_migration(self.target, source.describe(), self.options)

    def _free_vmid(self, above: int) -> int:
        """The target's next free VMID above ``above`` that no migration record holds."""
        while True:
            vmid = self.target.next_vmid(above)
            records = (MigrationState(self.target.state_dir(), vmid, suffix).path for suffix in ("", ".dance"))
            if not any(os.path.lexists(path) for path in records):
                return vmid
            above = vmid

    def plan(self) -> list[tuple[str, str, bool]]:
        """The stages as (name, what it does, already done), without running anything."""
        return self.pipeline.plan()

    def disk_keys(self) -> list[str]:
        """The config keys the VM's disks get on their first boot (ide0, scsi0, ...), boot disk first."""
        spec = self.options.hardware(self.pipeline.source.spec())
        options = self.options.resolved(spec)
        assert options.ostype is not None
        return [key for _disk, key in pveconfig.disk_keys(spec, options, ostype=options.ostype)]

    def run(self) -> dict[str, Any]:
        """Run every stage not yet done; return the final state record (with ``nothing_to_do`` when
        it had finished before) and how its boot check ended (``boot``, ``boot_signal``: see
        ``with_boot``; a failed boot raises ``BootCheckError``). ``Cancelled`` if ``cancel()`` stopped
        it; ``LockedError`` while another run (a thread or a process) migrates the same VMID on the
        target."""
        with self._lock:
            assert self._status is not None
            if self._status.state == "running":  # its status is the running one's: leave it be
                raise LockedError(f"VMID {self.vmid} is being migrated by this Migration already",
                                  hint="wait for its run() to end")
            self._status = MigrationStatus(self.vmid, state="running")
        token = self._token
        self._progress = _Progress()
        try:
            with interrupts.cancelled_by(token), _one_line_os_errors():
                token.check()
                result = with_boot(self._run())
        except BaseException as exc:
            self._update(state="cancelled" if isinstance(exc, Cancelled) else "failed", error=exc)
            raise
        finally:
            if token.cancelled:  # spent: the next run() resumes
                self._token = interrupts.CancelToken()
        self._update(state="finished", result=result, done=self.status.total)
        return result

    def events(self) -> Iterator[Event]:
        """Run the migration in a thread of its own and yield its events as they come; the iteration
        ends when it does, raising its error if it failed (the result is then ``status.result``).
        Leaving the loop early cancels the migration (and waits for it to stop)."""
        pipe: queue.Queue[Event | None] = queue.Queue()
        failed: list[BaseException] = []

        def work() -> None:
            try:
                self.run()
            except BaseException as exc:  # handed to the reader, who raises it
                failed.append(exc)
            finally:
                pipe.put(None)

        self._listeners.append(pipe.put)
        worker = threading.Thread(target=work, name=f"v2p-migration-{self.vmid}", daemon=True)
        try:
            worker.start()
            while (event := pipe.get()) is not None:
                yield event
        finally:
            if worker.is_alive():
                self.cancel()
                worker.join()
            self._listeners.remove(pipe.put)
        if failed:
            raise failed[0]

    def _run(self) -> dict[str, Any]:
        for attempt in range(1, AUTO_TRIES + 1):
            try:
                return self.pipeline.run()
            except (VMIDExistsError, LockedError) as exc:
                # Free when asked, taken by the time of the create (or locked by another run):
                # nothing was made under it, so the next one is as good.
                if not self.picked or attempt == AUTO_TRIES:
                    raise
                taken = self.pipeline.vmid
                vmid = self._free_vmid(taken)
                self.emit(Event("info", "vmid", f"VMID {taken} is taken now ({exc.message}); trying VMID {vmid}"))
                self.pipeline = Pipeline(self.pipeline.source, vmid, self.options, self.target, emit=self.emit)
        raise AssertionError("unreachable")


def with_boot(result: dict[str, Any]) -> dict[str, Any]:
    """A migration's record with how its boot check ended on top: ``boot`` is ``up`` (a sign the OS
    runs, named in ``boot_signal``), ``unconfirmed`` (no sign either way: ``boot_signal`` says what
    was seen; the VM is migrated, but nobody has seen it work), or ``skipped`` (no boot check). A
    ``failed`` boot never returns: it raises ``BootCheckError``."""
    stages = result.get("stages")
    record = stages.get("boot") if isinstance(stages, dict) else None
    boot, signal = boot_outcome(record.get("result") if isinstance(record, dict) else None)
    return {**result, "boot": boot, "boot_signal": signal}


def check_source(source: object) -> str:
    """A source path as a caller gave it: text or a path object, no NUL (``SourceError`` naming it)."""
    checked = check_text("source", source, controls=True, error=SourceError)
    assert checked is not None
    return checked


@contextlib.contextmanager
def _one_line_os_errors() -> Iterator[None]:
    """An ``OSError`` no stage turned into its own error leaves as a ``V2PError`` naming the file (as the
    CLI prints it), chained to the original: a library caller catches ``V2PError`` alone. A broken pipe
    is the caller's own output going away: left as it is."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        where = f"{shown_path(exc.filename)}: " if exc.filename else ""
        raise V2PError(f"{where}{exc.strerror or exc}") from exc


def earlier_migration(target: Target, described: str, options: MigrationOptions) -> int | None:
    """The VMID of the unfinished migration of the source ``described`` (``Source.describe()``) on
    ``target``, or of its finished one with these ``options`` whose VM is still there (what
    ``vmid="auto"`` resumes; ``v2p plan status`` asks the same, reading only)."""
    identity = options.identity()
    for state in list_states(target.state_dir()):
        request = state.data.get("request") if state.error is None else None
        if not isinstance(request, dict) or request.get("source") != described \
                or request.get("target") != target.describe():
            continue
        if not state.data.get("finished"):
            return state.vmid
        if request.get("options") == identity and target.vm_exists(state.vmid):
            return state.vmid
    return None


def migrate(source: str | os.PathLike[str] | Source, vmid: int | Literal["auto"], *, target: TargetSpec = None,
            on_event: EventHandler = ignore, **options: Any) -> dict[str, Any]:
    """Migrate (or resume migrating) ``source`` to VM ``vmid`` (``"auto"``: the next free one, see
    ``Migration``) on ``target`` (a ``Target``, a URL or a dict: see ``make_target``); see
    ``MigrationOptions``. The result is the migration's record with ``boot`` and ``boot_signal`` on
    top (``with_boot``): check ``boot``, a migration that finished has not always been seen to boot."""
    return Migration(source, vmid, target=target, on_event=on_event, **options).run()


def dance(vmid: int, *, target: TargetSpec = None, bus: str = "virtio", confirmed: bool = False,
          drivers_iso: str | None = None, net_drivers: bool = True, arch: str = "amd64",
          dance_wait: float = 600.0, boot_wait: float = 120.0, shutdown_timeout: float = 120.0,
          start: bool = False, on_event: EventHandler = ignore) -> dict[str, Any]:
    """Move an existing Windows VM's system disk from IDE to virtio (the two-boot dance).

    ``confirmed``: the operator says the guest has its drivers (``v2p dance --continue``).
    ``start``: leave the VM running on virtio afterwards (default: shut it down).
    """
    check_vmid(vmid)
    confirmed, start = check_bool("confirmed", confirmed), check_bool("start", start)
    dance_wait = check_seconds("--dance-wait", dance_wait)
    boot_wait = check_seconds("--boot-wait", boot_wait)
    shutdown_timeout = check_seconds("--shutdown-timeout", shutdown_timeout, zero=True)
    target = as_target(target)
    config = target.get_config(vmid)
    with VmidLock(target.state_dir(), vmid), _one_line_os_errors():
        target.remove_temporaries(vmid)
        pending = DriverDance.pending(target, vmid)
        if pending:
            # Finish the dance that was started, with its own settings (its ISO is attached).
            if bus != pending["bus"] and bus != "virtio":
                raise OptionError(f"VM {vmid} is half-way through a dance onto {pending['bus']}, not {bus}",
                                  hint=f"run: v2p dance {vmid} --continue")
            bus, iso_volid, net_drivers = pending["bus"], pending["iso_volid"], pending["net_drivers"]
        else:
            options = MigrationOptions(ostype=config.get("ostype", "win10"), bus=bus, drivers_iso=drivers_iso,
                                       net_drivers=net_drivers, arch=arch)
            if not options.is_windows:
                raise OptionError(f"VM {vmid} has ostype {options.ostype}: the driver dance is for Windows guests")
            iso_volid = check_drivers(target, options)["drivers_iso"]
        dance_options = DanceOptions(bus=bus, iso_volid=iso_volid, net_drivers=net_drivers,
                                     boot1_wait=dance_wait, boot2_wait=boot_wait,
                                     shutdown_timeout=shutdown_timeout)
        result = DriverDance(target, vmid, dance_options, emit=on_event).run(confirmed=confirmed)
        if not start and target.status(vmid) == "running":
            target.stop(vmid, timeout=shutdown_timeout)
        elif start:
            target.release(vmid)  # the dance's boots die with v2p unless kept
        return result


def remove(vmid: int, target: TargetSpec = None, *, confirm_name: str | None = None) -> None:
    """Remove a VM v2p made, its volumes (never a user's block device) and its records.

    A VM is v2p's when its description carries the tag of the migration that its record names
    (``<vmid>.json``). Any other VM (made by hand or another tool, a clone of a v2p VM, one whose
    record is gone) is removed only when ``confirm_name`` is its name (its VMID when it has none);
    otherwise ``ForeignVMError`` and the VM is left as it is (v2p's own records of that VMID, which
    describe no VM of v2p's, are discarded). A ``confirm_name`` that is not the VM's name is refused
    the same way, whoever made the VM.
    """
    target = as_target(target)
    check_vmid(vmid)
    if confirm_name is not None and not isinstance(confirm_name, str):
        raise OptionError(f"confirm_name must be the VM's name (a string), not {type(confirm_name).__name__}")
    with VmidLock(target.state_dir(), vmid), _one_line_os_errors():
        # A damaged record is discarded all the same; it is read only to tell whose the VM is.
        records = [MigrationState(target.state_dir(), vmid, suffix) for suffix in ("", ".dance")]
        recorded = any(os.path.lexists(record.path) for record in records)
        if target.vm_exists(vmid):
            config = target.get_config(vmid)
            name = config.get("name") or str(vmid)
            again = f"v2p vm rm {vmid} --force --confirm-name {_quoted(name)}"
            if confirm_name is not None and confirm_name != name:
                raise ForeignVMError(f"VM {vmid} is called {_quoted(name)}, not {_quoted(confirm_name)}: "
                                     "nothing removed", hint=f"type its name back exactly: {again}")
            ours = any(records[0].names(tag) for tag in pveconfig.tagged_by(config))
            if confirm_name is None and not ours:
                _discard(target, vmid, records)
                discarded = "; discarded v2p's migration records of that VMID" if recorded else ""
                raise ForeignVMError(f"VM {vmid} ({_quoted(name)}) was not made by v2p (no migration record "
                                     f"here names it): not removed{discarded}",
                                     hint=f"to remove it anyway, type its name back: {again}")
            target.destroy_vm(vmid)
        elif not recorded:
            raise NoSuchVMError(f"VMID {vmid} does not exist on the {target.kind} target and has no "
                                "migration record", hint="see: v2p vm list, v2p status")
        _discard(target, vmid, records)


def _discard(target: Target, vmid: int, records: list[MigrationState]) -> None:
    """v2p's own traces of a VMID: its work folder, its config temporaries and its records (all of
    them are tried; something not v2p's at a record's name is left for the user, named)."""
    remove_tree(target.state_dir() / f"{vmid}.work")
    target.remove_temporaries(vmid)
    left = []
    for record in records:
        try:
            record.remove()
        except TargetError as exc:
            left.append(exc)
    if left:
        raise left[0]


def _quoted(name: str) -> str:
    """A VM's name as a shell word on one line (a hand-written config may name it anything)."""
    return shlex.quote(name) if name.isprintable() else repr(name)


def inspect(path: str | os.PathLike[str]) -> DiskImage:
    """Inspect a disk image (headers only) and return what it is, or raise SourceError."""
    return inspect_disk(check_source(path))


@dataclass
class VMDisk:
    """One disk of an inspected VM: where it goes on the first boot and what inspection found."""

    spec: DiskSpec
    key: str | None  # its PVE key (scsi0, ide0, ...); None when the disks do not fit the bus
    capacity: int
    flavor: str | None = None
    image: DiskImage | None = None  # None for a disk read in place from an OVA, or a refused one
    messages: tuple[tuple[str, str], ...] = ()
    error: V2PError | None = None

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return "refused"
        return "warning" if any(kind == "warning" for kind, _text in self.messages) else "ok"

    def to_dict(self) -> dict[str, object]:
        """Today's disk row (``inspect --json`` of a disk), with the VM's label and key in front."""
        head: dict[str, object] = {"label": self.spec.label, "key": self.key, "source": self.spec.source}
        if self.error is not None:
            return {**head, "path": self.spec.source, "verdict": "refused", "reason": str(self.error)}
        if self.image is not None:
            return {**head, **self.image.to_dict()}
        return {**head, "path": self.spec.source, "flavor": self.flavor, "capacity": self.capacity,
                "verdict": self.verdict,
                "warnings": [text for kind, text in self.messages if kind == "warning"],
                "notes": [text for kind, text in self.messages if kind == "note"]}


@dataclass
class VMReport:
    """What ``inspect_vm`` found: the VM's hardware, the PVE config a migration with these options
    would create, each disk, the preflight rules' findings, and the error migrate would stop with."""

    path: str  # the source as it describes itself: a path, or a URI
    kind: str  # the source's kind: vmx, ovf, ova
    vmid: int
    spec: VMSpec | None = None
    ostype: str | None = None  # the PVE ostype the VM gets
    config: dict[str, str] = field(default_factory=dict)
    disks: list[VMDisk] = field(default_factory=list)
    findings: list[rules.Finding] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the source's own (an OVA without a manifest, ...)
    error: V2PError | None = None

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return "refused"
        warned = (self.warnings or any(f.severity == "warning" for f in self.findings)
                  or any(disk.verdict == "warning" for disk in self.disks))
        return "warning" if warned else "ok"

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "path": str(self.path), "kind": self.kind, "vmid": self.vmid,
            "spec": self.spec.to_dict() if self.spec is not None else None, "ostype": self.ostype,
            "config": dict(self.config), "disks": [disk.to_dict() for disk in self.disks],
            "findings": [finding.to_dict() for finding in self.findings], "warnings": list(self.warnings),
            "verdict": self.verdict}
        if self.error is not None:
            data["reason"] = str(self.error)
        return data


# The volume a disk would get: inspect touches no target, so the storage stays a placeholder.
PLACEHOLDER_VOLID = "<storage>:vm-{vmid}-disk-{index}"
UNMAPPED_BRIDGE = "<unmapped>"  # a NIC whose network has no bridge (the unmapped-network rule says so)


def vm_source(path: str | os.PathLike[str]) -> Source | None:
    """The source for ``path`` when it is a VM (a .vmx, a folder holding exactly one, an .ovf or
    .ova), None when it is a disk or a folder of disks (``inspect_paths`` takes those)."""
    try:
        source = open_source(path)
    except V2PError:  # a folder with no .vmx, or several: a folder of disks
        return None
    return None if isinstance(source, DiskSource) else source


def inspect_vm(path: str | os.PathLike[str] | Source, *, vmid: int = 100, **options: Any) -> VMReport:
    """Inspect a whole VM as ``migrate`` would see it with ``options`` (``MigrationOptions``:
    networks, bridge, ignore_rules, ...), without a target: hardware, config, disks, findings.

    An unsafe or broken VM is not raised but reported (``VMReport.error``, verdict ``refused``);
    options that are wrong in themselves (a bad bridge name, an unknown rule id) raise ``OptionError``.
    """
    check_vmid(vmid)
    migration = MigrationOptions.of(options)
    rules.check_ignore(migration.ignore_rules)
    source = path if isinstance(path, Source) else vm_source(check_source(path))
    if source is None:
        raise SourceError(f"{path} is not a VM (.vmx, .ovf, .ova or a folder with one .vmx)",
                          hint="inspect disks with v2p inspect DISK")
    report = VMReport(source.describe(), source.kind, vmid)
    try:
        spec = migration.hardware(source.spec())
    except V2PError as exc:
        report.error = exc
        return report
    resolved = migration.resolved(spec)
    assert resolved.ostype is not None
    report.spec, report.ostype = spec, resolved.ostype
    report.warnings = source.notices()
    try:
        keys = {disk.label: key for disk, key in pveconfig.disk_keys(spec, resolved, ostype=resolved.ostype)}
    except RuleError:  # too many disks for the bus: the too-many-disks rule says so
        keys = {}
    records = []
    # The pipeline's inspect stage, disk by disk, in a private folder qemu_source may write to.
    with scratch_dir("inspect-vm") as workdir:
        for index, disk in enumerate(spec.ordered_disks()):
            try:
                given = source.disk_facts(disk, Path(workdir) / str(index))
            except V2PError as exc:
                report.disks.append(VMDisk(disk, keys.get(disk.label), disk.capacity, error=exc))
                report.error = report.error or exc
                continue
            finally:
                source.release_disks()  # nothing is read from it after
            report.disks.append(VMDisk(disk, keys.get(disk.label), given.capacity, given.flavor, given.image,
                                       given.messages))
            chain = len(given.image.chain) if given.image is not None else 1
            records.append({"label": disk.label, "chain": chain, "capacity": given.capacity,
                            **boot_layout(given)})
    report.findings = check_rules(spec, resolved, records, chosen_ostype=migration.chosen_ostype(spec))
    try:
        rules.enforce(spec, report.findings)
    except RuleError as exc:
        # Before a disk's own refusal: the rule says why (an RDM, an encrypted disk) in the words
        # --ignore-rule and the README use; the disk's row keeps its own reason.
        report.error = exc
    report.config = _vm_config(spec, resolved, vmid, report.disks)
    return report


def _vm_config(spec: VMSpec, options: MigrationOptions, vmid: int, disks: list[VMDisk]) -> dict[str, str]:
    """The config the create and attach stages would write, with placeholder volumes."""
    assert options.ostype is not None
    unmapped = {nic.network: UNMAPPED_BRIDGE for nic in spec.nics
                if nic.network is not None and nic.network not in options.networks and not options.bridge}
    config = pveconfig.vm_config(spec, options, bridges={**unmapped, **options.networks},
                                 default_bridge=options.bridge, tag="v2p migration <id>", vmid=vmid,
                                 ostype=options.ostype)
    if spec.firmware == "efi":
        config["efidisk0"] = pveconfig.efidisk("<storage>", secure_boot=spec.secure_boot)
    placed = [(index, disk) for index, disk in enumerate(disks) if disk.key is not None]
    for index, disk in placed:
        assert disk.key is not None
        config[disk.key] = pveconfig.disk_value(PLACEHOLDER_VOLID.format(vmid=vmid, index=index), disk.capacity)
    if placed:
        config["boot"] = pveconfig.boot_order([disk.key for _index, disk in placed if disk.key])
    return config


def inspect_all(paths: list[str | os.PathLike[str]], *, vmid: int = 100,
                **options: Any) -> list[Row | VMReport]:
    """``inspect_paths`` for disks and folders of disks, ``inspect_vm`` for each VM among ``paths``."""
    if not isinstance(paths, (list, tuple)):
        raise OptionError(f"paths={shown(paths)}: must be a list of paths")
    out: list[Row | VMReport] = []
    for path in paths:
        source = vm_source(check_source(path))
        if source is None:
            out += inspect_paths([path])
        else:
            out.append(inspect_vm(source, vmid=vmid, **options))
    return out


def leftovers(target: TargetSpec = None) -> dict[str, dict[str, Any]]:
    """What v2p meant to delete on ``target`` and could not (an upload PVE refused to delete), retried
    now: what is still left, by volume id, with ``vmid``, ``error`` and ``since``. Every migration on
    the target retries them too."""
    return as_target(target).retry_leftovers()


def status(target: TargetSpec = None, vmid: int | None = None) -> list[MigrationState]:
    """The recorded migrations on ``target`` (all, or the one for ``vmid``)."""
    if vmid is not None:
        check_vmid(vmid)
    target = as_target(target)
    states = [s for s in list_states(target.state_dir()) if vmid is None or s.vmid == vmid]
    for state in states:
        if state.error is None:
            try:
                check_records(state)
            except StateError as exc:
                state.error = exc
    return states
