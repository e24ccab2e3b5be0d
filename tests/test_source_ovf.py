"""The .ovf and .ova sources: hand-written OVF 1.0 and 2.0 envelopes over disks the real
qemu-img made, manifests, OVAs built with tarfile, and every way such a package is refused."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from v2p.errors import SourceError
from v2p.sources.base import DiskInput
from v2p.sources.ovf import OvaSource, OvfSource
from v2p.sources.ovf_mapping import parse_envelope
from v2p.sources.ovf_package import parse_manifest
from v2p.sources.ovf_xml import units
from v2p.spec import CdromSpec, DiskSpec, NicSpec, VMSpec

MiB = 1 << 20
DISK_SIZE = 4 * MiB

OVF1 = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
    xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
    <File ovf:href="{href1}" ovf:id="file1" ovf:size="{size1}"/>
    <File ovf:href="{href2}" ovf:id="file2" ovf:size="{size2}"/>
    <File ovf:href="win10-file1.nvram" ovf:id="file3" ovf:size="8"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="4" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1"
        ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="4194304" ovf:diskId="vmdisk2" ovf:fileRef="file2"
        ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network"><Description>The VM Network network</Description></Network>
  </NetworkSection>
  <VirtualSystem ovf:id="win10-efi">
    <Info>A virtual machine</Info>
    <Name>win10 efi</Name>
    <OperatingSystemSection ovf:id="1" vmw:osType="windows9_64Guest">
      <Info>The kind of installed guest operating system</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>win10-efi</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-19</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:ElementName>4 virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>4</rasd:VirtualQuantity>
        <vmw:CoresPerSocket ovf:required="false">2</vmw:CoresPerSocket>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^30</rasd:AllocationUnits>
        <rasd:ElementName>4096MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>4</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogicsas</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:ElementName>SATA controller 0</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceSubType>vmware.sata.ahci</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>1</rasd:Address>
        <rasd:ElementName>IDE 1</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceType>5</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:ElementName>IDE 0</rasd:ElementName>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:ResourceType>5</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>7</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>1</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 2</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk2</rasd:HostResource>
        <rasd:InstanceID>8</rasd:InstanceID>
        <rasd:Parent>4</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="backing.diskMode" vmw:value="independent_persistent"/>
      </Item>
      <Item ovf:required="false">
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>CD/DVD drive 1</rasd:ElementName>
        <rasd:InstanceID>9</rasd:InstanceID>
        <rasd:Parent>4</rasd:Parent>
        <rasd:ResourceSubType>vmware.cdrom.remotepassthrough</rasd:ResourceSubType>
        <rasd:ResourceType>15</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>00:50:56:AA:BB:CC</rasd:Address>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>10</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:ElementName>USB xHCI controller</rasd:ElementName>
        <rasd:InstanceID>11</rasd:InstanceID>
        <rasd:ResourceSubType>vmware.usb.xhci</rasd:ResourceSubType>
        <rasd:ResourceType>23</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>Video card</rasd:ElementName>
        <rasd:InstanceID>12</rasd:InstanceID>
        <rasd:ResourceType>24</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:ElementName>VMCI device</rasd:ElementName>
        <rasd:InstanceID>13</rasd:InstanceID>
        <rasd:ResourceSubType>vmware.vmci</rasd:ResourceSubType>
        <rasd:ResourceType>1</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:ElementName>Sound card</rasd:ElementName>
        <rasd:InstanceID>14</rasd:InstanceID>
        <rasd:ResourceSubType>vmware.soundcard.hdaudio</rasd:ResourceSubType>
        <rasd:ResourceType>1</rasd:ResourceType>
      </Item>
      <vmw:Config ovf:required="false" vmw:key="cpuHotAddEnabled" vmw:value="false"/>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
      <vmw:Config ovf:required="false" vmw:key="bootOptions.efiSecureBootEnabled" vmw:value="true"/>
      <vmw:ExtraConfig ovf:required="false" vmw:key="nvram" vmw:value="win10-file1.nvram"/>
      <vmw:ExtraConfig ovf:required="false" vmw:key="uuid.bios"
          vmw:value="42 1a 6b 3c 4d 5e 6f 70-81 92 a3 b4 c5 d6 e7 f8"/>
    </VirtualHardwareSection>
    <vmw:BootOrderSection vmw:instanceId="8" vmw:type="disk">
      <Info>Virtual hardware device boot order</Info>
    </vmw:BootOrderSection>
  </VirtualSystem>
</Envelope>
"""

