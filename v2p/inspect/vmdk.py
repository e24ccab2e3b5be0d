"""VMDK text descriptors, parsed by v2p itself, and the extents they name checked.

qemu-img's own parser follows any extent path and trusts any capacity, so v2p
reads the header and descriptor here, checks them, and only then lets qemu-img
near the data. This module parses descriptors; ``validate_extents`` checks what a
parsed descriptor points at (each binary extent through ``vmdk_sparse``). Nothing
here writes. The names of ``files`` and ``vmdk_sparse`` that sources use are
offered here too.
"""

from __future__ import annotations

import os
import re
import resource
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SourceError, UnsafeSourceError
from .files import file_kind, open_regular, refuse_line_break
from .model import SECTOR, Extent, ExtentKind
from .vmdk_sparse import (
    COWD,
    KDMV,
    MAX_CAPACITY,
    SESPARSE_MAGIC,
    SparseHeader,
    check_cowd_extent,
    check_sesparse_extent,
    check_sparse_extent,
    check_sparse_stream,
    parse_sparse_header,
)

__all__ = ["COWD", "KDMV", "MAX_CAPACITY", "MAX_DESCRIPTOR", "MAX_EXTENTS", "QEMU_DESCRIPTOR_MAX", "QEMU_PATH_MAX",
           "SESPARSE_MAGIC", "Descriptor", "SparseHeader", "check_cowd_extent", "check_open_files",
           "check_sesparse_extent", "check_sparse_extent", "check_sparse_stream", "file_kind", "looks_like_descriptor",
           "open_regular", "parse_descriptor", "parse_sparse_header", "refuse_line_break", "resolve_inside",
           "stat_named", "validate_extents"]

# Descriptors are a few hundred bytes; twoGbMaxExtent ones grow by a line per
# 2 GiB. Anything far larger is not a descriptor and is not read whole.
MAX_DESCRIPTOR = 1 << 20

# qemu's vmdk driver opens every extent line of every link of a chain at once,
# one file descriptor each, and its open time grows with the square of their
# number (qemu-img 7.2 here: 1,000 one-sector extents open in about 1 s, 2,000
# in 2-3 s, 4,096 in 8-20 s, 6,000 in 26 s, close to the 30 s ``qemu-img info``
# gets). 2,048 keeps every qemu-img call within seconds and still takes a
# 4 TiB twoGbMaxExtent disk (VMware's extents are 2047 MiB: 2,049 of them make
# 4 TiB, so 4 TiB minus 2 GiB).
MAX_EXTENTS = 2048
# Descriptors qemu opens besides the extents (one per chain link), and the
# output, the other end of the chain and stdio: kept free below ``ulimit -n``.
FD_HEADROOM = 32
# qemu reads at most 1 MiB - 1 bytes of a descriptor and silently drops the rest.
QEMU_DESCRIPTOR_MAX = (1 << 20) - 1
# qemu scans an extent's file name with sscanf("%511[^\n\r\"]"): a longer path is
# cut, and the cut path is opened.
QEMU_PATH_MAX = 511


@dataclass
class Descriptor:
    """A parsed text descriptor: its keys, its extent lines as written, and the ddb."""

    fields: dict[str, str] = field(default_factory=dict)
    ddb: dict[str, str] = field(default_factory=dict)
    extents: list[tuple[str, int, str, str | None, int | None]] = field(default_factory=list)

    @property
    def create_type(self) -> str | None:
        return self.fields.get("createtype")

    @property
    def adapter_type(self) -> str | None:
        return self.ddb.get("ddb.adaptertype")

    @property
    def cid(self) -> str | None:
        value = self.fields.get("cid")
        return value.lower() if value else None

    @property
    def parent_cid(self) -> str | None:
        """The parent's CID, or None for a disk with no parent (ffffffff)."""
        value = (self.fields.get("parentcid") or NO_PARENT).lower()
        return None if value == NO_PARENT else value

    @property
    def parent_hint(self) -> str | None:
        return self.fields.get("parentfilenamehint")


_EXTENT = re.compile(
    r"^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)"
    r"(?:\s+\"([^\"]*)\"(?:\s+(\d+))?)?\s*$"
)
_KEYVAL = re.compile(r"^([A-Za-z0-9_.]+)\s*=\s*(.*?)\s*$")

DESCRIPTOR_HEAD = b"# Disk DescriptorFile"
NO_PARENT = "ffffffff"


