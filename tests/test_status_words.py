"""What ``v2p status`` and ``v2p plan status`` say about a migration that stopped: the command that
resumes it (``v2p migrate SOURCE --vmid N`` with its target and the options the record holds), and
where it stopped with how far the disk's copy got (the record's checkpoint, ``data["progress"]``),
not the last stage recorded before it."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import InProcessV2P, failing_after
from fakes import FakeTarget
from v2p import cli
from v2p.options import MigrationOptions

VMID = 150


def interrupted_in_convert(inproc: InProcessV2P, source: Path, progress: dict[str, Any] | None,
                           *options: str) -> None:
    """A migration recorded up to its create stage, then as a run interrupted in the first disk's copy
    leaves it; the copy's checkpoint (``data["progress"]``, the windowed copy's) written by hand."""
    with failing_after("create"):
        failed = inproc("migrate", str(source), "--vmid", str(VMID), "--no-boot-check", "--keep-on-failure",
                        *options)
    assert failed.returncode != 0
    path = inproc.target / "migrations" / f"{VMID}.json"
    data = json.loads(path.read_text())
    assert list(data["stages"])[-1] == "create"
    data["failed"] = {"stage": "convert", "error": "interrupted"}
    data.pop("progress", None)
    if progress is not None:
        data["progress"] = progress
    path.write_text(json.dumps(data))


@pytest.fixture
def source(tmp_path: Path, samples: Path) -> Path:
    path = tmp_path / "disks" / "web01.vmdk"
    path.parent.mkdir()
    shutil.copyfile(samples / "monolithicSparse" / "monolithicSparse.vmdk", path)
    return path


CHECKPOINT = {"stage": "convert", "disk": 0, "done": 57 << 20, "total": 100 << 20}


def test_status_names_the_command_that_resumes(inproc: InProcessV2P, source: Path) -> None:
    interrupted_in_convert(inproc, source, CHECKPOINT, "--memory", "2048", "--bus", "sata", "--no-net-drivers")
    done = inproc("status", str(VMID))
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert "rerun migrate" not in first
    assert f"VMID {VMID}: {source} — stopped in convert (57 %): interrupted (to resume: " in first
    command = first.split("(to resume: ", 1)[1].rstrip(")")
    assert shlex.split(command) == ["v2p", "--target-dir", str(inproc.target), "migrate", str(source),
                                    "--vmid", str(VMID), "--bus", "sata", "--memory", "2048",
                                    "--no-net-drivers"]


def test_without_a_checkpoint_no_percent(inproc: InProcessV2P, source: Path) -> None:
    interrupted_in_convert(inproc, source, None)
    first = inproc("status", str(VMID)).stdout.splitlines()[0]
    assert "stopped in convert: interrupted (to resume: v2p --target-dir" in first and "%" not in first


def test_the_resume_command_names_a_pve_target_as_given() -> None:
    target = FakeTarget(Path("/nonexistent"))
    target.kind = "proxmox"
    url = "pve://root@pam!v2p@pve.example:8006/pve1?storage=local-lvm"
    args = argparse.Namespace(target=url, target_dir=None)
    options = MigrationOptions(storage=target.default_storage(), bus="sata", net_drivers=False,
                               ignore_rules=("uefi-secure-boot",)).identity()
    said = cli._resume_command(args, target, {"source": "/srv/web 01.vmx", "options": options}, 161)
    assert shlex.split(said) == ["v2p", "--target", url, "migrate", "/srv/web 01.vmx", "--vmid", "161",
                                 "--bus", "sata", "--ignore-rule", "uefi-secure-boot", "--no-net-drivers"]


PLAN = """\
defaults:
  boot_check: false
vms:
  - source: disks/web01.vmdk
    vmid: 150
    name: web01
"""


def test_plan_status_says_where_it_was_interrupted_and_how_far(inproc: InProcessV2P, source: Path) -> None:
    plan = source.parent.parent / "plan.yaml"
    plan.write_text(PLAN)
    interrupted_in_convert(inproc, source, CHECKPOINT)
    done = inproc("plan", "status", str(plan))
    assert done.returncode == 0, done.stderr
    row = done.stdout.splitlines()[1]
    assert row.split() [:4] == ["web01", "150", "interrupted", "in"], row
    assert row.endswith("interrupted  in convert (57 %); rerun the plan to resume"), row
    assert "[create]" not in row
    found = json.loads(inproc("plan", "status", str(plan), "--json").stdout)
    assert found[0]["percent"] == 57.0 and found[0]["detail"] == "in convert (57 %); rerun the plan to resume"


def test_a_checkpoint_of_a_finished_stage_or_that_does_not_add_up_is_not_shown(inproc: InProcessV2P,
                                                                             source: Path) -> None:
    plan = source.parent.parent / "plan.yaml"
    plan.write_text(PLAN)
    interrupted_in_convert(inproc, source, None)
    path = inproc.target / "migrations" / f"{VMID}.json"
    for progress in ({**CHECKPOINT, "stage": "create"}, {**CHECKPOINT, "done": -1}, {**CHECKPOINT, "total": 0},
                     {**CHECKPOINT, "done": "57"}):
        path.write_text(json.dumps({**json.loads(path.read_text()), "progress": progress}))
        found = json.loads(inproc("plan", "status", str(plan), "--json").stdout)
        assert found[0]["percent"] is None and found[0]["detail"] == "in convert; rerun the plan to resume"
