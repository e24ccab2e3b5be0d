"""The boot check, for real: tiny BIOS guests under QEMU TCG, v2p killed or
interrupted while it watches them, guests that say they are up the way a real
Linux getty does."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import V2P
from v2p import bootwatch, interrupts
from v2p.targets.base import BOOT_FAILED, BOOT_UNCONFIRMED, BOOT_UP, BootReport
from v2p.targets.local import LocalTarget

# Boot sectors: set up COM1, print a message, then halt with interrupts off (a guest that
# never acts on the ACPI power button). With no message, a guest that is up but silent.
GUEST_ASM = r"""
bits 16
org 0x7c00
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7c00
    mov dx, 0x3fb
    mov al, 0x80
    out dx, al
    mov dx, 0x3f8
    mov al, 1
    out dx, al
    inc dx
    xor al, al
    out dx, al
    mov dx, 0x3fb
    mov al, 3
    out dx, al
    mov si, message
next:
    lodsb
    test al, al
    jz halt
    mov dx, 0x3f8
    out dx, al
    jmp next
halt:
    hlt
    jmp halt
message:
    db %s, 0
times 510-($-$$) db 0
dw 0xaa55
"""
# What agetty prints on a Debian 12 serial console, after the kernel's last words.
GETTY = (r'13, 10, "[    2.914825] Run /init as init process", 13, 10, 13, 10, '
         r'"Debian GNU/Linux 12 debian ttyS0", 13, 10, 13, 10, "debian login: "')


def guest_disk(folder: Path, name: str, message: str) -> Path:
    """A 1 MiB raw disk (accepted as a flat VMDK) whose boot sector is GUEST_ASM."""
    folder.mkdir(parents=True, exist_ok=True)
    asm = folder / f"{name}.asm"
    asm.write_text(GUEST_ASM % message)
    subprocess.run(["nasm", "-f", "bin", "-o", str(folder / f"{name}.bin"), str(asm)], check=True)
    disk = folder / f"{name}-flat.vmdk"
    disk.write_bytes((folder / f"{name}.bin").read_bytes() + bytes((1 << 20) - 512))
    return disk


@pytest.fixture
def getty_disk(tmp_path: Path) -> Path:
    return guest_disk(tmp_path / "src", "getty", GETTY)


@pytest.fixture
def silent_disk(tmp_path: Path) -> Path:
    return guest_disk(tmp_path / "src", "silent", "13, 10")


def qemu_pids(tmp_path: Path) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"/") and b"qemu-system" in cmdline.split(b"\0")[0] \
                and str(tmp_path).encode() in cmdline:
            pids.append(int(pid))
    return pids


def wait_until(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def start_migrate(v2p: V2P, disk: Path, vmid: int, *extra: str, **env: str) -> subprocess.Popen[str]:
    """v2p migrate as the leader of its own process group (so the test can signal the group)."""
    return subprocess.Popen(v2p.argv("migrate", str(disk), "--vmid", str(vmid), *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=v2p.env(**env), start_new_session=True)


def assert_vm_stopped(v2p: V2P, tmp_path: Path, vmid: int) -> None:
    wait_until(lambda: not qemu_pids(tmp_path), 10, "the boot check's QEMU outlived v2p")
    listing = v2p("vm", "list")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.split()[:1] == [str(vmid)])
    assert "stopped" in row and "running" not in row, listing.stdout


KILLS = [("SIGKILL", False), ("SIGKILL", True), ("SIGTERM", False), ("SIGTERM", True),
         ("SIGINT", False), ("SIGINT", True)]


@pytest.mark.parametrize(("signame", "group"), KILLS, ids=[f"{s}-{'group' if g else 'process'}" for s, g in KILLS])
def test_v2p_killed_during_the_boot_check_leaves_no_guest(tmp_path: Path, v2p: V2P, silent_disk: Path,
                                                          signame: str, group: bool) -> None:
    proc = start_migrate(v2p, silent_disk, 150, "--boot-timeout", "120")
    try:
        wait_until(lambda: (v2p.target / "run" / "150" / "firmware.log").exists()
                   and "Booting from" in (v2p.target / "run" / "150" / "firmware.log").read_text(errors="replace"),
                   60, "the guest did not boot")
        time.sleep(1)  # well inside the watch loop
        assert qemu_pids(tmp_path)
        sig = getattr(signal, signame)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    if signame != "SIGKILL":
        assert "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == "v2p: interrupted; run the same command again to resume", err
        assert proc.returncode == 128 + getattr(signal, signame)
    assert_vm_stopped(v2p, tmp_path, 150)
    assert "boot" not in v2p.state(150)["stages"]


def test_killed_before_the_guest_ran_then_resumed(tmp_path: Path, v2p: V2P, getty_disk: Path) -> None:
    """SIGKILL while QEMU is still paused (before ``cont``): no paused QEMU is left; a rerun resumes."""
    proc = start_migrate(v2p, getty_disk, 151, V2P_TEST_HOLD_AFTER="qemu:paused")
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "holding after qemu:paused" in line, line
        assert qemu_pids(tmp_path)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert_vm_stopped(v2p, tmp_path, 151)
    again = v2p("migrate", str(getty_disk), "--vmid", "151")
    assert again.returncode == 0, again.stderr
    assert "resuming the migration of VMID 151" in again.stdout
    assert v2p.state(151)["stages"]["boot"]["result"]["signal"] == "login prompt on the serial console"


def test_interrupted_boot_check_resumes(tmp_path: Path, v2p: V2P, getty_disk: Path) -> None:
    proc = start_migrate(v2p, getty_disk, 152, V2P_TEST_HOLD_AFTER="qemu:paused")
    try:
        assert proc.stderr is not None
        assert "holding after qemu:paused" in proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == "v2p: interrupted; run the same command again to resume", err
    assert_vm_stopped(v2p, tmp_path, 152)
    again = v2p("migrate", str(getty_disk), "--vmid", "152")
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout and "VM 152 migrated" in again.stdout


def test_boot_check_ends_on_the_login_prompt(tmp_path: Path, v2p: V2P, getty_disk: Path) -> None:
    proc = v2p("migrate", str(getty_disk), "--vmid", "153", "--boot-timeout", "60")
    assert proc.returncode == 0, proc.stderr
    state = v2p.state(153)["stages"]
    boot = state["boot"]["result"]
    assert boot["outcome"] == "up" and boot["signal"] == "login prompt on the serial console", boot
    assert boot["seconds"] < 15, boot
    assert "guest up after" in proc.stdout and "login prompt on the serial console" in proc.stdout
    # This guest halts with interrupts off: it never acts on the power button. The check's VM
    # is stopped hard after a short grace, not after a long shutdown timeout.
    assert state["finish"]["result"]["stopped"] == "hard"
    assert state["finish"]["seconds"] < 10, state["finish"]
    assert_vm_stopped(v2p, tmp_path, 153)


def test_start_keeps_the_checked_vm_after_v2p_exits(tmp_path: Path, v2p: V2P, getty_disk: Path) -> None:
    proc = v2p("migrate", str(getty_disk), "--vmid", "154", "--start")
    assert proc.returncode == 0, proc.stderr
    time.sleep(1)
    pids = qemu_pids(tmp_path)
    assert len(pids) == 1, "the --start VM did not outlive v2p"
    assert "154  running" in v2p("vm", "list").stdout
    assert v2p("vm", "stop", "154", "--timeout", "1").returncode == 0
    assert_vm_stopped(v2p, tmp_path, 154)
    assert v2p("vm", "start", "154").returncode == 0
    time.sleep(1)
    assert len(qemu_pids(tmp_path)) == 1, "a `vm start` VM did not outlive v2p"
    assert "154  running" in v2p("vm", "list").stdout
    v2p("vm", "stop", "154", "--timeout", "1")


@pytest.mark.parametrize(("text", "sign"), [
    ("Debian GNU/Linux 12 debian ttyS0\r\n\r\ndebian login: ", "login prompt"),
    ("\r\nWelcome to Alpine Linux 3.19\r\nKernel 6.6.8 on an x86_64 (/dev/ttyS0)\r\n\r\nalpine login: ",
     "login prompt"),
    ("Ubuntu 22.04.3 LTS web-01.example.com ttyS0\n\nweb-01.example.com login: ", "login prompt"),
    ("[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1;39mmulti-user.target\x1b[0m - Multi-User System.\r\n",
     "systemd target"),
    ("[  OK  ] Reached target Graphical Interface.\r\n", "systemd target"),
    ("\r\nComputer is booting, SAC started and initialized.\r\n\r\nUse the \"ch -?\" command", "Windows SAC"),
    ("\r\nSAC>", "Windows SAC"),
])
def test_readiness_signs_of_real_guests(text: str, sign: str) -> None:
    assert bootwatch.ready_sign(text) == sign


@pytest.mark.parametrize("text", [
    "[    3.1] systemd-logind[301]: New seat seat0.\r\n",
    "[  OK  ] Reached target Local File Systems.\r\n",
    "Last login: Tue Dec  1 10:00:00 on ttyS0",
    "v2p-guest: windows up on ide\r\n",
])
def test_not_readiness(text: str) -> None:
    assert bootwatch.ready_sign(text) is None


@pytest.mark.parametrize(("text", "code"), [
    ("*** STOP: 0x0000007B (0xF78D2524,0xC0000034,0x00000000,0x00000000)\r\n",
     "*** STOP: 0x0000007B (0xF78D2524,0xC0000034,0x00000000,0x00000000)"),
    ("Your PC ran into a problem\r\nStop code: INACCESSIBLE_BOOT_DEVICE\r\n", "Stop code: INACCESSIBLE_BOOT_DEVICE"),
    ("v2p-guest: STOP 0x0000007B INACCESSIBLE_BOOT_DEVICE\r\n", "STOP 0x0000007B INACCESSIBLE_BOOT_DEVICE"),
])
def test_stop_codes_of_real_windows(text: str, code: str) -> None:
    assert bootwatch.stop_code(text) == code


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_swallowed_interrupt_is_not_lost() -> None:
    """A SIGINT whose KeyboardInterrupt lands in a finaliser ("Exception ignored") still stops the run."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    interrupts.install()
    try:
        class Finaliser:
            def __del__(self) -> None:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler runs (and raises) between these bytecodes
                    pass

        Finaliser()
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    finally:
        interrupts._received.clear()
        for signum, handler in saved.items():
            signal.signal(signum, handler)


