"""Boot benchmark: v2p's whole migrate (to a booted, checked, stopped VM) of a
real Linux guest against the floor a user could reach by hand: bare
``qemu-img convert`` + ``sync`` + one plain QEMU TCG boot to the login prompt.

The guest is Debian's own kernel with a busybox getty on ttyS0 on a 1 GiB
streamOptimized VMDK, built by ``bench/linux_guest.py`` (Debian packages are
fetched, nothing is installed into the system). Runs alternate floor and v2p;
medians of ``--runs``.

    python3 bench/boot_bench.py [--runs 3] [--workdir /var/tmp/v2p-boot-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import linux_guest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOGIN = b"login: "


def floor_run(source: Path, work: Path) -> dict[str, float]:
    """qemu-img convert + sync + a plain QEMU boot until the getty prompt (then QEMU is killed)."""
    disk = work / "floor.qcow2"
    disk.unlink(missing_ok=True)
    serial = work / "floor-serial.log"
    serial.write_bytes(b"")
    started = time.monotonic()
    subprocess.run(["qemu-img", "convert", "-f", "vmdk", "-O", "qcow2", str(source), str(disk)], check=True)
    subprocess.run(["sync"], check=True)
    converted = time.monotonic()
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", "512", "-nodefaults", "-display", "none",
         "-chardev", f"file,id=serial0,path={serial}", "-device", "isa-serial,chardev=serial0",
         "-drive", f"file={disk},format=qcow2,if=none,id=d0,cache=writeback",
         "-device", "virtio-scsi-pci", "-device", "scsi-hd,drive=d0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while LOGIN not in serial.read_bytes():
            if qemu.poll() is not None or time.monotonic() - converted > 300:
                raise SystemExit(f"boot_bench: the floor boot never showed a login prompt (see {serial})")
            time.sleep(0.05)
        up = time.monotonic()
    finally:
        qemu.kill()
        qemu.wait()
    return {"total": up - started, "convert_sync": converted - started, "boot": up - converted}


def v2p_run(source: Path, work: Path, vmid: int) -> dict[str, float]:
    target = work / "target"
    shutil.rmtree(target, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2P_")}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "v2p", "--accel", "tcg", "--target-dir", str(target), "migrate",
                           str(source), "--vmid", str(vmid), "--os", "l26"],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    total = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"boot_bench: v2p migrate failed:\n{proc.stderr}")
    state = json.loads((target / "migrations" / f"{vmid}.json").read_text())
    stages = {name: record["seconds"] for name, record in state["stages"].items()}
    boot, finish = state["stages"]["boot"]["result"], state["stages"]["finish"]["result"]
    if boot.get("outcome") != "up" or finish.get("status") != "stopped":
        raise SystemExit(f"boot_bench: v2p did not leave a booted, stopped VM: {boot}, {finish}")
    return {"total": total, **stages, "signal": boot["signal"], "stopped": finish.get("stopped", "")}  # type: ignore[dict-item]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/v2p-boot-bench"))
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    source = work / "guest" / "linux-guest.vmdk"
    if not source.exists():
        linux_guest.build(work / "guest", work / "debs")
    floors, ours = [], []
    for run in range(args.runs):
        floors.append(floor_run(source, work))
        ours.append(v2p_run(source, work, 100))
        print(f"run {run + 1}: floor {floors[-1]['total']:.2f}s (convert+sync {floors[-1]['convert_sync']:.2f}s, "
              f"boot {floors[-1]['boot']:.2f}s); v2p {ours[-1]['total']:.2f}s "
              f"(convert {ours[-1]['convert']:.2f}s, verify {ours[-1]['verify']:.2f}s, boot {ours[-1]['boot']:.2f}s, "
              f"finish {ours[-1]['finish']:.2f}s; {ours[-1]['signal']}; stopped by {ours[-1]['stopped']})",
              flush=True)
    floor = statistics.median(r["total"] for r in floors)
    v2p = statistics.median(r["total"] for r in ours)
    print(f"median of {args.runs}: floor {floor:.2f}s, v2p migrate {v2p:.2f}s, ratio {v2p / floor:.3f} "
          f"(goal <= 1.1)")
    # The boot check alone against the bare boot to ``login:`` (issue 17: within 1.1x).
    bare = statistics.median(r["boot"] for r in floors)
    check = statistics.median(r["boot"] for r in ours)
    print(f"boot check {check:.2f}s vs bare boot to login: {bare:.2f}s, ratio {check / bare:.3f} (goal <= 1.1)")
    (work / "results.json").write_text(json.dumps({"floor": floors, "v2p": ours}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
