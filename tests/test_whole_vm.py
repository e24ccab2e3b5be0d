"""Whole VMs end to end on the local target: a .vmx with several disks and NICs is
migrated with its hardware, every disk byte-identical, the guest boots; a kill
while the second of three disks is written resumes with only what is missing."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

from conftest import DISK_LINE, V2P, assert_same_bytes, guest_report, one_line_error
from test_resume import wait_for

MiB = 1 << 20

VMX = """\
.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "14"
displayName = "web 01"
guestOS = "debian11-64"
numvcpus = "4"
cpuid.coresPerSocket = "2"
memsize = "768"
uuid.bios = "42 1a 0b 2c 3d 4e 5f 60-71 82 93 a4 b5 c6 d7 e8"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "esxi.vmdk"
scsi0:1.present = "TRUE"
scsi0:1.fileName = "data.vmdk"
scsi0:2.present = "TRUE"
scsi0:2.fileName = "logs.vmdk"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.networkName = "LAN"
ethernet0.addressType = "static"
ethernet0.address = "00:50:56:aa:bb:cc"
ethernet1.present = "TRUE"
ethernet1.virtualDev = "e1000"
ethernet1.networkName = "DMZ"
ethernet1.addressType = "generated"
ethernet1.generatedAddress = "00:0c:29:12:34:60"
"""


def make_vm(folder: Path, samples: Path, *, data_mib: int = 8) -> tuple[Path, dict[str, Path]]:
    """The sample guest's ESXi disk as scsi0:0 plus two data disks of known bytes; their raw twins."""
    shutil.copytree(samples / "esxi", folder, copy_function=shutil.copy2)
    raws = {"esxi.vmdk": samples / "guest.raw"}
    for index, name in enumerate(("data", "logs")):
        raw = folder.parent / f"{name}.raw"
        with open(raw, "wb") as handle:
            handle.truncate(data_mib * MiB)
            for at in range(0, data_mib * MiB, 3 * MiB):
                handle.seek(at)
                handle.write(bytes([index + 1]) * 65536)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(raw), str(folder / f"{name}.vmdk")],
                       check=True)
        raws[f"{name}.vmdk"] = raw
    vmx = folder / "web01.vmx"
    vmx.write_text(VMX)
    return vmx, raws


