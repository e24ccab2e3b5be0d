"""Copying one disk window by window, so that a copy stopped midway carries on where it stopped.

A window is ``size`` bytes of the disk at ``offset``. ``qemu-img convert`` reads it through qemu's
``raw`` format driver (``offset``/``size``) over the source's own format node, and writes it the
same way into the destination's format node (``-n``): a window of a VMDK, a qcow2 or a download
goes into the same window of a raw file, a qcow2 or a block device. ``dd`` copies the raw
extents that fall in the window. After each window the destination is flushed and the caller's
``on_checkpoint`` learns how far the copy is (a ``Checkpoint``); handed back as ``start``, the copy
goes on from there. Whether a checkpoint still applies to the source and destination is the
caller's to decide (the convert stage and the sink); the verify after the copy stays the proof.

What a copy really wrote (``moved``) is the copier programs' own count of the bytes they wrote
(``wchar`` of ``/proc/PID/io``): zeros that were skipped or written as a hole or a zeroing request
are not in it, so a 2 GiB disk holding 700 MiB moves about 700 MiB.

Not for: where the destination is (the sinks), or comparing the result (``verify``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import interrupts
from .endpoint import DiskEndpoint, RawExtent, qemu_args
from .errors import Cancelled, NoSpaceError, TargetError, ToolError
from .runner import QEMU_IMG_PERCENT, run, run_streaming
from .storage import Volume

# A disk is copied in at least CHECKPOINTS windows of WINDOW_MIN to WINDOW_MAX bytes: a 4 GiB disk in
# 32 windows of 128 MiB (a kill loses the window in progress and the one whose flush was not yet
# checkpointed; measured in bench/resume_bench.py: 16 windows resumed a kill at 75 % in 0.35 x the
# copy's time, 32 in 0.29 x, at no measurable cost), a 1 TiB disk in 1 GiB windows
# (one qemu-img start, some 20 ms, per window costs nothing next to seconds of copying).
CHECKPOINTS = 32
WINDOW_MIN = 64 << 20
WINDOW_MAX = 1 << 30
ALIGN = 1 << 20  # windows start on whole MiB: whole qcow2 clusters and 4 KiB sectors on either side
# Under --bwlimit, onto a destination that must be sent its zeros, runs of zeros this long are copied
# apart and unthrottled (shorter ones go with the data: one qemu-img start per run).
ZERO_RUN = 16 << 20

# (position: bytes of the disk behind the copy, moved: bytes this run wrote) -> None
CopyProgress = Callable[[int, int], None]

_WCHAR = re.compile(rb"^wchar:\s*(\d+)$", re.MULTILINE)


def window_size(capacity: int) -> int:
    """The window a disk of ``capacity`` bytes is copied in (see ``CHECKPOINTS``)."""
    size = min(WINDOW_MAX, max(WINDOW_MIN, capacity // CHECKPOINTS))
    return -(-size // ALIGN) * ALIGN


@dataclass(frozen=True)
class Checkpoint:
    """How far a windowed copy is: the first ``done`` bytes of the disk are written and flushed (a window
    boundary of a copy in windows of ``window`` bytes). ``fresh``: the destination read as zeros when
    the copy began, so the windows after the one in progress were never written and zeros need not be
    written there. ``dest``: the destination's identity, as the sink that wrote it records it."""

    done: int
    window: int
    fresh: bool
    dest: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"done": self.done, "window": self.window, "fresh": self.fresh, "dest": self.dest}

    @classmethod
    def of(cls, record: object) -> Checkpoint | None:
        """The checkpoint a state file holds, or None for anything else (a damaged record starts over)."""
        if not isinstance(record, dict):
            return None
        done, window, fresh, dest = (record.get(key) for key in ("done", "window", "fresh", "dest"))
        if type(done) is not int or type(window) is not int or not isinstance(fresh, bool) \
                or not isinstance(dest, dict) or done <= 0 or window <= 0 or done % ALIGN:
            return None
        return cls(done, window, fresh, dest)


