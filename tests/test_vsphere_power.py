"""A running vSphere VM: refused without ``--shutdown``, shut down (VMware Tools) or powered off with it,
each step said, nothing else on it changed; the rules only vSphere knows (snapshots, Tools) from a vcsim
VM; the guest's IPs per NIC recorded in the state file and printed at the end of ``migrate``.

The stopping logic's timing (a guest that never stops, one that stops after a while) runs offline on a
``Power`` of the test's own: vcsim's ``ShutdownGuest`` powers the VM off at once, so the wait and the
power-off after it cannot be seen there. Reading the disks from the datastore is another part of
issue 19: where a migration must read one, the tests hand ``VsphereSource.disk_endpoint`` a local raw
disk of the VM's capacity (everything before it, and the pipeline after it, is the real thing).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_source_vsphere import uri
from vcsim.fixture import Vcsim, si_fixture, vcsim_fixture, wait  # noqa: F401

from v2p.endpoint import DiskEndpoint
from v2p.errors import SourceError
from v2p.options import MigrationOptions
from v2p.sources.vsphere import VsphereSource
from v2p.sources.vsphere_power import guest_ips, snapshot_names, stop
from v2p.spec import DiskSpec

VM = "/DC0/vm/DC0_H0_VM0"  # vcsim's model VM: powered on, one 1 MiB disk, one NIC on DC0_DVPG0
NETWORK = ("--network", "DC0_DVPG0=vmbr0")


# -- offline: the stopping logic ------------------------------------------------------------------------

class FakePower:
    """A VM whose guest stops ``stops_after`` seconds after ShutdownGuest (never: None)."""

    def __init__(self, state: str = "poweredOn", tools: bool = True, stops_after: float | None = None) -> None:
        self.power, self.tools, self.stops_after = state, tools, stops_after
        self.now, self.asked_at, self.calls = 0.0, None, []  # type: ignore[var-annotated]

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.asked_at is not None and self.stops_after is not None and self.now - self.asked_at >= self.stops_after:
            self.power = "poweredOff"

    def state(self) -> tuple[str, bool]:
        return self.power, self.tools

    def shutdown_guest(self) -> None:
        self.calls.append("ShutdownGuest")
        self.asked_at = self.now

    def power_off(self) -> None:
        self.calls.append("PowerOffVM_Task")
        self.power = "poweredOff"


def stopped(vm: FakePower, *, shutdown: bool = True, wait: float = 300.0) -> tuple[dict[str, Any], list[str]]:
    said: list[str] = []
    done = stop(vm, where="vsphere://vc/DC0/vm/web01", shutdown=shutdown, wait=wait, say=said.append,
                clock=vm.clock, sleep=vm.sleep)
    return done, said


def test_a_guest_that_shuts_down_is_not_powered_off() -> None:
    vm = FakePower(stops_after=9)
    done, said = stopped(vm)
    assert vm.calls == ["ShutdownGuest"] and vm.power == "poweredOff"
    assert done == {"was": "poweredOn", "stopped_by": "guest-shutdown", "seconds": 10.0}
    assert said == ["shutdown: asking the guest of vsphere://vc/DC0/vm/web01 to shut down through VMware Tools "
                    "(powered off if it still runs after 300s)",
                    "shutdown: the guest of vsphere://vc/DC0/vm/web01 shut down after 10s"]


def test_a_guest_that_does_not_shut_down_is_powered_off_after_the_wait() -> None:
    vm = FakePower(stops_after=None)
    done, said = stopped(vm, wait=30)
    assert vm.calls == ["ShutdownGuest", "PowerOffVM_Task"] and vm.now == 30
    assert done == {"was": "poweredOn", "stopped_by": "power-off", "seconds": 30.0}
    assert said[1:] == ["shutdown: the guest of vsphere://vc/DC0/vm/web01 did not shut down within 30s: "
                        "powering it off", "shutdown: vsphere://vc/DC0/vm/web01 is powered off"]


def test_without_tools_or_with_no_wait_the_vm_is_powered_off_at_once() -> None:
    vm = FakePower(tools=False)
    done, said = stopped(vm)
    assert vm.calls == ["PowerOffVM_Task"] and vm.now == 0 and done["stopped_by"] == "power-off"
    assert said[0] == "shutdown: VMware Tools are not running in vsphere://vc/DC0/vm/web01: powering it off " \
                      "(no guest shutdown possible)"
    vm = FakePower(stops_after=None)
    done, said = stopped(vm, wait=0)
    assert done["stopped_by"] == "power-off" and vm.calls == ["PowerOffVM_Task"]
    assert said[0] == "shutdown: --shutdown-wait 0: powering vsphere://vc/DC0/vm/web01 off at once (no guest shutdown)"


def test_a_vm_that_is_off_is_left_alone_and_a_running_one_refused_without_shutdown() -> None:
    vm = FakePower(state="poweredOff")
    assert stopped(vm) == ({}, []) and vm.calls == []
    vm = FakePower()
    with pytest.raises(SourceError) as refused:
        stopped(vm, shutdown=False)
    assert vm.calls == [] and "is powered on" in refused.value.message and "--shutdown" in (refused.value.hint or "")


def test_guest_ips_and_snapshot_names_from_pyvmomi_objects() -> None:
    from pyVmomi import vim

    address = vim.net.IpConfigInfo.IpAddress
    net = [vim.vm.GuestInfo.NicInfo(macAddress="00:50:56:AA:BB:01", ipAddress=["10.0.0.5", "fe80::1"],
                                    ipConfig=vim.net.IpConfigInfo(ipAddress=[
                                        address(ipAddress="10.0.0.5", prefixLength=24),
                                        address(ipAddress="fe80::1", prefixLength=64),
                                        address(ipAddress="2001:db8::5", prefixLength=64)])),
           vim.vm.GuestInfo.NicInfo(macAddress="00:50:56:aa:bb:02", ipAddress=["192.168.1.9"]),
           vim.vm.GuestInfo.NicInfo(macAddress="00:50:56:aa:bb:03"),
           vim.vm.GuestInfo.NicInfo(ipAddress=["172.16.0.1"])]  # no MAC: a guest-side adapter, not a NIC
    assert guest_ips(net) == {"00:50:56:aa:bb:01": ["10.0.0.5/24", "2001:db8::5/64"],
                              "00:50:56:aa:bb:02": ["192.168.1.9"]}
    tree = vim.vm.SnapshotTree
    info = vim.vm.SnapshotInfo(rootSnapshotList=[
        tree(name="base", childSnapshotList=[tree(name="before-upgrade", childSnapshotList=[]),
                                             tree(name="patched", childSnapshotList=[])])])
    assert snapshot_names(info) == ["base", "before-upgrade", "patched"]
    assert snapshot_names(None) == []


def test_runtime_facts_reach_the_rules() -> None:
    """What vSphere says besides the hardware: datastore kinds by the disk's ``[name]``, CBT, Tools,
    snapshots and the guest's IPs matched to the NIC by MAC; the rules then speak of them."""
    from types import SimpleNamespace

    from pyVmomi import vim

    from v2p.rules import check
    from v2p.sources.vsphere_power import add_runtime_facts
    from v2p.spec import NicSpec, VMSpec

    spec = VMSpec(name="db01", guest_os="ubuntu64Guest",
                  disks=[DiskSpec("scsi", 0, 0, "[vsanDatastore] db01/db01.vmdk", 1 << 30, "pvscsi"),
                         DiskSpec("scsi", 0, 1, "[LocalDS_0] db01/db01_1.vmdk", 1 << 30, "pvscsi")],
                  nics=[NicSpec("vmxnet3", "00:50:56:AA:BB:01", "VM Network"), NicSpec("vmxnet3", "00:50:56:AA:BB:02")])
    props = {"config": SimpleNamespace(changeTrackingEnabled=True), "runtime.powerState": "poweredOn",
             "guest.toolsRunningStatus": "guestToolsNotRunning",
             "snapshot": vim.vm.SnapshotInfo(rootSnapshotList=[vim.vm.SnapshotTree(name="nightly")]),
             "guest.net": [vim.vm.GuestInfo.NicInfo(macAddress="00:50:56:aa:bb:01", ipAddress=["10.1.2.3"])]}
    add_runtime_facts(spec, props, {"vsanDatastore": "vsan", "LocalDS_0": "VMFS"})
    assert [d.datastore_type for d in spec.disks] == ["vsan", "VMFS"]
    assert (spec.power_state, spec.tools_running, spec.snapshots, spec.cbt) == ("poweredOn", False, ["nightly"], True)
    assert [n.ips for n in spec.nics] == [["10.1.2.3"], []]
    assert spec.guest_ips() == {"net0": {"mac": "00:50:56:AA:BB:01", "ips": ["10.1.2.3"]}}
    found = [(f.id, f.severity) for f in check(spec, MigrationOptions(shutdown=True), bridges={"VM Network": "vmbr0"})]
    assert found == [("powered-on", "info"), ("vsan-vvol-datastore", "warning"), ("vm-snapshots", "info"),
                     ("changed-block-tracking", "info"), ("tools-not-running", "info")]
    assert VMSpec.from_dict(spec.to_dict()) == spec  # through the state file and back


