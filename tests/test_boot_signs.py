"""The boot check's decision engine (``v2p.bootwatch``) fed what real guests and firmwares show:
which signs end a boot as up, failed or unconfirmed, and when. Pure: no guest runs here (the
boots that prove the signs on real QEMU are in test_boot.py)."""

from __future__ import annotations

import pytest

from v2p import bootwatch
from v2p.bootwatch import OS_READ_BYTES, SETTLE, BootWatch
from v2p.targets.base import BOOT_FAILED, BOOT_UNCONFIRMED, BOOT_UP, GuestIO

MiB = 1 << 20


def watch(**kw: object) -> BootWatch:
    options: dict[str, object] = {"timeout": 120.0, "started": 0.0, "boot_disk": "scsi0"}
    options.update(kw)
    return BootWatch(100, **options)  # type: ignore[arg-type]


def reads(count: int, key: str = "scsi0") -> GuestIO:
    return GuestIO(reads={key: count})


# -- failure signs, from real firmwares and guests ---------------------------------------------
@pytest.mark.parametrize(("serial", "firmware", "sign"), [
    ("", "Booting from Hard Disk...\nBoot failed: not a bootable disk\n\nNo bootable device.\n",
     "no bootable device"),
    ("BdsDxe: failed to load Boot0001 \"UEFI QEMU HARDDISK QM00001 \" from PciRoot(0x0)/Pci(0x1,0x1)"
     "/Ata(Primary,Master,0x0): Not Found\r\nBdsDxe: No bootable option or device was found.\r\n"
     "BdsDxe: Press any key to enter the Boot Manager Menu.\r\n", "", "no bootable device"),
    ("BdsDxe: failed to load Boot0001 \"UEFI QEMU QEMU HARDDISK \" from PciRoot(0x0)/Pci(0x1,0x0)/Scsi(0x0,0x0)"
     ": Not Found\r\nBdsDxe: loading Boot0002 \"EFI Internal Shell\" from Fv(7CB8BDC9-F8EB-4F34-AAEA-3EE4AF6516A1)"
     "\r\nBdsDxe: starting Boot0002 \"EFI Internal Shell\" from Fv(7CB8BDC9-F8EB-4F34-AAEA-3EE4AF6516A1)\r\n"
     "UEFI Interactive Shell v2.2\r\nShell> ", "", "no bootable device"),
    ("error: no such partition.\r\nEntering rescue mode...\r\ngrub rescue> ", "", "grub rescue"),
    ("error: unknown filesystem.\r\n", "", "grub rescue"),
    ("[    1.52] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\r\n", "",
     "kernel panic"),
    ("*** STOP: 0x0000007B (0xF78D2524,0xC0000034,0x00000000,0x00000000)\r\n", "", "STOP code"),
    ("Your PC ran into a problem\r\nStop code: INACCESSIBLE_BOOT_DEVICE\r\n", "", "STOP code"),
])
def test_failure_signs_end_the_boot_failed(serial: str, firmware: str, sign: str) -> None:
    w = watch()
    verdict = w.look(serial, firmware, 3.0)
    assert verdict is not None and verdict.outcome == BOOT_FAILED, verdict
    assert w.signs[sign]["at"] == 3.0


def test_a_failure_outranks_an_unsettled_io_sign() -> None:
    w = watch()
    w.observe_io(2.0, reads(40 * MiB))
    assert w.look("", "", 3.0) is None
    verdict = w.look("Stop code: INACCESSIBLE_BOOT_DEVICE", "", 5.0)
    assert verdict is not None and verdict.outcome == BOOT_FAILED
    assert verdict.signal == "Stop code: INACCESSIBLE_BOOT_DEVICE"


def test_three_resets_are_a_boot_loop() -> None:
    w = watch()
    for t in (1.0, 2.0):
        w.reset(t, "")
        assert w.look("", "", t) is None
    w.reset(3.0, "")
    verdict = w.look("", "", 3.0)
    assert verdict is not None and verdict.outcome == BOOT_FAILED and "3 times" in verdict.signal
    assert w.signs["resets"] == {"at": 1.0, "value": 3}


@pytest.mark.parametrize(("name", "data"), [("GUEST_PANICKED", {"action": "pause"}),
                                            ("SHUTDOWN", {"guest": True, "reason": "guest-panic"})])
