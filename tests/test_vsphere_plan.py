"""vSphere VMs in a plan and through the library: two VMs on vcsim and one local disk in one ``plan
run`` (each VM in its own child process, the password handed down through the environment, never an
argv), the same URI through ``from v2p import migrate``."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from test_vsphere_disks import (
    CountingProxy,
    MiB,
    sample_vm,
    uri,
)
from vcsim.fixture import Vcsim, si_fixture, vcsim_fixture, wait  # noqa: F401

from conftest import assert_same_bytes, cmdlines


def test_a_plan_with_two_vsphere_vms_and_a_local_disk(vcsim: Vcsim, si: Any, samples: Path, v2p: Any,  # noqa: F811
                                                      tmp_path: Path) -> None:
    for name in ("plan01", "plan02"):
        sample_vm(si, samples, name)
    local = tmp_path / "src"
    shutil.copytree(samples / "monolithicSparse", local)
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""\
defaults: {{target: {{kind: local, dir: {v2p.target}, accel: tcg}}, boot_check: false}}
vms:
  - {{source: "{uri(vcsim, "plan01")}", vmid: 701, name: web01}}
  - {{source: "{uri(vcsim, "plan02")}", vmid: 702, name: web02}}
  - {{source: {local / "monolithicSparse.vmdk"}, vmid: 703, name: disk}}
""")
    env = {"V2P_VSPHERE_PASSWORD": vcsim.password}
    checked = v2p("plan", "validate", str(plan), **env)
    assert checked.returncode == 0 and checked.stdout.endswith(": 3 VMs, OK\n"), checked.stdout + checked.stderr

    process = v2p.popen("plan", "run", str(plan), "--parallel", "3", **env)
    argv: list[bytes] = []
    while process.poll() is None:
        argv += cmdlines()
        time.sleep(0.05)
    out, err = process.communicate()
    assert process.returncode == 0, out + err
    assert "3 of 3 VMs migrated" in out, out
    assert argv and not [line for line in argv if vcsim.password.encode() in line]
    assert vcsim.password not in out + err
    for vmid in (701, 702):
        assert_same_bytes(samples / "guest.raw", v2p.disk(vmid))
    assert_same_bytes(samples / "guest.raw", v2p.disk(703))
    for path in v2p.target.rglob("*"):
        if path.is_file():
            assert vcsim.password.encode() not in path.read_bytes(), path

    again = v2p("plan", "run", str(plan), "--json", **env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count('"nothing to do"') == 3


def test_the_library_takes_the_same_uri(vcsim: Vcsim, si: Any, samples: Path, tmp_path: Path,  # noqa: F811
                                        monkeypatch: Any) -> None:
    """``inspect_vm``, ``Migration.plan()`` and ``migrate`` on a ``vsphere://`` URI, the password from the
    environment."""
    from v2p import Migration, migrate
    from v2p.api import inspect_vm

    sample_vm(si, samples, "lib01")
    monkeypatch.setenv("V2P_VSPHERE_PASSWORD", vcsim.password)
    source = uri(vcsim, "lib01")
    report = inspect_vm(source)
    assert report.error is None and report.spec is not None and len(report.spec.disks) == 1, report.error
    target = {"kind": "local", "dir": str(tmp_path / "target"), "accel": "tcg"}
    stages = Migration(source, 711, target=target, boot_check=False).plan()
    assert [name for name, _what, done in stages][:3] == ["inspect", "preflight", "create"]
    assert not any(done for _name, _what, done in stages)
    events: list[Any] = []
    result = migrate(source, 711, target=target, boot_check=False, on_event=events.append)
    assert result["boot"] == "skipped", result
    fetched = [e for e in events if e.kind == "progress" and getattr(e, "step", None) == "fetch"]
    assert fetched
    # What the download really received (issue 20: moved): the flat file whole (the datastore sends its
    # zeros too) and the descriptor, counted as they arrive.
    moved = [e.data["moved"] for e in fetched]
    assert moved == sorted(moved) and fetched[-1].total < moved[-1] < fetched[-1].total + (1 << 20), moved
    assert_same_bytes(samples / "guest.raw", tmp_path / "target" / "images" / "711" / "vm-711-disk-0.qcow2")


def three_disk_vm(session: Any, samples: Path, name: str) -> None:
    """A powered-off VM ``name`` with three disks (scsi0:0-2), each a copy of the sample guest in ESXi's
    layout (``dN.vmdk`` + ``dN-flat.vmdk``) in its folder on LocalDS_0."""
    from pyVmomi import vim

    datacenter = session.RetrieveContent().rootFolder.childEntity[0]
    datastore = next(ds for ds in datacenter.datastore if ds.name == "LocalDS_0")
    folder = Path(datastore.info.url) / name
    folder.mkdir()
    device = vim.vm.device
    add = device.VirtualDeviceSpec.Operation.add
    changes = [device.VirtualDeviceSpec(operation=add, device=device.VirtualLsiLogicController(
        key=-101, busNumber=0, sharedBus="noSharing"))]
    descriptor = (samples / "esxi" / "esxi.vmdk").read_bytes()
    for n in range(3):
        (folder / f"d{n}.vmdk").write_bytes(descriptor.replace(b'"esxi-flat.vmdk"', f'"d{n}-flat.vmdk"'.encode()))
        shutil.copyfile(samples / "esxi" / "esxi-flat.vmdk", folder / f"d{n}-flat.vmdk")
        backing = device.VirtualDisk.FlatVer2BackingInfo(fileName=f"[LocalDS_0] {name}/d{n}.vmdk",
                                                         diskMode="persistent", thinProvisioned=True)
        changes.append(device.VirtualDeviceSpec(operation=add, device=device.VirtualDisk(
            key=-201 - n, controllerKey=-101, unitNumber=n, capacityInKB=32 * 1024, backing=backing)))
    cluster = next(e for e in datacenter.hostFolder.childEntity if isinstance(e, vim.ClusterComputeResource))
    config = vim.vm.ConfigSpec(name=name, guestId="otherLinux64Guest", numCPUs=1, memoryMB=256, firmware="bios",
                               files=vim.vm.FileInfo(vmPathName=f"[LocalDS_0] {name}"), deviceChange=changes)
    wait(datacenter.vmFolder.CreateVM_Task(config=config, pool=cluster.resourcePool))


class SlowProxy(CountingProxy):
    """The counting relay, each 64 KiB it passes back held a millisecond: a 32 MiB file takes about half
    a second, long enough for downloads at once to overlap for sure."""

    def _pipe(self, source: Any, dest: Any, count: bool) -> None:
        if not count:
            return super()._pipe(source, dest, count)
        slow = _Slowed(source)
        return super()._pipe(slow, dest, count)  # type: ignore[arg-type]


class _Slowed:
    def __init__(self, sock: Any) -> None:
        self.sock = sock

    def recv(self, size: int) -> bytes:
        time.sleep(0.001)
        data: bytes = self.sock.recv(size)
        return data

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)


