"""Guests booted through the PVE path: the simulator runs every VM v2p starts as a real QEMU (TCG),
built from its PVE config as qemu-server would. Both ways v2p reaches PVE: from a workstation (the
remote path: only the API, no serial console) and on the node (``on-node=1``: the guest's serial port
read from its qemu-server socket). Every request v2p made passed the PVE schema."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from pve_sim.fixture import pve_fixture  # noqa: F401
from test_dance import assert_boot2_up_by_io, assert_driver_seen_by_reads, drivers_iso, standin  # noqa: F401 - drivers_iso is a fixture
from test_whole_vm import make_vm

from conftest import DISK_LINE, V2P, assert_same_bytes, guest_report, one_line_error
from v2p.errors import EXIT_BOOT_UNCONFIRMED
from v2p.targets.proxmox import ProxmoxTarget, target_from_url

PATHS = ("remote", "on-node")
pytestmark = pytest.mark.usefixtures("short_settle")  # the stand-ins settle in seconds (conftest)


def run(v2p: V2P, sim: Any, tmp_path: Path, path: str, *args: str, storage: str = "local",  # type: ignore[no-untyped-def]
        timeout: float = 120):
    url = f"pve://root@pam!v2p@{sim.host}/{sim.cluster.node}?storage={storage}&fingerprint={sim.fingerprint}"
    if path == "on-node":
        url += "&on-node=1"
    runner = getattr(sim, "runner", None)  # a simulator that runs no VM has no qemu-server folder
    where = {"V2P_PVE_QEMU_RUN_DIR": str(runner.qemu_server_dir)} if runner else {}
    return v2p("--target", url, *args, V2P_PVE_TOKEN=sim.tokens["root@pam!v2p"],
               XDG_DATA_HOME=str(tmp_path / "xdg"), timeout=timeout, **where)


def state(sim: Any, tmp_path: Path, vmid: int) -> dict[str, Any]:
    (folder,) = (tmp_path / "xdg" / "v2p" / "pve").glob(f"*-{sim.cluster.node}")  # <host>-<node>
    data: dict[str, Any] = json.loads((folder / f"{vmid}.json").read_text())
    return data


def serial_log(sim: Any, vmid: int) -> str:
    """What the guest wrote on its serial port (the simulator's own log of the VM's last run)."""
    return (sim.runner.run_dir(vmid) / "serial.log").read_text(errors="replace")


def schema_clean(sim: Any) -> None:
    assert sim.refused == [], sim.refused
    assert sim.unsimulated == [], sim.unsimulated


@pytest.fixture(name="sim")
def running_sim(pve):  # type: ignore[no-untyped-def]
    pve.runner = pve.run_vms()
    return pve


@pytest.mark.usefixtures("boots")
@pytest.mark.parametrize("path", PATHS)
def test_linux_guest_boots_on_pve(sim, tmp_path, manifest, samples, source_of, v2p: V2P, path):
    src = source_of("monolithicSparse")
    proc = run(v2p, sim, tmp_path, path, "migrate", str(src.descriptor), "--vmid", "150", "--boot-timeout", "90")
    boot = state(sim, tmp_path, 150)["stages"]["boot"]["result"]
    assert proc.returncode == 0, proc.stdout + proc.stderr  # up on both paths
    config = sim.cluster.vms[150].config
    volid = config["scsi0"].split(",")[0]
    assert_same_bytes(samples / "guest.raw", sim.cluster.volume_path(volid),
                      "raw" if volid.endswith(".raw") or "/" not in volid else "qcow2")
    controller, _pci, marker = guest_report(serial_log(sim, 150))
    assert controller == "virtio-scsi" and marker == manifest["marker"]
    if path == "on-node":
        # v2p itself read the guest's words from the serial socket
        assert config["serial0"] == "socket"
        assert manifest["expected_serial"]["marker"] in boot["serial"]
        assert boot["outcome"] == "up"  # it read its "kernel" and powered off once it had reported
    else:
        assert "serial0" not in config and boot["serial"] == ""
        assert boot["outcome"] == "up"  # from PVE's counters alone: its boot disk's reads
    assert sim.cluster.vms[150].status == "stopped"
    schema_clean(sim)


def assert_danced_on_pve(sim: Any, vmid: int) -> None:
    config = sim.cluster.vms[vmid].config
    assert config["virtio0"].startswith(f"local:{vmid}/vm-{vmid}-disk-0."), config
    assert config["boot"] == "order=virtio0" and config["net0"].startswith("virtio=")
    for gone in ("ide0", "ide2", "virtio1", "net1"):
        assert gone not in config, f"{gone} left in the config: {config}"
    assert not [key for key in config if key.startswith("unused")], config
    # the temporary disk PVE allocated for boot 1 is gone again; the system disk is the only volume
    assert [v for v in sim.volumes() if f"vm-{vmid}-" in v] == [config["virtio0"].split(",")[0]]
    serial = serial_log(sim, vmid)
    assert "v2p-guest: windows up on virtio-blk (viostor)" in serial and "STOP 0x" not in serial


@pytest.mark.usefixtures("boots")
@pytest.mark.parametrize("path", PATHS)
def test_windows_dance_goes_on_by_itself(sim, tmp_path, manifest, drivers_iso, v2p: V2P, path):  # noqa: F811
    """From a workstation as on the node: boot 1 goes on once PVE's blockstat shows the guest reading
    its temporary disk (the driver is in), boot 2 is judged by the virtio system disk's reads."""
    vmid = 160 if path == "on-node" else 161
    disk = standin(manifest, tmp_path)
    proc = run(v2p, sim, tmp_path, path, "migrate", str(disk), "--vmid", str(vmid), "--os", "win7",
               "--bus", "virtio", "--drivers-iso", str(drivers_iso))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_danced_on_pve(sim, vmid)
    dance = state(sim, tmp_path, vmid)["stages"]["drivers"]["result"]
    assert_driver_seen_by_reads(dance)
    assert_boot2_up_by_io(dance)
    assert "local:iso/virtio-win.iso" in [entry["volid"] for entry in sim.cluster.content_list(
        {"storage": "local", "content": "iso"}, "root@pam")]
    schema_clean(sim)


