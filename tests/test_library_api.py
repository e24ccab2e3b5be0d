"""The library as a hosting panel uses it: migrations in threads, events per VM in order with
VMID/disk/stage/bytes, status snapshots, cancel() that stops qemu-img at once and resumes later,
the VMID lock between threads, a rerun that does nothing, no output, DEBUG logs of every
external command, errors whose hint is apart from the message, targets from a URL or a dict."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pve_sim.fixture import pve_fixture  # noqa: F401
from test_boot import qemu_pids
from test_whole_vm import make_vm

import v2p
from conftest import ROOT, SAMPLES, assert_same_bytes, guest_report
from test_resume import qemu_img_writing
from v2p import Event, Migration, local_target, migrate
from v2p.errors import Cancelled, LockedError, SourceError

NETWORKS = {"LAN": "vmbr0", "DMZ": "vmbr1"}
SLOW = 64  # KiB/s: qemu-img takes ~15 s over the sample's ~1 MiB of data, long enough to act mid-copy


class Recorder:
    """A handler shared by migrations in several threads (list.append is atomic)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, Event]] = []

    def __call__(self, event: Event) -> None:
        self.events.append((time.monotonic(), threading.current_thread().name, event))

    def of(self, vmid: int) -> list[Event]:
        return [event for _at, _thread, event in self.events if event.vmid == vmid]

    def wait_for(self, test: Any, timeout: float = 60) -> Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _at, _thread, event in list(self.events):
                if test(event):
                    return event
            time.sleep(0.02)
        raise AssertionError(f"no such event; got {[e.kind + ' ' + e.stage for _a, _t, e in self.events]}")


def in_thread(work: Any) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            outcome["result"] = work()
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=body)
    thread.start()
    return thread, outcome


def stage_sequence(events: list[Event]) -> list[tuple[str, str, int | None]]:
    return [(e.kind, e.stage, e.disk) for e in events if e.kind in ("stage-start", "stage-done", "stage-skip")]


@pytest.mark.usefixtures("boots")
def test_events_of_a_three_disk_vm_arrive_in_order_with_vmid_disk_stage_and_bytes(tmp_path, samples, manifest):
    vmx, raws = make_vm(tmp_path / "web01", samples)
    target = local_target(tmp_path / "target", accel="tcg")
    recorder = Recorder()
    result = migrate(vmx, 120, target=target, networks=NETWORKS, on_event=recorder)
    assert result["finished"] is True
    events = [event for _at, _thread, event in recorder.events]
    assert all(event.vmid == 120 for event in events)
    expected = []
    for name, disk in [("inspect", None), ("preflight", None), ("create", None), ("convert", 0), ("verify", 0),
                       ("convert:1", 1), ("verify:1", 1), ("convert:2", 2), ("verify:2", 2), ("attach", None),
                       ("boot", None), ("finish", None)]:  # no drivers stage: a Linux VM has no driver dance
        expected += [("stage-start", name, disk), ("stage-done", name, disk)]
    assert stage_sequence(events) == expected
    # Progress: the copy inside its disk's convert stage, the compare inside its verify stage, each with
    # bytes growing to that disk's capacity.
    capacities = {index: disk["capacity"] for index, disk in enumerate(result["stages"]["inspect"]["result"]["disks"])}
    current: str | None = None
    last_done: dict[tuple[int, str | None], int] = {}
    for event in events:
        if event.kind == "stage-start":
            current = event.stage
        elif event.kind == "progress":
            assert event.disk is not None and event.done is not None and event.step in (None, "compare")
            kind = "convert" if event.step is None else "verify"
            assert current == (kind if event.disk == 0 else f"{kind}:{event.disk}")
            assert event.total == capacities[event.disk]
            assert event.done >= last_done.get((event.disk, event.step), 0)
            last_done[event.disk, event.step] = event.done
    assert last_done == {(disk, step): size for disk, size in capacities.items() for step in (None, "compare")}
    # The preflight rules' findings are events of their own, named by rule id.
    findings = [event for event in events if event.kind == "finding"]
    assert findings and all(event.stage == "preflight" and event.data["rule"] in event.message
                            and event.data["severity"] in ("warning", "info") for event in findings)
    for index, name in enumerate(("esxi.vmdk", "data.vmdk", "logs.vmdk")):
        assert_same_bytes(raws[name], tmp_path / "target" / "images" / "120" / f"vm-120-disk-{index}.qcow2")


