"""Running a plan: many migrations at once, each in a process of its own.

``run_plan`` starts one child (``python -m v2p.planrun``) per VM, at most ``parallel`` at once and at most
``per_storage`` / ``per_node`` on one target storage / PVE node, and a VM only when its storage's free space,
less what the running children have reserved, holds its disks. The children and the lines they write are
``planchild``'s (the job on stdin, each ``Event`` a JSON line); which VM starts when is ``planschedule``'s;
this module keeps the books: each VM's ``VMRun``, its measure, its outcome, the ``PlanReport``.

A child stops the way ``v2p migrate`` does on Ctrl-C (resumable, nothing half-written counted as done) on
SIGINT from the parent, and on its stdin closing: the parent never closes it while the child runs, so the
end of file means the parent is gone, even killed with SIGKILL. Nothing here prints (``planview`` shows the
events and the report); reading plan files is ``plan``'s job, spreading VMs over a cluster is PVE's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from . import api, interrupts
from .boot_outcomes import BOOT_SKIPPED, boot_words
from .errors import EXIT_BOOT_UNCONFIRMED, LockedError, NoSpaceError, V2PError
from .events import Event
from .fsutil import private_dir, remove_tree
from .options import OptionError
from .planchild import Child, Children, event_of
from .planschedule import Need, Scheduler, gib
from .progress import Meter, Progress
from .sizing import SpaceNeed
from .stage_context import disk_stage
from .state import MigrationState, VmidLock
from .targets.base import BOOT_FAILED, BOOT_UNCONFIRMED, BOOT_UP

# Two children keep a 2-core machine responsive: each one's qemu-img convert is mostly one busy core
# (decompressing streamOptimized grains, zero detection), its boot check one TCG/KVM vCPU thread, and the
# parent and the user's shell need a little CPU too. Raise it with --parallel on bigger machines.
PARALLEL = 2
# Writers on one storage share its disks: past three streams the copies only take turns (seeks on
# spinning disks, the same queue on an SSD) and each VM takes longer to finish, so a wave finishes no
# sooner and more VMs sit half-done if it is stopped.
PER_STORAGE = 3
# A PVE node converts (import tasks) and boots (boot checks, the driver dance) what v2p sends it; four at
# once leave a small node room for the guests it already runs.
PER_NODE = 4
# How long a VM whose VMID lock is held waits for it: after a ``plan run`` killed with SIGKILL its children
# take a moment to stop (the boot check's QEMU goes first), and a rerun must neither run a second migration
# of that VMID meanwhile (the lock sees to that) nor give the VM up for it.
LOCK_WAIT = 120.0
LOCK_RETRY = 1.0
MEASURE_DIR = "plan-measure"  # in <vmid>.work: the disks staged to measure what a VM needs
TICK = 0.2  # seconds between looks at the stop flag and at VMs waiting for a retry
# How long children get to stop on SIGINT before SIGKILL: v2p stops within a second or two (a PVE task in
# flight is waited for), so a child still there after this is stuck, and a stuck child must not hold the run.
STOP_GRACE = 120.0


class PlanVM(Protocol):
    """What ``run_plan`` reads of one VM of a plan (``v2p.plan.PlanVM``, defaults merged in)."""

    name: str
    source: str  # a URI, or an absolute path
    vmid: int | Literal["auto"]
    target: str | dict[str, Any]
    node: str | None
    options: dict[str, Any]
    line: int


DONE = ("migrated", "nothing to do")  # the results that count as made it
QUEUED = "queued"  # the first vm-wait event of every VM
DRY_RUN = "dry run"  # the result of every VM a dry run would migrate


@dataclass
class VMRun:
    """One VM of a plan as the run sees it: its live state for a view, then its result for the report.

    ``result``: waiting, running, migrated, nothing to do, failed, interrupted, not started, dry run.
    ``boot``: how its boot check ended, once known: up, unconfirmed (migrated, but no sign the OS runs:
    ``boot_signal`` says what was seen), failed (the migration failed there), skipped (not checked).
    ``moved``: the bytes this run really wrote (disks an earlier run finished are not written again).
    """

    name: str
    vmid: int | None
    node: str
    storage: str
    result: str = "waiting"
    stage: str = ""
    seconds: float = 0.0
    error: str | None = None
    exit_code: int = 0
    waiting_for: str = ""  # why it has not started yet
    boot: str = ""  # up | unconfirmed | failed | skipped; "" while unknown (not that far, or not run)
    boot_signal: str = ""
    log: str | None = None  # its migration's log file, when the run keeps logs (``run_plan(logs=True)``)
    plan: list[tuple[str, str, bool]] = field(default_factory=list)  # dry run: (stage, summary, done)
    about: list[str] = field(default_factory=list)  # dry run: what the VM is and where it would go
    started: float | None = None  # monotonic, of this run's first start
    progress: Progress = field(default_factory=Progress, repr=False)  # its disks' meters (``v2p.progress``)

    @property
    def ok(self) -> bool:
        return self.result in DONE

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "vmid": self.vmid, "node": self.node, "storage": self.storage,
                                "result": self.result, "stage": self.stage, "seconds": round(self.seconds, 3),
                                "bytes_moved": self.moved, "exit_code": self.exit_code, "error": self.error,
                                "boot": self.boot or None, "boot_signal": self.boot_signal or None, "log": self.log}
        if self.plan or self.about:
            data["about"] = list(self.about)
            data["stages"] = [{"stage": stage, "summary": summary, "done": done}
                              for stage, summary, done in self.plan]
        return data

    @property
    def moved(self) -> int:
        """Bytes this run's copies of its disks really wrote (``data['moved']``; from an old producer, the
        position): a disk an earlier run finished is not written again, a sparse disk's holes not at all."""
        return self.progress.moved

    @property
    def meter(self) -> Meter | None:
        """What its stage is moving now (None between a stage's start and its first progress)."""
        return self.progress.current

    def see(self, event: Event) -> None:
        """Take in one of its migration's events."""
        self.progress.see(event)
        if event.kind == "stage-start":
            self.stage, self.progress.current = event.stage, None