# -- the three outcomes on real boots (issue 17): what a dead guest and a live one end as ---------
# Boot sectors of the dead cases (each of them a real failure, not something only our guests print).
HALTS = "cli\nhlt\njmp $-1\n"  # a boot loader stuck with nothing on screen
TRIPLE_FAULT = "cli\nlidt [idt]\nint 3\nidt: dw 0\ndd 0\n"  # no IDT: the CPU resets, again and again
PANICS = "mov al, 1\nmov dx, 0x505\nout dx, al\ncli\nhlt\n"  # pvpanic: "guest panicked" (bit 0)


def boot_sector_disk(folder: Path, name: str, code: str) -> Path:
    """A 32 MiB raw disk whose boot sector runs ``code`` (16-bit, at 0x7c00)."""
    folder.mkdir(parents=True, exist_ok=True)
    asm = folder / f"{name}.asm"
    asm.write_text(f"bits 16\norg 0x7c00\n{code}\ntimes 510-($-$$) db 0\ndw 0xaa55\n")
    subprocess.run(["nasm", "-f", "bin", "-o", str(folder / f"{name}.bin"), str(asm)], check=True)
    disk = folder / f"{name}.raw"
    disk.write_bytes((folder / f"{name}.bin").read_bytes() + bytes((32 << 20) - 512))
    return disk