class Written:
    """Bytes the copier programs of one copy wrote, summed over them (each one's ``wchar``)."""

    def __init__(self) -> None:
        self.ended = 0  # by the programs that have ended
        self._pid: int | None = None
        self._current = 0

    def watch(self, pid: int | None) -> None:
        """``run_streaming``'s ``watch``: a program started (its pid), or ended (None, not reaped yet)."""
        if pid is not None:
            self._pid, self._current = pid, 0
            return
        self.sample()
        self.ended += self._current
        self._pid, self._current = None, 0

    def sample(self) -> int:
        """The bytes written so far (a program's count never goes back)."""
        if self._pid is not None:
            self._current = max(self._current, _wchar(self._pid))
        return self.ended + self._current


def _wchar(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/io", "rb") as handle:
            match = _WCHAR.search(handle.read())
    except OSError:
        return 0
    return int(match.group(1)) if match else 0


class Pacer:
    """Keeps the bytes a copy wrote, over all its windows, at ``rate`` bytes per second or less.

    Within a window qemu-img's own throttle (``-r``) holds the rate; each new qemu-img starts with a
    full allowance, so before a window starts the copy waits until what it wrote is back on the line."""

    def __init__(self, rate: int, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] | None = None) -> None:
        self.rate = rate
        self._clock = clock
        self._sleep = sleep or _sleep
        self._start = clock()

    def delay(self, written: int) -> float:
        """Seconds to wait before writing more, having written ``written`` bytes."""
        return max(0.0, written / self.rate - (self._clock() - self._start))

    def wait(self, written: int) -> None:
        seconds = self.delay(written)
        if seconds > 0:
            self._sleep(seconds)


