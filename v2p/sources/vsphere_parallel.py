"""A VM's disks downloaded at once, at most N at a time from one ESXi host (``?parallel=N``, default 2).

When the pipeline first asks for a disk after ``prepare``, the source starts a download of every disk
of the VM, each in a thread of its own; a thread waits for one of its host's slots before it reads a
byte. ``wait(label)`` gives the pipeline its disk as soon as that disk is whole, while the others go
on. A host's slots are N lock files in the target's state folder (``migrations/vsphere-slots/``), a
download holding one with ``flock`` while it reads: every migration onto that target shares them, the
threads of one program (the library) and a plan's children (one process per VM) alike. A migration
asking for N uses the first N files: with different N at once, at most the largest N run.

A thread stops at its next progress report once ``stop`` is set (Ctrl-C, a cancelled migration, an
error in the pipeline: ``close``); the part it was writing stays, and the next run resumes it. The
threads are daemons: a process that ends does not wait for a download it no longer wants.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import interrupts

JOIN_SECONDS = 5.0  # how long ``close`` waits for a stopped thread to let go of its part
POLL = 0.2  # seconds between two looks for a free slot


class HostSlots:
    """The ``limit`` download slots of one ESXi host: lock files ``folder/HASH.N`` (the host's key hashed:
    no name from the server becomes a path)."""

    def __init__(self, folder: Path, host: str, limit: int) -> None:
        self.folder = folder
        digest = hashlib.sha256(host.encode()).hexdigest()[:16]
        self.paths = [folder / f"{digest}.{n}" for n in range(limit)]

    def acquire(self, check: Callable[[], None]) -> int:
        """A free slot's file descriptor, locked (``check`` is called between looks); ``release`` it."""
        self.folder.mkdir(mode=0o700, exist_ok=True)
        while True:
            for path in self.paths:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    os.close(fd)
            check()
            time.sleep(POLL)

    @staticmethod
    def release(fd: int) -> None:
        os.close(fd)  # the lock goes with the last descriptor of its open file


class Stopped(Exception):
    """A download given up because its migration stopped (never seen by a user: the pipeline's own
    interruption or error is)."""


@dataclass
class _Job:
    thread: threading.Thread
    done: threading.Event = field(default_factory=threading.Event)
    result: Path | None = None
    error: BaseException | None = None


class Downloads:
    """The downloads of one VM's disks, keyed by the disk's label."""

    def __init__(self, slots: HostSlots) -> None:
        self.slots = slots
        self.stop = threading.Event()
        self._jobs: dict[str, _Job] = {}

    def check(self) -> None:
        """Raise ``Stopped`` in a download thread once its migration stopped."""
        if self.stop.is_set():
            raise Stopped

    def start(self, label: str, work: Callable[[], Path]) -> None:
        """Run ``work`` (which calls ``check`` now and then) in a thread once a slot is free."""
        job = _Job(threading.Thread(target=lambda: self._run(job, work), name=f"v2p-fetch-{label}", daemon=True))
        self._jobs[label] = job
        job.thread.start()

    def _run(self, job: _Job, work: Callable[[], Path]) -> None:
        try:
            fd = self.slots.acquire(self.check)
            try:
                self.check()
                job.result = work()
            finally:
                self.slots.release(fd)
        except BaseException as exc:  # handed to the thread that waits for this disk
            job.error = exc
        finally:
            job.done.set()

    def started(self, label: str) -> bool:
        """Whether the download of disk ``label`` was started."""
        return label in self._jobs

    def wait(self, label: str) -> Path:
        """The local copy of disk ``label`` once whole; its download's error if it failed. A signal or a
        cancel while waiting stops every download."""
        job = self._jobs[label]
        try:
            while not job.done.wait(0.2):
                interrupts.check()
        except BaseException:
            self.stop.set()
            raise
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def close(self) -> None:
        """Stop what still runs and give each thread a moment to close its part."""
        self.stop.set()
        for job in self._jobs.values():
            job.thread.join(JOIN_SECONDS)
