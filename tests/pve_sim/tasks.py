"""PVE worker tasks: UPIDs in PVE's format, status and log as the API shows them.

A task runs its work in a thread; the simulator's fault switches can make it
fail or slow. Not for the work itself (that is ``cluster.py``).
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_PIDS = itertools.count(os.getpid() * 10)
LOCK_WAIT = 10.0  # seconds PVE's lock_file waits for a VM's config lock


class TaskFailed(Exception):
    """Work that ends the task with this message as its exit status."""


@dataclass
class Task:
    upid: str
    node: str
    pid: int
    pstart: int
    starttime: int
    type: str
    id: str
    user: str
    status: str = "running"
    exitstatus: str | None = None
    lines: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    warnings: int = 0

    def log(self, line: str) -> None:
        self.lines.append(line)

    def warn(self, message: str) -> None:
        """pve-common ``PVE::RESTEnvironment::warn`` (what ``log_warn`` calls in a worker): a
        ``WARN:`` line in the task log, counted for the task's end."""
        self.log(f"WARN: {message}")
        self.warnings += 1

    def status_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"upid": self.upid, "node": self.node, "pid": self.pid,
                                "pstart": self.pstart, "starttime": self.starttime,
                                "type": self.type, "id": self.id, "user": self.user,
                                "status": self.status}
        if self.exitstatus is not None:
            data["exitstatus"] = self.exitstatus
        return data


def make_upid(node: str, pid: int, pstart: int, starttime: int, kind: str, ident: str, user: str) -> str:
    """PVE::Tools::upid_encode: hex pid, pstart and starttime, then type, id, user."""
    return f"UPID:{node}:{pid:08X}:{pstart:08X}:{starttime:08X}:{kind}:{ident}:{user}:"


class Tasks:
    def __init__(self, node: str) -> None:
        self.node = node
        self.by_upid: dict[str, Task] = {}
        self.fail_next: dict[str, str] = {}
        self.slow_next: dict[str, float] = {}
        self.logging_next: set[str] = set()  # slowed task types that log progress as they go
        self.warn_next: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def start(self, kind: str, ident: str, user: str, work: Callable[[Task], None],
              on_failure: Callable[[], None] | None = None, *, hold: threading.Lock | None = None,
              hold_name: str = "") -> Task:
        """Run ``work`` as a task; ``on_failure`` undoes what the API call did before the task
        (PVE's workers clean up after themselves, an injected failure included). ``hold``: a lock the
        whole task holds, its slowness included (qemu-server's ``lock_config`` around a config
        update and its disk imports), waited for 10 s as PVE's ``lock_file`` does (``hold_name``)."""
        pid = next(_PIDS)
        now = int(time.time())
        task = Task(make_upid(self.node, pid, now & 0xFFFFFF, now, kind, ident, user), self.node,
                    pid, now & 0xFFFFFF, now, kind, ident, user)
        with self.lock:
            self.by_upid[task.upid] = task
            failure = self.fail_next.pop(kind, None)
            delay = self.slow_next.pop(kind, 0.0)
            logging = kind in self.logging_next
            self.logging_next.discard(kind)
            warnings = self.warn_next.pop(kind, [])
        if hold is not None:
            work = self._holding(hold, hold_name, delay, work, logging)
            delay = 0.0
        if warnings:
            work = self._warning(warnings, work)
        threading.Thread(target=self._run, args=(task, work, failure, delay, on_failure), daemon=True).start()
        return task

    @staticmethod
    def _holding(hold: threading.Lock, name: str, delay: float,
                 work: Callable[[Task], None], logging: bool) -> Callable[[Task], None]:
        def holding(task: Task) -> None:
            if not hold.acquire(timeout=LOCK_WAIT):
                raise TaskFailed(f"can't lock file '{name}' - got timeout")
            try:
                _pause(task, delay, logging)
                work(task)
            finally:
                hold.release()
        return holding

    @staticmethod
    def _warning(warnings: list[str], work: Callable[[Task], None]) -> Callable[[Task], None]:
        def warning(task: Task) -> None:
            for message in warnings:
                task.warn(message)
            work(task)
        return warning

    def active(self, vmid: str | None = None) -> list[Task]:
        """The tasks still running (of VM ``vmid``: its id, as PVE's task list filters them)."""
        with self.lock:
            return [task for task in self.by_upid.values()
                    if task.status == "running" and (vmid is None or task.id == vmid)]

    @staticmethod
    def _run(task: Task, work: Callable[[Task], None], failure: str | None, delay: float,
             on_failure: Callable[[], None] | None) -> None:
        try:
            _pause(task, delay, False)
            if failure is not None:
                raise TaskFailed(failure)
            work(task)
            # pve-common PVE::RESTEnvironment::fork_worker: a worker that warned ends "TASK WARNINGS: n",
            # which PVE::UPID::read_status gives as the exit status "WARNINGS: n" (not an error).
            if task.warnings:
                task.exitstatus = f"WARNINGS: {task.warnings}"
                task.log(f"TASK WARNINGS: {task.warnings}")
            else:
                task.exitstatus = "OK"
                task.log("TASK OK")
        except Exception as exc:  # noqa: BLE001 - every failure of a worker is its exit status
            message = str(exc).strip() or type(exc).__name__
            if on_failure is not None:
                on_failure()
            task.log(message)
            task.exitstatus = message
            task.log(f"TASK ERROR: {message}")
        task.status = "stopped"
        task.done.set()


def render_bytes(value: float, precision: int = 2) -> str:
    """pve-common PVE::Format::render_bytes: the largest binary unit up to PiB, ``precision`` decimals
    (2 when none or 0 is given)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    unit = 0
    if value > 1023:
        unit = min(int(math.log(value) / math.log(1024)), len(units) - 1)
        value /= 1024 ** unit
    return f"{value:.{precision or 2}f} {units[unit]}"


PROGRESS_EVERY = 0.5  # seconds between a slowed task's progress lines


def _pause(task: Task, delay: float, logging: bool) -> None:
    """Wait ``delay`` seconds (an injected slowness). ``logging``: as a disk import does meanwhile,
    log its progress (qemu-server PVE::QemuServer::QemuImage::convert runs ``qemu-img convert -p`` and
    prints "transferred X of Y (N%)" as the percentage moves)."""
    end = time.monotonic() + delay
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, PROGRESS_EVERY))
        if logging:
            done = min(100.0, 100.0 * (1 - max(end - time.monotonic(), 0.0) / delay))
            size = 32 << 30
            task.log(f"transferred {render_bytes(int(size * done / 100), 1)} of {render_bytes(size, 1)} "
                     f"({done:.2f}%)")
