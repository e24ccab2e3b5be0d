"""PVE tasks as PVE ends them, against the simulator: a task that ends ``WARNINGS: n`` (pve-common
``PVE::UPID::status_is_error``: not an error) succeeded, in the create, the disk import (attach), the
start and the destroy; its ``WARN:`` lines are shown as v2p warnings and nothing is cleaned up on them.
Disks are imported one config call each, waited for with a timeout that grows with the disk; a rerun
after an import that ran out of time leaves one volume, nothing in ``[pending]`` and no ``unusedN``.
The simulator's ``import-from`` rules refuse what qemu-server's ``check_drive_param``,
``check_storage_access`` and ``update_vm_api`` refuse."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pve_sim.fixture import pve_fixture  # noqa: F401

from conftest import V2P, assert_same_bytes, one_line_error

VMID = 150
TOKEN_USER = "root@pam!v2p"
WARNING = "Machine type 'pc-i440fx-5.1' is deprecated, simulated"


def pve_url(sim: Any) -> str:
    return f"pve://{TOKEN_USER}@{sim.host}/{sim.cluster.node}?storage=local&fingerprint={sim.fingerprint}"


def on_pve(v2p: V2P, sim: Any, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return v2p("--target", pve_url(sim), *args, V2P_PVE_TOKEN=sim.tokens[TOKEN_USER],
               XDG_DATA_HOME=str(tmp_path / "xdg"))


def migrate(v2p: V2P, sim: Any, tmp_path: Path, source: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return on_pve(v2p, sim, tmp_path, "migrate", str(source), "--vmid", str(VMID), "--no-boot-check", *args)


def warned(proc: subprocess.CompletedProcess[str]) -> list[tuple[str, str]]:
    """(stage, message) of each warning the run printed."""
    return re.findall(r"(?m)^\[([\w:]+)\] warning: (.*)$", proc.stdout)


def assert_migrated(sim: Any, samples: Path) -> None:
    config = sim.cluster.vms[VMID].config
    volid = config["scsi0"].split(",")[0]
    assert_same_bytes(samples / "guest.raw", sim.cluster.volume_path(volid))
    assert not [key for key in config if key.startswith("unused")], config
    assert sim.cluster.vms[VMID].pending == {}, sim.cluster.vms[VMID].pending


@pytest.fixture
def source(source_of: Any) -> Path:
    path: Path = source_of("monolithicSparse").descriptor
    return path


@pytest.mark.parametrize(("task", "stage", "what"), [
    ("qmcreate", "create", f"create VM {VMID}"),
    ("qmconfig", "attach", f"import disk scsi0 of VM {VMID}"),  # the disk's import-from, a call of its own
    ("qmstart", "finish", f"start VM {VMID}"),
])
def test_a_task_that_ends_with_warnings_succeeded(task: str, stage: str, what: str, pve: Any, tmp_path: Path,
                                                  samples: Path, source: Path, v2p: V2P) -> None:
    pve.warn_next_task(task, WARNING, "a second warning, simulated")
    done = migrate(v2p, pve, tmp_path, source, "--start")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (stage, f"PVE task {what}: {WARNING}") in warned(done), done.stdout
    assert (stage, f"PVE task {what}: a second warning, simulated") in warned(done), done.stdout
    ended = [t for t in pve.cluster.tasks.by_upid.values() if t.type == task]
    assert [t.exitstatus for t in ended][:1] == ["WARNINGS: 2"]  # the simulator ended it as PVE does
    assert_migrated(pve, samples)
    assert pve.cluster.vms[VMID].status == "running"
    again = migrate(v2p, pve, tmp_path, source, "--start")  # recorded as done, like any finished run
    assert again.returncode == 0 and "already migrated" in again.stdout + again.stderr, again.stdout


def test_a_destroy_that_warns_in_the_cleanup_still_removes_everything(pve: Any, tmp_path: Path, source: Path,
                                                                      v2p: V2P) -> None:
    pve.fail_next_task("qmconfig", "unable to import disk, simulated")
    pve.warn_next_task("qmdestroy", "volume 'local:150/vm-150-disk-9.qcow2' does not exist, simulated")
    failed = migrate(v2p, pve, tmp_path, source)
    line = one_line_error(failed)
    assert "unable to import disk, simulated" in line and f"removed VM {VMID}" in line, line
    assert ("cleanup", f"PVE task destroy VM {VMID}: volume 'local:150/vm-150-disk-9.qcow2' does not exist, "
            "simulated") in warned(failed), failed.stdout
    assert pve.cluster.vms == {} and pve.volumes() == []


def test_vm_rm_whose_destroy_warns_removes_the_vm_and_shows_the_warning(pve: Any, tmp_path: Path, source: Path,
                                                                       v2p: V2P) -> None:
    assert migrate(v2p, pve, tmp_path, source).returncode == 0
    pve.warn_next_task("qmdestroy", WARNING)
    gone = on_pve(v2p, pve, tmp_path, "vm", "rm", str(VMID))
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert f"VM {VMID} removed" in gone.stdout
    assert f"warning: PVE task destroy VM {VMID}: {WARNING}" in gone.stdout, gone.stdout
    assert pve.cluster.vms == {} and pve.volumes() == []
