"""`v2p --target pve://...?on-node=1`: v2p runs on the PVE node and converts each disk straight
into the storage (a file under the dir storage's images/<vmid>/, or a volume PVE allocates and
v2p writes in place), then attaches it by volume id: no upload, no import-from. Against the PVE
simulator, every request schema-checked."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pve_sim.fixture import pve_fixture  # noqa: F401
from pve_sim.server import PVESim

from conftest import V2P, assert_same_bytes, one_line_error
from v2p.endpoint import DiskEndpoint
from v2p.errors import TargetError
from v2p.targets.proxmox import ProxmoxTarget, target_from_url

VMID = 150


def node_url(sim: PVESim) -> str:
    return (f"pve://root@pam!v2p@{sim.host}/{sim.cluster.node}?fingerprint={sim.fingerprint}&on-node=1")


def env(sim: PVESim, tmp_path: Path) -> dict[str, str]:
    return {"V2P_PVE_TOKEN": sim.tokens["root@pam!v2p"], "XDG_DATA_HOME": str(tmp_path / "xdg")}


def run(v2p: V2P, sim: PVESim, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return v2p("--target", node_url(sim), *args, V2P_PVE_TOKEN=sim.tokens["root@pam!v2p"],
               XDG_DATA_HOME=str(tmp_path / "xdg"))


def migrate_args(src: Any, storage: str, *extra: str) -> tuple[str, ...]:
    return ("migrate", str(src.descriptor), "--vmid", str(VMID), "--no-boot-check", "--storage", storage, *extra)


def assert_no_upload_and_clean(sim: PVESim, tmp_path: Path) -> None:
    """Nothing went the remote way (no upload, no import-from, no staging file), every request
    passed PVE's schema, and no temporary file is left in the storage."""
    assert not [e for e in sim.log if e.path.endswith("/upload")]
    assert not [e for e in sim.log if "import-from" in json.dumps(e.params)]
    assert not list((sim.cluster.storages["local"].path / "import").iterdir())
    assert not [p for p in (tmp_path / "xdg").rglob("staging/*")]
    assert not list(sim.cluster.root.rglob("*v2p-partial*"))
    assert sim.refused == [] and sim.unsimulated == []


@pytest.mark.parametrize("storage, extra, volid, fmt", [
    ("local", (), f"local:{VMID}/vm-{VMID}-disk-0.qcow2", "qcow2"),
    ("local", ("--format", "raw"), f"local:{VMID}/vm-{VMID}-disk-0.raw", "raw"),
    ("local-lvm", (), f"local-lvm:vm-{VMID}-disk-0", "raw"),
], ids=["dir-qcow2", "dir-raw", "lvmthin"])
def test_a_disk_goes_straight_into_the_storage(pve: PVESim, tmp_path: Path, manifest: dict[str, Any],
                                               samples: Path, source_of: Any, v2p: V2P, storage: str,
                                               extra: tuple[str, ...], volid: str, fmt: str) -> None:
    src = source_of("monolithicSparse")
    proc = run(v2p, pve, tmp_path, *migrate_args(src, storage, *extra))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = pve.cluster.vms[VMID].config
    assert config["scsi0"].split(",")[0] == volid, config
    assert_same_bytes(samples / "guest.raw", pve.cluster.volume_path(volid), fmt)
    if storage == "local-lvm":  # allocated by PVE, not made by v2p beside it
        assert [e.params.get("filename") for e in pve.log if e.method == "POST" and e.path.endswith("/content")] \
            == [f"vm-{VMID}-disk-0"]
    assert_no_upload_and_clean(pve, tmp_path)
    again = run(v2p, pve, tmp_path, *migrate_args(src, storage, *extra))
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr


