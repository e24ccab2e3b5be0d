"""``v2p vm start`` on the local target says how to reach the guest: where its serial port is written
(the local target's QEMU has no display, so no VNC) and that its NICs are on no bridge there."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_vm import looping_disk

from conftest import InProcessV2P


@pytest.mark.usefixtures("boots")  # vm start runs QEMU, in this process
def test_vm_start_says_how_to_reach_the_guest(tmp_path: Path, inproc: InProcessV2P) -> None:
    disk = looping_disk(tmp_path / "spin-flat.vmdk")
    done = inproc("migrate", str(disk), "--vmid", "141", "--no-boot-check", "--bridge", "vmbr7")
    assert done.returncode == 0, done.stderr
    try:
        start = inproc("vm", "start", "141")
        assert start.returncode == 0, start.stderr
        lines = start.stdout.splitlines()
        log = inproc.target / "run" / "141" / "serial.log"
        assert lines[0] == "VM 141 started"
        assert lines[1].startswith(f"  serial console: written to {log} (follow it: tail -f {log})")
        assert "no display" in lines[1] and "no VNC" in lines[1]
        assert lines[2].startswith("  net0: not connected to its config's bridge vmbr7: ")
        assert log.exists()
    finally:
        inproc("vm", "stop", "141", "--timeout", "0")
