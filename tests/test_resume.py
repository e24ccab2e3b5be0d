"""A migration killed with SIGKILL anywhere resumes where it stopped and ends
with the same VM and the same disk bytes; finished stages are not redone."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import SAMPLES, V2P, assert_same_bytes, guest_report

STAGES = ["inspect", "preflight", "create", "convert", "verify", "attach", "drivers", "boot", "finish"]
ARGS = ["--vmid", "120", "--os", "l26"]


def wait_for(stream, text: str, proc: subprocess.Popen[str], timeout: float = 60) -> str:
    """Read ``stream`` (raw, unbuffered) until ``text`` shows up."""
    fd = stream.fileno()
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            seen += chunk
            if text.encode() in seen:
                return seen.decode()
    raise AssertionError(f"never saw {text!r}; got:\n{seen.decode()}")


def reference(tmp_path: Path, descriptor: Path) -> dict[str, str]:
    ref = V2P(tmp_path / "reference")
    proc = ref("migrate", str(descriptor), *ARGS)
    assert proc.returncode == 0, proc.stderr
    return without_tag(ref.config(120))


def without_tag(config: dict[str, str]) -> dict[str, str]:
    """``config`` without what differs between two migrations of the same source by design: the tag
    (the migration's id) and a NIC's generated MAC (from that id: BC:24:11 and three random bytes)."""
    return {k: re.sub(r"BC:24:11(:[0-9A-F]{2}){3}", "BC:24:11:<generated>", v)
            for k, v in config.items() if k != "description"}


def qemu_img_writing(path: Path) -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-img" in cmdline and str(path).encode() in cmdline:
                return True
    return False


@pytest.mark.parametrize("stage", STAGES[:-1])
def test_sigkill_after_each_stage_resumes(stage, tmp_path, manifest, source_of, v2p):
    src = source_of("twoGbMaxExtentSparse")
    kill_after(v2p, src.descriptor, stage)
    done_before = {name: rec["finished_at"] for name, rec in v2p.state(120)["stages"].items()}
    assert list(done_before) == STAGES[: STAGES.index(stage) + 1]

    again = v2p("migrate", str(src.descriptor), *ARGS)
    assert again.returncode == 0, again.stderr
    for name in STAGES:
        if name == "drivers":
            continue  # a Linux VM's: recorded as skipped, never announced (no driver dance)
        if name in done_before:
            assert f"[{name}] already done" in again.stdout
            assert f"[{name}] done in" not in again.stdout
        else:
            assert f"[{name}] done in" in again.stdout
    state = v2p.state(120)
    for name, finished_at in done_before.items():
        assert state["stages"][name]["finished_at"] == finished_at
    assert state["finished"] is True
    assert_same_bytes(SAMPLES / "guest.raw", v2p.disk(120))
    assert not list(v2p.disk(120).parent.glob(".*partial"))
    assert without_tag(v2p.config(120)) == reference(tmp_path, src.descriptor)
    if "boot" not in done_before:
        assert guest_report(v2p.serial(120)) == ("virtio-scsi", "1af4:1004", manifest["marker"])


def test_sigkill_during_convert_leaves_no_disk_and_resumes(tmp_path, source_of, v2p):
    src = source_of("monolithicFlat")
    # --bwlimit slows qemu-img down enough to kill it mid-copy.
    proc = v2p.popen("migrate", str(src.descriptor), *ARGS, "--bwlimit", "256")
    wait_for(proc.stdout, "[convert] write the disk", proc)
    partial = v2p.disk(120).with_name(".vm-120-disk-0.qcow2.v2p-partial")
    deadline = time.monotonic() + 20
    while not partial.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, "convert finished before it could be killed: "
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.3)
    assert not qemu_img_writing(partial), "qemu-img outlived the killed v2p"
    assert not v2p.disk(120).exists(), "a half-written disk has its final name"
    assert "convert" not in v2p.state(120)["stages"]

    again = v2p("migrate", str(src.descriptor), *ARGS)
    assert again.returncode == 0, again.stderr
    assert "[create] already done" in again.stdout
    assert "[convert] done in" in again.stdout
    assert_same_bytes(SAMPLES / "guest.raw", v2p.disk(120))
    assert not partial.exists()
    assert without_tag(v2p.config(120)) == reference(tmp_path, src.descriptor)


def kill_after(v2p: V2P, descriptor: Path, stage: str) -> None:
    """Run migrate until ``stage`` is recorded, then SIGKILL it."""
    proc = v2p.popen("migrate", str(descriptor), *ARGS, V2P_TEST_HOLD_AFTER=stage)
    wait_for(proc.stderr, f"holding after {stage}", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_changed_output_is_redone(source_of, v2p):
    src = source_of("monolithicSparse")
    kill_after(v2p, src.descriptor, "convert")
    partial = v2p.disk(120).with_name(".vm-120-disk-0.qcow2.v2p-partial")
    with open(partial, "r+b") as handle:  # damage the unverified disk
        handle.truncate(4096)
    again = v2p("migrate", str(src.descriptor), *ARGS)
    assert again.returncode == 0, again.stderr
    assert "[create] already done" in again.stdout
    assert "[convert] done in" in again.stdout
    assert_same_bytes(SAMPLES / "guest.raw", v2p.disk(120))


def test_second_run_while_first_holds_the_lock_is_refused(source_of, v2p):
    src = source_of("monolithicSparse")
    first = v2p.popen("migrate", str(src.descriptor), *ARGS, V2P_TEST_HOLD_AFTER="create")
    try:
        wait_for(first.stderr, "holding after create", first)
        second = v2p("migrate", str(src.descriptor), *ARGS)
        assert second.returncode != 0
        assert "VMID 120 is locked by another v2p run" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_resume_with_other_settings_is_refused(source_of, v2p):
    src = source_of("monolithicSparse")
    kill_after(v2p, src.descriptor, "create")
    other = v2p("migrate", str(src.descriptor), *ARGS, "--bus", "virtio")
    assert other.returncode != 0
    assert "unfinished migration" in other.stderr and "--bus" in other.stderr
    status = v2p("status", "120")
    assert status.returncode == 0
    assert "unfinished" in status.stdout
    assert "create     done" in status.stdout and "convert    pending" in status.stdout