def test_shutdown_is_nothing_to_do_for_a_file_source(tmp_path: Path) -> None:
    """A plan's defaults may say shutdown: true for vSphere VMs and local disks alike."""
    from v2p.sources.disk import DiskSource

    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\0" * 4096)
    said: list[str] = []
    assert DiskSource(disk).prepare(MigrationOptions(shutdown=True), said.append) == {} and said == []


# -- against vcsim -------------------------------------------------------------------------------------

def vm_of(si: Any, path: str = VM) -> Any:
    return si.RetrieveContent().searchIndex.FindByInventoryPath(path.lstrip("/"))


def reconfigure(si: Any, path: str, **extra: str) -> None:
    """vcsim's ``SET.``-prefixed extraConfig keys set the VM's runtime properties (Tools, guest IP)."""
    from pyVmomi import vim

    options = [vim.option.OptionValue(key=f"SET.{key}", value=value) for key, value in extra.items()]
    wait(vm_of(si, path).ReconfigVM_Task(spec=vim.vm.ConfigSpec(extraConfig=options)))


def read(si: Any, *paths: str) -> dict[str, Any]:
    """The model VM's properties through the PropertyCollector (vcsim 0.24 panics on a ``Fetch`` of an
    unset one, such as ``snapshot`` before any was taken)."""
    from pyVmomi import vim, vmodl

    collector: Any = vmodl.query.PropertyCollector
    spec = collector.FilterSpec(objectSet=[collector.ObjectSpec(obj=vm_of(si), skip=False)],
                                propSet=[collector.PropertySpec(type=vim.VirtualMachine, pathSet=list(paths))])
    [found] = si.RetrieveContent().propertyCollector.RetrieveContents([spec])
    return {prop.name: prop.val for prop in found.propSet or ()}


