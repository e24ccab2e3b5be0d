"""The pipeline's resume and clean-up, in-process on the fake target (tests/fakes.py): a run stopped
after each stage (interrupted, or failing there) and run again resumes at the right stage and makes
nothing twice; a failed run removes what it made and only that; ``vm rm`` likewise.

The same behaviour through the command, with real SIGKILLs, is test_resume.py's and
test_crash_windows*.py's (slow tier); here it is every stop point of a two-disk VM in a second.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fakes import FakeGuest, FakeSource, FakeTarget, raw_disk, up
from v2p import api, pipeline, stages
from v2p.errors import ForeignVMError, TargetError, VMIDExistsError
from v2p.events import Event
from v2p.options import MigrationOptions
from v2p.state import MigrationState
from v2p.targets.base import BOOT_FAILED, BootReport

VMID = 100
ALL = [stage.name for stage in stages.stages_for(2)]


def announced(names: list[str]) -> list[str]:
    """Those of ``names`` whose events a run of this Linux VM sends: its drivers stage does nothing (no
    driver dance), is recorded as skipped and not announced (a dry run does not list it either)."""
    return [name for name in names if name != "drivers"]

# The stages an error in (or right after) removes what the migration made (pipeline.MAKING, before attach).
CLEANS_UP = ["create", "convert", "verify", "convert:1", "verify:1"]
# A point inside a stage: after the verify stage's rename, before its record (a kill there resumes in verify).
INNER = ["verify:committed", "verify:1:committed"]


class Stop(Exception):
    """Not a V2PError: the run keeps what it made, as after a kill."""


@pytest.fixture
def fake(tmp_path: Path) -> FakeTarget:
    return FakeTarget(tmp_path / "target")


@pytest.fixture
def source(tmp_path: Path) -> FakeSource:
    return FakeSource([raw_disk(tmp_path / "boot.raw"), raw_disk(tmp_path / "data.raw", 2 << 20, b"data")])


class Run:
    """One run of the pipeline; its events kept."""

    def __init__(self, source: FakeSource, target: FakeTarget, **options: object) -> None:
        self.events: list[Event] = []
        self.pipeline = pipeline.Pipeline(source, VMID, MigrationOptions.of(dict(options)), target,
                                          emit=self.events.append)

    def __call__(self) -> dict[str, object]:
        return self.pipeline.run()

    def of(self, kind: str) -> list[str]:
        return [event.stage for event in self.events if event.kind == kind]


def made_once(target: FakeTarget) -> None:
    """Each thing a migration makes was made once: the VM, each disk's write and boot check."""
    assert target.count("create_vm") == 1
    assert sorted(args[0] for name, args in target.calls if name == "write") == \
        ["local:100/vm-100-disk-0.qcow2", "local:100/vm-100-disk-1.qcow2"]
    assert target.count("boot_check") == 1


def finished(target: FakeTarget) -> None:
    config = target.get_config(VMID)
    assert config["scsi0"].startswith("local:100/vm-100-disk-0.qcow2,")
    assert config["scsi1"].startswith("local:100/vm-100-disk-1.qcow2,")
    assert target.volumes() == ["100/vm-100-disk-0.qcow2", "100/vm-100-disk-1.qcow2"]
    assert target.status(VMID) == "stopped"


def test_a_run_through(fake: FakeTarget, source: FakeSource) -> None:
    run = Run(source, fake)
    result = run()
    assert result["finished"] and run.of("stage-done") == announced(ALL)
    made_once(fake)
    finished(fake)
    again = Run(source, fake)
    assert "nothing_to_do" in again()  # the same request once more: nothing to do, nothing made
    made_once(fake)


@pytest.mark.parametrize("point", ALL[:-1] + INNER)
def test_interrupted_after_each_stage_resumes_there(point: str, fake: FakeTarget, source: FakeSource,
                                                    stop_at: dict[str, BaseException]) -> None:
    stop_at[point] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        Run(source, fake)()
    state = MigrationState(fake.state_dir(), VMID)
    rerun = Run(source, fake)
    if point in ("inspect", "preflight"):  # nothing made yet: no record kept, the rerun starts over
        assert not state.load() and fake.calls == [("check", (f"local:100/vm-100-disk-{i}.qcow2",))
                                                   for i in range(len(fake.calls))]
        rerun()
        assert rerun.of("stage-skip") == []
        made_once(fake)
        return
    assert state.load() and state.data["failed"]["error"] == "interrupted"
    rerun()
    done = ALL.index(point.removesuffix(":committed"))
    inner = point.endswith(":committed")  # the record of that stage was not written: it runs again
    assert rerun.of("stage-skip") == announced(ALL[:done + (0 if inner else 1)])
    assert rerun.of("stage-start") == announced(ALL[done + (0 if inner else 1):])
    made_once(fake)
    finished(fake)