@pytest.mark.parametrize("parallel", [1, 2, 3])
def test_a_vm_s_disks_download_at_once_up_to_the_limit(vcsim: Vcsim, si: Any, samples: Path,  # noqa: F811
                                                       tmp_path: Path, monkeypatch: Any, parallel: int) -> None:
    """Three disks, ``?parallel=N``: at most N downloads at once (and N when there are disks enough),
    from each download's first line to its last; every disk the sample's."""
    from v2p import migrate

    name = f"par{parallel}"
    three_disk_vm(si, samples, name)
    monkeypatch.setenv("V2P_VSPHERE_PASSWORD", vcsim.password)
    proxy = SlowProxy(vcsim.port)
    started = time.monotonic()
    seen: list[tuple[float, str, str]] = []

    def on_event(event: Any) -> None:
        if event.kind == "info" and event.step == "fetch" and event.message.startswith("fetch: scsi0:"):
            label, _, rest = event.message.removeprefix("fetch: ").partition(": ")
            seen.append((time.monotonic(), label, "start" if "link(s) of" in rest else "end"))

    try:
        migrate(f"{uri(vcsim, name, proxy.port)}&parallel={parallel}", 720 + parallel, on_event=on_event,
                target={"kind": "local", "dir": str(tmp_path / "target"), "accel": "tcg"}, boot_check=False)
    finally:
        proxy.close()
    seconds = time.monotonic() - started
    running, most = 0, 0
    for _when, _label, what in sorted(seen):
        running += 1 if what == "start" else -1
        most = max(most, running)
    print(f"parallel={parallel}: 3 disks of 32 MiB in {seconds:.1f} s, at most {most} at once")  # noqa: T201
    assert len(seen) == 6 and most == parallel, seen
    assert 3 * 32 * MiB <= proxy.served < 3 * 34 * MiB  # each disk downloaded once
    for n in range(3):
        assert_same_bytes(samples / "guest.raw",
                          tmp_path / "target" / "images" / str(720 + parallel) / f"vm-{720 + parallel}-disk-{n}.qcow2")


def test_parallel_is_a_number_of_disks_and_not_part_of_the_vm_s_name() -> None:
    from v2p.options import OptionError
    from v2p.sources.vsphere_api import parse_uri

    assert parse_uri("vsphere://u@vc/DC0/vm/web01").parallel == 2
    where = parse_uri("vsphere://u@vc/DC0/vm/web01?parallel=4")
    assert where.parallel == 4 and where.at(["DC0"]).parallel == 4
    assert str(where) == "vsphere://u@vc/DC0/vm/web01"  # the state file's source: the same at any parallel
    for bad in ("0", "17", "x", "-1", "2.5", "999"):
        with pytest.raises(OptionError, match="is not a number of disks from 1 to 16"):
            parse_uri(f"vsphere://u@vc/DC0/vm/web01?parallel={bad}")


def test_a_host_s_slots_are_shared_with_other_processes(tmp_path: Path) -> None:
    """Both slots of a host held by other processes (``flock``): a download waits, and gives up when its
    migration stops; once one of them lets go, it gets that slot."""
    import subprocess
    import sys

    from v2p.sources.vsphere_parallel import HostSlots, Stopped

    slots = HostSlots(tmp_path / "vsphere-slots", "vc:443/host-21", 2)
    slots.folder.mkdir()
    hold = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); " \
           "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"
    holders = [subprocess.Popen([sys.executable, "-c", hold, str(path)], stdout=subprocess.PIPE, text=True)
               for path in slots.paths]
    try:
        for holder in holders:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        looks = []

        def stop_after_two() -> None:
            looks.append(1)
            if len(looks) == 2:
                raise Stopped

        with pytest.raises(Stopped):
            slots.acquire(stop_after_two)
        holders[1].kill()
        holders[1].wait()
        fd = slots.acquire(stop_after_two)
        assert os.readlink(f"/proc/self/fd/{fd}") == str(slots.paths[1])
        slots.release(fd)
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
