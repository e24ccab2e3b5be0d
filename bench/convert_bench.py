"""Benchmark: v2p migrate next to what a user would otherwise run by hand.

Builds a test disk (default 1 GiB virtual, a quarter of it random data spread
in 4 MiB runs), writes it as monolithicSparse and monolithicFlat VMDKs, then
times in one run, side by side:

  sparse -> qcow2:  bare `qemu-img convert -f vmdk -O qcow2`  vs  `v2p migrate`
  flat   -> raw:    `dd bs=4M conv=sparse`                     vs  `v2p migrate --format raw`

v2p's numbers include what the bare tools skip (inspect, qemu-img measure,
the full qemu-img compare verify); the convert stage alone is reported too.
Peak RSS is the largest resident set of the command and its children.
Usage: python bench/convert_bench.py [--size-mib 1024] [--out bench/out]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """(seconds, peak RSS in MiB) of one command and its children."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench: {argv[0]} failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return seconds, usage.ru_maxrss // 1024


def make_disk(path: Path, size_mib: int) -> None:
    rng = random.Random(42)
    with open(path, "wb") as disk:
        disk.truncate(size_mib << 20)
        for run in range(0, size_mib, 16):  # 4 MiB of data in every 16 MiB
            disk.seek((run + rng.randrange(12)) << 20)
            disk.write(rng.randbytes(4 << 20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    out: Path = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    raw = out / "disk.raw"
    make_disk(raw, args.size_mib)
    for flavor in ("monolithicSparse", "monolithicFlat"):
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={flavor}",
                        str(raw), str(out / f"{flavor}.vmdk")], check=True)
    v2p = [sys.executable, "-m", "v2p", "--accel", "tcg"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rows = []

    bare = timed(["qemu-img", "convert", "-f", "vmdk", "-O", "qcow2",
                  str(out / "monolithicSparse.vmdk"), str(out / "bare.qcow2")])
    ours = timed([*v2p, "--target-dir", str(out / "t1"), "migrate", str(out / "monolithicSparse.vmdk"),
                  "--vmid", "900", "--no-boot-check"], env)
    stage = json.loads((out / "t1" / "migrations" / "900.json").read_text())
    rows.append(("sparse vmdk -> qcow2", "qemu-img convert", bare, ours))

    bare = timed(["dd", f"if={out / 'monolithicFlat-flat.vmdk'}", f"of={out / 'dd.raw'}", "bs=4M",
                  "conv=sparse", "status=none"])
    ours_raw = timed([*v2p, "--target-dir", str(out / "t2"), "migrate", str(out / "monolithicFlat.vmdk"),
                      "--vmid", "901", "--format", "raw", "--no-boot-check"], env)
    rows.append(("flat vmdk -> raw", "dd bs=4M conv=sparse", bare, ours_raw))

    print(f"disk: {args.size_mib} MiB virtual, {args.size_mib // 4} MiB of data")
    print(f"{'case':<22} {'baseline':<22} {'base s':>7} {'v2p s':>7} {'ratio':>6} "
          f"{'base MiB':>8} {'v2p MiB':>8}")
    for case, base_name, (bs, bm), (vs, vm) in rows:
        print(f"{case:<22} {base_name:<22} {bs:7.2f} {vs:7.2f} {vs / bs:6.2f} {bm:8d} {vm:8d}")
    print("v2p stage seconds (qcow2 case): " + ", ".join(
        f"{name} {rec['seconds']:.2f}" for name, rec in stage["stages"].items()))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
