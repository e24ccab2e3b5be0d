"""The disk sink of a target whose storages v2p writes itself (``v2p.storage``).

``StorageSink`` takes one disk of one VM through a ``Storage``: a temporary
volume is allocated and written (``qemu-img convert``, or ``dd`` for a plain
raw disk, window by window: a stopped write goes on from its last checkpoint),
compared with the source, then renamed to its final volume id.
Not for: choosing a storage or format (the target does, in ``storage_sink``),
nor recording progress (the caller keeps the record; ``fingerprint`` feeds it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .. import convert
from ..endpoint import DiskEndpoint
from ..errors import NoSpaceError, TargetError
from ..options import OptionError
from ..storage import Storage, Volume
from ..windows import Checkpoint, CopyProgress, SinkCheckpoints, StaleCheckpoint, check_resumable
from .base import ByteProgress, DiskSink, compared


class StorageSink(DiskSink):
    """Disk ``index`` of VM ``vmid`` on ``storage``, as a ``fmt`` volume."""

    def __init__(self, storage: Storage, vmid: int, index: int, fmt: str, *, force: bool = False) -> None:
        self.storage = storage
        self.vmid = vmid
        self.index = index
        self.fmt = fmt
        self.force = force
        self._final = storage.volume(vmid, index, fmt)
        self._partial = storage.volume(vmid, index, fmt, partial=True)
        self.volid = self._final.volid
        self.in_place = self._partial.path == self._final.path

    # -- where the bytes are -------------------------------------------------
    def _located(self, volume: Volume) -> Volume:
        """``volume`` with the path its bytes are at now: a block volume's node comes from
        its activation (an LV may be mapped through a loop device), a file is where it is named.
        A dir storage's temporary file shares the final volid, so only block volumes are looked up."""
        if not volume.is_block:
            return volume
        return Volume(volume.volid, self.storage.path_of(volume.volid), volume.fmt, is_block=True)

    def _committed(self) -> bool:
        """Renamed already: only the final volume is there (a run killed after the rename)."""
        return not self.in_place and not self.storage.exists(self._partial) \
            and self.storage.exists(self._final)

    def _written_volume(self) -> Volume:
        return self._located(self._final if self._committed() else self._partial)

    # -- DiskSink --------------------------------------------------------------
    def check(self, src: DiskEndpoint, *, capacity: int) -> dict[str, Any]:
        self.storage.check(capacity, force=self.force)
        self.storage.check_vm(self.vmid)
        required = self.storage.required_bytes(capacity, convert.measure(src, self.fmt))
        free = self.storage.free_bytes()
        if required > free:
            raise NoSpaceError(f"not enough space on {self.storage.describe()}: the disk needs {required} "
                              f"bytes, {free} are free", hint="free some space or choose another --storage")
        return {"storage": self.storage.describe(), "format": self.fmt, "required_bytes": required,
                "free_bytes": free}

    def exists(self) -> bool:
        return self.storage.exists(self._final)

    def written(self) -> bool:
        return self.storage.exists(self._partial)

    def write(self, src: DiskEndpoint, *, capacity: int, progress: CopyProgress | None = None,
              bwlimit: int | None = None, start: Checkpoint | None = None,
              on_checkpoint: Callable[[Checkpoint], None] | None = None) -> None:
        self._write(start, on_checkpoint, lambda partial, zero, saved: convert.convert(
            src, partial, capacity=capacity, target_is_zero=zero, bwlimit=bwlimit, on_progress=progress,
            start=start, on_checkpoint=saved), capacity=capacity)

    def write_dd(self, src: DiskEndpoint, *, progress: CopyProgress | None = None, start: Checkpoint | None = None,
                 on_checkpoint: Callable[[Checkpoint], None] | None = None) -> None:
        self._write(start, on_checkpoint, lambda partial, zero, saved: convert.copy_dd(
            src, partial, target_is_zero=zero, on_progress=progress, start=start, on_checkpoint=saved),
            capacity=sum(extent.size for extent in src.raw or ()))

    def _write(self, start: Checkpoint | None, on_checkpoint: Callable[[Checkpoint], None] | None,
               copy: Callable[[Volume, bool, Callable[[Checkpoint], None]], object], *, capacity: int) -> None:
        if start is not None:
            if not self.storage.exists(self._partial):
                raise StaleCheckpoint("its temporary volume is gone")
            partial = self._located(self._partial)
            check_resumable(partial, start)
            zero = start.fresh
        else:
            partial = self.storage.allocate(self.vmid, self.index, self.fmt, capacity, force=self.force)
            zero = self.storage.reads_as_zero(partial)
        checkpoints = SinkCheckpoints(self._located(partial), on_checkpoint, resumed=start is not None)
        with checkpoints.writing(lambda: self.storage.remove(partial)):
            copy(partial, zero, checkpoints)

    def verify(self, src: DiskEndpoint, *, capacity: int, progress: ByteProgress | None = None) -> None:
        written = self._written_volume()
        if not self.storage.exists(written):
            raise TargetError(f"{self.storage.describe()}: nothing written for {self.volid} to verify",
                              hint="run the same command again: the disk is written anew")
        convert.compare(src, written, capacity=capacity, on_progress=compared(progress, capacity))

    def commit(self, *, progress: ByteProgress | None = None) -> str:
        if self.in_place or self._committed():
            return self.volid
        if not self.storage.exists(self._partial):
            raise TargetError(f"{self.storage.describe()}: nothing written for {self.volid} to commit",
                              hint="run the same command again: the disk is written anew")
        self.storage.commit(self._located(self._partial), self._final)
        return self.volid

    def remove(self) -> None:
        for volume in (self._partial, self._final):
            if self.storage.exists(volume):  # an LV's removal looks up its mapping first
                self.storage.remove(volume)

    def fingerprint(self) -> dict[str, Any]:
        for volume in (self._final, self._partial):
            if self.storage.exists(volume):
                try:
                    return convert.fingerprint(self._located(volume).path)
                except OSError:
                    return {}
        return {}

    def __repr__(self) -> str:
        return f"StorageSink({self.storage.describe()}, {self.volid}, {self.fmt})"


class Storages(Protocol):
    """A target whose storages are ``v2p.storage`` objects it looks up by name (the local target)."""

    def storage(self, name: str) -> Storage: ...

    def device_storage(self, device: str) -> Storage: ...


def storage_sink(target: Storages, vmid: int, index: int, *, fmt: str | None, storage: str,
                 device: str | None = None, force: bool = False) -> StorageSink:
    """``Target.disk_sink`` for a target whose storages are ``v2p.storage`` objects."""
    where = target.device_storage(device) if device else target.storage(storage)
    chosen = fmt or where.formats()[0]
    if chosen not in where.formats():
        raise OptionError(f"--format {chosen}: {where.describe()} holds {'/'.join(where.formats())} "
                          "volumes only", hint="leave --format out to get the storage's own format")
    return StorageSink(where, vmid, index, chosen, force=force)
