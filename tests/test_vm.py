"""``v2p vm`` and ``v2p status`` on the local target, with real QEMU processes."""

from __future__ import annotations

import time

from conftest import one_line_error
from v2p.errors import EXIT_BOOT_UNCONFIRMED


def looping_disk(path):
    """A disk whose boot sector spins forever (jmp $): a guest that stays up."""
    sector = bytearray(512)
    sector[0:2] = b"\xeb\xfe"
    sector[510:512] = b"\x55\xaa"
    path.write_bytes(bytes(sector) + bytes((1 << 20) - 512))
    return path


def test_vm_lifecycle(tmp_path, v2p):
    disk = looping_disk(tmp_path / "spin-flat.vmdk")
    proc = v2p("migrate", str(disk), "--vmid", "140", "--boot-timeout", "2", "--start")
    # A boot sector that spins gives no sign of an OS: migrated and started, its boot not confirmed.
    assert proc.returncode == EXIT_BOOT_UNCONFIRMED, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("VM 140 migrated from ") and \
        "boot not confirmed: no sign of an OS within 2s" in proc.stdout.splitlines()[-1], proc.stdout
    listing = v2p("vm", "list")
    assert listing.returncode == 0
    assert "140  running" in listing.stdout and "spin" in listing.stdout

    show = v2p("vm", "show", "140")
    assert "scsi0: local:140/vm-140-disk-0.qcow2,size=1M" in show.stdout
    assert "ostype: l26" in show.stdout

    stop = v2p("vm", "stop", "140", "--timeout", "2")
    assert stop.returncode == 0, stop.stderr
    assert "140  stopped" in v2p("vm", "list").stdout

    start = v2p("vm", "start", "140")
    assert start.returncode == 0, start.stderr
    assert "140  running" in v2p("vm", "list").stdout
    line = one_line_error(v2p("vm", "start", "140"))
    assert "VM 140 is already running" in line

    status = v2p("status", "140")
    assert "VMID 140:" in status.stdout and "finished" in status.stdout

    rm = v2p("vm", "rm", "140")
    assert rm.returncode == 0, rm.stderr
    assert "no VMs" in v2p("vm", "list").stdout
    assert not (v2p.target / "images" / "140").exists()
    assert "no migration recorded" in v2p("status", "140").stderr


def test_stop_powers_off_through_acpi_when_guest_obeys(tmp_path, source_of, v2p):
    # the sample guest powers itself off: after `vm start` it is gone on its own
    src = source_of("monolithicSparse")
    assert v2p("migrate", str(src.descriptor), "--vmid", "141", "--no-boot-check").returncode == 0
    assert v2p("vm", "start", "141").returncode == 0
    deadline = time.monotonic() + 30
    while "141  stopped" not in v2p("vm", "list").stdout:
        assert time.monotonic() < deadline, "sample guest never powered off"
        time.sleep(0.2)
    assert "v2p-guest: poweroff" in v2p.serial(141)


def test_unknown_vm(v2p):
    line = one_line_error(v2p("vm", "show", "999"))
    assert "VMID 999 does not exist" in line


def test_stopping_an_unknown_vm_is_an_error(inproc):
    """As `vm show` and `vm rm` say: no VM 998 on the local target, not "VM 998 stopped"."""
    show, stop = inproc("vm", "show", "998"), inproc("vm", "stop", "998")
    assert one_line_error(stop) == one_line_error(show)
    assert "VMID 998 does not exist on the local target" in one_line_error(stop) and stop.stdout == ""
    assert stop.returncode == show.returncode
