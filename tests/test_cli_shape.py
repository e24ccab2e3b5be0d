"""The ``v2p`` command as admins expect of a command-line tool: ``--version``, the global options
before or after the command, ``vm list`` with a header, and ``--json`` on the listings and shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import v2p
from conftest import V2P


def test_version(inproc: V2P) -> None:
    proc = inproc.bare("--version")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"v2p {v2p.__version__}\n", "")


def a_vm(folder: Path, vmid: int, name: str) -> None:
    (folder / "qemu-server").mkdir(parents=True, exist_ok=True)
    (folder / "qemu-server" / f"{vmid}.conf").write_text(f"name: {name}\nmemory: 512\n")


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_options_before_or_after_the_command(inproc: V2P, tmp_path: Path, where: str) -> None:
    a_vm(tmp_path / "there", 101, "web01")
    options = ["--target-dir", str(tmp_path / "there"), "--accel", "tcg", "-v"]
    args = [*options, "vm", "list"] if where == "before" else ["vm", "list", *options]
    proc = inproc.bare(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].split() == ["101", "stopped", "web01"]


def test_global_options_after_an_action_with_its_own_arguments(inproc: V2P, tmp_path: Path) -> None:
    """Once "VMID '/tmp/x': a VMID is written in the digits 0-9 only"."""
    proc = inproc.bare("status", "--target-dir", str(tmp_path / "x"))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "no migration recorded for any VM\n", "")
    a_vm(tmp_path / "x", 102, "db01")
    proc = inproc.bare("vm", "show", "102", "--target-dir", str(tmp_path / "x"), "--json")
    assert json.loads(proc.stdout)["name"] == "db01", proc.stderr


def test_an_option_given_before_and_after_the_command_is_the_later_one(inproc: V2P, tmp_path: Path) -> None:
    a_vm(tmp_path / "first", 103, "first")
    a_vm(tmp_path / "second", 104, "second")
    proc = inproc.bare("--target-dir", str(tmp_path / "first"), "vm", "list", "--target-dir", str(tmp_path / "second"))
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["VMID", "104"], proc.stderr
    # left out after the command, the one before it holds (not a default of the command's own parser)
    proc = inproc.bare("--target-dir", str(tmp_path / "first"), "vm", "list")
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["VMID", "103"], proc.stderr


def test_a_bad_global_option_after_the_command_is_refused_as_before(inproc: V2P) -> None:
    proc = inproc.bare("vm", "list", "--accel", "xyz")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--accel: invalid choice: 'xyz'" in proc.stderr and proc.stderr.endswith("--help)\n"), proc.stderr


def test_vm_list_has_a_header_and_json(inproc: V2P) -> None:
    assert inproc("vm", "list").stdout == "no VMs\n"
    assert json.loads(inproc("vm", "list", "--json").stdout) == []
    a_vm(inproc.target, 110, "web01")
    a_vm(inproc.target, 111, "web02")
    assert inproc("vm", "list").stdout.splitlines() == ["  VMID  STATUS   NAME", "   110  stopped  web01",
                                                        "   111  stopped  web02"]
    assert json.loads(inproc("vm", "list", "--json").stdout) == [
        {"vmid": 110, "status": "stopped", "name": "web01"}, {"vmid": 111, "status": "stopped", "name": "web02"}]


def test_vm_show_json(inproc: V2P) -> None:
    a_vm(inproc.target, 112, "web03")
    assert inproc("vm", "show", "112").stdout == "memory: 512\nname: web03\n"
    assert json.loads(inproc("vm", "show", "112", "--json").stdout) == {"memory": "512", "name": "web03"}


def test_storage_list_json(inproc: V2P) -> None:
    proc = inproc("storage", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    (local,) = json.loads(proc.stdout)
    assert local["name"] == "local" and local["type"] == "dir" and local["error"] is None
    assert local["options"]["path"] == str(inproc.target) and local["free_bytes"] > 0


def test_migrate_json_is_one_object_on_stdout(source_of, inproc: V2P) -> None:
    src = source_of("monolithicSparse")
    dry = inproc("migrate", str(src.descriptor), "--vmid", "120", "--no-boot-check", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert (plan["vmid"], plan["target"], plan["where"]) == (120, "local", "storage local")
    assert [stage["done"] for stage in plan["stages"]] == [False] * len(plan["stages"]) and plan["disks"]
    proc = inproc("migrate", str(src.descriptor), "--vmid", "120", "--no-boot-check", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # the progress lines and the last words went to stderr
    assert (result["boot"], result["finished"], result["request"]["source"]) == ("skipped", True,
                                                                                str(src.descriptor))
    assert "[convert]" in proc.stderr and f"VM 120 migrated from {src.descriptor}" in proc.stderr
    status = json.loads(inproc("status", "120", "--json").stdout)
    assert status == [result]
    # rerun: nothing to do, still one object
    again = inproc("migrate", str(src.descriptor), "--vmid", "120", "--no-boot-check", "--json")
    assert json.loads(again.stdout)["nothing_to_do"], again.stderr
