"""CLI misuse: every error is one line on stderr naming the flag the user typed, with the user's value
escaped; a closed stdout is not a crash; `storage add` writes nothing storage.cfg would read otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from v2p import cli
from v2p.errors import V2PError

pytestmark = pytest.mark.usefixtures("restore_signal_handlers")  # cli.main runs in this process


@pytest.fixture
def disk(small_vmdk: Path) -> Path:
    return small_vmdk


def error_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run ``v2p argv`` in this process: it fails with exactly one printable stderr line, nothing on stdout."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse's own refusals leave through _Parser.error
        code = exc.code
    out, err = capsys.readouterr()
    assert code != 0, out + err
    assert out == "", out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("v2p: error: "), err
    assert lines[0].isprintable(), lines[0]
    return lines[0]


@pytest.mark.parametrize("url", ["pve://[::1", "pve://[::1/pve1", "pve://root@pam!v2p@[fe80::1/pve1",
                                 "pve://[zz]x/pve1"])
def test_a_target_url_urllib_refuses(tmp_path, capsys, url) -> None:
    for command in (["status"], ["vm", "list"]):
        line = error_line(capsys, "--target", url, "--target-dir", str(tmp_path / "t"), *command)
        assert line.startswith(f"v2p: error: --target {url!r}: not a URL"), line


@pytest.mark.parametrize(("flag", "value", "named"), [
    ("--bridge", "vmbr0\nvmbr1", "--bridge"),
    ("--bridge", "vmbr0\x1b[2J", "--bridge"),
    ("--bridge", "vmbr0\u202e", "--bridge"),
    ("--network", "LAN=vmbr0\nx", "--network"),
    ("--network", "LAN\r=vmbr0x\n", "--network"),
    ("--storage", "lo\ncal", "--storage"),
    ("--drivers-iso", "/x\n.iso", "--drivers-iso"),
])
def test_an_echoed_value_is_escaped_and_the_flag_is_the_one_typed(tmp_path, capsys, disk, flag, value,
                                                                    named) -> None:
    line = error_line(capsys, "--target-dir", str(tmp_path / "t"), "migrate", str(disk), "--vmid", "101",
                      f"{flag}={value}")
    assert f" {named}" in line, line
    other = {"--bridge": "--network", "--network": "--bridge"}.get(named)
    assert other is None or other not in line, line
    assert not (tmp_path / "t").exists()


def test_unrecognized_arguments_are_echoed_on_one_line(tmp_path, capsys) -> None:
    line = error_line(capsys, "--target-dir", str(tmp_path / "t"), "vm", "list", "x\ny\x1b[31m")
    assert "x\\ny\\x1b[31m" in line, line


def test_status_of_an_unknown_vmid_errs_on_stderr(tmp_path, capsys) -> None:
    line = error_line(capsys, "--target-dir", str(tmp_path / "t"), "status", "150")
    assert line == "v2p: error: no migration recorded for VMID 150"


def closed_stdout(*args: str) -> subprocess.CompletedProcess[str]:
    """v2p with its stdout closed (``v2p ... >&-``): what Python gives no sys.stdout for."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "v2p", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=env, timeout=120, preexec_fn=lambda: os.close(1))


@pytest.mark.usefixtures("v2p_process")  # a process started with stdout closed is the subject
def test_migrate_with_stdout_closed_finishes_cleanly(tmp_path, disk) -> None:
    target = tmp_path / "t"
    proc = closed_stdout("--target-dir", str(target), "migrate", str(disk), "--vmid", "101", "--no-boot-check")
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    state = json.loads((target / "migrations" / "101.json").read_text())
    assert state["finished"] and "verify" in state["stages"]
    for listing in (["status"], ["vm", "list"], ["status", "101"]):
        proc = closed_stdout("--target-dir", str(target), *listing)
        assert (proc.returncode, proc.stderr) == (0, ""), (listing, proc.stderr)
    proc = closed_stdout("--target-dir", str(target), "vm", "rm", "101")
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert not (target / "migrations" / "101.json").exists()


@pytest.mark.parametrize(("argv", "named"), [
    (["xx", "--type", "dir", "--path", "/x\n\tpath /etc"], "--path"),
    (["xx", "--type", "dir", "--path", "/x", "--lvm-config", "a\n\tpath /etc"], "--lvm-config"),
    (["xx", "--type", "lvm", "--vgname", "vg", "--lvm-config", "devices { }\n\tpath /etc"], "--lvm-config"),
    (["xx", "--type", "dir", "--path", "relative/folder"], "--path"),
    (["xx", "--type", "dir", "--path", " /x"], "--path"),
    (["a b", "--type", "dir", "--path", "/x"], "storage name 'a b'"),
    (["x", "--type", "dir", "--path", "/x"], "storage name 'x'"),
    (["bad\nname", "--type", "dir", "--path", "/x"], "storage name 'bad\\nname'"),
    (["1st", "--type", "dir", "--path", "/x"], "storage name '1st'"),
    (["x:y", "--type", "dir", "--path", "/x"], "storage name 'x:y'"),
    (["vm", "--type", "lvm", "--vgname=-vg"], "--vgname '-vg'"),
    (["vm", "--type", "lvmthin", "--vgname", "vg", "--thinpool", "a b"], "--thinpool 'a b'"),
])
def test_storage_add_refuses_what_storage_cfg_would_read_otherwise(tmp_path, capsys, argv, named) -> None:
    target = tmp_path / "t"
    target.mkdir()
    before = "dir: keep\n\tpath /srv/keep\n"
    (target / "storage.cfg").write_text(before)
    line = error_line(capsys, "--target-dir", str(target), "storage", "add", *argv)
    assert named in line, line
    assert (target / "storage.cfg").read_text() == before
    # A good one still goes in, and reads back as written.
    assert cli.main(["--target-dir", str(target), "storage", "add", "bulk-2.a", "--type", "dir", "--path",
                     str(tmp_path / "bulk")]) == 0
    capsys.readouterr()
    assert cli.main(["--target-dir", str(target), "storage", "list"]) == 0
    listed = capsys.readouterr().out
    assert f"bulk-2.a     dir      path={tmp_path / 'bulk'}" in listed and "/etc" not in listed


def test_a_key_set_twice_in_storage_cfg_is_refused(tmp_path, capsys) -> None:
    target = tmp_path / "t"
    target.mkdir()
    (target / "storage.cfg").write_text("dir: bulk\n\tpath /srv/bulk\n\tpath /etc\n")
    line = error_line(capsys, "--target-dir", str(target), "storage", "list")
    assert line == f"v2p: error: {target / 'storage.cfg'}: line 3: storage bulk sets path twice"


def test_a_device_on_a_pve_target_is_refused_by_the_flag_the_cli_has(monkeypatch) -> None:
    from v2p import api

    target = api.make_target("pve://root@pam!v2p@127.0.0.1:9/pve1",  # never contacted
                             secret="00000000-0000-0000-0000-000000000000")
    with pytest.raises(V2PError) as caught:
        target.device_storage("/dev/sdb")
    assert str(caught.value).startswith("--to-device /dev/sdb: ") and "--device" not in str(caught.value)
    assert "--to-device" in {flag for action in cli.build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
                             .choices["migrate"]._actions for flag in action.option_strings}
