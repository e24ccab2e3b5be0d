"""The VM spec: VMware's guest OS ids in both spellings map to PVE's ostype, and
``encrypted`` means the disks are ciphertext (not that the VM home has a key safe,
which every vTPM VM has), as the .vmx source reads it from real qemu-img disks."""

from __future__ import annotations

import struct
import subprocess
import textwrap
from pathlib import Path

import pytest

from v2p.sources.vmx import VmxSource
from v2p.spec import DiskSpec, VMSpec, pve_ostype

MiB = 1 << 20

# (.vmx guestOS / OVF vmw:osType, vSphere guestId, PVE ostype): VMware's two names for one OS.
SAME_OS = [
    ("windows9-64", "windows9_64Guest", "win10"),
    ("windows9", "windows9Guest", "win10"),
    ("windows9srv-64", "windows9Server64Guest", "win10"),
    ("windows2019srv-64", "windows2019srv_64Guest", "win10"),
    ("windows2019srvnext-64", "windows2019srvNext_64Guest", "win11"),  # Windows Server 2022
    ("windows2022srvnext-64", "windows2022srvNext_64Guest", "win11"),  # Windows Server 2025
    ("windows11-64", "windows11_64Guest", "win11"),
    ("windows8srv-64", "windows8Server64Guest", "win8"),
    ("windows7srv-64", "windows7Server64Guest", "win7"),
    ("windows7-64", "windows7_64Guest", "win7"),
    ("longhorn-64", "winLonghorn64Guest", "w2k8"),
    ("longhorn", "winLonghornGuest", "w2k8"),
    ("winvista-64", "winVista64Guest", "wvista"),
    ("winnetstandard", "winNetStandardGuest", "w2k3"),
    ("winnetenterprise-64", "winNetEnterprise64Guest", "w2k3"),
    ("winxppro", "winXPProGuest", "wxp"),
    ("win2000pro", "win2000ProGuest", "w2k"),
    ("ubuntu-64", "ubuntu64Guest", "l26"),
    ("debian11-64", "debian11_64Guest", "l26"),
    ("rhel9-64", "rhel9_64Guest", "l26"),
    ("centos-64", "centos64Guest", "l26"),
    ("sles15-64", "sles15_64Guest", "l26"),
    ("vmware-photon-64", "vmwarePhoton64Guest", "l26"),
    ("otherlinux-64", "otherLinux64Guest", "l26"),
    ("other3xlinux-64", "other3xLinux64Guest", "l26"),
    ("other24xlinux", "other24xLinuxGuest", "l24"),
    ("solaris11-64", "solaris11_64Guest", "solaris"),
]


@pytest.mark.parametrize(("vmx_id", "guest_id", "ostype"), SAME_OS, ids=[row[1] for row in SAME_OS])
def test_both_spellings_of_a_guest_os_map_alike(vmx_id: str, guest_id: str, ostype: str) -> None:
    assert pve_ostype(vmx_id) == ostype
    assert pve_ostype(guest_id) == ostype
    assert pve_ostype(f" {guest_id.upper()} ") == ostype


@pytest.mark.parametrize("guest_os", ["other-64", "otherGuest64", "otherGuest", "freebsd13_64Guest",
                                      "darwin21_64Guest", "dosGuest", "", "  ", None])
def test_what_pve_has_no_type_for_is_unknown(guest_os: str | None) -> None:
    """None makes the unknown-guest-os rule tell the user, and the VM gets PVE's 'other'."""
    assert pve_ostype(guest_os) is None
    assert VMSpec(name="vm", guest_os=guest_os).ostype == "other"


def test_state_file_of_an_older_run_still_loads() -> None:
    """Specs recorded before disks and homes had their own encryption flags round-trip."""
    old = VMSpec(name="vm", disks=[DiskSpec("scsi", 0, 0, "a.vmdk", MiB)]).to_dict()
    del old["home_encrypted"]
    del old["disks"][0]["encrypted"]
    spec = VMSpec.from_dict(old)
    assert not spec.home_encrypted and not spec.disks[0].encrypted
    assert VMSpec.from_dict(spec.to_dict()) == spec


# --- what "encrypted" means, read from a .vmx and its disks ------------------------------

def vm_folder(tmp_path: Path, vmx_lines: str, *, disk_lines: str = "") -> Path:
    """vm.vmx with one disk (a qemu-img monolithicFlat descriptor, ``disk_lines`` appended)."""
    folder = tmp_path / "vm"
    folder.mkdir()
    disk = folder / "vm.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(disk),
                    str(MiB)], check=True)
    disk.write_text(disk.read_text() + disk_lines)
    vmx = folder / "vm.vmx"
    vmx.write_text(textwrap.dedent("""\
        .encoding = "UTF-8"
        config.version = "8"
        virtualHW.version = "19"
        scsi0.present = "TRUE"
        scsi0:0.present = "TRUE"
        scsi0:0.fileName = "vm.vmdk"
        """) + textwrap.dedent(vmx_lines))
    return vmx


