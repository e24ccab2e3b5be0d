"""Which VM of a plan starts next: the ``plan run`` policy, apart from the processes it starts.

At most ``parallel`` VMs run at once, at most ``per_storage`` on one target storage and ``per_node`` on
one PVE node, and a VM starts only when its storage's free space, less what the VMs running there
reserved, holds what its disks still need. VMs are looked at in plan order; one that waits keeps its
place. Pure bookkeeping: no clock of its own (the caller passes ``now``), no I/O; measuring a VM's disks
and starting its child are ``planrun``'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Need:
    """What starting a VM takes: its storage (``key``, target and storage), the bytes its disks still
    need there, what is free there, and its PVE node ("" when none)."""

    key: str
    required: int
    free: int | None  # None: not measured (nothing left to write, or the child will say why it cannot)
    node: str = ""


def gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB"


class Scheduler:
    """The waiting VMs (by their index in the plan), the running ones and what each reserved."""

    def __init__(self, count: int, *, parallel: int, per_storage: int, per_node: int) -> None:
        self.parallel, self.per_storage, self.per_node = parallel, per_storage, per_node
        self.pending: list[int] = list(range(count))  # plan order, but a VM retried goes first
        self.not_before: dict[int, float] = {}  # a VM retried later (its VMID was locked)
        self.running: dict[int, Need] = {}
        self.measured: dict[int, Need] = {}  # a waiting VM's need, kept until something changes it
        self.changed = True  # something ended since the waiting VMs were last looked at

    @property
    def full(self) -> bool:
        return len(self.running) >= self.parallel

    def due(self, now: float) -> Iterator[int]:
        """The waiting VMs to look at now, in order; none when nothing ended since the last look and no
        retry is due, and no more once every slot is taken (``start`` takes one)."""
        retry_due = any(when <= now for when in self.not_before.values())
        if not (self.changed or retry_due) or self.full:
            return
        self.changed = False
        for index in list(self.pending):
            if self.full:
                break
            if index in self.pending and self.not_before.get(index, 0.0) <= now:
                yield index

    def waits_for(self, index: int, need: Need) -> str | None:
        """None if VM ``index`` may start now; else what it waits for: a slot on its storage or node, or
        room on its storage. Its ``need`` is kept for the next look, unless room was what it lacked
        (then it is measured again, once something changed)."""
        self.measured[index] = need
        if sum(1 for other in self.running.values() if other.key == need.key) >= self.per_storage:
            return f"a free slot on {need.key} (at most {self.per_storage} at once)"
        if need.node and sum(1 for other in self.running.values() if other.node == need.node) >= self.per_node:
            return f"a free slot on node {need.node} (at most {self.per_node} at once)"
        if need.free is not None:
            reserved = self.reserved(need.key)
            if need.required > need.free - reserved:
                # What the running ones wrote already is out of ``free`` and still reserved: this errs
                # towards waiting.
                self.measured.pop(index)
                return (f"{gib(need.required)} on {need.key} ({gib(need.free)} free, "
                        f"{gib(reserved)} reserved by the VMs running there)")
        return None

    def reserved(self, key: str) -> int:
        """The bytes the VMs running on storage ``key`` reserved."""
        return sum(other.required for other in self.running.values() if other.key == key)

    def running_on(self, key: str) -> bool:
        return any(other.key == key for other in self.running.values())

    def start(self, index: int, need: Need) -> None:
        self.pending.remove(index)
        self.not_before.pop(index, None)
        self.running[index] = need

    def end(self, index: int) -> None:
        """VM ``index`` ended: its slots and its reservation are free."""
        del self.running[index]
        self.changed = True

    def retry(self, index: int, at: float) -> None:
        """VM ``index`` ended but is to start again, first in line, no sooner than ``at``."""
        self.pending.insert(0, index)
        self.not_before[index] = at
        self.measured.pop(index, None)

    def drop(self, index: int) -> None:
        """VM ``index`` will not start (it failed before starting)."""
        self.pending.remove(index)

    def stop(self) -> list[int]:
        """Nothing more starts; the VMs that were waiting."""
        waiting, self.pending = self.pending, []
        return waiting