@pytest.mark.usefixtures("boots")
def test_two_migrations_in_threads_at_once_each_in_order(tmp_path, source_of, manifest):
    target = local_target(tmp_path / "target", accel="tcg")
    recorder = Recorder()
    sources = {121: source_of("monolithicSparse"), 122: source_of("twoGbMaxExtentSparse")}
    migrations = {vmid: Migration(src.descriptor, vmid, target=target, ostype="l26", bwlimit=512,
                                  on_event=recorder) for vmid, src in sources.items()}
    threads = [in_thread(migration.run) for migration in migrations.values()]
    for thread, _outcome in threads:
        thread.join(120)
    for _thread, outcome in threads:
        assert "error" not in outcome, outcome
    one_disk = []
    for name in ("inspect", "preflight", "create", "convert", "verify", "attach", "boot", "finish"):  # no dance
        disk = 0 if name in ("convert", "verify") else None
        one_disk += [("stage-start", name, disk), ("stage-done", name, disk)]
    for vmid, migration in migrations.items():
        events = recorder.of(vmid)
        assert stage_sequence(events) == one_disk
        # Every event of a VM came from the one thread that ran it.
        assert len({thread for _at, thread, event in recorder.events if event.vmid == vmid}) == 1
        status = migration.status
        assert (status.state, status.percent, status.stage) == ("finished", 100.0, "finish")
        assert status.done == status.total == manifest["virtual_size"]
        assert_same_bytes(SAMPLES / "guest.raw", tmp_path / "target" / "images" / str(vmid) / f"vm-{vmid}-disk-0.qcow2")
        assert guest_report((tmp_path / "target" / "run" / str(vmid) / "serial.log").read_text(errors="replace"))[2] \
            == manifest["marker"]
    # They ran at the same time: both copies were under way at once.
    spans = {}
    for vmid in migrations:
        times = [at for at, _thread, event in recorder.events if event.vmid == vmid and event.stage == "convert"
                 and event.kind in ("stage-start", "stage-done")]
        spans[vmid] = (times[0], times[-1])
    assert spans[121][0] < spans[122][1] and spans[122][0] < spans[121][1], spans


def test_cancel_stops_qemu_img_and_a_later_run_resumes(tmp_path, source_of):
    src = source_of("monolithicSparse")
    target = local_target(tmp_path / "target", accel="tcg")
    recorder = Recorder()
    migration = Migration(src.descriptor, 130, target=target, ostype="l26", bwlimit=SLOW, boot_check=False,
                          on_event=recorder)
    thread, outcome = in_thread(migration.run)
    recorder.wait_for(lambda e: e.kind == "progress" and e.done)
    status = migration.status
    assert (status.state, status.stage) == ("running", "convert")
    assert 0 < status.done < status.total and 0 < status.percent < 100
    partial = tmp_path / "target" / "images" / "130" / ".vm-130-disk-0.qcow2.v2p-partial"
    assert qemu_img_writing(partial)
    migration.cancel()
    thread.join(60)  # a hang guard only: how fast a cancel ends the copy is measured in bench/, not here
    assert not thread.is_alive(), "the cancel did not end the migration"
    assert isinstance(outcome["error"], Cancelled)
    assert outcome["error"].hint and "again" in outcome["error"].hint
    assert not qemu_img_writing(partial), "qemu-img outlived the cancel"
    status = migration.status
    assert status.state == "cancelled" and isinstance(status.error, Cancelled)
    assert status.to_dict()["error"] == "the migration was cancelled" and status.to_dict()["type"] == "Cancelled"
    record = json.loads((target.state_dir() / "130.json").read_text())
    assert "convert" not in record["stages"] and "create" in record["stages"], "a half-written disk counted as done"
    assert record["failed"]["stage"] == "convert"
    assert target.vm_exists(130), "a cancel keeps what the migration made, for the rerun"
    assert not (tmp_path / "target" / "images" / "130" / "vm-130-disk-0.qcow2").exists()

    # The same object runs again: it resumes (its cancel is spent), at full speed this time.
    recorder.events.clear()
    # A new request, at full speed: bwlimit is not part of what the VM is, so it resumes.
    result = Migration(src.descriptor, 130, target=target, ostype="l26", boot_check=False,
                       on_event=recorder).run()
    assert result["finished"] is True
    kinds = stage_sequence(recorder.of(130))
    assert kinds[:3] == [("stage-skip", "inspect", None), ("stage-skip", "preflight", None),
                         ("stage-skip", "create", None)]
    assert ("stage-done", "convert", 0) in kinds
    assert any(e.stage == "resume" for e in recorder.of(130))
    assert_same_bytes(SAMPLES / "guest.raw", tmp_path / "target" / "images" / "130" / "vm-130-disk-0.qcow2")


