"""The vSphere source against VMware's own vCenter simulator (tests/vcsim): ``v2p vsphere ls``, a VM's
hardware read into the same VMSpec a .vmx gives, the TLS pin and the login refused in one line, and the
password in no argv, output or file v2p writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from vcsim.fixture import Vcsim, si_fixture, vcsim_fixture, wait  # noqa: F401

from conftest import cmdlines
from v2p.sources import open_source
from v2p.sources.vsphere import VsphereSource

MAC = "00:50:56:3f:12:34"
UUID = "4213a1b2-c3d4-e5f6-0718-293a4b5c6d7e"


def uri(sim: Vcsim, path: str = "", *, fingerprint: str | None = None) -> str:
    return f"vsphere://{sim.user}@{sim.address}{path}?fingerprint={fingerprint or sim.fingerprint}"


def create_vm(si: Any, name: str) -> None:
    """EFI with secure boot, 4 vCPUs in 2 sockets, PVSCSI + LSI SAS, 3 disks (two thin on the PVSCSI,
    one thick on the LSI SAS), a VMXNET3 with a manual MAC on a distributed port group."""
    from pyVmomi import vim

    content = si.RetrieveContent()
    datacenter = content.rootFolder.childEntity[0]
    cluster = next(e for e in datacenter.hostFolder.childEntity if isinstance(e, vim.ClusterComputeResource))
    portgroup = next(n for n in datacenter.network if n.name == "DC0_DVPG0")  # a distributed port group
    device = vim.vm.device
    add = device.VirtualDeviceSpec.Operation.add
    create = device.VirtualDeviceSpec.FileOperation.create
    controllers = (device.ParaVirtualSCSIController(key=-101, busNumber=0, sharedBus="noSharing"),
                   device.VirtualLsiLogicSASController(key=-102, busNumber=1, sharedBus="noSharing"))
    changes = [device.VirtualDeviceSpec(operation=add, device=controller) for controller in controllers]
    for key, (controller, unit, mib, thin) in enumerate(((-101, 0, 64, True), (-101, 1, 32, True),
                                                         (-102, 0, 16, False)), start=-201):
        backing = device.VirtualDisk.FlatVer2BackingInfo(fileName="[LocalDS_0]", diskMode="persistent",
                                                         thinProvisioned=thin)
        disk = device.VirtualDisk(key=key, controllerKey=controller, unitNumber=unit, capacityInKB=mib * 1024,
                                  backing=backing)
        changes.append(device.VirtualDeviceSpec(operation=add, fileOperation=create, device=disk))
    port = vim.dvs.PortConnection(portgroupKey=portgroup.key,
                                  switchUuid=portgroup.config.distributedVirtualSwitch.uuid)
    nic = device.VirtualVmxnet3(key=-301, addressType="manual", macAddress=MAC,
                                backing=device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(port=port))
    changes.append(device.VirtualDeviceSpec(operation=add, device=nic))
    config = vim.vm.ConfigSpec(name=name, guestId="ubuntu64Guest", numCPUs=4, numCoresPerSocket=2, memoryMB=2048,
                               firmware="efi", uuid=UUID, bootOptions=vim.vm.BootOptions(efiSecureBootEnabled=True),
                               files=vim.vm.FileInfo(vmPathName="[LocalDS_0]"), deviceChange=changes)
    wait(datacenter.vmFolder.CreateVM_Task(config=config, pool=cluster.resourcePool))


def test_ls_lists_the_default_model(vcsim: Vcsim, inproc: Any) -> None:
    env = {"V2P_VSPHERE_PASSWORD": vcsim.password}
    shown = inproc.bare("vsphere", "ls", uri(vcsim), **env)
    assert shown.returncode == 0, shown.stderr
    assert "datacenter /DC0" in shown.stdout and "folder     /DC0/vm" in shown.stdout
    for vm in ("DC0_H0_VM0", "DC0_H0_VM1", "DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1"):
        assert f"/DC0/vm/{vm} " in shown.stdout
        assert f"thin [LocalDS_0] {vm}/disk1.vmdk" in shown.stdout

    listed = inproc.bare("vsphere", "ls", uri(vcsim, "/DC0/vm"), "--json", **env)
    assert listed.returncode == 0, listed.stderr
    found = json.loads(listed.stdout)
    assert [vm["name"] for vm in found["vms"]] == ["DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1", "DC0_H0_VM0", "DC0_H0_VM1"]
    vm = found["vms"][2]
    assert vm["path"] == "/DC0/vm/DC0_H0_VM0" and vm["power"] == "poweredOn" and vm["guest_id"] == "otherGuest"
    assert vm["cpus"] == 1 and vm["memory_mib"] == 32 and vm["snapshots"] == 0
    assert vm["tools"] == "guestToolsNotRunning" and vm["ips"] == []
    assert vm["disks"] == [{"label": "disk-202-0", "capacity": 1 << 20, "thin": True, "flavor": "vmfsThin",
                            "file": "[LocalDS_0] DC0_H0_VM0/disk1.vmdk", "chain": 1}]
    # Each VM's uri is what migrate takes: the same endpoint, user and pin.
    assert isinstance(open_source(vm["uri"]), VsphereSource)
    assert vm["uri"].endswith(f"/DC0/vm/DC0_H0_VM0?fingerprint={vcsim.fingerprint}")
    assert found["datacenters"] == [] and found["folders"] == [{"name": "vm", "path": "/DC0/vm"}]


def test_hardware_of_a_created_vm_is_the_vmx_spec(vcsim: Vcsim, si: Any, inproc: Any, tmp_path: Path) -> None:
    create_vm(si, "web01")
    assert isinstance(open_source(uri(vcsim, "/DC0/vm/web01")), VsphereSource)
    source = VsphereSource(uri(vcsim, "/DC0/vm/web01"), {"V2P_VSPHERE_PASSWORD": vcsim.password})
    with source.opened():
        spec = source.spec()
        facts = [source.disk_facts(disk, tmp_path) for disk in spec.disks]
    assert (spec.name, spec.firmware, spec.secure_boot) == ("web01", "efi", True)
    assert (spec.sockets, spec.cores, spec.memory_mib) == (2, 2, 2048)
    assert (spec.guest_os, spec.ostype, spec.uuid) == ("ubuntu64Guest", "l26", UUID)
    assert [(d.label, d.controller_model, d.capacity, d.boot) for d in spec.disks] == [
        ("scsi0:0", "pvscsi", 64 << 20, True), ("scsi0:1", "pvscsi", 32 << 20, False),
        ("scsi1:0", "lsisas1068", 16 << 20, False)]
    assert all(d.source.startswith("[LocalDS_0] web01/") and d.source.endswith(".vmdk") for d in spec.disks)
    assert len({d.source for d in spec.disks}) == 3
    assert [f.flavor for f in facts] == ["vmfsThin", "vmfsThin", "vmfs"]
    assert [f.capacity for f in facts] == [d.capacity for d in spec.disks]
    assert [(n.model, n.mac, n.network) for n in spec.nics] == [("vmxnet3", MAC.upper(), "DC0_DVPG0")]
    assert not spec.encrypted and not spec.passthrough and not spec.tpm
    assert source.describe() == uri(vcsim, "/DC0/vm/web01")

    # The same mapping onto KVM as a .vmx's: OVMF with an EFI disk, the BIOS UUID, the MAC kept.
    shown = inproc.bare("inspect", uri(vcsim, "/DC0/vm/web01"), "--json", "--network", "DC0_DVPG0=vmbr1",
                        V2P_VSPHERE_PASSWORD=vcsim.password)
    assert shown.returncode == 0, shown.stderr
    config = json.loads(shown.stdout)[0]["config"]
    assert config["bios"] == "ovmf" and "efidisk0" in config and config["ostype"] == "l26"
    assert (config["sockets"], config["cores"], config["memory"]) == ("2", "2", "2048")
    assert config["smbios1"] == f"uuid={UUID}" and config["net0"] == f"virtio={MAC.upper()},bridge=vmbr1"
    assert [key for key in config if key.startswith("scsi") and key[4:].isdigit()] == ["scsi0", "scsi1", "scsi2"]


@pytest.mark.parametrize("wrong", ["fingerprint", "password"])
def test_a_wrong_pin_or_password_is_refused_in_one_line(vcsim: Vcsim, inproc: Any, wrong: str) -> None:
    fingerprint = "ab" * 32 if wrong == "fingerprint" else None
    password = "not-" + vcsim.password if wrong == "password" else vcsim.password
    shown = inproc.bare("vsphere", "ls", uri(vcsim, fingerprint=fingerprint), V2P_VSPHERE_PASSWORD=password)
    assert shown.returncode == 2 and shown.stdout == ""
    assert len(shown.stderr.splitlines()) == 1 and "Traceback" not in shown.stderr, shown.stderr
    expected = f"its SHA-256 is {vcsim.fingerprint}" if wrong == "fingerprint" else \
        f"the login of {vcsim.user} was refused"
    assert expected in shown.stderr
    assert vcsim.password not in shown.stderr


def test_an_unpinned_certificate_needs_a_ca_and_insecure_is_asked_for(vcsim: Vcsim, inproc: Any) -> None:
    env = {"V2P_VSPHERE_PASSWORD": vcsim.password}
    bare = f"vsphere://{vcsim.user}@{vcsim.address}"
    refused = inproc.bare("vsphere", "ls", bare, **env)
    assert refused.returncode == 2 and "not trusted by this machine's CA store" in refused.stderr
    assert vcsim.fingerprint in refused.stderr  # the hint says what it presents, to check on the host
    trusted = inproc.bare("vsphere", "ls", bare, SSL_CERT_FILE=str(vcsim.cert), **env)
    assert trusted.returncode == 0 and "/DC0/vm/DC0_H0_VM0" in trusted.stdout
    assert inproc.bare("vsphere", "ls", bare + "?insecure=1", **env).returncode == 0


def test_a_password_in_the_uri_is_refused(inproc: Any) -> None:
    shown = inproc.bare("vsphere", "ls", "vsphere://root:hunter2@vc.example/DC0")
    assert shown.returncode != 0 and "a password in the URI is refused" in shown.stderr
    assert "hunter2" not in shown.stderr


def test_the_password_is_in_no_argv_output_or_file(vcsim: Vcsim, v2p: Any, tmp_path: Path) -> None:
    """The password travels in the environment (or the 0600 file) only: no process's argv shows it while
    v2p runs, nor its output, nor anything it writes under the target."""
    secrets = tmp_path / "vsphere-secrets"
    secrets.write_text(f"password = {vcsim.password}\n")
    secrets.chmod(0o600)
    seen: list[bytes] = []
    for args, env in ((("vsphere", "ls", uri(vcsim)), {"V2P_VSPHERE_PASSWORD": vcsim.password}),
                      (("vsphere", "ls", uri(vcsim), "--json"), {"V2P_VSPHERE_SECRETS": str(secrets)}),
                      (("migrate", uri(vcsim, "/DC0/vm/DC0_H0_VM0"), "--vmid", "100", "--network", "DC0_DVPG0=vmbr0",
                        "--no-boot-check", "--shutdown"), {"V2P_VSPHERE_PASSWORD": vcsim.password})):
        process = v2p.popen(*args, **env)
        while process.poll() is None:
            seen += [cmdline for cmdline in cmdlines()]
        out, err = process.communicate()
        assert vcsim.password not in out + err
        if args[0] == "vsphere":
            assert process.returncode == 0, err
        else:  # vcsim's own VMs have empty disk files: downloaded (the session's cookie sent), then refused
            assert process.returncode == 2 and "Traceback" not in err
            assert "disk1.vmdk): the downloaded disk1.vmdk is empty (0 bytes), not a disk image" in err
    assert seen and not [cmdline for cmdline in seen if vcsim.password.encode() in cmdline]
    for path in v2p.target.rglob("*"):
        assert not path.is_file() or vcsim.password.encode() not in path.read_bytes(), path


def test_a_secrets_file_others_may_read_is_refused(vcsim: Vcsim, inproc: Any, tmp_path: Path) -> None:
    secrets = tmp_path / "vsphere-secrets"
    secrets.write_text(f"password = {vcsim.password}\n")
    secrets.chmod(0o644)
    shown = inproc.bare("vsphere", "ls", uri(vcsim), V2P_VSPHERE_SECRETS=str(secrets))
    assert shown.returncode != 0 and "readable by others" in shown.stderr



def test_the_launcher_takes_its_login_from_the_environment(vcsim: Vcsim) -> None:
    cmdline = Path(f"/proc/{vcsim.process.pid}/cmdline").read_bytes()
    assert vcsim.password.encode() not in cmdline


# -- the mapping alone, on pyvmomi's own data objects (no server: the fast tier) -------------------------

def _config(devices: list[Any], **changes: Any) -> Any:
    from pyVmomi import vim

    values: dict[str, Any] = {"name": "app01", "guestId": "windows2019srv_64Guest", "firmware": "bios",
                              "uuid": "42 13 a1 b2 c3 d4 e5 f6-07 18 29 3a 4b 5c 6d 7e"}
    hardware = {"numCPU": 2, "numCoresPerSocket": 1, "memoryMB": 4096, "device": devices}
    hardware.update(changes.pop("hardware", {}))
    values.update(changes)
    return vim.vm.ConfigInfo(hardware=vim.vm.VirtualHardware(**hardware), **values)


def _disk(key: int, controller: int, unit: int, name: str, **backing: Any) -> Any:
    from pyVmomi import vim

    kind = backing.pop("kind", vim.vm.device.VirtualDisk.FlatVer2BackingInfo)
    return vim.vm.device.VirtualDisk(key=key, controllerKey=controller, unitNumber=unit, capacityInKB=1024,
                                     backing=kind(fileName=f"[ds1] app01/{name}", **backing))


def test_every_controller_nic_and_device_kind_maps_as_the_vmx_says() -> None:
    from pyVmomi import vim

    from v2p.sources.vsphere import vm_spec

    device = vim.vm.device
    devices = [
        device.VirtualIDEController(key=200, busNumber=0), device.VirtualAHCIController(key=15000, busNumber=0),
        device.VirtualNVMEController(key=31000, busNumber=0), device.VirtualBusLogicController(key=1000, busNumber=0),
        device.VirtualLsiLogicController(key=1001, busNumber=1, sharedBus="physicalSharing"),
        _disk(2000, 1000, 0, "a.vmdk", diskMode="independent_persistent"),
        _disk(2001, 1001, 0, "b.vmdk", sharing="sharingMultiWriter"),
        _disk(2002, 15000, 1, "c.vmdk", keyId=vim.encryption.CryptoKeyId(keyId="k")),
        _disk(2003, 31000, 0, "d.vmdk", kind=device.VirtualDisk.RawDiskMappingVer1BackingInfo,
              compatibilityMode="physicalMode"),
        _disk(2004, 200, 0, "e.vmdk", kind=device.VirtualDisk.SeSparseBackingInfo),
        device.VirtualCdrom(key=3000, controllerKey=200, unitNumber=1,
                            backing=device.VirtualCdrom.IsoBackingInfo(fileName="[ds1] iso/win.iso")),
        device.VirtualE1000e(key=4000, macAddress="00:50:56:01:02:03",
                             backing=device.VirtualEthernetCard.NetworkBackingInfo(deviceName="VM Network")),
        device.VirtualPCNet32(key=4001, macAddress="00:50:56:01:02:04",
                              backing=device.VirtualEthernetCard.NetworkBackingInfo(deviceName="lab")),
        device.VirtualTPM(key=11000), device.VirtualFloppy(key=8000), device.VirtualSerialPort(key=9000),
        device.VirtualPCIPassthrough(key=13000), device.VirtualUSB(key=14000),
    ]
    boot = vim.vm.BootOptions(bootOrder=[vim.vm.BootOptions.BootableDiskDevice(deviceKey=2004)])
    spec = vm_spec(_config(devices, bootOptions=boot), {}, "vsphere://vc/DC/vm/app01")
    assert (spec.uuid, spec.ostype, spec.firmware, spec.sockets, spec.tpm) == (
        "4213a1b2-c3d4-e5f6-0718-293a4b5c6d7e", "win10", "bios", 2, True)
    assert [(d.label, d.controller_model, d.mode, d.shared, d.rdm, d.encrypted, d.boot) for d in spec.disks] == [
        ("ide0:0", None, "persistent", False, False, False, True),
        ("sata0:1", "ahci", "persistent", False, False, True, False),
        ("scsi0:0", "buslogic", "independent-persistent", False, False, False, False),
        ("scsi1:0", "lsilogic", "persistent", True, False, False, False),
        ("nvme0:0", "nvme", "persistent", False, True, False, False)]
    assert spec.encrypted
    assert [(c.controller, c.bus, c.unit, c.image) for c in spec.cdroms] == [("ide", 0, 1, "[ds1] iso/win.iso")]
    assert [(n.model, n.mac, n.network) for n in spec.nics] == [("e1000e", "00:50:56:01:02:03", "VM Network"),
                                                                  ("vlance", "00:50:56:01:02:04", "lab")]
    assert len(spec.passthrough) == 2 and len(spec.unmapped) == 2


@pytest.mark.parametrize(("changes", "message"), [
    ({"hardware": {"numCPU": 3, "numCoresPerSocket": 2}}, "numCPU 3 is not a multiple of numCoresPerSocket 2"),
    ({"firmware": "coreboot"}, "firmware 'coreboot' is neither efi nor bios"),
])
def test_impossible_hardware_is_refused_in_one_line(changes: dict[str, Any], message: str) -> None:
    from v2p.errors import SourceError
    from v2p.sources.vsphere import vm_spec

    with pytest.raises(SourceError, match=message):
        vm_spec(_config([], **changes), {}, "vsphere://vc/DC/vm/app01")


def test_a_disk_on_an_unknown_controller_is_refused() -> None:
    from pyVmomi import vim

    from v2p.errors import SourceError
    from v2p.sources.vsphere import vm_spec

    devices = [vim.vm.device.VirtualSIOController(key=400), _disk(2000, 400, 0, "a.vmdk")]
    with pytest.raises(SourceError, match=r"sits on a controller v2p does not know \(VirtualSIOController\)"):
        vm_spec(_config(devices), {}, "vsphere://vc/DC/vm/app01")


def test_the_environment_s_password_goes_to_its_own_host_only() -> None:
    from v2p.options import OptionError
    from v2p.sources.vsphere_api import find_password, parse_uri

    env = {"V2P_VSPHERE_HOST": "vc.example", "V2P_VSPHERE_PASSWORD": "pw", "V2P_VSPHERE_USER": "u"}
    assert find_password(parse_uri("vsphere://vc.example/DC0", env), env) == "pw"
    with pytest.raises(OptionError, match="is not the host this environment configures"):
        find_password(parse_uri("vsphere://elsewhere.example/DC0", env), env)


class _Terminal:
    """A stdin/stderr that says it is (or is not) a terminal."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        return None