def _sleep(seconds: float) -> None:
    """Sleep, stopped at once by a signal or a cancel (``interrupts.check`` every half second)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        interrupts.check()
        token = interrupts.current()
        if token is not None:
            token.wait(min(left, 0.5))
        else:
            time.sleep(min(left, 0.5))
    interrupts.check()


def copy(source: DiskEndpoint, dest: Volume, *, capacity: int, target_is_zero: bool = False,
         bwlimit: int | None = None, on_progress: CopyProgress | None = None, start: Checkpoint | None = None,
         on_checkpoint: Callable[[Checkpoint], None] | None = None, window: int | None = None) -> int:
    """``qemu-img convert`` ``source`` into ``dest`` window by window; the bytes this run wrote.

    Without ``start``, a file ``dest`` is created anew (``qemu-img create``, which reads as zeros); a
    block device is written in place, and when it is known to read as zeros (``target_is_zero``: a fresh
    thin LV) the zeros of the disk are not written at all. With ``start`` the copy goes on after
    ``start.done`` into what is there. ``bwlimit`` (bytes per second) limits the bytes written: zeros
    never written do not count; onto a device that must be sent its zeros (one that does not read as
    zeros) long runs of them are sent unthrottled, and short ones count with the data around them.
    """
    size = start.window if start is not None else window or window_size(capacity)
    if start is None:
        if not dest.is_block:
            _writing(dest, lambda: run(["qemu-img", "create", "-q", "-f", dest.fmt, str(dest.path), str(capacity)],
                                       timeout=60))
        fresh = not dest.is_block or target_is_zero
    else:
        fresh = start.fresh

    def one(offset: int, length: int, zero: bool, written: Written, report: CopyProgress) -> None:
        if bwlimit and not zero:
            # Zeros this destination must be sent count against qemu-img's -r: long runs of them go unthrottled.
            for start, size, data in _runs(source, offset, length):
                piece(start, size, zero, bwlimit if data else None, written, report)
        else:
            piece(offset, length, zero, bwlimit, written, report)

    def piece(offset: int, length: int, zero: bool, limit: int | None, written: Written,
              report: CopyProgress) -> None:
        argv = ["qemu-img", "convert", "-p", "-n", "-f", "raw", "-O", "raw"]
        if zero:
            argv.append("--target-is-zero")
        if limit:
            argv += ["-r", str(limit)]
        if source.parallel:
            argv += ["-m", str(source.parallel)]
        argv += [_spec(_window(_source_node(source), offset, length)),
                 _spec(_window(_dest_node(dest), offset, length))]

        def chunk(text: str) -> None:
            match = QEMU_IMG_PERCENT.search(text)
            if match:
                report(offset + int(length * float(match.group(1)) / 100), written.sample())

        with qemu_args(source) as objects:
            _writing(dest, functools.partial(run_streaming, argv[:2] + objects + argv[2:],
                                             timeout=_timeout(length, limit), on_chunk=chunk,
                                             pass_fds=source.fds, watch=written.watch))

    return _windows(one, dest, capacity=capacity, size=size, fresh=fresh, start=start, bwlimit=bwlimit,
                    on_progress=on_progress, on_checkpoint=on_checkpoint)


def copy_dd(source: DiskEndpoint, dest: Volume, *, target_is_zero: bool, on_progress: CopyProgress | None = None,
            start: Checkpoint | None = None, on_checkpoint: Callable[[Checkpoint], None] | None = None,
            window: int | None = None) -> int:
    """The seed procedure's ``dd``, done right, window by window: each raw extent's piece in the window at
    its offset, 4 MiB blocks, zero blocks skipped (``conv=sparse``) only where the target reads as zeros.
    ``source.raw`` must be set (the caller refuses anything else); the bytes this run wrote."""
    assert source.raw is not None
    extents = source.raw
    capacity = sum(extent.size for extent in extents)
    size = start.window if start is not None else window or window_size(capacity)
    if start is None:
        if not dest.is_block:
            dest.path.touch()
            os.truncate(dest.path, capacity)
        fresh = not dest.is_block or target_is_zero
    else:
        fresh = start.fresh

    def one(offset: int, length: int, zero: bool, written: Written, report: CopyProgress) -> None:
        at = 0  # where the extent starts in the disk
        for extent in extents:
            low, high = max(offset, at), min(offset + length, at + extent.size)
            if low < high and not (extent.filename is None and zero):
                _dd(RawExtent(extent.filename, extent.offset + low - at, high - low), low, dest, zero=zero,
                    written=written, progress=report, fds=source.fds)
            at += extent.size

    return _windows(one, dest, capacity=capacity, size=size, fresh=fresh, start=start, bwlimit=None,
                    on_progress=on_progress, on_checkpoint=on_checkpoint)


def _dd(piece: RawExtent, seek: int, dest: Volume, *, zero: bool, written: Written,
        progress: CopyProgress, fds: tuple[int, ...]) -> None:
    # conv=sparse skips all-zero *output* blocks: read 4 MiB at a time but
    # write in 64 KiB pieces, so a little data does not drag 4 MiB of zeros along.
    blocks = ["ibs=4M", "obs=64K", "conv=notrunc,sparse"] if zero else ["bs=4M", "conv=notrunc"]
    argv = ["dd", f"if={piece.filename if piece.filename is not None else '/dev/zero'}", f"of={dest.path}",
            *blocks, "iflag=skip_bytes,count_bytes,fullblock", "oflag=seek_bytes", "status=progress",
            f"skip={piece.offset}", f"seek={seek}", f"count={piece.size}"]

    def chunk(text: str) -> None:
        match = re.match(r"^(\d+) bytes", text)
        if match:
            progress(seek + int(match.group(1)), written.sample())

    _writing(dest, functools.partial(run_streaming, argv, timeout=_timeout(piece.size, None), on_chunk=chunk,
                                     stream="stderr", pass_fds=fds, watch=written.watch))


Window = Callable[[int, int, bool, Written, CopyProgress], None]


def _windows(one: Window, dest: Volume, *, capacity: int, size: int, fresh: bool, start: Checkpoint | None,
             bwlimit: int | None, on_progress: CopyProgress | None,
             on_checkpoint: Callable[[Checkpoint], None] | None) -> int:
    """Run ``one`` on each window from ``start`` on, a checkpoint after each; the bytes written."""
    written = Written()
    pacer = Pacer(bwlimit) if bwlimit else None
    done = start.done if start is not None else 0
    # The window a stopped run was in may hold some of its bytes: there zeros are written too.
    untouched_from = done + size if start is not None else 0
    # A window's flush runs while the next one copies; its checkpoint is recorded once the flush is
    # done (checked on each progress report of the next window, and before a new flush starts).
    flushing: tuple[Future[None], int] | None = None

    def settle(wait: bool) -> None:
        nonlocal flushing
        if flushing is not None and (wait or flushing[0].done()):
            future, at = flushing
            flushing = None
            _writing(dest, future.result)
            if on_checkpoint is not None and at < capacity:
                on_checkpoint(Checkpoint(at, size, fresh))

    def report(position: int, moved: int) -> None:
        settle(False)
        if on_progress is not None:
            on_progress(position, moved)

    report(done, 0)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="v2p-flush") as flusher:
        while done < capacity:
            length = min(size, capacity - done)
            if pacer is not None:
                pacer.wait(written.sample())
            one(done, length, fresh and done >= untouched_from, written, report)
            done += length
            settle(True)
            flushing = (flusher.submit(_fsync, dest.path), done)
            report(done, written.sample())
        settle(True)
    return written.sample()


class StaleCheckpoint(TargetError):
    """A checkpoint that no longer applies to the destination (its message says why): the copy starts over."""


def volume_identity(volume: Volume) -> dict[str, Any]:
    """What tells the volume a checkpoint was written into from one made since at its name: a file's
    device and inode, a block device's device number and size (its bytes change as it is written)."""
    info = os.stat(volume.path)
    if volume.is_block:
        return {"path": str(volume.path), "rdev": info.st_rdev, "size": volume.size}
    return {"path": str(volume.path), "dev": info.st_dev, "ino": info.st_ino, "generation": _generation(volume.path)}


