"""Benchmark: v2p migrate onto directory and block storage, against the bare tools.

Builds a raw test disk (default 2 GiB virtual, about 30 % random data in
scattered islands of 64 KiB - 8 MiB, deterministic seed, the rest holes) and
from it three sources: monolithicSparse, streamOptimized (both written by
qemu-img) and an ESXi flat pair (hand-written ``createType="vmfs"``
descriptor plus a sparse ``-flat.vmdk``). Then measures, each case
``--repeat`` times (rounds of every case, in a new seeded order each
round, so background load and leftover writeback hit every case alike),
medians reported:

  dir    v2p migrate -> qcow2 (total, convert stage, verify stage from the
         state file)  vs  bare ``qemu-img convert -f vmdk -O qcow2``
  block  v2p migrate --to-device /dev/loopX  vs  the seed procedure
         ``dd if=esxi-flat.vmdk of=/dev/loopX bs=4M conv=notrunc,fsync``
         and bare ``qemu-img convert -n -f vmdk -O raw``; also v2p
         ``--copy-with dd`` and ``--no-verify`` (when v2p has those flags).
         Each run gets a fresh all-zero loop device (new sparse backing file).
  bytes  block: the loop device's write/discard sectors (/sys/block/loopX/stat)
         and the backing file's allocated bytes afterwards; dir: the output
         file's allocated bytes. Compared with the source's data bytes.
  RSS    peak RSS (GNU time %M, else wait4) of every command and its
         children, plus a sampled sum over the live process tree; for v2p
         also on a ``--rss-big-gib`` virtual disk holding the same data.

After every run the target is flushed (fsync of the device / output file,
timed separately as "flush s", not part of the tool's time) and the guest's
page cache written back (sync), so one run's dirty pages never land in the
next run. (A virtual disk may still be writing back on the host side; that
is what ``--settle`` is for.)

stdlib only; needs root, losetup and qemu-img for the block part (skipped
with a note otherwise). Exits 0 even when a target is missed; 1 only if a
command failed. Every scratch file lives under ``--work-dir`` (default
bench/out/storage_bench/, removed at the end unless ``--keep``).

Usage: python bench/storage_bench.py [--size-gib 2] [--repeat 3] [--rss-big-gib 20] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SECTOR = 512
VMID = 900
MARKER = ".storage_bench"  # only a work dir carrying this file is ever wiped
GNU_TIME = "/usr/bin/time"
PAGE = os.sysconf("SC_PAGE_SIZE")

# Targets.
CONVERT_OVERHEAD_MAX = 1.03  # v2p convert stage / bare qemu-img convert
DD_SPEEDUP_MIN = 3.0  # dd bs=4M seconds / v2p seconds
BYTES_MAX = 1.05  # bytes written or allocated / source data bytes
RSS_MAX = 150 * 1000 * 1000  # bytes
RSS_BIG_SLACK = 1.05  # "no larger": 20 GiB peak within 5 % of the 2 GiB peak (measurement noise)


# --------------------------------------------------------------------------
# the test disk


def island_sizes(total: int, rng: random.Random, align: int, smallest: int, largest: int) -> list[int]:
    """Island lengths (log-uniform between smallest and largest, aligned) adding up to ``total``."""
    sizes: list[int] = []
    left = total
    while left > 0:
        size = int(math.exp(rng.uniform(math.log(smallest), math.log(largest))))
        size = max(align, size // align * align)
        size = min(size, left)
        sizes.append(size)
        left -= size
    return sizes


def spread(sizes: list[int], disk_size: int, rng: random.Random, align: int) -> list[tuple[int, int]]:
    """(offset, length) for each island, in order, the holes between them of random length."""
    holes = disk_size - sum(sizes)
    weights = [rng.random() for _ in range(len(sizes) + 1)]
    scale = holes / sum(weights)
    islands = []
    pos = 0
    for size, weight in zip(sizes, weights[:-1], strict=True):
        pos += int(weight * scale) // align * align
        islands.append((pos, size))
        pos += size
    assert pos <= disk_size
    return islands


def write_raw(path: Path, disk_size: int, islands: list[tuple[int, int]], seed: int) -> None:
    """A sparse raw file of ``disk_size`` bytes with random data in ``islands`` only."""
    rng = random.Random(seed)
    with open(path, "wb") as disk:
        disk.truncate(disk_size)
        for offset, length in islands:
            disk.seek(offset)
            while length:
                piece = min(length, 8 * MiB)
                disk.write(rng.randbytes(piece))
                length -= piece


def esxi_descriptor(sectors: int, flat_name: str) -> str:
    """The sample builder's ESXi "vmfs" descriptor (one writer for both)."""
    spec = importlib.util.spec_from_file_location("v2p_sample_build", ROOT / "sample_images" / "build.py")
    assert spec and spec.loader
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    text: str = build.esxi_descriptor(sectors, flat_name, "5eed0b1d" + "0" * 56)
    return text


