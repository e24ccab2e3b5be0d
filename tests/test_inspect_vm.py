"""``v2p inspect`` of whole VMs (.vmx, VM folder, .ovf, .ova): the hardware, the PVE config migrate
would create, each disk, the preflight rules' findings and a verdict, as text and as JSON; what
it refuses it refuses in migrate's words."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_source_ovf import FIXTURES, make_ovf
from test_whole_vm import make_vm

from conftest import V2P, one_line_error
from v2p import api
from v2p.errors import RuleError, SourceError
from v2p.pveconfig import pve_size

MiB = 1 << 20
WEB01_MAPPED = ("--network", "LAN=vmbr0", "--network", "DMZ=vmbr1")


def block(stdout: str, first: str) -> list[str]:
    """The lines of one indented block: ``first`` and the deeper lines under it."""
    lines = stdout.splitlines()
    start = lines.index(first)
    depth = len(first) - len(first.lstrip())
    out = [first]
    for line in lines[start + 1:]:
        if len(line) - len(line.lstrip()) <= depth:
            break
        out.append(line)
    return out


def web01_config(vmid: int, esxi_size: str, bridge1: str = "vmbr1") -> list[str]:
    return [
        f"  config:    VMID {vmid} (volumes on <storage> once migrated)",
        "    name: web-01",
        "    sockets: 2",
        "    cores: 2",
        "    memory: 768",
        "    ostype: l26",
        "    bios: seabios",
        "    scsihw: virtio-scsi-pci",
        "    smbios1: uuid=421a0b2c-3d4e-5f60-7182-93a4b5c6d7e8",
        "    net0: virtio=00:50:56:AA:BB:CC,bridge=vmbr0",
        f"    net1: virtio=00:0C:29:12:34:60,bridge={bridge1}",
        "    description: imported from web 01 (v2p migration <id>)",
        f"    scsi0: <storage>:vm-{vmid}-disk-0,size={esxi_size}",
        f"    scsi1: <storage>:vm-{vmid}-disk-1,size=8M",
        f"    scsi2: <storage>:vm-{vmid}-disk-2,size=8M",
        "    boot: order=scsi0",
    ]


def test_vmx_shows_hardware_config_disks_and_findings(tmp_path, samples, v2p: V2P):
    vmx, _raws = make_vm(tmp_path / "web01", samples)
    esxi = (samples / "guest.raw").stat().st_size
    proc = v2p("inspect", str(vmx), "--vmid", "120", *WEB01_MAPPED)
    assert proc.returncode == 0 and proc.stderr == "", proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:6] == [
        str(vmx),
        "  vm:        web 01 (vmx)",
        "  firmware:  bios",
        "  cpu:       2 socket(s) x 2 core(s)",
        "  memory:    768 MiB",
        "  guest os:  debian11-64 -> l26",
    ]
    disks = [line for line in lines if line.startswith("  disk:")]
    assert disks == [
        f"  disk:      scsi0:0 esxi.vmdk (boot), pvscsi, persistent, {esxi} bytes ({esxi / MiB:.1f} MiB), vmfs "
        "-> scsi0: ok",
        f"  disk:      scsi0:1 data.vmdk, pvscsi, persistent, {8 * MiB} bytes (8.0 MiB), monolithicSparse "
        "-> scsi1: warning",
        f"  disk:      scsi0:2 logs.vmdk, pvscsi, persistent, {8 * MiB} bytes (8.0 MiB), monolithicSparse "
        "-> scsi2: warning",
    ]
    # a data disk's own inspection warning is shown under it
    assert block(proc.stdout, disks[1])[1].startswith("    warning: data.vmdk: no MBR or GPT boot signature")
    assert [line for line in lines if line.startswith("  nic:")] == [
        "  nic:       net0 vmxnet3, MAC 00:50:56:AA:BB:CC, network 'LAN'",
        "  nic:       net1 e1000, MAC 00:0C:29:12:34:60, network 'DMZ'",
    ]
    assert block(proc.stdout, "  config:    VMID 120 (volumes on <storage> once migrated)") == \
        web01_config(120, pve_size(esxi))
    assert [line for line in lines if line.startswith("  rule:")] == [
        "  rule:      info: vm-name: VM name 'web 01' is not a DNS name: cleaned to 'web-01'"]
    assert lines[-1] == "  verdict:   warning"  # the data disks have no boot signature


def test_vmx_json_is_one_object_per_vm(tmp_path, samples, v2p: V2P):
    vmx, _raws = make_vm(tmp_path / "web01", samples)
    esxi = (samples / "guest.raw").stat().st_size
    proc = v2p("inspect", "--json", str(vmx), "--network", "LAN=vmbr0", "--bridge", "vmbr9")
    assert proc.returncode == 0, proc.stderr
    (vm,) = json.loads(proc.stdout)
    assert {key: vm[key] for key in ("path", "kind", "vmid", "ostype", "verdict", "warnings")} == {
        "path": str(vmx), "kind": "vmx", "vmid": 100, "ostype": "l26", "verdict": "warning", "warnings": []}
    assert "reason" not in vm
    spec = vm["spec"]
    assert (spec["name"], spec["sockets"], spec["cores"], spec["memory_mib"], spec["guest_os"]) == \
        ("web 01", 2, 2, 768, "debian11-64")
    assert [(d["controller"], d["bus"], d["unit"], d["source"], d["boot"]) for d in spec["disks"]] == [
        ("scsi", 0, 0, "esxi.vmdk", True), ("scsi", 0, 1, "data.vmdk", False), ("scsi", 0, 2, "logs.vmdk", False)]
    assert vm["config"] == {
        "name": "web-01", "sockets": "2", "cores": "2", "memory": "768", "ostype": "l26", "bios": "seabios",
        "scsihw": "virtio-scsi-pci", "smbios1": "uuid=421a0b2c-3d4e-5f60-7182-93a4b5c6d7e8",
        "net0": "virtio=00:50:56:AA:BB:CC,bridge=vmbr0", "net1": "virtio=00:0C:29:12:34:60,bridge=vmbr9",
        "description": "imported from web 01 (v2p migration <id>)",
        "scsi0": f"<storage>:vm-100-disk-0,size={pve_size(esxi)}", "scsi1": "<storage>:vm-100-disk-1,size=8M",
        "scsi2": "<storage>:vm-100-disk-2,size=8M", "boot": "order=scsi0"}
    # each disk is today's disk row (the same keys `v2p inspect DISK --json` gives), with its place in the VM
    disk_row = json.loads(v2p("inspect", "--json", str(vmx.parent / "data.vmdk")).stdout)[0]
    assert [(d["label"], d["key"], d["source"], d["flavor"], d["capacity"], d["verdict"]) for d in vm["disks"]] == [
        ("scsi0:0", "scsi0", "esxi.vmdk", "vmfs", esxi, "ok"),
        ("scsi0:1", "scsi1", "data.vmdk", "monolithicSparse", 8 * MiB, "warning"),
        ("scsi0:2", "scsi2", "logs.vmdk", "monolithicSparse", 8 * MiB, "warning")]
    assert {k: v for k, v in vm["disks"][1].items() if k not in ("label", "key", "source")} == disk_row
    assert vm["findings"] == [
        {"id": "unmapped-network", "severity": "info", "ignored": False,
         "message": "net1 (network 'DMZ') has no --network mapping: it goes to the default bridge vmbr9"},
        {"id": "vm-name", "severity": "info", "ignored": False,
         "message": "VM name 'web 01' is not a DNS name: cleaned to 'web-01'"}]


def test_unmapped_network_is_refused_as_migrate_refuses_it(tmp_path, samples, v2p: V2P):
    vmx, _raws = make_vm(tmp_path / "web01", samples)
    proc = v2p("inspect", str(vmx), "--network", "LAN=vmbr0")
    line = one_line_error(proc)
    assert proc.returncode == RuleError.exit_code
    # the same words migrate stops with, before it makes anything
    assert line == one_line_error(v2p("migrate", str(vmx), "--vmid", "120", "--network", "LAN=vmbr0"))
    assert "unmapped-network" in line and "DMZ" in line
    assert "    net1: virtio=00:0C:29:12:34:60,bridge=<unmapped>" in proc.stdout.splitlines()
    assert "  rule:      error: unmapped-network: net1 is on network 'DMZ', which has no bridge " \
           "(hint: add --network 'DMZ=BRIDGE')" in proc.stdout.splitlines()
    assert proc.stdout.splitlines()[-1] == f"  verdict:   refused: {line.removeprefix('v2p: error: ')}"


def test_inspect_config_is_the_config_migrate_creates(tmp_path, samples, v2p: V2P):
    vmx, _raws = make_vm(tmp_path / "web01", samples)
    (vm,) = json.loads(v2p("inspect", "--json", str(vmx), "--vmid", "123", *WEB01_MAPPED).stdout)
    proc = v2p("migrate", str(vmx), "--vmid", "123", *WEB01_MAPPED, "--no-boot-check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    made = {key: re.sub(r"^local:123/(vm-123-disk-\d+)\.qcow2", r"<storage>:\1", value)
            for key, value in v2p.config(123).items()}
    made["description"] = re.sub(r"v2p migration \w+", "v2p migration <id>", made["description"])
    assert {key: made.get(key) for key in vm["config"]} == vm["config"]
    recorded = v2p.state(123)["stages"]["preflight"]["result"]["findings"]
    assert recorded == vm["findings"]


def test_encrypted_vmx_is_refused_naming_the_rule(tmp_path, samples, v2p: V2P):
    vmx, _raws = make_vm(tmp_path / "web01", samples)
    # VM Encryption as a hosted product leaves it: a key safe in the .vmx, and the disk's descriptor
    # naming the crypto filter (vSphere's mark)
    vmx.write_text(vmx.read_text() + 'encryption.keySafe = "vmware:key/list/(pair/(null/vmware:key/fqid/x))"\n'
                   'encryption.data = "AAAA"\n')
    descriptor = vmx.parent / "esxi.vmdk"
    descriptor.write_text(descriptor.read_text() + 'ddb.iofilters = "vmwarevmcrypt"\n')
    proc = v2p("inspect", str(vmx), *WEB01_MAPPED)
    line = one_line_error(proc)
    assert line.startswith("v2p: error: VM web 01: encrypted-vm: "), line
    assert proc.returncode == RuleError.exit_code
    lines = proc.stdout.splitlines()
    assert [line for line in lines if line.startswith("  rule:      error:")] == [
        f"  rule:      error: {line.removeprefix('v2p: error: VM web 01: ').split(' (hint:')[0]}"]
    assert lines[-1] == f"  verdict:   refused: {line.removeprefix('v2p: error: ')}"
    (vm,) = json.loads(v2p("inspect", "--json", str(vmx), *WEB01_MAPPED).stdout)
    assert vm["verdict"] == "refused" and vm["reason"] == line.removeprefix("v2p: error: ")
    assert vm["spec"]["encrypted"] is True and vm["findings"][0]["id"] == "encrypted-vm"


def test_a_folder_with_one_vmx_is_inspected_as_that_vm(tmp_path, samples, v2p: V2P):
    vmx, _raws = make_vm(tmp_path / "web01", samples)
    proc = v2p("inspect", str(vmx.parent), *WEB01_MAPPED)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == [str(vmx), "  vm:        web 01 (vmx)"]
    assert len([line for line in lines if line.startswith("  disk:")]) == 3
    # a disk beside it, in the same call, is still a disk row
    (vm, disk) = json.loads(v2p("inspect", "--json", str(vmx.parent), str(vmx.parent / "data.vmdk"),
                                *WEB01_MAPPED).stdout)
    assert vm["kind"] == "vmx" and vm["path"] == str(vmx)
    assert "spec" in vm and "spec" not in disk and disk["flavor"] == "monolithicSparse"


def test_ova_from_vmware_tools(tmp_path, v2p: V2P):
    ova = tmp_path / "appliance.ova"
    shutil.copyfile(FIXTURES / "v2p-fixture.ova", ova)
    proc = v2p("inspect", str(ova), "--bridge", "vmbr0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:9] == [
        str(ova),
        "  vm:        v2p-fixture (ova)",
        "  firmware:  efi, secure boot",
        "  cpu:       4 socket(s) x 1 core(s)",
        "  memory:    1024 MiB",
        "  guest os:  ubuntu64Guest -> l26",
        "  disk:      nvme0:0 file0 (boot), nvme, persistent, 2097152 bytes (2.0 MiB), streamOptimized -> scsi0: ok",
        "    note:    fixture.vmdk is read in place from appliance.ova (offset 9728, 14848 bytes); nothing is "
        "extracted",
        "  nic:       net0 vmxnet3, MAC (none), network 'VM Network'",
    ]
    assert "  cdrom:     sata0:0" in lines
    config = block(proc.stdout, "  config:    VMID 100 (volumes on <storage> once migrated)")
    assert config[6:] == [
        "    bios: ovmf",
        "    scsihw: virtio-scsi-pci",
        "    machine: q35",
        "    ide2: none,media=cdrom",
        "    net0: virtio=BC:24:11:<random>,bridge=vmbr0",
        "    description: imported from v2p-fixture (v2p migration <id>)",
        "    efidisk0: <storage>:1,efitype=4m,pre-enrolled-keys=1",
        "    scsi0: <storage>:vm-100-disk-0,size=2M",
        "    boot: order=scsi0",
    ]
    assert [line for line in lines if line.startswith("  rule:")] == [
        "  rule:      info: unmapped-network: net0 (network 'VM Network') has no --network mapping: it goes to the "
        "default bridge vmbr0",
        "  rule:      warning: nvme-controller: disk nvme0:0 is on an NVMe controller: attached as scsi0",
        # VMware's tools made an EFI VM of a disk with only an MBR and its boot code (issue 17)
        "  rule:      warning: firmware-mismatch: the source says EFI, but boot disk nvme0:0 (file0): MBR, boot "
        "code: OVMF will most likely find no boot loader on it; kept (--bios seabios to change)",
        "  rule:      info: secure-boot: EFI secure boot: kept on, with pre-enrolled keys",
        "  rule:      info: generated-mac: net0 has no usable MAC: it gets a new one",
    ]
    assert lines[-1] == "  verdict:   warning"
    (vm,) = json.loads(v2p("inspect", "--json", str(ova), "--bridge", "vmbr0").stdout)
    assert vm["kind"] == "ova" and vm["verdict"] == "warning" and vm["config"]["bios"] == "ovmf"
    assert vm["disks"] == [{"label": "nvme0:0", "key": "scsi0", "source": "file0", "path": "file0",
                            "flavor": "streamOptimized", "capacity": 2 * MiB, "verdict": "ok", "warnings": [],
                            "notes": [lines[7].removeprefix("    note:    ")]}]


@pytest.fixture(scope="module")
def ovf_disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two 4 MiB streamOptimized disks (an MBR on each) for make_ovf, made by the real qemu-img."""
    folder = tmp_path_factory.mktemp("ovf-disks")
    out = {}
    for number in (1, 2):
        raw = folder / f"disk{number}.raw"
        raw.write_bytes(bytes(510) + b"\x55\xaa" + bytes([number]) * MiB + bytes(3 * MiB - 512))
        out[f"vmdk{number}"] = folder / f"disk{number}.vmdk"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                        str(raw), str(out[f"vmdk{number}"])], check=True)
    return out


