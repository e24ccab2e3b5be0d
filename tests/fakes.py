"""A fake Source and a fake Target: the pipeline, the dance and plan scheduling in-process, in milliseconds.

``FakeTarget`` keeps its VM configs and run states in memory and its volumes in a real dir storage in a
folder of the test's (qemu-img writes, compares and renames real bytes through the real ``StorageSink``);
nothing boots: what a running guest prints, the I/O counters it shows and how a boot check ends are
scripted per VMID (``FakeGuest``). It passes the target contract suite (tests/test_target_contract.py,
kind ``fake``), so what a test proves with it holds for the real kinds' contract.

``FakeSource`` is a VM whose disks are small local raw files: no descriptor, no inspection.

Not for: proving a guest boots (tests/test_boot*.py boot the sample guest), nor PVE's protocol (the
simulator). Every call a test may count is in ``FakeTarget.calls``; a one-shot failure goes in
``FakeTarget.fail`` (method name, or method and first argument as ``"write local:100/vm-100-disk-1.qcow2"``
-> the exception its next such call raises).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from v2p.convert import file_identity
from v2p.endpoint import DiskEndpoint
from v2p.errors import NoSuchVMError, TargetError, VMIDExistsError
from v2p.sources.base import DiskFacts, Source
from v2p.spec import DiskSpec, NicSpec, VMSpec
from v2p.storage import DirStorage, Storage
from v2p.targets.base import (
    BOOT_UP,
    BootReport,
    Capabilities,
    DiskSink,
    GuestIO,
    KeyProgress,
    Target,
    VMConfig,
)
from v2p.targets.sink import StorageSink, storage_sink
from v2p.volumes import Drive, VolumeRef, drive_volume, print_drive
from v2p.windows import Checkpoint

GuestIOScript = Callable[[VMConfig], GuestIO | None]


@dataclass
class FakeGuest:
    """How the guest of one VMID behaves, as a test scripts it.

    ``output``: what it prints on its serial port once started. ``powers_off``: it shuts itself down
    right after it started (as the sample guest does). ``obeys_power_button``: ``stop`` finds it gone
    cleanly (else it is stopped hard). ``io``: its I/O counters, from the config it runs with (None: the
    target cannot count). ``boots``: how each boot check ends, in turn (the last one repeats; none:
    up).
    """

    output: str = ""
    powers_off: bool = False
    obeys_power_button: bool = True
    io: GuestIOScript = lambda _config: None
    boots: list[BootReport] = field(default_factory=list)


def up(signal: str = "scripted: up") -> BootReport:
    return BootReport(BOOT_UP, 0.1, signal=signal)


@dataclass
class Started:
    """One start of a VM (``start`` or ``boot_check``) and the config it ran with."""

    vmid: int
    how: str  # "start" | "boot_check"
    config: VMConfig


class FakeTarget(Target):
    """VMs in memory, volumes in ``folder``'s dir storage ``local``; guests as ``guests`` script them."""

    kind = "fake"
    capabilities = Capabilities(guest_io=True)

    def __init__(self, folder: Path, *, free: dict[str, int] | None = None) -> None:
        self.folder = folder
        self.storages: dict[str, Storage] = {"local": DirStorage("local", {"path": str(folder), "content": "images"})}
        self.free = free or {}  # storage name -> the free bytes its sinks report (else the real file system's)
        self.configs: dict[int, VMConfig] = {}
        self.running: dict[int, bool] = {}  # vmid -> held
        self.guests: dict[int, FakeGuest] = {}
        self.started: list[Started] = []
        self.calls: list[tuple[str, Any]] = []
        self.fail: dict[str, BaseException] = {}

    def _call(self, method: str, *args: Any) -> None:
        self.calls.append((method, args))
        failure = self.fail.pop(method, None) or (self.fail.pop(f"{method} {args[0]}", None) if args else None)
        if failure is not None:
            raise failure

    def count(self, method: str) -> int:
        return sum(1 for name, _args in self.calls if name == method)

    def guest(self, vmid: int) -> FakeGuest:
        return self.guests.setdefault(vmid, FakeGuest())

    # -- what identifies it ----------------------------------------------
    def describe(self) -> dict[str, str]:
        return {"kind": self.kind, "dir": str(self.folder)}

    def state_dir(self) -> Path:
        return self.folder / "migrations"

    # -- VMs and configs -------------------------------------------------
    def vm_exists(self, vmid: int) -> bool:
        return vmid in self.configs

    def list_vms(self) -> list[int]:
        return sorted(self.configs)

    def create_vm(self, vmid: int, config: VMConfig) -> None:
        self._call("create_vm", vmid)
        if vmid in self.configs:
            raise VMIDExistsError(f"VMID {vmid} already exists on the fake target")
        self.configs[vmid] = dict(config)

    def get_config(self, vmid: int) -> VMConfig:
        if vmid not in self.configs:
            raise NoSuchVMError(f"VMID {vmid} does not exist on the fake target")
        return dict(self.configs[vmid])

    def set_config(self, vmid: int, updates: VMConfig, delete: tuple[str, ...] = (), *,
                   progress: KeyProgress | None = None) -> None:
        config = self.get_config(vmid)
        self._call("set_config", vmid, dict(updates), delete)
        for key in delete:
            config.pop(key, None)
        config.update(updates)
        self.configs[vmid] = config

    def destroy_vm(self, vmid: int) -> None:
        self.get_config(vmid)
        self._call("destroy_vm", vmid)
        self.running.pop(vmid, None)
        for place in self.storages.values():
            place.remove_vm(vmid)
        del self.configs[vmid]

    # -- disks ------------------------------------------------------------
    def storage(self, name: str) -> Storage:
        if name not in self.storages:
            raise TargetError(f"no storage called {name!r} on the fake target")
        return self.storages[name]

    def disk_sink(self, vmid: int, index: int, *, fmt: str | None, storage: str, device: str | None = None,
                  force: bool = False) -> DiskSink:
        made = storage_sink(self, vmid, index, fmt=fmt, storage=storage, device=device, force=force)
        return FakeSink(self, storage, made)

    def new_disk(self, vmid: int, config: VMConfig, *, storage: str, size: int) -> str:
        self._call("new_disk", vmid)
        place = self.storage(storage)
        used = {ref.disk_of(vmid) for ref in (VolumeRef.maybe(drive_volume(v)) for v in config.values()) if ref}
        index = next(i for i in range(1, 100) if i not in used
                     and not any(place.exists(place.volume(vmid, i, fmt)) for fmt in place.formats()))
        volume = place.create_empty(vmid, index, size)
        return print_drive(Drive(volume.volid, {"size": f"{size >> 30}G"}))

    def remove_volume(self, vmid: int, volid: str) -> None:
        self._call("remove_volume", vmid, volid)
        if any(drive_volume(value) == volid for value in self.get_config(vmid).values()):
            raise TargetError(f"VM {vmid}: volume {volid} is still in use")
        ref = VolumeRef.parse(volid)
        place, index = self.storage(ref.storage), ref.disk_of(vmid)
        for volume in (place.volume(vmid, index, fmt) for fmt in place.formats()) if index is not None else ():
            if volume.volid == volid and place.exists(volume):
                place.remove(volume)

    def volumes(self) -> list[str]:
        """Every file on the fake's storages (temporary ones included), by name: what a run left."""
        return sorted(name for name in _files(self.folder / "images"))

    # -- running ----------------------------------------------------------
    def status(self, vmid: int) -> str:
        self.get_config(vmid)
        return "running" if vmid in self.running else "stopped"

    def start(self, vmid: int, *, hold: bool = False) -> None:
        self._call("start", vmid)
        if self.status(vmid) == "running":
            raise TargetError(f"VM {vmid} is already running")
        self.started.append(Started(vmid, "start", self.get_config(vmid)))
        if not self.guest(vmid).powers_off:
            self.running[vmid] = hold

    def held(self, vmid: int) -> bool:
        return self.running.get(vmid, False)

    def release(self, vmid: int) -> None:
        if vmid in self.running:
            self.running[vmid] = False

    def stop(self, vmid: int, *, timeout: float = 60.0) -> bool:
        self._call("stop", vmid)
        if self.status(vmid) == "stopped":
            return True
        del self.running[vmid]
        return self.guest(vmid).obeys_power_button

    def guest_io(self, vmid: int) -> GuestIO | None:
        if vmid not in self.running:
            return None
        return self.guest(vmid).io(self.get_config(vmid))

    def guest_output(self, vmid: int) -> str:
        started = any(s.vmid == vmid for s in self.started)
        return self.guest(vmid).output if started else ""

    def boot_check(self, vmid: int, *, timeout: float) -> BootReport:
        self._call("boot_check", vmid)
        self.started.append(Started(vmid, "boot_check", self.get_config(vmid)))
        boots = self.guest(vmid).boots
        report = (boots.pop(0) if len(boots) > 1 else boots[0]) if boots else up()
        if not self.guest(vmid).powers_off:
            self.running[vmid] = True  # a guest still running is left held
        return report


