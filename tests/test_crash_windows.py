"""Crash windows that used to wedge a migration for good, and what a rerun does
after each: a kill right after the state file appears, a kill (or a state file
that cannot be written) between the verified volume's rename and its record,
temporaries left by kills, a refused source, and a finished migration asked
for again."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

from conftest import V2P, assert_same_bytes, one_line_error
from test_resume import ARGS, kill_after, wait_for

VMID = "120"


def finish(v2p: V2P, descriptor: Path, samples: Path) -> subprocess.CompletedProcess[str]:
    proc = v2p("migrate", str(descriptor), *ARGS)
    assert proc.returncode == 0, proc.stderr
    assert v2p.state(120)["finished"] is True
    assert_same_bytes(samples / "guest.raw", v2p.disk(120))
    return proc


def test_kill_right_after_the_state_file_appears_resumes(samples, source_of, v2p):
    src = source_of("monolithicSparse")
    kill_after(v2p, src.descriptor, "state-created")
    state = v2p.state(120)
    assert state["migration_id"], "the first record was written without its migration id"
    assert state["stages"] == {}
    proc = finish(v2p, src.descriptor, samples)
    assert "[inspect] done in" in proc.stdout


def test_half_made_first_record_of_an_older_run_is_one_line_and_removable(samples, source_of, v2p):
    """What the old v2p left when killed between its two first writes: no migration_id."""
    src = source_of("monolithicSparse")
    folder = v2p.target / "migrations"
    folder.mkdir(parents=True)
    options_run = v2p("migrate", str(src.descriptor), *ARGS, "--dry-run")
    assert options_run.returncode == 0, options_run.stderr
    (folder / "120.json").write_text(json.dumps({
        "version": 1, "vmid": 120, "request": {"source": str(src.descriptor), "vmid": 120, "options": {},
                                               "target": {}},
        "started_at": "2026-01-01T00:00:00+0000", "stages": {}, "finished": False}))
    line = one_line_error(v2p("migrate", str(src.descriptor), *ARGS))
    assert str(folder / "120.json") in line and "migration_id is missing" in line
    assert "v2p vm rm 120" in line
    removed = v2p("vm", "rm", VMID)
    assert removed.returncode == 0, removed.stderr
    assert not (folder / "120.json").exists()
    finish(v2p, src.descriptor, samples)


def test_kill_between_the_rename_and_the_verify_record_resumes(samples, source_of, v2p):
    src = source_of("twoGbMaxExtentSparse")
    kill_after(v2p, src.descriptor, "verify:committed")
    assert v2p.disk(120).exists(), "the verified volume was not renamed before the kill"
    assert "verify" not in v2p.state(120)["stages"]
    proc = finish(v2p, src.descriptor, samples)
    assert "[convert] already done" in proc.stdout
    assert "[verify] done in" in proc.stdout  # verified again, against the committed volume


def test_renamed_volume_without_its_record_is_found_and_verified(samples, source_of, v2p):
    """The same window without the test hook: the rename landed, the record did not."""
    src = source_of("monolithicSparse")
    kill_after(v2p, src.descriptor, "convert")
    partial = v2p.disk(120).with_name(".vm-120-disk-0.qcow2.v2p-partial")
    partial.rename(v2p.disk(120))
    proc = finish(v2p, src.descriptor, samples)
    assert "[verify] done in" in proc.stdout


def test_state_file_that_cannot_be_written_after_the_rename_resumes(samples, source_of, v2p):
    src = source_of("monolithicSparse")
    kill_after(v2p, src.descriptor, "convert")
    folder = v2p.target / "migrations"
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        stuck = v2p("migrate", str(src.descriptor), *ARGS)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    line = one_line_error(stuck)
    assert "Operation not permitted" in line
    assert v2p.disk(120).exists(), "the verify stage did not get as far as the rename"
    proc = finish(v2p, src.descriptor, samples)
    assert "[verify] done in" in proc.stdout


def test_temporaries_left_by_kills_are_removed(samples, source_of, v2p):
    src = source_of("monolithicSparse")
    kill_after(v2p, src.descriptor, "create")
    folder = v2p.target / "migrations"
    stale = [folder / ".120.json.99999.tmp", folder / ".120.json.abc123.tmp", folder / ".120.dance.json.1.tmp"]
    for path in stale:
        path.write_text("{")
    other = folder / ".121.json.5.tmp"  # another VMID's: not ours to remove
    other.write_text("{")
    finish(v2p, src.descriptor, samples)
    assert [path for path in stale if path.exists()] == []
    assert other.exists()
    assert sorted(p.name for p in folder.iterdir()) == [".121.json.5.tmp", "120.json", "120.lock", "logs"]


def test_refused_source_leaves_no_record(tmp_path, v2p):
    empty = tmp_path / "empty.vmdk"
    empty.write_bytes(b"")
    line = one_line_error(v2p("migrate", str(empty), *ARGS))
    assert "is empty" in line
    assert not (v2p.target / "migrations" / "120.json").exists()
    assert not (v2p.target / "migrations" / "120.work").exists()
    status = v2p("status")
    assert status.returncode == 0 and status.stdout.strip() == "no migration recorded for any VM"
    assert v2p("status", VMID).returncode == 1


def test_interrupt_before_anything_was_made_leaves_no_record(source_of, v2p):
    src = source_of("monolithicSparse")
    proc = v2p.popen("migrate", str(src.descriptor), *ARGS, V2P_TEST_HOLD_AFTER="preflight")
    wait_for(proc.stderr, "holding after preflight", proc)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted; run the same command again to resume" in err
    assert not (v2p.target / "migrations" / "120.json").exists()


def test_failure_after_create_is_shown_by_status(samples, tmp_path, v2p):
    descriptor = own_copy(samples, tmp_path, "monolithicFlat")
    kill_after(v2p, descriptor, "create")
    flat = next(descriptor.parent.glob("*-flat.vmdk"))
    os.truncate(flat, 4096)  # the source is cut short between the runs
    line = one_line_error(v2p("migrate", str(descriptor), *ARGS))
    status = v2p("status", VMID)
    assert status.returncode == 0, status.stderr
    first = status.stdout.splitlines()[0]
    assert first.startswith(f"VMID 120: {descriptor} — stopped in inspect: "), first
    assert line.removeprefix("v2p: error: ").split(" (hint:")[0] in first
    assert "create     done" in status.stdout


def test_finished_migration_asked_again_is_nothing_to_do(samples, source_of, v2p):
    src = source_of("monolithicSparse")
    finish(v2p, src.descriptor, samples)
    before = (v2p.target / "migrations" / "120.json").read_bytes()
    disk_mtime = v2p.disk(120).stat().st_mtime_ns
    again = v2p("migrate", str(src.descriptor), *ARGS)
    assert again.returncode == 0, again.stderr
    assert "VM 120 was already migrated from" in again.stdout and "nothing to do" in again.stdout
    assert "done in" not in again.stdout
    assert again.stdout.splitlines()[-1].endswith("; nothing to do"), again.stdout
    assert (v2p.target / "migrations" / "120.json").read_bytes() == before
    assert v2p.disk(120).stat().st_mtime_ns == disk_mtime


def test_finished_migration_with_other_settings_or_a_changed_source_is_refused(samples, tmp_path, v2p):
    descriptor = own_copy(samples, tmp_path, "monolithicSparse")
    finish(v2p, descriptor, samples)
    line = one_line_error(v2p("migrate", str(descriptor), *ARGS, "--bus", "virtio"))
    assert "VMID 120 already exists: it was migrated from" in line and "--bus" in line
    other = own_copy(samples, tmp_path, "monolithicFlat")
    line = one_line_error(v2p("migrate", str(other), *ARGS))
    assert "with other settings (source)" in line
    with open(descriptor, "r+b") as handle:  # the same file, written to since
        handle.seek(1 << 20)
        handle.write(b"changed")
    line = one_line_error(v2p("migrate", str(descriptor), *ARGS))
    assert "that source has changed since" in line


def own_copy(samples: Path, tmp_path: Path, flavor: str) -> Path:
    """A copy of a sample the test may change on purpose (``source_of`` checks its copies stay unchanged)."""
    folder = tmp_path / "own" / flavor
    shutil.copytree(samples / flavor, folder)
    return folder / f"{flavor}.vmdk"


def test_random_kills_always_resume_to_the_same_vm(samples, source_of, v2p):
    """SIGKILL at random moments of whole runs: every rerun ends with the right disk."""
    src = source_of("twoGbMaxExtentSparse")
    rng = random.Random(8)
    for _attempt in range(8):
        proc = v2p.popen("migrate", str(src.descriptor), *ARGS)
        time.sleep(rng.uniform(0.05, 0.9))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    proc = v2p("migrate", str(src.descriptor), *ARGS)
    assert proc.returncode == 0, proc.stderr
    assert_same_bytes(samples / "guest.raw", v2p.disk(120))
    assert v2p.state(120)["finished"] is True
    assert not list(v2p.disk(120).parent.glob(".*partial"))
    assert not list((v2p.target / "migrations").glob(".*.tmp"))
