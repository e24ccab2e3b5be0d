"""`v2p plan status`: each VM of a plan with its VMID and where it stands, read from the migrations'
state files without taking any lock (so it works while a plan runs), as lines or --json."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pve_sim.fixture import pve_fixture  # noqa: F401

from conftest import V2P, snapshot
from test_resume import wait_for
from v2p import Plan, api
from v2p.errors import V2PError

PLAN = """\
defaults:
  boot_check: false
vms:
  - source: disks/web.vmdk
    vmid: 150
    name: web
  - source: disks/db.vmdk
    vmid: auto
    name: db
  - source: disks/blank.vmdk
    vmid: 152
    name: blank
    boot_check: true
    boot_timeout: 20
"""


@pytest.fixture
def plan(tmp_path: Path, samples: Path) -> Path:
    """A plan of three loose disks: two copies of the sample guest and a blank disk nothing boots from."""
    disks = tmp_path / "plan" / "disks"
    disks.mkdir(parents=True)
    for name in ("web", "db"):
        shutil.copyfile(samples / "monolithicSparse" / "monolithicSparse.vmdk", disks / f"{name}.vmdk")
    (tmp_path / "blank.raw").write_bytes(b"")
    with open(tmp_path / "blank.raw", "r+b") as handle:
        handle.truncate(4 << 20)
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", str(tmp_path / "blank.raw"), str(disks / "blank.vmdk")],
                   check=True)
    path = tmp_path / "plan" / "plan.yaml"
    path.write_text(PLAN)
    return path


def status(v2p: V2P, plan: Path, *args: str, **env: str) -> tuple[int, str]:
    proc = v2p("plan", "status", str(plan), *args, **env)
    assert "Traceback" not in proc.stderr and proc.stderr == "", proc.stderr
    return proc.returncode, proc.stdout


def rows(v2p: V2P, plan: Path, **env: str) -> dict[str, dict[str, Any]]:
    code, out = status(v2p, plan, "--json", **env)
    assert code == 0
    return {row["name"]: row for row in json.loads(out)}


def migrate(v2p: V2P, plan: Path, name: str) -> dict[str, Any]:
    """Migrate one VM of the plan through the library, as the plan says (plan run's children do the same)."""
    vm = next(vm for vm in Plan.load(plan, local_dir=str(v2p.target), accel="tcg").vms if vm.name == name)
    target = api.make_target(vm.target, env=os.environ)  # a plan's URL is the operator's own, as in plan run
    return api.migrate(vm.source, vm.vmid, target=target, **vm.options)


@pytest.mark.usefixtures("boots")  # the blank disk's boot check, in this process
def test_status_before_and_after_migrations(plan, v2p: V2P):
    code, out = status(v2p, plan)
    assert code == 0
    assert out.splitlines() == [
        "VM          VMID  STATE        STAGE / DETAIL",
        "web          150  not started",
        "db          auto  not started  vmid auto: no migration of this source yet",
        "blank        152  not started",
    ]
    assert not v2p.target.exists()  # reading touches nothing

    migrate(v2p, plan, "web")
    before = snapshot(v2p.target)
    found = rows(v2p, plan)
    assert snapshot(v2p.target) == before
    assert (found["web"]["vmid"], found["web"]["state"], found["web"]["stage"]) == (150, "finished", "finish")
    assert (found["db"]["vmid"], found["db"]["state"]) == (None, "not started")
    code, out = status(v2p, plan)
    assert out.splitlines()[1].startswith("web          150  finished     [finish], at ")

    # vmid auto: the VMID its migration took is found again from the source.
    result = migrate(v2p, plan, "db")
    found = rows(v2p, plan)
    assert found["db"]["vmid"] == result["vmid"] == 100  # the lowest free one
    assert found["db"]["state"] == "finished"

    # A failure that keeps its record (the boot check) shows its stage and error.
    with pytest.raises(V2PError):
        migrate(v2p, plan, "blank")
    found = rows(v2p, plan)
    # The failed boot check is recorded (what it saw), so it is the last stage; the record says how it ended.
    assert (found["blank"]["state"], found["blank"]["stage"], found["blank"]["boot"]) == ("failed", "boot", "failed")
    assert found["blank"]["detail"].startswith("in boot: VM 152 did not boot: the firmware found nothing to boot")


def test_status_while_a_migration_runs_takes_no_lock(plan, v2p: V2P):
    # The plan's first VM, held right after its convert stage with its VMID lock taken.
    running = v2p.popen("migrate", str(plan.parent / "disks" / "web.vmdk"), "--vmid", "150", "--no-boot-check",
                        V2P_TEST_HOLD_AFTER="convert")
    try:
        wait_for(running.stderr, "holding after convert", running)
        before = snapshot(v2p.target)
        found = rows(v2p, plan)
        assert (found["web"]["state"], found["web"]["stage"]) == ("running", "convert")
        assert found["web"]["detail"] == "4 stage(s) done, last convert"
        assert snapshot(v2p.target) == before
        # Had status taken the lock for a moment, this would have been refused while it did; it holds still.
        assert running.poll() is None
    finally:
        running.send_signal(signal.SIGKILL)
        running.wait()
    found = rows(v2p, plan)
    assert (found["web"]["state"], found["web"]["stage"]) == ("unfinished", "convert")
    assert "rerun the plan to resume" in found["web"]["detail"]


def test_a_damaged_record_is_reported_not_raised(plan, v2p: V2P):
    (v2p.target / "migrations").mkdir(parents=True)
    (v2p.target / "migrations" / "150.json").write_text("{ not json")
    code, out = status(v2p, plan)
    assert code == 5
    line = out.splitlines()[1]
    assert line.startswith("web          150  unreadable   ") and "state file is not valid JSON" in line
    assert out.splitlines()[2].startswith("db          auto  not started")


def test_a_vmid_holding_another_sources_migration_says_so(plan, v2p: V2P, samples):
    other = plan.parent / "other.vmdk"
    shutil.copyfile(samples / "monolithicSparse" / "monolithicSparse.vmdk", other)
    proc = v2p("migrate", str(other), "--vmid", "150", "--no-boot-check")
    assert proc.returncode == 0, proc.stderr
    found = rows(v2p, plan)
    assert found["web"]["state"] == "other"
    assert f"holds the migration of {other}" in found["web"]["detail"]


def test_status_while_plan_run_goes(plan, v2p: V2P):
    """`plan run` at its default parallelism (2), each child held after its convert stage: status shows
    the two running at convert and the third waiting, and the run goes on undisturbed."""
    run = v2p.popen("plan", "run", str(plan), V2P_TEST_HOLD_AFTER="convert")
    try:
        deadline = time.monotonic() + 90
        while True:
            found = rows(v2p, plan)
            states = {name: (row["state"], row["stage"]) for name, row in found.items()}
            if sorted(states.values()).count(("running", "convert")) == 2 or time.monotonic() > deadline:
                break
            assert run.poll() is None, run.communicate()
            time.sleep(0.3)
        assert sorted(states.values()) == [("not started", None), ("running", "convert"), ("running", "convert")]
        assert found["db"]["vmid"] in (None, 100)  # auto: found once its record exists
        assert run.poll() is None
    finally:
        run.send_signal(signal.SIGINT)  # stops the children resumably
        out, err = run.communicate(timeout=60)
    assert run.returncode == 130, out + err
    found = rows(v2p, plan)
    assert sorted(row["state"] for row in found.values()) == ["interrupted", "interrupted", "not started"]
    assert {row["detail"] for row in found.values() if row["state"] == "interrupted"} == {
        "in convert; rerun the plan to resume"}


def test_status_of_a_plan_on_pve(plan, tmp_path, pve, monkeypatch, v2p: V2P):
    url = f"pve://root@pam!v2p@{pve.host}/{pve.cluster.node}?storage=local&fingerprint={pve.fingerprint}"
    plan.write_text(PLAN.replace("defaults:\n", f"defaults:\n  target: {url}\n"))
    env = {"V2P_PVE_TOKEN": pve.tokens["root@pam!v2p"], "XDG_DATA_HOME": str(tmp_path / "xdg")}
    found = rows(v2p, plan, **env)
    assert [(row["vmid"], row["state"]) for row in found.values()] == [(150, "not started"), (None, "not started"),
                                                                       (152, "not started")]
    for key, value in env.items():  # the library reads the secret and the state folder from the environment
        monkeypatch.setenv(key, value)
    migrate(v2p, plan, "db")
    monkeypatch.undo()
    found = rows(v2p, plan, **env)
    assert (found["db"]["vmid"], found["db"]["state"]) == (100, "finished")
    assert pve.cluster.vms.keys() == {100}
    assert pve.refused == [] and pve.unsimulated == []
    # The state files are v2p's, on this machine: status says where a VM stands without the node's help,
    # but a target it cannot make (no secret) is said per VM, not raised.
    code, out = status(v2p, plan, XDG_DATA_HOME=str(tmp_path / "xdg"), XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    assert code == 0
    assert all(" unknown " in line and "V2P_PVE_TOKEN" in line for line in out.splitlines()[1:]), out