@dataclass
class Disk:
    """One test disk and its VMDK sources."""

    size: int
    data: int  # bytes of data in the islands
    islands: int
    sources: dict[str, Path] = field(default_factory=dict)  # "sparse", "stream", "esxi"
    flat: Path | None = None


def build_disk(folder: Path, disk_size: int, sizes: list[int], seed: int, align: int,
               flavors: tuple[str, ...]) -> Disk:
    folder.mkdir(parents=True)
    layout = spread(sizes, disk_size, random.Random(seed + 1), align)
    raw = folder / "disk.raw"
    write_raw(raw, disk_size, layout, seed + 2)
    disk = Disk(disk_size, sum(sizes), len(sizes))
    if "sparse" in flavors:
        disk.sources["sparse"] = folder / "sparse.vmdk"
        qemu_img_to_vmdk(raw, disk.sources["sparse"], "monolithicSparse")
    if "stream" in flavors:
        disk.sources["stream"] = folder / "stream.vmdk"
        qemu_img_to_vmdk(raw, disk.sources["stream"], "streamOptimized")
    if "esxi" in flavors:
        disk.flat = folder / "esxi-flat.vmdk"
        subprocess.run(["cp", "--sparse=always", str(raw), str(disk.flat)], check=True)
        disk.sources["esxi"] = folder / "esxi.vmdk"
        disk.sources["esxi"].write_text(esxi_descriptor(disk_size // SECTOR, disk.flat.name))
    raw.unlink()
    return disk


def qemu_img_to_vmdk(raw: Path, out: Path, subformat: str) -> None:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}",
                    str(raw), str(out)], check=True)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * SECTOR


# --------------------------------------------------------------------------
# running and measuring one command


def tree_rss(root: int, skip_root: bool) -> int:
    """Sum of the resident sets of ``root``'s live descendants (and ``root`` unless skipped)."""
    total = 0
    stack = [(root, skip_root)]
    while stack:
        pid, skip = stack.pop()
        try:
            if not skip:
                with open(f"/proc/{pid}/statm") as handle:
                    total += int(handle.read().split()[1]) * PAGE
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as handle:
                    stack += [(int(child), False) for child in handle.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue
    return total


class TreeSampler(threading.Thread):
    """Samples :func:`tree_rss` every 50 ms until stopped; keeps the peak."""

    def __init__(self, pid: int, skip_root: bool) -> None:
        super().__init__(daemon=True)
        self.pid, self.skip_root, self.peak = pid, skip_root, 0
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss(self.pid, self.skip_root))
            if self.done.wait(0.05):
                return

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.peak


@dataclass
class Exec:
    seconds: float
    rss: int  # bytes: peak RSS of the largest single process of the tree
    tree_rss: int  # bytes: sampled peak of the sum over the live tree
    ok: bool
    log: Path