def looks_like_descriptor(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf")
    return text.startswith(DESCRIPTOR_HEAD) or (
        b"createType" in text[:4096] and b"\x00" not in text[:text.find(b"createType")]
    )


def parse_descriptor(data: bytes, name: str) -> Descriptor:
    """Parse descriptor text (NUL padding, CRLF and odd quoting allowed)."""
    data = data.split(b"\x00", 1)[0]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{name}: descriptor is not text (bad byte at offset {exc.start})") from None
    desc = Descriptor()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _EXTENT.match(line)
        if match:
            access, sectors, kind, fname, offset = match.groups()
            desc.extents.append((access, int(sectors), kind, fname,
                                 int(offset) if offset is not None else None))
            continue
        match = _KEYVAL.match(line)
        if match:
            key, value = match.groups()
            value = _unquote(value)
            if key.lower().startswith("ddb."):
                desc.ddb[key.lower()] = value
            else:
                desc.fields[key.lower()] = value
            continue
        if re.match(r"^(RW|RDONLY|NOACCESS)\b", line):
            raise SourceError(f"{name}: line {number}: malformed extent line: {line[:80]!r}")
        raise SourceError(f"{name}: line {number}: not a descriptor line: {line[:80]!r}")
    if desc.create_type is None:
        raise SourceError(f"{name}: descriptor has no createType")
    return desc


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def resolve_inside(folder: Path, fname: str, name: str, what: str = "extent", *,
                   real_folder: Path | None = None) -> Path:
    """The path of the ``what`` file ``fname`` named in ``name``; refuse anything leaving ``folder``
    (``real_folder``, its real path, if the caller has it already)."""
    if not fname:
        raise UnsafeSourceError(f"{name}: {what} line names an empty file")
    if "\x00" in fname:
        raise UnsafeSourceError(f"{name}: {what} path contains a NUL byte: refused")
    refuse_line_break(fname, name, what)
    if fname.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", fname):
        raise UnsafeSourceError(f"{name}: {what} path {fname!r} is absolute: refused",
                                hint=f"the {what} must sit beside the descriptor, named relatively")
    parts = re.split(r"[\\/]", fname)
    if ".." in parts:
        raise UnsafeSourceError(f"{name}: {what} path {fname!r} leaves the image folder: refused")
    if real_folder is None:
        real_folder = Path(os.path.realpath(folder))
    real = _plain_entry(real_folder, parts)
    if real is None:
        real = Path(os.path.realpath(folder.joinpath(*parts)))
        if real != real_folder and real_folder not in real.parents:
            raise UnsafeSourceError(
                f"{name}: {what} {fname!r} is a link leading out of the image folder (to {real}): refused")
    refuse_line_break(str(real), name, f"{what} {fname!r} is")
    return real


def _plain_entry(real_folder: Path, parts: list[str]) -> Path | None:
    """``real_folder/name`` when ``parts`` is one plain name that is not a link
    there: its real path without the lstat of every folder above it that
    realpath does (thousands of extents make that add up)."""
    if len(parts) != 1 or parts[0] in ("", ".", ".."):
        return None
    entry = real_folder / parts[0]
    try:
        if stat.S_ISLNK(os.lstat(entry).st_mode):
            return None
    except OSError:
        return None
    return entry


def stat_named(path: Path, name: str, what: str, fname: str, *, missing_hint: str) -> os.stat_result:
    """Stat the ``what`` file ``fname`` (at ``path``) that ``name`` names: present, and a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SourceError(f"{name}: {what} {fname!r} is missing", hint=missing_hint) from None
    except OSError as exc:
        raise SourceError(f"{name}: {what} {fname!r} cannot be read: {exc.strerror}") from None
    kind = file_kind(st.st_mode)
    if kind is not None:
        raise SourceError(f"{name}: {what} {fname!r} is {kind}, not a regular file")
    return st


def check_open_files(extents: int, links: int, name: str) -> None:
    """Refuse a chain of ``links`` descriptors and ``extents`` extent lines in all
    that qemu-img could not open at once in reasonable time.

    qemu-img opens a file per extent line and per link, and inherits the pinned source
    files v2p hands it (at most one per extent or link, see pinned.py): all of them must fit under
    the hard ``ulimit -n``, as far as which v2p raises its own (inherited) soft limit."""
    if extents > MAX_EXTENTS:
        raise SourceError(
            f"{name}: the disk has {extents} extents (snapshot chain included); v2p takes at most "
            f"{MAX_EXTENTS}, as qemu-img opens every one at once and slows down with the square of "
            "their number", hint="convert it to a single file in VMware first: "
                                 "vmware-vdiskmanager -r DISK.vmdk -t 0 ONE.vmdk")
    opened = 2 * (extents + links)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if limit != resource.RLIM_INFINITY and opened + FD_HEADROOM > limit:
        raise SourceError(f"{name}: qemu-img would hold {opened} files open at once for this disk, "
                          f"more than this process may open (ulimit -n is {limit})",
                          hint=f"raise the limit (ulimit -n {max(4096, 2 * opened)}) and run again")


def validate_extents(desc: Descriptor, descriptor_path: Path, *, extents_above: int = 0,
                     links_above: int = 0, seen: dict[Path, os.stat_result] | None = None) -> tuple[Extent, ...]:
    """Turn the descriptor's extent lines into checked ``Extent``s.

    ``extents_above`` and ``links_above`` count the extent lines and links
    above this one in a snapshot chain: qemu-img opens the whole chain at once,
    so the whole chain is held to ``MAX_EXTENTS``, checked before any extent is
    looked at so an absurd descriptor is refused at once. Each file is
    resolved and stat'ed once, however often it is named.

    RDONLY extents are read like RW ones (v2p only reads); qemu-img aborts on
    them, which is one more reason it only ever sees v2p's own descriptor.
    ``seen`` (when given) gets each extent file's stat, as checked.
    """
    name = descriptor_path.name
    folder = descriptor_path.parent
    if not desc.extents:
        raise SourceError(f"{name}: descriptor lists no extents")
    check_open_files(extents_above + len(desc.extents), links_above + 1, name)
    real_folder = Path(os.path.realpath(folder))
    real_descriptor = Path(os.path.realpath(descriptor_path))
    files: dict[str, tuple[Path, os.stat_result]] = {}
    extents: list[Extent] = []
    seen_sparse: set[Path] = set()
    # What v2p's own descriptor for qemu-img will take: its header (naming this
    # descriptor and a parent of v2p's, at most PATH_MAX), then a line per
    # extent with its absolute path (a ZERO extent reads a file of v2p's).
    described = 512 + len(os.fsencode(real_descriptor)) + 4096
    for access, sectors, kind_name, fname, offset in desc.extents:
        if access == "NOACCESS":
            raise UnsafeSourceError(
                f"{name}: extent {fname!r} is NOACCESS: its data may not be read, so the disk "
                "cannot be copied whole: refused")
        try:
            kind = ExtentKind(kind_name)
        except ValueError:
            raise SourceError(f"{name}: unknown extent type {kind_name}") from None
        if sectors == 0:
            raise SourceError(f"{name}: extent {fname!r} has zero sectors")
        if sectors * SECTOR > MAX_CAPACITY:
            raise SourceError(f"{name}: extent {fname!r} claims {sectors} sectors, "
                              "more than any VMware disk can have")
        if kind is ExtentKind.ZERO:
            described += len(f'RW {sectors} FLAT "" 0\n') + QEMU_PATH_MAX
            extents.append(Extent(sectors, kind, None))
            continue
        if fname is None:
            raise SourceError(f"{name}: {kind_name} extent line names no file")
        if fname not in files:
            path = resolve_inside(folder, fname, name, real_folder=real_folder)
            _check_qemu_path(path, name, fname)
            files[fname] = path, stat_named(path, name, "extent file", fname,
                                            missing_hint="copy every file of the VM folder, not just the .vmdk")
        path, st = files[fname]
        if seen is not None:
            seen[path] = st
        described += len(f'RW {sectors} {kind_name} "" {offset or 0}\n'.encode()) + len(os.fsencode(path))
        if path == real_descriptor and kind.is_raw:
            raise UnsafeSourceError(f"{name}: flat extent points back at its own descriptor: refused")
        start = offset or 0
        if kind.is_raw:
            need = (start + sectors) * SECTOR
            if st.st_size < need:
                raise SourceError(
                    f"{name}: extent {fname!r} holds {st.st_size} bytes, the descriptor says "
                    f"{need} (size mismatch)", hint="the flat file is truncated or belongs to another disk")
        else:
            if offset:
                raise SourceError(f"{name}: sparse extent {fname!r} cannot have an offset")
            if path in seen_sparse:
                raise SourceError(f"{name}: sparse extent {fname!r} is listed twice")
            seen_sparse.add(path)
            held = _SPARSE_CHECKS[kind](path, fname)
            if held != sectors:
                raise SourceError(f"{name}: extent {fname!r} holds {held} sectors, the descriptor "
                                  f"says {sectors} (capacity mismatch)")
        extents.append(Extent(sectors, kind, path, start))
    total = sum(e.sectors for e in extents) * SECTOR
    if total > MAX_CAPACITY:
        raise SourceError(f"{name}: extents add up to {total} bytes, more than any VMware disk can have")
    if described > QEMU_DESCRIPTOR_MAX:
        raise SourceError(f"{name}: the descriptor v2p writes for qemu-img would take about {described} "
                          f"bytes with these {len(extents)} extents' full paths; qemu-img reads at most "
                          f"{QEMU_DESCRIPTOR_MAX} and drops the rest",
                          hint="move the VM folder to a shorter path, or consolidate the disk in VMware")
    return tuple(extents)


def _check_qemu_path(path: Path, name: str, fname: str) -> None:
    """The absolute path must fit, as it is, in an extent line qemu-img parses."""
    raw = os.fsencode(path)
    if b'"' in raw:
        raise SourceError(f"{name}: extent {fname!r} is {str(path)!r}: a path with a double quote cannot "
                          "go into a qemu-img descriptor", hint="rename the file or folder")
    if len(raw) > QEMU_PATH_MAX:
        raise SourceError(f"{name}: extent {fname!r} has a {len(raw)}-byte path ({path}); qemu-img "
                          f"reads at most {QEMU_PATH_MAX} bytes of an extent's path",
                          hint="move the VM folder to a shorter path")


_SPARSE_CHECKS = {
    ExtentKind.SPARSE: lambda path, name: check_sparse_extent(path, name).capacity,
    ExtentKind.VMFSSPARSE: check_cowd_extent,
    ExtentKind.SESPARSE: check_sesparse_extent,
}

