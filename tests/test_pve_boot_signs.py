"""The boot check on PVE without the guest's words: what ``GET /nodes/{node}/qemu/{vmid}/status/current``
tells from anywhere (qemu-server's ``vmstatus`` with ``$full``: ``blockstat`` per drive, ``nics`` per tap
device, ``qmpstatus``), on both ways v2p reaches PVE (from a workstation, and on the node where the serial
port is read too). The simulator runs each started VM as a real QEMU (TCG) and answers from it: QMP
``query-blockstats`` and ``query-status``, and the frames the guest really sent."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from pve_sim.fixture import pve_fixture  # noqa: F401
from test_pve_guests import run, schema_clean

from conftest import V2P
from v2p.targets.base import BOOT_FAILED, BOOT_UNCONFIRMED, BOOT_UP
from v2p.targets.proxmox import QEMU_RUN_ENV, ProxmoxTarget, status_io, target_from_url

PATHS = ("remote", "on-node")
MIB = 1 << 20


@pytest.fixture(name="sim")
def running_sim(pve, boots):  # type: ignore[no-untyped-def]
    """The simulator running each started VM as a real QEMU: every test here that starts one boots it."""
    pve.runner = pve.run_vms()
    return pve


def target_for(sim: Any, tmp_path: Path, path: str, monkeypatch: pytest.MonkeyPatch) -> ProxmoxTarget:
    url = f"pve://root@pam!v2p@{sim.host}/{sim.cluster.node}?storage=local&fingerprint={sim.fingerprint}"
    if path == "on-node":
        url += "&on-node=1"
        monkeypatch.setenv(QEMU_RUN_ENV, str(sim.runner.qemu_server_dir))  # where the serial sockets are
    return ProxmoxTarget(target_from_url(url, {"V2P_PVE_TOKEN": sim.tokens["root@pam!v2p"]}),
                         state_root=tmp_path / "state")


def halting_sector() -> bytes:
    """A boot sector that stops the CPU: ``cli; hlt`` (and ``jmp`` back to the ``hlt``), signed 55 AA."""
    code = bytes([0xFA, 0xF4, 0xEB, 0xFD])
    return code + bytes(510 - len(code)) + b"\x55\xaa"


def vm_on_disk(sim: Any, target: ProxmoxTarget, vmid: int, head: bytes, **config: str) -> None:
    """VM ``vmid`` booting a 32 MiB raw disk that starts with ``head`` (zeros after it), as a migrated
    VM's config has it (virtio-scsi, a virtio NIC on vmbr0); ``config`` adds or replaces keys."""
    volid = f"local:{vmid}/vm-{vmid}-disk-0.raw"
    disk = sim.cluster.volume_path(volid)
    disk.parent.mkdir(parents=True, exist_ok=True)
    with open(disk, "wb") as handle:
        handle.write(head)
        handle.truncate(32 * MIB)
    target.create_vm(vmid, {"name": f"dead-{vmid}", "memory": "128", "scsihw": "virtio-scsi-pci",
                            "scsi0": f"{volid},size=32M", "boot": "order=scsi0",
                            "net0": "virtio=52:54:00:12:34:56,bridge=vmbr0", **config})


def test_status_io_reads_qemu_servers_answer() -> None:
    """``status_io`` takes what qemu-server's vmstatus puts in status/current: blockstat keyed by the
    drive's config key, nics keyed ``tap<vmid>i<n>`` (netout: what the guest sent), qmpstatus."""
    stats = {"rd_bytes": 41943040, "wr_bytes": 4096, "rd_operations": 320}
    current = {"status": "running", "qmpstatus": "running", "blockstat": {"scsi0": stats, "ide2": {"rd_bytes": 0}},
               "nics": {"tap101i0": {"netout": 342, "netin": 1290}, "tap101i2": {"netout": 0, "netin": 0}}}
    io = status_io(101, current)
    assert io is not None
    assert io.reads == {"scsi0": 41943040, "ide2": 0} and io.sent == {"net0": 342, "net2": 0}
    assert not io.panicked
    assert status_io(1010, current) is not None and status_io(1010, current).sent == {}  # type: ignore[union-attr]
    assert status_io(101, {**current, "qmpstatus": "guest-panicked"}).panicked  # type: ignore[union-attr]
    assert status_io(101, {"status": "stopped", "qmpstatus": "stopped"}) is None


