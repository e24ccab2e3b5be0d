"""Proof that a written disk holds exactly the source's bytes, as fast as the disks allow.

A block device carries no map of what was written, so every one of its
first ``capacity`` bytes has to be read. ``qemu-img map`` says where each
byte of the source lies (data at an offset in one of its files, or zeros);
the device is read once, in large ``O_DIRECT`` reads that bypass the page
cache (so what is compared is what the device holds, not what was left in
memory on the way in), the source's data straight from its files, both one
window ahead in parallel, and each piece is checked with one memcmp: data
against data, the rest against zeros.

Files are left to ``qemu-img compare``: a raw file's holes and a qcow2's
unallocated clusters are known to read as zeros, so it skips them and beats
reading the whole file (measured: 0.3-0.7 s against 1.0-1.6 s for a 2 GiB
disk with 30 % data). So is a source whose data qemu cannot map to plain
file bytes (compressed or encrypted clusters: streamOptimized); a device is
read past the page cache there too.

Not for: deciding what happens to a disk that fails (the verify stage
discards the conversion).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import interrupts
from .errors import ToolError, VerifyError
from .runner import QEMU_IMG_PERCENT, run, run_streaming

WINDOW = 8 << 20  # bytes compared at a time
AHEAD = 3  # windows of each side being read while one is compared (AHEAD + 1 per side in memory)
_ALIGN = 4096  # O_DIRECT: offsets, lengths and buffers aligned to the logical block size (<= 4 KiB)
_ZEROS = bytes(WINDOW)
_DISCARD_HINT = "the conversion is discarded; run migrate again"
_UNMAPPABLE = "external, encrypted or compressed clusters"


def timeout(capacity: int) -> float:
    return 600 + capacity / (50 << 20)


@dataclass(frozen=True)
class Segment:
    """Part of a window: ``length`` bytes at ``start`` (relative to the window), zeros if ``hole``."""

    start: int
    length: int
    hole: bool


class Reader(Protocol):
    def read(self, offset: int, length: int, buf: memoryview) -> list[Segment]:
        """``length`` bytes at ``offset`` into ``buf`` (which may be longer): the segments
        covering ``[0, length)`` in order, holes (zeros) left unwritten."""


@dataclass(frozen=True)
class Mapping:
    """``length`` bytes of the disk at ``start`` are the bytes of file number ``file`` at ``offset``."""

    start: int
    length: int
    file: int
    offset: int


class MappedReader:
    """The source, read from its own files where ``qemu-img map`` puts each piece of data."""

    def __init__(self, mappings: list[Mapping], files: list[str]) -> None:
        self.mappings = mappings
        self._fds: list[int] = []
        for name in files:
            self._fds.append(os.open(name, os.O_RDONLY))
        self._next = 0  # windows are read in order: the first mapping that may still matter

    def read(self, offset: int, length: int, buf: memoryview) -> list[Segment]:
        segments: list[Segment] = []
        at = 0
        index = self._next
        while index < len(self.mappings):
            piece = self.mappings[index]
            begin = max(piece.start, offset)
            end = min(piece.start + piece.length, offset + length)
            if piece.start >= offset + length:
                break
            if end > begin:
                if begin - offset > at:
                    segments.append(Segment(at, begin - offset - at, True))
                at = begin - offset
                n = end - begin
                if os.preadv(self._fds[piece.file], [buf[at:at + n]], piece.offset + begin - piece.start) != n:
                    raise VerifyError(f"the source ends inside its own data (qemu-img map says byte "
                                      f"{piece.offset + begin - piece.start} of file {piece.file})")
                segments.append(Segment(at, n, False))
                at += n
            if piece.start + piece.length <= offset + length:
                index += 1
                self._next = index
            else:
                break
        if at < length:
            segments.append(Segment(at, length - at, True))
        return segments

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)


class RawReader:
    """A raw disk (block device or file) read with ``O_DIRECT`` where the kernel allows it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._direct = hasattr(os, "O_DIRECT")
        if self._direct:
            try:
                self._fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # tmpfs and a few others refuse O_DIRECT
                    raise
                self._direct = False
        if self._fd < 0:
            self._fd = os.open(path, os.O_RDONLY)

    def read(self, offset: int, length: int, buf: memoryview) -> list[Segment]:
        """``buf`` must be page aligned and ``length`` rounded up to 4 KiB must fit in it."""
        done = 0
        while done < length:
            # The last piece is asked for whole blocks: past the end a read is only short.
            want = -(-(length - done) // _ALIGN) * _ALIGN if self._direct else length - done
            try:
                n = os.preadv(self._fd, [buf[done:done + want]], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._direct:
                    raise
                # A device whose blocks are larger than 4 KiB, or an unaligned end: read through the cache.
                os.close(self._fd)
                self._fd = os.open(self.path, os.O_RDONLY)
                self._direct = False
                continue
            if n == 0:
                raise VerifyError(f"{self.path} ends at byte {offset + done}, before the disk does",
                                  hint=_DISCARD_HINT)
            done += n
        return [Segment(0, length, False)]

    def size(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_END)

    def close(self) -> None:
        os.close(self._fd)


def compare(fmt: str, filename: str, target: Path, target_fmt: str, *, capacity: int,
            is_block: bool, window: int = WINDOW, pass_fds: Sequence[int] = (), objects: Sequence[str] = (),
            on_progress: Callable[[int], None] | None = None) -> None:
    """Raise VerifyError unless the first ``capacity`` bytes of ``target`` equal the source
    ``filename`` read as ``fmt``; a file target must also be exactly ``capacity`` bytes
    (a block device may be larger: an LV rounded up to whole extents). ``pass_fds``: the
    pinned source files ``filename`` reads as ``/dev/fd/N`` (see pinned.py); ``objects``: the
    ``--object`` arguments it needs (``endpoint.qemu_args``); ``on_progress`` learns how many bytes
    from the start are compared so far (qemu-img compare's own percent, or each window)."""
    if window % _ALIGN or not 0 < window <= WINDOW:
        raise ValueError(f"window must be a multiple of {_ALIGN} up to {WINDOW}")
    source_size = _virtual_size(fmt, filename, pass_fds, objects)
    if source_size != capacity:
        raise VerifyError(f"the source reads as {source_size} bytes, not the {capacity} inspected",
                          hint=_DISCARD_HINT)
    mapped = _source_map(fmt, filename, capacity, pass_fds, objects) if is_block and target_fmt == "raw" else None
    if mapped is None:
        _qemu_img_compare(fmt, filename, target, target_fmt, capacity=capacity, is_block=is_block,
                          pass_fds=pass_fds, objects=objects, on_progress=on_progress)
        return
    mappings, files = mapped
    with contextlib.ExitStack() as stack:
        try:
            source = MappedReader(mappings, files)
        except OSError as exc:
            raise VerifyError(f"cannot read the source to compare {target}: {exc.filename}: "
                              f"{exc.strerror}") from None
        stack.callback(source.close)
        reader = stack.enter_context(_raw_target(target, capacity, is_block))
        try:
            where = _first_difference(source, reader, capacity, window, on_progress)
        except OSError as exc:
            raise VerifyError(f"could not compare {target} with the source: {exc.strerror or exc}") from None
    if where is not None:
        raise VerifyError(f"{target} differs from the source at byte {where}", hint=_DISCARD_HINT)


def _virtual_size(fmt: str, filename: str, pass_fds: Sequence[int] = (), objects: Sequence[str] = ()) -> int:
    proc = run(["qemu-img", "info", *objects, "--output=json", "-f", fmt, filename], timeout=30, pass_fds=pass_fds)
    return int(json.loads(proc.stdout)["virtual-size"])


def _source_map(fmt: str, filename: str, capacity: int,
                pass_fds: Sequence[int], objects: Sequence[str] = ()) -> tuple[list[Mapping], list[str]] | None:
    """Where the source's data lies (``qemu-img map``'s table: the rest reads as zeros), or
    None when some of it is not plain bytes in a file. A pinned file is named ``/dev/fd/N``,
    which opens the same file here."""
    proc = run(["qemu-img", "map", *objects, "-f", fmt, filename], timeout=timeout(capacity), check=False,
               pass_fds=pass_fds)
    if proc.returncode != 0:
        if _UNMAPPABLE in proc.stderr:
            return None
        detail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no message"
        raise VerifyError(f"qemu-img map could not map the source: {detail}")
    files: dict[str, int] = {}
    mappings: list[Mapping] = []
    end = 0
    for line in proc.stdout.splitlines()[1:]:  # after the header
        # "START LENGTH OFFSET FILE": hex numbers, then the file name (which may hold spaces)
        fields = line.split(None, 3)
        if not fields:
            continue
        try:
            start, length, offset = (int(field, 16) for field in fields[:3])
            name = fields[3]
        except (ValueError, IndexError):
            raise VerifyError(f"qemu-img map printed a line v2p cannot read: {line!r}") from None
        if start < end or length <= 0 or start + length > capacity:
            raise VerifyError(f"qemu-img map printed overlapping or out-of-range data: {line!r}")
        if not os.path.isabs(name):  # a node only qemu can name ("json:{...}"): let qemu read it
            return None
        mappings.append(Mapping(start, length, files.setdefault(name, len(files)), offset))
        end = start + length
    return mappings, list(files)


def _qemu_img_compare(fmt: str, filename: str, target: Path, target_fmt: str, *, capacity: int,
                      is_block: bool, pass_fds: Sequence[int], objects: Sequence[str] = (),
                      on_progress: Callable[[int], None] | None = None) -> None:
    if is_block:
        # Past the page cache (cache.direct): twice as fast on a device, and the device's own bytes.
        spec = {"driver": target_fmt, "size": capacity,
                "file": {"driver": "host_device", "filename": str(target), "cache": {"direct": True}}}
        argv_target = "json:" + json.dumps(spec)
    else:
        argv_target = str(target)
        # Not -s (strict): it also fails on allocation differences, and a sparse
        # qcow2 of a fully allocated flat disk is exactly what we want.
        size = _virtual_size(target_fmt, str(target))
        if size != capacity:
            raise VerifyError(f"{target} is {size} bytes, the source is {capacity}", hint=_DISCARD_HINT)
    # -p: its percent, on stdout with its verdict ("Images are identical." / "Content mismatch at offset N!",
    # exit 0 / 1; exit 2 an error, on stderr). -q would silence the percent too.
    argv = ["qemu-img", "compare", *objects, "-p", "-f", fmt, "-F", target_fmt, filename, argv_target]
    said: list[str] = []

    def chunk(text: str) -> None:
        said.append(text)
        match = QEMU_IMG_PERCENT.search(text)
        if match and on_progress is not None:
            on_progress(int(capacity * float(match.group(1)) / 100))

    try:
        run_streaming(argv, timeout=timeout(capacity), on_chunk=chunk, pass_fds=pass_fds)
    except ToolError as exc:
        if any(text.startswith("Content mismatch") for text in said):
            raise VerifyError(f"{target} differs from the source", hint=_DISCARD_HINT) from None
        detail = exc.message.split("): ", 1)[-1]  # qemu-img's own last line (runner._fail)
        raise VerifyError(f"qemu-img compare could not compare {target}: {detail}") from None


@contextlib.contextmanager
def _raw_target(target: Path, capacity: int, is_block: bool) -> Iterator[RawReader]:
    try:
        reader = RawReader(target)
    except OSError as exc:
        raise VerifyError(f"cannot read {target} to compare it: {exc.strerror}") from None
    try:
        size = reader.size()
        if size < capacity or (size != capacity and not is_block):
            raise VerifyError(f"{target} is {size} bytes, the source is {capacity}", hint=_DISCARD_HINT)
        yield reader
    finally:
        reader.close()


def _window_buffer(size: int) -> mmap.mmap:
    """Page-aligned memory (O_DIRECT needs aligned buffers; a bytearray is not)."""
    return mmap.mmap(-1, size)


def _first_difference(source: Reader, target: Reader, capacity: int, window: int,
                      on_progress: Callable[[int], None] | None = None) -> int | None:
    """Byte offset of the first difference in ``[0, capacity)``, or None.

    ``AHEAD`` windows of each side are being read (in threads; reads release
    the GIL) while the current one is compared, so the slower disk sets the
    pace and a device that serves reads in parallel (most do) is kept busy.
    """
    slots = AHEAD + 1
    source_bufs = [bytearray(window) for _ in range(slots)]
    target_bufs = [_window_buffer(window) for _ in range(slots)]
    with ThreadPoolExecutor(max_workers=2 * AHEAD, thread_name_prefix="v2p-verify") as pool:
        pending: collections.deque[tuple[Future[list[Segment]], Future[list[Segment]]]] = collections.deque()
        next_offset = 0

        def fetch() -> None:
            nonlocal next_offset
            slot = (next_offset // window) % slots
            n = min(window, capacity - next_offset)
            pending.append((pool.submit(source.read, next_offset, n, memoryview(source_bufs[slot])),
                            pool.submit(target.read, next_offset, n, memoryview(target_bufs[slot]))))
            next_offset += n

        while next_offset < capacity and len(pending) < AHEAD:
            fetch()
        offset = 0
        try:
            while pending:
                interrupts.check()  # a cancelled migration stops comparing within a window
                n = min(window, capacity - offset)
                source_read, target_read = pending.popleft()
                source_segments, target_segments = source_read.result(), target_read.result()
                if next_offset < capacity:
                    fetch()  # into the slot compared last round, now free
                slot = (offset // window) % slots
                where = _window_difference(source_bufs[slot], source_segments, target_bufs[slot],
                                           target_segments, n)
                if where is not None:
                    return offset + where
                offset += n
                if on_progress is not None:
                    on_progress(offset)
        finally:
            for futures in pending:  # a failure or a difference: let the reads in flight end
                for future in futures:
                    future.cancel()
                    with contextlib.suppress(Exception):
                        future.result()
        return None


def _window_difference(source: bytearray, source_segments: list[Segment], target: mmap.mmap | bytearray,
                       target_segments: list[Segment], length: int) -> int | None:
    """Offset of the first difference within one window of ``length`` bytes, or None.

    Both segment lists cover ``[0, length)`` in order; the window is walked
    piece by piece where their boundaries fall. ``startswith`` compares with
    one memcmp and no copy (a memoryview ``==`` goes byte by byte).
    """
    sview, tview = memoryview(source), memoryview(target)
    i = j = at = 0
    while at < length:
        s, t = source_segments[i], target_segments[j]
        s_end, t_end = s.start + s.length, t.start + t.length
        end = min(s_end, t_end)
        if s.hole and t.hole:
            same = True
        elif s.hole:
            same = _ZEROS.startswith(tview[at:end])
        elif t.hole:
            same = _ZEROS.startswith(sview[at:end])
        else:
            same = source.startswith(tview[at:end], at)
        if not same:
            return at + _first_unequal(None if s.hole else sview[at:end], None if t.hole else tview[at:end],
                                       end - at)
        at = end
        if at == s_end:
            i += 1
        if at == t_end:
            j += 1
    return None


def _first_unequal(a: memoryview | None, b: memoryview | None, length: int) -> int:
    """Where two pieces known to differ first differ (None: zeros); only run on a failure."""
    step = 4096
    for block in range(0, length, step):
        end = min(block + step, length)
        x = a[block:end].tobytes() if a is not None else bytes(end - block)
        y = b[block:end].tobytes() if b is not None else bytes(end - block)
        if x != y:
            return block + next(k for k in range(len(x)) if x[k] != y[k])
    raise AssertionError("the pieces were equal")