def wait_until(found: Any, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not found():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the disk was never being written"
        time.sleep(0.05)


def kill_mid_write(pve: PVESim, tmp_path: Path, v2p: V2P, src: Any, storage: str) -> None:
    """Migrate onto ``storage`` and SIGKILL v2p while qemu-img writes the disk into it."""
    images = pve.cluster.storages[storage].path
    # 1 MiB of data at 256 KiB/s: some four seconds of qemu-img writing into the storage.
    proc = v2p.popen("--target", node_url(pve), *migrate_args(src, storage, "--bwlimit", "256"),
                     **env(pve, tmp_path))
    try:
        wait_until(lambda: any(p.is_file() and p.stat().st_size > 0
                               for p in images.rglob(f"*vm-{VMID}-disk-0*")), proc)
        time.sleep(0.5)
        assert proc.poll() is None, "the write finished before the kill"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert VMID in pve.cluster.vms and "scsi0" not in pve.cluster.vms[VMID].config  # nothing attached yet


@pytest.mark.parametrize("storage", ["local", "local-lvm"])
def test_killed_mid_write_then_rerun_finishes(pve: PVESim, tmp_path: Path, manifest: dict[str, Any],
                                              samples: Path, source_of: Any, v2p: V2P, storage: str) -> None:
    src = source_of("monolithicSparse")
    kill_mid_write(pve, tmp_path, v2p, src, storage)
    again = run(v2p, pve, tmp_path, *migrate_args(src, storage))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[convert] done in" in again.stdout
    volid = pve.cluster.vms[VMID].config["scsi0"].split(",")[0]
    assert_same_bytes(samples / "guest.raw", pve.cluster.volume_path(volid),
                      "qcow2" if storage == "local" else "raw")
    assert_no_upload_and_clean(pve, tmp_path)


@pytest.mark.parametrize("storage", ["local", "local-lvm"])
def test_vm_rm_after_a_kill_mid_write_leaves_nothing(pve: PVESim, tmp_path: Path, manifest: dict[str, Any],
                                                     source_of: Any, v2p: V2P, storage: str) -> None:
    """PVE's destroy removes the volumes it knows of; v2p's temporary file, which PVE's listing
    does not show, v2p removes itself."""
    kill_mid_write(pve, tmp_path, v2p, source_of("monolithicSparse"), storage)
    proc = run(v2p, pve, tmp_path, "vm", "rm", str(VMID))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert VMID not in pve.cluster.vms and pve.volumes() == []
    assert not list(pve.cluster.root.rglob("*v2p-partial*"))
    assert pve.refused == [] and pve.unsimulated == []


@pytest.mark.parametrize("storage", ["local", "local-lvm"])
def test_a_storage_path_that_is_not_on_this_machine(pve: PVESim, tmp_path: Path, manifest: dict[str, Any],
                                                    source_of: Any, v2p: V2P, storage: str) -> None:
    """A node that is another machine reports paths that are not here: one line saying so, and
    nothing left behind on the node."""
    pve.cluster.reported_root = Path("/nonexistent-pve-node")
    src = source_of("monolithicSparse")
    line = one_line_error(run(v2p, pve, tmp_path, *migrate_args(src, storage)))
    assert f"PVE storage {storage}'s path /nonexistent-pve-node/" in line, line
    assert "is not on this machine: on-node=1 needs v2p to run on node pve1" in line, line
    assert "drop on-node=1" in line, line
    assert VMID not in pve.cluster.vms and pve.volumes() == []
    assert pve.refused == [] and pve.unsimulated == []


# -- the sink itself ----------------------------------------------------------------

def node_target(sim: PVESim, tmp_path: Path) -> ProxmoxTarget:
    return ProxmoxTarget(target_from_url(node_url(sim), env(sim, tmp_path)), state_root=tmp_path / "state")


@pytest.mark.parametrize("storage, fmt, efivolid, volid", [
    ("local", "raw", f"local:{VMID}/vm-{VMID}-disk-0.raw", f"local:{VMID}/vm-{VMID}-disk-1.raw"),
    ("local-lvm", None, f"local-lvm:vm-{VMID}-disk-0", f"local-lvm:vm-{VMID}-disk-1"),
], ids=["dir", "lvmthin"])
def test_the_efidisk_pve_made_keeps_its_name(pve: PVESim, tmp_path: Path, samples: Path, storage: str,
                                             fmt: str | None, efivolid: str, volid: str) -> None:
    """PVE allocates an EFI VM's efidisk0 at create with the lowest free name (vm-150-disk-0): the
    VM's first disk takes the next one instead of overwriting it."""
    target = node_target(pve, tmp_path)
    early = target.disk_sink(VMID, 0, fmt=fmt, storage=storage)  # as preflight makes it, before the VM
    assert early.check(DiskEndpoint("raw", str(samples / "guest.raw")), capacity=32 << 20)["format"] == "raw"
    target.create_vm(VMID, {"name": "efi", "bios": "ovmf"})
    target.set_config(VMID, {"efidisk0": target.efidisk(VMID, storage=storage, secure=False, index=1)})
    assert target.get_config(VMID)["efidisk0"].split(",")[0] == efivolid
    assert early.volid == volid
    vars_before = pve.cluster.volume_path(efivolid).read_bytes()
    raw = samples / "guest.raw"
    source = DiskEndpoint("raw", str(raw))
    sink = target.disk_sink(VMID, 0, fmt=fmt, storage=storage)
    assert sink.volid == volid and not sink.exists()
    sink.write(source, capacity=raw.stat().st_size)
    sink.verify(source, capacity=raw.stat().st_size)
    assert sink.commit() == volid
    assert target.disk_sink(VMID, 0, fmt=fmt, storage=storage).volid == volid  # a resumed run's sink
    assert pve.cluster.volume_path(efivolid).read_bytes() == vars_before
    target.set_config(VMID, {"scsi0": f"{volid},size=32M"})
    assert pve.refused == [] and pve.unsimulated == []


def test_a_volume_the_vm_uses_is_never_overwritten(pve: PVESim, tmp_path: Path, samples: Path) -> None:
    target = node_target(pve, tmp_path)
    target.create_vm(VMID, {"name": "busy"})
    sink = target.disk_sink(VMID, 0, fmt=None, storage="local-lvm")
    made = target.call("POST", f"nodes/{pve.cluster.node}/storage/local-lvm/content", vmid=VMID,
                       filename=f"vm-{VMID}-disk-0", size="1024", format="raw")
    target.set_config(VMID, {"scsi5": f"{made},size=1M"})  # attached by someone else
    with pytest.raises(TargetError, match=f"vm-{VMID}-disk-0 is already scsi5 of VM {VMID}"):
        sink.write(DiskEndpoint("raw", str(samples / "guest.raw")), capacity=32 << 20)
    assert pve.cluster.volume_path(made).stat().st_size == 1 << 20


def test_a_storage_on_node_cannot_take_is_refused(pve: PVESim, tmp_path: Path) -> None:
    pve.cluster.add_storage("tank", "btrfs", {"images"})
    with pytest.raises(TargetError, match="PVE storage tank is btrfs: on-node=1 writes dir") as caught:
        node_target(pve, tmp_path).disk_sink(VMID, 0, fmt=None, storage="tank")
    assert "drop on-node=1" in str(caught.value.hint)


def test_a_storage_pve_has_not_activated_is_refused(pve: PVESim, tmp_path: Path, samples: Path) -> None:
    """An NFS storage PVE could not mount is an empty folder on the node: nothing is written there."""
    pve.cluster.storages["local"].active = False
    sink = node_target(pve, tmp_path).disk_sink(VMID, 0, fmt=None, storage="local")
    with pytest.raises(TargetError, match="PVE storage local is not active on node pve1"):
        sink.check(DiskEndpoint("raw", str(samples / "guest.raw")), capacity=32 << 20)
    with pytest.raises(TargetError, match="not active"):
        sink.write(DiskEndpoint("raw", str(samples / "guest.raw")), capacity=32 << 20)
    assert not list(pve.cluster.root.rglob(f"*vm-{VMID}-*"))