@pytest.mark.usefixtures("boots")
@pytest.mark.parametrize("path", ["on-node", "remote"])
def test_windows_dance_without_the_driver_needs_the_operator_then_rolls_back(sim, tmp_path, manifest, drivers_iso,  # noqa: F811
                                                                            v2p: V2P, path):
    """A guest that never reads its temporary disk: the operator step after --dance-wait; the operator's
    word is wrong, boot 2 blue-screens and restarts: on the node v2p sees it and rolls back to IDE; from
    a workstation it is not confirmed (and never called up)."""
    vmid = 163 if path == "on-node" else 164
    disk = standin(manifest, tmp_path, "winguest-nodriver")
    line = one_line_error(run(v2p, sim, tmp_path, path, "migrate", str(disk), "--vmid", str(vmid), "--os", "win7",
                              "--bus", "virtio", "--drivers-iso", str(drivers_iso), "--dance-wait", "10"))
    assert "no sign that the guest has the virtio drivers after 10s: it never read its temporary disk virtio1" \
        in line
    assert f"v2p dance {vmid} --continue" in line
    assert sim.cluster.vms[vmid].status == "running"  # left up on IDE with the drivers ISO
    assert sim.cluster.vms[vmid].config["ide2"].startswith("local:iso/virtio-win.iso,media=cdrom")
    # From a workstation the restarts are never seen: boot 2 lasts its whole wait, so a shorter one
    # (still well past the stand-in's ~2 s restarts and the 10 s settle) keeps the test from idling.
    wait = "90" if path == "on-node" else "30"
    # A guest restarting from a blue screen ignores the power button: the stop after the dance gets 15 s
    # of it (the default, 120 s, is all idling here), then stops it hard.
    done = run(v2p, sim, tmp_path, path, "dance", str(vmid), "--continue", "--drivers-iso", str(drivers_iso),
               "--boot-wait", wait, "--shutdown-timeout", "15", timeout=300)
    if path == "remote":
        # From a workstation PVE shows no resets (status/current has no counter of them): the blue
        # screen's automatic restarts are one long boot whose disk reads never level off. Not a
        # boot v2p can tell from a busy OS: not confirmed (exit 12), never called up.
        said = done.stdout + done.stderr
        assert done.returncode == EXIT_BOOT_UNCONFIRMED, said
        last = done.stdout.strip().splitlines()[-1]
        assert last.startswith(f"VM {vmid} now boots from virtio0; boot not confirmed: "), last
        assert "reads never levelled off" in last and "boot: up" not in said, said
        return
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"VM {vmid} did not boot on virtio" in done.stderr, done.stdout + done.stderr
    assert "rolled back to ide0, it boots there again" in done.stderr, done.stderr
    config = sim.cluster.vms[vmid].config
    assert config["ide0"].startswith(f"local:{vmid}/vm-{vmid}-disk-0.") and config["boot"] == "order=ide0"
    assert not [key for key in config if key.startswith("virtio")], config
    assert sim.cluster.vms[vmid].status == "stopped"
    schema_clean(sim)


