"""Failures of a migration onto PVE (the simulator, every request schema-checked): each ends in one
`v2p: error:` line, removes what the migration made (VM, volumes, uploaded import file, staging file)
unless --keep-on-failure, never touches a guest it did not make, and a rerun without the fault succeeds
(with --keep-on-failure it resumes, running fewer stages)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pve_sim.fixture import pve_fixture  # noqa: F401

from conftest import V2P, assert_same_bytes, one_line_error

VMID = "150"
CREATE = r"^/nodes/[^/]+/qemu$"
LIMITED = "v2p@pve!limited"
# What the least-privileged token of docs/proxmox.md holds (see the schema's checks of each endpoint v2p calls).
ALL_NEEDED = {"VM.Allocate", "VM.Audit", "VM.Config.Disk", "VM.Config.CDROM", "VM.Config.CPU", "VM.Config.Memory",
              "VM.Config.Network", "VM.Config.HWType", "VM.Config.Options", "VM.PowerMgmt", "Datastore.Audit",
              "Datastore.Allocate", "Datastore.AllocateSpace", "Datastore.AllocateTemplate", "SDN.Use",
              "Sys.Audit"}  # Sys.Audit: GET /nodes/{node}/status, the node's room for the upload spool


def pve_url(sim: Any, user: str = "root@pam!v2p") -> str:
    return f"pve://{user}@{sim.host}/{sim.cluster.node}?storage=local&fingerprint={sim.fingerprint}"


def migrate(v2p: V2P, sim: Any, tmp_path: Path, source: Path, *args: str, vmid: str = VMID,
            user: str = "root@pam!v2p") -> subprocess.CompletedProcess[str]:
    return v2p("--target", pve_url(sim, user), "migrate", str(source), "--vmid", vmid, "--no-boot-check", *args,
               V2P_PVE_TOKEN=sim.tokens[user], XDG_DATA_HOME=str(tmp_path / "xdg"))


def state_dir(sim: Any, tmp_path: Path) -> Path:
    return tmp_path / "xdg" / "v2p" / "pve" / f"127.0.0.1-{sim.cluster.node}"


def assert_nothing_left(sim: Any, tmp_path: Path, vmid: str = VMID) -> None:
    assert sim.cluster.vms == {}
    assert sim.volumes() == []  # no disk, no import upload
    folder = state_dir(sim, tmp_path)
    assert not (folder / f"{vmid}.json").exists()
    assert not (folder / "staging").exists() or list((folder / "staging").iterdir()) == []
    assert not (folder / f"{vmid}.work").exists()


def assert_schema_clean(sim: Any) -> None:
    assert sim.refused == [] and sim.unsimulated == []


def assert_migrated(sim: Any, samples: Path, vmid: int = int(VMID)) -> None:
    volid = sim.cluster.vms[vmid].config["scsi0"].split(",")[0]
    assert_same_bytes(samples / "guest.raw", sim.cluster.volume_path(volid))


def ran(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The stages a run ran (not skipped), in order."""
    return re.findall(r"(?m)^\[([\w:]+)\] done in ", proc.stdout)


@pytest.fixture
def source(source_of: Any) -> Path:
    path: Path = source_of("monolithicSparse").descriptor
    return path


def test_failed_import_task_removes_the_vm_and_the_upload(pve: Any, tmp_path: Path, samples: Path, source: Path,
                                                          v2p: V2P) -> None:
    pve.fail_next_task("qmconfig", "unable to import disk, simulated")
    line = one_line_error(migrate(v2p, pve, tmp_path, source))
    assert "unable to import disk, simulated" in line and f"removed VM {VMID} and its disks" in line, line
    assert_nothing_left(pve, tmp_path)
    again = migrate(v2p, pve, tmp_path, source)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[create] already done" not in again.stdout  # a clean start
    assert_migrated(pve, samples)
    assert_schema_clean(pve)


def test_failed_import_task_kept_on_request_then_resumed(pve: Any, tmp_path: Path, samples: Path, source: Path,
                                                         v2p: V2P) -> None:
    pve.fail_next_task("qmconfig", "unable to import disk, simulated")
    line = one_line_error(migrate(v2p, pve, tmp_path, source, "--keep-on-failure"))
    assert f"kept for a rerun, which resumes: VM {VMID} and its disks (--keep-on-failure)" in line, line
    assert int(VMID) in pve.cluster.vms
    assert f"local:import/v2p-{VMID}-disk-0.qcow2" in pve.volumes()
    status = v2p("--target", pve_url(pve), "status", VMID, V2P_PVE_TOKEN=pve.tokens["root@pam!v2p"],
                 XDG_DATA_HOME=str(tmp_path / "xdg"))
    assert "stopped in attach: " in status.stdout, status.stdout + status.stderr
    again = migrate(v2p, pve, tmp_path, source)
    assert again.returncode == 0, again.stdout + again.stderr
    for stage in ("create", "convert", "verify"):
        assert f"[{stage}] already done" in again.stdout, again.stdout
    assert ran(again) == ["attach", "finish"], again.stdout  # a Linux VM, no boot check: nothing else to announce
    assert_migrated(pve, samples)
    assert_schema_clean(pve)


