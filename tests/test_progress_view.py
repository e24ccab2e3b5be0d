"""How progress is shown: the meter (real bytes moved, rate, ETA), ``migrate``'s plain lines off a terminal,
``--progress=json``, the plan's live view in a 60-column pseudo-terminal, ``GiB moved``, the log files.

The clock is injected wherever a test counts lines by time: no test here waits on the wall clock.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import stat
import struct
import termios
from pathlib import Path
from typing import Any

import pyte
import pytest
from pve_sim.fixture import pve_fixture  # noqa: F401

from conftest import V2P, failing_after
from v2p.eventlines import EventPrinter
from v2p.events import Event
from v2p.planrun import PlanReport, VMRun
from v2p.planview import PlanView, summary
from v2p.progress import PLAIN_EVERY_PERCENT, PLAIN_EVERY_SECONDS, Progress

MiB, GiB = 1 << 20, 1 << 30


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def progress(stage: str, disk: int, done: int, total: int, moved: int | None = None, step: str | None = None,
             percent: float | None = None) -> Event:
    """A progress event as the pipeline sends it (``percent``: as qemu-img said it, else from the bytes)."""
    data: dict[str, Any] = {"disk": disk, "percent": 100.0 * done / total if percent is None else percent,
                            "bytes": done, "total": total}
    if moved is not None:
        data["moved"] = moved
    return Event("progress", stage, data=data, disk=disk, done=done, total=total, step=step)


def test_rate_and_moved_count_real_bytes_and_the_eta_the_position() -> None:
    """A 2 GiB disk holding 700 MiB: the position runs over the holes, the rate is of what is written."""
    clock = Clock()
    meters = Progress(clock)
    for second in range(0, 21):  # 20 s: the position at 100 MiB/s, 35 MiB/s really written
        clock.now = 1000.0 + second
        meter = meters.see(progress("convert", 0, second * 50 * MiB, 2 * GiB, moved=second * 35 * MiB // 2))
    assert meter is not None
    assert meter.rate == pytest.approx(17.5 * MiB)  # moved, not the 50 MiB/s of the position
    assert meter.eta == pytest.approx((2 * GiB - 1000 * MiB) / (50 * MiB))  # the position's pace
    assert meters.moved == 350 * MiB
    assert meter.words() == "disk 0: 49 % (1.0 of 2.0 GiB), 350 MiB written, 17.5 MiB/s, ETA 0:00:21"
    # An upload of the same disk moves its bytes again: not counted as moved onto the target twice.
    meters.see(progress("verify", 0, 100 * MiB, 700 * MiB, moved=100 * MiB, step="upload"))
    assert meters.moved == 350 * MiB
    # An old producer (no 'moved'): its position is all there is.
    meters.see(progress("convert:1", 1, 10 * MiB, 20 * MiB))
    assert meters.moved == 360 * MiB


def feed_copy(handler: Any, clock: Clock, *, seconds_per_percent: float, total: int = 2 * GiB) -> None:
    """A copy from 0 to 100 % in one-percent steps, ``seconds_per_percent`` apart, 35 % of it data."""
    handler(Event("stage-start", "convert", "write the disk"))
    for percent in range(0, 101):
        clock.now += seconds_per_percent
        handler(progress("convert", 0, total * percent // 100, total, moved=total * percent * 35 // 10000,
                         percent=float(percent)))
    handler(Event("stage-done", "convert", "1.00s"))


def test_migrate_off_a_terminal_says_progress_every_10_percent_or_10_seconds() -> None:

    assert (PLAIN_EVERY_SECONDS, PLAIN_EVERY_PERCENT) == (10.0, 10.0)
    out, clock = io.StringIO(), Clock()
    feed_copy(EventPrinter(out, live=False, clock=clock), clock, seconds_per_percent=0.1)  # fast: by percent
    lines = [line for line in out.getvalue().splitlines() if "%" in line]
    assert [int(line.split(": ")[1].split(" %")[0]) for line in lines] == list(range(10, 101, 10)), lines
    assert lines[4] == "[convert] disk 0: 50 % (1.0 of 2.0 GiB), 358 MiB written, 71.7 MiB/s, ETA 0:00:05"
    out, clock = io.StringIO(), Clock()
    feed_copy(EventPrinter(out, live=False, clock=clock), clock, seconds_per_percent=4.0)  # slow: by time
    percents = [int(line.split(": ")[1].split(" %")[0]) for line in out.getvalue().splitlines() if "%" in line]
    assert percents[:4] == [3, 6, 9, 10] and percents[-1] == 100, percents  # 12 s, 24 s, 36 s, then 10 %
    assert out.getvalue().count("100 %") == 1


def test_migrate_on_a_terminal_shows_a_bar_with_bytes_written_rate_and_eta() -> None:

    out, clock = io.StringIO(), Clock()
    printer = EventPrinter(out, live=True, clock=clock)
    printer(Event("stage-start", "convert", "write the disk"))
    for percent in range(0, 51):
        clock.now += 0.1
        printer(progress("convert", 0, 2 * GiB * percent // 100, 2 * GiB, moved=2 * GiB * percent * 35 // 10000,
                         percent=float(percent)))
    printer.bar.refresh()
    drawn = out.getvalue().split("\r")[-1]
    expected = r"\[convert\] disk 0:  50%\|.*\| 1\.00G/2\.00G, 358 MiB written, 71\.7 MiB/s, ETA 0:00:05"
    assert re.match(expected, drawn), drawn
    printer(progress("verify", 0, 100 * MiB, 700 * MiB, moved=100 * MiB, step="upload"))  # the next step's bar
    printer.bar.refresh()
    assert out.getvalue().split("\r")[-1].startswith("[verify] upload disk 0:  14%|")


def test_migrate_bar_on_a_pseudo_terminal_that_says_no_rows() -> None:
    """``script``, some CI runners and serial consoles report 0 rows: the bar is drawn all the same, at
    most as wide as the terminal."""

    master, slave = os.openpty()
    os.set_blocking(master, False)
    pty_columns(slave, 60, rows=0)
    stream = open(slave, "w", closefd=True)  # noqa: SIM115 (closed below)
    try:
        printer = EventPrinter(stream, clock=Clock())
        assert printer.live
        printer(progress("convert", 0, GiB // 2, GiB, moved=GiB // 4))
        printer.close_bar()
        stream.flush()
        raw = drain(master)
    finally:
        stream.close()
        os.close(master)
    assert b"[convert] disk 0:  50%|" in raw and widest(raw) <= 60, raw


def test_migrate_piped_prints_progress_lines(inproc: V2P, small_vmdk: Path) -> None:
    proc = inproc("migrate", str(small_vmdk), "--vmid", "150", "--no-boot-check")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\[convert\] disk 0: 100 % \(16\.0 of 16\.0 MiB\), [0-9.]+ [KM]?i?B written$", proc.stdout,
                     re.M), proc.stdout


@pytest.mark.parametrize("flag", ["--progress=json", "--machine-readable"])
def test_progress_json_is_one_event_a_line_then_the_result(inproc: V2P, small_vmdk: Path, flag: str) -> None:
    proc = inproc("migrate", str(small_vmdk), "--vmid", "151", "--no-boot-check", flag)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # nothing else on stdout
    assert "[convert] write the disk" in proc.stderr  # the lines a person reads
    moving = [line for line in lines if line["kind"] == "progress" and line["step"] is None]
    assert moving and all(line["vmid"] == 151 and line["stage"] == "convert" and line["disk"] == 0
                          and line["data"]["total"] == 16 * MiB for line in moving)
    assert moving[-1]["data"]["bytes"] == 16 * MiB
    # verify is a long step too: the compare's own progress, up to the whole disk
    compared = [line for line in lines if line["kind"] == "progress" and line["step"] == "compare"]
    assert compared and {line["stage"] for line in compared} == {"verify"}
    assert compared[-1]["data"]["bytes"] == 16 * MiB
    assert {"stage-start", "stage-done"} <= {line["kind"] for line in lines}
    last = lines[-1]
    assert last["kind"] == "result" and last["vmid"] == 151 and last["ok"] and last["exit_code"] == 0
    assert last["result"]["finished"] and Path(last["log"]).is_file()


def test_progress_json_says_a_failure_last(inproc: V2P, small_vmdk: Path) -> None:
    assert inproc("migrate", str(small_vmdk), "--vmid", "152", "--no-boot-check").returncode == 0
    proc = inproc("migrate", str(small_vmdk), "--vmid", "152", "--no-boot-check", "--cores", "3",
                  "--progress=json")
    assert proc.returncode != 0
    last = json.loads(proc.stdout.splitlines()[-1])
    assert last["kind"] == "result" and not last["ok"] and last["exit_code"] == proc.returncode and last["error"]


def test_plan_run_progress_json_names_each_vm(inproc: V2P, small_vmdk: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"defaults: {{target: {{kind: local, dir: {tmp_path / 'target'}, accel: tcg}}, "
                    f"boot_check: false}}\nvms:\n  - {{source: {small_vmdk}, vmid: 160, name: web01}}\n")
    proc = inproc("plan", "run", str(plan), "--progress=json")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert all(line["vm"] == "web01" for line in lines[:-1])
    moving = [line for line in lines if line["kind"] == "progress"]
    assert moving and all(line["vmid"] == 160 and line["disk"] == 0 for line in moving)
    # An empty 16 MiB disk: its copy writes (next to) nothing, and the report counts what was written.
    copied = [line for line in moving if line["step"] is None]
    assert lines[-1]["kind"] == "result" and lines[-1]["ok"]
    assert lines[-1]["vms"][0]["bytes_moved"] == copied[-1]["data"]["moved"] < MiB
    assert "web01" in proc.stderr  # the view, on stderr


def test_gib_moved_is_the_sum_of_real_bytes_moved() -> None:
    """A 2 GiB disk holding 700 MiB and a 1 GiB one holding 100 MiB: 800 MiB moved, not 3 GiB."""
    vm = VMRun("web01", 120, "", "local", result="migrated")
    for stage, disk, total, data in (("convert", 0, 2 * GiB, 700 * MiB), ("convert:1", 1, GiB, 100 * MiB)):
        vm.see(Event("stage-start", stage, "write"))
        for tenth in range(11):
            vm.see(progress(stage, disk, total * tenth // 10, total, moved=data * tenth // 10))
        vm.see(Event("stage-done", stage, "1s"))
    vm.see(progress("verify", 0, 700 * MiB, 700 * MiB, moved=700 * MiB, step="upload"))  # the same bytes again
    assert vm.moved == 800 * MiB and vm.to_dict()["bytes_moved"] == 800 * MiB
    row = summary(PlanReport([vm])).splitlines()[1]
    assert row.split()[-1] == f"{800 / 1024:.3f}", row


def pty_columns(fd: int, columns: int, rows: int = 24) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def drain(master: int) -> bytes:
    got = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except (BlockingIOError, OSError):
            return got
        if not chunk:
            return got
        got += chunk


def widest(raw: bytes) -> int:
    """The widest view line the bytes write, escape sequences left out (each \\r or \\n starts a line);
    not the messages (``[vm] ...``), which scroll above the view and wrap like any printed line."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode(errors="replace"))
    return max((len(part) for part in re.split(r"[\r\n]", text) if not part.startswith("[")), default=0)


