"""Benchmark: v2p's windowed copy next to one bare `qemu-img convert`, and a copy killed at 75 % resumed.

Builds a test disk (default 4 GiB virtual, a quarter of it random data in 4 MiB runs, as
convert_bench.py builds its disks), writes it as a monolithicSparse VMDK, then, in one run and
interleaved (``--rounds``, default 3; the medians are reported, with the spread that says the noise):

  bare:      `qemu-img convert -f vmdk -O qcow2` and an fsync of the result (what v2p did before)
  windowed:  v2p's copy of the same disk to qcow2 (``v2p.windows.copy``: 32 windows of 128 MiB, each
             flushed while the next one copies, then checkpointed)
  resume:    the windowed copy in a child process, SIGKILLed once its position passes 75 %, then
             carried on from its last checkpoint; the time of the resumed part only

and once, --bwlimit 8192 (KiB/s) on a 64 MiB all-data disk and on a 64 MiB disk holding 4 MiB: the limit
holds the bytes written (about 8 s for the first), and zeros are not slowed (the second is quick).

Usage: python bench/resume_bench.py [--size-mib 4096] [--rounds 3] [--out bench/out-resume]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from convert_bench import make_disk  # noqa: E402

from v2p import windows  # noqa: E402
from v2p.endpoint import DiskEndpoint  # noqa: E402
from v2p.storage import Volume  # noqa: E402

# The child: copy with checkpoints written to a file, positions printed, until killed.
CHILD = """
import json, sys
from pathlib import Path
from v2p import windows
from v2p.endpoint import DiskEndpoint
from v2p.storage import Volume
src, dst, capacity, log = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
def saved(point):
    log.write_text(json.dumps(point.record()))
def progress(position, moved):
    print(position, flush=True)
windows.copy(DiskEndpoint("vmdk", src, capacity), Volume("", dst, "qcow2"), capacity=capacity,
             on_progress=progress, on_checkpoint=saved)
"""


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bare(src: Path, dst: Path) -> float:
    dst.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-f", "vmdk", "-O", "qcow2", str(src), str(dst)], check=True)
    fsync(dst)
    return time.perf_counter() - start


def windowed(src: Path, dst: Path, capacity: int) -> tuple[float, int]:
    dst.unlink(missing_ok=True)
    start = time.perf_counter()
    moved = windows.copy(DiskEndpoint("vmdk", str(src), capacity), Volume("", dst, "qcow2"), capacity=capacity)
    return time.perf_counter() - start, moved


def killed_and_resumed(src: Path, dst: Path, capacity: int, log: Path) -> tuple[float, float, int]:
    """(position when killed, as a fraction; seconds of the resumed part; bytes the resumed part wrote)."""
    dst.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(dst), str(capacity), str(log)],
                             stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    position = 0
    for line in child.stdout:
        position = int(line)
        if position >= capacity * 3 // 4:
            child.send_signal(signal.SIGKILL)
            break
    child.wait()
    point = windows.Checkpoint.of(json.loads(log.read_text()))
    assert point is not None
    start = time.perf_counter()
    moved = windows.copy(DiskEndpoint("vmdk", str(src), capacity), Volume("", dst, "qcow2"), capacity=capacity,
                         start=point)
    return position / capacity, time.perf_counter() - start, moved


def bwlimited(out: Path) -> list[str]:
    """--bwlimit 8192 (KiB/s) against real bytes: a 64 MiB all-data disk, and a 64 MiB one holding 4 MiB
    (at its end, after 60 MiB of zeros), each copied onto a fresh raw file."""
    lines = []
    for name, data_mib in (("all data", 64), ("4 MiB of data", 4)):
        src = out / "bw.raw"
        with open(src, "wb") as disk:
            disk.truncate(64 << 20)
            disk.seek((64 - data_mib) << 20)
            disk.write(os.urandom(data_mib << 20))
        dst = out / "bw-out.raw"
        dst.unlink(missing_ok=True)
        start = time.perf_counter()
        moved = windows.copy(DiskEndpoint("raw", str(src), 64 << 20), Volume("", dst, "raw"), capacity=64 << 20,
                             bwlimit=8192 * 1024)
        seconds = time.perf_counter() - start
        lines.append(f"  --bwlimit 8192, 64 MiB disk, {name:<13}: {seconds:.2f} s, {moved >> 20} MiB written "
                     f"({moved / seconds / (1 << 20):.1f} MiB/s of written bytes)")
    return lines


def same(src: Path, dst: Path) -> None:
    subprocess.run(["qemu-img", "compare", "-q", "-f", "vmdk", "-F", "qcow2", str(src), str(dst)], check=True)


def spread(values: list[float]) -> str:
    middle = statistics.median(values)
    runs = ", ".join(f"{v:.2f}" for v in values)
    return f"{middle:.2f} s (runs {runs}; spread ±{(max(values) - min(values)) / 2 / middle:.0%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out-resume")
    args = parser.parse_args()
    out: Path = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    raw, vmdk = out / "disk.raw", out / "disk.vmdk"
    make_disk(raw, args.size_mib)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse",
                    str(raw), str(vmdk)], check=True)
    raw.unlink()
    capacity = args.size_mib << 20
    times: dict[str, list[float]] = {"bare": [], "windowed": [], "resume": []}
    killed_at: list[float] = []
    moved: dict[str, int] = {}
    for _ in range(args.rounds):  # interleaved: a busy moment of the shared CPU hits every side alike
        times["bare"].append(bare(vmdk, out / "bare.qcow2"))
        seconds, moved["windowed"] = windowed(vmdk, out / "win.qcow2", capacity)
        times["windowed"].append(seconds)
        same(vmdk, out / "win.qcow2")
        at, seconds, moved["resume"] = killed_and_resumed(vmdk, out / "res.qcow2", capacity, out / "point.json")
        killed_at.append(at)
        times["resume"].append(seconds)
        same(vmdk, out / "res.qcow2")
    bare_s, win_s, res_s = (statistics.median(times[k]) for k in ("bare", "windowed", "resume"))
    print(f"disk: {args.size_mib} MiB virtual, a quarter random data; {windows.window_size(capacity) >> 20} MiB "
          f"windows; {args.rounds} rounds, interleaved; medians")
    print(f"  bare qemu-img convert + fsync : {spread(times['bare'])}")
    print(f"  v2p windowed copy             : {spread(times['windowed'])}  -> {win_s / bare_s:.3f} x bare")
    print(f"  killed at {statistics.median(killed_at):.0%}, resumed        : {spread(times['resume'])}  -> "
          f"{res_s / win_s:.3f} x the windowed copy")
    print(f"  bytes written: whole copy {moved['windowed'] >> 20} MiB, the resumed part {moved['resume'] >> 20} MiB")
    print("\n".join(bwlimited(out)))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