def test_500_on_create_leaves_nothing_and_a_rerun_succeeds(pve: Any, tmp_path: Path, samples: Path, source: Path,
                                                           v2p: V2P) -> None:
    pve.fail_next_request("POST", CREATE, 500, "got lock timeout - aborting command")
    line = one_line_error(migrate(v2p, pve, tmp_path, source))
    assert "500" in line and "got lock timeout" in line, line
    assert_nothing_left(pve, tmp_path)
    again = migrate(v2p, pve, tmp_path, source)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_migrated(pve, samples)
    assert_schema_clean(pve)


def test_connection_dropped_mid_upload_removes_everything(pve: Any, tmp_path: Path, samples: Path, source: Path,
                                                          v2p: V2P) -> None:
    pve.drop_next_request("POST", "/upload$")
    line = one_line_error(migrate(v2p, pve, tmp_path, source))
    assert "failed or broke off" in line and f"removed VM {VMID} and its disks" in line, line
    assert pve.tokens["root@pam!v2p"] not in line
    assert_nothing_left(pve, tmp_path)
    again = migrate(v2p, pve, tmp_path, source)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_migrated(pve, samples)
    assert_schema_clean(pve)


def test_connection_dropped_mid_upload_kept_then_resumed(pve: Any, tmp_path: Path, samples: Path, source: Path,
                                                         v2p: V2P) -> None:
    pve.drop_next_request("POST", "/upload$")
    line = one_line_error(migrate(v2p, pve, tmp_path, source, "--keep-on-failure"))
    assert "kept for a rerun, which resumes" in line, line
    assert list((state_dir(pve, tmp_path) / "staging").glob("v2p-150-disk-0.qcow2"))  # the converted disk
    again = migrate(v2p, pve, tmp_path, source)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[convert] already done" in again.stdout and ran(again)[0] == "verify", again.stdout
    assert_migrated(pve, samples)
    assert_schema_clean(pve)


def test_cleanup_that_fails_too_says_so_and_the_rerun_resumes(pve: Any, tmp_path: Path, samples: Path,
                                                             source: Path, v2p: V2P) -> None:
    pve.drop_next_request("POST", "/upload$")
    pve.fail_next_request("DELETE", rf"^/nodes/[^/]+/qemu/{VMID}$", 500, "cluster not ready - no quorum?")
    proc = migrate(v2p, pve, tmp_path, source)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    first, second, log = proc.stderr.strip().splitlines()  # the error, its note, where the run's log is
    assert log.startswith("v2p: the log of this run: "), log
    assert first.startswith("v2p: error: ") and "failed or broke off" in first and "kept for a rerun" in first
    assert second.startswith("v2p: removing it failed: ") and "no quorum" in second, second
    assert f"v2p vm rm {VMID}" in second
    assert int(VMID) in pve.cluster.vms and (state_dir(pve, tmp_path) / f"{VMID}.json").exists()
    again = migrate(v2p, pve, tmp_path, source)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[convert] already done" in again.stdout
    assert_migrated(pve, samples)
    assert_schema_clean(pve)


@pytest.mark.parametrize("guest", ["qemu", "lxc"])
def test_vmid_taken_by_a_guest_v2p_did_not_make(guest: str, pve: Any, tmp_path: Path, source: Path,
                                                v2p: V2P) -> None:
    if guest == "lxc":
        pve.cluster.containers.add(int(VMID))
    else:
        from pve_sim.cluster import VM

        pve.cluster.vms[int(VMID)] = VM(int(VMID), {"name": "someone-else", "memory": "1024"})
    line = one_line_error(migrate(v2p, pve, tmp_path, source))
    assert f"VMID {VMID} already exists" in line, line
    assert "removed" not in line
    if guest == "qemu":
        assert pve.cluster.vms[int(VMID)].config == {"name": "someone-else", "memory": "1024"}
    else:
        assert pve.cluster.containers == {int(VMID)} and pve.cluster.vms == {}
    assert pve.volumes() == []
    assert not (state_dir(pve, tmp_path) / f"{VMID}.json").exists()
    assert_schema_clean(pve)


def test_vmid_taken_between_the_look_and_the_create(pve: Any, tmp_path: Path, source: Path, v2p: V2P) -> None:
    pve.fail_next_request("POST", CREATE, 500, f"VM {VMID} already exists on node '{pve.cluster.node}'")
    line = one_line_error(migrate(v2p, pve, tmp_path, source))
    assert f"VM {VMID} already exists" in line and "removed" not in line, line
    assert_nothing_left(pve, tmp_path)


