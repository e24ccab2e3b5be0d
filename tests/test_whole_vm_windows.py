"""The issue's Windows 10 EFI VM end to end on the local target: a .vmx written from
VMware's documented keys (2 sockets x 2 cores, two disks on LSI SAS and one on SATA,
a CD-ROM, a vmxnet3 with a static MAC, a vTPM whose VM home is encrypted while its
disks are not) migrates with the mapped hardware, every disk byte-identical, and the
sample EFI guest (the only EFI guest here: the Windows stand-ins are BIOS-only) boots
under OVMF from ide0 on q35."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from conftest import V2P, assert_same_bytes, one_line_error

MiB = 1 << 20
VMID = 130
MAC = "00:50:56:9a:3c:7e"

# A vTPM needs the VM's home files encrypted (its key safe in the .vmx: encryption.keySafe
# and encryption.data, or vSphere's encryption.bundle); the disks stay plain unless the
# storage policy encrypts them too.
HOME_KEYS = {
    "keysafe": 'encryption.keySafe = "vmware:key/list/(pair/(fqid/<VMWARE-NULL>/KMS/a4e7494f%2dda55,'
               'HMAC%2dSHA%2d256,KPYD5Dzg))"\nencryption.data = "+mDx4n6cXaPHlV0mYk3SJd"\n',
    "bundle": 'encryption.bundle = "vmware:key/list/(pair/(fqid/<VMWARE-NULL>/KMS/a4e7494f%2dda55,'
              'HMAC%2dSHA%2d256,KPYD5Dzg))"\n',
}
VMX = """\
.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
displayName = "Win10 Desktop"
guestOS = "windows9-64"
firmware = "efi"
uefi.secureBoot.enabled = "{secure}"
numvcpus = "4"
cpuid.coresPerSocket = "2"
memsize = "320"
uuid.bios = "42 3a 9c 51 07 d2 6e 4b-8f 10 22 33 44 55 66 77"
bios.hddOrder = "scsi0:0"
vtpm.present = "TRUE"
{home_keys}scsi0.present = "TRUE"
scsi0.virtualDev = "lsisas1068"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "Win10.vmdk"
scsi0:1.present = "TRUE"
scsi0:1.fileName = "Win10_1.vmdk"
sata0.present = "TRUE"
sata0:0.present = "TRUE"
sata0:0.fileName = "Win10_2.vmdk"
sata0:1.present = "TRUE"
sata0:1.deviceType = "cdrom-image"
sata0:1.fileName = "en_windows_10.iso"
sata0:1.startConnected = "FALSE"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.networkName = "VM Network"
ethernet0.addressType = "static"
ethernet0.address = "{mac}"
"""


def make_vm(folder: Path, samples: Path, manifest: dict[str, Any], *, secure: bool = False,
            home_keys: str = "keysafe") -> tuple[Path, dict[str, Path]]:
    """The EFI sample disk as scsi0:0, two data disks of known bytes (scsi0:1, sata0:0); their raw twins."""
    folder.mkdir(parents=True)
    shutil.copyfile(samples / manifest["efi"]["descriptor"], folder / "Win10.vmdk")
    raws = {"Win10.vmdk": samples / manifest["efi"]["raw"]}
    for fill, (name, size) in enumerate((("Win10_1", 6 * MiB), ("Win10_2", 3 * MiB)), start=0xA1):
        raw = folder.parent / f"{name}.raw"
        with open(raw, "wb") as handle:
            handle.truncate(size)
            for at in range(0, size, MiB):
                handle.seek(at)
                handle.write(bytes([fill]) * 4096 + name.encode())
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", str(raw),
                        str(folder / f"{name}.vmdk")], check=True)
        raws[f"{name}.vmdk"] = raw
    vmx = folder / "Win10 Desktop.vmx"
    vmx.write_text(VMX.format(secure="TRUE" if secure else "FALSE", mac=MAC, home_keys=HOME_KEYS[home_keys]))
    return vmx, raws


def test_windows10_efi_vmx_migrates_with_its_hardware_and_boots(tmp_path: Path, manifest: dict[str, Any],
                                                               samples: Path, v2p: V2P) -> None:
    vmx, raws = make_vm(tmp_path / "Win10", samples, manifest)
    proc = v2p("migrate", str(vmx), "--vmid", str(VMID), "--bridge", "vmbr0", "--boot-timeout", "120",
               timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "vtpm" in proc.stdout and "efi-lsi" in proc.stdout, proc.stdout
    assert "encrypted-vm" not in proc.stdout + proc.stderr
    config = v2p.config(VMID)
    disks = {key: value for key, value in config.items() if key in ("ide0", "ide1", "ide3")}
    assert {key: value for key, value in config.items() if key not in disks and key != "efidisk0"} == {
        "name": "Win10-Desktop",
        "sockets": "2", "cores": "2", "memory": "320",
        "ostype": "win10",
        "bios": "ovmf", "machine": "q35",
        "scsihw": "virtio-scsi-pci",  # lsi (PVE's default) has no OVMF driver
        "smbios1": "uuid=423a9c51-07d2-6e4b-8f10-223344556677",
        "ide2": "none,media=cdrom",
        "net0": f"e1000={MAC.upper()},bridge=vmbr0",
        "boot": "order=ide0",
        "description": config["description"],
    }
    assert config["description"].startswith("imported from Win10 Desktop (")
    assert config["efidisk0"].startswith(f"local:{VMID}/vm-{VMID}-disk-3.qcow2,efitype=4m,pre-enrolled-keys=0")
    # Boot disk first, then VMware's order (SATA before SCSI): IDE holds three beside the CD-ROM.
    placed = {"ide0": "Win10.vmdk", "ide1": "Win10_2.vmdk", "ide3": "Win10_1.vmdk"}
    for index, (key, name) in enumerate(placed.items()):
        volid = f"local:{VMID}/vm-{VMID}-disk-{index}.qcow2"
        assert disks[key].startswith(volid + ","), (key, disks[key])
        assert_same_bytes(raws[name], v2p.disk(VMID).with_name(f"vm-{VMID}-disk-{index}.qcow2"))
    assert manifest["efi"]["expected_serial"]["up"] in v2p.serial(VMID), v2p.serial(VMID)[-2000:]


def test_secure_boot_keeps_the_keys_pre_enrolled(tmp_path: Path, manifest: dict[str, Any], samples: Path,
                                                 v2p: V2P) -> None:
    """uefi.secureBoot.enabled TRUE: the efidisk0 is made with Microsoft's keys enrolled (the unsigned
    sample guest would then be refused by OVMF, so no boot check here: test_efi covers that)."""
    vmx, raws = make_vm(tmp_path / "Win10", samples, manifest, secure=True, home_keys="bundle")
    proc = v2p("migrate", str(vmx), "--vmid", str(VMID), "--bridge", "vmbr0", "--no-boot-check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "secure-boot" in proc.stdout and "vtpm" in proc.stdout, proc.stdout
    config = v2p.config(VMID)
    assert (config["bios"], config["machine"]) == ("ovmf", "q35")
    assert config["efidisk0"].startswith(f"local:{VMID}/vm-{VMID}-disk-3.qcow2,efitype=4m,pre-enrolled-keys=1")
    assert_same_bytes(raws["Win10.vmdk"], v2p.disk(VMID))


def test_encrypted_disk_is_refused_before_anything_is_made(tmp_path: Path, manifest: dict[str, Any],
                                                           samples: Path, v2p: V2P) -> None:
    """A disk VM Encryption wrote (its descriptor carries the wrapped key and the vmwarevmcrypt
    I/O filter, as on vSphere) is ciphertext: encrypted-vm names it, nothing is created."""
    vmx, _raws = make_vm(tmp_path / "Win10", samples, manifest)
    data = vmx.parent / "Win10_1.vmdk"
    data.unlink()
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat",
                    str(tmp_path / "Win10_1.raw"), str(data)], check=True)
    text = data.read_text()
    text = text.replace('createType="monolithicFlat"\n', 'createType="monolithicFlat"\n'
                        'encryptionKeys = "vmware:key/list/(pair/(fqid/<VMWARE-NULL>/KMS/a4e7494f%2dda55,'
                        'XTS%2dAES%2d256,b3BhcXVl))"\n')
    data.write_text(text + 'ddb.iofilters = "vmwarevmcrypt"\n')
    proc = v2p("migrate", str(vmx), "--vmid", str(VMID), "--bridge", "vmbr0", "--no-boot-check")
    line = one_line_error(proc)
    assert "encrypted-vm" in line and "scsi0:1 (Win10_1.vmdk)" in line, line
    assert "zero-capacity" not in line and "more error" not in line, line
    assert not (v2p.target / "qemu-server" / f"{VMID}.conf").exists()
    assert not (v2p.target / "images" / str(VMID)).exists()
