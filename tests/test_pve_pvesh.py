"""backend=local and the proxmoxer it runs on. v2p runs pvesh through its own runner by giving
proxmoxer's ``CommandBaseSession`` its ``_exec``, whose return shape proxmoxer changed in 2.3
(``(stdout, stderr)`` up to 2.2, ``(stdout, stderr, exit_code)`` from 2.3: proxmoxer
``backends/command_base.py``, ``CommandBaseSession.request``; ``backends/local.py``,
``LocalSession._exec``). So: the pin in pyproject.toml admits only the releases whose shape v2p
handles, the installed proxmoxer keeps that contract (real pvesh-shaped program, real runner), and a
proxmoxer of the old shape (a distro's python3-proxmoxer on the node) is refused in one line."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import textwrap
import tomllib
from importlib.metadata import version
from pathlib import Path

import proxmoxer
import pytest
from packaging.requirements import Requirement

from conftest import V2P, one_line_error
from v2p.errors import TargetError
from v2p.targets.proxmox import ProxmoxTarget, target_from_url
from v2p.targets.pve_transport import PROXMOXER_RANGE

ROOT = Path(__file__).resolve().parent.parent
# The proxmoxer releases whose CommandBaseSession.request unpacks two values from _exec
# (proxmoxer 2.0.0 .. 2.2.0, command_base.py: ``stdout, stderr = self._exec(full_cmd)``).
TWO_VALUE_EXEC = ("2.0.0", "2.0.1", "2.1.0", "2.2.0")

# pvesh as the node runs it for v2p: ``pvesh get|create|set|delete PATH [-k v ...] --output-format
# json``; errors on stderr as ``<status> <reason>`` then ``<param>: <error>``, exit 255.
PVESH = textwrap.dedent("""\
    #!{python}
    import json, sys
    argv = sys.argv[1:]
    with open({log!r}, "a") as log:
        log.write(json.dumps(argv) + "\\n")
    path = argv[1]
    if path == "/version":
        print(json.dumps({{"version": "9.1.1", "release": "9.1", "repoid": "0123abcd"}}))
    elif path == "/nodes":
        print(json.dumps([{{"node": "pve1", "status": "online"}}]))
    elif path == "/cluster/resources":
        print(json.dumps([{{"vmid": 120, "name": "web01", "type": "qemu", "node": "pve1", "status": "stopped"}}]))
    elif path == "/nodes/pve1/qemu/120/config":
        print(json.dumps({{"name": "web01", "memory": "2048", "scsi0": "local-lvm:vm-120-disk-0,size=8G"}}))
    elif path == "/nodes/pve1/qemu/120/status/current":
        print(json.dumps({{"vmid": 120, "name": "web01", "status": "stopped"}}))
    elif path == "/nodes/pve1/qemu" and argv[0] == "get":
        print(json.dumps([{{"vmid": 120, "name": "web01", "status": "stopped"}}]))
    else:
        print("400 Parameter verification failed.", file=sys.stderr)
        print("vmid: invalid format - value does not look like a valid VM ID", file=sys.stderr)
        sys.exit(255)
    """)


def fake_pvesh(folder: Path) -> Path:
    """A real ``pvesh`` program on PATH (in ``folder``) that logs its argv to ``folder/calls``."""
    folder.mkdir(parents=True, exist_ok=True)
    program = folder / "pvesh"
    program.write_text(PVESH.format(python=sys.executable, log=str(folder / "calls")))
    program.chmod(0o755)
    return folder / "calls"


def test_the_pin_admits_only_what_the_code_handles() -> None:
    """pyproject.toml's proxmoxer requirement is the range the code declares it handles, and that
    range leaves out every release whose _exec gives two values."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [Requirement(dep) for dep in deps if Requirement(dep).name == "proxmoxer"]
    for old in TWO_VALUE_EXEC:
        assert old not in pin.specifier, f"pyproject.toml admits proxmoxer {old} ({pin})"
    assert "2.3.0" in pin.specifier
    assert str(pin.specifier) == str(Requirement(f"proxmoxer{PROXMOXER_RANGE}").specifier)
    assert version("proxmoxer") in pin.specifier, f"installed proxmoxer {version('proxmoxer')} is outside {pin}"