def test_a_guest_panic_event_fails_the_boot(name: str, data: dict[str, object]) -> None:
    w = watch()
    w.event(4.0, name, data)
    verdict = w.look("", "", 4.0)
    assert verdict is not None and verdict.outcome == BOOT_FAILED and "panic" in verdict.signal
    assert w.signs["guest panic"]["at"] == 4.0


def test_a_panicked_sample_fails_the_boot() -> None:
    w = watch()
    w.observe_io(4.0, GuestIO(panicked=True))
    verdict = w.look("", "", 4.5)
    assert verdict is not None and verdict.outcome == BOOT_FAILED


# -- up -----------------------------------------------------------------------------------------
def test_boot_disk_reads_then_settle_is_up() -> None:
    w = watch()
    w.observe_io(1.0, reads(600 << 10))  # a boot loader
    w.observe_io(3.0, reads(OS_READ_BYTES))  # its kernel
    assert w.look("", "", 3.0 + SETTLE - 0.1) is None
    verdict = w.look("", "", 3.0 + SETTLE)
    assert verdict is not None and verdict.outcome == BOOT_UP
    assert verdict.signal.startswith("boot disk reads (8.0 MiB)"), verdict.signal
    assert w.signs["boot disk reads"] == {"at": 3.0, "value": OS_READ_BYTES}


def test_where_resets_are_not_seen_reads_that_go_on_at_a_boot_s_pace_are_not_up() -> None:
    """PVE's API shows no resets: a boot loop (a blue screen's automatic restart) is one long boot
    whose reads never level off. Measured on the simulator: the no-driver stand-in on virtio read
    100 MiB in 21 s, ten of its 10 MiB boots."""
    w = watch(timeout=60.0, resets_seen=False)
    t = 0.0
    while t < 60.0:
        t += 2.0
        w.observe_io(t, reads(int(t / 2) * 10 * MiB))  # another boot's worth every 2 s
        verdict = w.look("", "", t)
        assert verdict is None or verdict.outcome != BOOT_UP, verdict
    assert verdict is not None and verdict.outcome == BOOT_UNCONFIRMED
    assert "its reads never levelled off" in verdict.signal, verdict.signal


def test_where_resets_are_not_seen_reads_that_level_off_are_up() -> None:
    w = watch(resets_seen=False)
    w.observe_io(2.0, reads(10 * MiB))
    w.observe_io(4.0, reads(19 * MiB))  # still loading (another boot's worth: the settle starts over)
    w.observe_io(6.0, reads(21 * MiB))  # then quiet
    assert w.look("", "", 4.0 + SETTLE - 0.1) is None
    verdict = w.look("", "", 4.0 + SETTLE)
    assert verdict is not None and verdict.outcome == BOOT_UP
    assert verdict.signal == f"boot disk reads (19 MiB), then {SETTLE:g}s with its reads levelled off (no resets " \
                             "seen here)", verdict.signal


def test_reads_of_another_disk_are_no_sign() -> None:
    w = watch(timeout=30.0)
    w.observe_io(1.0, GuestIO(reads={"scsi1": 100 * MiB, "scsi0": 4096}))
    verdict = w.look("", "", 30.0)
    assert verdict is not None and verdict.outcome == BOOT_UNCONFIRMED
    assert "scsi0 read 4 KiB" in verdict.signal


def test_a_reset_starts_the_reads_over() -> None:
    """A Windows reads tens of MiB, bugchecks and restarts: what it read before does not count."""
    w = watch()
    w.observe_io(2.0, reads(40 * MiB))
    w.reset(10.0, "")
    w.observe_io(12.0, reads(42 * MiB))
    assert w.look("", "", 2.0 + SETTLE + 1) is None
    w.observe_io(14.0, reads(40 * MiB + OS_READ_BYTES))
    assert w.look("", "", 14.0 + SETTLE - 1) is None
    verdict = w.look("", "", 14.0 + SETTLE)
    assert verdict is not None and verdict.outcome == BOOT_UP


def test_network_on_a_nic_out_of_the_boot_order_is_up_after_settle() -> None:
    w = watch(boot_nics=("net1",))
    w.observe_io(1.0, GuestIO(sent={"net1": 1200}))  # a firmware's PXE attempt
    assert w.look("", "", 1.0 + SETTLE + 1) is None
    w.observe_io(30.0, GuestIO(sent={"net0": 342, "net1": 1200}))
    verdict = w.look("", "", 30.0 + SETTLE)
    assert verdict is not None and verdict.outcome == BOOT_UP and "net0" in verdict.signal
    assert w.signs["network"] == {"at": 30.0, "value": {"net0": 342}}