@pytest.mark.parametrize("point", ALL[:-1])
def test_an_error_after_each_stage(point: str, fake: FakeTarget, source: FakeSource,
                                   stop_at: dict[str, BaseException]) -> None:
    """Before attach: everything the run made goes, so the rerun starts clean. From attach on the VM is
    migrated: everything stays and the rerun resumes."""
    stop_at[point] = TargetError("the target broke")
    with pytest.raises(TargetError, match="the target broke") as raised:
        Run(source, fake)()
    state = MigrationState(fake.state_dir(), VMID)
    rerun = Run(source, fake)
    if point in CLEANS_UP:
        assert "removed VM 100" in raised.value.message
        assert not fake.vm_exists(VMID) and fake.volumes() == [] and not state.load()
        rerun()
        assert rerun.of("stage-skip") == [] and rerun.of("stage-done") == announced(ALL)
    elif point in ("inspect", "preflight"):  # nothing made: no record either
        assert fake.calls == [("check", (f"local:100/vm-100-disk-{i}.qcow2",)) for i in range(len(fake.calls))]
        assert not state.load()
        rerun()
        made_once(fake)
    else:
        assert state.load() and state.data["failed"]["stage"] == point
        rerun()
        assert rerun.of("stage-start") == announced(ALL[ALL.index(point) + 1:])
        made_once(fake)
    finished(fake)


def test_a_failed_write_removes_the_vm_and_the_disks_written(fake: FakeTarget, source: FakeSource) -> None:
    fake.fail["write local:100/vm-100-disk-1.qcow2"] = TargetError("no space left")
    with pytest.raises(TargetError, match="no space left; removed VM 100 and its disks"):
        Run(source, fake)()
    assert not fake.vm_exists(VMID) and fake.volumes() == []
    assert not MigrationState(fake.state_dir(), VMID).load()


def test_keep_on_failure_keeps_what_was_made_and_the_rerun_resumes(fake: FakeTarget, source: FakeSource,
                                                                   stop_at: dict[str, BaseException]) -> None:
    stop_at["convert:1"] = TargetError("the target broke")
    with pytest.raises(TargetError, match="kept for a rerun"):
        Run(source, fake, keep_on_failure=True)()
    assert fake.vm_exists(VMID) and len(fake.volumes()) == 2
    rerun = Run(source, fake, keep_on_failure=True)
    rerun()
    assert rerun.of("stage-start") == announced(ALL[ALL.index("verify:1"):])
    made_once(fake)


def test_clean_up_and_rm_touch_only_what_the_run_made(fake: FakeTarget, source: FakeSource, tmp_path: Path,
                                                      stop_at: dict[str, BaseException]) -> None:
    # Someone else's VM with a disk on the same storage, and a VM in the way of the VMID.
    other = FakeSource([raw_disk(tmp_path / "other.raw")], name="other")
    pipeline.Pipeline(other, 101, MigrationOptions(), fake).run()
    fake.create_vm(VMID, {"name": "by-hand", "memory": "64"})
    with pytest.raises(VMIDExistsError):
        Run(source, fake)()
    assert fake.get_config(VMID) == {"name": "by-hand", "memory": "64"} and fake.count("destroy_vm") == 0
    with pytest.raises(ForeignVMError):
        api.remove(VMID, fake)
    assert fake.vm_exists(VMID)
    api.remove(VMID, fake, confirm_name="by-hand")

    stop_at["verify:1"] = TargetError("the target broke")  # a failed run removes its own VM and disks
    with pytest.raises(TargetError):
        Run(source, fake)()
    assert fake.list_vms() == [101] and fake.volumes() == ["101/vm-101-disk-0.qcow2"]

    stop_at["attach"] = KeyboardInterrupt()  # an interrupted one keeps them, until vm rm
    with pytest.raises(KeyboardInterrupt):
        Run(source, fake)()
    assert fake.list_vms() == [100, 101] and len(fake.volumes()) == 3
    api.remove(VMID, fake)
    assert fake.list_vms() == [101] and fake.volumes() == ["101/vm-101-disk-0.qcow2"]
    assert not MigrationState(fake.state_dir(), VMID).load()
    assert MigrationState(fake.state_dir(), 101).load()


def test_a_failed_boot_keeps_the_vm_and_the_rerun_boots_again(fake: FakeTarget, source: FakeSource) -> None:
    fake.guests[VMID] = FakeGuest(boots=[BootReport(BOOT_FAILED, 3.0, signal="kernel panic"), up()])
    with pytest.raises(stages.BootFailed, match="kernel panic"):
        Run(source, fake)()
    assert fake.vm_exists(VMID) and len(fake.volumes()) == 2
    rerun = Run(source, fake)
    rerun()
    assert rerun.of("stage-start") == ["boot", "finish"]
    assert fake.count("create_vm") == 1 and fake.count("write") == 2 and fake.count("boot_check") == 2


def test_copy_with_dd_onto_a_target_that_cannot_is_refused_before_anything_is_made(
        fake: FakeTarget, source: FakeSource) -> None:
    assert not fake.capabilities.copies_with_dd
    run = Run(source, fake, copy_with="dd", fmt="raw")
    with pytest.raises(TargetError, match="--copy-with dd: this target cannot copy disks with dd"):
        run()
    assert run.of("stage-done") == ["inspect"] and fake.list_vms() == [] and fake.count("write") == 0
