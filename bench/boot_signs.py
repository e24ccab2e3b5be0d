"""Boot signs, measured: every guest this project boots locally and the dead cases, each booted on
v2p's local target (QEMU TCG) and watched for ``--seconds`` whatever happens, so every sign shows.

For each case: when each sign appeared (seconds after the start) and its value — bytes read from
the boot disk (first byte, 64 KiB, 1, 4, 8, 16 MiB crossed, in all), bytes the guest sent on a
NIC out of the boot order, resets, serial/firmware signs, QMP events — and the verdict the boot
check's engine (``v2p.bootwatch``) gives and when. The numbers behind OS_READ_BYTES
(bench/README.md, "Boot signs").

    python3 bench/boot_signs.py [--seconds 45] [--only REGEX] [--debian /var/tmp/h17a-bench/guest/linux-guest.vmdk]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from v2p.bootwatch import HANDOVER, RESET, BootWatch, boot_devices, failure_sign, ready_sign  # noqa: E402
from v2p.targets.base import GuestIO  # noqa: E402
from v2p.targets.local import LocalTarget, _events, _read  # noqa: E402
from v2p.targets.supervisor import close_quietly  # noqa: E402

SAMPLES = ROOT / "sample_images" / "out"
MARKS = (("first read", 1), ("64 KiB", 64 << 10), ("1 MiB", 1 << 20), ("4 MiB", 4 << 20),
         ("8 MiB", 8 << 20), ("16 MiB", 16 << 20))

# Boot sectors of the dead cases (nasm, bits 16, org 0x7c00).
HALT = "cli\nhlt\njmp $-1\n"
# A triple fault: an empty IDT, then an interrupt.
TRIPLE = "cli\nlidt [idt]\nint 3\nidt: dw 0\ndd 0\n"
PANIC = "mov al, 1\nmov dx, 0x505\nout dx, al\ncli\nhlt\n"


def boot_sector(work: Path, name: str, code: str) -> Path:
    asm = work / f"{name}.asm"
    asm.write_text(f"bits 16\norg 0x7c00\n{code}\ntimes 510-($-$$) db 0\ndw 0xaa55\n")
    subprocess.run(["nasm", "-f", "bin", "-o", str(work / f"{name}.bin"), str(asm)], check=True)
    disk = work / f"{name}.raw"
    disk.write_bytes((work / f"{name}.bin").read_bytes() + bytes((32 << 20) - 512))
    return disk


def cases(work: Path, debian: Path | None) -> dict[str, tuple[Path, dict[str, str]]]:
    """name -> (disk, config besides the disk) for every case."""
    linux = {"scsihw": "virtio-scsi-single", "net0": "virtio=52:54:00:12:34:01,bridge=vmbr0", "ostype": "l26"}
    windows = {"net0": "e1000=52:54:00:12:34:02,bridge=vmbr0", "ostype": "win10"}
    ovmf = {"bios": "ovmf", "machine": "q35", "scsihw": "virtio-scsi-pci",
            "net0": "virtio=52:54:00:12:34:03,bridge=vmbr0"}
    zeros = work / "zeros.raw"
    zeros.write_bytes(bytes(32 << 20))
    found: dict[str, tuple[Path, dict[str, str]]] = {
        "sample guest (SeaBIOS)": (SAMPLES / "guest.raw", {**linux, "_bus": "scsi0"}),
        "EFI sample (OVMF)": (SAMPLES / "efi" / "efi.raw", {**ovmf, "_bus": "scsi0"}),
        "Windows stand-in, ide": (SAMPLES / "winguest.raw", {**windows, "_bus": "ide0"}),
        "Windows stand-in without driver, virtio": (SAMPLES / "winguest-nodriver.raw", {**windows, "_bus": "virtio0"}),
        "dead: EFI sample under SeaBIOS": (SAMPLES / "efi" / "efi.raw", {**linux, "_bus": "scsi0"}),
        "dead: BIOS sample under OVMF": (SAMPLES / "guest.raw", {**ovmf, "_bus": "scsi0"}),
        "dead: no boot code (zeros)": (zeros, {**linux, "_bus": "scsi0"}),
        "dead: boot sector cli;hlt": (boot_sector(work, "halt", HALT), {**linux, "_bus": "scsi0"}),
        "dead: boot sector triple fault (reset loop)": (boot_sector(work, "triple", TRIPLE),
                                                        {**linux, "_bus": "scsi0"}),
        "dead: pvpanic boot sector": (boot_sector(work, "panic", PANIC), {**linux, "_bus": "scsi0"}),
    }
    if debian is not None:
        qcow2 = work / "debian.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(debian), str(qcow2)], check=True)
        found["real Debian 12 (SeaBIOS, virtio-scsi)"] = (qcow2, {**linux, "_bus": "scsi0"})
    return found


def measure(target: LocalTarget, vmid: int, disk: Path, extra: dict[str, str], seconds: float) -> dict[str, Any]:
    bus = extra.pop("_bus")
    fmt = "qcow2" if disk.suffix == ".qcow2" else "raw"
    config = {"name": f"case{vmid}", "memory": "512", "cores": "1", bus: f"{disk}", "boot": f"order={bus}", **extra}
    if fmt == "qcow2":  # the local target takes a path as raw; a qcow2 goes through a storage
        volume = target.storage("local").volume(vmid, 0, "qcow2")
        path = target.storage("local").path_of(volume.volid)
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "--reflink=auto", str(disk), str(path)], check=True)
        config[bus] = volume.volid
    target.create_vm(vmid, config)
    boot_disk, boot_nics = boot_devices(config)
    run_dir = target._run_dir(vmid)
    started = time.monotonic()
    monitor = target._launch(vmid)
    target._monitors[vmid] = monitor
    watch = BootWatch(vmid, timeout=seconds, started=started, boot_disk=boot_disk, boot_nics=boot_nics)
    seen: dict[str, dict[str, Any]] = {}
    events: list[tuple[float, str, Any]] = []
    verdict_at = None
    io = GuestIO()
    try:
        while time.monotonic() - started < seconds:
            now = time.monotonic()
            sample = target.guest_io(vmid)
            if sample is not None:
                io = sample
                watch.observe_io(now, io)
                reads = io.reads.get(boot_disk or "", 0)
                for name, mark in MARKS:
                    if reads >= mark and name not in seen:
                        seen[name] = {"at": round(now - started, 2), "value": reads}
                sent = sum(io.sent.values())
                if sent and "sent" not in seen:
                    seen["sent"] = {"at": round(now - started, 2), "value": sent}
            serial, firmware = _read(run_dir / "serial.log"), _read(run_dir / "firmware.log")
            for text in (serial, firmware):
                failure = failure_sign(text)
                handover = HANDOVER.search(text)
                for name, value in ((ready_sign(text), True), (failure and failure[0], failure and failure[1]),
                                    (handover and "firmware handover", handover and handover.group(0))):
                    if name and name not in seen:
                        seen[name] = {"at": round(now - started, 2), "value": value}
            verdict = watch.look(serial, firmware, now)
            if verdict is not None and verdict_at is None:
                verdict_at = (round(now - started, 2), verdict.outcome, verdict.signal)
            for event in _events(monitor, wait=0.25):
                name = str(event.get("event"))
                events.append((round(time.monotonic() - started, 2), name, event.get("data")))
                if name == RESET:
                    resets = seen.setdefault("resets", {"at": round(time.monotonic() - started, 2), "value": 0})
                    resets["value"] += 1
                if name == RESET:
                    watch.reset(time.monotonic(), "")
                else:
                    watch.event(time.monotonic(), name, event.get("data"))
            if not target._vm(vmid).running():
                verdict = watch.look(serial, firmware, time.monotonic())  # the events of its last moments
                if verdict is not None and verdict_at is None:
                    verdict_at = (round(time.monotonic() - started, 2), verdict.outcome, verdict.signal)
                break
    finally:
        target._monitors.pop(vmid, None)
        close_quietly(monitor)
        target._vm(vmid).kill()
    serial = _read(run_dir / "serial.log")
    firmware = _read(run_dir / "firmware.log")
    return {"reads": io.reads.get(boot_disk or "", 0), "reads_all": io.reads, "sent": io.sent,
            "marks": seen, "events": events, "verdict": verdict_at, "engine_signs": watch.signs,
            "ran": round(time.monotonic() - started, 2),
            "serial_tail": serial[-300:], "firmware_tail": firmware[-300:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--only", default="")
    parser.add_argument("--debian", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "boot_signs.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="v2p-boot-signs-") as folder:
        work = Path(folder)
        target = LocalTarget(work / "target", accel="tcg")
        for vmid, (name, (disk, extra)) in enumerate(cases(work, args.debian).items(), start=900):
            if not re.search(args.only, name):
                continue
            results[name] = result = measure(target, vmid, disk, dict(extra), args.seconds)
            print(json.dumps({name: result}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