@pytest.mark.usefixtures("boots")
@pytest.mark.parametrize("path", PATHS)
def test_vmx_with_three_disks_boots_on_pve(sim, tmp_path, manifest, samples, v2p: V2P, path):
    vmx, raws = make_vm(tmp_path / "web01", samples)
    if "vmbr1" not in sim.cluster.bridges:  # the node has the DMZ's bridge (preflight checks it is there)
        sim.cluster.bridges.append("vmbr1")
    proc = run(v2p, sim, tmp_path, path, "migrate", str(vmx), "--vmid", "170", "--network", "LAN=vmbr0",
               "--network", "DMZ=vmbr1", "--boot-timeout", "90")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = sim.cluster.vms[170].config
    assert (config["name"], config["sockets"], config["cores"]) == ("web-01", "2", "2")
    assert config["memory"] in ("768", "current=768") and config["scsihw"] == "virtio-scsi-pci"
    assert config["net0"] == "virtio=00:50:56:AA:BB:CC,bridge=vmbr0" and config["boot"] == "order=scsi0"
    for key, name in (("scsi0", "esxi.vmdk"), ("scsi1", "data.vmdk"), ("scsi2", "logs.vmdk")):
        volid = config[key].split(",")[0]
        fmt = "qcow2" if volid.endswith(".qcow2") else "raw"
        assert_same_bytes(raws[name], sim.cluster.volume_path(volid), fmt)
    # The guest sees them all. Read from the socket chardev's logfile: under load QEMU logged a byte of a
    # line twice once ("disk 0x822"), so repeated characters are collapsed before the lines are counted.
    serial = re.sub(r"(.)\1+", r"\1", serial_log(sim, 170))
    assert len(DISK_LINE.findall(serial)) == 3, serial[-2000:]
    schema_clean(sim)


