"""Hostile plans: every one is refused in one FILE:LINE:COLUMN line (or one line naming the file), fast,
without a traceback; `plan run` makes nothing for a VM `plan validate` refuses; validate checks the
drivers ISO and the device as the run would."""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from v2p import cli

PROBLEM = re.compile(r"^(?P<file>[^\n]+?):(?P<line>\d+):(?P<column>\d+): (?P<message>[^\n]*)$")


pytestmark = pytest.mark.usefixtures("restore_signal_handlers")  # cli.main runs in this process


@pytest.fixture
def disk(small_vmdk: Path) -> Path:
    return small_vmdk


def validate(capsys: pytest.CaptureFixture[str], plan: Path | str, *extra: str) -> tuple[int, list[str], str]:
    code = cli.main([*extra, "plan", "validate", str(plan)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err.splitlines(), out


def one_problem(capsys: pytest.CaptureFixture[str], plan: Path) -> tuple[int, int, str]:
    code, lines, _out = validate(capsys, plan)
    assert code == 2, lines
    assert len(lines) == 1, lines
    match = PROBLEM.match(lines[0])
    assert match and match["file"] == str(plan), lines
    return int(match["line"]), int(match["column"]), match["message"]


@pytest.mark.parametrize("value", ["2024-02-30", "2023-02-29", "2001-13-14t21:59:43.10-05:00", "="])
def test_a_date_or_other_yaml_value_is_text_the_key_check_names(tmp_path, capsys, disk, value) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"vms:\n  - {{source: {disk}, vmid: {value}}}\n")
    line, column, message = one_problem(capsys, plan)
    assert (line, column) == (2, plan.read_text().splitlines()[1].index(value) + 1)
    assert message.startswith("vmid: expected a whole number") and repr(value) in message


def test_a_date_where_text_is_expected_is_that_text(tmp_path, capsys, disk) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"vms:\n  - {{source: {disk}, vmid: 101, storage: 2024-02-30}}\n")
    line, column, message = one_problem(capsys, plan)
    assert line == 2 and "storage" in message and "'2024-02-30'" in message  # no such storage: the text


@pytest.mark.parametrize("digits", [31, 4301, 5000])
def test_a_huge_integer_is_one_line(tmp_path, capsys, disk, digits) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"vms:\n  - {{source: {disk}, vmid: {'9' * digits}}}\n")
    line, column, message = one_problem(capsys, plan)
    assert (line, column) == (2, plan.read_text().splitlines()[1].index("999") + 1)
    assert f"{digits} characters long" in message


@pytest.mark.parametrize("text", [
    "defaults: {{bus: scsi}}\nvms:\n  - {{<<: {{bus: ide}}, source: {disk}, vmid: 101}}\n",
    "vms:\n  - source: {disk}\n    vmid: 101\n    <<: {{bus: ide}}\n",
    "<<: {{defaults: {{}}}}\nvms:\n  - {{source: {disk}, vmid: 101}}\n",
])
def test_the_merge_key_is_refused_at_its_place(tmp_path, capsys, disk, text) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(text.format(disk=disk))
    line, column, message = one_problem(capsys, plan)
    where = next(i for i, row in enumerate(plan.read_text().splitlines()) if "<<" in row)
    assert (line, column) == (where + 1, plan.read_text().splitlines()[where].index("<<") + 1)
    assert "merge key" in message


@pytest.mark.parametrize("depth", [17, 2000, 5000, 100_000])
def test_deep_flow_nesting_is_refused(tmp_path, capsys, depth) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("vms: " + "[" * depth + "]" * depth + "\n")
    line, _column, message = one_problem(capsys, plan)
    assert line == 1 and "nested more than" in message


def test_deep_block_nesting_is_refused_and_a_plan_of_normal_depth_still_reads(tmp_path, capsys, disk) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("vms:\n" + "".join("  " * i + "- \n" for i in range(1, 400)))
    line, _column, message = one_problem(capsys, plan)
    assert line > 1 and "nested more than" in message
    plan.write_text(f"defaults: {{target: {{dir: {tmp_path / 't'}}}, networks: {{LAN: vmbr0}}}}\n"
                    f"vms:\n  - {{source: {disk}, vmid: 101}}\n")
    code, lines, out = validate(capsys, plan)
    assert code == 0 and lines == [] and "1 VM, OK" in out
    assert not (tmp_path / "t").exists()


