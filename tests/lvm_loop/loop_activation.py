"""LVM activation without device-mapper, for the test suite: this machine's kernel has no dm, so LVM
keeps only its metadata (``activation = 0``) and a new LV is "activated" as a loop device over its
extents on its PV: the same bytes, in the same place on the PV, through another kernel driver.

Test code only. A test plugs it into ``LvmStorage.activation`` in its own process (``install()``,
or ``monkeypatch.setattr``); a ``python -m v2p`` the test starts gets it through ``sitecustomize.py``
in this folder, put on the child's ``PYTHONPATH`` (``blockdev.LVM_ENV``).
"""

from __future__ import annotations

import json
from pathlib import Path

from v2p.errors import TargetError
from v2p.runner import run
from v2p.storage.lvm import Activation, LvmStorage


class LoopActivation(Activation):
    lvm_config = " global { activation = 0 }"
    create_args = ("--activate", "n", "--zero", "n", "--wipesignatures", "n")

    def device(self, storage: LvmStorage, name: str) -> Path:
        return self._loop_of(storage, name) or super().device(storage, name)

    def activate(self, storage: LvmStorage, name: str) -> Path:
        return self._loop_map(storage, name)

    def deactivate(self, storage: LvmStorage, name: str) -> None:
        loop = self._loop_of(storage, name)
        if loop:
            run(["losetup", "-d", str(loop)], timeout=30)

    def _extent_map(self, storage: LvmStorage, name: str) -> tuple[str, int, int]:
        """(PV, byte offset, byte length) of a single-segment LV."""
        out = storage.lvm("lvs", "--noheadings", "--units", "b", "--nosuffix", "--separator", "|",
                          "-o", "lv_size,seg_pe_ranges", f"{storage.vg}/{name}")
        rows = [row.strip() for row in out.splitlines() if row.strip()]
        if len(rows) != 1:
            raise TargetError(f"{storage.vg}/{name} has {len(rows)} segments; loop activation maps one")
        size, ranges = rows[0].split("|")
        pv, _, span = ranges.strip().rpartition(":")
        first = int(span.split("-")[0])
        pe_start = int(storage.lvm("pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start",
                                   pv).strip())
        return pv, pe_start + first * storage.vg_info()["extent"], int(size)

    def _loop_map(self, storage: LvmStorage, name: str) -> Path:
        pv, offset, size = self._extent_map(storage, name)
        out = run(["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size), pv],
                  timeout=30).stdout
        return Path(out.strip())

    def _loop_of(self, storage: LvmStorage, name: str) -> Path | None:
        try:
            pv, offset, _size = self._extent_map(storage, name)
        except TargetError:
            return None
        listing = run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE,OFFSET"],
                      timeout=30, check=False).stdout
        for loop in json.loads(listing or '{"loopdevices": []}').get("loopdevices", []):
            if loop.get("back-file") == pv and int(loop.get("offset") or 0) == offset:
                return Path(loop["name"])
        return None


def install() -> None:
    """Every LvmStorage of this process activates through loop devices."""
    LvmStorage.activation = LoopActivation()
