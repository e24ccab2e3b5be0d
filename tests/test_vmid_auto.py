"""`--vmid auto` on the local target: the lowest VMID with no VM and no migration record, the same
one again when the same command is rerun (resumed, or nothing to do), and the next one when the
chosen VMID is taken by the time the VM is created."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from conftest import V2P, assert_same_bytes
from test_resume import wait_for
from v2p import api
from v2p.errors import VMIDExistsError
from v2p.events import Event
from v2p.targets.local import LocalTarget

ARGS = ["--vmid", "auto", "--no-boot-check"]


def foreign_vm(v2p_target: Path, vmid: int) -> Path:
    conf = v2p_target / "qemu-server" / f"{vmid}.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("name: someone-else\nmemory: 1024\n")
    return conf


def kill_after(v2p: V2P, descriptor: Path, stage: str, *args: str) -> None:
    proc = v2p.popen("migrate", str(descriptor), *args, V2P_TEST_HOLD_AFTER=stage)
    wait_for(proc.stderr, f"holding after {stage}", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_auto_skips_vms_and_migration_records(samples: Path, source_of: Any, v2p: V2P) -> None:
    conf = foreign_vm(v2p.target, 100)
    other = source_of("monolithicFlat")
    kill_after(v2p, other.descriptor, "preflight", "--vmid", "101", "--no-boot-check")  # a record, no VM
    assert (v2p.target / "migrations" / "101.json").exists() and not (v2p.target / "qemu-server" / "101.conf").exists()
    src = source_of("monolithicSparse")
    proc = v2p("migrate", str(src.descriptor), *ARGS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[vmid] VMID 102: the next free one on the local target" in proc.stdout
    assert proc.stdout.splitlines()[-1] == f"VM 102 migrated from {src.descriptor}; boot not checked"
    assert_same_bytes(samples / "guest.raw", v2p.disk(102))
    assert conf.read_text() == "name: someone-else\nmemory: 1024\n"
    again = v2p("migrate", str(src.descriptor), *ARGS)  # the same command: the same VM, nothing to do
    assert again.returncode == 0, again.stderr
    assert "VMID 102: the earlier migration of" in again.stdout and "nothing to do" in again.stdout
    assert sorted(p.name for p in (v2p.target / "qemu-server").iterdir()) == ["100.conf", "102.conf"]


def test_auto_resumes_its_unfinished_migration(samples: Path, source_of: Any, v2p: V2P) -> None:
    src = source_of("monolithicSparse")
    kill_after(v2p, src.descriptor, "convert", *ARGS)
    proc = v2p("migrate", str(src.descriptor), *ARGS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"VMID 100: the earlier migration of {src.descriptor}" in proc.stdout
    assert "[convert] already done" in proc.stdout
    assert_same_bytes(samples / "guest.raw", v2p.disk(100))
    assert sorted(p.name for p in (v2p.target / "qemu-server").iterdir()) == ["100.conf"]


def test_auto_dry_run_names_the_vmid_and_makes_nothing(source_of: Any, v2p: V2P) -> None:
    foreign_vm(v2p.target, 100)
    src = source_of("monolithicSparse")
    proc = v2p("migrate", str(src.descriptor), *ARGS, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert f"would migrate {src.descriptor} to VMID 101 on the local target" in proc.stdout
    assert not (v2p.target / "migrations" / "101.json").exists()


class RacedTarget(LocalTarget):
    """The local target, where another admin creates each VMID v2p is told is free, right after
    (the window between asking for a free VMID and creating the VM), ``races`` times."""

    def __init__(self, directory: Path, races: int) -> None:
        super().__init__(directory, accel="tcg")
        self.races = races

    def next_vmid(self, above: int = 0) -> int:
        vmid = super().next_vmid(above)
        if self.races:
            self.races -= 1
            foreign_vm(self.directory, vmid)
        return vmid


def test_auto_retries_a_vmid_taken_after_it_was_chosen(tmp_path: Path, source_of: Any) -> None:
    events: list[Event] = []
    target = RacedTarget(tmp_path / "target", races=2)
    src = source_of("monolithicSparse")
    result = api.migrate(src.descriptor, "auto", target=target, on_event=events.append, boot_check=False)
    assert result["vmid"] == 102 and result["finished"]
    said = [event.message for event in events if event.stage == "vmid"]
    assert said[0] == "VMID 100: the next free one on the local target"
    assert said[1].startswith("VMID 100 is taken now (VMID 100 already exists") and said[1].endswith("trying VMID 101")
    assert said[2].endswith("trying VMID 102")
    for vmid in (100, 101):  # the other admin's VMs are untouched
        assert (tmp_path / "target" / "qemu-server" / f"{vmid}.conf").read_text() == \
            "name: someone-else\nmemory: 1024\n"
        assert not (tmp_path / "target" / "migrations" / f"{vmid}.json").exists()


def test_auto_gives_up_after_a_few_taken_vmids(tmp_path: Path, source_of: Any) -> None:
    target = RacedTarget(tmp_path / "target", races=api.AUTO_TRIES)
    with pytest.raises(VMIDExistsError, match=f"VMID {100 + api.AUTO_TRIES - 1} already exists"):
        api.migrate(source_of("monolithicSparse").descriptor, "auto", target=target, boot_check=False)
    assert not list((tmp_path / "target" / "migrations").glob("*.json"))