def _files(folder: Path) -> list[str]:
    return [str(Path(root, name).relative_to(folder)) for root, _dirs, names in os.walk(folder) for name in names]


class FakeSink(DiskSink):
    """The real ``StorageSink`` of the fake's dir storage, its calls counted and one-shot failures
    injected (``FakeTarget.fail['write']``, ...); free space as the fake's ``free`` says."""

    def __init__(self, target: FakeTarget, storage: str, real: StorageSink) -> None:
        self.target, self.storage, self.real = target, storage, real
        self.volid, self.fmt, self.in_place = real.volid, real.fmt, real.in_place

    def _call(self, method: str) -> None:
        self.target._call(method, self.volid)

    def check(self, src: DiskEndpoint, *, capacity: int) -> dict[str, Any]:
        self._call("check")
        room = self.real.check(src, capacity=capacity)
        if self.storage in self.target.free:
            room["free_bytes"] = self.target.free[self.storage]
        return room

    def exists(self) -> bool:
        return self.real.exists()

    def written(self) -> bool:
        return self.real.written()

    def write(self, src: DiskEndpoint, *, capacity: int, progress: Callable[[int, int], None] | None = None,
              bwlimit: int | None = None, start: Checkpoint | None = None,
              on_checkpoint: Callable[[Checkpoint], None] | None = None) -> None:
        self._call("write")
        self.real.write(src, capacity=capacity, progress=progress, bwlimit=bwlimit, start=start,
                        on_checkpoint=on_checkpoint)

    def verify(self, src: DiskEndpoint, *, capacity: int, progress: Callable[[int, int], None] | None = None) -> None:
        self._call("verify")
        self.real.verify(src, capacity=capacity, progress=progress)

    def commit(self, *, progress: Callable[[int, int], None] | None = None) -> str:
        self._call("commit")
        return self.real.commit(progress=progress)

    def remove(self) -> None:
        self._call("remove")
        self.real.remove()

    def fingerprint(self) -> dict[str, Any]:
        return self.real.fingerprint()


