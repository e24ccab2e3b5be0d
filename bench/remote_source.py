"""A remote source's one read, measured: bytes the source served per disk and wall time of ``v2p migrate``
for a disk read over HTTP (the tests' example kind, tests/kinds/httpdisk.py), staged locally once
(what the pipeline does for an endpoint that is not ``rereadable``) against read twice (copy and verify
each from the server, what it would do if the endpoint said it could be read again cheaply).

The disk: ``--size-mib`` (1024) of raw, one MiB of random data every ``--every-mib`` (8), holes between.
Writes only under ``--workdir``.

    python3 bench/remote_source.py [--size-mib 1024] [--every-mib 8] [--workdir bench/out/remote]
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
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from kinds.httpdisk import COOKIE_ENV, DiskServer  # noqa: E402

# The command, with the example kind registered first (it lives with the tests, not in v2p).
RUN = ("import sys, kinds.httpdisk as kind; kind.HttpDiskSource.rereadable = sys.argv.pop(1) == 'reread'; "
       "from v2p import cli; sys.exit(cli.main(sys.argv[1:]))")


def make_disk(path: Path, size_mib: int, every_mib: int) -> None:
    rng = random.Random(18)
    with open(path, "wb") as handle:
        handle.truncate(size_mib << 20)
        for mib in range(0, size_mib, every_mib):
            handle.seek(mib << 20)
            handle.write(rng.randbytes(1 << 20))


def migrate(disk: Path, workdir: Path, mode: str) -> dict[str, object]:
    target = workdir / f"target-{mode}"
    shutil.rmtree(target, ignore_errors=True)
    with DiskServer(disk, "session=bench") as server:
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", **{COOKIE_ENV: server.cookie})
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", RUN, mode, "--target-dir", str(target), "migrate", server.uri,
                               "--vmid", "900", "--format", "raw", "--no-boot-check"],
                              env=env, capture_output=True, text=True, check=False)
        seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: {proc.stderr.strip()}")
    return {"mode": mode, "seconds": round(seconds, 2), "bytes_served": server.bytes_sent(),
            "reads_of_the_disk": round(server.bytes_sent() / disk.stat().st_size, 2),
            "bytes_served_twice": sum(end - start for start, end in server.overlaps())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--every-mib", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "remote")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    disk = args.workdir / "disk.raw"
    make_disk(disk, args.size_mib, args.every_mib)
    rows = [migrate(disk, args.workdir, mode) for mode in ("stage", "reread")]
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