@pytest.mark.slow
def test_cancelled_migration_object_runs_again_and_resumes(tmp_path, source_of):
    src = source_of("monolithicFlat")
    target = local_target(tmp_path / "target", accel="tcg")
    recorder = Recorder()
    # ~4 s of copying: cancelled at its first bytes, and run to its end by the same object.
    migration = Migration(src.descriptor, 131, target=target, ostype="l26", bwlimit=256, boot_check=False,
                          on_event=recorder)
    migration.cancel()  # before run(): the run stops at once, nothing made
    with pytest.raises(Cancelled):
        migration.run()
    assert not target.vm_exists(131) and not (target.state_dir() / "131.json").exists()
    thread, outcome = in_thread(migration.run)
    recorder.wait_for(lambda e: e.kind == "progress" and e.done)
    migration.cancel()
    thread.join(10)
    assert isinstance(outcome.get("error"), Cancelled)
    assert "convert" not in json.loads((target.state_dir() / "131.json").read_text())["stages"]
    result = migration.run()
    assert result["finished"] is True and migration.status.state == "finished"
    assert_same_bytes(SAMPLES / "guest.raw", tmp_path / "target" / "images" / "131" / "vm-131-disk-0.qcow2")


@pytest.mark.usefixtures("boots")
def test_cancel_during_the_boot_check_stops_its_qemu_and_the_rerun_boots_again(tmp_path, source_of, manifest):
    src = source_of("esxi")
    target = local_target(tmp_path / "target", accel="tcg")
    recorder = Recorder()
    migration = Migration(src.descriptor, 135, target=target, ostype="l26", on_event=recorder)
    thread, outcome = in_thread(migration.run)
    recorder.wait_for(lambda e: e.kind == "stage-start" and e.stage == "boot")
    deadline = time.monotonic() + 20
    while not qemu_pids(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert qemu_pids(tmp_path), "the boot check's QEMU never started"
    asked = time.monotonic()
    migration.cancel()
    thread.join(10)
    assert outcome["ended"] - asked < 2.0 and isinstance(outcome.get("error"), Cancelled), outcome
    assert not qemu_pids(tmp_path), "the boot check's QEMU outlived the cancel"
    stages = json.loads((target.state_dir() / "135.json").read_text())["stages"]
    assert "attach" in stages and "boot" not in stages
    recorder.events.clear()
    result = migration.run()
    # The sample guest powers itself off once it has reported: ACPI, which only a running OS does.
    assert result["stages"]["boot"]["result"]["outcome"] == result["boot"] == "up"
    assert result["boot_signal"].startswith("the guest shut itself down")
    assert ("stage-skip", "attach", None) in stage_sequence(recorder.of(135))
    assert guest_report(result["stages"]["boot"]["result"]["serial"])[2] == manifest["marker"]


def test_cancel_of_one_migration_leaves_the_other_running(tmp_path, source_of):
    target = local_target(tmp_path / "target", accel="tcg")
    recorder = Recorder()
    slow = Migration(source_of("monolithicSparse").descriptor, 140, target=target, ostype="l26", bwlimit=SLOW,
                     boot_check=False, on_event=recorder)
    other = Migration(source_of("monolithicFlat").descriptor, 141, target=target, ostype="l26", bwlimit=2048,
                      boot_check=False, on_event=recorder)
    (slow_thread, slow_outcome), (other_thread, other_outcome) = in_thread(slow.run), in_thread(other.run)
    recorder.wait_for(lambda e: e.vmid == 140 and e.kind == "progress" and e.done)
    recorder.wait_for(lambda e: e.vmid == 141 and e.kind == "stage-start" and e.stage == "convert")
    slow.cancel()
    slow_thread.join(10)
    other_thread.join(120)
    assert isinstance(slow_outcome.get("error"), Cancelled)
    assert other_outcome.get("result", {}).get("finished") is True, other_outcome


def test_same_vmid_is_refused_while_another_thread_migrates_it(tmp_path, source_of):
    src = source_of("monolithicSparse")
    target = local_target(tmp_path / "target", accel="tcg")
    recorder = Recorder()
    first = Migration(src.descriptor, 150, target=target, ostype="l26", bwlimit=SLOW, boot_check=False,
                      on_event=recorder)
    thread, outcome = in_thread(first.run)
    recorder.wait_for(lambda e: e.kind == "stage-start" and e.stage == "convert")
    # Another Target object on the same folder, as a second request of a panel would make.
    second = Migration(src.descriptor, 150, target={"kind": "local", "dir": str(tmp_path / "target")},
                       ostype="l26", boot_check=False)
    with pytest.raises(LockedError) as refused:
        second.run()
    assert "VMID 150" in refused.value.message and refused.value.hint
    assert second.status.state == "failed"
    with pytest.raises(LockedError):  # the same object, twice at once
        first.run()
    assert first.status.state == "running"
    first.cancel()
    thread.join(10)
    assert isinstance(outcome.get("error"), Cancelled)


def test_rerun_of_a_finished_migration_returns_its_result_without_redoing_anything(tmp_path, source_of):
    src = source_of("streamOptimized")
    where = {"kind": "local", "dir": str(tmp_path / "target"), "accel": "tcg"}
    first = migrate(src.descriptor, 160, target=where, ostype="l26", boot_check=False)
    disk = tmp_path / "target" / "images" / "160" / "vm-160-disk-0.qcow2"
    before = disk.stat().st_mtime_ns
    recorder = Recorder()
    migration = Migration(src.descriptor, 160, target=where, ostype="l26", boot_check=False, on_event=recorder)
    again = migration.run()
    assert again["nothing_to_do"].endswith("nothing to do")
    assert again["migration_id"] == first["migration_id"] and again["finished_at"] == first["finished_at"]
    assert not [e for e in recorder.of(160) if e.kind in ("stage-start", "stage-done")]
    assert disk.stat().st_mtime_ns == before
    assert migration.status.to_dict()["result"]["nothing_to_do"] is True
    assert migration.status.percent == 100.0


def test_events_iterator_yields_in_order_and_raises_the_error_at_the_end(tmp_path, source_of):
    src = source_of("twoGbMaxExtentFlat")
    migration = Migration(src.descriptor, 170, target=local_target(tmp_path / "target", accel="tcg"), ostype="l26",
                          boot_check=False)
    events = list(migration.events())
    assert stage_sequence(events)[0] == ("stage-start", "inspect", None)
    assert stage_sequence(events)[-1] == ("stage-done", "finish", None)
    assert all(event.vmid == 170 for event in events)
    assert migration.status.result is not None and migration.status.result["finished"] is True

    broken = tmp_path / "broken.vmdk"
    broken.write_text("# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\n"
                      "RW 2048 FLAT \"missing-flat.vmdk\" 0\n")
    failing = Migration(broken, 171, target=local_target(tmp_path / "target", accel="tcg"), ostype="l26")
    seen = []
    with pytest.raises(SourceError) as failed:
        for event in failing.events():
            seen.append(event)
    assert "missing-flat.vmdk" in failed.value.message
    assert failing.status.state == "failed" and failing.status.error is failed.value


def test_leaving_the_events_loop_early_cancels_the_migration(tmp_path, source_of):
    src = source_of("monolithicSparse")
    target = local_target(tmp_path / "target", accel="tcg")
    migration = Migration(src.descriptor, 175, target=target, ostype="l26", bwlimit=SLOW, boot_check=False)
    started = None
    for event in migration.events():
        if event.kind == "progress" and event.done:
            started = time.monotonic()
            break
    assert started is not None  # how soon it stops: bench/speed_claims.py
    assert migration.status.state == "cancelled"
    assert not qemu_img_writing(tmp_path / "target" / "images" / "175" / ".vm-175-disk-0.qcow2.v2p-partial")


@pytest.mark.usefixtures("boots")
def test_the_library_writes_nothing_to_stdout_or_stderr(tmp_path, source_of, capfd):
    src = source_of("esxi")
    capfd.readouterr()
    result = migrate(src.descriptor, 180, target=local_target(tmp_path / "target", accel="tcg"), ostype="l26")
    assert result["finished"] is True
    with pytest.raises(SourceError):
        migrate(tmp_path / "nothing.vmdk", 181, target=local_target(tmp_path / "target", accel="tcg"))
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


@pytest.mark.usefixtures("boots")
def test_every_external_command_is_logged_at_debug_with_argv_and_duration(tmp_path, source_of, caplog):
    src = source_of("monolithicSparse")
    caplog.set_level(logging.DEBUG, logger="v2p")
    migrate(src.descriptor, 185, target=local_target(tmp_path / "target", accel="tcg"), ostype="l26")
    records = [record for record in caplog.records if record.name == "v2p.runner"]
    assert records and all(record.levelno == logging.DEBUG for record in records)
    converts = [record for record in records if record.argv[:2] == [os.path.realpath("/usr/bin/qemu-img"), "convert"]
                or (record.argv[0].endswith("/qemu-img") and record.argv[1] == "convert")]
    assert len(converts) == 1
    convert = converts[0]
    assert convert.returncode == 0 and isinstance(convert.seconds, float) and convert.seconds > 0
    assert str(tmp_path / "target") in " ".join(convert.argv)
    assert "qemu-img convert" in convert.getMessage() and "exit 0 after" in convert.getMessage()
    # QEMU (the boot check's) runs under a tether, not the runner: logged when it starts and ends.
    qemu = [record for record in caplog.records if record.name == "v2p.tether"]
    assert [record.getMessage().split(": ")[-1].split(" ")[0] for record in qemu] == ["started", "exit"]
    assert qemu[0].argv[0].endswith("qemu-system-x86_64") and qemu[1].seconds > 0


def test_cli_verbose_shows_the_commands_on_stderr(tmp_path, source_of, inproc):
    src = source_of("monolithicSparse")
    proc = inproc.bare("-v", "--accel", "tcg", "--target-dir", str(tmp_path / "t"),
                       "migrate", str(src.descriptor), "--vmid", "186", "--os", "l26", "--no-boot-check")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "v2p.runner" in line]
    assert any("qemu-img convert" in line and "exit 0 after" in line for line in lines), proc.stderr
    quiet = inproc.bare("--target-dir", str(tmp_path / "t"), "status", "186")
    assert "v2p.runner" not in quiet.stderr