class FakeSource(Source):
    """A VM called ``name`` whose disks are the raw files ``disks`` (the first boots), on SCSI, with one
    NIC; ``guest_os`` as VMware names it."""

    kind = "fake"

    def __init__(self, disks: list[Path], *, name: str = "fake", guest_os: str = "otherlinux-64") -> None:
        self.disks = disks
        self.name = name
        self.guest_os = guest_os
        self.inputs = 0  # disk_facts/disk_endpoint calls: what a stage asked of the source

    def describe(self) -> str:
        return f"fake:{self.name}"

    def spec(self) -> VMSpec:
        disks = [DiskSpec("scsi", 0, unit, str(path), capacity=path.stat().st_size, controller_model="pvscsi",
                          boot=unit == 0) for unit, path in enumerate(self.disks)]
        return VMSpec(name=self.name, guest_os=self.guest_os, memory_mib=64, disks=disks,
                      nics=[NicSpec("vmxnet3", "00:50:56:00:00:01")])

    def disk_facts(self, disk: DiskSpec, workdir: Path) -> DiskFacts:
        self.inputs += 1
        return DiskFacts(capacity=Path(disk.source).stat().st_size, flavor="raw")

    def disk_endpoint(self, disk: DiskSpec, workdir: Path) -> DiskEndpoint:
        self.inputs += 1
        size = Path(disk.source).stat().st_size
        return DiskEndpoint("raw", disk.source, capacity=size, flavor="raw")

    def fingerprint(self) -> list[dict[str, Any]]:
        return [file_identity(path) for path in self.disks]


def raw_disk(path: Path, size: int = 1 << 20, fill: bytes = b"v2p") -> Path:
    """A small raw disk with some data at its start and end (a real copy must carry both)."""
    with open(path, "wb") as handle:
        handle.truncate(size)
        handle.write(fill)
        handle.seek(size - len(fill))
        handle.write(fill)
    return path