@dataclass
class PlanReport:
    """The outcome of ``run_plan``: every VM's ``VMRun``, in plan order."""

    vms: list[VMRun]
    interrupted: int | None = None  # the signal that stopped the run, if one did
    dry_run: bool = False

    @property
    def migrated(self) -> bool:
        """Every VM made it (migrated or nothing to do), whether or not its boot was seen; in a dry run,
        every VM's preflight passed (a VM the run would refuse fails the dry run too)."""
        return self.interrupted is None and all(vm.ok or (self.dry_run and vm.result == DRY_RUN) for vm in self.vms)

    @property
    def ok(self) -> bool:
        """Every VM made it and none is only "boot not confirmed": what exit code 0 says."""
        return self.migrated and not self.boots().get(BOOT_UNCONFIRMED)

    def boots(self) -> dict[str, int]:
        """How many VMs' boot checks ended each way (up, unconfirmed, failed, skipped), in that order."""
        counts = {outcome: sum(1 for vm in self.vms if vm.boot == outcome)
                  for outcome in (BOOT_UP, BOOT_UNCONFIRMED, BOOT_FAILED, BOOT_SKIPPED)}
        return {outcome: count for outcome, count in counts.items() if count}

    @property
    def exit_code(self) -> int:
        """0 only if every VM made it with its boot seen up (or not checked); EXIT_BOOT_UNCONFIRMED
        (12) if every VM made it but some boots were not confirmed; 128 + the signal when stopped (as
        the CLI); else 1."""
        if self.interrupted is not None:
            return 128 + self.interrupted
        if not self.migrated:
            return 1
        return 0 if self.ok else EXIT_BOOT_UNCONFIRMED

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "exit_code": self.exit_code, "interrupted": self.interrupted,
                "dry_run": self.dry_run, "boot": self.boots(), "vms": [vm.to_dict() for vm in self.vms]}