def test_the_live_view_fits_a_60_column_terminal_and_a_narrowed_one() -> None:
    """Three VMs with long names copying, 100 redraws each, a warning and outcomes scrolling above them,
    the terminal narrowed to 40 columns half-way: no line is wider than the terminal, and the screen and
    its scrollback hold the outcomes and one line per VM (not a copy of a line per redraw)."""
    master, slave = os.openpty()
    os.set_blocking(master, False)
    pty_columns(slave, 60)
    stream = open(slave, "w", closefd=True)  # noqa: SIM115 (closed below)
    screen = pyte.HistoryScreen(60, 24, history=1000)
    terminal = pyte.ByteStream(screen)
    clock = Clock()
    view = PlanView(stream, clock=clock)
    assert view.live
    vms = [VMRun(f"a-rather-long-vm-name-{index}", 700 + index, "", "local") for index in range(3)]
    widths = []
    try:
        for vm in vms:
            view(vm, Event("vm-wait", "plan", "queued"))
        for vm in vms:
            vm.result = "running"
            view(vm, Event("vm-start", "plan", "started (process 1)"))
            vm.see(Event("stage-start", "convert", "write the disk"))
            view(vm, Event("stage-start", "convert", "write the disk"))
        for percent in range(0, 101):
            if percent == 50:
                stream.flush()
                raw = drain(master)
                terminal.feed(raw)
                widths.append((60, widest(raw)))
                pty_columns(slave, 40)
                screen.resize(24, 40)
            for vm in vms:
                clock.now += 0.3
                event = progress("convert", 0, 4 * GiB * percent // 100, 4 * GiB, moved=GiB * percent // 100)
                vm.see(event)
                view(vm, event)
            if percent == 30:
                view(vms[1], Event("warning", "convert", "a warning that is much longer than the terminal is wide"))
        for vm in vms:
            vm.result = "migrated"
            view(vm, Event("vm-done", "plan", "migrated"))
        view.close()
        stream.flush()
        raw = drain(master)
        terminal.feed(raw)
        widths.append((40, widest(raw)))
    finally:
        stream.close()
        os.close(master)
    assert all(wide <= columns for columns, wide in widths), widths
    scrolled = ["".join(row[column].data for column in range(screen.columns)) for row in screen.history.top]
    shown = [line.rstrip() for line in [*scrolled, *screen.display] if line.strip()]
    # the warning (wrapped: it is a message, not a view line) and three outcomes above, three VM lines
    assert len(shown) <= 12, "\n".join(shown)
    assert sum(line.startswith("a-rather-long-vm-name-1 ") for line in shown) == 1, "\n".join(shown)
    assert any(re.match(r"a-rather-long-vm-name-2 +702  migrated", line) for line in shown), shown


def test_plan_view_off_a_terminal_adds_progress_lines() -> None:
    out, clock = io.StringIO(), Clock()
    view = PlanView(out, live=False, clock=clock)
    vm = VMRun("web01", 120, "", "local", result="running", progress=Progress(clock))

    def handler(event: Event) -> None:
        vm.see(event)
        view(vm, event)
    feed_copy(handler, clock, seconds_per_percent=0.1)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[web01] [convert] write the disk"
    assert "[web01] [convert] disk 0: 50 % (1.0 of 2.0 GiB), 358 MiB written, 71.7 MiB/s, ETA 0:00:05" in lines
    assert sum("%" in line for line in lines) == 10


def test_a_log_file_per_migration_holds_the_debug_lines(inproc: V2P, small_vmdk: Path, tmp_path: Path) -> None:
    proc = inproc("migrate", str(small_vmdk), "--vmid", "153", "--no-boot-check")
    assert proc.returncode == 0, proc.stderr
    logs = tmp_path / "target" / "migrations" / "logs"
    [log] = list(logs.iterdir())
    assert re.fullmatch(r"153-\d{8}T\d{6}Z\.log", log.name)
    assert f"v2p: the log of this run: {log}" in proc.stdout and proc.stderr == ""
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700 and stat.S_IMODE(log.stat().st_mode) == 0o600
    text = log.read_text()
    assert re.search(r"^\S+Z v2p: DEBUG: v2p\.runner: \S*qemu-img convert .*: exit 0 after", text, re.M), text
    assert "[convert] disk 0: 100 % (16.0 of 16.0 MiB)" in text and "[finish] done in" in text
    assert "v2p: DEBUG" not in proc.stderr  # without -v, the terminal is spared them


def test_a_failed_run_says_where_its_log_is(inproc: V2P, small_vmdk: Path) -> None:
    with failing_after("convert"):
        proc = inproc("migrate", str(small_vmdk), "--vmid", "154", "--no-boot-check")
    assert proc.returncode != 0
    error, where = proc.stderr.splitlines()[-2:]
    assert error.startswith("v2p: error: the host went away"), proc.stderr
    assert where.startswith("v2p: the log of this run: "), proc.stderr
    text = Path(where.removeprefix("v2p: the log of this run: ")).read_text()
    assert "[convert] done in" in text and "v2p: ended by TargetError: the host went away" in text


def test_a_run_refused_before_it_makes_anything_leaves_no_log(inproc: V2P, tmp_path: Path) -> None:
    """A bad input is one line, and leaves nothing behind: not even a log."""
    garbage = tmp_path / "garbage.vmdk"
    garbage.write_bytes(b"\x00garbage" * 100)
    proc = inproc("migrate", str(garbage), "--vmid", "157", "--no-boot-check")
    assert proc.returncode != 0 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not list(tmp_path.rglob("logs"))


def test_plan_run_keeps_a_log_per_run_and_per_migration(inproc: V2P, small_vmdk: Path, tmp_path: Path) -> None:
    plan = tmp_path / "wave.yaml"
    plan.write_text(f"defaults: {{target: {{kind: local, dir: {tmp_path / 'target'}, accel: tcg}}, "
                    f"boot_check: false}}\nvms:\n  - {{source: {small_vmdk}, vmid: 161, name: web01}}\n")
    proc = inproc("plan", "run", str(plan), "--json")
    assert proc.returncode == 0, proc.stderr
    logs = tmp_path / "target" / "migrations" / "logs"
    [plan_log] = list(logs.glob("plan-wave-*.log"))
    assert f"v2p: the log of this run: {plan_log}" in proc.stderr
    text = plan_log.read_text()
    assert "[web01] [convert] disk 0: 100 % (16.0 of 16.0 MiB)" in text and "1 of 1 VMs migrated" in text
    [vm_log] = list(logs.glob("161-*.log"))
    assert json.loads(proc.stdout)["vms"][0]["log"] == str(vm_log)
    text = vm_log.read_text()
    assert re.search(r"v2p: DEBUG: v2p\.runner: \S*qemu-img convert ", text) and "[finish] done in" in text


def test_a_secret_read_in_the_run_is_masked_in_its_log(tmp_path: Path) -> None:
    import logging

    from v2p.credentials import clean_secret
    from v2p.logfile import RunLog

    secret = clean_secret("5e3c7a1b-0d2f-4b0e-9c1a-7f3e2d1c0b9a\n", "$V2P_PVE_TOKEN", token=True)
    with RunLog(tmp_path / "migrations", "155") as log:
        log.keep()
        logging.getLogger("v2p.runner").debug("curl -H 'Authorization: PVEAPIToken=x=%s'", secret)
        print(f"[preflight] a message that quotes {secret}", file=log.stream)
    assert log.path is not None
    text = log.path.read_text()
    assert secret not in text and text.count("***") == 2, text
    assert not logging.getLogger("v2p").handlers or log.handler not in logging.getLogger("v2p").handlers


def test_a_pve_token_used_in_a_run_is_not_in_its_log(pve: Any, tmp_path: Path, source_of: Any, v2p: V2P) -> None:
    """The real run onto the PVE simulator, with -v: every command and every step's progress logged, never
    the token."""
    src = source_of("monolithicSparse")
    url = f"pve://root@pam!v2p@{pve.host}/{pve.cluster.node}?storage=local&fingerprint={pve.fingerprint}"
    proc = v2p("--target", url, "-v", "migrate", str(src.descriptor), "--vmid", "156", "--no-boot-check",
               V2P_PVE_TOKEN=pve.tokens["root@pam!v2p"], XDG_DATA_HOME=str(tmp_path / "xdg"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [log] = list((tmp_path / "xdg").rglob("logs/156-*.log"))
    text = log.read_text()
    assert "v2p: DEBUG: v2p.runner:" in text and "[verify]" in text
    assert pve.tokens["root@pam!v2p"] not in text
    # every long step's progress, in the log as off a terminal: the copy, the upload, PVE's import
    for step in ("[convert] disk 0: 100 %", "[verify] upload disk 0: 100 %", "[attach] import disk 0: 100 %"):
        assert step in text and step in proc.stdout, step