WIN_SPEC = VMSpec(
    name="win10 efi", uuid="421a6b3c-4d5e-6f70-8192-a3b4c5d6e7f8", firmware="efi", secure_boot=True,
    sockets=2, cores=2, memory_mib=4096, guest_os="windows9_64Guest",
    disks=[DiskSpec("sata", 0, 1, "file2", DISK_SIZE, "ahci", "independent-persistent", boot=True),
           DiskSpec("scsi", 0, 0, "file1", DISK_SIZE, "lsisas1068")],
    nics=[NicSpec("vmxnet3", "00:50:56:aa:bb:cc", "VM Network")],
    cdroms=[CdromSpec("sata", 0, 0)],
    unmapped=["NVRAM file win10-file1.nvram (EFI variables): not carried over, OVMF starts afresh",
              "USB xHCI controller (ResourceType 23, vmware.usb.xhci)",
              "Sound card (ResourceType 1, vmware.soundcard.hdaudio)"],
)

OVF2 = """<?xml version="1.0" encoding="UTF-8"?>
<ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/2"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
    xmlns:epasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_EthernetPortAllocationSettingData"
    xmlns:sasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData"
    xmlns:vmw="http://www.vmware.com/schema/ovf">
  <ovf:References>
    <ovf:File ovf:href="{href1}" ovf:id="root" ovf:size="{size1}"/>
    <ovf:File ovf:href="{href2}" ovf:id="data" ovf:size="{size2}"/>
  </ovf:References>
  <ovf:DiskSection>
    <ovf:Info>Disks</ovf:Info>
    <ovf:Disk ovf:capacity="4" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="d1" ovf:fileRef="root"/>
    <ovf:Disk ovf:capacity="4194304" ovf:capacityAllocationUnits="byte" ovf:diskId="d2" ovf:fileRef="data"/>
    <ovf:Disk ovf:capacity="1" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="d3"/>
  </ovf:DiskSection>
  <ovf:DeploymentOptionSection>
    <ovf:Info>Sizes</ovf:Info>
    <ovf:Configuration ovf:id="small" ovf:default="true"><ovf:Label>Small</ovf:Label></ovf:Configuration>
    <ovf:Configuration ovf:id="large"><ovf:Label>Large</ovf:Label></ovf:Configuration>
  </ovf:DeploymentOptionSection>
  <ovf:VirtualSystem ovf:id="linux-bios">
    <ovf:Info>A Linux VM</ovf:Info>
    <ovf:OperatingSystemSection ovf:id="94" vmw:osType="ubuntu64Guest">
      <ovf:Info>Ubuntu</ovf:Info>
    </ovf:OperatingSystemSection>
    <ovf:VirtualHardwareSection>
      <ovf:Info>Hardware</ovf:Info>
      <ovf:System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>564d0a1b-2c3d-4e5f-6071-8293a4b5c6d7</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType>
      </ovf:System>
      <ovf:Item>
        <rasd:ElementName>2 virtual CPUs</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </ovf:Item>
      <ovf:Item ovf:configuration="small">
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:ElementName>2048 MiB</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>2048</rasd:VirtualQuantity>
      </ovf:Item>
      <ovf:Item ovf:configuration="large">
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:ElementName>16 GiB</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>16384</rasd:VirtualQuantity>
      </ovf:Item>
      <ovf:Item>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </ovf:Item>
      <ovf:Item>
        <rasd:ElementName>SCSI controller 1</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </ovf:Item>
      <ovf:Item>
        <rasd:ElementName>NVMe controller 0</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>vmware.nvme.controller</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </ovf:Item>
      <ovf:StorageItem>
        <sasd:AddressOnParent>0</sasd:AddressOnParent>
        <sasd:ElementName>Hard disk 1</sasd:ElementName>
        <sasd:HostResource>ovf:/disk/d1</sasd:HostResource>
        <sasd:InstanceID>6</sasd:InstanceID>
        <sasd:Parent>4</sasd:Parent>
        <sasd:ResourceType>17</sasd:ResourceType>
      </ovf:StorageItem>
      <ovf:StorageItem>
        <sasd:AddressOnParent>0</sasd:AddressOnParent>
        <sasd:ElementName>Hard disk 2</sasd:ElementName>
        <sasd:HostResource>ovf:/disk/d2</sasd:HostResource>
        <sasd:InstanceID>7</sasd:InstanceID>
        <sasd:Parent>5</sasd:Parent>
        <sasd:ResourceType>17</sasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="backing.sharing" vmw:value="sharingMultiWriter"/>
      </ovf:StorageItem>
      <ovf:StorageItem ovf:configuration="large">
        <sasd:AddressOnParent>1</sasd:AddressOnParent>
        <sasd:ElementName>Hard disk 3</sasd:ElementName>
        <sasd:HostResource>ovf:/disk/d3</sasd:HostResource>
        <sasd:InstanceID>8</sasd:InstanceID>
        <sasd:Parent>3</sasd:Parent>
        <sasd:ResourceType>17</sasd:ResourceType>
      </ovf:StorageItem>
      <ovf:EthernetPortItem>
        <epasd:Address>00-50-56-01-02-03</epasd:Address>
        <epasd:Connection>lan</epasd:Connection>
        <epasd:ElementName>Network adapter 1</epasd:ElementName>
        <epasd:InstanceID>9</epasd:InstanceID>
        <epasd:ResourceSubType>E1000e</epasd:ResourceSubType>
        <epasd:ResourceType>10</epasd:ResourceType>
      </ovf:EthernetPortItem>
      <ovf:EthernetPortItem>
        <epasd:Connection>dmz</epasd:Connection>
        <epasd:ElementName>Network adapter 2</epasd:ElementName>
        <epasd:InstanceID>10</epasd:InstanceID>
        <epasd:ResourceSubType>VmxNet3</epasd:ResourceSubType>
        <epasd:ResourceType>10</epasd:ResourceType>
      </ovf:EthernetPortItem>
      <ovf:Item ovf:required="false">
        <rasd:ElementName>Serial port 1</rasd:ElementName>
        <rasd:InstanceID>11</rasd:InstanceID>
        <rasd:ResourceType>21</rasd:ResourceType>
      </ovf:Item>
      <ovf:Item ovf:required="false">
        <rasd:ElementName>PCI device 0</rasd:ElementName>
        <rasd:InstanceID>12</rasd:InstanceID>
        <rasd:ResourceSubType>vmware.pcipassthrough.dvx</rasd:ResourceSubType>
        <rasd:ResourceType>1</rasd:ResourceType>
      </ovf:Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="bios"/>
    </ovf:VirtualHardwareSection>
  </ovf:VirtualSystem>
</ovf:Envelope>
"""