def test_vmid_auto_asks_nextid_and_retries_when_taken(pve: Any, tmp_path: Path, samples: Path, source: Path,
                                                      v2p: V2P) -> None:
    pve.cluster.containers.add(100)  # one ID space: nextid skips containers too
    pve.fail_next_request("POST", CREATE, 500, f"VM 101 already exists on node '{pve.cluster.node}'")
    proc = migrate(v2p, pve, tmp_path, source, vmid="auto")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "VMID 101: the next free one on the proxmox target" in proc.stdout
    assert "VMID 101 is taken now" in proc.stdout and "trying VMID 102" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("VM 102 migrated from ")
    # its log is named after the VMID it ended up with (it was kept when VMID 101's create began)
    [log_line] = [line for line in proc.stdout.splitlines() if line.startswith("v2p: the log of this run: ")]
    log = Path(log_line.removeprefix("v2p: the log of this run: "))
    assert log.name.startswith("102-") and "trying VMID 102" in log.read_text(), log
    assert [path.name for path in log.parent.iterdir()] == [log.name]
    assert sorted(pve.cluster.vms) == [102] and pve.cluster.containers == {100}
    assert any(entry.path == "/cluster/nextid" for entry in pve.log)
    assert_migrated(pve, samples, 102)
    again = migrate(v2p, pve, tmp_path, source, vmid="auto")  # the same command: nothing to do
    assert again.returncode == 0 and "VM 102 was already migrated" in again.stdout, again.stdout + again.stderr
    assert sorted(pve.cluster.vms) == [102]
    assert_schema_clean(pve)


def test_upids_and_volids_are_recorded(pve: Any, tmp_path: Path, source: Path, v2p: V2P) -> None:
    proc = migrate(v2p, pve, tmp_path, source)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = json.loads((state_dir(pve, tmp_path) / f"{VMID}.json").read_text())["stages"]
    create, attach, verify = stages["create"]["result"], stages["attach"]["result"], stages["verify"]["result"]
    assert [upid.split(":")[5] for upid in create["upids"]] == ["qmcreate"] and create["volids"] == []
    assert [upid.split(":")[5] for upid in verify["upids"]] == ["imgcopy"]
    # the disk's import-from in a call of its own, then the boot order
    assert [upid.split(":")[5] for upid in attach["upids"]] == ["qmconfig", "qmconfig"]
    assert attach["volids"] == [pve.cluster.vms[int(VMID)].config["scsi0"].split(",")[0]]
    assert "upids" not in stages["inspect"]["result"]


def test_token_without_the_upload_privilege(pve: Any, tmp_path: Path, source: Path, v2p: V2P) -> None:
    pve.tokens[LIMITED] = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    pve.privileges[LIMITED] = ALL_NEEDED - {"Datastore.AllocateTemplate"}
    line = one_line_error(migrate(v2p, pve, tmp_path, source, user=LIMITED))
    # refused by the privilege check before anything is made (test_pve_privileges.py has every case)
    assert "lacks privileges" in line and "/storage/local: Datastore.AllocateTemplate" in line, line
    assert not any(entry.method != "GET" for entry in pve.log)
    assert_nothing_left(pve, tmp_path)
    pve.privileges[LIMITED] = ALL_NEEDED  # the admin grants it: the same command now works
    again = migrate(v2p, pve, tmp_path, source, user=LIMITED)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_schema_clean(pve)


def test_token_without_rights_makes_nothing(pve: Any, tmp_path: Path, source: Path, v2p: V2P) -> None:
    pve.tokens[LIMITED] = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    pve.privileges[LIMITED] = set()
    line = one_line_error(migrate(v2p, pve, tmp_path, source, user=LIMITED))
    assert f"/vms/{VMID}: VM.Allocate" in line and "lacks privileges" in line, line
    assert_nothing_left(pve, tmp_path)
    assert_schema_clean(pve)


def test_token_that_cannot_delete_the_upload_says_what_it_kept(pve: Any, tmp_path: Path, samples: Path,
                                                                source: Path, v2p: V2P) -> None:
    pve.tokens[LIMITED] = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    pve.privileges[LIMITED] = ALL_NEEDED
    pve.fail_next_task("qmconfig", "unable to import disk, simulated")
    # PVE refuses the upload's deletion (the privilege taken away after the check, as an admin may)
    pve.fail_next_request("DELETE", r"/content/.*import", 403,
                          "Permission check failed (/storage/local, Datastore.Allocate)")
    proc = migrate(v2p, pve, tmp_path, source, user=LIMITED)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    first, second, log = proc.stderr.strip().splitlines()  # the error, its note, where the run's log is
    assert log.startswith("v2p: the log of this run: "), log
    assert "unable to import disk" in first and f"removed VM {VMID}, kept for a rerun: its disks" in first, first
    assert second.startswith("v2p: removing it failed: ") and \
        "403 Permission check failed (/storage/local, Datastore.Allocate)" in second, second
    assert pve.cluster.vms == {}  # the VM went (VM.Allocate), its upload could not
    assert pve.volumes() == [f"local:import/v2p-{VMID}-disk-0.qcow2"]
    pve.privileges[LIMITED] = ALL_NEEDED
    again = migrate(v2p, pve, tmp_path, source, user=LIMITED)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_migrated(pve, samples)
    assert_schema_clean(pve)