def boot(tmp_path: Path, disk: Path, *, timeout: float, **extra: str) -> BootReport:
    """Boot ``disk`` (a path, as scsi0 on virtio-scsi, a NIC out of the boot order) on a local
    target and return the boot check's report."""
    if tmp_path not in disk.parents:  # a shared sample: QEMU takes a write lock on what it boots (and
        copy = tmp_path / f"boot-{disk.name}"  # the guest may write): boot a copy, never the sample
        shutil.copyfile(disk, copy)
        disk = copy
    target = LocalTarget(tmp_path / "target", accel="tcg")
    config = {"name": "case", "memory": "256", "scsihw": "virtio-scsi-single", "scsi0": str(disk),
              "boot": "order=scsi0", "net0": "virtio=52:54:00:12:34:56,bridge=vmbr0", **extra}
    target.create_vm(170, config)
    try:
        return target.boot_check(170, timeout=timeout)
    finally:
        if target.status(170) == "running":
            target._kill(170)


@pytest.mark.usefixtures("boots")
def test_a_disk_without_boot_code_fails(tmp_path: Path) -> None:
    zeros = tmp_path / "zeros.raw"
    zeros.write_bytes(bytes(32 << 20))
    report = boot(tmp_path, zeros, timeout=60)
    assert report.outcome == BOOT_FAILED, report
    assert report.signal == "the firmware found nothing to boot: No bootable device", report.signal
    assert report.seconds < 15, report  # SeaBIOS gives up within a second or two of TCG
    assert report.signs["no bootable device"]["at"] < 15


