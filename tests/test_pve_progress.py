"""Progress of what PVE does for a migration from elsewhere: the upload's bytes sent (step ``upload``,
``data['moved']``) and PVE's own import task followed through its log (step ``import``). The
simulator's import logs what qemu-server's ``PVE::QemuServer::QemuImage::convert`` prints for
``qemu-img convert -p``; v2p's parser (``pve_tasklog``) reads exactly those lines."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pve_sim.cluster import convert_logged
from pve_sim.server import PVESim
from pve_sim.tasks import Task, render_bytes

from v2p.api import Migration
from v2p.events import Event
from v2p.targets.proxmox import ProxmoxTarget, target_from_url
from v2p.targets.pve_tasklog import TaskLog, import_follower, parse_import_line


def test_render_bytes_is_pves() -> None:
    # PVE::Format::render_bytes: precision 1 as QemuImage::convert asks, 2 without
    assert render_bytes(0, 1) == "0.0 B" and render_bytes(1023, 1) == "1023.0 B"
    assert render_bytes(1024, 1) == "1.0 KiB" and render_bytes(32 << 30, 1) == "32.0 GiB"
    assert render_bytes(3 << 39) == "1.50 TiB"


@pytest.mark.parametrize(("line", "size", "expected"), [
    ("transferred 4.0 GiB of 32.0 GiB (12.50%)", None, (4 << 30, 32 << 30, 12.5)),
    ("transferred 4.0 GiB of 32.0 GiB (12.50%)", 32 << 30, (4 << 30, 32 << 30, 12.5)),
    # the disk's own size when known: the line's sizes are rounded to a tenth of their unit
    ("transferred 376.8 KiB of 32.0 MiB (1.15%)", 33554432, (int(33554432 * 0.0115), 33554432, 1.15)),
    ("transferred 0.0 B of 1.0 MiB (0.00%)", None, (0, 1 << 20, 0.0)),
    ("transferred 32.0 MiB of 32.0 MiB (100.00%)", None, (32 << 20, 32 << 20, 100.0)),
])
def test_an_import_progress_line_is_read(line: str, size: int | None, expected: tuple[int, int, float]) -> None:
    step = parse_import_line(line, size)
    assert step is not None and (step.done, step.total, step.percent) == expected


@pytest.mark.parametrize("line", [
    "importing disk '/var/lib/vz/import/v2p-150-disk-0.qcow2' to VM 150 ...",
    "transferred 2.3 GiB of 8.0 GiB VM-state, 112.0 MiB/s",  # a live migration's line, not an import's
    "create full clone of drive scsi0 (local:import/x.qcow2)",
    "TASK OK",
])
def test_other_lines_are_not_progress(line: str) -> None:
    assert parse_import_line(line) is None


def test_the_simulators_import_log_is_what_v2ps_parser_reads(tmp_path: Path) -> None:
    # real qemu-img -p, through the simulator's copy of QemuImage::convert's parser
    size = 24 << 20
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(size))
    task = Task("UPID:sim", "pve1", 1, 1, 1, "qmconfig", "150", "root@pam")
    convert_logged(task, src, tmp_path / "disk.qcow2", "qcow2")
    assert len(task.lines) >= 3 and task.lines[0] == f"transferred 0.0 B of {render_bytes(size, 1)} (0.00%)"
    parsed = [parse_import_line(line, size) for line in task.lines]
    assert all(parsed), task.lines
    assert [p.percent for p in parsed if p] == sorted(p.percent for p in parsed if p)
    last = parsed[-1]
    assert last is not None and (last.done, last.total, last.percent) == (size, size, 100.0)
    # and without the size, the line's own (rounded) sizes
    alone = parse_import_line(task.lines[-1])
    assert alone is not None and alone.total == size


def test_a_task_log_is_read_on_from_where_it_stopped() -> None:
    log = [{"n": n + 1, "t": f"line {n + 1}"} for n in range(1203)]
    asked: list[tuple[int, int]] = []

    def get(path: str, start: int, limit: int) -> list[dict[str, Any]]:
        asked.append((start, limit))
        return log[start:start + limit]

    reader = TaskLog("nodes/pve1/tasks/UPID/log")
    first = reader.read(get)
    assert first == [f"line {n}" for n in range(1, 1204)] and asked == [(0, 500), (500, 500), (1000, 500)]
    log.append({"n": 1204, "t": "TASK OK"})
    assert reader.read(get) == ["TASK OK"] and reader.read(get) == []


def test_the_follower_reports_each_step_once() -> None:
    seen: list[tuple[int, int, float]] = []
    follow = import_follower(lambda done, total, percent: seen.append((done, total, percent)), 1000)
    follow(["importing disk ...", "transferred 0.0 B of 1000.0 B (0.00%)", "transferred 500.0 B of 1000.0 B "
            "(50.00%)"])
    follow(["transferred 500.0 B of 1000.0 B (50.00%)", "transferred 1000.0 B of 1000.0 B (100.00%)",
            "transferred 1000.0 B of 1000.0 B (100.00%)"])
    assert seen == [(0, 1000, 0.0), (500, 1000, 50.0), (1000, 1000, 100.0)]


# -- a migration against the simulator -----------------------------------------------------------

@pytest.fixture
def sim(tmp_path: Path) -> Iterator[PVESim]:
    from pve_sim.fixture import start_or_skip

    with start_or_skip(tmp_path / "sim") as running:
        yield running


def test_a_migration_reports_pves_import_task_and_its_upload(sim: PVESim, tmp_path: Path) -> None:
    size = 24 << 20
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(size))
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", str(raw), str(vmdk)], check=True, timeout=60)
    url = f"pve://root@pam!v2p@{sim.host}/{sim.cluster.node}?fingerprint={sim.fingerprint}&storage=local"
    target = ProxmoxTarget(target_from_url(url, {"V2P_PVE_TOKEN": sim.tokens["root@pam!v2p"]}),
                           state_root=tmp_path / "state")
    events: list[Event] = []
    Migration(vmdk, 160, target=target, ostype="l26", boot_check=False, on_event=events.append).run()
    # the upload: bytes sent, as data['moved'] (contract point 1), growing to the whole staged file
    sent = [e for e in events if e.kind == "progress" and e.step == "upload"]
    assert len(sent) >= 5 and all(e.data["moved"] == e.done for e in sent)
    assert [e.done for e in sent] == sorted(e.done for e in sent) and sent[-1].done == sent[-1].total
    # PVE's import task, followed through its log while it runs: bytes of the disk, to 100 %
    imported = [e for e in events if e.kind == "progress" and e.step == "import"]
    assert imported, [(e.kind, e.stage, e.step, e.message) for e in events]
    assert all(e.stage == "attach" and e.disk == 0 and e.total == size for e in imported)
    assert [e.data["percent"] for e in imported] == sorted(e.data["percent"] for e in imported)
    last = imported[-1]
    assert (last.done, last.data["percent"], last.data["bytes"], last.data["moved"]) == (size, 100.0, size, size)
    task = next(t for t in sim.cluster.tasks.by_upid.values() if t.type == "qmconfig" and
                any(line.startswith("transferred ") for line in t.lines))
    assert len(imported) == len({parse_import_line(line, size).percent  # type: ignore[union-attr]
                                 for line in task.lines if parse_import_line(line, size)})


def test_the_import_is_followed_while_it_runs(sim: PVESim, tmp_path: Path) -> None:
    # an import that takes 2 s, logging its progress meanwhile: events arrive over those 2 s, not at the end
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(4 << 20))
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", str(raw), str(vmdk)], check=True, timeout=60)
    url = f"pve://root@pam!v2p@{sim.host}/{sim.cluster.node}?fingerprint={sim.fingerprint}&storage=local"
    target = ProxmoxTarget(target_from_url(url, {"V2P_PVE_TOKEN": sim.tokens["root@pam!v2p"]}),
                           state_root=tmp_path / "state")
    seen: list[tuple[float, Event]] = []
    sim.slow_next_task("qmconfig", 2.0, logging=True)
    Migration(vmdk, 161, target=target, ostype="l26", boot_check=False,
              on_event=lambda event: seen.append((time.monotonic(), event))).run()
    imported = [(at, e) for at, e in seen if e.kind == "progress" and e.step == "import"]
    ended = next(at for at, e in seen if e.kind == "stage-done" and e.stage == "attach")
    early = [at for at, e in imported if e.data["percent"] < 100 and at < ended - 0.5]
    assert len(early) >= 2 and early[-1] - early[0] >= 0.5, [(round(ended - at, 2), e.data) for at, e in imported]
    assert imported[-1][1].data["percent"] == 100.0


def test_a_slow_upload_reports_every_few_seconds_not_only_every_percent(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # 1 % of a big disk over a slow link is minutes: every REPORT_EVERY seconds that moved 1 MiB is a report
    from v2p.targets import pve_transport

    path = tmp_path / "big.qcow2"
    with open(path, "wb") as handle:
        handle.truncate(400 << 20)  # 1 % = 4 MiB
    clock = iter(float(second) * 3 for second in range(10_000))  # each look at the clock: 3 s later
    monkeypatch.setattr(pve_transport, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    seen: list[int] = []
    with pve_transport.UploadFile(path, "big.qcow2", lambda done, _total: seen.append(done)) as body:
        while body.read(1 << 20):
            pass
    assert seen[:3] == [1 << 20, 2 << 20, 3 << 20] and seen[-1] == 400 << 20
    # and a fast one every 1 %, not every MiB
    monkeypatch.setattr(pve_transport, "time", SimpleNamespace(monotonic=lambda: 0.0))
    seen.clear()
    with pve_transport.UploadFile(path, "big.qcow2", lambda done, _total: seen.append(done)) as body:
        while body.read(1 << 20):
            pass
    assert seen[:2] == [4 << 20, 8 << 20] and len(seen) == 100