def test_status_current_answers_as_qemu_server(sim, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """The simulator's status/current of a running VM has qemu-server's keys and real numbers: each
    drive's query-blockstats under its config key, each bridged NIC under tap<vmid>i<n> (net1 without a
    bridge is QEMU's user network: no tap, no entry). net0 is first in the boot order, so SeaBIOS runs
    its iPXE, which sends DHCP: those bytes are netout. They are the firmware's, not an OS's: the boot
    check does not count a NIC of the boot order, and calls this VM unconfirmed, not up."""
    target = target_for(sim, tmp_path, "remote", monkeypatch)
    data = sim.cluster.volume_path("local:201/vm-201-disk-1.raw")
    data.parent.mkdir(parents=True)
    data.write_bytes(bytes(MIB))
    vm_on_disk(sim, target, 201, halting_sector(), boot="order=net0;scsi0", net1="e1000=52:54:00:12:34:57",
               virtio1="local:201/vm-201-disk-1.raw,size=1M")
    target.start(201)
    try:
        deadline = time.monotonic() + 60
        while True:
            current = target.call("GET", "nodes/pve1/qemu/201/status/current")
            if current["nics"]["tap201i0"]["netout"] > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert current["status"] == "running" and current["qmpstatus"] == "running"
        assert set(current["blockstat"]) == {"scsi0", "virtio1"}
        for stats in current["blockstat"].values():  # QEMU's BlockDeviceStats, as qemu-server passes it on
            assert {"rd_bytes", "wr_bytes", "rd_operations", "wr_operations", "flush_operations"} <= set(stats)
        assert current["diskread"] == sum(stats["rd_bytes"] for stats in current["blockstat"].values())
        assert set(current["nics"]) == {"tap201i0"}
        nic = current["nics"]["tap201i0"]
        assert set(nic) == {"netin", "netout"} and nic["netout"] > 0 and nic["netin"] > 0  # DHCP, and slirp's offer
        assert (current["netout"], current["netin"]) == (nic["netout"], nic["netin"])
        io = target.guest_io(201)
        assert io is not None and set(io.reads) == {"scsi0", "virtio1"} and io.sent["net0"] >= nic["netout"]
    finally:
        target.stop(201, timeout=1)
    # iPXE's DHCP comes within seconds; counted as a sign it would settle (3 s here) well before the end
    report = target.boot_check(201, timeout=15, settle=3)
    assert report.outcome == BOOT_UNCONFIRMED, report
    assert "network" not in report.signs and "bytes sent" in report.signal
    target.stop(201, timeout=1)
    schema_clean(sim)


@pytest.mark.parametrize("path", PATHS)
def test_migrated_guest_is_up_without_its_words(sim, tmp_path, monkeypatch, source_of, v2p: V2P, path):  # type: ignore[no-untyped-def]
    """The sample guest, migrated, reads its "kernel" (10 MiB of its disk) and powers itself off: from
    PVE's counters alone that is up (the boot disk's reads, then a stop on its own), on the node too,
    where its serial lines are read but say nothing v2p takes for a sign."""
    src = source_of("monolithicSparse")
    proc = run(v2p, sim, tmp_path, path, "migrate", str(src.descriptor), "--vmid", "210", "--no-boot-check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    target = target_for(sim, tmp_path, path, monkeypatch)
    report = target.boot_check(210, timeout=60)
    assert report.outcome == BOOT_UP, report
    # The reads PVE's counters showed at the last look before the stop: all 10 MiB, or (a busy machine's
    # poll a moment early) most of them.
    assert re.match(r"boot disk reads \((\d+(\.\d+)?) MiB\)", report.signal), report.signal
    assert report.signs["boot disk reads"]["value"] >= 8 * MIB
    assert "stopped" in report.signs  # it powered off; PVE cannot say why, so the reads decided
    if path == "on-node":
        assert "v2p-guest: poweroff" in report.serial  # the port was read
    else:
        assert report.serial == "" and "no serial console" in report.notes[0]
    assert sim.cluster.vms[210].status == "stopped"
    schema_clean(sim)


@pytest.mark.parametrize("path", PATHS)
def test_dead_disk_is_never_up(sim, tmp_path, monkeypatch, path):  # type: ignore[no-untyped-def]
    """A disk of zeros and a boot sector that halts: the VM runs, reads a sector and sends nothing.
    Never up: unconfirmed, naming what was seen. Not failed either: PVE keeps no firmware log, and
    SeaBIOS says "No bootable device." on its debug port and the screen, not on the serial port
    (src/boot.c boot_fail; its serial console is off unless asked for), so the node's serial socket
    is silent too."""
    target = target_for(sim, tmp_path, path, monkeypatch)
    vm_on_disk(sim, target, 220, b"")
    vm_on_disk(sim, target, 221, halting_sector())
    for vmid in (220, 221):
        report = target.boot_check(vmid, timeout=10, settle=3)
        assert report.outcome == BOOT_UNCONFIRMED, report
        assert report.signs["boot disk read in all"]["value"] < MIB
        assert "scsi0 read" in report.signal and report.seconds >= 10
        if path == "remote":
            assert "no serial console" in report.notes[0]
        target.stop(vmid, timeout=1)
    schema_clean(sim)


# Helper C's dead guests (sample_images/dead.asm): a boot loader stranded at GRUB's rescue prompt, a
# kernel panic (its words on COM1, then the pvpanic port, which a PVE VM does not have), a reset loop.
# From a workstation PVE shows none of that: never up. On the node the guest's own words are read.
DEAD_ON_THE_NODE = {"grubrescue": BOOT_FAILED, "panic": BOOT_FAILED, "resetloop": BOOT_UNCONFIRMED}


@pytest.mark.parametrize("path", PATHS)
def test_dead_guests_of_the_samples(sim, tmp_path, monkeypatch, samples, path):  # type: ignore[no-untyped-def]
    target = target_for(sim, tmp_path, path, monkeypatch)
    for vmid, name in enumerate(DEAD_ON_THE_NODE, start=230):
        vm_on_disk(sim, target, vmid, (samples / "dead" / f"{name}.raw").read_bytes())
        report = target.boot_check(vmid, timeout=10, settle=3)
        expected = DEAD_ON_THE_NODE[name] if path == "on-node" else BOOT_UNCONFIRMED
        assert (name, report.outcome) == (name, expected), report
        if report.outcome == BOOT_FAILED:
            assert report.seconds < 10  # the words end the check
        assert report.signs["boot disk read in all"]["value"] < MIB
        target.stop(vmid, timeout=1)
    schema_clean(sim)
