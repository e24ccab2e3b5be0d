"""LVM storages: raw logical volumes on a volume group (``lvm``) or thin
volumes in a thin pool (``lvmthin``), named ``vm-<vmid>-disk-<n>`` like PVE.

Every LVM command goes through ``lvm()`` so a storage's ``lvm-config``
option (for example a device filter that keeps LVM off the raw ``sd*`` paths
of a multipathed shared VG) reaches all of them.

How an LV becomes a block device is one plug, ``LvmStorage.activation``; v2p
itself has one kind, ``Activation`` (device-mapper: ``/dev/<vg>/<lv>``). The
test suite, on machines without device-mapper, plugs in its own from test code
(``tests/lvm_loop``): no setting of v2p's changes how LVM is activated.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

from ..errors import TargetError
from ..runner import run
from ..volumes import VolumeRef, disk_name
from .base import Storage, Volume

PARTIAL_SUFFIX = "-v2p-partial"


class Activation:
    """How a new LV becomes the block device v2p writes: device-mapper, as LVM does by itself (``lvcreate
    --activate ly``, udev makes ``/dev/<vg>/<lv>``); ``lvremove`` deactivates it."""

    lvm_config = ""  # added to every LVM command's --config
    create_args: tuple[str, ...] = ("--activate", "ly", "--wipesignatures", "y")  # for lvcreate of a raw LV

    def device(self, storage: LvmStorage, name: str) -> Path:
        """The block device of LV ``name``, active or not."""
        return Path(f"/dev/{storage.vg}/{name}")

    def activate(self, storage: LvmStorage, name: str) -> Path:
        """The block device of LV ``name`` just created, once it is there."""
        path = self.device(storage, name)
        deadline = time.monotonic() + 10
        while not path.exists():  # udev creates the node
            if time.monotonic() > deadline:
                raise TargetError(f"{path} did not appear after lvcreate",
                                  hint="is device-mapper available (dm_mod loaded)?")
            time.sleep(0.05)
        return path

    def deactivate(self, storage: LvmStorage, name: str) -> None:
        """Before ``lvremove``: nothing to do, it deactivates the LV itself."""


class LvmStorage(Storage):
    kind = "lvm"
    activation: ClassVar[Activation] = Activation()

    @property
    def vg(self) -> str:
        return self.options["vgname"]

    def formats(self) -> tuple[str, ...]:
        return ("raw",)

    def lvm(self, command: str, *args: str, check: bool = True) -> str:
        """An LVM command's stdout ("" when it failed and ``check`` is false), with the storage's
        ``lvm-config`` and the activation's."""
        config = self.options.get("lvm-config", "") + self.activation.lvm_config
        argv = [command]
        if config.strip():
            argv += ["--config", config.strip()]
        proc = run([*argv, *args], timeout=120, check=check)
        return proc.stdout if proc.returncode == 0 else ""

    def vg_info(self) -> dict[str, int]:
        out = self.lvm("vgs", "--noheadings", "--units", "b", "--nosuffix", "--separator", ":",
                        "-o", "vg_size,vg_free,vg_extent_size", self.vg, check=False)
        if not out.strip():
            raise TargetError(f"storage {self.name}: volume group {self.vg!r} not found",
                              hint="check `vgs` and the storage's vgname")
        size, free, extent = (int(v) for v in out.strip().split(":"))
        return {"size": size, "free": free, "extent": extent}

    def lv_name(self, vmid: int, index: int, *, partial: bool = False) -> str:
        return disk_name(vmid, index) + (PARTIAL_SUFFIX if partial else "")

    def volume(self, vmid: int, index: int, fmt: str, *, partial: bool = False) -> Volume:
        name = self.lv_name(vmid, index, partial=partial)
        return Volume(f"{self.name}:{name}", Path(f"/dev/{self.vg}/{name}"), "raw", is_block=True)

    def path_of(self, volid: str) -> Path:
        ref = VolumeRef.maybe(volid)
        name = ref.volname if ref else ""
        if ref is None or ref.storage != self.name or not name.startswith("vm-"):
            raise TargetError(f"volume {volid!r} is not a volume of storage {self.name}")
        return self.activation.device(self, name)

    def free_bytes(self) -> int:
        return self.vg_info()["free"]

    def required_bytes(self, capacity: int, measured: int) -> int:
        extent = self.vg_info()["extent"]
        return -(-capacity // extent) * extent

    def check(self, capacity: int, *, force: bool) -> None:
        self.vg_info()

    def create_argv(self, name: str, capacity: int) -> list[str]:
        """The lvcreate arguments for a raw LV of at least ``capacity`` bytes (whole extents)."""
        extents = -(-capacity // self.vg_info()["extent"])
        return [*self.activation.create_args, "--yes", "--name", name, "--extents", str(extents), self.vg]

    def allocate(self, vmid: int, index: int, fmt: str, capacity: int, *, force: bool = False) -> Volume:
        partial = self.volume(vmid, index, fmt, partial=True)
        for stale in (partial, self.volume(vmid, index, fmt)):
            if self.exists(stale):
                self.remove(stale)
        name = VolumeRef.parse(partial.volid).volname
        self.lvm("lvcreate", *self.create_argv(name, capacity))
        return Volume(partial.volid, self.activation.activate(self, name), "raw", is_block=True)

    def reads_as_zero(self, volume: Volume) -> bool:
        return False  # a thick LV holds whatever the PV held before

    def commit(self, partial: Volume, final: Volume) -> None:
        self.lvm("lvrename", self.vg, VolumeRef.parse(partial.volid).volname, VolumeRef.parse(final.volid).volname)

    def exists(self, volume: Volume) -> bool:
        name = VolumeRef.parse(volume.volid).volname
        out = self.lvm("lvs", "--noheadings", "-o", "lv_name", f"{self.vg}/{name}", check=False)
        return bool(out.strip())

    def remove(self, volume: Volume) -> None:
        name = VolumeRef.parse(volume.volid).volname
        self.activation.deactivate(self, name)
        self.lvm("lvremove", "--yes", f"{self.vg}/{name}", check=False)

    def remove_vm(self, vmid: int) -> None:
        out = self.lvm("lvs", "--noheadings", "-o", "lv_name", self.vg, check=False)
        for name in out.split():
            if name.startswith(f"vm-{vmid}-disk-"):
                self.remove(Volume(f"{self.name}:{name}", Path("/dev") / self.vg / name, "raw", True))

    def describe(self) -> str:
        return f"{self.kind}: {self.name} (vg {self.vg})"


class LvmThinStorage(LvmStorage):
    kind = "lvmthin"

    @property
    def pool(self) -> str:
        return self.options["thinpool"]

    def pool_info(self) -> tuple[int, float]:
        out = self.lvm("lvs", "--noheadings", "--units", "b", "--nosuffix", "--separator", ":",
                        "-o", "lv_size,data_percent", f"{self.vg}/{self.pool}", check=False)
        if not out.strip():
            raise TargetError(f"storage {self.name}: thin pool {self.vg}/{self.pool} not found",
                              hint="check `lvs` and the storage's thinpool")
        size, percent = out.strip().split(":")
        return int(size), float(percent or 0)

    def free_bytes(self) -> int:
        size, percent = self.pool_info()
        return int(size * (1 - percent / 100))

    def required_bytes(self, capacity: int, measured: int) -> int:
        return measured  # thin: only allocated data takes pool space

    def check(self, capacity: int, *, force: bool) -> None:
        self.pool_info()

    def create_argv(self, name: str, capacity: int) -> list[str]:
        extent = self.vg_info()["extent"]
        size = -(-capacity // extent) * extent
        return ["--activate", "ly", "--yes", "--name", name, "--virtualsize", f"{size}b",
                "--thinpool", f"{self.vg}/{self.pool}"]

    def reads_as_zero(self, volume: Volume) -> bool:
        return True  # unprovisioned thin blocks read as zeros: never write them

    def describe(self) -> str:
        return f"{self.kind}: {self.name} (pool {self.vg}/{self.pool})"
