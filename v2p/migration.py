"""One migration as the library runs it: ``Migration`` (run, events, status, cancel), ``migrate``,
and the pieces ``vmid="auto"`` needs (``earlier_migration``).

Not for: inspecting without a target (``vmreport``), nor what is done to a VM afterwards
(``vmops``: dance, remove, status). ``v2p.api`` offers all three.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from . import interrupts, pveconfig
from .boot_outcomes import boot_outcome
from .errors import (
    Cancelled,
    LockedError,
    SourceError,
    V2PError,
    VMIDExistsError,
    shown,
    shown_path,
)
from .events import Event, EventHandler, ignore
from .options import MigrationOptions, OptionError, check_text, check_vmid
from .pipeline import Pipeline
from .preview import Preview
from .sources import Source, open_source
from .state import MigrationState, list_states
from .targets.base import Target
from .targets.factory import make_target

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

    def preview(self) -> Preview:
        """What ``run()`` would do, from the real run's own checks with nothing made (no state file, no
        lock, no VM, no volume, nothing uploaded, no source VM shut down): the VM as mapped, the config it
        would get, every rule finding, each disk's room, the bridges, storages, target and rights checked,
        and the stages it will do (``Preview``). Raises the ``V2PError`` the run would refuse with (the
        same type and exit code), e.g. ``RuleError`` for an unmapped network."""
        with interrupts.cancelled_by(self._token), one_line_os_errors():
            # A VMID v2p picked (``auto``) that another run holds: the run picks the next one, no refusal.
            return self.pipeline.preview(locked=not self.picked)

    def plan(self) -> list[tuple[str, str, bool]]:
        """The stages this migration will do for its VM, as (name, what it does, already done): the
        driver dance only for a Windows VM that needs it, the boot check only if asked. Makes the same
        checks as ``preview()`` (and raises what it raises)."""
        return self.preview().plan()

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
            with interrupts.cancelled_by(token), one_line_os_errors():
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
def one_line_os_errors() -> Iterator[None]:
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

