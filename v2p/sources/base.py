"""The source seam: what the user named, turned into a VM spec and readable disks.

One module per kind (``disk.py`` a loose disk, ``vmx.py``, ``ovf.py`` for
``.ovf`` and ``.ova``; later vSphere). The pipeline holds a ``Source`` and never
asks which kind it is, nor where the bytes live: it gets a ``VMSpec`` and, per
disk, its ``DiskFacts`` (cheap: capacity, flavor, boot layout) and the ``DiskEndpoint``
the copier opens. Sources are read only, never written.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..endpoint import DiskEndpoint
from ..events import Event, EventHandler, ignore
from ..inspect.bootsector import BootLayout
from ..inspect.model import DiskImage
from ..spec import DiskSpec, VMSpec

if TYPE_CHECKING:
    from ..options import MigrationOptions


@dataclass(frozen=True)
class DiskFacts:
    """What a source knows about one disk without copying it: enough for inspect and preflight.

    ``messages`` are notes/warnings of the inspection, as ("note" | "warning", text); ``image`` the
    inspected disk when its bytes are local files v2p checked (its extents and chain, for the
    record), else None; ``boot`` the boot layout of a disk that has no ``image``, None if unread
    (a remote kind need not read a byte to answer).
    """

    capacity: int
    flavor: str
    image: DiskImage | None = None
    messages: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    boot: BootLayout | None = None

    @property
    def boot_firmware(self) -> tuple[str, str] | None:
        """(which firmware can boot the disk, what shows it), as inspection found it; None if unread."""
        if self.image is not None and self.image.boot_firmware is not None:
            return self.image.boot_firmware, self.image.boot_detail
        return (self.boot.firmware, self.boot.detail) if self.boot is not None else None


@dataclass(frozen=True)
class DiskInput(DiskFacts):
    """A local disk, inspected once: its facts and the endpoint qemu-img reads, its files held open
    as they were inspected (``inspect.qemu_input.qemu_source``) until ``close()``."""

    endpoint: DiskEndpoint = field(kw_only=True, compare=False)

    def close(self) -> None:
        """Let go of the source files held open for this disk (see pinned.py): nothing reads it after."""
        self.endpoint.close()


class Source(abc.ABC):
    """A VM to migrate, as one kind of input describes it.

    Its life: ``open`` (a session, a lease: nothing by default) before the pipeline reads a disk,
    ``close`` after, on success, error or Ctrl-C alike (``opened`` does both). While open, it may
    report progress with ``report`` (an ``Event``, say a ``progress`` of step ``fetch``), which goes
    to the handler the pipeline gave ``opened``.
    """

    kind: str = "source"
    _events: EventHandler | None = None

    def report(self, event: Event) -> None:
        """Pass ``event`` to the pipeline's handler (nowhere while not ``opened``)."""
        if self._events is not None:
            self._events(event)

    def open(self) -> None:
        """Start what reading the disks needs (log in, take a lease). Nothing by default."""
        return None

    def close(self) -> None:
        """End what ``open`` started and let go of every disk held open. Must not raise for a source
        that never opened; called once per ``open``."""
        self.release_disks()

    @contextlib.contextmanager
    def opened(self, events: EventHandler = ignore) -> Iterator[Source]:
        """``open`` ... ``close``, reporting to ``events`` in between."""
        self._events = events
        try:
            self.open()
            yield self
        finally:
            try:
                self.close()
            finally:
                self._events = None

    def __enter__(self) -> Source:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abc.abstractmethod
    def describe(self) -> str:
        """What the user named (a path, later a vSphere inventory path): for messages and the state file."""

    @abc.abstractmethod
    def spec(self) -> VMSpec:
        """The VM's hardware and disks, from headers and descriptors only (fast, no disk data read).

        Unsafe or broken input is a ``SourceError`` (one line naming the file and what is wrong).
        """

    @abc.abstractmethod
    def disk_facts(self, disk: DiskSpec, workdir: Path) -> DiskFacts:
        """Capacity, flavor, inspection messages and boot layout of ``disk``, cheaply: no copy starts.
        ``workdir`` is a private folder of this migration where the source may write descriptors or
        stage small files. Unsafe input is a ``SourceError``."""

    @abc.abstractmethod
    def disk_endpoint(self, disk: DiskSpec, workdir: Path) -> DiskEndpoint:
        """What the copier opens for ``disk`` (``workdir`` as for ``disk_facts``); held until
        ``release_disks`` or ``close``."""

    def release_disks(self) -> None:
        """Let go of what ``disk_facts``/``disk_endpoint`` hold (pinned files): the next call looks again."""
        return None

    @abc.abstractmethod
    def fingerprint(self) -> list[dict[str, Any]]:
        """Size, mtime, device and inode of every file the source reads (``convert.file_identity``):
        a resumed run compares it to notice a source that changed or was swapped for another file."""

    def prepare(self, options: MigrationOptions, say: Callable[[str], None]) -> dict[str, Any]:
        """Make the source fit to be read, once the preflight checks passed and before any disk's
        bytes are read (and again on a resumed run before it reads one): a running VM is shut down
        when ``options.shutdown`` asks, else refused (a ``SourceError``). Each step is ``say``-d as
        it happens; what was done comes back for the state file. Nothing by default (a file does
        not run); it never changes anything else on the source."""
        return {}

    def notices(self) -> list[str]:
        """Warnings about the source itself found by ``spec``/``disk_facts`` (an OVA without a
        manifest, a file the manifest does not list, ...), for the user to see. None by default."""
        return []


class LocalSource(Source):
    """A source whose disks are local files: one inspection (``disk_input``) answers both the facts
    and the endpoint, kept until ``release_disks``."""

    _inspected: dict[tuple[str, Path], DiskInput]

    @abc.abstractmethod
    def disk_input(self, disk: DiskSpec, workdir: Path) -> DiskInput:
        """``disk`` inspected and validated, its files held open as they were inspected
        (``inspect.qemu_input.qemu_source``) until ``DiskInput.close()``."""

    def _input(self, disk: DiskSpec, workdir: Path) -> DiskInput:
        if "_inspected" not in vars(self):
            self._inspected = {}
        key = (disk.label, workdir)
        if key not in self._inspected:
            self._inspected[key] = self.disk_input(disk, workdir)
        return self._inspected[key]

    def disk_facts(self, disk: DiskSpec, workdir: Path) -> DiskFacts:
        return self._input(disk, workdir)

    def disk_endpoint(self, disk: DiskSpec, workdir: Path) -> DiskEndpoint:
        return self._input(disk, workdir).endpoint

    def release_disks(self) -> None:
        inspected = vars(self).get("_inspected", {})
        while inspected:
            inspected.popitem()[1].close()