LINUX_SPEC = VMSpec(
    name="linux-bios", uuid="564d0a1b-2c3d-4e5f-6071-8293a4b5c6d7", sockets=2, cores=1, memory_mib=2048,
    guest_os="ubuntu64Guest",
    disks=[DiskSpec("scsi", 1, 0, "root", DISK_SIZE, "lsilogic"),
           DiskSpec("nvme", 0, 0, "data", DISK_SIZE, "nvme", shared=True)],
    nics=[NicSpec("e1000e", "00:50:56:01:02:03", "lan"), NicSpec("vmxnet3", None, "dmz")],
    passthrough=["PCI device 0 (ResourceType 1, vmware.pcipassthrough.dvx)"],
    unmapped=["Serial port 1 (ResourceType 21)",
              "disk 'd3' of the DiskSection is on no controller: not migrated"],
)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True)


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small raw disks (an MBR and random data; a second one with other data) and their
    streamOptimized VMDK and qcow2 forms, made by the real qemu-img."""
    folder = tmp_path_factory.mktemp("disks")
    out: dict[str, Path] = {}
    for number in (1, 2):
        rng = random.Random(number)
        data = bytearray(rng.randbytes(MiB))
        data[510:512] = b"\x55\xaa"
        raw = folder / f"disk{number}.raw"
        raw.write_bytes(bytes(data) + bytes(MiB) + rng.randbytes(MiB) + bytes(MiB))
        vmdk = folder / f"disk{number}.vmdk"
        _run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
             str(raw), str(vmdk))
        qcow2 = folder / f"disk{number}.qcow2"
        _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
        out[f"raw{number}"], out[f"vmdk{number}"], out[f"qcow2{number}"] = raw, vmdk, qcow2
    return out


def write_manifest(folder: Path, stem: str, names: list[str], algorithm: str = "sha256") -> Path:
    lines = [f"{algorithm.upper()}({name})= {hashlib.new(algorithm, (folder / name).read_bytes()).hexdigest()}"
             for name in names]
    path = folder / f"{stem}.mf"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_ovf(folder: Path, disks: dict[str, Path], *, version: int = 1, manifest: str | None = "sha256",
             fmt: str = "vmdk", hrefs: tuple[str, str] | None = None, text: str | None = None) -> Path:
    """A package folder: the envelope, two disks (``fmt``), an NVRAM file for OVF 1, a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = "win10" if version == 1 else "linux"
    names = hrefs or (f"{stem}-disk1.{fmt}", f"{stem}-disk2.{fmt}")
    for number, name in enumerate(names, 1):
        if "/" not in name:
            shutil.copyfile(disks[f"{fmt}{number}"], folder / name)
    template = text or (OVF1 if version == 1 else OVF2)
    sizes = [(folder / n).stat().st_size if (folder / n).exists() else 0 for n in names]
    ovf = folder / f"{stem}.ovf"
    ovf.write_text(template.format(href1=names[0], href2=names[1], size1=sizes[0], size2=sizes[1]))
    listed = [ovf.name, *[n for n in names if (folder / n).exists()]]
    if version == 1:
        (folder / "win10-file1.nvram").write_bytes(b"NVRAM!!\n")
        listed.append("win10-file1.nvram")
    if manifest:
        write_manifest(folder, stem, listed, manifest)
    return ovf


