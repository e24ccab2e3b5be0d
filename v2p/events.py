"""Progress reporting: the pipeline emits ``Event``s, callers decide how to show them.

The CLI turns them into lines and a tqdm bar; ``v2p plan run`` sends them from
each child as JSON lines (``dataclasses.asdict``); a hosting panel forwards
them to its own UI. Nothing in the library prints.

A migration calls its handler from the thread that runs it, one event after
the other: per VM, events arrive in the order they happened. A handler shared
by migrations in several threads is called from each of them, so it must be
thread-safe itself (a ``queue.Queue`` is; ``Migration.events()`` uses one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

# What an event says happened; ``Event``'s docstring says what each kind carries.
EventKind = Literal["stage-start", "stage-done", "stage-skip", "progress", "finding", "warning", "info",
                    "vm-wait", "vm-start", "vm-done"]
EVENT_KINDS: frozenset[str] = frozenset(get_args(EventKind))
STAGE_KINDS: frozenset[EventKind] = frozenset({"stage-start", "stage-done", "stage-skip"})  # about one stage
PLAN_KINDS: frozenset[EventKind] = frozenset({"vm-wait", "vm-start", "vm-done"})  # about a plan's VM


@dataclass(frozen=True)
class Event:
    """One thing that happened during a migration.

    ``kind`` is one of:

    * ``stage-start``, ``stage-done`` (``data``: the stage's record), ``stage-skip`` (done before);
    * ``progress``: ``done`` of ``total`` bytes of disk ``disk`` written (``data['percent']``
      too, and ``data['bytes']``, the same as ``done``); with ``step`` ``upload``, bytes of an
      upload to the target instead (a disk's staged file, ``disk`` set, or the drivers ISO); with
      ``step`` ``fetch``, bytes of disk ``disk`` read from a source that is not read twice (a
      download) into the migration's local stage, which the copy and verify then read; with ``step``
      ``import``, bytes of disk ``disk`` the target's own import task has converted (PVE's
      ``import-from``, read from its task log, in ``attach``); with ``step`` ``compare``, bytes of
      disk ``disk`` compared with the source (in ``verify``). ``data['moved']``, where the producer
      counts it: the bytes this run really wrote (a copy: a sparse disk's zeros are not written),
      sent or received, as against ``done``, the position in the disk;
    * ``finding``: a preflight rule's finding, ``data['rule']`` its id (what ``ignore_rules``
      takes), ``data['severity']`` ``error``/``warning``/``info``;
    * ``warning``: something the user should know (a source notice, ``--no-verify``, ...);
    * ``info``: anything else worth a line (the guest's serial lines, the VMID chosen, ...);
    * ``vm-wait``, ``vm-start``, ``vm-done`` (stage ``plan``, from ``v2p plan run`` only): a VM of
      the plan is queued or waits for another (``message`` says which), its migration started
      (``message``: the child process), or it ended (``message``: its result, ``failed: ...``,
      or ``dry run``).

    ``stage`` is the stage's record name (``convert:1`` for the second disk's copy);
    ``disk`` the index of the disk an event is about (0 the boot disk), None for the VM;
    ``step`` the driver dance's step (``layout1``, ``boot1``, ...) during the ``drivers`` stage, and
    ``upload`` for an upload to the target (in ``verify``, or ``preflight`` for the drivers ISO),
    ``import`` and ``compare`` (see ``progress``),
    ``fetch`` for a source's disk read into the local stage (in ``convert``, or ``verify`` on a resume),
    ``prepare`` for what the source does before its disks are read (``Source.prepare``: a running
    vSphere VM's shutdown, each step an ``info``; in ``preflight``, or the first disk read of a resume);
    ``vmid`` the VM's (set by ``Migration`` on every event it passes on).
    """

    kind: EventKind
    stage: str
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    vmid: int | None = None
    disk: int | None = None
    done: int | None = None
    total: int | None = None
    step: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:  # a kind read back from a plan's child, or an untyped caller
            raise ValueError(f"unknown event kind {self.kind!r}: one of {', '.join(sorted(EVENT_KINDS))}")

    @classmethod
    def progress(cls, stage: str, done: int, total: int, *, disk: int | None = None, step: str | None = None,
                 moved: int | None = None) -> Event:
        """A ``progress`` event: ``done`` of ``total`` bytes of disk ``disk`` (``data``: ``disk``, ``percent``,
        ``bytes``, ``total`` and, from a producer that counts them, ``moved``)."""
        data: dict[str, Any] = {} if disk is None else {"disk": disk}
        data.update(percent=100.0 * done / total if total else 100.0, bytes=done, total=total)
        if moved is not None:
            data["moved"] = moved
        return cls("progress", stage, data=data, disk=disk, done=done, total=total, step=step)

    def with_vmid(self, vmid: int) -> Event:
        """This event, naming ``vmid`` unless it names one already."""
        return self if self.vmid is not None else replace(self, vmid=vmid)


EventHandler = Callable[[Event], None]


def ignore(_event: Event) -> None:
    """The default handler: events go nowhere."""
