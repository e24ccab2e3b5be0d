"""The endpoint (``v2p.endpoint.DiskEndpoint``) of an inspected local disk: format, filename or ``json:``, pins.

The other half of inspection's promise: qemu-img never sees a descriptor v2p
has not validated. A VMDK is handed over as descriptors v2p writes itself from
the checked extents (``qemu_source``), and every file is pinned (pinned.py) and
named by its ``/dev/fd/N``. It lives in the inspect package: inspection reads a disk's first sectors
through it, and ``convert`` copies through the endpoint it makes.
Not for: writing anything onto a target (``convert``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from stat import S_ISREG

from ..endpoint import DiskEndpoint, RawExtent
from ..errors import SourceError, TargetError
from ..fsutil import private_dir, write_atomic
from ..pinned import PinnedFiles
from ..runner import run
from .model import DiskImage, ExtentKind

INFO_TIMEOUT = 30.0


def image_info(path: Path, fmt: str) -> dict[str, object]:
    """``qemu-img info`` of ``path`` read as ``fmt`` (always explicit)."""
    proc = run(["qemu-img", "info", "--output=json", "-f", fmt, str(path)], timeout=INFO_TIMEOUT)
    info: dict[str, object] = json.loads(proc.stdout)
    return info


def pin(image: DiskImage) -> PinnedFiles:
    """Every file of ``image``, opened and checked to be the one inspection read (see pinned.py)."""
    opens = sum(len(link.extents) + 1 for link in image.chain)  # what qemu-img opens: extents and links
    return PinnedFiles(image.file_ids, follow=image.path if image.named_link else None, reader_opens=opens)


def qemu_source(image: DiskImage, workdir: Path) -> DiskEndpoint:
    """The input qemu-img should read for ``image``, its files pinned; for a VMDK, descriptors v2p writes.

    A snapshot chain becomes one descriptor per link, each naming the next by
    absolute path (``parentFileNameHint``) with matching CIDs, so qemu-img
    reads the consolidated disk and never resolves a path of the source's own.
    """
    pins = pin(image)
    try:
        return _qemu_source(image, workdir, pins)
    except BaseException:
        pins.close()
        raise


def _qemu_source(image: DiskImage, workdir: Path, pins: PinnedFiles) -> DiskEndpoint:
    def made(fmt: str, filename: str) -> DiskEndpoint:
        return DiskEndpoint(fmt, filename, image.capacity, str(image.flavor), pins, raw=_raw_extents(image, pins))

    if not image.is_vmdk:
        return made(image.qemu_format, pins.path(image.path))
    if image.parent is None and [e.path for e in image.extents] == [image.path]:
        # One self-contained sparse file: qemu reads it directly (a VMware
        # streamOptimized footer is only found that way), with any
        # parentFileNameHint in its embedded descriptor switched off.
        spec = {"driver": "vmdk", "file": {"driver": "file", "filename": pins.path(image.path)},
                "backing": None}
        return made("vmdk", "json:" + json.dumps(spec))
    private_dir(workdir)
    chain = image.chain
    target = workdir / "source.vmdk"
    parent_file: Path | None = None
    for depth in range(len(chain) - 1, -1, -1):
        link = chain[depth]
        target = workdir / ("source.vmdk" if depth == 0 else f"source-parent{depth}.vmdk")
        _write_descriptor(link, target, pins, cid=f"{depth + 1:08x}", parent=parent_file,
                          parent_cid=f"{depth + 2:08x}")
        parent_file = target
    return made("vmdk", str(target))


def _raw_extents(image: DiskImage, pins: PinnedFiles) -> tuple[RawExtent, ...] | None:
    """Where a plain raw disk's bytes lie, through its pinned files (None for any other layout)."""
    if not image.is_plain_raw:
        return None
    return tuple(RawExtent(pins.path(e.path) if e.path is not None else None, e.offset * 512, e.size)
                 for e in image.extents)


def _write_descriptor(image: DiskImage, target: Path, pins: PinnedFiles, *, cid: str, parent: Path | None,
                      parent_cid: str) -> None:
    kinds = {e.kind for e in image.extents}
    if ExtentKind.VMFSSPARSE in kinds:
        create_type = "vmfsSparse"
    elif ExtentKind.SESPARSE in kinds:
        create_type = "seSparse"
    elif ExtentKind.SPARSE in kinds:
        create_type = "twoGbMaxExtentSparse"
    else:
        create_type = "twoGbMaxExtentFlat"
    lines = [
        "# Disk DescriptorFile",
        "# written by v2p from the validated extents of " + _quotable(image.path),
        "version=1",
        f"CID={cid}",
        f"parentCID={parent_cid if parent else 'ffffffff'}",
        f'createType="{create_type}"',
    ]
    if parent is not None:
        lines.append(f'parentFileNameHint="{_quotable(parent)}"')
    for extent in image.extents:
        if extent.kind is ExtentKind.ZERO or extent.path is None:
            # qemu silently drops ZERO extent lines (the disk comes out short):
            # describe them as a sparse file of zeros instead.
            zeros = _zero_file(target.parent, extent.size)
            lines.append(f'RW {extent.sectors} FLAT "{_quotable(zeros)}" 0')
        elif extent.kind.is_raw:
            lines.append(f'RW {extent.sectors} FLAT "{pins.path(extent.path)}" {extent.offset}')
        else:
            lines.append(f'RW {extent.sectors} {extent.kind.value} "{pins.path(extent.path)}"')
    write_atomic(target, "\n".join(lines) + "\n")


def _zero_file(folder: Path, size: int) -> Path:
    """A sparse file of at least ``size`` zero bytes (it takes no space)."""
    path = folder / "zeros.raw"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    try:
        if not S_ISREG(os.fstat(fd).st_mode):
            raise TargetError(f"{path} is not a plain file: refused", hint=f"remove {folder}")
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path


def _quotable(path: Path) -> str:
    text = str(path)
    if '"' in text or "\n" in text or "\r" in text:
        raise SourceError(f"{text}: a path with a quote or a line break cannot be described to qemu-img",
                          hint="rename the folder or file")
    return text