def make_ova(ova: Path, members: list[tuple[str, bytes | tarfile.TarInfo]]) -> Path:
    """An OVA written with tarfile, members in the order given (raw TarInfos for odd ones)."""
    with tarfile.open(ova, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            if isinstance(data, tarfile.TarInfo):
                tar.addfile(data)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    return ova


def ova_of(folder: Path, ova: Path) -> Path:
    """``folder``'s package as an OVA: the .ovf first, then the .mf, then the rest."""
    files = sorted(folder.iterdir(), key=lambda p: (p.suffix != ".ovf", p.suffix != ".mf", p.name))
    return make_ova(ova, [(p.name, p.read_bytes()) for p in files])


def same_bytes(raw: Path, given: DiskInput) -> None:
    proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", given.endpoint.fmt, str(raw),
                           given.endpoint.filename], capture_output=True, text=True, pass_fds=given.endpoint.fds)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert given.capacity == raw.stat().st_size


def test_units_and_manifest_lines() -> None:
    assert units("byte * 2^20", 1) == MiB
    assert units("byte*10^9", 1) == 10**9
    assert units("MegaBytes", 1) == MiB
    assert units(None, 7) == 7
    assert units("furlongs", 1) is None
    digest = "a" * 64
    parsed = parse_manifest(f"SHA256(x.vmdk)= {digest}\nSHA1(y.ovf)={'b' * 40}\n".encode(), "m.mf")
    assert [(d.algorithm, d.hexdigest) for d in parsed.values()] == [("sha256", digest), ("sha1", "b" * 40)]
    assert list(parsed) == ["x.vmdk", "y.ovf"]


def test_ovf1_spec_read_fully(tmp_path: Path, disks: dict[str, Path]) -> None:
    source = OvfSource(make_ovf(tmp_path / "pkg", disks, version=1))
    assert source.spec() == WIN_SPEC
    assert source.warnings == []
    assert source.spec().boot_disk() == WIN_SPEC.disks[0]
    assert source.spec().ostype == "win10"


