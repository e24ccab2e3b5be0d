"""The sample guests behave as real ones do on what a hypervisor can see, checked through
QEMU itself (no v2p): each image booted with qemu-system-x86_64 -accel tcg, watched
through QMP (query-blockstats, events, query-status, pmemsave of the text screen), the
serial port and SeaBIOS's debug port.  The boot check's signs rest on this behaviour: the
live guests read their "kernel" and power themselves off a while later; the dead cases
halt, reset in a loop, sit at GRUB's rescue prompt, panic, or hold no boot code at all."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

pytestmark = pytest.mark.usefixtures("boots")  # every test here boots a guest

MIB = 1024 * 1024
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
BOOT_LIMIT = 90.0  # seconds any sign may take under TCG on a busy 2-CPU host
POLL = 0.25
# What a stuck boot sector may read: the MBR SeaBIOS loads (and what else the firmware
# probes); far below the boot check's OS_READ_BYTES.
STUCK_READ_LIMIT = 64 * 1024


class Machine:
    """One qemu-system-x86_64 run, QMP connected (QEMU connects to our socket, so no
    event is missed).  ``-no-shutdown``: a guest power-off stops the VM and QMP stays
    up for its counters."""

    def __init__(self, proc: subprocess.Popen[bytes], qmp: QEMUMonitorProtocol, serial: Path,
                 started: float) -> None:
        self.proc = proc
        self.qmp = qmp
        self.serial_path = serial
        self.started = started
        self.events: list[tuple[float, dict[str, Any]]] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rd_bytes(self, drive: str = "disk0") -> int:
        stats = self.qmp.cmd("query-blockstats")
        assert isinstance(stats, list)
        for entry in stats:
            if entry.get("device") == drive:
                return int(entry["stats"]["rd_bytes"])
        raise AssertionError(f"no blockstats for {drive}: {stats}")

    def status(self) -> str:
        result = self.qmp.cmd("query-status")
        assert isinstance(result, dict)
        return str(result["status"])

    def serial(self) -> str:
        return self.serial_path.read_bytes().decode("ascii", "replace")

    def pull_events(self) -> None:
        for event in self.qmp.get_events(wait=False) or []:
            self.events.append((self.elapsed(), event))

    def seen(self, name: str) -> list[tuple[float, dict[str, Any]]]:
        return [(at, event) for at, event in self.events if event["event"] == name]

    def screen_text(self, tmp_path: Path) -> str:
        """The VGA text screen (80x25 at 0xB8000, character bytes only), as the guest left it."""
        dump = tmp_path / "screen.bin"
        self.qmp.cmd("pmemsave", val=0xB8000, size=80 * 25 * 2, filename=str(dump))
        cells = dump.read_bytes()[::2]
        return "\n".join(cells[i:i + 80].decode("cp437").rstrip() for i in range(0, len(cells), 80))

    def watch(self, until: Any, limit: float = BOOT_LIMIT) -> float:
        """Poll (events, and whatever ``until`` checks) every POLL s until ``until(self)``
        is true; the seconds since start when it was.  Fails after ``limit`` s."""
        while True:
            self.pull_events()
            if until(self):
                return self.elapsed()
            if self.proc.poll() is not None:
                pytest.fail(f"QEMU exited ({self.proc.returncode}) before the sign; serial:\n{self.serial()}")
            if self.elapsed() > limit:
                pytest.fail(f"no sign after {limit} s; events {self.events}; serial:\n{self.serial()[-2000:]}")
            time.sleep(POLL)


@contextmanager
def machine(tmp_path: Path, disk: Path, *extra: str, bus: str = "ide",
            fmt: str = "raw") -> Iterator[Machine]:
    """Boot ``disk`` (a snapshot: the built image stays untouched) as drive ``disk0`` on
    ``bus`` (ide, virtio-blk or ahci), with ``extra`` arguments."""
    sock = tmp_path / "qmp.sock"
    serial = tmp_path / "serial.log"
    device = {"ide": "ide-hd,drive=disk0,bus=ide.0",
              "virtio-blk": "virtio-blk-pci,drive=disk0",
              "ahci": "ide-hd,drive=disk0,bus=ide.0"}[bus]  # q35's ICH9 AHCI is bus ide.N
    qmp = QEMUMonitorProtocol(str(sock), server=True)
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-display", "none",
            "-monitor", "none", "-nic", "none", "-no-shutdown", "-serial", f"file:{serial}", "-qmp", f"unix:{sock}",
            "-drive", f"file={disk},format={fmt},if=none,id=disk0,snapshot=on",
            "-device", device, *extra]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    started = time.monotonic()
    try:
        qmp.accept(timeout=30)
        yield Machine(proc, qmp, serial, started)
    finally:
        qmp.close()
        proc.kill()
        proc.wait()


def ovmf_args(tmp_path: Path) -> list[str]:
    if not OVMF_CODE.exists():
        pytest.fail(f"{OVMF_CODE} missing: apt-get install ovmf (scripts/setup-system.sh)")
    vars_copy = tmp_path / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, vars_copy)
    return ["-machine", "q35,smm=off",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]


def report(what: str, **numbers: object) -> None:
    """The measured numbers, for the bench table (visible with pytest -s)."""
    print(f"\n[sample-guest] {what}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


# ---------------------------------------------------------------------------
# live guests: read a kernel, print, wait, power off by themselves


@pytest.mark.parametrize("bus", ["ide", "virtio-blk"])
def test_plain_guest_reads_its_kernel_then_powers_itself_off(
        tmp_path: Path, samples: Path, manifest: dict[str, Any], bus: str) -> None:
    kernel = manifest["kernel_bytes"]
    assert kernel >= 10 * MIB
    with machine(tmp_path, samples / "guest.raw", bus=bus) as m:
        read_at: list[float] = []

        def shut_down(m: Machine) -> bool:
            if not read_at and m.rd_bytes() >= kernel:
                read_at.append(m.elapsed())
            return bool(m.seen("SHUTDOWN"))

        m.watch(shut_down)
        down_at, event = m.seen("SHUTDOWN")[0]
        rd = m.rd_bytes()
        assert event["data"]["reason"] == "guest-shutdown", event
        assert m.status() == "shutdown"
    assert rd >= kernel, rd
    assert read_at, "the reads were never seen before the power-off"
    # PVE polls status/current every 0.5 s: the reads must be visible well before the guest goes
    assert down_at - read_at[0] >= 1.0, (read_at, down_at)
    serial = m.serial()
    expected = manifest["expected_serial"]
    for key in ("sectors", "marker", "poweroff"):
        assert expected[key] in serial, serial
    report(f"guest.raw on {bus}", rd_bytes=rd, reads_seen_s=round(read_at[0], 2),
           guest_shutdown_s=round(down_at, 2))


def test_efi_guest_reads_its_kernel_then_powers_itself_off(
        tmp_path: Path, samples: Path, manifest: dict[str, Any]) -> None:
    efi = manifest["efi"]
    kernel = efi["kernel_bytes"]
    assert kernel >= 10 * MIB
    with machine(tmp_path, samples / efi["raw"], *ovmf_args(tmp_path), bus="virtio-blk") as m:
        read_at: list[float] = []

        def shut_down(m: Machine) -> bool:
            rd = m.rd_bytes()
            if not read_at and rd >= kernel:
                read_at.append(m.elapsed())
            return bool(m.seen("SHUTDOWN"))

        m.watch(shut_down)
        down_at, event = m.seen("SHUTDOWN")[0]
        rd = m.rd_bytes()
        assert event["data"]["reason"] == "guest-shutdown", event
    assert rd >= kernel, rd
    assert read_at and down_at - read_at[0] >= 1.0, (read_at, down_at)
    assert efi["expected_serial"]["up"] in m.serial()
    report("efi.raw under OVMF on virtio-blk", rd_bytes=rd, firmware_reads=rd - kernel,
           reads_seen_s=round(read_at[0], 2), guest_shutdown_s=round(down_at, 2))


# ---------------------------------------------------------------------------
# dead cases


def dead(samples: Path, manifest: dict[str, Any], name: str) -> Path:
    entry = manifest["dead"][name]
    assert entry["virtual_size"] <= 4 * MIB and entry["description"]
    raw: str = entry["raw"]
    return samples / raw


def test_halting_boot_sector_reads_almost_nothing_and_keeps_running(
        tmp_path: Path, samples: Path, manifest: dict[str, Any]) -> None:
    hold = 8.0  # longer than the plain guest needs for its whole kernel
    with machine(tmp_path, dead(samples, manifest, "halt")) as m:
        m.watch(lambda m: m.elapsed() >= hold)
        rd = m.rd_bytes()
        assert m.status() == "running"
        assert not m.seen("SHUTDOWN") and not m.seen("RESET"), m.events
    assert 512 <= rd < STUCK_READ_LIMIT, rd  # the MBR SeaBIOS loaded, nothing after it
    report("dead/halt.raw", rd_bytes=rd, after_s=hold)


def test_reset_loop_resets_again_and_again(tmp_path: Path, samples: Path,
                                           manifest: dict[str, Any]) -> None:
    with machine(tmp_path, dead(samples, manifest, "resetloop")) as m:
        third = m.watch(lambda m: len(m.seen("RESET")) >= 3)
        resets = m.seen("RESET")
        rd = m.rd_bytes()
    assert all(event["data"]["reason"] == "guest-reset" for _, event in resets), resets
    assert rd < STUCK_READ_LIMIT, rd
    report("dead/resetloop.raw", first_reset_s=round(resets[0][0], 2), third_reset_s=round(third, 2),
           rd_bytes=rd)


def test_panicking_guest_says_so_and_raises_guest_panicked(
        tmp_path: Path, samples: Path, manifest: dict[str, Any]) -> None:
    with machine(tmp_path, dead(samples, manifest, "panic"), "-device", "pvpanic") as m:
        at = m.watch(lambda m: bool(m.seen("GUEST_PANICKED")))
    assert manifest["dead"]["panic"]["expected_serial"][0] in m.serial()
    assert "Kernel panic - not syncing: VFS: Unable to mount root fs" in m.serial()
    report("dead/panic.raw", guest_panicked_s=round(at, 2))


def test_grub_rescue_prompt_on_serial_and_screen(tmp_path: Path, samples: Path,
                                                 manifest: dict[str, Any]) -> None:
    lines = manifest["dead"]["grubrescue"]["expected_serial"]
    with machine(tmp_path, dead(samples, manifest, "grubrescue")) as m:
        at = m.watch(lambda m: "grub rescue> " in m.serial())
        m.watch(lambda m: m.elapsed() >= at + 1.0)  # idles at the prompt: no reset, no exit
        screen = m.screen_text(tmp_path)
        assert m.status() == "running" and not m.seen("RESET"), m.events
        rd = m.rd_bytes()
    serial = m.serial()
    assert serial.index(lines[0]) < serial.index(lines[1]) < serial.index(lines[2]), serial
    for line in lines:
        assert line.strip() in screen, screen
    report("dead/grubrescue.raw", prompt_s=round(at, 2), rd_bytes=rd)


def test_no_boot_code_firmware_says_no_bootable_device(tmp_path: Path, samples: Path,
                                                       manifest: dict[str, Any]) -> None:
    fw_log = tmp_path / "firmware.log"
    debugcon = ["-chardev", f"file,id=fw,path={fw_log}",
                "-device", "isa-debugcon,iobase=0x402,chardev=fw"]  # SeaBIOS's debug port
    with machine(tmp_path, dead(samples, manifest, "zeros"), *debugcon) as m:
        at = m.watch(lambda m: fw_log.exists() and b"No bootable device" in fw_log.read_bytes())
        rd = m.rd_bytes()
    assert rd < STUCK_READ_LIMIT, rd
    report("dead/zeros.raw", no_bootable_device_s=round(at, 2), rd_bytes=rd)


def test_bios_disk_under_ovmf_never_runs_its_boot_code(tmp_path: Path, samples: Path,
                                                      manifest: dict[str, Any]) -> None:
    """bios-on-uefi: the BIOS-only plain guest under OVMF.  OVMF has no boot option for a
    disk without an EFI system partition; what it does then depends on its build: one
    with the UEFI Shell (Debian's OVMF_CODE_4M.fd) starts the shell after its
    "BdsDxe: failed to load Boot000N" lines and sits at "Shell> "; one without (the
    secboot builds) says "BdsDxe: No bootable option or device was found"
    (MdeModulePkg/Universal/BdsDxe/BdsEntry.c BdsEntry).  Either way the disk's boot
    code never runs and its kernel is never read."""
    case = manifest["bios_on_uefi"]
    ends = ("No bootable option or device was found", "Shell> ")
    with machine(tmp_path, samples / case["raw"], *ovmf_args(tmp_path), bus="virtio-blk") as m:
        at = m.watch(lambda m: any(end in m.serial() for end in ends))
        rd = m.rd_bytes()
    serial = m.serial()
    assert "v2p-guest:" not in serial
    assert rd < STUCK_READ_LIMIT, rd
    report("guest.raw under OVMF (bios-on-uefi)", end=[e for e in ends if e in serial],
           end_s=round(at, 2), rd_bytes=rd)
