"""What a migration onto PVE made and meant to drop does not stay behind: a run killed while PVE
imports a disk (the import goes on without it) and rerun at once leaves one copy of the disk, not a
second one as ``unused0``; an upload whose deletion PVE refuses (HTTP 500) is recorded, retried by the
next run and by ``v2p status``, and reported until it is gone. Against the PVE simulator."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from pve_sim.fixture import TOKEN_USER, on_pve, pve_fixture, pve_url  # noqa: F401

from conftest import V2P, assert_same_bytes

VMID = 150
UPLOAD = f"local:import/v2p-{VMID}-disk-0.qcow2"
DELETE_UPLOAD = r"^/nodes/[^/]+/storage/local/content/local(:|%3A)import"



def env(sim: Any, tmp_path: Path) -> dict[str, str]:
    return {"V2P_PVE_TOKEN": sim.tokens[TOKEN_USER], "XDG_DATA_HOME": str(tmp_path / "xdg")}


def migrate_args(source: Path) -> list[str]:
    return ["migrate", str(source), "--vmid", str(VMID), "--no-boot-check"]



def running(sim: Any, kind: str) -> bool:
    return any(task.type == kind for task in sim.cluster.tasks.active())


def disk_volumes(sim: Any) -> list[str]:
    return [volid for volid in sim.volumes() if f"vm-{VMID}-disk-" in volid]


@pytest.mark.parametrize("rerun", ["while-importing", "after-the-import"])
def test_kill_during_the_attach_import_then_rerun_leaves_one_copy(rerun: str, pve: Any, tmp_path: Path,
                                                                  samples: Path, source_of: Any, v2p: V2P) -> None:
    source = source_of("monolithicSparse").descriptor
    pve.slow_next_task("qmconfig", 4.0)  # the attach's import-from: long enough to be killed in
    first = v2p.popen("--target", pve_url(pve), *migrate_args(source), **env(pve, tmp_path))
    deadline = time.monotonic() + 120
    while not running(pve, "qmconfig"):
        assert first.poll() is None and time.monotonic() < deadline, "the attach's import never started"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert running(pve, "qmconfig")  # PVE goes on importing without v2p
    if rerun == "after-the-import":
        while running(pve, "qmconfig"):
            time.sleep(0.05)
        assert "scsi0" in pve.cluster.vms[VMID].config  # the killed run's import attached the disk

    again = on_pve(v2p, pve, tmp_path, *migrate_args(source))
    assert again.returncode == 0, again.stdout + again.stderr
    config = pve.cluster.vms[VMID].config
    assert not [key for key in config if key.startswith("unused")], config
    waited = "left running by an earlier run" in again.stdout
    assert waited == (rerun == "while-importing"), again.stdout
    assert "the disks were attached by an earlier run" in again.stdout, again.stdout  # no second import
    assert "an earlier run's copy of a disk" not in again.stdout, again.stdout
    volid = config["scsi0"].split(",")[0]
    assert disk_volumes(pve) == [volid], pve.volumes()  # one copy of the disk, no upload left
    assert pve.volumes() == [volid]
    assert_same_bytes(samples / "guest.raw", pve.cluster.volume_path(volid))
    assert pve.refused == [] and pve.unsimulated == []


def test_import_that_reaches_pve_after_the_rerun_looked_leaves_one_copy(pve: Any, tmp_path: Path, samples: Path,
                                                                        source_of: Any, v2p: V2P) -> None:
    """The killed run's attach request reaches PVE only after the rerun waited for the VM's tasks
    (nothing then) and while it attaches: the two imports run one after the other (the config lock),
    and the rerun deletes the copy that became ``unused0``."""
    source = source_of("monolithicSparse").descriptor
    held = pve.hold_next_request("POST", rf"^/nodes/[^/]+/qemu/{VMID}/config$")
    first = v2p.popen("--target", pve_url(pve), *migrate_args(source), **env(pve, tmp_path))
    assert held.arrived.wait(120), "the attach's request never came"
    first.send_signal(signal.SIGKILL)
    first.wait()
    def configs_read() -> int:
        return len([e for e in pve.log if e.method == "GET" and e.path.endswith(f"/qemu/{VMID}/config")])
    read = configs_read()
    again = v2p.popen("--target", pve_url(pve), *migrate_args(source), **env(pve, tmp_path))
    deadline = time.monotonic() + 120
    while configs_read() == read:  # the rerun checks its VM (after it waited for the VM's tasks)
        assert again.poll() is None and time.monotonic() < deadline, again.communicate()
        time.sleep(0.02)
    pve.slow_next_task("qmconfig", 6.0)  # the killed run's import: still going when the rerun attaches
    held.release.set()
    out, err = again.communicate(timeout=180)
    assert again.returncode == 0, out + err
    config = pve.cluster.vms[VMID].config
    assert not [key for key in config if key.startswith("unused")], config
    volid = config["scsi0"].split(",")[0]
    assert disk_volumes(pve) == [volid] and pve.volumes() == [volid], pve.volumes()
    assert "an earlier run's copy of a disk (unused0), removed" in out, out
    assert_same_bytes(samples / "guest.raw", pve.cluster.volume_path(volid))
    assert pve.refused == [] and pve.unsimulated == []


def fail_upload_delete(sim: Any) -> None:
    sim.fail_next_request("DELETE", DELETE_UPLOAD, 500, "storage 'local' is locked, simulated")


def test_upload_pve_refused_to_delete_is_reported_and_retried_by_the_next_run(
        pve: Any, tmp_path: Path, source_of: Any, v2p: V2P) -> None:
    source = source_of("monolithicSparse").descriptor
    fail_upload_delete(pve)
    first = on_pve(v2p, pve, tmp_path, *migrate_args(source))
    assert first.returncode == 0, first.stdout + first.stderr
    assert UPLOAD in pve.volumes()  # PVE said 500: the upload is still there ...
    said = first.stdout + first.stderr
    assert f"{UPLOAD}: could not be deleted" in said and "retried by the next run" in said, said
    assert not list((tmp_path / "xdg").rglob("*.qcow2"))  # the local staging copy went all the same

    fail_upload_delete(pve)  # ... status retries it, PVE refuses again: reported
    status = on_pve(v2p, pve, tmp_path, "status")
    assert status.returncode == 0, status.stderr
    assert f"left on the target: {UPLOAD} (VMID {VMID})" in status.stdout, status.stdout
    assert "storage 'local' is locked" in status.stdout, status.stdout
    assert UPLOAD in pve.volumes()

    again = on_pve(v2p, pve, tmp_path, *migrate_args(source))  # nothing to do, but the leftover is retried
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr
    assert UPLOAD not in pve.volumes(), pve.volumes()
    assert "left on the target" not in on_pve(v2p, pve, tmp_path, "status").stdout
    assert pve.refused == [] and pve.unsimulated == []


def test_upload_pve_refused_to_delete_is_retried_by_status(pve: Any, tmp_path: Path, source_of: Any,
                                                           v2p: V2P) -> None:
    source = source_of("monolithicSparse").descriptor
    fail_upload_delete(pve)
    assert on_pve(v2p, pve, tmp_path, *migrate_args(source)).returncode == 0
    assert UPLOAD in pve.volumes()
    status = on_pve(v2p, pve, tmp_path, "status", str(VMID))
    assert status.returncode == 0, status.stderr
    assert UPLOAD not in pve.volumes(), pve.volumes()
    assert "left on the target" not in status.stdout, status.stdout
    assert pve.refused == [] and pve.unsimulated == []


def test_upload_vm_rm_could_not_delete_outlives_the_vm_until_retried(pve: Any, tmp_path: Path, source_of: Any,
                                                                     v2p: V2P) -> None:
    """`vm rm` deletes the VM's uploads too: one PVE refuses to delete is recorded, and another
    migration on the target (another VMID) retries it."""
    source = source_of("monolithicSparse").descriptor
    pve.fail_next_task("qmconfig", "unable to import disk, simulated")  # kept: the upload stays for the rerun
    assert on_pve(v2p, pve, tmp_path, *migrate_args(source), "--keep-on-failure").returncode != 0
    assert UPLOAD in pve.volumes()
    fail_upload_delete(pve)
    removed = on_pve(v2p, pve, tmp_path, "vm", "rm", str(VMID))
    assert removed.returncode != 0 and "Traceback" not in removed.stderr, removed.stderr
    assert f"{UPLOAD}: could not be deleted" in removed.stderr, removed.stderr
    assert VMID not in pve.cluster.vms and UPLOAD in pve.volumes()
    fail_upload_delete(pve)
    assert f"left on the target: {UPLOAD} (VMID {VMID})" in on_pve(v2p, pve, tmp_path, "status").stdout
    other = on_pve(v2p, pve, tmp_path, "migrate", str(source), "--vmid", "151", "--no-boot-check")
    assert other.returncode == 0, other.stdout + other.stderr
    assert UPLOAD not in pve.volumes(), pve.volumes()


def test_a_leftover_of_a_vmid_another_run_holds_is_left_to_it(tmp_path: Path) -> None:
    from v2p.errors import TargetError
    from v2p.state import Leftovers, VmidLock

    folder = tmp_path / "state"
    leftovers = Leftovers(folder)
    leftovers.add("local:import/v2p-150-disk-0.qcow2", 150, "500 simulated")
    leftovers.add("local:import/v2p-151-disk-0.qcow2", 151, "500 simulated")
    deleted: list[str] = []
    with VmidLock(folder, 150):  # a run of VMID 150 (it may have uploaded that name again)
        left = leftovers.retry(deleted.append)
    assert deleted == ["local:import/v2p-151-disk-0.qcow2"] and list(left) == ["local:import/v2p-150-disk-0.qcow2"]

    def refuse(volid: str) -> None:
        raise TargetError("PVE DELETE: 500 still locked")
    left = leftovers.retry(refuse)
    assert left["local:import/v2p-150-disk-0.qcow2"]["error"] == "PVE DELETE: 500 still locked"
    assert leftovers.retry(deleted.append, holding=150) == {}
    assert not leftovers.path.exists()
    os.mkfifo(leftovers.path)  # not what v2p writes: no hang, nothing to retry
    assert leftovers.retry(deleted.append) == {}