def power_state(si: Any) -> str:
    return str(read(si, "runtime.powerState")["runtime.powerState"])


@pytest.fixture
def endpoint_reads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[str]]:
    """``disk_endpoint`` of the vSphere source (not built in this part): a local raw disk of the VM's
    capacity, every call recorded."""
    calls: list[str] = []

    def local(self: VsphereSource, disk: DiskSpec, workdir: Path) -> DiskEndpoint:
        calls.append(disk.source)
        raw = tmp_path / "disk.raw"
        if not raw.exists():
            raw.write_bytes(b"v2p" * 1000 + b"\0" * (disk.capacity - 3000))
        return DiskEndpoint("raw", str(raw), capacity=disk.capacity, flavor="vmfsThin")

    monkeypatch.setattr(VsphereSource, "disk_endpoint", local)
    yield calls


def test_a_running_vm_is_refused_without_shutdown(vcsim: Vcsim, si: Any, inproc: Any,
                                                  endpoint_reads: list[str]) -> None:
    assert power_state(si) == "poweredOn"
    shown = inproc("migrate", uri(vcsim, VM), "--vmid", "100", *NETWORK, "--no-boot-check",
                   V2P_VSPHERE_PASSWORD=vcsim.password)
    assert shown.returncode != 0 and "Traceback" not in shown.stderr
    [line] = [line for line in shown.stderr.splitlines() if line.startswith("v2p: error:")]
    assert "powered-on: the VM is powered on" in line and "(hint: --shutdown shuts the guest down" in line
    assert endpoint_reads == []  # no disk opened, let alone read
    assert not (inproc.target / "qemu-server" / "100.conf").exists()
    assert not (inproc.target / "migrations" / "100.json").exists()
    assert power_state(si) == "poweredOn"