def test_boot_check_through_the_guest_agent(pve, tmp_path, manifest, source_of, v2p: V2P):
    """A VM whose config has ``agent: 1`` is "up" once its guest agent answers (from a workstation too);
    v2p then names the OS the agent reports. (The simulator answers for an agent after 2 s of run.)"""
    pve.cluster.agent_after = 2.0
    src = source_of("monolithicSparse")
    proc = run(v2p, pve, tmp_path, "remote", "migrate", str(src.descriptor), "--vmid", "180", "--no-boot-check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    url = f"pve://root@pam!v2p@{pve.host}/{pve.cluster.node}?fingerprint={pve.fingerprint}"
    target = ProxmoxTarget(target_from_url(url, {"V2P_PVE_TOKEN": pve.tokens["root@pam!v2p"]}),
                           state_root=tmp_path / "state")
    target.set_config(180, {"agent": "1"})
    report = target.boot_check(180, timeout=30)
    assert (report.outcome, report.signal) == ("up", "the guest agent answered (Windows 10 Pro)")
    assert report.seconds >= 2.0  # not before the agent answers
    target.stop(180, timeout=5)
    pve.cluster.agent_after = None  # an agent that never answers (and no QEMU: no counters): not confirmed
    report = target.boot_check(180, timeout=4)
    assert report.outcome == "unconfirmed" and report.seconds >= 4
    target.stop(180, timeout=5)
    schema_clean(pve)


def test_drivers_iso_on_the_node_is_checked_there(sim, tmp_path, manifest, drivers_iso, v2p: V2P):  # noqa: F811
    iso_folder = sim.cluster.storage("local").path / "iso"
    iso_folder.mkdir(exist_ok=True)
    shutil.copy(drivers_iso.parent / "no-w7.iso", iso_folder / "no-w7.iso")
    disk = standin(manifest, tmp_path)
    args = ("migrate", str(disk), "--vmid", "162", "--os", "win7", "--bus", "virtio")
    # on the node v2p reads the ISO's file and finds the Windows 7 driver missing, before making anything
    line = one_line_error(run(v2p, sim, tmp_path, "on-node", *args, "--drivers-iso", "local:iso/no-w7.iso"))
    assert "no-w7.iso has no viostor" in line and "win7" in line
    # a volume that is not there is refused on either path
    line = one_line_error(run(v2p, sim, tmp_path, "remote", *args, "--drivers-iso", "local:iso/gone.iso"))
    assert "drivers ISO local:iso/gone.iso: no such ISO on PVE node pve1" in line
    assert 162 not in sim.cluster.vms and not [v for v in sim.volumes() if "162" in v]
    schema_clean(sim)


PVESH = Path(__file__).resolve().parent / "pve_sim" / "bin"


@pytest.mark.usefixtures("boots")
def test_on_the_node_through_pvesh(sim, tmp_path, manifest, samples, source_of, v2p: V2P):
    """backend=local: v2p on the node as root calls pvesh (here a stand-in that forwards each call to the
    simulator, schema-checked), no token; disks go straight into the storage, the serial port is read."""
    src = source_of("monolithicSparse")
    env = {"PATH": f"{PVESH}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PVE_SIM_URL": f"https://{sim.host}/api2/json",
           "PVE_SIM_AUTH": f"root@pam!v2p={sim.tokens['root@pam!v2p']}",
           "XDG_DATA_HOME": str(tmp_path / "xdg"), "V2P_PVE_QEMU_RUN_DIR": str(sim.runner.qemu_server_dir)}
    proc = v2p("--target", "pve:///pve1?backend=local&storage=local-lvm", "migrate", str(src.descriptor),
               "--vmid", "190", "--boot-timeout", "90", **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = sim.cluster.vms[190].config
    volid = config["scsi0"].split(",")[0]
    assert volid == "local-lvm:vm-190-disk-0" and config["serial0"] == "socket"
    assert_same_bytes(samples / "guest.raw", sim.cluster.volume_path(volid), "raw")
    assert not [entry for entry in sim.log if "upload" in entry.path or "import-from" in json.dumps(entry.params)]
    boot = state(sim, tmp_path, 190)["stages"]["boot"]["result"]
    assert manifest["expected_serial"]["marker"] in boot["serial"]
    schema_clean(sim)
    # off a PVE node there is no pvesh: one line saying so
    line = one_line_error(v2p("--target", "pve:///pve1?backend=local", "vm", "list",
                              PATH="/usr/bin:/bin", XDG_DATA_HOME=str(tmp_path / "xdg")))
    assert "pvesh" in line
