"""Resume inside a disk through the command (issue 20): ``v2p migrate`` SIGKILLed after the second of a
disk's four windows is carried on from that window by the rerun, which copies the last two windows
only and verifies every byte. The in-process cases are test_resume_in_disk.py's."""

from __future__ import annotations

import re
import signal

from test_resume_in_disk import WINDOW, sparse_disk

from conftest import V2P
from test_resume import wait_for

VMID = 150


def test_a_killed_copy_is_carried_on_from_its_last_window(v2p: V2P, tmp_path) -> None:
    disk = sparse_disk(tmp_path / "disk.raw")
    with open(disk, "r+b") as handle:  # an MBR with one Linux partition: a disk the command takes
        entry = bytes([0x80, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") + (8192).to_bytes(4, "little")
        handle.seek(446)
        handle.write(entry)
        handle.seek(510)
        handle.write(b"\x55\xaa")
    args = ("migrate", str(disk), "--vmid", str(VMID), "--no-boot-check")
    proc = v2p.popen(*args, V2P_TEST_HOLD_AFTER="convert:window:2")
    try:
        wait_for(proc.stderr, "holding after convert:window:2", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    record = v2p.state(VMID)
    assert (record["progress"]["stage"], record["progress"]["done"]) == ("convert", 2 * WINDOW)

    rerun = v2p("-v", *args)
    assert rerun.returncode == 0, rerun.stderr
    # The windows the rerun copied: the last two (qemu-img's argv, as -v logs it), then the verify.
    windows = sorted({int(offset) for line in rerun.stderr.splitlines()
                      if "qemu-img convert" in line and " -n " in line
                      for offset in re.findall(r'"offset":(\d+)', line)})
    assert windows == [2 * WINDOW, 3 * WINDOW], windows
    record = v2p.state(VMID)
    assert "verify" in record["stages"] and "progress" not in record