@pytest.mark.parametrize("keys", [
    'encryption.bundle = "vmware:key/list/(pair/(fqid/<VMWARE-NULL>/KMS/a4e7,HMAC%2dSHA%2d256,S0VL))"\n',
    'encryption.keySafe = "vmware:key/list/(pair/(phrase/MA3f/pass2key%3dPBKDF2,HMAC%2dSHA%2d1,X4sG))"\n'
    'encryption.data = "cXVpdGUgb3BhcXVl"\n',
], ids=["vsphere-bundle", "hosted-keysafe"])
def test_vtpm_vm_with_an_encrypted_home_has_plain_disks(tmp_path: Path, keys: str) -> None:
    spec = VmxSource(vm_folder(tmp_path, 'vtpm.present = "TRUE"\n' + keys)).spec()
    assert spec.tpm and spec.home_encrypted
    assert not spec.encrypted and not spec.disks[0].encrypted
    assert spec.disks[0].capacity == MiB  # inspected like any plain disk


@pytest.mark.parametrize("marker", [
    'encryptionKeys = "vmware:key/list/(pair/(fqid/<VMWARE-NULL>/KMS/a4e7,XTS%2dAES%2d256,b3Bh))"\n',
    'ddb.iofilters = "vmwarevmcrypt"\n',
    'ddb.iofilters = "spm|VMW_vmwarevmcrypt_1.0.0"\n',
], ids=["encryptionKeys", "iofilter", "iofilters"])
def test_disk_marked_by_vm_encryption_is_encrypted(tmp_path: Path, marker: str) -> None:
    home = 'encryption.bundle = "vmware:key/list/(pair/(fqid/<VMWARE-NULL>/KMS/a4e7,HMAC%2dSHA%2d256,S0VL))"\n'
    spec = VmxSource(vm_folder(tmp_path, home, disk_lines=marker)).spec()
    assert spec.encrypted and spec.disks[0].encrypted
    assert spec.disks[0].capacity == MiB  # from the descriptor: the ciphertext is not inspected


def test_other_io_filters_leave_the_disk_plain(tmp_path: Path) -> None:
    spec = VmxSource(vm_folder(tmp_path, "", disk_lines='ddb.iofilters = "vmwarelwd"\n')).spec()
    assert not spec.encrypted and not spec.disks[0].encrypted


def test_fully_encrypted_config_hides_every_disk(tmp_path: Path) -> None:
    """A hosted product's full encryption leaves only the name and the key safe in clear: the
    devices are inside encryption.data, so no disk can be read."""
    folder = tmp_path / "vm"
    folder.mkdir()
    vmx = folder / "vm.vmx"
    vmx.write_text('.encoding = "UTF-8"\ndisplayName = "Encrypted"\n'
                   'encryption.keySafe = "vmware:key/list/(pair/(phrase/MA3f/pass2key%3dPBKDF2,HMAC%2dSHA%2d1,X4))"\n'
                   'encryption.data = "cXVpdGUgb3BhcXVl"\n')
    spec = VmxSource(vmx).spec()
    assert spec.disks == [] and spec.home_encrypted and spec.encrypted


def _sparse_with_text_behind_its_descriptor(path: Path, text: bytes) -> None:
    """A qemu-img monolithicSparse disk whose guest data (past the embedded descriptor) holds ``text``."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as handle:
        handle.truncate(MiB)
        handle.write(text)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse",
                    str(raw), str(path)], check=True)
    raw.unlink()


def test_embedded_descriptor_is_read_not_the_guest_data_behind_it(tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    disk = folder / "vm.vmdk"
    # A guest that keeps a VMware config on its disk is not an encrypted disk.
    _sparse_with_text_behind_its_descriptor(disk, b'encryption.keySafe = "x"\nddb.iofilters = "vmwarevmcrypt"\n')
    data = disk.read_bytes()
    offset, size = struct.unpack_from("<QQ", data, 28)
    assert data.find(b"encryption.keySafe") > (offset + size) * 512  # really behind the descriptor
    vmx = folder / "vm.vmx"
    vmx.write_text('scsi0.present = "TRUE"\nscsi0:0.present = "TRUE"\nscsi0:0.fileName = "vm.vmdk"\n')
    assert not VmxSource(vmx).spec().encrypted
    # The same marker inside the embedded descriptor is VM Encryption's.
    head = bytearray(data)
    descriptor = bytes(head[offset * 512:(offset + size) * 512]).split(b"\0", 1)[0]
    marked = descriptor + b'encryption.keySafe = "vmware:key/list/(pair/(phrase/MA3f))"\n'
    head[offset * 512:offset * 512 + len(marked)] = marked
    disk.write_bytes(bytes(head))
    spec = VmxSource(vmx).spec()
    assert spec.encrypted and spec.disks[0].encrypted
