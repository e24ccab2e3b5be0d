"""A block device the user names (``--to-device /dev/sdX``), written in place.

Nothing is created or renamed: the device is checked hard before a byte is
written. Mounted (itself or a partition), used by device-mapper/md, or too
small: refused always. Held open by another process, or carrying a partition
table or file-system signature: refused unless ``--force``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import TargetError
from ..runner import run
from .base import Storage, Volume, block_size


class BlockStorage(Storage):
    kind = "block"

    def __init__(self, device: str) -> None:
        super().__init__("device", {"path": device})
        self.device = Path(device)

    def formats(self) -> tuple[str, ...]:
        return ("raw",)

    def volume(self, vmid: int, index: int, fmt: str, *, partial: bool = False) -> Volume:
        return Volume(str(self.device), self.device, "raw", is_block=True)

    def path_of(self, volid: str) -> Path:
        return Path(volid)

    def free_bytes(self) -> int:
        self._check_is_block()
        return block_size(self.device)

    def required_bytes(self, capacity: int, measured: int) -> int:
        return capacity

    def check(self, capacity: int, *, force: bool) -> None:
        """Refuse a device that is not safe to overwrite with a disk of ``capacity`` bytes."""
        rdev = self._check_is_block()
        name = str(self.device)
        size = block_size(self.device)
        if size < capacity:
            raise TargetError(f"{name} is {size} bytes, smaller than the {capacity}-byte disk: refused",
                              hint="use a device at least as large as the source disk")
        devices = _with_partitions(rdev)
        for mount_point in _mount_points(devices):
            raise TargetError(f"{name} is mounted at {mount_point}: refused",
                              hint=f"unmount it first (umount {mount_point})")
        holders = _holders(rdev)
        if holders:
            raise TargetError(f"{name} is in use by {', '.join(holders)} (device-mapper/md): refused")
        if force:
            return
        users = _openers(devices)
        if users:
            raise TargetError(f"{name} is held open by {', '.join(users)}: refused",
                              hint="stop whatever uses it (a running VM?), or pass --force")
        found = signatures(self.device)
        if found:
            raise TargetError(f"{name} carries {', '.join(found)}: refused",
                              hint="it holds data; pass --force to overwrite it anyway")

    def _check_is_block(self) -> int:
        try:
            info = os.stat(self.device)
        except FileNotFoundError:
            raise TargetError(f"{self.device}: no such device") from None
        if not stat.S_ISBLK(info.st_mode):
            raise TargetError(f"{self.device} is not a block device",
                              hint="--to-device takes a block device such as /dev/sdb or /dev/vg/lv")
        return info.st_rdev

    def allocate(self, vmid: int, index: int, fmt: str, capacity: int, *, force: bool = False) -> Volume:
        self.check(capacity, force=True)  # re-checked at write time, signatures are ours by now
        return self.volume(vmid, index, fmt)

    def reads_as_zero(self, volume: Volume) -> bool:
        return False

    def commit(self, partial: Volume, final: Volume) -> None:
        """Written in place: nothing to rename."""

    def exists(self, volume: Volume) -> bool:
        return volume.path.exists()

    def remove(self, volume: Volume) -> None:
        """A user's device is never deleted."""

    def describe(self) -> str:
        return f"block: {self.device}"


def _sys_dir(rdev: int) -> Path:
    return Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")


def _with_partitions(rdev: int) -> set[tuple[int, int]]:
    devices = {(os.major(rdev), os.minor(rdev))}
    folder = _sys_dir(rdev)
    if folder.is_dir():
        for child in folder.iterdir():
            dev = child / "dev"
            if (child / "partition").exists() and dev.exists():
                major, minor = dev.read_text().strip().split(":")
                devices.add((int(major), int(minor)))
    return devices


def _mount_points(devices: set[tuple[int, int]]) -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            major, minor = fields[2].split(":")
            if (int(major), int(minor)) in devices:
                points.append(fields[4])
    with open("/proc/swaps") as handle:
        for line in list(handle)[1:]:
            path = line.split()[0]
            try:
                rdev = os.stat(path).st_rdev
            except OSError:
                continue
            if (os.major(rdev), os.minor(rdev)) in devices:
                points.append(f"swap ({path})")
    return points


def _holders(rdev: int) -> list[str]:
    folder = _sys_dir(rdev) / "holders"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _openers(devices: set[tuple[int, int]]) -> list[str]:
    """Processes other than this one holding any of ``devices`` open (what fuser shows)."""
    users = []
    me = os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                info = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if stat.S_ISBLK(info.st_mode) and (os.major(info.st_rdev), os.minor(info.st_rdev)) in devices:
                try:
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    comm = "?"
                users.append(f"pid {pid} ({comm})")
                break
    return users


def signatures(device: Path) -> list[str]:
    """Partition tables and file-system signatures ``blkid -p`` finds on ``device``."""
    proc = run(["blkid", "-p", "-o", "export", str(device)], timeout=30, check=False)
    if proc.returncode == 2:  # nothing found
        return []
    if proc.returncode != 0:
        raise TargetError(f"blkid could not probe {device}: {proc.stderr.strip()}")
    found = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    out = []
    if "PTTYPE" in found:
        out.append(f"a {found['PTTYPE']} partition table")
    if "TYPE" in found:
        out.append(f"a {found['TYPE']} signature")
    return out