def test_the_installed_proxmoxer_keeps_the_exec_contract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Through the installed proxmoxer's own CommandBaseSession.request: pvesh is run by v2p's runner
    (argv logged), its JSON answer is the call's value, and its failure (stderr, exit 255) is one
    TargetError keeping pvesh's status and message."""
    calls = fake_pvesh(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    target = ProxmoxTarget(target_from_url("pve:///pve1?backend=local", env={}))
    with caplog.at_level(logging.DEBUG, logger="v2p.runner"):
        assert target.call("GET", "nodes/pve1/qemu") == [{"vmid": 120, "name": "web01", "status": "stopped"}]
    ran = [list(record.__dict__["argv"]) for record in caplog.records if "argv" in record.__dict__]
    assert [str(tmp_path / "bin" / "pvesh"), "get", "/nodes/pve1/qemu", "--output-format", "json"] in ran, ran
    with pytest.raises(TargetError) as refused:
        target.call("POST", "nodes/pve1/qemu", vmid="x")
    # one line, pvesh's status once, then its message and the parameter's error
    assert str(refused.value) == ("PVE POST nodes/pve1/qemu: 400 Parameter verification failed. "
                                  "vmid: invalid format - value does not look like a valid VM ID")
    assert [json.loads(line) for line in calls.read_text().splitlines()][-1] == \
        ["create", "/nodes/pve1/qemu", "-vmid", "x", "--output-format", "json"]


def old_proxmoxer(site: Path, old: str) -> None:
    """The installed proxmoxer as release ``old`` had it where v2p depends on it: its
    CommandBaseSession.request unpacking two values from _exec (proxmoxer 2.2.0 command_base.py,
    the exact lines), under a dist-info saying ``old``."""
    shutil.copytree(Path(proxmoxer.__file__).parent, site / "proxmoxer")
    base = site / "proxmoxer" / "backends" / "command_base.py"
    text = base.read_text()
    for new, was in (("stdout, stderr, exit_code = self._exec(full_cmd)", "stdout, stderr = self._exec(full_cmd)"),
                     ("Response(stdout, status_code, exit_code)", "Response(stdout, status_code)"),
                     ("Response(stderr, status_code, exit_code)", "Response(stderr, status_code)"),
                     ("def __init__(self, content, status_code, exit_code):",
                      "def __init__(self, content, status_code):"),
                     ("        self.exit_code = exit_code\n        self.content", "        self.content")):
        assert new in text, new
        text = text.replace(new, was)
    base.write_text(text)
    info = site / f"proxmoxer-{old}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: proxmoxer\nVersion: {old}\n")


@pytest.mark.parametrize("old", ["2.2.0", "2.0.0"])
def test_a_proxmoxer_of_the_old_exec_shape_is_refused_in_one_line(tmp_path: Path, v2p: V2P, old: str) -> None:
    """A proxmoxer outside the pin (as a node's python3-proxmoxer may be) is refused before pvesh runs,
    in one line naming the installed release and the one backend=local needs; no traceback."""
    old_proxmoxer(tmp_path / "site", old)
    calls = fake_pvesh(tmp_path / "bin")
    proc = v2p("--target", "pve:///pve1?backend=local", "vm", "list",
               PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", PYTHONPATH=str(tmp_path / "site"),
               XDG_DATA_HOME=str(tmp_path / "xdg"))
    line = one_line_error(proc)
    assert f"proxmoxer {old}" in line and "backend=local" in line and PROXMOXER_RANGE in line, line
    assert not calls.exists()  # refused before any pvesh call
    # the same copy with the release v2p handles runs (the refusal is about the release, nothing else)
    shutil.rmtree(tmp_path / "site")
    shutil.copytree(Path(proxmoxer.__file__).parent, tmp_path / "site" / "proxmoxer")
    proc = v2p("--target", "pve:///pve1?backend=local", "vm", "list",
               PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", PYTHONPATH=str(tmp_path / "site"),
               XDG_DATA_HOME=str(tmp_path / "xdg"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "web01" in proc.stdout


def test_an_import_through_pvesh_is_given_the_import_s_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pvesh runs a call's task to its end before it returns: the call that imports a disk gets the
    wait that grows with the disk (import_timeout), the others the base timeout (a fixed hour before)."""
    from v2p.targets import pve_transport
    from v2p.targets.proxmox import TASK_TIMEOUT, import_timeout

    fake_pvesh(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    given: list[tuple[str, float]] = []
    real_run = pve_transport.run

    def run(cmd: list[str], *, timeout: float, check: bool) -> object:
        given.append((f"{cmd[1]} {cmd[2]}", timeout))
        return real_run(cmd, timeout=timeout, check=check)

    monkeypatch.setattr(pve_transport, "run", run)
    target = ProxmoxTarget(target_from_url("pve:///pve1?backend=local", env={}))
    value = "local:0,import-from=local:import/v2p-120-disk-0.qcow2,format=qcow2,size=2T"
    target.set_config(120, {"scsi1": value})  # the fake pvesh answers with the config: no task to wait for
    assert ("create /nodes/pve1/qemu/120/config", import_timeout(value)) in given, given
    assert import_timeout(value) > 24 * 3600
    assert ("get /cluster/resources", TASK_TIMEOUT) in given, given
    assert target.session.timeout == TASK_TIMEOUT  # restored after the call
