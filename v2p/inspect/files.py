"""Opening what a source names, safely: a regular file only (never a FIFO, a device or a folder, even one
swapped in after a check), and a file name without a line break (it goes, one line, into VM configs and
qemu-img descriptors).

Not for: what the file holds (``vmdk``, ``vmdk_sparse``).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import BinaryIO

from ..errors import SourceError

# What Python's str.splitlines (and so a VM config reader) takes for a line break.
_LINE_BREAK = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def file_kind(mode: int) -> str | None:
    """What a non-regular file is, in a user's words; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, what in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return what
    return "a special file"


def refuse_line_break(text: str, name: str | None = None, what: str = "") -> None:
    """Refuse a path with a line break: it cannot go, one line each, into a VM
    config or a descriptor qemu-img reads. ``name`` is the file that names it."""
    if _LINE_BREAK.search(text):
        where = f"{name}: {what} " if name else ""
        raise SourceError(f"{where}{text!r}: a file name with a line break cannot go into a VM config "
                          "or a qemu-img descriptor", hint="rename it")


def open_regular(path: Path, name: str) -> BinaryIO:
    """Open ``path`` to read its headers, refusing anything but a regular file.

    The type is taken from the open descriptor, so a FIFO put in the file's
    place after any earlier check is still refused, and O_NONBLOCK keeps that
    open from waiting for a writer that never comes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError(f"{name}: cannot open: {exc.strerror}") from None
    kind = file_kind(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise SourceError(f"{name} is {kind}, not a regular file")
    return os.fdopen(fd, "rb")
