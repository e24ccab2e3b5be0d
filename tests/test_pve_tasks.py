"""PVE tasks as PVE ends them, against the simulator: a task that ends ``WARNINGS: n`` (pve-common
``PVE::UPID::status_is_error``: not an error) succeeded, in the create, the disk import (attach), the
start and the destroy; its ``WARN:`` lines are shown as v2p warnings and nothing is cleaned up on them.
Disks are imported one config call each, waited for with a timeout that grows with the disk; a rerun
after an import that ran out of time leaves one volume, nothing in ``[pending]`` and no ``unusedN``.
The simulator's ``import-from`` rules refuse what qemu-server's ``check_drive_param``,
``check_storage_access`` and ``update_vm_api`` refuse."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pve_sim.fixture import TOKEN_USER, on_pve, pve_fixture, pve_url  # noqa: F401
from test_whole_vm import make_vm

from conftest import V2P, assert_same_bytes, one_line_error
from v2p import api
from v2p.errors import TargetError, TaskStillRunning
from v2p.events import Event
from v2p.targets import proxmox
from v2p.targets.proxmox import ProxmoxTarget, import_timeout, target_from_url

VMID = 150
WARNING = "Machine type 'pc-i440fx-5.1' is deprecated, simulated"




def migrate(v2p: V2P, sim: Any, tmp_path: Path, source: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return on_pve(v2p, sim, tmp_path, "migrate", str(source), "--vmid", str(VMID), "--no-boot-check", *args)


def warned(proc: subprocess.CompletedProcess[str]) -> list[tuple[str, str]]:
    """(stage, message) of each warning the run printed."""
    return re.findall(r"(?m)^\[([\w:]+)\] warning: (.*)$", proc.stdout)


def assert_migrated(sim: Any, samples: Path) -> None:
    config = sim.cluster.vms[VMID].config
    volid = config["scsi0"].split(",")[0]
    assert_same_bytes(samples / "guest.raw", sim.cluster.volume_path(volid))
    assert not [key for key in config if key.startswith("unused")], config
    assert sim.cluster.vms[VMID].pending == {}, sim.cluster.vms[VMID].pending


@pytest.fixture
def source(source_of: Any) -> Path:
    path: Path = source_of("monolithicSparse").descriptor
    return path


@pytest.mark.parametrize(("task", "stage", "what"), [
    ("qmcreate", "create", f"create VM {VMID}"),
    ("qmconfig", "attach", f"import disk scsi0 of VM {VMID}"),  # the disk's import-from, a call of its own
    ("qmstart", "finish", f"start VM {VMID}"),
])
def test_a_task_that_ends_with_warnings_succeeded(task: str, stage: str, what: str, pve: Any, tmp_path: Path,
                                                  samples: Path, source: Path, v2p: V2P) -> None:
    pve.warn_next_task(task, WARNING, "a second warning, simulated")
    done = migrate(v2p, pve, tmp_path, source, "--start")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (stage, f"PVE task {what}: {WARNING}") in warned(done), done.stdout
    assert (stage, f"PVE task {what}: a second warning, simulated") in warned(done), done.stdout
    ended = [t for t in pve.cluster.tasks.by_upid.values() if t.type == task]
    assert [t.exitstatus for t in ended][:1] == ["WARNINGS: 2"]  # the simulator ended it as PVE does
    assert_migrated(pve, samples)
    assert pve.cluster.vms[VMID].status == "running"
    again = migrate(v2p, pve, tmp_path, source, "--start")  # recorded as done, like any finished run
    assert again.returncode == 0 and "already migrated" in again.stdout + again.stderr, again.stdout


def test_a_destroy_that_warns_in_the_cleanup_still_removes_everything(pve: Any, tmp_path: Path, source: Path,
                                                                      v2p: V2P) -> None:
    pve.fail_next_task("qmconfig", "unable to import disk, simulated")
    pve.warn_next_task("qmdestroy", "volume 'local:150/vm-150-disk-9.qcow2' does not exist, simulated")
    failed = migrate(v2p, pve, tmp_path, source)
    line = one_line_error(failed)
    assert "unable to import disk, simulated" in line and f"removed VM {VMID}" in line, line
    assert ("cleanup", f"PVE task destroy VM {VMID}: volume 'local:150/vm-150-disk-9.qcow2' does not exist, "
            "simulated") in warned(failed), failed.stdout
    assert pve.cluster.vms == {} and pve.volumes() == []


def test_vm_rm_whose_destroy_warns_removes_the_vm_and_shows_the_warning(pve: Any, tmp_path: Path, source: Path,
                                                                       v2p: V2P) -> None:
    assert migrate(v2p, pve, tmp_path, source).returncode == 0
    pve.warn_next_task("qmdestroy", WARNING)
    gone = on_pve(v2p, pve, tmp_path, "vm", "rm", str(VMID))
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert f"VM {VMID} removed" in gone.stdout
    assert f"warning: PVE task destroy VM {VMID}: {WARNING}" in gone.stdout, gone.stdout
    assert pve.cluster.vms == {} and pve.volumes() == []


# -- large disks: one import per call, a wait that grows with the disk, a rerun after it ran out ----------


def target(sim: Any, tmp_path: Path) -> ProxmoxTarget:
    return ProxmoxTarget(target_from_url(pve_url(sim), {"V2P_PVE_TOKEN": sim.tokens[TOKEN_USER]}),
                         state_root=tmp_path / "state")


def imports(sim: Any) -> list[list[str]]:
    """The disk keys each of the node's qmconfig tasks wrote, oldest first."""
    found = []
    for task in sorted(sim.cluster.tasks.by_upid.values(), key=lambda task: task.pid):
        for line in task.lines if task.type == "qmconfig" else []:
            if line.startswith("update VM "):
                found.append(re.findall(r"-(\w+) ", line))
    return found