PlanEventHandler = Callable[[VMRun, Event], None]


def _ignore(_vm: VMRun, _event: Event) -> None:
    """The default handler: events go nowhere."""


class _Runner:
    """The parent's loop, in one thread: which VM starts when is its ``Scheduler``'s to say, the children
    and their lines its ``Children``'s; here each VM's measure, events and outcome are booked."""

    def __init__(self, vms: Sequence[PlanVM], *, parallel: int, per_storage: int, per_node: int,
                 on_event: PlanEventHandler, stop: threading.Event | None, accel: str, lock_wait: float,
                 refused: Mapping[str, str], logs: bool = False) -> None:
        self.vms, self.logs = vms, logs
        self.schedule = Scheduler(len(vms), parallel=parallel, per_storage=per_storage, per_node=per_node)
        self.refused = refused
        self.emit, self.stop, self.accel, self.lock_wait = on_event, stop, accel, lock_wait
        self.runs = [VMRun(vm.name, vm.vmid if isinstance(vm.vmid, int) else None, vm.node or "",
                           str(vm.options.get("device") or vm.options.get("storage") or "")) for vm in vms]
        self.first_try: dict[int, float] = {}
        self.running: dict[int, Child] = {}
        self.children = Children(self._message)
        self.interrupted: int | None = None
        self.stopping_since: float | None = None  # when the children got SIGINT

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> PlanReport:
        for run in self.runs:  # a view learns every VM before the first one starts
            self.emit(run, Event("vm-wait", "plan", QUEUED))
        for index, vm in enumerate(self.vms):
            if vm.name in self.refused:
                self._fail(index, PlanRefused.exit_code, self.refused[vm.name])
        try:
            while self.schedule.pending or self.running:
                try:
                    self._tick()
                except KeyboardInterrupt:
                    self._interrupt(interrupts.received() or signal.SIGINT)
        finally:
            for child in list(self.running.values()):  # only if the loop itself failed: never leave them
                with contextlib.suppress(OSError):
                    child.proc.send_signal(signal.SIGINT)
            self.children.close()
        return PlanReport(self.runs, self.interrupted)

    def _tick(self) -> None:
        if self.interrupted is None and self.stop is not None and self.stop.is_set():
            self._interrupt(signal.SIGINT)
        if self.interrupted is None:
            self._start_what_fits()
        elif self.stopping_since is not None and time.monotonic() - self.stopping_since > STOP_GRACE:
            self._interrupt(self.interrupted)  # they ignored SIGINT: SIGKILL, as a second Ctrl-C does
        self.children.wait(TICK)
        for child in [c for c in self.running.values() if not c.open_fds]:
            self._finish(child)

    def _interrupt(self, signum: int) -> None:
        """Stop: every child gets SIGINT (it stops resumably), nothing more starts. Asked again while
        they stop (a second Ctrl-C), they get SIGKILL: a killed migration resumes as well (its records
        are written atomically; its QEMU and qemu-img die with it), it only skips tidying up."""
        again = self.interrupted is not None
        self.stopping_since = None if again else time.monotonic()
        if not again:
            self.interrupted = signum
            for index in self.schedule.stop():
                self.runs[index].result = "not started"
        for child in self.running.values():
            with contextlib.suppress(OSError):
                child.proc.send_signal(signal.SIGKILL if again else signal.SIGINT)

    # -- starting ------------------------------------------------------------------------------------
    def _start_what_fits(self) -> None:
        for index in self.schedule.due(time.monotonic()):
            need = self.schedule.measured.get(index) or self._measure(index)
            if need is None:
                continue  # failed or waits for room: it said so
            run = self.runs[index]
            waiting = self.schedule.waits_for(index, need)
            if waiting is None:
                self.schedule.start(index, need)
                self._spawn(index)
            elif waiting != run.waiting_for:
                run.waiting_for = waiting
                self.emit(run, Event("vm-wait", "plan", f"waiting for {waiting}"))

    def _measure(self, index: int) -> Need | None:
        """What VM ``index`` needs on its storage: ``qemu-img measure`` of every disk not yet written,
        through its target's disk sink, as the preflight stage does. A VM that can never fit fails here;
        one whose source cannot even be read is started anyway, so that it fails in its own words."""
        vm, run = self.vms[index], self.runs[index]
        node = vm.node or ""
        try:
            migration = _migration(vm, self.accel)
        except V2PError:
            return Need(run.storage or "?", 0, None, node)
        options = migration.options
        run.storage = run.storage or options.device or options.storage
        key = f"{_where(migration.target.describe())}:{options.device or options.storage}"
        run.vmid = migration.vmid if vm.vmid != api.AUTO else run.vmid
        state = MigrationState(migration.target.state_dir(), migration.vmid)
        try:
            recorded = state.data if state.load() else {}
        except V2PError:
            recorded = {}
        if recorded.get("finished") or (vm.vmid != api.AUTO and self._locked(migration)):
            return Need(key, 0, None, node)
        stages = recorded.get("stages", {}) if recorded.get("request", {}).get("options") == \
            options.identity() else {}
        space = SpaceNeed()
        try:
            pipeline = migration.pipeline
            spec = options.hardware(pipeline.source.spec())
            with _measure_dir(migration) as workdir:
                for disk_index, disk in enumerate(spec.ordered_disks()):
                    if disk_stage("convert", disk_index) in stages:
                        continue
                    try:
                        capacity = pipeline.source.disk_facts(disk, workdir / str(disk_index)).capacity
                        endpoint = pipeline.source.disk_endpoint(disk, workdir / str(disk_index))
                        sink = migration.target.disk_sink(migration.vmid, disk_index, fmt=options.fmt,
                                                          storage=options.storage, device=options.device,
                                                          force=options.force)
                        space.add(sink.check(endpoint, capacity=capacity))
                    finally:
                        pipeline.source.release_disks()
        except V2PError as exc:
            if not isinstance(exc, NoSpaceError):
                return Need(key, 0, None, node)  # the child's preflight says what is wrong, in its own words
            self._no_room(index, key, exc.exit_code, str(exc))
            return None
        required, free = space.required, space.free
        if free is not None and required > free:
            self._no_room(index, key, 4, f"not enough space on {key}: its disks need {gib(required)}, "
                          f"{gib(free)} are free (hint: free some space or give the VM another storage)")
            return None
        return Need(key, required, free, node)

    def _no_room(self, index: int, key: str, code: int, message: str) -> None:
        """VM ``index`` does not fit on its storage as it is now. While other VMs of the plan run there it
        waits (one that fails gives back what it wrote; a PVE upload is removed once imported); with none
        running there it never will fit: it fails."""
        run = self.runs[index]
        if not self.schedule.running_on(key):
            self._fail(index, code, message)
            return
        waiting = f"room on {key}, or the VMs running there to end ({message})"
        if run.waiting_for != waiting:
            run.waiting_for = waiting
            self.emit(run, Event("vm-wait", "plan", f"waiting for {waiting}"))

    @staticmethod
    def _locked(migration: api.Migration) -> bool:
        """Whether another process holds the VMID's lock now (the child would be refused)."""
        try:
            with VmidLock(migration.target.state_dir(), migration.vmid):
                return False
        except LockedError:
            return True
        except OSError:
            return False

    def _fail(self, index: int, code: int, message: str) -> None:
        run = self.runs[index]
        run.result, run.error, run.exit_code, run.waiting_for = "failed", message, code, ""
        self.schedule.drop(index)
        self.emit(run, Event("vm-done", "plan", f"failed: {message}"))

    def _spawn(self, index: int) -> None:
        vm, run = self.vms[index], self.runs[index]
        job = {"name": vm.name, "source": str(vm.source), "vmid": vm.vmid, "target": vm.target,
               "accel": self.accel, "options": vm.options, "log": self.logs}
        child = self.children.spawn(index, job)
        self.running[index] = child
        self.first_try.setdefault(index, child.started)
        if run.started is None:
            run.started = child.started
        run.result, run.waiting_for, run.error = "running", "", None
        self.emit(run, Event("vm-start", "plan", f"started (process {child.proc.pid})"))

    # -- what the children say ------------------------------------------------------------------------
    def _message(self, child: Child, message: dict[str, Any]) -> None:
        run = self.runs[child.index]
        if isinstance(message.get("vmid"), int):
            run.vmid = message["vmid"]
        if "kind" in message:
            event = event_of(message)
            run.see(event)
            self.emit(run, event)
        else:
            child.last = message

    def _finish(self, child: Child) -> None:
        code = self.children.reap(child)
        del self.running[child.index]
        self.schedule.end(child.index)
        run, last = self.runs[child.index], child.last or {}
        run.log = str(last["log"]) if last.get("log") else run.log
        run.seconds += time.monotonic() - child.started
        run.exit_code = code
        if code in (0, EXIT_BOOT_UNCONFIRMED) and isinstance(last.get("result"), dict):
            result = last["result"]
            run.result = "nothing to do" if result.get("nothing_to_do") else "migrated"
            run.stage = "finish"
            run.boot, run.boot_signal = str(result.get("boot") or BOOT_SKIPPED), str(result.get("boot_signal") or "")
            said = "" if run.boot == BOOT_SKIPPED else f"; {boot_words(run.boot, run.boot_signal)}"
            self.emit(run, Event("vm-done", "plan", run.result + said))
            return
        if "interrupted" in last or (self.interrupted is not None and "error" not in last):
            run.result, run.error = "interrupted", "interrupted; rerun the same command to resume"
            self.emit(run, Event("vm-done", "plan", run.error))
            return
        if last.get("type") == "LockedError" and self.interrupted is None and \
                time.monotonic() - self.first_try[child.index] < self.lock_wait:
            # Its VMID is still locked, most likely by a child of a killed run that is still stopping.
            run.result, run.waiting_for = "waiting", f"the lock on VMID {run.vmid}"
            self.schedule.retry(child.index, time.monotonic() + LOCK_RETRY)
            self.emit(run, Event("info", "plan", f"VMID {run.vmid} is locked by another run; waiting"))
            return
        run.result = "failed"
        if last.get("boot") == BOOT_FAILED:
            run.boot, run.boot_signal = BOOT_FAILED, str(last.get("boot_signal") or "")
        if "error" in last:
            run.error = str(last.get("text") or last["error"])
            notes = [str(note) for note in last.get("notes") or ()]
            if notes:
                run.error += "; " + "; ".join(notes)
        else:
            tail = " / ".join(child.stderr[-3:]) or "no output"
            run.error = f"the migration process ended with exit status {code}: {tail}"
        if code == 0:
            run.exit_code = 1
        self.emit(run, Event("vm-done", "plan", f"failed: {run.error}"))