def test_ovf2_spec_read_fully_with_sha1_manifest(tmp_path: Path, disks: dict[str, Path]) -> None:
    source = OvfSource(make_ovf(tmp_path / "pkg", disks, version=2, manifest="sha1"))
    assert source.spec() == LINUX_SPEC
    assert source.warnings == []


@pytest.mark.parametrize("version", [1, 2])
def test_ovf_disks_read_byte_identical(tmp_path: Path, disks: dict[str, Path], version: int) -> None:
    source = OvfSource(make_ovf(tmp_path / "pkg", disks, version=version))
    spec = source.spec()
    for disk in spec.disks:
        given = source.disk_input(disk, tmp_path / "work")
        assert given.flavor == "streamOptimized" and given.image is not None
        number = 1 if disk.source in ("file1", "root") else 2
        same_bytes(disks[f"raw{number}"], given)


def test_ova_members_read_in_place(tmp_path: Path, disks: dict[str, Path]) -> None:
    """The streamOptimized members are converted from their offset inside the .ova: nothing is
    extracted, and qemu-img reads exactly the raw disks through the window."""
    ova = ova_of(make_ovf(tmp_path / "pkg", disks, version=1).parent, tmp_path / "win10.ova")
    source = OvaSource(ova)
    assert source.spec() == WIN_SPEC
    assert source.warnings == []
    with tarfile.open(ova) as tar:
        offsets = {m.name: (m.offset_data, m.size) for m in tar}
    work = tmp_path / "work"
    for disk in source.spec().disks:
        given = source.disk_input(disk, work)
        spec = json.loads(given.endpoint.filename.removeprefix("json:"))
        href = "win10-disk1.vmdk" if disk.source == "file1" else "win10-disk2.vmdk"
        assert (spec["file"]["offset"], spec["file"]["size"]) == offsets[href]
        # the archive v2p checked, pinned open (a path swapped later is not read)
        assert spec["file"]["file"]["filename"] == f"/dev/fd/{given.endpoint.fds[0]}" and spec["backing"] is None
        assert os.path.samefile(spec["file"]["file"]["filename"], ova)
        assert given.endpoint.fmt == "vmdk" and given.flavor == "streamOptimized" and given.image is None
        same_bytes(disks["raw1" if disk.source == "file1" else "raw2"], given)
    assert not work.exists() or not any(work.rglob("*")), "an in-place member was staged"
    st = ova.stat()
    assert source.fingerprint() == [{"path": str(ova), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                     "device": st.st_dev, "inode": st.st_ino}]


def test_ova_qcow2_members_are_read_in_place_too(tmp_path: Path, disks: dict[str, Path]) -> None:
    ova = ova_of(make_ovf(tmp_path / "pkg", disks, version=2, fmt="qcow2").parent, tmp_path / "linux.ova")
    source = OvaSource(ova)
    work = tmp_path / "work"
    for disk in source.spec().disks:
        given = source.disk_input(disk, work)
        spec = json.loads(given.endpoint.filename.removeprefix("json:"))
        assert spec["driver"] == "qcow2" and spec["backing"] is None and spec["file"]["driver"] == "raw"
        assert given.flavor == "qcow2" and given.image is None
        same_bytes(disks["raw1" if disk.source == "root" else "raw2"], given)
    assert not work.exists(), "a member was copied out"


def test_no_manifest_is_a_warning(tmp_path: Path, disks: dict[str, Path]) -> None:
    source = OvfSource(make_ovf(tmp_path / "pkg", disks, version=2, manifest=None))
    assert source.spec() == LINUX_SPEC
    assert len(source.warnings) == 1 and "no manifest (linux.mf)" in source.warnings[0]


def test_fingerprint_names_the_descriptor_manifest_and_disks(tmp_path: Path, disks: dict[str, Path]) -> None:
    ovf = make_ovf(tmp_path / "pkg", disks, version=1)
    source = OvfSource(ovf)
    before = source.fingerprint()
    assert [Path(entry["path"]).name for entry in before] == ["win10.ovf", "win10.mf", "win10-disk2.vmdk",
                                                              "win10-disk1.vmdk"]
    disk = ovf.parent / "win10-disk1.vmdk"
    os.utime(disk, ns=(disk.stat().st_atime_ns, disk.stat().st_mtime_ns + 10**9))
    assert OvfSource(ovf).fingerprint() != before


