"""Source files held open from inspection until their disk is copied and compared.

A path names whatever is there when it is opened: an extent replaced by a link
to a host file after inspection would be read in its place, by the copy and by
the comparison alike. So each file a disk is made of is opened once, checked to
be the very file inspection read (device, inode, size, mtime), and every reader
(qemu-img, dd, verify) is handed that open file as ``/dev/fd/N``: the child
gets the descriptor under the same number (``pass_fds``) and Linux reopens the
file it refers to, whatever the path holds by then. qemu-img 7.2 reads raw,
qcow2, VMDK descriptors naming ``/dev/fd/N`` extents and ``json:`` file nodes
that way (measured), and ``qemu-img map`` names the data by that path, which
this process can open too.

Not for: files v2p writes itself (its descriptors, the zero file) or the target.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import stat
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceError

_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_HEADROOM = 64  # descriptors kept free beyond the pinned ones (pipes, logs, the target)
_HINT = "leave the source files alone while v2p migrates them, then run the same command again"


@dataclass(frozen=True)
class FileId:
    """Which file a path led to when inspection read it: a later open must find this very file
    (same device and inode, not rewritten since: same size and mtime)."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileId:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def differs(self, other: FileId) -> str | None:
        """How ``other`` is not this file, in a few words; None if it is."""
        if (other.device, other.inode) != (self.device, self.inode):
            return "another file is there now (it was replaced or swapped)"
        if other.size != self.size:
            return f"it is {other.size} bytes now, {self.size} when inspected"
        if other.mtime_ns != self.mtime_ns:
            return "it was written to since"
        return None


class PinnedFiles:
    """Open descriptors of checked source files; ``path(p)`` is what a reader is given for ``p``.

    ``follow`` is the one path that may be a link (the disk the user named, a link when
    inspected); every other file was found by its real path, so a link there now is a swap,
    and one planted while inspection ran is refused too (still a link, or not the file read).
    """

    def __init__(self, ids: Mapping[Path, FileId], *, follow: Path | None = None, reader_opens: int = 0) -> None:
        """``reader_opens``: files a reader opens through these at once (qemu-img: one per extent line)."""
        self._fds: dict[Path, int] = {}
        # A Source dropped without close() (a library caller's) still gives its descriptors back.
        self._closer = weakref.finalize(self, _close_all, self._fds)
        make_room(len(ids), reader_opens)
        try:
            for path, ident in ids.items():
                self._fds[path] = open_checked(path, ident, follow=path == follow)
        except BaseException:
            self.close()
            raise

    def path(self, original: Path) -> str:
        """``/dev/fd/N`` of the pinned ``original``."""
        if not self._closer.alive:
            raise SourceError(f"{original}: read after its migration released it")  # a bug of v2p's
        return f"/dev/fd/{self._fds[original]}"

    @property
    def fds(self) -> tuple[int, ...]:
        """The descriptors to pass to a reader (empty once closed: nothing may read through them)."""
        return tuple(self._fds.values()) if self._closer.alive else ()

    def close(self) -> None:
        self._closer()


def make_room(count: int, reader_opens: int = 0) -> None:
    """Raise this process's soft ``ulimit -n`` (never past the hard one) so ``count`` more files fit,
    and a child handed them that opens ``reader_opens`` (at least ``count``) more: the pins of every
    disk stay open together, and qemu-img inherits the limit with the pinned files on top of the
    ones it opens itself (``inspect.vmdk.check_open_files`` counts both)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = _HEADROOM
    want = max(in_use + count, count + max(count, reader_opens)) + _HEADROOM
    if want > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


def _close_all(fds: dict[Path, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


def open_checked(path: Path, ident: FileId, *, follow: bool) -> int:
    """``path`` opened read-only, checked on the open descriptor to be the file ``ident`` describes."""
    try:
        fd = os.open(path, _FLAGS if follow else _FLAGS | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SourceError(f"{path} was replaced by a symbolic link after inspection: refused",
                              hint=_HINT) from None
        raise SourceError(f"{path}: cannot open it again after inspection: {exc.strerror}",
                          hint=_HINT) from None
    try:
        st = os.fstat(fd)
        why = "it is not a regular file now" if not stat.S_ISREG(st.st_mode) else ident.differs(FileId.of(st))
    except BaseException:
        os.close(fd)
        raise
    if why is not None:
        os.close(fd)
        raise SourceError(f"{path} is not the file inspected: {why}: refused", hint=_HINT)
    return fd