def test_each_disk_is_imported_in_a_call_of_its_own(pve: Any, tmp_path: Path, samples: Path, v2p: V2P) -> None:
    vmx, raws = make_vm(tmp_path / "web01", samples)
    done = on_pve(v2p, pve, tmp_path, "migrate", str(vmx), "--vmid", str(VMID), "--no-boot-check",
                  "--network", "LAN=vmbr0", "--network", "DMZ=vmbr0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert imports(pve) == [["scsi0"], ["scsi1"], ["scsi2"], ["boot"]]
    config = pve.cluster.vms[VMID].config
    for key, name in (("scsi0", "esxi.vmdk"), ("scsi1", "data.vmdk"), ("scsi2", "logs.vmdk")):
        assert_same_bytes(raws[name], pve.cluster.volume_path(config[key].split(",")[0]))
    assert not [key for key in config if key.startswith("unused")] and pve.cluster.vms[VMID].pending == {}


def test_the_wait_for_an_import_grows_with_the_disk() -> None:
    small = import_timeout("local:0,import-from=local:import/a.qcow2,format=qcow2,size=32M")
    large = import_timeout("local:0,import-from=local:import/a.qcow2,format=qcow2,size=2T")
    assert small >= 3600 and large > 24 * 3600 > small
    assert import_timeout("local:0,import-from=local:import/a.qcow2,size=1T") * 2 - small == pytest.approx(
        import_timeout("local:0,import-from=local:import/a.qcow2,size=2T"), rel=1e-3)


def test_an_import_that_outlives_its_wait_keeps_everything_and_the_rerun_makes_one_disk(
        pve: Any, tmp_path: Path, samples: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The sample disk (32 MiB) is waited for 2 s; its import takes 5.
    monkeypatch.setattr(proxmox, "IMPORT_FLOOR", 0.0)
    monkeypatch.setattr(proxmox, "IMPORT_RATE", float(16 << 20))
    pve.slow_next_task("qmconfig", 5.0)
    events: list[Event] = []
    with pytest.raises(TaskStillRunning) as raised:
        api.migrate(source, VMID, target=target(pve, tmp_path), boot_check=False, on_event=events.append)
    assert f"PVE task import disk scsi0 of VM {VMID} still running after 2 s" in raised.value.message
    assert "removed" not in raised.value.message  # nothing cleaned up under the running import
    assert VMID in pve.cluster.vms and f"local:import/v2p-{VMID}-disk-0.qcow2" in pve.volumes()
    assert any(task.type == "qmconfig" for task in pve.cluster.tasks.active())

    monkeypatch.undo()
    events.clear()
    api.migrate(source, VMID, target=target(pve, tmp_path), boot_check=False, on_event=events.append)
    said = [event.message for event in events]
    assert any("left running by an earlier run" in text for text in said), said  # the rerun waited for it
    assert any("the disks were attached by an earlier run" in text for text in said), said  # no second import
    vm = pve.cluster.vms[VMID]
    volid = vm.config["scsi0"].split(",")[0]
    assert pve.volumes() == [volid]  # one volume: no second copy, no upload left
    assert vm.pending == {} and not [key for key in vm.config if key.startswith("unused")], vm.config
    assert imports(pve) == [["scsi0"], ["boot"]]  # the disk was sent once
    assert_same_bytes(samples / "guest.raw", pve.cluster.volume_path(volid))


@pytest.mark.parametrize("logging", [True, False])
def test_a_rerun_waits_for_a_left_import_while_it_logs_progress(
        logging: bool, pve: Any, tmp_path: Path, samples: Path, source: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun cannot know which disk a left-running import copies: it waits as long as the task's log
    grows (qemu-server logs "transferred ... (N%)"), and gives up after TASK_TIMEOUT of silence."""
    monkeypatch.setattr(proxmox, "IMPORT_FLOOR", 0.0)
    monkeypatch.setattr(proxmox, "IMPORT_RATE", float(32 << 20))  # the first run waits 1 s
    monkeypatch.setattr(proxmox, "TASK_TIMEOUT", 2.0)  # the rerun: 2 s without a new log line
    pve.slow_next_task("qmconfig", 7.0, logging=logging)
    with pytest.raises(TaskStillRunning):
        api.migrate(source, VMID, target=target(pve, tmp_path), boot_check=False)
    monkeypatch.setattr(proxmox, "IMPORT_FLOOR", 3600.0)
    if logging:
        api.migrate(source, VMID, target=target(pve, tmp_path), boot_check=False)
        assert_migrated(pve, samples)
        assert imports(pve) == [["scsi0"], ["boot"]]
        return
    with pytest.raises(TaskStillRunning) as raised:  # a silent task: given up on, still nothing removed
        api.migrate(source, VMID, target=target(pve, tmp_path), boot_check=False)
    assert "left running by an earlier run still running after 2 s" in raised.value.message, raised.value.message
    assert VMID in pve.cluster.vms and any(task.type == "qmconfig" for task in pve.cluster.tasks.active())


def test_the_wait_for_an_upload_task_grows_with_the_file(
        pve: Any, tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pveproxy answers an upload with a task that copies the spooled file into the storage: it is
    waited for IMPORT_FLOOR plus the file's size at IMPORT_RATE (a fixed hour before)."""
    monkeypatch.setattr(proxmox, "IMPORT_FLOOR", 0.0)
    monkeypatch.setattr(proxmox, "IMPORT_RATE", float(1 << 40))  # a few KiB of qcow2: well under a second
    pve.slow_next_task("imgcopy", 3.0)
    with pytest.raises(TaskStillRunning) as raised:
        api.migrate(source, VMID, target=target(pve, tmp_path), boot_check=False)
    assert re.search(rf"PVE task upload v2p-{VMID}-disk-0.qcow2 still running after 0 s", raised.value.message), \
        raised.value.message
    monkeypatch.setattr(proxmox, "IMPORT_RATE", 1.0)  # a byte a second: the same upload is waited for
    pve.slow_next_task("imgcopy", 3.0)
    api.migrate(source, VMID + 1, target=target(pve, tmp_path), boot_check=False)
    assert VMID + 1 in pve.cluster.vms


# -- the simulator's qemu-server rules ------------------------------------------------------------------


def sim_vm(sim: Any, tmp_path: Path, samples: Path) -> tuple[ProxmoxTarget, str]:
    """VM 150, stopped, with an upload of the sample disk in local's import content; that upload's volid."""
    pve_target = target(sim, tmp_path)
    pve_target.create_vm(VMID, {"name": "rules", "memory": "512"})
    (sim.cluster.storages["local"].path / "import").mkdir(exist_ok=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(samples / "guest.raw"),
                    str(sim.cluster.storages["local"].path / "import" / "guest.qcow2")], check=True)
    return pve_target, "local:import/guest.qcow2"


@pytest.mark.parametrize(("value", "refusal"), [
    ("local:1,import-from={src}", "'import-from' requires special syntax - use <storage ID>:0,import-from=<source>"),
    ("local:0.5,import-from={src}", "'import-from' requires special syntax"),
    (f"local:{VMID}/vm-{VMID}-disk-7.qcow2,import-from={{src}}", "'import-from' requires special syntax"),
    ("local:0,import-from={src},media=cdrom", "'import-from' requires special syntax"),
    ("local:0,import-from=local:iso/guest.iso", "local:iso/guest.iso has wrong type 'iso' - needs to be 'images' "
                                                "or 'import'"),
    ("local:0,import-from=local:vztmpl/guest.tar.gz", "has wrong type 'vztmpl'"),
])
def test_the_simulator_refuses_the_import_from_qemu_server_refuses(value: str, refusal: str, pve: Any,
                                                                   tmp_path: Path, samples: Path) -> None:
    pve_target, src = sim_vm(pve, tmp_path, samples)
    for folder, name in (("iso", "guest.iso"), ("vztmpl", "guest.tar.gz")):
        (pve.cluster.storages["local"].path / folder).mkdir(exist_ok=True)
        (pve.cluster.storages["local"].path / folder / name).write_bytes(b"\0" * 4096)
    before = [sorted(pve.volumes()), dict(pve.cluster.vms[VMID].config)]
    with pytest.raises(TargetError) as refused:
        pve_target.set_config(VMID, {"scsi1": value.format(src=src)})
    assert "400" in refused.value.message and refusal in refused.value.message, refused.value.message
    assert [sorted(pve.volumes()), dict(pve.cluster.vms[VMID].config)] == before  # refused before any work


def test_the_imported_line_gets_the_real_size(pve: Any, tmp_path: Path, samples: Path) -> None:
    pve_target, src = sim_vm(pve, tmp_path, samples)
    pve_target.set_config(VMID, {"scsi0": f"local:0,import-from={src},format=raw,size=7G,cache=none"})
    value = pve.cluster.vms[VMID].config["scsi0"]
    assert re.fullmatch(rf"local:{VMID}/vm-{VMID}-disk-0\.raw,cache=none,size=32M", value), value


def test_new_disks_are_numbered_per_extension_as_pve_allocates_them(pve: Any, tmp_path: Path,
                                                                    samples: Path) -> None:
    """pve-storage Plugin.pm get_next_vm_diskname: on a dir storage the number is the lowest one no
    volume *of the same format* uses (the ".$fmt" suffix is part of its regex); LVM-like storages count
    every volume of the VM."""
    pve_target, src = sim_vm(pve, tmp_path, samples)
    pve_target.set_config(VMID, {"efidisk0": "local:1,format=raw,efitype=4m"})
    pve_target.set_config(VMID, {"scsi0": f"local:0,import-from={src},format=qcow2"})
    pve_target.set_config(VMID, {"scsi1": f"local:0,import-from={src},format=raw"})
    config = pve.cluster.vms[VMID].config
    names = [config[key].split(",")[0] for key in ("efidisk0", "scsi0", "scsi1")]
    assert names == [f"local:{VMID}/vm-{VMID}-disk-0.raw", f"local:{VMID}/vm-{VMID}-disk-0.qcow2",
                     f"local:{VMID}/vm-{VMID}-disk-1.raw"], names


def test_a_config_call_stops_at_its_first_failing_key_and_leaves_the_keys_before_it_pending(
        pve: Any, tmp_path: Path, samples: Path) -> None:
    pve_target, src = sim_vm(pve, tmp_path, samples)
    broken = pve.cluster.storages["local"].path / "import" / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb" + b"\xff" * 508)  # a qcow2 header qemu-img cannot read
    with pytest.raises(TargetError) as failed:
        # one config call with three keys (v2p itself never sends two imports at once)
        pve_target._task(pve_target.call("POST", f"nodes/{pve.cluster.node}/qemu/{VMID}/config",
                                         scsi0=f"local:0,import-from={src}", scsi1="local:0,import-from="
                                         "local:import/broken.qcow2", scsi2=f"local:0,import-from={src}"),
                         "three imports")
    assert "qemu-img" in failed.value.message, failed.value.message
    vm = pve.cluster.vms[VMID]
    assert list(vm.pending) == ["scsi0"] and "scsi0" not in vm.config, (vm.pending, vm.config)
    assert not [volid for volid in pve.volumes() if "disk-1" in volid or "disk-2" in volid]
    # the next call applies what is pending (qemu-server's vmconfig_apply_pending for a stopped VM)
    pve_target.set_config(VMID, {"boot": "order=scsi0"})
    assert vm.pending == {} and vm.config["scsi0"].startswith(f"local:{VMID}/vm-{VMID}-disk-0")


def test_only_a_volume_the_vm_owns_becomes_unused(pve: Any, tmp_path: Path, samples: Path) -> None:
    pve_target, src = sim_vm(pve, tmp_path, samples)
    other = pve.cluster.content_alloc({"storage": "local", "vmid": "151", "filename": "vm-151-disk-0",
                                       "size": "1024", "format": "qcow2"}, "root@pam")
    pve_target.set_config(VMID, {"scsi1": other})
    pve_target.set_config(VMID, {"scsi1": f"local:0,import-from={src}"})  # replaces VM 151's volume: not ours
    pve_target.set_config(VMID, {"scsi1": f"local:0,import-from={src}"})  # replaces VM 150's own volume
    config = pve.cluster.vms[VMID].config
    unused = {key: value for key, value in config.items() if key.startswith("unused")}
    assert unused == {"unused0": f"local:{VMID}/vm-{VMID}-disk-0.qcow2"}, config
    assert config["scsi1"].startswith(f"local:{VMID}/vm-{VMID}-disk-1.")
