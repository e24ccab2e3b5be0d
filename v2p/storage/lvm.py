"""LVM storages: raw logical volumes on a volume group (``lvm``) or thin
volumes in a thin pool (``lvmthin``), named ``vm-<vmid>-disk-<n>`` like PVE.

Every LVM command goes through ``_lvm()`` so a storage's ``lvm-config``
option (for example a device filter that keeps LVM off the raw ``sd*`` paths
of a multipathed shared VG) reaches all of them.

Activation is a plug: normally device-mapper (``/dev/<vg>/<lv>``). The test
suite, on machines without device-mapper, sets ``V2P_TEST_LVM_LOOP_ACTIVATION``
and gets a loop device over the LV's extents on its PV instead: the same
bytes, in the same place on the PV, through a different kernel driver.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import TargetError
from ..runner import run
from ..volumes import VolumeRef, disk_name
from .base import Storage, Volume

TEST_LOOP_ENV = "V2P_TEST_LVM_LOOP_ACTIVATION"
PARTIAL_SUFFIX = "-v2p-partial"


class LvmStorage(Storage):
    kind = "lvm"

    @property
    def vg(self) -> str:
        return self.options["vgname"]

    def formats(self) -> tuple[str, ...]:
        return ("raw",)

    @property
    def loop_activation(self) -> bool:
        return bool(os.environ.get(TEST_LOOP_ENV))

    def _lvm(self, command: str, *args: str, check: bool = True) -> str:
        config = self.options.get("lvm-config", "")
        if self.loop_activation:
            config += " global { activation = 0 }"
        argv = [command]
        if config.strip():
            argv += ["--config", config.strip()]
        proc = run([*argv, *args], timeout=120, check=check)
        return proc.stdout if proc.returncode == 0 else ""

    def vg_info(self) -> dict[str, int]:
        out = self._lvm("vgs", "--noheadings", "--units", "b", "--nosuffix", "--separator", ":",
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
        if self.loop_activation:
            return self._loop_of(name) or Path(f"/dev/{self.vg}/{name}")
        return Path(f"/dev/{self.vg}/{name}")

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
        if self.loop_activation:
            activation = ["--activate", "n", "--zero", "n", "--wipesignatures", "n"]
        else:
            activation = ["--activate", "ly", "--wipesignatures", "y"]
        return [*activation, "--yes", "--name", name, "--extents", str(extents), self.vg]

    def allocate(self, vmid: int, index: int, fmt: str, capacity: int, *, force: bool = False) -> Volume:
        partial = self.volume(vmid, index, fmt, partial=True)
        for stale in (partial, self.volume(vmid, index, fmt)):
            if self.exists(stale):
                self.remove(stale)
        name = VolumeRef.parse(partial.volid).volname
        self._lvm("lvcreate", *self.create_argv(name, capacity))
        return Volume(partial.volid, self._activate(name), "raw", is_block=True)

    def _activate(self, name: str) -> Path:
        if self.loop_activation:
            return self._loop_map(name)
        path = Path(f"/dev/{self.vg}/{name}")
        deadline = time.monotonic() + 10
        while not path.exists():  # udev creates the node
            if time.monotonic() > deadline:
                raise TargetError(f"{path} did not appear after lvcreate",
                                  hint="is device-mapper available (dm_mod loaded)?")
            time.sleep(0.05)
        return path

    def reads_as_zero(self, volume: Volume) -> bool:
        return False  # a thick LV holds whatever the PV held before

    def commit(self, partial: Volume, final: Volume) -> None:
        self._lvm("lvrename", self.vg, VolumeRef.parse(partial.volid).volname, VolumeRef.parse(final.volid).volname)

    def exists(self, volume: Volume) -> bool:
        name = VolumeRef.parse(volume.volid).volname
        out = self._lvm("lvs", "--noheadings", "-o", "lv_name", f"{self.vg}/{name}", check=False)
        return bool(out.strip())

    def remove(self, volume: Volume) -> None:
        name = VolumeRef.parse(volume.volid).volname
        if self.loop_activation:
            loop = self._loop_of(name)
            if loop:
                run(["losetup", "-d", str(loop)], timeout=30)
        self._lvm("lvremove", "--yes", f"{self.vg}/{name}", check=False)

    def remove_vm(self, vmid: int) -> None:
        out = self._lvm("lvs", "--noheadings", "-o", "lv_name", self.vg, check=False)
        for name in out.split():
            if name.startswith(f"vm-{vmid}-disk-"):
                self.remove(Volume(f"{self.name}:{name}", Path("/dev") / self.vg / name, "raw", True))

    def describe(self) -> str:
        return f"{self.kind}: {self.name} (vg {self.vg})"

    # -- loop "activation" for machines without device-mapper (tests) ---------
    def _extent_map(self, name: str) -> tuple[str, int, int]:
        """(PV, byte offset, byte length) of a single-segment LV."""
        out = self._lvm("lvs", "--noheadings", "--units", "b", "--nosuffix", "--separator", "|",
                        "-o", "lv_size,seg_pe_ranges", f"{self.vg}/{name}")
        rows = [row.strip() for row in out.splitlines() if row.strip()]
        if len(rows) != 1:
            raise TargetError(f"{self.vg}/{name} has {len(rows)} segments; loop activation maps one")
        size, ranges = rows[0].split("|")
        pv, _, span = ranges.strip().rpartition(":")
        first = int(span.split("-")[0])
        pe_start = int(self._lvm("pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start",
                                 pv).strip())
        return pv, pe_start + first * self.vg_info()["extent"], int(size)

    def _loop_map(self, name: str) -> Path:
        pv, offset, size = self._extent_map(name)
        out = run(["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size), pv],
                  timeout=30).stdout
        return Path(out.strip())

    def _loop_of(self, name: str) -> Path | None:
        try:
            pv, offset, _size = self._extent_map(name)
        except TargetError:
            return None
        listing = run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE,OFFSET"],
                      timeout=30, check=False).stdout
        for loop in json.loads(listing or '{"loopdevices": []}').get("loopdevices", []):
            if loop.get("back-file") == pv and int(loop.get("offset") or 0) == offset:
                return Path(loop["name"])
        return None


class LvmThinStorage(LvmStorage):
    kind = "lvmthin"

    @property
    def pool(self) -> str:
        return self.options["thinpool"]

    def pool_info(self) -> tuple[int, float]:
        out = self._lvm("lvs", "--noheadings", "--units", "b", "--nosuffix", "--separator", ":",
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
