"""Getting a disk's bytes onto the target: qemu-img convert, measure, compare.

What qemu-img reads is a ``DiskEndpoint`` (endpoint.py). For a local disk, that
is descriptors v2p wrote itself from the checked extents (no blank lines, no
RDONLY lines), so qemu-img's own path handling never comes into play, and every
source file pinned (pinned.py) and named by its ``/dev/fd/N``, so a path swapped
after inspection is not read. An endpoint's secrets reach qemu-img as
``--object secret`` files (``endpoint.qemu_args``), never on its argv.
Not for: deciding where the output goes (that is the target's job).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from stat import S_ISBLK

from . import verify, windows
from .endpoint import DiskEndpoint, RawExtent, qemu_args
from .errors import SourceError
from .inspect.model import DiskImage
from .inspect.qemu_input import INFO_TIMEOUT
from .pinned import FileId
from .runner import run
from .storage import Volume
from .storage.base import block_size
from .windows import Checkpoint, CopyProgress


def measure(source: DiskEndpoint, out_fmt: str) -> int:
    """Bytes the converted image needs on the target (``qemu-img measure``'s 'required')."""
    with qemu_args(source) as objects:
        proc = run(["qemu-img", "measure", *objects, "--output=json", "-f", source.fmt, "-O", out_fmt,
                    str(source.filename)], timeout=INFO_TIMEOUT, pass_fds=source.fds)
    return int(json.loads(proc.stdout)["required"])


def convert(
    source: DiskEndpoint, dest: Volume, *, capacity: int, target_is_zero: bool = False,
    bwlimit: int | None = None, on_progress: CopyProgress | None = None, start: Checkpoint | None = None,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
) -> int:
    """``qemu-img convert`` ``source`` into ``dest``, window by window (``windows.copy``): a file is
    created anew, a block device written in place, and when it is known to read as zeros (a fresh
    thin LV) zero areas are not written at all. ``bwlimit`` is in bytes per second (of bytes written);
    ``start`` goes on from a checkpoint, ``on_checkpoint`` gets one after each window. Returns the
    bytes this run wrote (``moved``)."""
    return windows.copy(source, dest, capacity=capacity, target_is_zero=target_is_zero, bwlimit=bwlimit,
                        on_progress=on_progress, start=start, on_checkpoint=on_checkpoint)


def copy_dd(source: DiskEndpoint, dest: Volume, *, target_is_zero: bool, on_progress: CopyProgress | None = None,
            start: Checkpoint | None = None, on_checkpoint: Callable[[Checkpoint], None] | None = None) -> int:
    """The seed procedure's ``dd``, done right (``windows.copy_dd``): each raw extent at its offset, 4 MiB
    blocks, zero blocks skipped only where the target reads as zeros; checkpoints as ``convert``'s."""
    if source.raw is None:
        raise SourceError(f"{_named(source)} is {source.flavor or source.fmt}: dd copies raw data only",
                          hint="use the default --copy-with qemu-img for sparse disks")
    if not dest.is_block and dest.fmt != "raw":
        raise SourceError("dd writes raw disks only", hint="add --format raw")
    return windows.copy_dd(source, dest, target_is_zero=target_is_zero, on_progress=on_progress, start=start,
                           on_checkpoint=on_checkpoint)


def _named(source: DiskEndpoint) -> str:
    return "the disk" if source.filename.startswith("json:") else Path(source.filename).name


def compare(source: DiskEndpoint, dest: Volume, *, capacity: int,
            on_progress: Callable[[int], None] | None = None) -> None:
    """Raise VerifyError unless ``dest`` holds exactly the bytes of ``source`` (see verify.py).

    A block device may be larger than the disk (an LV rounded up to whole
    extents): only its first ``capacity`` bytes are compared.
    """
    with qemu_args(source) as objects:
        verify.compare(source.fmt, source.filename, dest.path, dest.fmt, capacity=capacity,
                       is_block=dest.is_block, pass_fds=source.fds, objects=objects,
                       on_progress=on_progress)


def stage(source: DiskEndpoint, path: Path, *, capacity: int,
          on_progress: CopyProgress | None = None) -> DiskEndpoint:
    """A local raw copy of ``source`` at ``path``, read once (the source's one read when reading it
    again would cost a second download): written as ``path`` + ``.part`` and renamed when whole, so
    a copy already at ``path`` is taken as it is. The copy is sparse where the disk reads as zeros."""
    if not path.is_file() or path.stat().st_size != capacity:
        partial = path.with_name(path.name + ".part")
        partial.unlink(missing_ok=True)
        try:
            convert(source, Volume("", partial, "raw"), capacity=capacity, on_progress=on_progress)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, path)
    return DiskEndpoint("raw", str(path), capacity, source.flavor, raw=(RawExtent(str(path), 0, capacity),))


def fingerprint(path: Path) -> dict[str, object]:
    """A cheap identity for a big file or device: size, mtime (files) and a hash of its first and last MiB."""
    stat = os.stat(path)
    block = S_ISBLK(stat.st_mode)
    size = block_size(path) if block else stat.st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        if size > 2 << 20:
            handle.seek(size - (1 << 20))
            digest.update(handle.read(1 << 20))
    out: dict[str, object] = {"size": size, "sha256_ends": digest.hexdigest()}
    if not block:
        out["mtime_ns"] = stat.st_mtime_ns
    return out


def source_fingerprint(image: DiskImage) -> list[dict[str, object]]:
    """Every source file as inspection found it (see ``file_identity``)."""
    ids = image.file_ids
    return [{"path": str(path), **vars(ids[path])} for path in image.files]


def same_files(recorded: object, current: list[dict[str, object]]) -> bool:
    """Whether a recorded fingerprint (``sources.base.Source.fingerprint``) still describes the source's files:
    every field it holds is unchanged (one written before device and inode were recorded holds
    path, size and mtime only, and is compared on those)."""
    if not isinstance(recorded, list) or len(recorded) != len(current):
        return False
    return all(isinstance(old, dict) and {"path", "size", "mtime_ns"} <= old.keys()
               and all(new.get(key) == value for key, value in old.items())
               for old, new in zip(recorded, current, strict=True))


def file_identity(path: Path) -> dict[str, object]:
    """``path``'s size, mtime, device and inode: enough to notice a source that changed, or another
    file put at its path (a resumed run that finds one inspects again)."""
    st = os.stat(path)
    return {"path": str(path), **vars(FileId.of(st))}