def test_ovf_with_a_shared_disk_is_refused_unless_the_rule_is_ignored(tmp_path, ovf_disks, v2p: V2P):
    ovf = make_ovf(tmp_path / "pkg", ovf_disks, version=2)
    proc = v2p("inspect", str(ovf), "--bridge", "vmbr0")
    line = one_line_error(proc)
    assert "shared-disk" in line and "--ignore-rule shared-disk" in line, line
    lines = proc.stdout.splitlines()
    assert [line for line in lines if line.startswith("  disk:")] == [
        "  disk:      scsi1:0 root (boot), lsilogic, persistent, 4194304 bytes (4.0 MiB), streamOptimized "
        "-> scsi0: ok",
        "  disk:      nvme0:0 data, nvme, persistent, 4194304 bytes (4.0 MiB), streamOptimized -> scsi1: ok"]
    assert "  passthru:  PCI device 0 (ResourceType 1, vmware.pcipassthrough.dvx)" in lines
    assert "  unmapped:  Serial port 1 (ResourceType 21)" in lines
    again = v2p("inspect", str(ovf), "--bridge", "vmbr0", "--ignore-rule", "shared-disk")
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert "  rule:      warning: shared-disk: disk nvme0:0 (data) is shared (multi-writer): shut down every VM " \
           "that uses it before migrating (ignored)" in again.stdout.splitlines()
    assert again.stdout.splitlines()[-1] == "  verdict:   warning"
    # a rule that cannot be ignored is a usage error, as for migrate
    bad = one_line_error(v2p("inspect", str(ovf), "--ignore-rule", "encrypted-vm"))
    assert "--ignore-rule encrypted-vm: this rule cannot be ignored" in bad