def test_vmx_with_three_disks_and_two_nics_migrates_with_its_hardware(tmp_path, manifest, samples, v2p: V2P):
    vmx, raws = make_vm(tmp_path / "web01", samples)
    proc = v2p("migrate", str(vmx), "--vmid", "120", "--network", "LAN=vmbr0", "--network", "DMZ=vmbr1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = v2p.config(120)
    assert config["name"] == "web-01"
    assert (config["sockets"], config["cores"], config["memory"], config["ostype"]) == ("2", "2", "768", "l26")
    assert config["net0"] == "virtio=00:50:56:AA:BB:CC,bridge=vmbr0"
    assert config["net1"] == "virtio=00:0C:29:12:34:60,bridge=vmbr1"
    assert config["smbios1"].startswith("uuid=")
    assert config["boot"] == "order=scsi0"
    for key, name in (("scsi0", "esxi.vmdk"), ("scsi1", "data.vmdk"), ("scsi2", "logs.vmdk")):
        volid = config[key].split(",")[0]
        index = int(key[-1])
        assert volid == f"local:120/vm-120-disk-{index}.qcow2", config[key]
        assert_same_bytes(raws[name], v2p.disk(120).with_name(f"vm-120-disk-{index}.qcow2"))
    assert guest_report(v2p.serial(120)) == ("virtio-scsi", "1af4:1004", manifest["marker"])
    # The guest sees every disk: the boot disk as 0x80, the two data disks (8 MiB each) after it.
    seen = DISK_LINE.findall(v2p.serial(120))
    assert [(drive, int(sectors)) for drive, sectors, _marker in seen] == [
        ("80", 65536), ("81", 8 * MiB // 512), ("82", 8 * MiB // 512)]
    assert seen[0][2] == manifest["marker"]


def test_unmapped_network_is_refused_before_anything_is_made(tmp_path, manifest, samples, v2p: V2P):
    vmx, _raws = make_vm(tmp_path / "web01", samples)
    line = one_line_error(v2p("migrate", str(vmx), "--vmid", "120", "--network", "LAN=vmbr0"))
    assert "unmapped-network" in line and "DMZ" in line
    assert not (v2p.target / "qemu-server" / "120.conf").exists()
    assert not (v2p.target / "migrations" / "120.json").exists()


def test_kill_while_the_second_of_three_disks_is_written_resumes(tmp_path, manifest, samples, v2p: V2P):
    vmx, raws = make_vm(tmp_path / "web01", samples, data_mib=64)
    args = ("migrate", str(vmx), "--vmid", "120", "--bridge", "vmbr0", "--no-boot-check")
    proc = v2p.popen(*args, "--bwlimit", "2048")
    wait_for(proc.stdout, "[convert:1] write the disk", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = v2p.state(120)
    assert "verify" in state["stages"] and "convert:1" not in state["stages"]
    first = state["stages"]["verify"]["finished_at"]
    again = v2p(*args)
    assert again.returncode == 0, again.stderr
    assert "[convert] already done" in again.stdout and "[verify] already done" in again.stdout
    assert "[convert:1] done in" in again.stdout and "[convert:2] done in" in again.stdout
    assert v2p.state(120)["stages"]["verify"]["finished_at"] == first
    for index, name in enumerate(("esxi.vmdk", "data.vmdk", "logs.vmdk")):
        assert_same_bytes(raws[name], v2p.disk(120).with_name(f"vm-120-disk-{index}.qcow2"))


def test_ova_made_by_vmware_tools_migrates_with_efi(tmp_path, manifest, v2p: V2P):
    """tests/fixtures/v2p-fixture.ova: written by vmware/open-vmdk's ova-compose (EFI, secure boot,
    NVMe disk, 4 vCPUs); its streamOptimized disk is read in place from the tar."""
    from test_source_ovf import FIXTURES, fixture_raw

    ova = tmp_path / "appliance.ova"
    shutil.copyfile(FIXTURES / "v2p-fixture.ova", ova)
    proc = v2p("migrate", str(ova), "--vmid", "121", "--bridge", "vmbr0", "--no-boot-check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nvme-controller" in proc.stdout
    config = v2p.config(121)
    assert (config["bios"], config["machine"], config["sockets"], config["memory"]) == ("ovmf", "q35", "4", "1024")
    assert config["efidisk0"].startswith("local:121/vm-121-disk-1.qcow2,efitype=4m,pre-enrolled-keys=1")
    assert config["scsi0"].startswith("local:121/vm-121-disk-0.qcow2,")
    raw = tmp_path / "fixture.raw"
    raw.write_bytes(fixture_raw())
    assert_same_bytes(raw, v2p.disk(121))
    assert not list(tmp_path.glob("*.vmdk")), "the OVA's disk was extracted next to it"


def test_efi_vmx_boots_under_ovmf(tmp_path, manifest, samples, v2p: V2P):
    folder = tmp_path / "efivm"
    folder.mkdir()
    shutil.copy2(samples / "efi" / "efi.vmdk", folder / "efi.vmdk")
    (folder / "efivm.vmx").write_text(
        'displayName = "efivm"\nguestOS = "debian12-64"\nfirmware = "efi"\nmemsize = "256"\n'
        'scsi0.present = "TRUE"\nscsi0.virtualDev = "lsisas1068"\n'
        'scsi0:0.present = "TRUE"\nscsi0:0.fileName = "efi.vmdk"\n')
    proc = v2p("migrate", str(folder / "efivm.vmx"), "--vmid", "122", timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "efi-lsi" in proc.stdout  # LSI SAS on EFI: onto virtio-scsi instead
    config = v2p.config(122)
    assert config["bios"] == "ovmf" and config["scsihw"] == "virtio-scsi-pci"
    assert "v2p-efi-guest: up" in v2p.serial(122)


def test_unknown_guest_os_is_a_warning_and_os_silences_it(tmp_path, manifest, samples, v2p: V2P):
    vmx, _raws = make_vm(tmp_path / "web01", samples)
    vmx.write_text(vmx.read_text().replace('guestOS = "debian11-64"', 'guestOS = "beos"'))
    proc = v2p("migrate", str(vmx), "--vmid", "120", "--bridge", "vmbr0", "--no-boot-check")
    assert proc.returncode == 0, proc.stderr
    assert "[preflight] warning: unknown-guest-os:" in proc.stdout
    assert v2p.config(120)["ostype"] == "other"
    other = V2P(tmp_path / "other")
    proc = other("migrate", str(vmx), "--vmid", "120", "--bridge", "vmbr0", "--no-boot-check", "--os", "l26")
    assert proc.returncode == 0, proc.stderr
    assert "unknown-guest-os" not in proc.stdout
    assert other.config(120)["ostype"] == "l26"


def test_ova_without_manifest_migrates_with_a_warning(tmp_path, manifest, v2p: V2P):
    import tarfile

    from test_source_ovf import FIXTURES

    ova = tmp_path / "nomf.ova"
    with tarfile.open(FIXTURES / "v2p-fixture.ova") as src, tarfile.open(ova, "w") as dst:
        for member in src.getmembers():
            if not member.name.endswith(".mf"):
                dst.addfile(member, src.extractfile(member))
    proc = v2p("migrate", str(ova), "--vmid", "121", "--bridge", "vmbr0", "--no-boot-check")
    assert proc.returncode == 0, proc.stderr
    assert "[inspect] warning: " in proc.stdout and "no manifest" in proc.stdout
