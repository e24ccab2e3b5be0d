"""The IDE -> virtio driver dance, for real: the Windows stand-in guest under
QEMU TCG, the drivers ISO built with the real virtio-win layout."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from test_boot import qemu_pids, wait_until

from conftest import SAMPLES, V2P, one_line_error
from test_resume import wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def drivers_iso(tmp_path_factory) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_test_iso", ROOT / "drivers_iso" / "build_test_iso.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = tmp_path_factory.mktemp("iso")
    module.build(folder / "no-w7.iso", omit=("w7", "2k8R2"))
    return module.build(folder / "virtio-win.iso")


def standin(manifest, tmp_path: Path, name: str = "winguest") -> Path:
    entry = manifest["standins"][name]
    folder = tmp_path / "src" / name
    shutil.copytree(SAMPLES / entry["dir"], folder)
    return folder / Path(entry["descriptor"]).name


def dance_args(disk: Path, iso: Path, vmid: int = 300, *extra: str) -> list[str]:
    return ["migrate", str(disk), "--vmid", str(vmid), "--os", "win7", "--bus", "virtio",
            "--drivers-iso", str(iso), *extra]


def assert_danced(v2p: V2P, vmid: int = 300) -> None:
    config = v2p.config(vmid)
    assert config["virtio0"].startswith(f"local:{vmid}/vm-{vmid}-disk-0.qcow2")
    assert config["boot"] == "order=virtio0"
    assert config["net0"].startswith("virtio=")
    for gone in ("ide0", "ide2", "virtio1", "net1"):
        assert gone not in config, f"{gone} left in the config"
    assert sorted(p.name for p in (v2p.target / "images" / str(vmid)).iterdir()) == [f"vm-{vmid}-disk-0.qcow2"]
    serial = v2p.serial(vmid)
    assert "v2p-guest: windows up on virtio-blk (viostor)" in serial
    assert "v2p-guest: netkvm active" in serial
    assert "STOP 0x" not in serial


def test_standin_is_honest_straight_onto_virtio_it_stops_0x7b(manifest, tmp_path, v2p):
    disk = standin(manifest, tmp_path)
    line = one_line_error(v2p("migrate", str(disk), "--vmid", "301", "--os", "other", "--bus", "virtio",
                              "--boot-timeout", "30"))
    assert "VM 301 stopped with STOP 0x0000007B INACCESSIBLE_BOOT_DEVICE" in line
    assert "--os" in line


def test_full_dance(manifest, tmp_path, v2p, drivers_iso):
    disk = standin(manifest, tmp_path)
    proc = v2p(*dance_args(disk, drivers_iso))
    assert proc.returncode == 0, proc.stderr
    assert_danced(v2p)
    dance = v2p.state(300)["stages"]["drivers"]["result"]
    assert dance["system_disk"] == "virtio0" and dance["boot2"]["confirmed_by"] == "guest"
    assert "[boot] done" in proc.stdout
    assert v2p.state(300)["stages"]["boot"]["result"]["skipped"].startswith("the driver dance")


def test_dance_onto_virtio_scsi(manifest, tmp_path, v2p, drivers_iso):
    disk = standin(manifest, tmp_path)
    proc = v2p("migrate", str(disk), "--vmid", "309", "--os", "win10", "--bus", "scsi",
               "--drivers-iso", str(drivers_iso))
    assert proc.returncode == 0, proc.stderr
    assert "temporary scsi1" in proc.stdout
    config = v2p.config(309)
    assert config["scsi0"].startswith("local:309/vm-309-disk-0.qcow2") and config["boot"] == "order=scsi0"
    assert config["scsihw"] == "virtio-scsi-pci" and "scsi1" not in config and "ide0" not in config
    assert "v2p-guest: windows up on virtio-scsi (viostor)" in v2p.serial(309)


def test_ide_bus_skips_the_dance(manifest, tmp_path, v2p, drivers_iso):
    disk = standin(manifest, tmp_path)
    proc = v2p("migrate", str(disk), "--vmid", "302", "--os", "win7", "--bus", "ide", "--boot-timeout", "3")
    assert proc.returncode == 0, proc.stderr
    assert v2p.state(302)["stages"]["drivers"]["result"] == {"skipped": True}
    assert "ide0" in v2p.config(302) and "virtio0" not in v2p.config(302)


HOLDS = ["drivers", "dance:layout1", "dance:boot1-started", "dance:boot1", "dance:shutdown1",
         "dance:layout2", "dance:boot2-started", "dance:boot2"]


@pytest.mark.parametrize("point", HOLDS)
def test_sigkill_anywhere_in_the_dance_resumes(point, manifest, tmp_path, v2p, drivers_iso):
    disk = standin(manifest, tmp_path)
    args = dance_args(disk, drivers_iso)
    proc = v2p.popen(*args, V2P_TEST_HOLD_AFTER=point)
    wait_for(proc.stderr, f"holding after {point}", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The dance's boots die with v2p: nothing runs on until the rerun.
    wait_until(lambda: not qemu_pids(tmp_path), 10, f"a dance boot outlived v2p killed at {point}")
    assert "300  stopped" in v2p("vm", "list").stdout
    again = v2p(*args)
    assert again.returncode == 0, again.stderr
    assert "[convert] already done" in again.stdout  # the guest's writes do not undo the conversion
    assert_danced(v2p)


def test_driver_never_arrives_operator_then_rollback(manifest, tmp_path, v2p, drivers_iso):
    disk = standin(manifest, tmp_path, "winguest-nodriver")
    line = one_line_error(v2p(*dance_args(disk, drivers_iso, 303, "--dance-wait", "3")))
    assert "no sign from the guest that it has the virtio drivers after 3s" in line
    assert "v2p dance 303 --continue" in line
    assert v2p.config(303)["virtio1"].startswith("local:303/vm-303-disk-1.qcow2")  # still on boot 1
    assert "303  running" in v2p("vm", "list").stdout  # left up for the operator, after v2p exited
    # the operator (wrongly) says the driver is there
    confirm = v2p("dance", "303", "--continue", "--drivers-iso", str(drivers_iso), "--boot-wait", "20")
    assert confirm.returncode != 0
    assert "Traceback" not in confirm.stderr
    assert "VM 303 did not boot on virtio (STOP 0x0000007B INACCESSIBLE_BOOT_DEVICE)" in confirm.stderr
    assert "rolled back to ide0, it boots there again" in confirm.stderr
    config = v2p.config(303)
    assert config["ide0"].startswith("local:303/vm-303-disk-0.qcow2") and config["boot"] == "order=ide0"
    assert "virtio0" not in config and "virtio1" not in config
    assert "v2p-guest: windows up on ide" in v2p.serial(303)  # the rollback boot
    assert not (v2p.target / "images" / "303" / "vm-303-disk-1.qcow2").exists()
    assert "303  stopped" in v2p("vm", "list").stdout


def test_dance_command_on_a_vm_already_migrated(manifest, tmp_path, v2p, drivers_iso):
    disk = standin(manifest, tmp_path)
    assert v2p("migrate", str(disk), "--vmid", "304", "--os", "win10", "--no-boot-check").returncode == 0
    proc = v2p("dance", "304", "--drivers-iso", str(drivers_iso))
    assert proc.returncode == 0, proc.stderr
    assert "VM 304 now boots from virtio0" in proc.stdout
    assert_danced(v2p, 304)
    again = v2p("dance", "304", "--drivers-iso", str(drivers_iso))
    assert again.returncode == 0 and "already danced onto virtio0" in again.stdout


def nothing_created(v2p: V2P) -> bool:
    return not (v2p.target / "qemu-server").exists()


def test_missing_iso_is_refused_in_preflight(manifest, tmp_path, v2p):
    disk = standin(manifest, tmp_path)
    line = one_line_error(v2p(*dance_args(disk, tmp_path / "nope.iso", 305)))
    assert f"drivers ISO {tmp_path / 'nope.iso'}: no such file" in line
    assert nothing_created(v2p)
    line = one_line_error(v2p("migrate", str(disk), "--vmid", "305", "--os", "win7", "--bus", "virtio"))
    assert "no virtio drivers ISO found" in line and "--drivers-iso" in line
    assert nothing_created(v2p)


def test_iso_without_drivers_for_this_windows_is_refused(manifest, tmp_path, v2p, drivers_iso):
    disk = standin(manifest, tmp_path)
    line = one_line_error(v2p(*dance_args(disk, drivers_iso.parent / "no-w7.iso", 306)))
    assert "has no viostor, NetKVM driver for win7 (w7/2k8R2, amd64)" in line
    assert nothing_created(v2p)
    notiso = tmp_path / "fake.iso"
    notiso.write_bytes(b"not an iso" * 1000)
    line = one_line_error(v2p(*dance_args(disk, notiso, 306)))
    assert "is not a readable ISO image" in line
    assert nothing_created(v2p)


def test_iso_in_the_targets_iso_storage_is_found(manifest, tmp_path, v2p, drivers_iso):
    disk = standin(manifest, tmp_path)
    iso_dir = v2p.target / "template" / "iso"
    iso_dir.mkdir(parents=True)
    shutil.copy(drivers_iso, iso_dir / "virtio-win.iso")
    proc = v2p("migrate", str(disk), "--vmid", "307", "--os", "win7", "--bus", "virtio")
    assert proc.returncode == 0, proc.stderr
    assert_danced(v2p, 307)
    proc = v2p("migrate", str(standin(manifest, tmp_path / "b")), "--vmid", "308", "--os", "win7", "--bus",
               "virtio", "--drivers-iso", "local:iso/virtio-win.iso")
    assert proc.returncode == 0, proc.stderr


def test_dance_keeps_an_existing_second_disk(manifest, tmp_path, v2p, drivers_iso):
    import subprocess

    disk = standin(manifest, tmp_path)
    assert v2p("migrate", str(disk), "--vmid", "310", "--os", "win7", "--no-boot-check").returncode == 0
    data = v2p.target / "images" / "310" / "vm-310-disk-1.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(data)], check=True, capture_output=True)
    conf = v2p.target / "qemu-server" / "310.conf"
    conf.write_text(conf.read_text() + "ide1: local:310/vm-310-disk-1.qcow2,size=64M\n")
    proc = v2p("dance", "310", "--drivers-iso", str(drivers_iso))
    assert proc.returncode == 0, proc.stderr
    config = v2p.config(310)
    assert config["ide1"] == "local:310/vm-310-disk-1.qcow2,size=64M" and config["virtio0"]
    import json

    dance = json.loads((v2p.target / "migrations" / "310.dance.json").read_text())
    assert dance["stages"]["layout1"]["result"]["temp_volid"] == "local:310/vm-310-disk-2.qcow2"
    assert not (v2p.target / "images" / "310" / "vm-310-disk-2.qcow2").exists()  # removed after the dance
    check = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 1M", str(data)], capture_output=True,
                           text=True)
    assert check.returncode == 0 and "Pattern verification failed" not in check.stdout


def test_migrate_again_after_the_dance_finished_elsewhere_keeps_the_guests_disk(manifest, tmp_path, v2p,
                                                                                drivers_iso):
    disk = standin(manifest, tmp_path)
    args = dance_args(disk, drivers_iso, 311)
    proc = v2p.popen(*args, V2P_TEST_HOLD_AFTER="dance:boot1")
    wait_for(proc.stderr, "holding after dance:boot1", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finish = v2p("dance", "311")  # settings and ISO come from the dance record
    assert finish.returncode == 0, finish.stderr
    again = v2p(*args)
    assert again.returncode == 0, again.stderr
    assert "[convert] already done" in again.stdout and "[create] already done" in again.stdout
    config = v2p.config(311)
    assert "ide0" not in config and config["boot"] == "order=virtio0"
    assert "windows up on virtio-blk (viostor)" in v2p.serial(311)
