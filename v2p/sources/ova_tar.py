"""The tar of an ``.ova``, read in place: its members checked, nothing extracted.

``scan_tar`` reads the headers only (tarfile seeks over the data) and refuses
anything but plain relative names of regular files; a member opens as a
read-only view of the archive's bytes (``MemberFile``). Not for: what the
members hold (``ovf.py``).
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SourceError, UnsafeSourceError
from ..inspect import vmdk

# A real OVA holds a handful of members; a tar of millions of empty ones is an attack on memory.
MAX_MEMBERS = 10_000
CHUNK = 1 << 20  # a member's reads are buffered this much


@dataclass(frozen=True)
class Member:
    """A regular file inside the tar: where its bytes lie."""

    name: str
    offset: int
    size: int


class _MemberView(io.RawIOBase):
    """A read-only file of ``size`` bytes starting at ``offset`` in ``fd`` (which it does not own)."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        super().__init__()
        self._fd, self._offset, self._size, self._pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = max(0, min(len(buffer), self._size - self._pos))
        data = os.pread(self._fd, want, self._offset + self._pos) if want else b""
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


class MemberFile(io.BufferedReader):
    """A member view that closes the archive's descriptor with itself."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        super().__init__(_MemberView(fd, offset, size), CHUNK)
        self._owned_fd = fd

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._owned_fd >= 0:
                os.close(self._owned_fd)
                self._owned_fd = -1


def scan_tar(path: Path, name: str) -> dict[str, Member]:
    """Every member of the tar at ``path``, checked: plain relative names, regular files only.

    Reads the headers only (tarfile seeks over the data); nothing is extracted.
    """
    members: dict[str, Member] = {}
    with vmdk.open_regular(path, name) as handle:
        total = os.fstat(handle.fileno()).st_size
        try:
            with tarfile.open(fileobj=handle, mode="r:") as tar:
                while (info := tar.next()) is not None:
                    if len(members) >= MAX_MEMBERS:
                        raise SourceError(f"{name}: more than {MAX_MEMBERS} members; not an OVA: refused")
                    member = _check_member(info, name)
                    if member.name in members:
                        raise UnsafeSourceError(f"{name}: member {member.name!r} appears twice "
                                                "(which one is meant?): refused")
                    if member.offset + member.size > total:
                        raise SourceError(f"{name}: member {member.name!r} runs past the end of the "
                                          "archive (cut short)", hint="copy the .ova again")
                    members[member.name] = member
        except tarfile.TarError as exc:
            raise SourceError(f"{name}: not a readable tar archive ({exc})",
                              hint="an .ova is an uncompressed tar of the .ovf, .mf and disks") from None
    return members


def _check_member(info: tarfile.TarInfo, name: str) -> Member:
    text = info.name
    if "\x00" in text:
        raise UnsafeSourceError(f"{name}: member name {text!r} contains a NUL byte: refused")
    vmdk.refuse_line_break(text, name, "member")
    if text.startswith("/"):
        raise UnsafeSourceError(f"{name}: member {text!r} has an absolute name: refused")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeSourceError(f"{name}: member {text!r} leaves the archive's folder (..): refused")
    kind = None
    if info.issym():
        kind = f"a symbolic link to {info.linkname!r}"
    elif info.islnk():
        kind = f"a hard link to {info.linkname!r}"
    elif info.ischr() or info.isblk():
        kind = "a device"
    elif info.isfifo():
        kind = "a FIFO"
    elif info.isdir():
        kind = "a folder"
    elif info.issparse():
        kind = "a GNU sparse file"
    elif not info.isreg():
        kind = "not a regular file"
    if kind is not None:
        raise UnsafeSourceError(f"{name}: member {text!r} is {kind}; an OVA holds plain files only: refused")
    if not parts:
        raise UnsafeSourceError(f"{name}: a member has the empty name {text!r}: refused")
    return Member("/".join(parts), info.offset_data, info.size)
