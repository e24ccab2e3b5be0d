"""The IDE -> virtio driver dance, for real: the Windows stand-in guest under
QEMU TCG, the drivers ISO built with the real virtio-win layout."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from test_boot import qemu_pids, wait_until

from conftest import SAMPLES, V2P, one_line_error
from test_resume import wait_for

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("short_settle")  # the stand-ins settle in seconds (conftest)


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
    assert "VM 301 did not boot: STOP 0x0000007B INACCESSIBLE_BOOT_DEVICE" in line
    assert v2p.state(301)["stages"]["boot"]["result"]["outcome"] == "failed"
    assert "--os" in line


def assert_driver_seen_by_reads(dance: dict, temp_key: str = "virtio1") -> None:
    """Boot 1 went on by itself because the guest read its temporary disk (not a line it printed)."""
    boot1 = dance["boot1"]
    assert boot1["signal"] == "temporary disk reads" and boot1["disk"] == temp_key, boot1
    assert boot1["reads"] >= 4096, boot1  # the stand-in's "viostor" reads 4 KiB of the new disk


def assert_boot2_up_by_io(dance: dict, system_key: str = "virtio0") -> None:
    """Boot 2 was judged as any boot: the virtio system disk read what only an OS reads, no reset."""
    boot2 = dance["boot2"]
    assert boot2["outcome"] == "up" and boot2["signal"].startswith("boot disk reads ("), boot2
    assert boot2["signs"]["boot disk reads"]["value"] >= 8 << 20 and boot2["resets"] == 0, boot2
    assert dance["confirmed"] is True


def test_full_dance(manifest, tmp_path, v2p, drivers_iso):
    disk = standin(manifest, tmp_path)
    proc = v2p(*dance_args(disk, drivers_iso))
    assert proc.returncode == 0, proc.stderr
    assert_danced(v2p)
    dance = v2p.state(300)["stages"]["drivers"]["result"]
    assert dance["system_disk"] == "virtio0"
    assert_driver_seen_by_reads(dance)
    assert_boot2_up_by_io(dance)
    assert "the guest read 4 KiB of virtio1: its virtio storage driver is in" in proc.stdout
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
    dance = v2p.state(309)["stages"]["drivers"]["result"]
    assert_driver_seen_by_reads(dance, "scsi1")  # vioscsi reads it on the virtio-scsi controller
    assert_boot2_up_by_io(dance, "scsi0")


def test_ide_bus_skips_the_dance(manifest, tmp_path, v2p, drivers_iso):
    disk = standin(manifest, tmp_path)
    proc = v2p("migrate", str(disk), "--vmid", "302", "--os", "win7", "--bus", "ide", "--boot-timeout", "3")
    # Migrated; 3 s are too short to see the guest's OS run, and v2p says so (exit 12), never "up".
    assert (proc.returncode, v2p.state(302)["stages"]["boot"]["result"]["outcome"]) == (12, "unconfirmed"), \
        proc.stderr
    assert proc.stdout.splitlines()[-1].startswith(f"VM 302 migrated from {disk}; boot not confirmed: ")
    assert v2p.state(302)["stages"]["drivers"]["result"] == {"skipped": True}
    assert "ide0" in v2p.config(302) and "virtio0" not in v2p.config(302)


HOLDS = ["drivers", "dance:layout1", "dance:boot1-started", "dance:boot1", "dance:shutdown1",
         "dance:layout2", "dance:boot2"]


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
    line = one_line_error(v2p(*dance_args(disk, drivers_iso, 303, "--dance-wait", "8")))
    # the guest booted (it read its 10 MiB "kernel" from ide0) but never read virtio1
    assert "no sign that the guest has the virtio drivers after 8s: it never read its temporary disk virtio1" \
        in line
    assert "v2p dance 303 --continue" in line
    assert v2p.config(303)["virtio1"].startswith("local:303/vm-303-disk-1.qcow2")  # still on boot 1
    assert "303  running" in v2p("vm", "list").stdout  # left up for the operator, after v2p exited
    # the operator (wrongly) says the driver is there
    confirm = v2p("dance", "303", "--continue", "--drivers-iso", str(drivers_iso), "--boot-wait", "60")
    assert confirm.returncode != 0
    assert "Traceback" not in confirm.stderr
    # boot 2 blue-screens (its STOP code on EMS, then Windows' automatic restart: a reset loop)
    assert "VM 303 did not boot on virtio (STOP 0x0000007B" in confirm.stderr or \
        "VM 303 did not boot on virtio (the guest reset" in confirm.stderr, confirm.stderr
    # the rollback's boot is a boot check like any: ide0 read what only an OS reads, then ran on
    assert "rolled back to ide0, it boots there again (boot disk reads (" in confirm.stderr, confirm.stderr
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
    # the second disk moves with the system disk: Windows has viostor for every disk now
    assert config["virtio1"] == "local:310/vm-310-disk-1.qcow2,size=64M" and config["virtio0"]
    assert "ide1" not in config
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


def data_volume(v2p: V2P, vmid: int, index: int, byte: int) -> Path:
    """A small blank qcow2 volume on the local storage with ``byte`` written in its first MiB."""
    volume = v2p.target / "images" / str(vmid) / f"vm-{vmid}-disk-{index}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(volume), "16M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {byte} 0 1M", str(volume)], check=True,
                   capture_output=True)
    return volume


def multi_disk_vm(manifest, tmp_path: Path, v2p: V2P, vmid: int, keys: tuple[str, ...],
                  name: str = "winguest") -> dict[str, str]:
    """The Windows stand-in migrated onto ide0, plus data disks on ``keys`` (as v2p's first boot
    places a Windows VM's disks); a CD-ROM drive on ide2. Returns each key's config value."""
    disk = standin(manifest, tmp_path, name)
    assert v2p("migrate", str(disk), "--vmid", str(vmid), "--os", "win10", "--no-boot-check").returncode == 0
    lines = [f"{key}: local:{vmid}/{data_volume(v2p, vmid, index, 0x10 + index).name},size=16M"
             for index, key in enumerate(keys, start=1)]
    conf = v2p.target / "qemu-server" / f"{vmid}.conf"
    conf.write_text(conf.read_text() + "\n".join([*lines, "ide2: none,media=cdrom"]) + "\n")
    config = v2p.config(vmid)
    return {key: config[key] for key in ("ide0", *keys)}


def pattern_of(volume: Path, byte: int) -> bool:
    check = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -P {byte} 0 1M", str(volume)],
                           capture_output=True, text=True)
    return check.returncode == 0 and "Pattern verification failed" not in check.stdout


def test_dance_moves_every_disk_onto_virtio_in_order(manifest, tmp_path, v2p, drivers_iso):
    before = multi_disk_vm(manifest, tmp_path, v2p, 312, ("ide1", "ide3", "sata0"))
    proc = v2p("dance", "312", "--drivers-iso", str(drivers_iso))
    assert proc.returncode == 0, proc.stderr
    assert "disks ide0 -> virtio0, ide1 -> virtio1, ide3 -> virtio2, sata0 -> virtio3" in proc.stdout
    config = v2p.config(312)
    assert [config[f"virtio{n}"] for n in range(4)] == list(before.values())
    assert config["boot"] == "order=virtio0"
    for gone in ("ide0", "ide1", "ide3", "sata0", "virtio4", "net1"):
        assert gone not in config, f"{gone} left in the config"
    assert config["ide2"] == "none,media=cdrom"  # the VM's own CD-ROM drive is back, the drivers ISO gone
    assert "windows up on virtio-blk (viostor)" in v2p.serial(312)
    images = v2p.target / "images" / "312"
    assert sorted(p.name for p in images.iterdir()) == [f"vm-312-disk-{n}.qcow2" for n in range(4)]
    assert all(pattern_of(images / f"vm-312-disk-{n}.qcow2", 0x10 + n) for n in range(1, 4))


def test_dance_onto_scsi_moves_every_disk(manifest, tmp_path, v2p, drivers_iso):
    before = multi_disk_vm(manifest, tmp_path, v2p, 313, ("ide1", "ide3"))
    proc = v2p("dance", "313", "--bus", "scsi", "--drivers-iso", str(drivers_iso))
    assert proc.returncode == 0, proc.stderr
    config = v2p.config(313)
    assert [config[f"scsi{n}"] for n in range(3)] == list(before.values())
    assert config["boot"] == "order=scsi0" and config["scsihw"] == "virtio-scsi-pci"
    assert not {"ide0", "ide1", "ide3", "scsi3"} & set(config)


def test_rollback_restores_every_disk(manifest, tmp_path, v2p, drivers_iso):
    before = multi_disk_vm(manifest, tmp_path, v2p, 314, ("ide1", "ide3"), "winguest-nodriver")
    line = one_line_error(v2p("dance", "314", "--drivers-iso", str(drivers_iso), "--dance-wait", "3"))
    assert "v2p dance 314 --continue" in line
    confirm = v2p("dance", "314", "--continue", "--drivers-iso", str(drivers_iso), "--boot-wait", "60")
    assert "rolled back to ide0, it boots there again" in confirm.stderr, confirm.stderr
    config = v2p.config(314)
    assert {key: config.get(key) for key in before} == before
    assert config["boot"] == "order=ide0" and config["ide2"] == "none,media=cdrom"
    assert not [key for key in config if key.startswith("virtio")], config
    assert "v2p-guest: windows up on ide" in v2p.serial(314)


WIN_VMX = """\
.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "14"
displayName = "win files"
guestOS = "windows9-64"
memsize = "256"
sata0.present = "TRUE"
sata0:0.present = "TRUE"
sata0:0.fileName = "{system}"
sata0:1.present = "TRUE"
sata0:1.fileName = "data.vmdk"
sata0:2.present = "TRUE"
sata0:2.fileName = "logs.vmdk"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "e1000e"
ethernet0.addressType = "generated"
ethernet0.generatedAddress = "00:0c:29:12:34:70"
"""


def windows_vmx(manifest, tmp_path: Path) -> Path:
    """The Windows stand-in's disk and two data disks of known bytes in a .vmx (all on SATA)."""
    system = standin(manifest, tmp_path)
    folder = system.parent
    for index, name in enumerate(("data", "logs"), start=1):
        raw = tmp_path / f"{name}.raw"
        with open(raw, "wb") as handle:
            handle.truncate(8 << 20)
            handle.write(bytes([0x20 + index]) * (1 << 20))
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(raw), str(folder / f"{name}.vmdk")],
                       check=True)
    vmx = folder / "win.vmx"
    vmx.write_text(WIN_VMX.format(system=system.name))
    return vmx


@pytest.mark.parametrize("point", [None, "dance:layout1", "dance:layout2"])
def test_migrate_windows_vmx_with_three_disks_dances_them_all(point, manifest, tmp_path, v2p, drivers_iso):
    args = ("migrate", str(windows_vmx(manifest, tmp_path)), "--vmid", "315", "--os", "win10", "--bus", "virtio",
            "--bridge", "vmbr0", "--drivers-iso", str(drivers_iso))
    if point:
        proc = v2p.popen(*args, V2P_TEST_HOLD_AFTER=point)
        wait_for(proc.stderr, f"holding after {point}", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = v2p(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    if point:
        assert "[attach] already done" in done.stdout  # the moved disks still count as attached
    config = v2p.config(315)
    for n in range(3):
        assert config[f"virtio{n}"].startswith(f"local:315/vm-315-disk-{n}.qcow2,"), config
    assert config["boot"] == "order=virtio0" and config["net0"].startswith("virtio=")
    assert not [key for key in config if key.startswith(("ide", "sata"))], config
    assert "windows up on virtio-blk (viostor)" in v2p.serial(315)
    images = v2p.target / "images" / "315"
    assert all(pattern_of(images / f"vm-315-disk-{n}.qcow2", 0x20 + n) for n in (1, 2))
