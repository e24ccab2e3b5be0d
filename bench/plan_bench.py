"""Plan benchmark: the 6-VM wave of tests/test_plan_run.py (three loose disks on IDE, virtio-blk and
SCSI, a 3-disk .vmx, an .ova, the Windows stand-in with its driver dance; every guest booted under TCG)
run by ``v2p plan run`` at ``--parallel 1`` and ``--parallel 3`` onto a fresh local target each time.

Measured per run: the wall time of the whole command, and the memory of its whole process tree (the
``plan run`` parent, every migration child, the qemu-img, tether and QEMU processes under them) by a
sampler that walks /proc every 50 ms:

* tree peak: the largest sum of VmRSS over the processes alive at one sample;
* sum of VmHWM: every process's own peak RSS (VmHWM, read while it lives), added up as if all the
  peaks had come at once (an upper bound: a process exiting between samples may be missed);
* largest: the largest single VmHWM, and which program it was.

    .venv/bin/python bench/plan_bench.py [--runs 3] [--work bench/out/plan_bench] [--readme]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
SAMPLE_EVERY = 0.05
README = ROOT / "bench" / "README.md"
SECTION = "## plan_bench.py"


def _status(pid: str) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


class TreeSampler(threading.Thread):
    """Samples the process tree under ``root`` until stopped (see the module docstring)."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.halt = threading.Event()
        self.peak_sum = 0  # KiB
        self.hwm: dict[tuple[int, str], tuple[int, str]] = {}  # (pid, start time) -> (VmHWM KiB, name)
        self.most_children = 0

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            time.sleep(SAMPLE_EVERY)

    def sample(self) -> None:
        parents: dict[int, int] = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as handle:
                    stat = handle.read()
                parents[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
        tree, grew = {self.root}, True
        while grew:
            more = {pid for pid, parent in parents.items() if parent in tree} - tree
            tree |= more
            grew = bool(more)
        total, children = 0, 0
        for pid in tree:
            try:
                status = _status(str(pid))
                with open(f"/proc/{pid}/stat") as handle:
                    start = handle.read().rsplit(")", 1)[1].split()[19]
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, IndexError):
                continue
            rss = int(status.get("VmRSS", "0 kB").split()[0])
            hwm = int(status.get("VmHWM", "0 kB").split()[0])
            total += rss
            # The parent's own children only: a process forked by a child carries the child's command
            # line until it execs.
            children += parents.get(pid) == self.root and b"v2p.planchild" in cmdline
            key = (pid, start)
            name = status.get("Name", "?")
            if hwm > self.hwm.get(key, (0, ""))[0]:
                self.hwm[key] = (hwm, name)
        self.peak_sum = max(self.peak_sum, total)
        self.most_children = max(self.most_children, children)


def build_inputs(work: Path) -> tuple[Path, dict[str, Any]]:
    """The samples (as ``make samples`` builds them), the test drivers ISO and the wave's sources."""
    from test_plan_run import wave_sources

    from conftest import SAMPLES

    subprocess.run([sys.executable, str(ROOT / "sample_images" / "build.py"), str(SAMPLES), "-q"], check=True)
    manifest = json.loads((Path(str(SAMPLES)) / "manifest.json").read_text())
    spec = importlib.util.spec_from_file_location("build_test_iso", ROOT / "drivers_iso" / "build_test_iso.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    iso = module.build(work / "virtio-win.iso")
    return iso, wave_sources(work, manifest, Path(str(SAMPLES)))


def one_run(plan_text: str, work: Path, parallel: int, index: int) -> dict[str, Any]:
    target = work / f"target-p{parallel}-{index}"
    shutil.rmtree(target, ignore_errors=True)
    plan = work / f"plan-p{parallel}-{index}.yaml"
    plan.write_text(plan_text.replace("@TARGET@", str(target)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2P_")}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "v2p", "plan", "run", str(plan), "--parallel", str(parallel),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    wall = time.monotonic() - started
    sampler.halt.set()
    sampler.join()
    report = json.loads(out) if out.strip() else {}
    if proc.returncode != 0 or not report.get("ok"):
        raise SystemExit(f"plan_bench: plan run --parallel {parallel} failed ({proc.returncode}):\n{err[-3000:]}")
    shutil.rmtree(target, ignore_errors=True)
    largest = max(sampler.hwm.values(), default=(0, "?"))
    return {"parallel": parallel, "wall": wall, "tree_peak_mb": sampler.peak_sum / 1024,
            "hwm_sum_mb": sum(hwm for hwm, _name in sampler.hwm.values()) / 1024,
            "largest_mb": largest[0] / 1024, "largest": largest[1], "processes": len(sampler.hwm),
            "children_at_once": sampler.most_children,
            "vm_seconds": {vm["name"]: vm["seconds"] for vm in report["vms"]}}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| --parallel | wall s (median) | runs | tree peak RSS MB | sum of VmHWM MB | largest process MB "
             "| processes | children at once |", "|---|---|---|---|---|---|---|---|"]
    for parallel in sorted({r["parallel"] for r in results}):
        rows = [r for r in results if r["parallel"] == parallel]
        walls = [r["wall"] for r in rows]
        largest = max(rows, key=lambda r: r["largest_mb"])
        lines.append(
            f"| {parallel} | {statistics.median(walls):.1f} | {', '.join(f'{w:.1f}' for w in walls)} "
            f"| {max(r['tree_peak_mb'] for r in rows):.0f} | {max(r['hwm_sum_mb'] for r in rows):.0f} "
            f"| {largest['largest_mb']:.0f} ({largest['largest']}) | {max(r['processes'] for r in rows)} "
            f"| {max(r['children_at_once'] for r in rows)} |")
    return "\n".join(lines)


def write_readme(text: str) -> None:
    """Replace the results table between the markers in this script's README section."""
    content = README.read_text()
    begin, end = "<!-- plan_bench results -->", "<!-- /plan_bench results -->"
    if begin not in content:
        raise SystemExit(f"plan_bench: {README} has no {begin} marker (in the {SECTION} section)")
    head, _, rest = content.partition(begin)
    _, _, tail = rest.partition(end)
    README.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per --parallel value, alternating (default 3)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "plan_bench")
    parser.add_argument("--readme", action="store_true", help="write the table into bench/README.md")
    args = parser.parse_args()
    from test_plan_run import wave_plan

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    iso, sources = build_inputs(args.work)
    plan_text = wave_plan(sources, "{kind: local, dir: @TARGET@, accel: tcg}", iso)
    results = []
    try:
        for index in range(args.runs):
            for parallel in (1, 3):
                result = one_run(plan_text, args.work, parallel, index)
                print(f"run {index + 1}, --parallel {parallel}: {result['wall']:.1f} s, tree peak "
                      f"{result['tree_peak_mb']:.0f} MB, sum of VmHWM {result['hwm_sum_mb']:.0f} MB, "
                      f"largest {result['largest_mb']:.0f} MB ({result['largest']}), "
                      f"{result['children_at_once']} children at once", flush=True)
                results.append(result)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    text = table(results)
    load = os.getloadavg()
    text += (f"\n\nMeasured {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPUs "
             f"(load average {load[0]:.2f} after the runs), QEMU TCG, {args.runs} runs per value.")
    print(text)
    if args.readme:
        write_readme(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