@pytest.mark.parametrize("text", ["Debian GNU/Linux 12 debian ttyS0\r\n\r\ndebian login: ",
                                  "[  OK  ] Reached target Multi-User System.\r\n", "\r\nSAC>"])
def test_serial_signs_are_up_at_once(text: str) -> None:
    w = watch()
    verdict = w.look(text, "", 2.0)
    assert verdict is not None and verdict.outcome == BOOT_UP and verdict.signal.endswith("on the serial console")


def test_a_sign_read_elsewhere_is_up_unless_a_failure_shows() -> None:
    w = watch()
    w.ready(4.0, "the guest agent answered", "Debian GNU/Linux 12")
    verdict = w.look("", "", 4.0)
    assert verdict is not None and verdict.outcome == BOOT_UP
    assert verdict.signal == "the guest agent answered (Debian GNU/Linux 12)"
    w = watch()
    w.ready(4.0, "the guest agent answered", "Windows")
    verdict = w.look("Stop code: CRITICAL_PROCESS_DIED", "", 4.0)
    assert verdict is not None and verdict.outcome == BOOT_FAILED


def test_an_acpi_power_off_is_up() -> None:
    w = watch()
    w.event(6.0, "SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
    verdict = w.look("", "", 6.0)
    assert verdict is not None and verdict.outcome == BOOT_UP
    assert verdict.signal == "the guest shut itself down (ACPI)"


def test_a_stop_without_reason_is_up_only_after_a_sign() -> None:
    quiet = watch()
    quiet.event(6.0, "STOPPED")
    verdict = quiet.look("", "", 6.0)
    assert verdict is not None and verdict.outcome == BOOT_UNCONFIRMED
    busy = watch()
    busy.observe_io(3.0, reads(30 * MiB))
    busy.event(6.0, "STOPPED")
    verdict = busy.look("", "", 6.0)
    assert verdict is not None and verdict.outcome == BOOT_UP and "stopped on its own" in verdict.signal


def test_a_host_stop_is_no_sign() -> None:
    w = watch()
    w.event(6.0, "SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    verdict = w.look("", "", 6.0)
    assert verdict is not None and verdict.outcome == BOOT_UNCONFIRMED


# -- neither --------------------------------------------------------------------------------------
def test_a_silent_running_guest_is_unconfirmed_at_the_timeout() -> None:
    """What the old check called up: the firmware handed over, then 20s without a reset."""
    w = watch(timeout=60.0)
    w.observe_io(1.0, reads(512))
    firmware = "Booting from Hard Disk..\nBooting from 0000:7c00\n"
    assert w.look("", firmware, 1.0) is None
    assert w.look("", firmware, 1.0 + SETTLE) is None
    verdict = w.look("", firmware, 60.0)
    assert verdict is not None and verdict.outcome == BOOT_UNCONFIRMED
    assert "handed over at 1.0s" in verdict.signal and "scsi0 read 512 bytes" in verdict.signal


def test_a_verdict_stays() -> None:
    w = watch()
    first = w.look("debian login: ", "", 2.0)
    assert w.look("Kernel panic - not syncing", "", 3.0) is first


def test_the_report_carries_every_sign() -> None:
    w = watch()
    w.observe_io(2.0, reads(20 * MiB))
    w.observe_io(5.0, GuestIO(reads={"scsi0": 21 * MiB}, sent={"net0": 590}))
    w.look("", "Booting from 0000:7c00", 5.0)
    w.look("debian login: ", "", 9.0)
    report = w.report(9.5, serial="debian login: ", accel="tcg")
    assert report.outcome == BOOT_UP and report.seconds == 9.5
    assert report.signs["boot disk reads"] == {"at": 2.0, "value": 20 * MiB}
    assert report.signs["network"]["at"] == 5.0
    assert report.signs["firmware handover"]["at"] == 5.0
    assert report.signs["login prompt"]["at"] == 9.0
    assert report.signs["boot disk read in all"]["value"] == 21 * MiB


def test_helpers_others_use() -> None:
    assert bootwatch.stop_code("*** STOP: 0x0000007B (0x1)") == "*** STOP: 0x0000007B (0x1)"
    assert bootwatch.ready_sign("debian login: ") == "login prompt"
    assert bootwatch.clean("\x1b[0;32mOK\x1b[0m\r") == "OK"
    assert bootwatch.SETTLE == 20.0
