"""Misuse of the ``v2p`` command and of the library's options: bad numbers, VMIDs that are not
written in ASCII digits, an empty target folder, missing or unknown arguments, and a reader that
closes the pipe early. Every refusal is one ``v2p: error:`` line and a non-zero exit; nothing is
created on the target."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, V2P
from v2p import api
from v2p.options import MigrationOptions, OptionError, check_vmid

SECONDS = "must be a positive number of seconds"
SECONDS_OR_ZERO = "must be 0 or a positive number of seconds"
VMID_DIGITS = "a VMID is written in the digits 0-9 only (hint: PVE VMIDs run from 100 to 999999999)"


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single ``v2p: error:`` line of a refused command (no usage dump, no traceback)."""
    assert proc.returncode != 0, proc.stdout
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("v2p: error: "), proc.stderr
    return lines[0].removeprefix("v2p: error: ")


def assert_target_untouched(v2p: V2P) -> None:
    assert not v2p.target.exists() or not any(v2p.target.rglob("*.conf")), "a VM was created"
    assert not (v2p.target / "migrations").exists() or not any((v2p.target / "migrations").iterdir())


NUMBER_CASES = [
    (["migrate", "x.vmdk", "--vmid", "100", "--boot-timeout", "-1"], f"--boot-timeout -1: {SECONDS}"),
    (["migrate", "x.vmdk", "--vmid", "100", "--boot-timeout", "nan"], f"--boot-timeout nan: {SECONDS}"),
    (["migrate", "x.vmdk", "--vmid", "100", "--boot-timeout", "inf"], f"--boot-timeout inf: {SECONDS}"),
    (["migrate", "x.vmdk", "--vmid", "100", "--boot-timeout", "0"], f"--boot-timeout 0: {SECONDS}"),
    (["migrate", "x.vmdk", "--vmid", "100", "--boot-timeout=-inf"], f"--boot-timeout -inf: {SECONDS}"),
    (["migrate", "x.vmdk", "--vmid", "100", "--boot-timeout", "1e9"],
     "--boot-timeout 1e9: must be at most 86400 seconds (a day)"),
    (["migrate", "x.vmdk", "--vmid", "100", "--boot-timeout", "6_0"], f"--boot-timeout '6_0': {SECONDS}"),
    (["migrate", "x.vmdk", "--vmid", "100", "--shutdown-timeout", "-1"],
     f"--shutdown-timeout -1: {SECONDS_OR_ZERO}"),
    (["migrate", "x.vmdk", "--vmid", "100", "--dance-wait", "nan"], f"--dance-wait nan: {SECONDS}"),
    (["migrate", "x.vmdk", "--vmid", "100", "--cores", "-1"], "--cores -1: must be a whole number from 1 to 512"),
    (["migrate", "x.vmdk", "--vmid", "100", "--cores", "0"], "--cores 0: must be a whole number from 1 to 512"),
    (["migrate", "x.vmdk", "--vmid", "100", "--cores", "+2"], "--cores +2: must be a whole number from 1 to 512"),
    (["migrate", "x.vmdk", "--vmid", "100", "--memory", "١٠٢٤"],
     "--memory '١٠٢٤': must be a whole number from 16 to 4194304 MiB"),
    (["migrate", "x.vmdk", "--vmid", "100", "--memory", "1e3"],
     "--memory 1e3: must be a whole number from 16 to 4194304 MiB"),
    (["migrate", "x.vmdk", "--vmid", "100", "--bwlimit", "0"],
     "--bwlimit 0: must be a whole number from 1 to 1073741824 KiB/s"),
    (["migrate", "x.vmdk", "--vmid", "100", "--bwlimit", "1" + "0" * 5000],
     "--bwlimit '1000000000000000000000000000000000000000...': must be a whole number from 1 to "
     "1073741824 KiB/s"),
    (["dance", "100", "--dance-wait", "inf"], f"--dance-wait inf: {SECONDS}"),
    (["dance", "100", "--boot-wait", "-1"], f"--boot-wait -1: {SECONDS}"),
    (["dance", "100", "--shutdown-timeout", "nan"], f"--shutdown-timeout nan: {SECONDS_OR_ZERO}"),
    (["vm", "stop", "100", "--timeout", "-1"], f"--timeout -1: {SECONDS_OR_ZERO}"),
    (["vm", "stop", "100", "--timeout", "nan"], f"--timeout nan: {SECONDS_OR_ZERO}"),
]