def test_shutdown_through_tools_then_the_migration_and_the_guest_ips(vcsim: Vcsim, si: Any, inproc: Any,
                                                                     endpoint_reads: list[str]) -> None:
    reconfigure(si, VM, **{"guest.toolsRunningStatus": "guestToolsRunning", "guest.ipAddress": "10.0.0.5"})
    before = read(si, "guest.net", "config.modified")
    mac, changed = before["guest.net"][0].macAddress, before["config.modified"]
    shown = inproc("migrate", uri(vcsim, VM), "--vmid", "100", *NETWORK, "--no-boot-check", "--shutdown",
                   "--shutdown-wait", "20", V2P_VSPHERE_PASSWORD=vcsim.password)
    assert shown.returncode == 0, shown.stderr
    assert power_state(si) == "poweredOff"
    out = shown.stdout + shown.stderr
    assert out.index("shutdown: asking the guest of ") < out.index("shut down after 0s")
    assert "powering it off" not in out  # the guest stopped: no hard power-off
    assert endpoint_reads  # the disk was read after the shutdown, not before
    assert f"net0 ({mac.upper()}): was 10.0.0.5" in shown.stdout
    state = inproc.state(100)
    assert state["stages"]["inspect"]["result"]["guest_ips"] == {"net0": {"mac": mac.upper(), "ips": ["10.0.0.5"]}}
    assert state["stages"]["preflight"]["result"]["source"]["stopped_by"] == "guest-shutdown"
    findings = {f["id"]: f for f in state["stages"]["preflight"]["result"]["findings"]}
    assert findings["powered-on"]["severity"] == "info"
    # Nothing else on the source changed: no snapshot, same name, same configuration.
    after = read(si, "name", "config.modified", "snapshot")
    assert after == {"name": "DC0_H0_VM0", "config.modified": changed}


def test_without_tools_the_vm_is_powered_off_and_a_snapshot_is_a_note(vcsim: Vcsim, si: Any, inproc: Any,
                                                                      endpoint_reads: list[str]) -> None:
    wait(vm_of(si).CreateSnapshot_Task(name="before-upgrade", memory=False, quiesce=False))
    env = {"V2P_VSPHERE_PASSWORD": vcsim.password}
    inspected = inproc.bare("inspect", uri(vcsim, VM), "--json", *NETWORK, **env)
    rules = {f["id"]: f for f in json.loads(inspected.stdout)[0]["findings"]}
    assert rules["vm-snapshots"]["severity"] == "info" and "before-upgrade" in rules["vm-snapshots"]["message"]
    assert rules["tools-not-running"]["severity"] == "info" and rules["powered-on"]["severity"] == "error"

    shown = inproc("migrate", uri(vcsim, VM), "--vmid", "101", *NETWORK, "--no-boot-check", "--shutdown", **env)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout + shown.stderr
    assert "shutdown: VMware Tools are not running in" in out and "is powered off" in out
    assert "asking the guest" not in out and power_state(si) == "poweredOff"
    assert "vm-snapshots" in out
    assert [s.name for s in read(si, "snapshot")["snapshot"].rootSnapshotList] == ["before-upgrade"]  # as it was
    assert inproc.state(101)["stages"]["preflight"]["result"]["source"]["stopped_by"] == "power-off"


def test_a_resumed_run_refuses_a_vm_powered_on_again_before_it_reads_a_disk(
        vcsim: Vcsim, si: Any, inproc: Any, endpoint_reads: list[str], tmp_path: Path) -> None:
    """Preflight's record holds on a resume, but the VM may have been started since: the first disk
    read of the rerun asks the source again (``Source.prepare``), and without --shutdown it is refused."""
    env = {"V2P_VSPHERE_PASSWORD": vcsim.password}
    args = ("migrate", uri(vcsim, VM), "--vmid", "102", *NETWORK, "--no-boot-check", "--keep-on-failure")
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"short")  # not the VM's capacity: its verify fails, the records before it stay
    failed = inproc(*args, "--shutdown", **env)
    assert failed.returncode != 0 and power_state(si) == "poweredOff"
    assert {"inspect", "preflight", "create"} <= set(inproc.state(102)["stages"])
    wait(vm_of(si).PowerOnVM_Task())  # someone starts it again before the rerun
    disk.unlink()
    del endpoint_reads[:]
    refused = inproc(*args, **env)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "DC0_H0_VM0 is powered on: its disks change while it runs" in refused.stderr
    assert "(hint: --shutdown shuts its guest down" in refused.stderr
    assert endpoint_reads == [] and power_state(si) == "poweredOn"
    # With it the rerun powers the VM off (Tools do not run) before it opens the disk again.
    resumed = inproc(*args, "--shutdown", **env)
    said = resumed.stdout.index("] shutdown: VMware Tools are not running in")  # in verify: convert held
    assert said < resumed.stdout.index("is powered off") and power_state(si) == "poweredOff"
    assert "[preflight] already done at" in resumed.stdout and endpoint_reads