@pytest.mark.parametrize("tty", [True, False])
def test_without_a_stored_password_one_is_asked_for_at_a_terminal_only(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path, tty: bool) -> None:
    import getpass

    from v2p.options import OptionError
    from v2p.sources import vsphere_api

    asked: list[str] = []
    monkeypatch.setattr(getpass, "getpass", lambda prompt, stream=None: asked.append(prompt) or "typed")
    monkeypatch.setattr(vsphere_api.sys, "stdin", _Terminal(tty))
    monkeypatch.setattr(vsphere_api.sys, "stderr", _Terminal(tty))
    monkeypatch.setattr(vsphere_api, "_PROMPTED", {})
    env = {"V2P_VSPHERE_USER": "migrator", "XDG_CONFIG_HOME": str(tmp_path)}  # no password anywhere
    where = vsphere_api.parse_uri("vsphere://vc.example/DC0", env)
    if not tty:  # cron, a plan's child, a panel: no prompt, the one-line refusal
        with pytest.raises(OptionError, match="no password for the vSphere source"):
            vsphere_api.find_password(where, env)
        assert asked == []
        return
    assert vsphere_api.find_password(where, env) == "typed"
    assert vsphere_api.find_password(where, env) == "typed"  # a second login in the same run asks no more
    assert asked == ["vSphere password for migrator@vc.example: "]