@pytest.mark.usefixtures("boots")
def test_a_halting_boot_sector_is_unconfirmed_at_the_timeout(tmp_path: Path) -> None:
    """What the old check called up ("20s without a reset after the firmware handed over")."""
    report = boot(tmp_path, boot_sector_disk(tmp_path, "halt", HALTS), timeout=30)
    assert report.outcome == BOOT_UNCONFIRMED, report
    assert 30 <= report.seconds < 40, report
    assert "no sign of an OS within 30s" in report.signal and "scsi0 read" in report.signal, report.signal
    assert "boot disk reads" not in report.signs and "network" not in report.signs, report.signs
    assert report.signs["firmware handover"]["at"] < 10, report.signs
    assert report.signs["boot disk read in all"]["value"] < 64 << 10, report.signs  # SeaBIOS's few sectors


@pytest.mark.usefixtures("boots")
def test_a_boot_sector_that_resets_in_a_loop_fails(tmp_path: Path) -> None:
    report = boot(tmp_path, boot_sector_disk(tmp_path, "triple", TRIPLE_FAULT), timeout=60)
    assert report.outcome == BOOT_FAILED, report
    # A loop is called one at its third reset; a busy machine's poll may see more by then: the signal
    # says how many it saw.
    assert report.resets >= 3 and f"reset {report.resets} times" in report.signal, report
    assert report.seconds < 20, report


@pytest.mark.usefixtures("boots")
def test_a_guest_panic_fails(tmp_path: Path) -> None:
    report = boot(tmp_path, boot_sector_disk(tmp_path, "panic", PANICS), timeout=60)
    assert report.outcome == BOOT_FAILED, report
    assert "panic" in report.signal, report.signal
    assert report.seconds < 15, report
    assert "guest panic" in report.signs


@pytest.mark.usefixtures("boots")
def test_the_sample_guest_is_up_by_its_acpi_power_off(tmp_path: Path, samples: Path) -> None:
    report = boot(tmp_path, samples / "guest.raw", timeout=60)
    assert report.outcome == BOOT_UP, report
    assert report.signal == "the guest shut itself down (ACPI)", report.signal
    assert report.seconds < 15, report


@pytest.mark.usefixtures("boots")
def test_the_efi_sample_under_seabios_is_not_up(tmp_path: Path, samples: Path) -> None:
    """Issue 17's first case: it was "guest up after 20.71s"."""
    report = boot(tmp_path, samples / "efi" / "efi.raw", timeout=40)
    assert report.outcome in (BOOT_FAILED, BOOT_UNCONFIRMED), report
    assert report.seconds < 50, report


@pytest.mark.usefixtures("boots")
def test_a_bios_disk_under_ovmf_fails(tmp_path: Path, samples: Path) -> None:
    report = boot(tmp_path, samples / "guest.raw", timeout=90, bios="ovmf", machine="q35")
    assert report.outcome == BOOT_FAILED, report
    # OVMF's words when it has no shell; Debian's OVMF falls through to its UEFI shell instead.
    assert re.search(r'No bootable option or device was found|starting Boot\w+ "EFI Internal Shell"',
                     report.signal), report.signal
    assert report.seconds < 60, report


@pytest.mark.usefixtures("boots")
def test_a_boot_loader_at_its_rescue_prompt_fails(tmp_path: Path, samples: Path) -> None:
    """GRUB 2 without its prefix partition, as it really prints it (sample_images/dead.asm, on the
    screen and COM1): failed on its words, long before the timeout, never up."""
    report = boot(tmp_path, samples / "dead" / "grubrescue.raw", timeout=60)
    assert report.outcome == BOOT_FAILED, report
    assert report.signal.startswith("the boot loader is stranded: "), report.signal
    assert report.seconds < 15, report
