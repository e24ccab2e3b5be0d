"""A dry run is the real run's preflight with nothing made (issue 20, "A dry run worth running").

`migrate --dry-run`, `plan run --dry-run`, `plan validate` and `Migration.preview()`/`plan()` make the
checks the real run makes before it makes anything, refuse with the real run's line and exit code, and
leave the target and its state folder as they were; they show the VM as it would be written and the
stages that run for this VM only.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_proxmox_target import TOKEN, FakePve, cert, fake_pve  # noqa: F401 (fixtures)
from test_vmid_auto import foreign_vm
from test_whole_vm import make_vm

from conftest import V2P, one_line_error, snapshot
from fakes import FakeSource, FakeTarget, raw_disk
from v2p import Migration
from v2p.errors import LockedError, NoSpaceError, TargetError, V2PError, VMIDExistsError
from v2p.options import MAC_PLACEHOLDER
from v2p.state import VmidLock

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


@pytest.fixture(scope="module")
def drivers_iso(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A drivers ISO with virtio-win's layout (drivers_iso/build_test_iso.py)."""
    spec = importlib.util.spec_from_file_location("build_test_iso", ROOT / "drivers_iso" / "build_test_iso.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built: Path = module.build(tmp_path_factory.mktemp("iso") / "virtio-win.iso")
    return built


def tree(folder: Path) -> dict[str, Any]:
    """Every file and folder below ``folder`` (with each file's bytes and mtime), or None: not there."""
    if not folder.exists():
        return {}
    return {**snapshot(folder), **{str(p): "dir" for p in folder.rglob("*") if p.is_dir()}, "": "exists"}


# -- the CLI: refused as the real run is, nothing made ------------------------------------------------

def test_an_unmapped_network_is_refused_by_the_dry_run_as_by_the_run(tmp_path: Path, samples: Path,
                                                                     inproc: V2P) -> None:
    vmx, _raws = make_vm(tmp_path / "web01", samples)
    dry = inproc("migrate", str(vmx), "--vmid", "161", "--dry-run")
    line = one_line_error(dry)
    assert dry.returncode == 11 and "unmapped-network" in line, line
    assert not inproc.target.exists(), sorted(map(str, inproc.target.rglob("*")))
    real = inproc("migrate", str(vmx), "--vmid", "161", "--no-boot-check")
    assert (real.returncode, one_line_error(real)) == (11, line)
    # mapped: the dry run shows the VM as it would be written
    before = tree(inproc.target)  # the real run made the state folder (its lock)
    ok = inproc("migrate", str(vmx), "--vmid", "161", "--network", "LAN=vmbr0", "--network", "DMZ=vmbr1",
                "--memory", "2048", "--dry-run")
    assert ok.returncode == 0, ok.stderr
    assert "web-01: 3 disk(s), 2x2 vCPU, 2048 MiB, bios, ostype l26" in ok.stdout
    assert "    memory: 2048\n" in ok.stdout and "    net0: virtio=00:50:56:AA:BB:CC,bridge=vmbr0\n" in ok.stdout
    assert "    scsi2: local:161/vm-161-disk-2.qcow2,size=8M\n" in ok.stdout and "    boot: order=scsi0\n" in ok.stdout
    for index in range(3):
        assert f"  disk {index}:    scsi0:{index} " in ok.stdout and " free)" in ok.stdout
    assert tree(inproc.target) == before


@pytest.mark.parametrize("case", ["vmid taken", "dd over a sparse disk", "dd with a qcow2 format"])
def test_the_dry_run_refuses_what_the_run_refuses_with_its_line_and_code(case: str, source_of: Any,
                                                                          inproc: V2P) -> None:
    src = source_of("monolithicSparse" if case == "dd over a sparse disk" else "monolithicFlat")
    args = ["migrate", str(src.descriptor), "--vmid", "120", "--no-boot-check"]
    if case == "vmid taken":
        foreign_vm(inproc.target, 120)
    else:
        args += ["--copy-with", "dd"]
    before = tree(inproc.target)
    dry = inproc(*args, "--dry-run")
    line = one_line_error(dry)
    assert tree(inproc.target) == before, "the dry run made something"
    real = inproc(*args)
    assert (real.returncode, one_line_error(real)) == (dry.returncode, line)
    assert dry.returncode == (4 if case == "vmid taken" else 1), line


def test_a_wrong_fingerprint_fails_the_dry_run_as_it_fails_the_run(fake_pve: FakePve,  # noqa: F811
                                                                   source_of: Any, inproc: V2P,
                                                                   tmp_path: Path) -> None:
    """The dry run contacts PVE: a pinned fingerprint the node's certificate does not match stops it."""
    wrong = "%064x" % (int(fake_pve.fingerprint, 16) ^ 1)
    src = source_of("monolithicSparse")
    url = f"pve://root@pam!v2p@127.0.0.1:{fake_pve.port}/pve?fingerprint={wrong}"
    env = {"V2P_PVE_TOKEN": TOKEN, "XDG_DATA_HOME": str(tmp_path / "xdg")}
    dry = inproc.bare("--target", url, "migrate", str(src.descriptor), "--vmid", "150", "--dry-run", **env)
    line = one_line_error(dry)
    assert "pinned fingerprint" in line and dry.returncode == 4, line
    assert fake_pve.requests == [] and not (tmp_path / "xdg").exists()  # no state folder, no request sent
    real = inproc.bare("--target", url, "migrate", str(src.descriptor), "--vmid", "150", **env)
    assert (real.returncode, one_line_error(real)) == (4, line)


# -- the library: the same refusals, nothing made, the config the run writes --------------------------

class BridgedTarget(FakeTarget):
    """The fake target with the bridges of a PVE node (``GET /nodes/{node}/network``)."""

    def bridges(self) -> frozenset[str] | None:
        return frozenset({"vmbr0", "vmbr1"})


REFUSALS: dict[str, tuple[dict[str, Any], type[V2PError], str]] = {
    "no space": ({}, NoSpaceError, "not enough space on dir: local: the disks need"),
    "vmid taken": ({}, VMIDExistsError, "VMID 120 already exists on the fake target"),
    "dd on a target without it": ({"copy_with": "dd"}, TargetError, "--copy-with dd: this target cannot copy"),
    "unknown bridge": ({"networks": {"DMZ": "vmbr9"}}, TargetError,
                       "--network DMZ=vmbr9: no bridge called 'vmbr9' on the fake target (did you mean 'vmbr1'?) "
                       "(known: vmbr0, vmbr1)"),
    "unknown default bridge": ({"bridge": "br-lan"}, TargetError, "--bridge br-lan: no bridge called 'br-lan'"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_preview_raises_what_run_raises_and_makes_nothing(case: str, tmp_path: Path) -> None:
    options, error, words = REFUSALS[case]
    target = BridgedTarget(tmp_path / "target", free={"local": 1000} if case == "no space" else None)
    (tmp_path / "target").mkdir()
    if case == "vmid taken":
        target.configs[120] = {"name": "someone-else"}
    source = FakeSource([raw_disk(tmp_path / "disk.raw", 4 * MiB)])
    before = tree(tmp_path / "target")
    migration = Migration(source, 120, target=target, **options)
    with pytest.raises(error) as previewed:
        migration.preview()
    assert words in previewed.value.message, previewed.value.message
    with pytest.raises(error) as planned:
        migration.plan()
    assert tree(tmp_path / "target") == before and not target.state_dir().exists()
    assert [name for name, _args in target.calls if name != "check"] == [], target.calls
    with pytest.raises(error) as ran:
        migration.run()
    assert (ran.value.message, ran.value.exit_code) == (previewed.value.message, previewed.value.exit_code) \
        == (planned.value.message, planned.value.exit_code)


def test_preview_shows_the_config_the_run_writes_and_the_stages_it_runs(tmp_path: Path) -> None:
    target = BridgedTarget(tmp_path / "target")
    source = FakeSource([raw_disk(tmp_path / "boot.raw", 4 * MiB), raw_disk(tmp_path / "data.raw", 2 * MiB)])
    migration = Migration(source, 130, target=target, networks={"LAN": "vmbr1"}, memory=256, boot_check=False)
    preview = migration.preview()
    assert not target.state_dir().exists() and target.configs == {}
    assert (preview.name, preview.memory_mib, preview.ostype, preview.bridges) == ("fake", 256, "l26", ["vmbr1"])
    assert [stage.name for stage in preview.stages] == [
        "inspect", "preflight", "create", "convert", "verify", "convert:1", "verify:1", "attach", "finish"]
    assert preview.plan() == migration.plan()
    assert [(d.key, d.volid, d.storage) for d in preview.disks] == [
        ("scsi0", "local:130/vm-130-disk-0.qcow2", "dir: local"), ("scsi1", "local:130/vm-130-disk-1.qcow2",
                                                                    "dir: local")]
    assert all(d.required_bytes and d.free_bytes for d in preview.disks)
    assert preview.config["net0"] == "virtio=00:50:56:00:00:01,bridge=vmbr0"  # the source's MAC, kept
    migration.run()
    written = target.configs[130]
    migration_id = json.loads((target.state_dir() / "130.json").read_text())["migration_id"]
    shown = {key: value.replace("<id>", migration_id) for key, value in preview.config.items()}
    assert shown == written
    # done: the preview says so, and nothing else
    again = Migration(source, 130, target=target, networks={"LAN": "vmbr1"}, memory=256, boot_check=False).preview()
    assert again.nothing_to_do and "nothing to do" in again.text()


def test_a_resumed_migration_previews_its_done_stages_as_skipped(tmp_path: Path) -> None:
    target = FakeTarget(tmp_path / "target")
    source = FakeSource([raw_disk(tmp_path / "boot.raw", 4 * MiB)])
    target.fail["verify"] = TargetError("simulated: the compare failed")
    with pytest.raises(TargetError):
        Migration(source, 140, target=target, keep_on_failure=True, boot_check=False).run()
    recorded = json.loads((target.state_dir() / "140.json").read_text())
    calls = len(target.calls)
    preview = Migration(source, 140, target=target, keep_on_failure=True, boot_check=False).preview()
    assert [(stage.name, stage.done) for stage in preview.stages] == [
        ("inspect", True), ("preflight", True), ("create", True), ("convert", True), ("verify", False),
        ("attach", False), ("finish", False)]
    assert "    create     done, would skip" in preview.text()
    assert preview.config["net0"] == recorded["stages"]["create"]["result"]["config"]["net0"]  # its own MAC
    assert json.loads((target.state_dir() / "140.json").read_text()) == recorded
    assert [name for name, _args in target.calls[calls:]] == []


# -- the stages that run for this VM ----------------------------------------------------------------------

def test_a_linux_vm_has_no_drivers_stage_and_no_boot_stage_without_a_boot_check(source_of: Any,
                                                                                  inproc: V2P) -> None:
    src = source_of("monolithicSparse")
    proc = inproc("migrate", str(src.descriptor), "--vmid", "120", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    stages = [stage["name"] for stage in json.loads(proc.stdout)["stages"]]
    assert stages == ["inspect", "preflight", "create", "convert", "verify", "attach", "boot", "finish"]
    proc = inproc("migrate", str(src.descriptor), "--vmid", "120", "--dry-run", "--no-boot-check")
    assert proc.returncode == 0, proc.stderr
    assert "    drivers " not in proc.stdout and "    boot " not in proc.stdout and "    finish " in proc.stdout
    assert not inproc.target.exists()


def test_a_windows_vm_onto_virtio_has_the_drivers_stage_and_its_iso_checked(source_of: Any, inproc: V2P,
                                                                            drivers_iso: Path,
                                                                            tmp_path: Path) -> None:
    src = source_of("esxi")
    args = ["migrate", str(src.descriptor), "--vmid", "105", "--os", "win7", "--bus", "virtio", "--dry-run"]
    proc = inproc(*args, "--drivers-iso", str(drivers_iso))
    assert proc.returncode == 0, proc.stderr
    assert "    drivers    Windows onto virtio" in proc.stdout and "    boot " in proc.stdout
    assert f"  drivers:   {drivers_iso.resolve()} (" in proc.stdout and "viostor" in proc.stdout
    assert "    ide0: local:105/vm-105-disk-0.qcow2" in proc.stdout  # IDE for its first boot
    assert f"    net0: e1000={MAC_PLACEHOLDER},bridge=vmbr0\n" in proc.stdout  # generated by the run
    # an ISO without the drivers is refused as the real run refuses it (exit 8), before anything is made
    shutil.copy(ROOT / "README.md", tmp_path / "not.iso")
    bad = inproc(*args, "--drivers-iso", str(tmp_path / "not.iso"))
    assert bad.returncode == 8 and "not a readable ISO image" in one_line_error(bad)
    assert not inproc.target.exists()
    # on IDE, no dance: no drivers stage
    ide = inproc(*args[:-3], "--dry-run")
    assert ide.returncode == 0 and "    drivers " not in ide.stdout, ide.stdout


# -- plans ---------------------------------------------------------------------------------------------

def test_plan_run_dry_run_shows_the_plans_memory_and_the_config(tmp_path: Path, source_of: Any,
                                                                inproc: V2P) -> None:
    src = source_of("monolithicSparse")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"defaults: {{target: {{dir: {inproc.target}}}, boot_check: false}}\n"
                    f"vms:\n  - {{source: {src.descriptor}, vmid: 171, name: web01, memory: 2048, cores: 2}}\n")
    proc = inproc("plan", "run", "--dry-run", str(plan))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[web01]\n  would migrate " in proc.stdout
    assert "  vm:        web01: 1 disk(s), 1x2 vCPU, 2048 MiB, bios, ostype l26" in proc.stdout, proc.stdout
    assert "      memory: 2048\n" in proc.stdout and "      drivers " not in proc.stdout
    assert not inproc.target.exists()


def test_plan_validate_runs_the_runs_preflight(tmp_path: Path, source_of: Any, inproc: V2P) -> None:
    """What only the run's own preflight knew (dd over a sparse disk) is a problem of validate too."""
    src = source_of("monolithicSparse")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"defaults: {{target: {{dir: {inproc.target}}}}}\n"
                    f"vms:\n  - {{source: {src.descriptor}, vmid: 172, copy_with: dd}}\n")
    proc = inproc("plan", "validate", str(plan))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    said = rf"^{re.escape(str(plan))}:3:\d+: copy_with dd: disk 0 is monolithicSparse, dd copies raw data only "
    assert re.search(said + r"\(hint: leave copy_with out", proc.stderr, re.M), proc.stderr
    assert not inproc.target.exists()


def test_plan_run_dry_run_fails_when_the_run_would_refuse_a_vm(tmp_path: Path, source_of: Any,
                                                                inproc: V2P) -> None:
    """A refusal only the run's preflight knows (plan run checks the plan's keys, not every disk):
    the dry run says it in the run's words, and fails as the run would (exit 1)."""
    good, sparse = source_of("monolithicFlat"), source_of("monolithicSparse")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"defaults: {{target: {{dir: {inproc.target}}}, boot_check: false, copy_with: dd, "
                    "format: raw}\n"
                    f"vms:\n  - {{source: {good.descriptor}, vmid: 173, name: flat}}\n"
                    f"  - {{source: {sparse.descriptor}, vmid: 174, name: sparse}}\n")
    proc = inproc("plan", "run", "--dry-run", "--json", str(plan))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    flat, refused = report["vms"]
    assert (flat["result"], refused["result"]) == ("dry run", "failed"), flat["error"]
    assert refused["error"].startswith("--copy-with dd: disk 0 is monolithicSparse"), refused["error"]
    assert [stage["stage"] for stage in flat["stages"]][-2:] == ["attach", "finish"]
    assert not inproc.target.exists()


def test_a_vmid_another_run_holds_is_refused_by_the_preview_as_by_the_run(tmp_path: Path) -> None:
    target = FakeTarget(tmp_path / "target")
    target.state_dir().mkdir(parents=True)
    source = FakeSource([raw_disk(tmp_path / "disk.raw", 2 * MiB)])
    migration = Migration(source, 120, target=target)
    with VmidLock(target.state_dir(), 120):  # another run, migrating VMID 120 now
        with pytest.raises(LockedError) as previewed:
            migration.preview()
        with pytest.raises(LockedError) as ran:
            migration.run()
    assert previewed.value.message == ran.value.message and "locked by another v2p run" in ran.value.message
    assert migration.preview().stages  # let go: the preview's own look took no lock
    assert sorted(p.name for p in target.state_dir().iterdir()) == ["120.lock"]