def test_a_broken_vmx_is_one_refused_row(tmp_path, v2p: V2P):
    folder = tmp_path / "vm"
    folder.mkdir()
    vmx = folder / "vm.vmx"
    vmx.write_text('.encoding = "UTF-8"\nnumvcpus = "3"\ncpuid.coresPerSocket = "2"\n')
    proc = v2p("inspect", str(folder))
    line = one_line_error(proc)
    assert "numvcpus 3 is not a multiple of cpuid.coresPerSocket 2" in line, line
    assert proc.stdout.splitlines() == [str(vmx), f"  verdict:   refused: {line.removeprefix('v2p: error: ')}"]
    report = api.inspect_vm(vmx)
    assert report.spec is None and report.verdict == "refused" and isinstance(report.error, SourceError)


def test_library_inspect_vm(tmp_path, samples):
    vmx, _raws = make_vm(tmp_path / "web01", samples)
    report = api.inspect_vm(vmx, vmid=130, networks={"LAN": "vmbr0", "DMZ": "vmbr1"})
    assert isinstance(report, api.VMReport) and report.error is None and report.verdict == "warning"
    assert report.spec is not None and report.spec.name == "web 01"
    assert [(disk.spec.label, disk.key) for disk in report.disks] == [
        ("scsi0:0", "scsi0"), ("scsi0:1", "scsi1"), ("scsi0:2", "scsi2")]
    assert report.config["scsi2"] == "<storage>:vm-130-disk-2,size=8M"
    with pytest.raises(SourceError, match="is not a VM"):
        api.inspect_vm(vmx.parent / "data.vmdk")
