"""vSphere VMs in a plan and through the library: two VMs on vcsim and one local disk in one ``plan
run`` (each VM in its own child process, the password handed down through the environment, never an
argv), the same URI through ``from v2p import migrate``."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from test_vsphere_disks import (
    _cmdlines,
    sample_vm,
    si,  # noqa: F401 - a fixture
    uri,
)
from vcsim.fixture import Vcsim, vcsim_fixture  # noqa: F401

from conftest import assert_same_bytes


def test_a_plan_with_two_vsphere_vms_and_a_local_disk(vcsim: Vcsim, si: Any, samples: Path, v2p: Any,  # noqa: F811
                                                      tmp_path: Path) -> None:
    for name in ("plan01", "plan02"):
        sample_vm(si, samples, name)
    local = tmp_path / "src"
    shutil.copytree(samples / "monolithicSparse", local)
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""\
defaults: {{target: {{kind: local, dir: {v2p.target}, accel: tcg}}, boot_check: false}}
vms:
  - {{source: "{uri(vcsim, "plan01")}", vmid: 701, name: web01}}
  - {{source: "{uri(vcsim, "plan02")}", vmid: 702, name: web02}}
  - {{source: {local / "monolithicSparse.vmdk"}, vmid: 703, name: disk}}
""")
    env = {"V2P_VSPHERE_PASSWORD": vcsim.password}
    checked = v2p("plan", "validate", str(plan), **env)
    assert checked.returncode == 0 and checked.stdout.endswith(": 3 VMs, OK\n"), checked.stdout + checked.stderr

    process = v2p.popen("plan", "run", str(plan), "--parallel", "3", **env)
    argv: list[bytes] = []
    while process.poll() is None:
        argv += _cmdlines()
        time.sleep(0.05)
    out, err = process.communicate()
    assert process.returncode == 0, out + err
    assert "3 of 3 VMs migrated" in out, out
    assert argv and not [line for line in argv if vcsim.password.encode() in line]
    assert vcsim.password not in out + err
    for vmid in (701, 702):
        assert_same_bytes(samples / "guest.raw", v2p.disk(vmid))
    assert_same_bytes(samples / "guest.raw", v2p.disk(703))
    for path in v2p.target.rglob("*"):
        if path.is_file():
            assert vcsim.password.encode() not in path.read_bytes(), path

    again = v2p("plan", "run", str(plan), "--json", **env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count('"nothing to do"') == 3


def test_the_library_takes_the_same_uri(vcsim: Vcsim, si: Any, samples: Path, tmp_path: Path,  # noqa: F811
                                        monkeypatch: Any) -> None:
    """``inspect_vm``, ``Migration.plan()`` and ``migrate`` on a ``vsphere://`` URI, the password from the
    environment."""
    from v2p import Migration, migrate
    from v2p.api import inspect_vm

    sample_vm(si, samples, "lib01")
    monkeypatch.setenv("V2P_VSPHERE_PASSWORD", vcsim.password)
    source = uri(vcsim, "lib01")
    report = inspect_vm(source)
    assert report.error is None and report.spec is not None and len(report.spec.disks) == 1, report.error
    target = {"kind": "local", "dir": str(tmp_path / "target"), "accel": "tcg"}
    stages = Migration(source, 711, target=target, boot_check=False).plan()
    assert [name for name, _what, done in stages][:3] == ["inspect", "preflight", "create"]
    assert not any(done for _name, _what, done in stages)
    events: list[Any] = []
    result = migrate(source, 711, target=target, boot_check=False, on_event=events.append)
    assert result["boot"] == "skipped", result
    assert any(e.kind == "progress" and getattr(e, "step", None) == "fetch" for e in events)
    assert_same_bytes(samples / "guest.raw", tmp_path / "target" / "images" / "711" / "vm-711-disk-0.qcow2")
