"""What the copier opens for one disk: a ``DiskEndpoint`` (qemu-img's format and filename, and what goes with them).

A source hands the pipeline one endpoint per disk: a local file or a ``json:`` spec over pinned files
today, an HTTPS datastore URL with its session cookie or an NBD export tomorrow. Stages, sinks and
verify pass it on to ``convert`` without asking where the bytes are; only ``convert`` turns it into
qemu-img arguments (``qemu_args``), secrets included, which never reach an argv or a log.
Not for: inspecting a disk (``inspect``), or deciding whether it may be copied (the source's facts).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .pinned import PinnedFiles


@dataclass(frozen=True)
class RawExtent:
    """A run of a plain raw disk's bytes: ``size`` bytes at byte ``offset`` of ``filename``
    (``/dev/fd/N`` of a pinned file), or zeros when ``filename`` is None. What ``dd`` copies."""

    filename: str | None
    offset: int
    size: int


@dataclass(frozen=True)
class DiskEndpoint:
    """A disk as qemu-img opens it: ``fmt`` and a filename (or ``json:`` spec) it may open as that format.

    ``pins`` holds the source files ``filename`` reads through ``/dev/fd/N``: every qemu-img
    run on it gets them (``fds``), and ``close()`` gives them back once the disk is done.
    ``secrets`` (qemu secret id → value) are what the spec names as ``*-secret`` (qemu's curl
    driver's ``cookie-secret``, say): ``qemu_args`` hands them over in files, never on the argv.
    ``raw`` lists the bytes of a plain raw disk where they lie (the ``dd`` copier's input); None
    for any other layout. ``rereadable`` is False when reading the disk again costs what the
    first read did (a download): the pipeline then reads it once into a local stage.
    ``capacity`` and ``flavor`` are the source's facts, when it gave them (a test's plain file need not).
    ``parallel`` caps the requests qemu-img convert keeps in flight (``-m``); None leaves its default
    (QEMU 7.2's curl driver can hang with more than one: an HTTP endpoint sets 1).
    """

    fmt: str
    filename: str
    capacity: int | None = None
    flavor: str = ""
    pins: PinnedFiles | None = field(default=None, compare=False, repr=False)
    secrets: Mapping[str, bytes] = field(default_factory=dict, compare=False, repr=False)
    raw: tuple[RawExtent, ...] | None = None
    rereadable: bool = True
    parallel: int | None = None

    @property
    def fds(self) -> tuple[int, ...]:
        return self.pins.fds if self.pins is not None else ()

    def close(self) -> None:
        if self.pins is not None:
            self.pins.close()


@contextlib.contextmanager
def qemu_args(endpoint: DiskEndpoint) -> Iterator[list[str]]:
    """The ``--object secret,...`` arguments qemu-img needs to open ``endpoint`` (none without secrets).

    Each secret is written to a 0600 file in a private folder that is removed when the block
    ends: the argv (which the runner logs) names the file, never the value.
    """
    if not endpoint.secrets:
        yield []
        return
    with tempfile.TemporaryDirectory(prefix="v2p-secret-") as folder:  # mode 0700
        args = []
        for number, (secret_id, value) in enumerate(sorted(endpoint.secrets.items())):
            path = Path(folder) / f"s{number}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(value)
            args += ["--object", f"secret,id={secret_id},format=raw,file={path}"]
        yield args