def execute(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Exec:
    """Run ``argv`` (output to ``log``), timed, with its peak RSS."""
    rss_file = log.with_suffix(".rss")
    wrapped = os.access(GNU_TIME, os.X_OK)
    full = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *argv] if wrapped else argv
    with open(log, "wb") as out:
        start = time.perf_counter()
        # Own process group: an interrupted run kills the whole tree (v2p, qemu-img), not just the wrapper.
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        sampler = TreeSampler(proc.pid, skip_root=wrapped)
        sampler.start()
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            kill_group(proc)
            sampler.stop()
            raise
        seconds = time.perf_counter() - start
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        tree = sampler.stop()
    rss_kib = usage.ru_maxrss  # the child's own peak and that of every descendant it reaped
    if wrapped:
        lines = rss_file.read_text().split() if rss_file.exists() else []
        if lines and lines[-1].isdigit():
            rss_kib = int(lines[-1])
    return Exec(seconds, rss_kib * KiB, tree, rc == 0, log)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc``'s process group and wait (up to 10 s) until every member is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for _ in range(100):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def flush(path: Path) -> float:
    """fsync ``path`` (a device or a file); the seconds it took."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY if path.is_file() else os.O_WRONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


# --------------------------------------------------------------------------
# loop devices


class Loops:
    """Loop devices this benchmark attached; each is detached in a ``finally``."""

    def __init__(self) -> None:
        self.attached: set[str] = set()

    @contextlib.contextmanager
    def fresh(self, backing: Path, size: int) -> Iterator[str]:
        """A loop device over a new all-zero sparse file of ``size`` bytes."""
        backing.unlink(missing_ok=True)
        with open(backing, "wb") as handle:
            handle.truncate(size)
        dev = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                             capture_output=True, text=True).stdout.strip()
        self.attached.add(dev)
        try:
            yield dev
        finally:
            self.detach(dev)

    def detach(self, dev: str) -> None:
        subprocess.run(["losetup", "-d", dev], check=False)
        self.attached.discard(dev)

    def detach_all(self) -> None:
        for dev in sorted(self.attached):
            self.detach(dev)


def loop_stat(dev: str) -> tuple[int, int]:
    """(write sectors, discard sectors) so far, from /sys/block/loopX/stat."""
    fields = Path(f"/sys/block/{Path(dev).name}/stat").read_text().split()
    return int(fields[6]), int(fields[13]) if len(fields) > 13 else 0


def detach_stale(work: Path) -> None:
    """Detach loop devices still attached to a backing file of a previous (killed) run."""
    for backing in work.glob("*.img"):
        out = subprocess.run(["losetup", "-j", str(backing)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            subprocess.run(["losetup", "-d", line.split(":", 1)[0]], check=False)


# --------------------------------------------------------------------------
# the measurements


@dataclass
class Sample:
    seconds: float
    rss: int
    tree_rss: int
    stages: dict[str, float] = field(default_factory=dict)
    written: int | None = None  # bytes the loop device counted as written (data + write-zeroes)
    discarded: int | None = None
    allocated: int | None = None  # bytes allocated in the target afterwards
    flush: float | None = None


@dataclass
class Case:
    key: str  # unique, e.g. "dir/sparse/v2p"
    storage: str  # "dir", "block", "big"
    source: str  # "sparse", "stream", "esxi"
    tool: str  # what ran, as shown in the table
    run: Callable[[Path], Sample]
    disk: Disk
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self, get: Callable[[Sample], float | int | None]) -> float | None:
        values = [v for v in (get(s) for s in self.samples) if v is not None]
        return statistics.median(values) if values else None

    def span(self, get: Callable[[Sample], float | int | None]) -> str:
        """'min-max' of a value in seconds over the runs."""
        values = [v for v in (get(s) for s in self.samples) if v is not None]
        return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


class CommandFailed(Exception):
    pass


def check(result: Exec, what: str) -> None:
    if not result.ok:
        tail = result.log.read_text(errors="replace").strip().splitlines()[-5:]
        raise CommandFailed(f"{what} failed (log {result.log}):\n    " + "\n    ".join(tail))


def state_stages(target: Path) -> dict[str, float]:
    data = json.loads((target / "migrations" / f"{VMID}.json").read_text())
    return {name: float(rec["seconds"]) for name, rec in data["stages"].items()}


def output_file(target: Path) -> Path:
    """The finished disk file v2p wrote under a directory target."""
    found = [p for p in (target / "images").rglob(f"vm-{VMID}-disk-*") if not p.name.startswith(".")]
    if len(found) != 1:
        raise CommandFailed(f"expected one disk file under {target / 'images'}, found {found}")
    return found[0]


class Bench:
    def __init__(self, work: Path, v2p_flags: set[str]) -> None:
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir()
        self.loops = Loops()
        self.v2p_flags = v2p_flags
        self.v2p = [sys.executable, "-m", "v2p", "--accel", "tcg"]
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
        self.counter = 0

    def log(self, name: str) -> Path:
        self.counter += 1
        return self.logs / f"{self.counter:03d}-{name.replace('/', '_').replace(' ', '')}.log"

    # -- directory storage ----------------------------------------------
    def dir_bare(self, src: Path) -> Callable[[Path], Sample]:
        def run(log: Path) -> Sample:
            out = self.work / "bare.qcow2"
            try:
                argv = ["qemu-img", "convert", "-f", "vmdk", "-O", "qcow2", str(src), str(out)]
                result = execute(argv, log)
                check(result, "qemu-img convert")
                return Sample(result.seconds, result.rss, result.tree_rss, flush=flush(out),
                              allocated=allocated(out))
            finally:
                out.unlink(missing_ok=True)
                os.sync()
        return run

    def dir_v2p(self, src: Path, extra: tuple[str, ...] = ()) -> Callable[[Path], Sample]:
        def run(log: Path) -> Sample:
            target = self.work / "target"
            shutil.rmtree(target, ignore_errors=True)
            try:
                result = execute([*self.v2p, "--target-dir", str(target), "migrate", str(src),
                                  "--vmid", str(VMID), "--no-boot-check", *extra], log, self.env)
                check(result, "v2p migrate")
                out = output_file(target)
                return Sample(result.seconds, result.rss, result.tree_rss, state_stages(target),
                              flush=flush(out), allocated=allocated(out))
            finally:
                shutil.rmtree(target, ignore_errors=True)
                os.sync()
        return run

    # -- block device ------------------------------------------------------
    def on_loop(self, disk: Disk, argv_of: Callable[[str, Path], list[str]], what: str,
                env: dict[str, str] | None = None, v2p: bool = False) -> Callable[[Path], Sample]:
        def run(log: Path) -> Sample:
            backing = self.work / "loop-backing.img"
            target = self.work / "target"
            shutil.rmtree(target, ignore_errors=True)
            os.sync()
            try:
                with self.loops.fresh(backing, disk.size + MiB) as dev:
                    writes0, discards0 = loop_stat(dev)
                    result = execute(argv_of(dev, target), log, env)
                    check(result, what)
                    flushed = flush(Path(dev))
                    writes1, discards1 = loop_stat(dev)
                stages = state_stages(target) if v2p else {}
                return Sample(result.seconds, result.rss, result.tree_rss, stages,
                              written=(writes1 - writes0) * SECTOR,
                              discarded=(discards1 - discards0) * SECTOR,
                              allocated=allocated(backing), flush=flushed)
            finally:
                backing.unlink(missing_ok=True)
                shutil.rmtree(target, ignore_errors=True)
                os.sync()
        return run

    def block_dd(self, disk: Disk) -> Callable[[Path], Sample]:
        assert disk.flat is not None
        flat = disk.flat
        return self.on_loop(disk, lambda dev, _t: ["dd", f"if={flat}", f"of={dev}", "bs=4M",
                                                    "conv=notrunc,fsync", "status=none"], "dd")

    def block_bare(self, disk: Disk, src: Path) -> Callable[[Path], Sample]:
        return self.on_loop(disk, lambda dev, _t: ["qemu-img", "convert", "-n", "-f", "vmdk", "-O", "raw",
                                                    str(src), dev], "qemu-img convert -n")

    def block_v2p(self, disk: Disk, src: Path, extra: tuple[str, ...] = ()) -> Callable[[Path], Sample]:
        def argv(dev: str, target: Path) -> list[str]:
            return [*self.v2p, "--target-dir", str(target), "migrate", str(src), "--vmid", str(VMID),
                    "--to-device", dev, "--no-boot-check", *extra]
        return self.on_loop(disk, argv, "v2p migrate --to-device", self.env, v2p=True)


def v2p_migrate_flags(env: dict[str, str]) -> tuple[set[str], str]:
    proc = subprocess.run([sys.executable, "-m", "v2p", "migrate", "--help"], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        return set(), (proc.stderr.strip().splitlines() or ["v2p migrate --help failed"])[-1]
    wanted = ("--to-device", "--copy-with", "--no-verify")
    return {flag for flag in wanted if flag in proc.stdout}, ""


def block_unavailable() -> str:
    if os.geteuid() != 0:
        return "not root (losetup needs root)"
    if shutil.which("losetup") is None:
        return "losetup not found"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control"
    return ""


# --------------------------------------------------------------------------
# report


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MiB:.0f}"


def secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ratio(a: float | None, b: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if a is None or b is None or b == 0 else fmt.format(a / b)


def mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.0f}"


def table(headers: list[str], rows: list[list[str]], left: int = 2) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if i < left else c.rjust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def report(cases: dict[str, Case], pairs: list[tuple[str, str, str]], disk: Disk, big: Disk | None,
           notes: list[str]) -> None:
    print()
    print("Per command (medians; written / discard = the loop device's write / discard sectors, "
          "write-zeroes requests count as written;\n"
          "alloc = allocated bytes of the loop's backing file or the output file afterwards; "
          "xdata = alloc / source data; RSS = largest process, tree = sampled sum of the live tree)")
    rows = []
    for case in cases.values():
        if not case.samples:
            rows.append([case.storage, case.source, case.tool, "ERROR" if case.errors else "skipped",
                         *["-"] * 11])
            continue
        cdata = case.disk.data
        rows.append([
            case.storage, case.source, case.tool,
            secs(case.median(lambda s: s.seconds)),
            case.span(lambda s: s.seconds),
            secs(case.median(lambda s: s.stages.get("convert"))),
            secs(case.median(lambda s: s.stages.get("verify"))),
            secs(case.median(lambda s: s.flush)),
            mib(case.median(lambda s: s.written)),
            mib(case.median(lambda s: s.discarded)),
            mib(case.median(lambda s: s.allocated)),
            ratio(case.median(lambda s: s.allocated), cdata, "{:.3f}"),
            mb(case.median(lambda s: s.rss)),
            mb(case.median(lambda s: s.tree_rss or None)),  # 0: gone before the first sample
        ])
    print(table(["storage", "source", "command", "total s", "min-max", "conv s", "verify s", "flush s",
                 "written MiB", "discard MiB", "alloc MiB", "xdata", "RSS MB", "tree MB"], rows, left=3))

    print()
    print("v2p against the baseline (medians; ratio = v2p / baseline, lower is better; "
          "speedup = baseline / v2p total)")
    rows = []
    for name, base_key, v2p_key in pairs:
        base, ours = cases.get(base_key), cases.get(v2p_key)
        if base is None or ours is None:
            continue
        b = base.median(lambda s: s.seconds)
        t = ours.median(lambda s: s.seconds)
        c = ours.median(lambda s: s.stages.get("convert"))
        written = ours.median(lambda s: s.written)
        alloc = ours.median(lambda s: s.allocated)
        rows.append([
            name, base.tool, ours.tool, secs(b), secs(t), secs(c),
            ratio(t, b), ratio(c, b), ratio(b, t, "{:.2f}x"),
            "-" if written is None else f"{mib(written)} ({ratio(written, ours.disk.data, '{:.2f}')})",
            f"{mib(alloc)} ({ratio(alloc, ours.disk.data, '{:.2f}')})",
            mib(ours.disk.data),
            mb(ours.median(lambda s: s.rss)),
        ])
    print(table(["case", "baseline", "v2p command", "base s", "v2p s", "v2p conv s",
                 "total/base", "conv/base", "speedup", "v2p written MiB (xdata)",
                 "v2p alloc MiB (xdata)", "data MiB", "v2p RSS MB"], rows, left=3))

    print()
    verdicts = targets(cases, disk, big)
    for verdict in verdicts:
        print(verdict)
    for note in notes:
        print(f"note: {note}")


def verdict(ok: bool | None, text: str) -> str:
    return f"{'n/a ' if ok is None else 'PASS' if ok else 'MISS'}  {text}"


def targets(cases: dict[str, Case], disk: Disk, big: Disk | None) -> list[str]:
    out = []

    def med(key: str, get: Callable[[Sample], float | int | None]) -> float | None:
        case = cases.get(key)
        return case.median(get) if case else None

    # 1. convert stage within 3 % of bare qemu-img convert (dir, qcow2). v2p's
    # convert stage ends with an fsync of the new disk (it must be durable before
    # it is renamed and called done); bare qemu-img leaves that writeback pending,
    # so the bare side is counted with its flush, timed after the run.
    # 1b. the same onto a block device: v2p's convert stage (qemu-img convert -n, then the
    # device's fsync) against bare qemu-img convert -n plus the flush it left pending.
    for storage, output, bare in (("dir", "qcow2", "qemu-img convert"), ("block", "device", "qemu-img convert -n")):
        for src in ("sparse", "stream", "esxi"):
            c = med(f"{storage}/{src}/v2p", lambda s: s.stages.get("convert"))
            b = med(f"{storage}/{src}/bare", lambda s: s.seconds + (s.flush or 0.0))
            if c is None or b is None:
                if storage == "dir":
                    out.append(verdict(None, f"dir {src}: convert stage vs qemu-img convert (not measured)"))
                continue
            spans = (f"runs: convert stage {cases[f'{storage}/{src}/v2p'].span(lambda s: s.stages.get('convert'))}s, "
                     f"bare + flush {cases[f'{storage}/{src}/bare'].span(lambda s: s.seconds + (s.flush or 0.0))}s")
            out.append(verdict(c / b <= CONVERT_OVERHEAD_MAX,
                               f"{storage} {src} -> {output}: v2p convert stage {c:.2f}s / bare {bare} + flush "
                               f"{b:.2f}s = {c / b:.3f} (target <= {CONVERT_OVERHEAD_MAX:.2f}; {spans})"))
    # 2. block: v2p >= 3x faster than dd bs=4M
    dd = med("block/esxi/dd", lambda s: s.seconds)
    for key, label in (("block/esxi/v2p", "v2p migrate --to-device"),
                       ("block/esxi/v2p-noverify", "v2p --to-device --no-verify"),
                       ("block/esxi/v2p-dd", "v2p --to-device --copy-with dd")):
        t = med(key, lambda s: s.seconds)
        c = med(key, lambda s: s.stages.get("convert"))
        if dd is None or t is None:
            out.append(verdict(None, f"block esxi: {label} vs dd bs=4M (not measured)"))
            continue
        stage = f"; convert stage alone {dd / c:.2f}x" if c else ""
        # dd's time includes its fsync; v2p's flush after the run is not in its time.
        durable = med(key, lambda s: s.seconds + (s.flush or 0.0))
        flushed = f"; counting the flush v2p left to do {dd / durable:.2f}x" if durable else ""
        out.append(verdict(dd / t >= DD_SPEEDUP_MIN,
                           f"block esxi flat: dd bs=4M {dd:.2f}s / {label} {t:.2f}s total = {dd / t:.2f}x"
                           f" (target >= {DD_SPEEDUP_MIN:.0f}x){stage}{flushed}"))
    # 3. bytes written / allocated <= 1.05 x source data
    for case in cases.values():
        if not case.tool.startswith("v2p") or not case.samples:
            continue
        data = case.disk.data
        checks = []
        if case.storage == "block":
            checks.append(("loop stat written", case.median(lambda s: s.written)))
            checks.append(("backing allocated", case.median(lambda s: s.allocated)))
        else:
            checks.append(("output allocated", case.median(lambda s: s.allocated)))
        for what, value in checks:
            if value is not None:
                out.append(verdict(value / data <= BYTES_MAX,
                                   f"{case.storage} {case.source} {case.tool}: {what} {mib(value)} MiB "
                                   f"= {value / data:.3f} x data {mib(data)} MiB "
                                   f"(target <= {BYTES_MAX:.2f})"))
    # 4. peak RSS
    small = [(case.median(lambda s: s.rss), case) for case in cases.values()
             if case.tool.startswith("v2p") and case.storage != "big" and case.samples]
    if small:
        peak, case = max(small, key=lambda item: item[0] or 0)
        assert peak is not None
        tree = max(c.median(lambda s: s.tree_rss) or 0 for _, c in small)
        out.append(verdict(peak < RSS_MAX, f"peak RSS of v2p ({disk.size / GiB:g} GiB disk, largest process "
                                           f"of the tree, worst case {case.key}): {mb(peak)} MB "
                                           f"(target < {RSS_MAX / 1e6:.0f} MB); sampled sum over the "
                                           f"live tree at most {mb(tree)} MB"))
    ref = med("dir/sparse/v2p", lambda s: s.rss)
    bigr = med("big/sparse/v2p", lambda s: s.rss)
    if big is not None and ref is not None and bigr is not None:
        out.append(verdict(bigr <= ref * RSS_BIG_SLACK and bigr < RSS_MAX,
                           f"peak RSS sparse -> qcow2: {big.size / GiB:g} GiB disk {mb(bigr)} MB vs "
                           f"{disk.size / GiB:g} GiB disk {mb(ref)} MB, same {mib(big.data)} MiB of data "
                           f"(target: no larger, {RSS_BIG_SLACK:.2f}x slack for noise)"))
    return out


# --------------------------------------------------------------------------


def prepare_work_dir(work: Path) -> None:
    if work.exists():
        if not (work / MARKER).exists() and any(work.iterdir()):
            sys.exit(f"storage_bench: {work} exists and is not a storage_bench work dir; "
                     "pick another --work-dir")
        detach_stale(work)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("scratch space of bench/storage_bench.py; removed by it\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=None, help="virtual disk size (default 2)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs per case, medians reported (default 3)")
    parser.add_argument("--rss-big-gib", type=float, default=None,
                        help="virtual size of the RSS check disk, same data (default 20; 0 skips)")
    parser.add_argument("--data-fraction", type=float, default=0.30)
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--align-kib", type=int, default=64, help="island alignment (default 64 KiB)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 256 MiB disk, repeat 1, 2 GiB RSS disk")
    parser.add_argument("--skip-block", action="store_true")
    parser.add_argument("--settle", type=float, default=0.0, metavar="SECONDS",
                        help="pause before every run (after the sync), for storage that keeps "
                             "writing back behind the guest's back (default 0)")
    parser.add_argument("--only", metavar="REGEX",
                        help="run only the cases whose key matches (e.g. 'dir/esxi', '^block/')")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "out" / "storage_bench")
    parser.add_argument("--keep", action="store_true", help="leave the work dir (sources, logs) behind")
    args = parser.parse_args()
    size_gib = args.size_gib if args.size_gib is not None else (0.25 if args.quick else 2)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    big_gib = args.rss_big_gib if args.rss_big_gib is not None else (2 if args.quick else 20)
    disk_size = int(size_gib * GiB) // MiB * MiB
    align = args.align_kib * KiB

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(f"storage_bench: signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    for tool in ("qemu-img", "cp"):
        if shutil.which(tool) is None:
            sys.exit(f"storage_bench: {tool} not found")
    work: Path = args.work_dir.resolve()
    prepare_work_dir(work)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    flags, help_error = v2p_migrate_flags(env)
    bench = Bench(work, flags)
    notes: list[str] = []
    failed = False
    try:
        qemu = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout
        print(f"storage_bench {datetime.datetime.now().isoformat(timespec='seconds')}  "
              f"host {platform.node()}  {os.cpu_count()} CPUs  kernel {platform.release()}  "
              f"{qemu.splitlines()[0]}")
        print(f"load average at start: {Path('/proc/loadavg').read_text().strip()}")
        rng = random.Random(args.seed)
        data_bytes = int(disk_size * args.data_fraction) // align * align
        sizes = island_sizes(data_bytes, rng, align, 64 * KiB, 8 * MiB)
        started = time.perf_counter()
        disk = build_disk(work / "src", disk_size, sizes, args.seed, align, ("sparse", "stream", "esxi"))
        big = None
        wants_big = not args.only or any(re.search(args.only, f"big/sparse/{t}") for t in ("bare", "v2p"))
        if big_gib > 0 and wants_big:
            big_size = int(big_gib * GiB) // MiB * MiB
            big = build_disk(work / "big", big_size, sizes, args.seed, align, ("sparse",))
        print(f"disk: {disk.size / GiB:g} GiB virtual, {disk.islands} islands of 64 KiB-8 MiB "
              f"({align // KiB} KiB aligned), data {disk.data / MiB:.0f} MiB = {disk.data / disk.size:.1%}; "
              f"sources allocated: " + ", ".join(
                  f"{name} {allocated(p if name != 'esxi' else disk.flat) / MiB:.0f} MiB"  # type: ignore[arg-type]
                  for name, p in disk.sources.items())
              + f"; built in {time.perf_counter() - started:.1f}s; repeat {repeat}")
        if big:
            print(f"RSS disk: {big.size / GiB:g} GiB virtual, same {big.data / MiB:.0f} MiB of data")

        cases: dict[str, Case] = {}

        def add(key: str, storage: str, source: str, tool: str, run: Callable[[Path], Sample],
                d: Disk) -> None:
            cases[key] = Case(key, storage, source, tool, run, d)

        src = disk.sources
        for name in ("sparse", "stream", "esxi"):
            add(f"dir/{name}/bare", "dir", name, "qemu-img convert -O qcow2", bench.dir_bare(src[name]), disk)
            add(f"dir/{name}/v2p", "dir", name, "v2p migrate", bench.dir_v2p(src[name]), disk)
        why_not = "--skip-block" if args.skip_block else block_unavailable()
        if not why_not and "--to-device" not in flags:
            why_not = f"v2p migrate has no --to-device yet{': ' + help_error if help_error else ''}"
        if why_not:
            notes.append(f"block part skipped: {why_not}")
        else:
            add("block/esxi/dd", "block", "esxi", "dd bs=4M conv=notrunc,fsync", bench.block_dd(disk), disk)
            for name in ("sparse", "stream", "esxi"):
                add(f"block/{name}/bare", "block", name, "qemu-img convert -n -O raw",
                    bench.block_bare(disk, src[name]), disk)
                add(f"block/{name}/v2p", "block", name, "v2p migrate --to-device",
                    bench.block_v2p(disk, src[name]), disk)
            if "--no-verify" in flags:
                add("block/esxi/v2p-noverify", "block", "esxi", "v2p --to-device --no-verify",
                    bench.block_v2p(disk, src["esxi"], ("--no-verify",)), disk)
            else:
                notes.append("v2p migrate has no --no-verify: that row is skipped")
            if "--copy-with" in flags:
                add("block/esxi/v2p-dd", "block", "esxi", "v2p --to-device --copy-with dd",
                    bench.block_v2p(disk, src["esxi"], ("--copy-with", "dd")), disk)
            else:
                notes.append("v2p migrate has no --copy-with: that row is skipped")
        if big is not None:
            big_src = big.sources["sparse"]
            add("big/sparse/bare", "big", "sparse", "qemu-img convert -O qcow2", bench.dir_bare(big_src), big)
            add("big/sparse/v2p", "big", "sparse", "v2p migrate", bench.dir_v2p(big_src), big)

        if args.only:
            cases = {key: case for key, case in cases.items() if re.search(args.only, key)}
        os.sync()
        for round_no in range(repeat):
            # A new order every round (seeded): whatever writeback or cache state one case
            # leaves behind lands on a different successor each time, not always on the same one.
            order = list(cases.values())
            random.Random(args.seed + round_no).shuffle(order)
            for case in order:
                if case.errors:
                    continue
                if args.settle:
                    time.sleep(args.settle)
                print(f"  [{round_no + 1}/{repeat}] {case.key:<26}", end="", flush=True)
                try:
                    sample = case.run(bench.log(case.key))
                except CommandFailed as exc:
                    case.errors.append(str(exc))
                    failed = True
                    print(f" ERROR: {exc}")
                    continue
                case.samples.append(sample)
                conv = "".join(f" {name} {sample.stages[name]:.2f}s" for name in ("convert", "verify")
                               if name in sample.stages)
                conv = f" ({conv.strip()})" if conv else ""
                print(f" {sample.seconds:7.2f}s{conv}")

        pairs = [
            ("dir sparse -> qcow2", "dir/sparse/bare", "dir/sparse/v2p"),
            ("dir stream -> qcow2", "dir/stream/bare", "dir/stream/v2p"),
            ("dir esxi flat -> qcow2", "dir/esxi/bare", "dir/esxi/v2p"),
            ("block esxi flat (seed)", "block/esxi/dd", "block/esxi/v2p"),
            ("block esxi flat (seed)", "block/esxi/dd", "block/esxi/v2p-noverify"),
            ("block esxi flat (seed)", "block/esxi/dd", "block/esxi/v2p-dd"),
            ("block esxi flat", "block/esxi/bare", "block/esxi/v2p"),
            ("block sparse", "block/sparse/bare", "block/sparse/v2p"),
            ("block stream", "block/stream/bare", "block/stream/v2p"),
        ]
        if big is not None:
            pairs.append((f"{big.size / GiB:g} GiB sparse -> qcow2", "big/sparse/bare", "big/sparse/v2p"))
        if not os.access(GNU_TIME, os.X_OK):
            notes.append(f"{GNU_TIME} missing: RSS from wait4 of the direct child "
                         "(covers the grandchildren it reaped)")
        report(cases, pairs, disk, big, notes)
        print(f"load average at end: {Path('/proc/loadavg').read_text().strip()}")
        for case in cases.values():
            for error in case.errors:
                print(f"ERROR {case.key}: {error}")
    finally:
        bench.loops.detach_all()
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