def _generation(path: Path) -> int | None:
    """The inode's generation (``FS_IOC_GETVERSION``): a file made anew may get a freed inode's number, not its
    generation (ext4, xfs, btrfs). None where the file system has none to give."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return int.from_bytes(fcntl.ioctl(fd, 0x80087601, bytes(8)), "little")  # _IOR('v', 1, long)
    except OSError:
        return None
    finally:
        os.close(fd)


def check_resumable(volume: Volume, start: Checkpoint) -> None:
    """Raise ``StaleCheckpoint`` unless ``volume`` is the one ``start`` was written into, and a qcow2 one
    is sound (a copier killed mid-window may leak clusters, which ``qemu-img check`` gives back)."""
    try:
        identity = volume_identity(volume)
    except OSError as exc:
        raise StaleCheckpoint(f"its temporary volume cannot be read ({exc.strerror})") from None
    if identity != start.dest:
        raise StaleCheckpoint("its temporary volume was replaced since")
    if volume.fmt == "qcow2":
        proc = run(["qemu-img", "check", "-q", "-r", "leaks", "-f", "qcow2", str(volume.path)], timeout=600,
                   check=False)
        if proc.returncode not in (0, 3):  # 3: leaked clusters left (harmless)
            raise StaleCheckpoint("its temporary qcow2 volume does not check clean")


class SinkCheckpoints:
    """A sink's side of a resumable write into ``volume``: each checkpoint gets the volume's identity
    before ``on_checkpoint`` sees it, and ``writing`` keeps the volume when the write is interrupted (a
    signal, a cancel) after a checkpoint or on a resume, and removes it (``remove``) on anything else."""

    def __init__(self, volume: Volume, on_checkpoint: Callable[[Checkpoint], None] | None, *, resumed: bool) -> None:
        self.volume, self.on_checkpoint, self.resumed = volume, on_checkpoint, resumed
        self.saved = 0

    def __call__(self, point: Checkpoint) -> None:
        point = replace(point, dest=volume_identity(self.volume))
        if self.on_checkpoint is not None:
            self.on_checkpoint(point)
        self.saved += 1

    @contextlib.contextmanager
    def writing(self, remove: Callable[[], None]) -> Iterator[None]:
        try:
            yield
        except (KeyboardInterrupt, Cancelled):
            if not self.resumed and not self.saved:  # nothing a rerun could go on from
                remove()
            raise
        except BaseException:
            # A half-written volume must never be taken for a finished one (nor keep the space).
            remove()
            raise


def _runs(source: DiskEndpoint, offset: int, length: int) -> list[tuple[int, int, bool]]:
    """The window at ``offset`` as (offset, length, holds data) runs (``qemu-img map`` of the source): runs of
    zeros of at least ``ZERO_RUN`` bytes apart, anything shorter counted with the data around it."""
    with qemu_args(source) as objects:
        proc = run(["qemu-img", "map", *objects, "--output=json", "-f", "raw",
                    _spec(_window(_source_node(source), offset, length))], timeout=600, pass_fds=source.fds)
    runs: list[list[int]] = []  # [start, length, holds data]
    for entry in json.loads(proc.stdout):
        data = int(bool(entry["data"]) and not entry["zero"])
        if runs and runs[-1][2] == data:
            runs[-1][1] += int(entry["length"])
        else:
            runs.append([offset + int(entry["start"]), int(entry["length"]), data])
    merged: list[list[int]] = []
    for run_ in runs:
        data = run_[2] or int(run_[1] < ZERO_RUN)
        if merged and merged[-1][2] == data:
            merged[-1][1] += run_[1]
        else:
            merged.append([run_[0], run_[1], data])
    return [(start, size, bool(data)) for start, size, data in merged] or [(offset, length, True)]


def _source_node(source: DiskEndpoint) -> dict[str, Any]:
    """The source as a qemu block node: its ``json:`` spec, or its format over its file (or URL)."""
    if source.filename.startswith("json:"):
        node: dict[str, Any] = json.loads(source.filename[len("json:"):])
        node.setdefault("driver", source.fmt)
        return node
    return {"driver": source.fmt, "file": {"filename": source.filename}}


def _dest_node(dest: Volume) -> dict[str, Any]:
    protocol = {"filename": str(dest.path)}  # qemu picks the driver, as for a plain name: a device's or a file's
    return protocol if dest.fmt == "raw" else {"driver": dest.fmt, "file": protocol}


def _window(node: dict[str, Any], offset: int, length: int) -> dict[str, Any]:
    return {"driver": "raw", "offset": offset, "size": length, "file": node}


def _spec(node: dict[str, Any]) -> str:
    return "json:" + json.dumps(node, separators=(",", ":"))


def _fsync(path: Path) -> None:
    """Make the written bytes durable before a checkpoint calls them done (qemu-img may leave
    writeback pending, and a device's page cache is only flushed on demand)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise ToolError(f"{path}: flushing the written disk failed: {exc.strerror}") from None
    finally:
        os.close(fd)


def _timeout(length: int, bwlimit: int | None) -> float:
    """A hung copier is stopped, a slow big window is not."""
    floor_rate = min(bwlimit, 20 << 20) if bwlimit else 20 << 20
    return 600 + length / floor_rate * 2


def _writing(dest: Volume, write: Callable[[], object]) -> None:
    """Run ``write``; a full target becomes a TargetError that says how to go on."""
    try:
        write()
    except ToolError as exc:
        if "No space left on device" in exc.message or "ENOSPC" in exc.message:
            raise NoSpaceError(f"{dest.path}: the target storage ran out of space while writing",
                              hint="free some space and run the same command again to resume") from None
        raise
