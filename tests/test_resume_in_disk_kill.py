"""Resume inside a disk through the command (issue 20): ``v2p migrate`` SIGKILLed after the second of a
disk's four windows is carried on from that window by the rerun, which copies the last two windows
only and verifies every byte. The in-process cases are test_resume_in_disk.py's."""

from __future__ import annotations

import json
import re
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from pve_sim.fixture import pve_fixture  # noqa: F401
from pve_sim.server import PVESim
from test_resume_in_disk import WINDOW, sparse_disk

from conftest import V2P, assert_same_bytes
from test_resume import wait_for
from v2p.plan import Plan
from v2p.planrun import run_plan

VMID = 150


def bootable(disk: Path) -> Path:
    """``disk`` with an MBR holding one Linux partition: a disk the command takes as a disk."""
    with open(disk, "r+b") as handle:
        entry = bytes([0x80, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") + (8192).to_bytes(4, "little")
        handle.seek(446)
        handle.write(entry)
        handle.seek(510)
        handle.write(b"\x55\xaa")
    return disk


def test_a_killed_copy_is_carried_on_from_its_last_window(v2p: V2P, tmp_path: Path) -> None:
    disk = bootable(sparse_disk(tmp_path / "disk.raw"))
    args = ("migrate", str(disk), "--vmid", str(VMID), "--no-boot-check")
    proc = v2p.popen(*args, V2P_TEST_HOLD_AFTER="convert:window:2")
    try:
        wait_for(proc.stderr, "holding after convert:window:2", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    record = v2p.state(VMID)
    assert (record["progress"]["stage"], record["progress"]["done"]) == ("convert", 2 * WINDOW)

    rerun = v2p("-v", *args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"[convert] disk 0: the copy goes on at byte {2 * WINDOW} of {4 * WINDOW} (50 %)" in rerun.stdout
    # The windows the rerun copied: the last two (qemu-img's argv, as -v logs it), then the verify.
    windows = sorted({int(offset) for line in rerun.stderr.splitlines()
                      if "qemu-img convert" in line and " -n " in line
                      for offset in re.findall(r'"offset":(\d+)', line)})
    assert windows == [2 * WINDOW, 3 * WINDOW], windows
    record = v2p.state(VMID)
    assert "verify" in record["stages"] and "progress" not in record


@pytest.mark.slow
def test_a_plan_stopped_inside_a_disk_goes_on_inside_it(tmp_path: Path) -> None:
    """A plan stopped (as by Ctrl-C: ``run_plan``'s ``stop``) while its VM's disk is half copied: the rerun of
    the plan carries the copy on from the child's last checkpoint."""
    disk = bootable(sparse_disk(tmp_path / "disk.raw"))
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""\
defaults:
  target: {{kind: local, dir: {tmp_path / "target"}, accel: tcg}}
  boot_check: false
vms:
  - {{source: {disk}, vmid: {VMID}, name: half, bwlimit: 4096}}
""")
    vms = Plan.load(plan).vms
    stop = threading.Event()

    def on_event(run: Any, event: Any) -> None:
        if event.kind == "progress" and event.stage == "convert" and (event.done or 0) > 5 * WINDOW // 2:
            stop.set()  # the checkpoint after the second window is in by then

    report = run_plan(vms, parallel=1, on_event=on_event, stop=stop)
    assert report.interrupted == signal.SIGINT
    record = json.loads((tmp_path / "target" / "migrations" / f"{VMID}.json").read_text())
    done = record["progress"]["done"]
    assert record["progress"]["stage"] == "convert" and WINDOW <= done < 4 * WINDOW
    started: list[int] = []

    def first_progress(run: Any, event: Any) -> None:
        if event.kind == "progress" and event.stage == "convert" and event.step is None and not started:
            started.append(event.done)

    again = run_plan(vms, parallel=1, on_event=first_progress)
    assert again.ok
    assert started == [done]  # the rerun's copy began at the checkpoint, not at byte 0


@pytest.mark.parametrize(("storage", "fmt"), [("local", "qcow2"), ("local-lvm", "raw")], ids=["dir", "lvmthin"])
def test_on_a_pve_node_a_killed_copy_goes_on(pve: PVESim, tmp_path: Path, v2p: V2P, storage: str, fmt: str) -> None:
    """``on-node=1`` (``OnNodeSink``): onto PVE's dir storage ``local`` the rerun goes on in the temporary file
    the killed copy left beside PVE's volumes; onto ``local-lvm`` in the volume PVE allocated for it."""
    disk = bootable(sparse_disk(tmp_path / "disk.raw"))
    url = f"pve://root@pam!v2p@{pve.host}/{pve.cluster.node}?fingerprint={pve.fingerprint}&on-node=1"
    env = {"V2P_PVE_TOKEN": pve.tokens["root@pam!v2p"], "XDG_DATA_HOME": str(tmp_path / "xdg")}
    args = ("--target", url, "migrate", str(disk), "--vmid", str(VMID), "--no-boot-check", "--storage", storage)
    proc = v2p.popen(*args, V2P_TEST_HOLD_AFTER="convert:window:2", **env)
    try:
        wait_for(proc.stderr, "holding after convert:window:2", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert storage != "local" or list(pve.cluster.root.rglob("*v2p-partial*"))
    rerun = v2p(*args, **env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"[convert] disk 0: the copy goes on at byte {2 * WINDOW} of {4 * WINDOW} (50 %)" in rerun.stdout
    assert not list(pve.cluster.root.rglob("*v2p-partial*"))
    volid = pve.cluster.vms[VMID].config["scsi0"].split(",")[0]
    assert_same_bytes(disk, pve.cluster.volume_path(volid), fmt)
