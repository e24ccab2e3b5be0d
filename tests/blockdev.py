"""Real block devices for the storage tests: loop devices over files in the
test's tmp folder, an LVM volume group on one, a small mounted ext4. Each is
torn down even when the test fails."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

# A `python -m v2p` started with these activates LVs through loop devices (lvm_loop/sitecustomize.py);
# in a test's own process: lvm_loop.loop_activation.LoopActivation on LvmStorage.activation.
LVM_LOOP = Path(__file__).resolve().parent / "lvm_loop"
LVM_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, (str(LVM_LOOP), os.environ.get("PYTHONPATH")))),
           "LVM_SUPPRESS_FD_WARNINGS": "1"}
NO_DM = ["--config", "global { activation = 0 }"]


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, env=env)


@contextlib.contextmanager
def loop_device(backing: Path, size: int) -> Iterator[Path]:
    with open(backing, "wb") as handle:
        handle.truncate(size)
    device = Path(sh("losetup", "--find", "--show", str(backing)).stdout.strip())
    try:
        yield device
    finally:
        detach_all(device)
        sh("losetup", "-d", str(device), check=False)


def detach_all(backing: Path) -> None:
    """Detach every loop device whose backing file is ``backing``."""
    listing = json.loads(sh("losetup", "--list", "--json", "--output", "NAME,BACK-FILE").stdout
                         or '{"loopdevices": []}')
    for loop in listing.get("loopdevices", []):
        if loop.get("back-file") == str(backing):
            sh("losetup", "-d", loop["name"], check=False)


@contextlib.contextmanager
def volume_group(tmp: Path, size: int = 64 << 20) -> Iterator[tuple[str, Path]]:
    """A real LVM VG (metadata only: no device-mapper here) on a loop PV."""
    name = f"v2ptest{uuid.uuid4().hex[:8]}"
    with loop_device(tmp / "pv.img", size) as pv:
        sh("pvcreate", "-q", *NO_DM, str(pv))
        sh("vgcreate", "-q", *NO_DM, name, str(pv))
        try:
            yield name, pv
        finally:
            detach_all(pv)
            sh("vgremove", "-qf", *NO_DM, name, check=False)
            sh("pvremove", "-q", *NO_DM, str(pv), check=False)


@contextlib.contextmanager
def small_filesystem(tmp: Path, size: int) -> Iterator[Path]:
    image = tmp / "fs.img"
    with open(image, "wb") as handle:
        handle.truncate(size)
    sh("mkfs.ext4", "-q", "-m", "0", str(image))
    mount = tmp / "mnt"
    mount.mkdir()
    sh("mount", "-o", "loop", str(image), str(mount))
    try:
        yield mount
    finally:
        sh("umount", str(mount), check=False)
        detach_all(image)


def lv_extents(vg: str, lv: str, pv: Path) -> tuple[int, int]:
    """(byte offset on the PV, byte length) of a single-segment LV, as LVM itself reports it."""
    out = sh("lvs", *NO_DM, "--noheadings", "--units", "b", "--nosuffix", "--separator", "|",
             "-o", "lv_size,seg_pe_ranges,vg_extent_size", f"{vg}/{lv}").stdout.strip()
    size, ranges, extent = out.split("|")
    first = int(ranges.rpartition(":")[2].split("-")[0])
    pe_start = int(sh("pvs", *NO_DM, "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start",
                      str(pv)).stdout.strip())
    return pe_start + first * int(extent), int(size)


def lv_names(vg: str) -> list[str]:
    return sh("lvs", *NO_DM, "--noheadings", "-o", "lv_name", vg).stdout.split()