def test_errors_carry_the_hint_apart_from_the_message(tmp_path):
    with pytest.raises(v2p.V2PError) as refused:
        migrate(tmp_path / "absent.vmdk", 190, target={"kind": "local", "dir": str(tmp_path / "t")})
    error = refused.value
    assert isinstance(error, SourceError) and error.message and "absent.vmdk" in error.message
    with pytest.raises(v2p.V2PError) as bad_target:
        migrate(tmp_path / "absent.vmdk", 190, target={"kind": "vsphere"})
    assert bad_target.value.hint and bad_target.value.hint not in bad_target.value.message
    assert str(bad_target.value) == f"{bad_target.value.message} (hint: {bad_target.value.hint})"
    with pytest.raises(v2p.V2PError) as taken:
        Migration(tmp_path / "absent.vmdk", 190, target="ftp://somewhere")
    assert taken.value.hint == "use local or pve://HOST/NODE"


def test_runner_starts_programs_without_preexec_fn(monkeypatch):
    """preexec_fn runs Python between fork and exec: unsafe with other threads running."""
    seen: list[dict[str, Any]] = []
    real = subprocess.Popen

    class Watched(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            seen.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", Watched)
    from v2p import runner

    assert runner.run(["qemu-img", "--version"], timeout=10).stdout.startswith("qemu-img")
    lines: list[str] = []
    runner.run_streaming(["qemu-img", "--help"], timeout=10, on_chunk=lines.append)
    assert runner.run(["cat"], input="typed in\n", timeout=10).stdout == "typed in\n"
    assert lines and len(seen) == 3
    assert all(kwargs.get("preexec_fn") is None for kwargs in seen)


@pytest.mark.usefixtures("v2p_process")  # a process SIGKILLed mid-run is the subject
def test_a_program_dies_with_the_process_that_ran_it(tmp_path):
    """What preexec_fn's PR_SET_PDEATHSIG did, now without it: SIGKILL of the process running
    a program (here from a worker thread, as in a panel) takes the program along."""
    marker = tmp_path / "alive"
    script = (f"import threading, sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from v2p import runner\n"
              "t = threading.Thread(target=lambda: runner.run(['sleep', '3600.5'], timeout=7200))\n"
              f"t.start(); open({str(marker)!r}, 'w').close(); t.join()\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 20
    while not (marker.exists() and sleeping()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sleeping()
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while sleeping() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sleeping(), "the program outlived the process that ran it"


def sleeping() -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == b"/usr/bin/sleep\x003600.5\x00":
                return True
        except OSError:
            continue
    return False


def test_migrate_takes_a_pve_url_string_as_its_target(tmp_path, source_of, pve, monkeypatch):
    from test_migrate_pve import pve_url

    monkeypatch.setenv("V2P_PVE_TOKEN", pve.tokens["root@pam!v2p"])
    # The environment's secret is its host's: configured here, so a URL naming that host gets it.
    monkeypatch.setenv("V2P_PVE_HOST", "127.0.0.1")
    monkeypatch.setenv("V2P_PVE_PORT", str(pve.port))
    monkeypatch.setenv("V2P_PVE_FINGERPRINT", pve.fingerprint)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    url = pve_url(pve)
    recorder = Recorder()
    result = migrate(source_of("monolithicSparse").descriptor, 200, target=url, ostype="l26", boot_check=False,
                     on_event=recorder)
    assert result["finished"] is True
    assert all(event.vmid == 200 for _at, _thread, event in recorder.events)
    assert any(event.kind == "progress" for event in recorder.of(200))
    assert pve.cluster.vms[200].config["scsi0"].startswith("local:200/vm-200-disk-")
    assert pve.refused == [] and pve.unsimulated == []


def test_a_full_storage_is_its_own_error_type(tmp_path, source_of):
    """A panel (and `plan run`) tells "no room" from other target errors by type, not by the message's words."""
    from v2p import NoSpaceError, TargetError

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(small)], check=True)
    try:
        target = local_target(tmp_path / "target")
        target.add_storage("small", "dir", {"path": str(small)})
        with pytest.raises(NoSpaceError) as info:
            migrate(source_of("monolithicFlat").descriptor, 150, target=target, storage="small", boot_check=False)
        assert isinstance(info.value, TargetError) and "not enough space" in info.value.message
        assert info.value.hint and not target.vm_exists(150)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