@contextlib.contextmanager
def _measure_dir(migration: api.Migration) -> Iterator[Path]:
    """A folder for what measuring a VM's disks stages (an OVA's members), under its VMID lock in the
    VM's own work folder on its target: what a run killed meanwhile left there, the next run's measure
    removes first, and the migration's end removes with its work folder (never $TMPDIR, where nothing
    would ever sweep it)."""
    state_dir, vmid = migration.target.state_dir(), migration.vmid
    with VmidLock(state_dir, vmid):
        folder = private_dir(state_dir / f"{vmid}.work") / MEASURE_DIR
        remove_tree(folder)
        try:
            yield private_dir(folder)
        finally:
            remove_tree(folder)
            with contextlib.suppress(OSError):  # the work folder, if measuring alone made it
                folder.parent.rmdir()


def _where(described: dict[str, str]) -> str:
    """A target's short name for messages and keys: its directory or PVE host/node."""
    if described.get("kind") == "local":
        return described.get("dir", "local")
    host, node = described.get("host"), described.get("node")
    return f"{host}/{node}" if host and node else json.dumps(described, sort_keys=True)


class PlanRefused(V2PError):
    """A VM its plan's checks refused (``v2p plan validate`` says the same): it is not started."""

    exit_code = 2  # as PlanError


