"""Resume inside a disk (issue 20): the convert stage copies a disk window by window with a checkpoint in
the state file after each; a run stopped midway (an interrupt, a cancel) is carried on from the last
checkpoint that still applies, and the verify after it still compares every byte. Progress events say
what the copy really wrote (``moved``), and ``--bwlimit`` holds the bytes written.

In-process on the fake target (tests/fakes.py: the real StorageSink, real qemu-img); the same through
the command with a SIGKILL, and a plan stopped midway, are test_resume_in_disk_kill.py's (slow tier). The upload
path (RemoteImportSink, its local staging copy) runs against the PVE simulator.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pve_sim.server import PVESim
from test_pve_upload import target_of

from fakes import FakeSource, FakeTarget
from v2p import pipeline, windows
from v2p.endpoint import DiskEndpoint, RawExtent
from v2p.errors import Cancelled
from v2p.events import Event
from v2p.migration import Migration
from v2p.options import MigrationOptions
from v2p.spec import DiskSpec
from v2p.state import MigrationState
from v2p.storage import Volume

VMID = 100
MiB = 1 << 20
WINDOW = windows.WINDOW_MIN  # a disk of 4 * WINDOW_MIN bytes is copied in 4 windows
DATA = 3 * MiB  # random bytes in each window


def sparse_disk(path: Path, size: int = 4 * WINDOW, seed: int = 7) -> Path:
    """``size`` bytes, ``DATA`` random ones in each window (at a window's middle), zeros elsewhere."""
    rng = random.Random(seed)
    with open(path, "wb") as handle:
        handle.truncate(size)
        for start in range(0, size, WINDOW):
            handle.seek(start + WINDOW // 2)
            handle.write(rng.randbytes(DATA))
    return path


class Run:
    def __init__(self, source: FakeSource, target: FakeTarget, **options: object) -> None:
        self.events: list[Event] = []
        self.pipeline = pipeline.Pipeline(source, VMID, MigrationOptions.of({"boot_check": False, **options}),
                                          target, emit=self.events.append)

    def __call__(self) -> dict[str, object]:
        return self.pipeline.run()

    def progress(self, stage: str = "convert") -> list[Event]:
        return [e for e in self.events if e.kind == "progress" and e.stage == stage and e.step is None]

    def said(self, stage: str = "convert") -> list[str]:
        return [e.message for e in self.events if e.kind == "info" and e.stage == stage]


@pytest.fixture
def fake(tmp_path: Path) -> FakeTarget:
    return FakeTarget(tmp_path / "target")


def partial(fake: FakeTarget) -> Path:
    return fake.folder / "images" / str(VMID) / f".vm-{VMID}-disk-0.qcow2.v2p-partial"


def final(fake: FakeTarget) -> Path:
    return fake.folder / "images" / str(VMID) / f"vm-{VMID}-disk-0.qcow2"


def stopped_after_two_windows(source: FakeSource, fake: FakeTarget, stop_at: dict[str, BaseException],
                              **options: object) -> MigrationState:
    stop_at["convert:window:2"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        Run(source, fake, **options)()
    state = MigrationState(fake.state_dir(), VMID)
    assert state.load()
    return state


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_a_copy_stopped_after_two_windows_goes_on_from_there(tmp_path: Path, fake: FakeTarget, fmt: str,
                                                             stop_at: dict[str, BaseException]) -> None:
    source = FakeSource([sparse_disk(tmp_path / "disk.raw")])
    state = stopped_after_two_windows(source, fake, stop_at, fmt=fmt)
    # The checkpoint the contract names (issue 20, point 2), in the state file.
    progress = state.data["progress"]
    assert {k: progress[k] for k in ("stage", "disk", "done", "total")} == \
        {"stage": "convert", "disk": 0, "done": 2 * WINDOW, "total": 4 * WINDOW}
    assert state.data["failed"]["stage"] == "convert"

    rerun = Run(source, fake, fmt=fmt)
    assert rerun()["finished"]
    assert any(f"goes on at byte {2 * WINDOW} of {4 * WINDOW} (50 %)" in line for line in rerun.said())
    events = rerun.progress()
    assert events[0].done == 2 * WINDOW  # it began where the first run's checkpoint was
    # What the rerun wrote: the two windows after the checkpoint (their data), not the whole disk.
    moved = events[-1].data["moved"]
    assert 2 * DATA <= moved < 2 * DATA + MiB, moved
    assert events[-1].done == events[-1].total == 4 * WINDOW
    # The verify compared every byte with the source; the checkpoint went with the convert record.
    state.load()
    assert "verify" in state.stages and "progress" not in state.data
    written = fake.folder / "images" / str(VMID) / f"vm-{VMID}-disk-0.{fmt}"
    assert windows_equal(source.disks[0], written, fmt)


def windows_equal(src: Path, dst: Path, fmt: str) -> bool:
    import subprocess
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", fmt, str(src), str(dst)]).returncode == 0


@pytest.mark.parametrize("change", ["source", "destination"])
def test_a_checkpoint_that_no_longer_applies_starts_over(tmp_path: Path, fake: FakeTarget, change: str,
                                                         stop_at: dict[str, BaseException]) -> None:
    disk = sparse_disk(tmp_path / "disk.raw")
    source = FakeSource([disk])
    stopped_after_two_windows(source, fake, stop_at)
    if change == "source":
        with open(disk, "r+b") as handle:  # the first window changes (a guest wrote to it)
            handle.seek(WINDOW // 2)
            handle.write(b"changed")
    else:
        path = partial(fake)  # another volume at the temporary name
        path.unlink()
        path.write_bytes(b"")
        os.truncate(path, 4 * WINDOW)
    rerun = Run(source, fake)
    assert rerun()["finished"]
    reason = "the source changed since" if change == "source" else "its temporary volume was replaced since"
    assert any(f"({reason}): it starts over" in line for line in rerun.said()), rerun.said()
    events = rerun.progress()
    assert events[0].done == 0 and events[-1].data["moved"] >= 4 * DATA
    assert windows_equal(disk, final(fake), "qcow2")


def test_a_cancelled_migration_run_again_goes_on_inside_the_disk(tmp_path: Path, fake: FakeTarget) -> None:
    source = FakeSource([sparse_disk(tmp_path / "disk.raw")])
    seen: list[Event] = []
    migration: Migration

    def on_event(event: Event) -> None:
        seen.append(event)
        if event.kind == "progress" and event.stage == "convert" and (event.done or 0) > 2 * WINDOW:
            migration.cancel()  # from the migration's own thread: its qemu-img is killed at once

    migration = Migration(source, VMID, target=fake, boot_check=False, on_event=on_event)
    with pytest.raises(Cancelled):
        migration.run()
    state = MigrationState(fake.state_dir(), VMID)
    assert state.load() and state.data["progress"]["done"] == 2 * WINDOW
    assert partial(fake).exists(), "the cancel kept the half-written volume for the rerun"

    seen.clear()
    again = Migration(source, VMID, target=fake, boot_check=False, on_event=seen.append)
    assert again.run()["finished"]
    copied = [e for e in seen if e.kind == "progress" and e.stage == "convert"]
    assert copied[0].done == 2 * WINDOW and copied[-1].data["moved"] < 3 * DATA
    assert windows_equal(source.disks[0], final(fake), "qcow2")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_moved_is_what_the_sparse_disk_holds(tmp_path: Path, fmt: str) -> None:
    """A disk of 512 MiB holding 40 MiB: moved says 40 MiB (the bytes written), as the destination's
    allocation does; the windowed copy is as sparse as one qemu-img convert."""
    rng = random.Random(3)
    src = tmp_path / "disk.raw"
    with open(src, "wb") as handle:
        handle.truncate(512 * MiB)
        for at in range(0, 500, 51):
            handle.seek(at * MiB)
            handle.write(rng.randbytes(4 * MiB))
    data = 4 * MiB * len(range(0, 500, 51))
    seen: list[tuple[int, int]] = []
    dest = tmp_path / f"out.{fmt}"
    moved = windows.copy(DiskEndpoint("raw", str(src), 512 * MiB), Volume("", dest, fmt), capacity=512 * MiB,
                         on_progress=lambda done, moved: seen.append((done, moved)))
    assert seen[-1] == (512 * MiB, moved)
    assert data <= moved < data + 2 * MiB, (moved, data)  # not the 512 MiB (qcow2: its tables too)
    allocated = os.stat(dest).st_blocks * 512
    assert abs(allocated - moved) < 2 * MiB, (allocated, moved)
    import subprocess
    once = tmp_path / f"once.{fmt}"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(src), str(once)], check=True)
    assert abs(os.stat(once).st_blocks * 512 - allocated) < MiB
    assert windows_equal(src, dest, fmt)


def test_dd_moves_only_the_data_and_goes_on_from_a_checkpoint(tmp_path: Path) -> None:
    src = sparse_disk(tmp_path / "disk.raw")
    endpoint = DiskEndpoint("raw", str(src), 4 * WINDOW, raw=(RawExtent(str(src), 0, 2 * WINDOW),
                                                                RawExtent(str(src), 2 * WINDOW, 2 * WINDOW)))
    dest = Volume("", tmp_path / "out.raw", "raw")
    points: list[windows.Checkpoint] = []
    windows.copy_dd(endpoint, dest, target_is_zero=True, on_checkpoint=points.append)
    assert [p.done for p in points] == [WINDOW, 2 * WINDOW, 3 * WINDOW]
    os.truncate(dest.path, 0)  # the last two windows lost: carried on from the second checkpoint
    os.truncate(dest.path, 4 * WINDOW)
    with open(dest.path, "r+b") as out, open(src, "rb") as data:
        out.write(data.read(2 * WINDOW))
    moved = windows.copy_dd(endpoint, dest, target_is_zero=True, start=points[1])
    # The window a stopped run was in is written whole (dd cannot make a hole), the next one sparse.
    assert WINDOW + DATA <= moved < WINDOW + DATA + MiB
    assert windows_equal(src, dest.path, "raw")


def test_bwlimit_is_qemu_img_s_write_limit_and_zeros_are_not_sent(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """qemu-img's ``-r`` throttles the write requests of its target (qemu-img.c, ``set_rate_limit``:
    ``THROTTLE_BPS_WRITE``), zero writes included: on a fresh volume every window but a resumed one is
    copied with ``--target-is-zero``, so zeros are never sent and the limit counts the data only."""
    src = sparse_disk(tmp_path / "disk.raw", 2 * WINDOW)
    caplog.set_level(logging.DEBUG, logger="v2p.runner")
    windows.copy(DiskEndpoint("raw", str(src), 2 * WINDOW), Volume("", tmp_path / "out.raw", "raw"),
                 capacity=2 * WINDOW, bwlimit=8192 * 1024)
    copies = [record.argv for record in caplog.records if "convert" in getattr(record, "argv", [])]
    assert len(copies) == 2
    for argv in copies:
        assert argv[argv.index("-r") + 1] == str(8192 * 1024) and "--target-is-zero" in argv
    caplog.clear()
    windows.copy(DiskEndpoint("raw", str(src), 2 * WINDOW), Volume("", tmp_path / "out.raw", "raw"),
                 capacity=2 * WINDOW, start=windows.Checkpoint(WINDOW, WINDOW, True,))
    resumed = [record.argv for record in caplog.records if "convert" in getattr(record, "argv", [])]
    assert len(resumed) == 1 and "--target-is-zero" not in resumed[0]  # the window a stopped run was in


def test_bwlimit_onto_a_destination_sent_its_zeros_throttles_the_data_only(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A device that does not read as zeros (a thick LV) must be sent the disk's zeros, which qemu-img's
    ``-r`` would count: long runs of zeros are copied apart, without ``-r``; the data with it."""
    src = sparse_disk(tmp_path / "disk.raw", WINDOW)  # zeros, DATA bytes at the middle, zeros
    device = tmp_path / "device"
    device.write_bytes(b"\xff" * MiB)
    os.truncate(device, WINDOW)
    caplog.set_level(logging.DEBUG, logger="v2p.runner")
    windows.copy(DiskEndpoint("raw", str(src), WINDOW), Volume("", device, "raw", is_block=True),
                 capacity=WINDOW, bwlimit=1 << 20)
    copies = [record.argv for record in caplog.records if "convert" in getattr(record, "argv", [])]
    pieces = [(json.loads(argv[-2][len("json:"):])["offset"], json.loads(argv[-2][len("json:"):])["size"],
               "-r" in argv) for argv in copies]
    assert pieces == [(0, WINDOW // 2, False), (WINDOW // 2, DATA, True),
                      (WINDOW // 2 + DATA, WINDOW // 2 - DATA, False)]
    assert all("--target-is-zero" not in argv for argv in copies)
    assert windows_equal(src, device, "raw")  # the 0xff of the device's first MiB are zeros now


def test_the_pacer_holds_the_written_bytes_to_the_rate() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pacer = windows.Pacer(8 * MiB, clock=lambda: now[0], sleep=sleep)
    now[0] += 1.0
    pacer.wait(24 * MiB)  # a window burst 24 MiB in 1 s: the next waits 2 s
    assert slept == [pytest.approx(2.0)]
    now[0] += 5.0
    pacer.wait(30 * MiB)  # behind the line (3.75 s of bytes in 8 s): no wait
    assert slept == [pytest.approx(2.0)]
    assert pacer.delay(0) == 0.0


def test_the_stage_gives_bwlimit_in_bytes_per_second(tmp_path: Path, fake: FakeTarget,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """``--bwlimit`` is KiB/s, as PVE counts (docs/cli.md): the copier gets bytes per second."""
    source = FakeSource([sparse_disk(tmp_path / "disk.raw", WINDOW)])
    caplog.set_level(logging.DEBUG, logger="v2p.runner")
    Run(source, fake, bwlimit=1 << 20)()
    copies = [record.argv for record in caplog.records if "convert" in getattr(record, "argv", [])
              and "-n" in getattr(record, "argv", [])]
    assert copies and all(argv[argv.index("-r") + 1] == str(1 << 30) for argv in copies)


def test_progress_of_a_window_runs_in_the_migration_thread(tmp_path: Path) -> None:
    """Checkpoints and progress come from the thread that runs the copy (the flush runs beside it)."""
    src = sparse_disk(tmp_path / "disk.raw", 2 * WINDOW)
    threads: set[int] = set()
    windows.copy(DiskEndpoint("raw", str(src), 2 * WINDOW), Volume("", tmp_path / "out.raw", "raw"),
                 capacity=2 * WINDOW, on_progress=lambda *_: threads.add(threading.get_ident()),
                 on_checkpoint=lambda _p: threads.add(threading.get_ident()))
    assert threads == {threading.get_ident()}


class DownloadedSource(FakeSource):
    """A source whose disks cost a download to read (``rereadable`` False): read once into a local stage."""

    def disk_endpoint(self, disk: DiskSpec, workdir: Path) -> DiskEndpoint:
        return dataclasses.replace(super().disk_endpoint(disk, workdir), rereadable=False)


def test_the_fetch_into_the_local_stage_says_what_it_wrote(tmp_path: Path, fake: FakeTarget) -> None:
    source = DownloadedSource([sparse_disk(tmp_path / "disk.raw")])
    run = Run(source, fake)
    assert run()["finished"]
    fetched = [e for e in run.events if e.kind == "progress" and e.step == "fetch"]
    assert fetched and fetched[-1].done == 4 * WINDOW
    assert 4 * DATA <= fetched[-1].data["moved"] < 4 * DATA + MiB  # the data, not the 256 MiB of the disk


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[PVESim]:
    from pve_sim.fixture import start_or_skip

    with start_or_skip(tmp_path / "sim") as running:
        yield running


def test_the_upload_path_s_staging_copy_goes_on_from_its_checkpoint(sim: PVESim, tmp_path: Path) -> None:
    """Onto PVE through an API token (RemoteImportSink): the disk is staged locally as qcow2 window by
    window; a cancelled migration run again carries the staging copy on, then uploads and imports it."""
    source = FakeSource([(sparse_disk(tmp_path / "disk.raw"))])
    migration: Migration

    def on_event(event: Event) -> None:
        if event.kind == "progress" and event.stage == "convert" and (event.done or 0) > 2 * WINDOW:
            migration.cancel()

    migration = Migration(source, VMID, target=target_of(sim, tmp_path, "&storage=local"), ostype="l26",
                          boot_check=False, on_event=on_event)
    with pytest.raises(Cancelled):
        migration.run()
    seen: list[Event] = []
    again = Migration(source, VMID, target=target_of(sim, tmp_path, "&storage=local"), ostype="l26",
                      boot_check=False, on_event=seen.append)
    assert again.run()["finished"]
    copied = [e for e in seen if e.kind == "progress" and e.stage == "convert" and e.step is None]
    assert copied[0].done == 2 * WINDOW and copied[-1].done == 4 * WINDOW
    assert any("the copy goes on at byte" in e.message for e in seen if e.kind == "info")