# ---------------------------------------------------------------------------------------------
# refused, one line naming the file, nothing written outside the workdir

BOMB = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
""" + OVF1.split("\n", 1)[1].replace("<Name>win10 efi</Name>", "<Name>&lol9;</Name>")

EXTERNAL = """<?xml version="1.0"?>
<!DOCTYPE Envelope [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>
""" + OVF1.split("\n", 1)[1].replace("<Name>win10 efi</Name>", "<Name>&xxe;</Name>")


def _member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


def _ova_with(extra: tuple[str, tarfile.TarInfo | bytes]) -> Callable[[Path, dict[str, Path]], OvaSource]:
    def build(tmp: Path, disks: dict[str, Path]) -> OvaSource:
        folder = make_ovf(tmp / "pkg", disks, version=1).parent
        files = sorted(folder.iterdir(), key=lambda p: (p.suffix != ".ovf", p.suffix != ".mf", p.name))
        members: list[tuple[str, bytes | tarfile.TarInfo]] = [(p.name, p.read_bytes()) for p in files]
        return OvaSource(make_ova(tmp / "evil.ova", [*members, extra]))
    return build


def _ovf_mismatch(tmp: Path, disks: dict[str, Path]) -> OvfSource:
    ovf = make_ovf(tmp / "pkg", disks, version=1)
    disk = ovf.parent / "win10-disk1.vmdk"
    data = bytearray(disk.read_bytes())
    data[-600] ^= 0xFF  # same size: only the digest can tell
    disk.write_bytes(bytes(data))
    return OvfSource(ovf)


def _ova_mismatch(tmp: Path, disks: dict[str, Path]) -> OvaSource:
    folder = make_ovf(tmp / "pkg", disks, version=1).parent
    mf = folder / "win10.mf"
    mf.write_text(mf.read_text().replace(hashlib.sha256((folder / "win10-disk2.vmdk").read_bytes()).hexdigest(),
                                         "0" * 64))
    return OvaSource(ova_of(folder, tmp / "win10.ova"))


def _ova_staged_mismatch(tmp: Path, disks: dict[str, Path]) -> OvaSource:
    """A qcow2 member is copied out while its digest is taken: a mismatch leaves no copy behind."""
    folder = make_ovf(tmp / "pkg", disks, version=2, fmt="qcow2", manifest="sha512").parent
    mf = folder / "linux.mf"
    digest = hashlib.sha512((folder / "linux-disk1.qcow2").read_bytes()).hexdigest()
    mf.write_text(mf.read_text().replace(digest, "f" * 128))
    return OvaSource(ova_of(folder, tmp / "linux.ova"))


def _ovf_text(text: str) -> Callable[[Path, dict[str, Path]], OvfSource]:
    def build(tmp: Path, disks: dict[str, Path]) -> OvfSource:
        return OvfSource(make_ovf(tmp / "pkg", disks, version=1, text=text, manifest=None))
    return build


def _ovf_missing_disk(manifest: str | None) -> Callable[[Path, dict[str, Path]], OvfSource]:
    def build(tmp: Path, disks: dict[str, Path]) -> OvfSource:
        ovf = make_ovf(tmp / "pkg", disks, version=1, manifest=manifest)
        (ovf.parent / "win10-disk2.vmdk").unlink()
        return OvfSource(ovf)
    return build


def _ova_missing_disk(tmp: Path, disks: dict[str, Path]) -> OvaSource:
    folder = make_ovf(tmp / "pkg", disks, version=1, manifest=None).parent
    (folder / "win10-disk2.vmdk").unlink()
    return OvaSource(ova_of(folder, tmp / "win10.ova"))


def _ovf_href(href: str) -> Callable[[Path, dict[str, Path]], OvfSource]:
    def build(tmp: Path, disks: dict[str, Path]) -> OvfSource:
        shutil.copyfile(disks["vmdk2"], tmp / "outside.vmdk")
        return OvfSource(make_ovf(tmp / "pkg", disks, version=1, manifest=None,
                                  hrefs=("win10-disk1.vmdk", href)))
    return build


def _ovf_link_out(tmp: Path, disks: dict[str, Path]) -> OvfSource:
    ovf = make_ovf(tmp / "pkg", disks, version=1, manifest=None)
    shutil.copyfile(disks["vmdk2"], tmp / "outside.vmdk")
    (ovf.parent / "win10-disk2.vmdk").unlink()
    (ovf.parent / "win10-disk2.vmdk").symlink_to(tmp / "outside.vmdk")
    return OvfSource(ovf)


def _ova_bad_header(tmp: Path, disks: dict[str, Path]) -> OvaSource:
    """A KDMV member whose header claims a capacity its grain directory cannot hold: the
    header is checked in place, inside the tar."""
    folder = make_ovf(tmp / "pkg", disks, version=1, manifest=None).parent
    disk = folder / "win10-disk2.vmdk"
    data = bytearray(disk.read_bytes())
    data[12:20] = (1 << 36).to_bytes(8, "little")  # capacity in sectors: 32 TiB
    disk.write_bytes(bytes(data))
    return OvaSource(ova_of(folder, tmp / "win10.ova"))


def _ova_descriptor_member(tmp: Path, disks: dict[str, Path]) -> OvaSource:
    folder = make_ovf(tmp / "pkg", disks, version=1, manifest=None).parent
    text = '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n' \
           'RW 8192 FLAT "/etc/shadow" 0\n'
    (folder / "win10-disk2.vmdk").write_text(text)
    ovf = folder / "win10.ovf"
    ovf.write_text(ovf.read_text().replace('ovf:size="', 'ovf:size-ignored="'))
    return OvaSource(ova_of(folder, tmp / "win10.ova"))


REFUSED: dict[str, tuple[Callable[[Path, dict[str, Path]], OvfSource | OvaSource], str, str]] = {
    "ovf manifest mismatch": (_ovf_mismatch, "pkg/win10-disk1.vmdk", "SHA256 does not match the manifest"),
    "ova manifest mismatch": (_ova_mismatch, "win10.ova: member win10-disk2.vmdk",
                              "SHA256 does not match the manifest"),
    "staged member mismatch": (_ova_staged_mismatch, "linux.ova: member linux-disk1.qcow2",
                               "SHA512 does not match the manifest"),
    "billion laughs": (_ovf_text(BOMB), "pkg/win10.ovf", "DTD"),
    "external entity": (_ovf_text(EXTERNAL), "pkg/win10.ovf", "DTD"),
    "member ../": (_ova_with(("../escape.vmdk", b"x" * 512)), "evil.ova", "'../escape.vmdk' leaves"),
    "absolute member": (_ova_with(("/tmp/abs.vmdk", _member("/tmp/abs.vmdk", tarfile.REGTYPE))), "evil.ova",
                        "'/tmp/abs.vmdk' has an absolute name"),
    "symlink member": (_ova_with(("link.vmdk", _member("link.vmdk", tarfile.SYMTYPE, "/etc/passwd"))),
                       "evil.ova", "'link.vmdk' is a symbolic link to '/etc/passwd'"),
    "hardlink member": (_ova_with(("hard.vmdk", _member("hard.vmdk", tarfile.LNKTYPE, "win10.ovf"))),
                        "evil.ova", "'hard.vmdk' is a hard link"),
    "device member": (_ova_with(("null", _member("null", tarfile.CHRTYPE))), "evil.ova", "'null' is a device"),
    "fifo member": (_ova_with(("pipe", _member("pipe", tarfile.FIFOTYPE))), "evil.ova", "'pipe' is a FIFO"),
    "duplicate member": (_ova_with(("win10.mf", b"")), "evil.ova", "'win10.mf' appears twice"),
    "missing disk": (_ovf_missing_disk(None), "pkg/win10-disk2.vmdk", "the disk file is missing"),
    "missing listed file": (_ovf_missing_disk("sha256"), "pkg/win10.mf", "lists win10-disk2.vmdk, which is missing"),
    "missing member": (_ova_missing_disk, "win10.ova: member win10-disk2.vmdk", "the disk file is missing"),
    "href ../": (_ovf_href("../outside.vmdk"), "pkg/win10.ovf", "'../outside.vmdk' leaves the package folder"),
    "href absolute": (_ovf_href("/etc/passwd"), "pkg/win10.ovf", "'/etc/passwd' is an absolute path"),
    "href url": (_ovf_href("https://example.com/x.vmdk"), "pkg/win10.ovf", "is a URL"),
    "href link out": (_ovf_link_out, "pkg/win10.ovf", "is a link leading out"),
    "member header": (_ova_bad_header, "win10.ova: member win10-disk2.vmdk", "grain directory"),
    "descriptor member": (_ova_descriptor_member, "win10.ova: member win10-disk2.vmdk", "text descriptor"),
}


def _tree(folder: Path, skip: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")
            if skip not in p.parents and p != skip}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_in_one_line_naming_the_file(tmp_path: Path, disks: dict[str, Path], case: str) -> None:
    build, where, reason = REFUSED[case]
    source = build(tmp_path, disks)
    work = tmp_path / "work"
    before = _tree(tmp_path, work)
    with pytest.raises(SourceError) as caught:
        for disk in source.spec().disks:
            source.disk_input(disk, work)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message
    assert where in message, message
    assert reason in message, message
    assert _tree(tmp_path, work) == before, "something was written outside the workdir"
    assert not work.exists() or not [p for p in work.rglob("*") if p.is_file()], "a refused disk was staged"


def test_envelope_without_files_parses_alone() -> None:
    """The parser needs no files: it reads bytes (inspect shows a spec before anything is opened)."""
    envelope = parse_envelope(OVF2.format(href1="a.vmdk", href2="b.vmdk", size1=1, size2=2).encode(), "x.ovf")
    assert [f.href for f in envelope.files.values()] == ["a.vmdk", "b.vmdk"]
    assert envelope.spec == LINUX_SPEC


# ---------------------------------------------------------------------------------------------
# an OVA written by VMware's own open-vmdk tools (ova-compose + vmdk-convert; see the .yaml)

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture_raw() -> bytes:
    data = bytearray(2 * MiB)
    head, tail = b"v2p ova-compose fixture: sector 0", b"v2p ova-compose fixture: last MiB"
    data[:len(head)] = head
    data[510:512] = b"\x55\xaa"
    data[MiB:MiB + len(tail)] = tail
    return bytes(data)


def test_ova_from_vmware_ova_compose(tmp_path: Path) -> None:
    ova = tmp_path / "v2p-fixture.ova"
    shutil.copyfile(FIXTURES / "v2p-fixture.ova", ova)
    source = OvaSource(ova)
    assert source.spec() == VMSpec(
        name="v2p-fixture", firmware="efi", secure_boot=True, sockets=4, cores=1, memory_mib=1024,
        guest_os="ubuntu64Guest", disks=[DiskSpec("nvme", 0, 0, "file0", 2 * MiB, "nvme")],
        nics=[NicSpec("vmxnet3", None, "VM Network")], cdroms=[CdromSpec("sata", 0, 0)])
    assert source.warnings == []
    raw = tmp_path / "fixture.img"
    raw.write_bytes(fixture_raw())
    given = source.disk_input(source.spec().disks[0], tmp_path / "work")
    assert given.endpoint.filename.startswith("json:") and given.flavor == "streamOptimized"
    same_bytes(raw, given)


def test_ova_with_the_ovf_not_first_is_read_with_a_warning(tmp_path: Path, disks: dict[str, Path]) -> None:
    folder = make_ovf(tmp_path / "pkg", disks, version=2)
    files = sorted(folder.parent.iterdir(), key=lambda p: (p.suffix == ".ovf", p.name))
    source = OvaSource(make_ova(tmp_path / "linux.ova", [(p.name, p.read_bytes()) for p in files]))
    assert source.spec() == LINUX_SPEC
    assert len(source.warnings) == 1 and "not the first member" in source.warnings[0]