@pytest.mark.parametrize(("args", "message"), NUMBER_CASES, ids=lambda v: " ".join(v)[-40:] if isinstance(v, list)
                         else None)
def test_bad_numbers_are_refused_in_one_line(inproc: V2P, args: list[str], message: str) -> None:
    proc = inproc(*args)
    assert one_error_line(proc) == message
    assert proc.returncode == 1
    assert_target_untouched(inproc)


@pytest.mark.parametrize("timeout", ["-1", "nan"])
def test_a_bad_boot_timeout_does_not_skip_the_boot_check(inproc: V2P, source_of: Any, timeout: str) -> None:
    """Before: the boot check ended at once and the migration reported success."""
    src = source_of("monolithicSparse")
    proc = inproc("migrate", str(src.descriptor), "--vmid", "100", "--boot-timeout", timeout)
    assert one_error_line(proc) == f"--boot-timeout {timeout}: {SECONDS}"
    assert_target_untouched(inproc)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0, 0, 1e9, True, "60", None])
@pytest.mark.parametrize("option", ["boot_timeout", "dance_wait"])
def test_library_refuses_bad_seconds(option: str, value: object) -> None:
    with pytest.raises(OptionError, match=f"^--{option.replace('_', '-')} .*: must be"):
        MigrationOptions(**{option: value})


@pytest.mark.parametrize("value", [math.nan, -1.0, math.inf, "0"])
def test_library_refuses_a_bad_shutdown_timeout(value: object) -> None:
    with pytest.raises(OptionError, match="^--shutdown-timeout .*: must be"):
        MigrationOptions(shutdown_timeout=value)  # type: ignore[arg-type]


def test_library_keeps_good_seconds() -> None:
    options = MigrationOptions(boot_timeout=1, dance_wait=0.5, shutdown_timeout=0)
    assert (options.boot_timeout, options.dance_wait, options.shutdown_timeout) == (1.0, 0.5, 0.0)


@pytest.mark.parametrize(("option", "value"), [("cores", 2.5), ("cores", True), ("memory", math.nan),
                                               ("memory", "512"), ("bwlimit", 0), ("bwlimit", 1.5)])
def test_library_refuses_bad_whole_numbers(option: str, value: object) -> None:
    with pytest.raises(OptionError, match=f"^--{option} .*: must be a whole number"):
        MigrationOptions(**{option: value})


@pytest.mark.parametrize("option", ["dance_wait", "boot_wait", "shutdown_timeout"])
def test_library_dance_refuses_nan_before_touching_the_target(tmp_path: Path, option: str) -> None:
    target = api.local_target(tmp_path / "target")
    with pytest.raises(OptionError, match=f"^--{option.replace('_', '-')} nan: must be"):
        api.dance(100, target=target, **{option: math.nan})


@pytest.mark.parametrize("vmid", ["100", 100.0, True, None])
def test_library_refuses_a_vmid_that_is_not_an_int(vmid: object) -> None:
    with pytest.raises(OptionError, match="is not a whole number"):
        check_vmid(vmid)


VMID_COMMANDS = [["migrate", "x.vmdk", "--vmid", "{}"], ["dance", "{}"], ["status", "{}"], ["vm", "show", "{}"],
                 ["vm", "start", "{}"], ["vm", "stop", "{}"], ["vm", "rm", "{}"]]


