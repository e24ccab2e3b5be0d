"""PVE benchmark: one disk onto the PVE API simulator, both ways v2p reaches a node, side by side
with what an admin runs by hand on the node: ``qemu-img convert`` of the VMDK into the storage.

The disk: 2 GiB, 30 % data in 4 MiB runs, a streamOptimized VMDK (what an OVA export holds).
Measured per run (wall time of the whole command, ``--no-boot-check``):

* bare: ``qemu-img convert -f vmdk -O qcow2`` into a file on the same file system + ``sync``;
* on-node (``on-node=1``): v2p converts straight into the simulator's dir storage, verifies,
  attaches by volume id;
* remote: v2p converts to a local qcow2 staging file, verifies it, uploads it (SHA-256) to the
  import storage, and the simulator's import copies it into the VM's volume (``qemu-img convert``,
  as PVE's import-from does).

The simulator runs in this process on 127.0.0.1 (HTTPS): an upload here costs what a loopback
copy costs, not what a LAN costs.

    .venv/bin/python bench/pve_bench.py [--runs 3] [--work bench/out/pve_bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
GiB, MiB = 1 << 30, 1 << 20


def make_source(work: Path) -> Path:
    raw = work / "disk.raw"
    with open(raw, "wb") as handle:
        handle.truncate(2 * GiB)
        block = os.urandom(4 * MiB)
        for at in range(0, 2 * GiB, 40 * MiB // 3):
            handle.seek(at - at % (4 * MiB))
            handle.write(block)
    vmdk = work / "disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    str(raw), str(vmdk)], check=True)
    raw.unlink()
    return vmdk


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{argv}: {done.stdout}{done.stderr}")
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "pve_bench")
    args = parser.parse_args()
    from pve_sim.server import PVESim

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    vmdk = make_source(args.work)
    times: dict[str, list[float]] = {"bare": [], "on-node": [], "remote": []}
    with PVESim(args.work / "pve") as sim:
        base = f"pve://root@pam!v2p@{sim.host}/{sim.cluster.node}?storage=local&fingerprint={sim.fingerprint}"
        env = {**os.environ, "V2P_PVE_TOKEN": sim.tokens["root@pam!v2p"], "XDG_DATA_HOME": str(args.work / "xdg")}
        vmid = 200
        for run in range(args.runs):
            out = args.work / f"bare-{run}.qcow2"
            times["bare"].append(timed(["sh", "-c", f"qemu-img convert -f vmdk -O qcow2 {vmdk} {out} && sync"]))
            out.unlink()
            for path, url in (("on-node", base + "&on-node=1"), ("remote", base)):
                vmid += 1
                times[path].append(timed([sys.executable, "-m", "v2p", "--target", url, "migrate", str(vmdk),
                                          "--vmid", str(vmid), "--no-boot-check"], env))
                subprocess.run([sys.executable, "-m", "v2p", "--target", url, "vm", "rm", str(vmid)],
                               env=env, capture_output=True)
        floor = statistics.median(times["bare"])
        print("| way | median s | runs | / bare |")
        print("|---|---|---|---|")
        for way, seen in times.items():
            median = statistics.median(seen)
            print(f"| {way} | {median:.2f} | {', '.join(f'{t:.2f}' for t in seen)} | {median / floor:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