def _migration(vm: PlanVM, accel: str) -> api.Migration:
    """The VM's migration as a child would start it; built touching nothing (``vmid: auto`` asks the
    target which VMID is free, or finds this source's earlier migration)."""
    target = api.make_target(vm.target, accel=accel, env=os.environ)  # a plan is the operator's own
    return api.Migration(vm.source, vm.vmid, target=target, **vm.options)


def run_plan(vms: Sequence[PlanVM], *, parallel: int = PARALLEL, dry_run: bool = False,
             on_event: PlanEventHandler | None = None, per_storage: int = PER_STORAGE, per_node: int = PER_NODE,
             stop: threading.Event | None = None, accel: str = "auto", lock_wait: float = LOCK_WAIT,
             refused: Mapping[str, str] | None = None, logs: bool = False) -> PlanReport:
    """Migrate (or resume) every VM of a plan, each in a child process; see the module docstring.

    ``on_event(vm, event)`` gets each child's events (``vm`` is the VM's live ``VMRun``) and the run's own:
    ``vm-start`` and ``vm-done`` (stage ``plan``). It is called on the calling thread. ``stop`` set (from
    any thread) stops the run as SIGINT does: every child stops resumably and the report says
    ``interrupted``. In the main thread a ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM under
    ``interrupts.install``) does the same instead of propagating. One VM's failure stops no other.
    ``dry_run``: what each VM would do, as ``v2p migrate --dry-run`` shows it, touching nothing.
    ``refused``: VM name -> why its plan's checks refused it (``Plan.run``): it fails before anything is
    measured, locked or made for it. ``logs``: each child writes its migration's log file, as ``v2p migrate``
    does (``VMRun.log`` its path); off by default, as the library's logs are.
    """
    for option, value in (("--parallel", parallel), ("per_storage", per_storage), ("per_node", per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"{option} {value!r}: must be a whole number of at least 1")
    emit = on_event or _ignore
    if dry_run:
        return _dry_run(vms, accel, emit, refused or {})
    return _Runner(vms, parallel=parallel, per_storage=per_storage, per_node=per_node, on_event=emit, stop=stop,
                   accel=accel, lock_wait=lock_wait, refused=refused or {}, logs=logs).run()


def _dry_run(vms: Sequence[PlanVM], accel: str, emit: PlanEventHandler, refused: Mapping[str, str]) -> PlanReport:
    runs = []
    for vm in vms:
        run = VMRun(vm.name, vm.vmid if isinstance(vm.vmid, int) else None, vm.node or "",
                    str(vm.options.get("storage") or ""))
        runs.append(run)
        try:
            if vm.name in refused:
                raise PlanRefused(refused[vm.name])
            migration = _migration(vm, accel)
            run.vmid, run.storage = migration.vmid, migration.options.device or migration.options.storage
            preview = migration.preview()  # the real run's preflight, nothing made: `v2p migrate --dry-run`'s
            run.about, run.plan = preview.lines(), preview.plan()
            run.result = DRY_RUN
        except V2PError as exc:
            run.result, run.error, run.exit_code = "failed", str(exc), exc.exit_code
        emit(run, Event("vm-done", "plan", run.result if run.error is None else f"failed: {run.error}"))
    return PlanReport(runs, dry_run=True)