def run_v2p(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """v2p in a process of its own with 1 GiB of address space: today's unbounded read dies of it."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "v2p", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, preexec_fn=limit)


@pytest.mark.usefixtures("v2p_process")  # its own address-space limit
@pytest.mark.parametrize("command", ["validate", "run", "status"])
def test_a_plan_that_is_dev_zero_is_refused_at_once(command) -> None:
    proc = run_v2p("plan", command, "/dev/zero")
    assert proc.returncode not in (0, None) and proc.stdout == ""
    assert proc.stderr.splitlines() == ["v2p: error: plan /dev/zero is a character device, not a regular file: "
                                        "refused"], proc.stderr


@pytest.mark.usefixtures("v2p_process")  # its own address-space limit, and a timeout should it hang
@pytest.mark.parametrize("writer", [False, True])
def test_a_plan_that_is_a_fifo_is_refused_without_hanging(tmp_path, writer) -> None:
    fifo = tmp_path / "plan.yaml"
    os.mkfifo(fifo)
    holder = os.open(fifo, os.O_RDWR) if writer else None  # a writer that never writes nor closes
    try:
        proc = run_v2p("plan", "validate", str(fifo), timeout=20)
    finally:
        if holder is not None:
            os.close(holder)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"v2p: error: plan {fifo} is a FIFO (named pipe), not a regular "
                                        "file: refused"], proc.stderr


def test_a_plan_over_the_size_bound_is_refused(tmp_path, capsys, disk) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"vms:\n  - {{source: {disk}, vmid: 101}}\n" + "# padding\n" * 200_000)
    code, lines, _out = validate(capsys, plan)
    assert code == 1 and len(lines) == 1 and "more than the 1048576" in lines[0], lines


def test_validate_checks_the_drivers_iso_and_device_as_the_run_would(tmp_path, capsys, disk) -> None:
    target = tmp_path / "target"
    (tmp_path / "folder.iso").mkdir()
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""\
defaults: {{target: {{dir: {target}}}}}
vms:
  - {{source: {disk}, vmid: 101, name: a, drivers_iso: /etc/passwd}}
  - {{source: {disk}, vmid: 102, name: b, device: /dev/v2p-no-such-device}}
  - {{source: {disk}, vmid: 103, name: c, device: /etc/passwd}}
  - {{source: {disk}, vmid: 104, name: d, drivers_iso: folder.iso}}
  - {{source: {disk}, vmid: 105, name: e, device: /dev/null}}
""")
    code, lines, _out = validate(capsys, plan)
    assert code == 2
    found = {int(m["line"]): m["message"] for m in map(PROBLEM.match, lines) if m}
    assert len(found) == len(lines) == 5, lines
    assert found[3].startswith("drivers_iso: /etc/passwd is not a readable ISO image")
    assert found[4] == "device: /dev/v2p-no-such-device: no such device"
    assert found[5].startswith("device: /etc/passwd is not a block device")
    assert found[6] == f"drivers_iso {tmp_path / 'folder.iso'}: no such file"
    assert found[7].startswith("device: /dev/null is not a block device")
    assert not target.exists()


def test_plan_run_makes_nothing_for_a_vm_validate_refuses(tmp_path, capsys, disk) -> None:
    target = tmp_path / "target"
    broken = tmp_path / "broken.vmdk"
    broken.write_bytes(b"KDMV" + os.urandom(4096))
    link = tmp_path / "link.vmdk"
    link.symlink_to("/etc/passwd")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""\
defaults: {{target: {{dir: {target}, accel: tcg}}, boot_check: false}}
vms:
  - {{source: {tmp_path / 'missing.vmdk'}, vmid: 101}}
  - {{source: {broken}, vmid: 102}}
  - {{source: {disk}, vmid: 103, os: win7, bus: virtio, drivers_iso: /etc/passwd}}
  - {{source: {disk}, vmid: 104, name: dev, device: /dev/v2p-no-such-device}}
""")
    code = cli.main(["plan", "run", str(plan)])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in out + err
    assert "0 of 4 VMs migrated" in out
    for name, fragment in (("missing", "no such file"), ("broken", "broken.vmdk"),
                           ("disk", "drivers_iso: /etc/passwd"), ("dev", "no such device")):
        assert re.search(rf"^{name}: {re.escape(str(plan))}:\d+:\d+: .*{re.escape(fragment)}", out, re.M), out
    assert not target.exists(), sorted(str(p) for p in target.rglob("*"))
    assert oct(os.stat("/etc/passwd").st_mode)  # untouched, of course
    shutil.rmtree(tmp_path / "target", ignore_errors=True)


def test_plan_run_dry_run_says_the_same(tmp_path, capsys, disk) -> None:
    target = tmp_path / "target"
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"defaults: {{target: {{dir: {target}}}}}\n"
                    f"vms:\n  - {{source: {disk}, vmid: 101, drivers_iso: /etc/passwd}}\n")
    code = cli.main(["plan", "run", "--dry-run", str(plan)])
    out, err = capsys.readouterr()
    # refused as the run refuses it: the dry run fails as the run would (exit 1)
    assert code == 1 and "refused: " in out and "drivers_iso: /etc/passwd is not a readable ISO image" in out + err
    assert not target.exists()


def test_a_value_with_a_newline_stays_on_its_problems_line(tmp_path, capsys) -> None:
    target = tmp_path / "target"
    plan = tmp_path / "plan.yaml"
    plan.write_text(f'defaults: {{target: {{dir: {target}}}}}\n'
                    f'vms:\n  - {{source: "a\\nb\\u001b[2J.vmdk", vmid: 101, name: a}}\n')
    code, lines, _out = validate(capsys, plan)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"{plan}:3:") and "a\\nb\\x1b[2J.vmdk: no such file" in lines[0], lines
    code = cli.main(["plan", "run", str(plan)])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in out + err
    assert all(line.isprintable() for line in (out + err).splitlines()), out + err
    assert not target.exists()


def test_a_target_folder_that_cannot_be_made(tmp_path, capsys, disk) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    for folder in (blocker, blocker / "below"):
        plan = tmp_path / "plan.yaml"
        plan.write_text(f"defaults: {{target: {{dir: {folder}}}}}\nvms:\n  - {{source: {disk}, vmid: 101}}\n")
        line, _column, message = one_problem(capsys, plan)
        assert line == 1 and message == f"target: {blocker} is a regular file, not a folder: the target folder " \
                                        "cannot be made there", message
        assert cli.main(["plan", "run", str(plan)]) == 1
        assert "is a regular file, not a folder" in capsys.readouterr().out
    assert blocker.read_text() == "mine"