@pytest.mark.parametrize("vmid", ["١٠٠", "1_000", "+100", " 100", "１００", "100.0"])
@pytest.mark.parametrize("command", VMID_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_vmids_are_ascii_digits(inproc: V2P, command: list[str], vmid: str) -> None:
    # A VM 100 (and 1000) exists, so that taking the text as a number would find it.
    for number in (100, 1000):
        folder = inproc.target / "qemu-server"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{number}.conf").write_text("name: keep\nmemory: 512\n")
    proc = inproc(*(arg.format(vmid) for arg in command))
    shown = vmid if vmid in ("+100", "100.0") else repr(vmid)
    assert one_error_line(proc) == f"VMID {shown}: {VMID_DIGITS}"
    assert (inproc.target / "qemu-server" / "100.conf").exists()
    assert not (inproc.target / "run" / "100").exists() or not any((inproc.target / "run" / "100").iterdir())


def test_a_leading_zero_vmid_is_still_a_vmid(inproc: V2P) -> None:
    proc = inproc("status", "0100")
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", "v2p: error: no migration recorded for VMID 100\n")


def test_an_empty_target_dir_is_refused(inproc: V2P, tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    proc = inproc("--target-dir", "", "vm", "list", XDG_DATA_HOME=str(xdg), HOME=str(tmp_path))
    assert one_error_line(proc).startswith("--target-dir is empty (hint: give a directory")
    assert not xdg.exists()
    with pytest.raises(OptionError, match="--target-dir is empty"):
        api.local_target("")


def test_an_empty_v2p_target_dir_is_refused(inproc: V2P, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xdg = tmp_path / "xdg"
    proc = inproc.bare("vm", "list", V2P_TARGET_DIR="", XDG_DATA_HOME=str(xdg), HOME=str(tmp_path))
    assert one_error_line(proc).startswith("$V2P_TARGET_DIR is set but empty")
    assert not xdg.exists()
    monkeypatch.setenv("V2P_TARGET_DIR", "")
    with pytest.raises(OptionError, match="V2P_TARGET_DIR is set but empty"):
        api.local_target()


MISUSE = [
    [], ["frob"], ["--bogus", "vm", "list"], ["--accel", "xyz", "vm", "list"],
    ["inspect"], ["inspect", "--bogus", "x.vmdk"],
    ["migrate"], ["migrate", "x.vmdk"], ["migrate", "x.vmdk", "--vmid"], ["migrate", "x.vmdk", "--vmid", "100", "-z"],
    ["migrate", "x.vmdk", "--vmid", "100", "--os", "dos"], ["migrate", "x.vmdk", "--vmid", "100", "--boot-timeout"],
    ["dance"], ["dance", "100", "--bus", "ide"], ["dance", "100", "200"],
    ["status", "--bogus"], ["status", "100", "200"],
    ["storage"], ["storage", "frob"], ["storage", "add"], ["storage", "add", "s"],
    ["storage", "add", "s", "--type", "nfs"], ["storage", "list", "x"],
    ["vm"], ["vm", "frob"], ["vm", "list", "x"], ["vm", "show"], ["vm", "start"], ["vm", "stop"], ["vm", "rm"],
    ["vm", "stop", "100", "--timeout"],
]


@pytest.mark.parametrize("args", MISUSE, ids=lambda a: " ".join(a) or "(nothing)")
def test_misuse_is_one_line_with_a_help_hint(inproc: V2P, args: list[str]) -> None:
    proc = inproc(*args)
    line = one_error_line(proc)
    assert proc.returncode == 2
    assert line.endswith("--help)"), line
    assert_target_untouched(inproc)


def run_into_closed_pipe(v2p: V2P, *args: str) -> subprocess.CompletedProcess[str]:
    """Run v2p with a stdout whose reader has already gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(v2p.argv(*args), stdout=write_end, stderr=subprocess.PIPE, text=True,
                              env=v2p.env(), cwd=ROOT, timeout=60)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["vm", "list"], ["storage", "list"]])
def test_a_closed_pipe_ends_quietly(v2p: V2P, args: list[str]) -> None:
    proc = run_into_closed_pipe(v2p, *args)
    assert proc.stderr == ""
    assert proc.returncode == 141  # as if ended by SIGPIPE, like other Unix tools


def head_1(v2p: V2P, *args: str) -> tuple[int, str, str]:
    """``v2p ARGS | head -1`` through a real shell pipeline: v2p's exit status, stderr, what head printed."""
    script = 'set -o pipefail; "$@" 2>err | head -1; echo "status ${PIPESTATUS[0]}" >&2'
    proc = subprocess.run(["bash", "-c", script, "bash", *v2p.argv(*args)], capture_output=True, text=True,
                          env=v2p.env(), cwd=v2p.target.parent, timeout=300)
    status = int(proc.stderr.split("status ")[-1])
    return status, (v2p.target.parent / "err").read_text(), proc.stdout


def test_head_of_a_long_inspect_json(v2p: V2P, tmp_path: Path) -> None:
    disk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(disk), "1M"], check=True)
    # ~1 KB of JSON a row: far more than a pipe holds, so v2p is still writing when head goes.
    status, err, out = head_1(v2p, "inspect", "--json", *[str(disk)] * 150)
    assert out == "[\n"
    assert err == ""
    assert status == 141


def test_head_of_a_long_vm_list(v2p: V2P) -> None:
    folder = v2p.target / "qemu-server"
    folder.mkdir(parents=True)
    for vmid in range(100, 1600):
        (folder / f"{vmid}.conf").write_text(f"name: {'a' * 50}-{vmid}\nmemory: 512\n")
    status, err, out = head_1(v2p, "vm", "list")
    assert out.split() == ["VMID", "STATUS", "NAME"]
    assert err == ""
    assert status == 141
