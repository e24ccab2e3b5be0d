"""A vSphere VM's disks pulled from vcsim's datastore file service (``v2p/sources/vsphere_fetch.py``): the
sample guest's ESXi-layout disk (descriptor + ``-flat.vmdk``) put into a VM folder of vcsim's datastore
(a real directory), migrated onto the local target and booted; a transfer killed midway resumed, not
restarted; the password and the session cookie in no argv, output or file."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pve_sim.fixture import pve_fixture  # noqa: F401
from vcsim.fixture import Vcsim, si_fixture, vcsim_fixture, wait  # noqa: F401

from conftest import assert_same_bytes, cmdlines, guest_report

MiB = 1 << 20
COOKIE = "vmware_soap_session"


def sample_vm(si: Any, samples: Path, name: str) -> Path:
    """A powered-off VM ``name`` whose one disk (LSI Logic, BIOS) is the sample guest in ESXi's layout,
    copied into its folder on vcsim's datastore LocalDS_0; that folder."""
    from pyVmomi import vim

    content = si.RetrieveContent()
    datacenter = content.rootFolder.childEntity[0]
    datastore = next(ds for ds in datacenter.datastore if ds.name == "LocalDS_0")
    folder = Path(datastore.info.url) / name
    folder.mkdir()
    for part in ("esxi.vmdk", "esxi-flat.vmdk"):
        shutil.copyfile(samples / "esxi" / part, folder / part)
    cluster = next(e for e in datacenter.hostFolder.childEntity if isinstance(e, vim.ClusterComputeResource))
    device = vim.vm.device
    add = device.VirtualDeviceSpec.Operation.add
    backing = device.VirtualDisk.FlatVer2BackingInfo(fileName=f"[LocalDS_0] {name}/esxi.vmdk",
                                                     diskMode="persistent", thinProvisioned=True)
    changes = [device.VirtualDeviceSpec(operation=add, device=device.VirtualLsiLogicController(
                   key=-101, busNumber=0, sharedBus="noSharing")),
               device.VirtualDeviceSpec(operation=add, device=device.VirtualDisk(
                   key=-201, controllerKey=-101, unitNumber=0, capacityInKB=32 * 1024, backing=backing))]
    config = vim.vm.ConfigSpec(name=name, guestId="otherLinux64Guest", numCPUs=1, memoryMB=256, firmware="bios",
                               files=vim.vm.FileInfo(vmPathName=f"[LocalDS_0] {name}"), deviceChange=changes)
    wait(datacenter.vmFolder.CreateVM_Task(config=config, pool=cluster.resourcePool))
    return folder


class CountingProxy:
    """A TCP relay to vcsim counting the bytes it sends back: TLS passes through it untouched (the pin
    still holds), so what it counts is what v2p downloaded."""

    def __init__(self, port: int, cut_at: int | None = None) -> None:
        self.target = ("127.0.0.1", port)
        self.cut_at = cut_at  # once this many bytes were served, the connection serving is cut (once)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.served = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, dest: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                dest.sendall(data)
                if count:
                    with self.lock:
                        self.served += len(data)
                        cut = self.cut_at is not None and self.served >= self.cut_at
                        if cut:
                            self.cut_at = None
                    if cut:
                        break
        except OSError:
            pass
        finally:
            for end in (source, dest):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def uri(vcsim: Vcsim, name: str, port: int | None = None) -> str:
    return f"vsphere://{vcsim.user}@{vcsim.host}:{port or vcsim.port}/DC0/vm/{name}?fingerprint={vcsim.fingerprint}"


def test_a_vsphere_vm_migrates_and_boots(vcsim: Vcsim, si: Any, samples: Path, manifest: dict[str, Any],
                                         v2p: Any) -> None:
    """Its disk downloaded from the datastore, converted and verified from the local copy, the guest up;
    the password and the session cookie in no process's argv, no output (``-v``: the log of every
    command run), no file under the target."""
    sample_vm(si, samples, "mig01")
    env = {"V2P_VSPHERE_PASSWORD": vcsim.password}
    process = v2p.popen("-v", "migrate", uri(vcsim, "mig01"), "--vmid", "120", **env)  # every argv logged too
    argv: list[bytes] = []
    while process.poll() is None:
        argv += cmdlines()
        time.sleep(0.05)
    out, err = process.communicate()
    assert process.returncode == 0, err
    controller, _pci, marker = guest_report(v2p.serial(120))
    assert (controller, marker) == ("virtio-scsi", manifest["marker"])
    assert_same_bytes(samples / "guest.raw", v2p.disk(120))
    rate = re.search(r"fetch: scsi0:0: (\d+) bytes in [\d.]+ s \((\d+) MiB/s\)", out + err)
    assert rate and int(rate.group(1)) == 32 * MiB + (samples / "esxi" / "esxi.vmdk").stat().st_size, out + err
    print(f"download rate: {rate.group(2)} MiB/s")  # noqa: T201 (the measured number, for -s)
    assert argv and not [line for line in argv if vcsim.password.encode() in line or COOKIE.encode() in line]
    assert "qemu-img convert" in err  # -v logged the commands
    assert vcsim.password not in out + err and COOKIE not in out + err and "Warning" not in err
    for path in v2p.target.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert vcsim.password.encode() not in data and COOKIE.encode() not in data, path
    assert not (v2p.target / "migrations" / "120.work").exists()  # the local copy went with the workdir


def test_a_vsphere_vm_migrates_onto_pve(vcsim: Vcsim, si: Any, samples: Path, pve: Any, v2p: Any,
                                        tmp_path: Path) -> None:
    """The same VM onto the PVE simulator: the local copy uploaded, its bytes the sample's; every
    request v2p made passed the PVE schema."""
    sample_vm(si, samples, "mig06")
    url = f"pve://root@pam!v2p@{pve.host}/{pve.cluster.node}?storage=local&fingerprint={pve.fingerprint}"
    proc = v2p("--target", url, "migrate", uri(vcsim, "mig06"), "--vmid", "160", "--no-boot-check",
               V2P_PVE_TOKEN=pve.tokens["root@pam!v2p"], XDG_DATA_HOME=str(tmp_path / "xdg"),
               V2P_VSPHERE_PASSWORD=vcsim.password)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    volid = pve.cluster.vms[160].config["scsi0"].split(",")[0]
    assert_same_bytes(samples / "guest.raw", pve.cluster.volume_path(volid),
                      "raw" if volid.endswith(".raw") or "/" not in volid else "qcow2")
    assert pve.refused == [] and pve.unsimulated == []
    assert vcsim.password not in proc.stdout + proc.stderr


@pytest.mark.parametrize(("stop", "changed"), [(signal.SIGKILL, False), (signal.SIGKILL, True),
                                               (signal.SIGINT, False)], ids=["killed", "changed", "ctrl-c"])
def test_a_killed_transfer_resumes_where_it_stopped(vcsim: Vcsim, si: Any, samples: Path, v2p: Any,
                                                    stop: int, changed: bool) -> None:
    """Killed (or Ctrl-C) halfway through the -flat.vmdk, the rerun asks for the rest only (a Range request: the
    bytes the relay served are the half that was missing; verify read the local copy, not the
    datastore), and the disk is the sample's. A file that changed on the datastore meanwhile (its
    Last-Modified) is downloaded whole again (If-Range)."""
    folder = sample_vm(si, samples, "mig02")
    proxy = CountingProxy(vcsim.port)
    env = {"V2P_VSPHERE_PASSWORD": vcsim.password}
    source = uri(vcsim, "mig02", proxy.port)
    try:
        process = v2p.popen("migrate", source, "--vmid", "121", "--no-boot-check",
                            V2P_TEST_HOLD_AFTER="fetch:half", **env)
        assert process.stderr is not None
        said = ""
        while "holding after fetch:half" not in said:
            line = process.stderr.readline()
            assert line, f"v2p ended before the hold point: {said}"
            said += line
        os.kill(process.pid, stop)
        process.communicate(timeout=30)
        part = v2p.target / "migrations" / "121.work" / "vsphere-scsi0-0" / "esxi-flat.vmdk.part"
        kept = part.stat()
        assert 16 * MiB <= kept.st_size < 32 * MiB
        assert kept.st_blocks * 512 < 4 * MiB  # sparse: the zero blocks were skipped, not written
        assert kept.st_mode & 0o777 == 0o600
        assert part.with_name("esxi-flat.vmdk.part.tag").read_text()  # vcsim's Last-Modified
        if changed:
            flat = folder / "esxi-flat.vmdk"
            os.utime(flat, (time.time() + 10, time.time() + 10))

        before = proxy.served
        rerun = v2p("migrate", source, "--vmid", "121", "--no-boot-check", **env)
        assert rerun.returncode == 0, rerun.stderr
        served = proxy.served - before
    finally:
        proxy.close()
    missing = 32 * MiB if changed else 32 * MiB - kept.st_size
    print(f"killed at {kept.st_size} bytes; the rerun was served {served} for the {missing} missing")  # noqa: T201
    assert missing <= served < missing + 2 * MiB, (served, missing)  # the rest, and the API's few KiB
    assert_same_bytes(samples / "guest.raw", v2p.disk(121))


def test_a_connection_cut_midway_is_resumed_in_the_same_run(vcsim: Vcsim, si: Any, samples: Path,
                                                             v2p: Any) -> None:
    sample_vm(si, samples, "mig05")
    proxy = CountingProxy(vcsim.port, cut_at=12 * MiB)
    try:
        proc = v2p("migrate", uri(vcsim, "mig05", proxy.port), "--vmid", "124", "--no-boot-check",
                   V2P_VSPHERE_PASSWORD=vcsim.password)
    finally:
        proxy.close()
    assert proc.returncode == 0, proc.stderr
    assert "resumed 1 time(s) after a break" in proc.stdout + proc.stderr
    assert 32 * MiB <= proxy.served < 34 * MiB  # the part after the cut only, not the whole file again
    assert_same_bytes(samples / "guest.raw", v2p.disk(124))


def test_a_snapshot_chain_is_read_link_by_link(vcsim: Vcsim, si: Any, samples: Path, v2p: Any,
                                              tmp_path: Path) -> None:
    """A disk whose current file is a delta over the sample (the backing's ``parent``): both links'
    files downloaded, the chain consolidated locally; the migrated disk is the sample with the
    delta's write."""
    from pyVmomi import vim

    folder = sample_vm(si, samples, "mig04")
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-F", "vmdk", "-b", "esxi.vmdk", "mig04-000001.vmdk"],
                   cwd=folder, check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 4M 64k", "mig04-000001.vmdk"], cwd=folder, check=True,
                   capture_output=True)
    (folder / "mig04-000001-flat.vmdk").touch()  # vcsim wants one beside any disk; v2p reads what the chain names
    expected = tmp_path / "expected.raw"
    data = bytearray((samples / "guest.raw").read_bytes())
    data[4 * MiB:4 * MiB + 64 * 1024] = b"\x5a" * 64 * 1024
    expected.write_bytes(bytes(data))

    vm = si.RetrieveContent().searchIndex.FindByInventoryPath("DC0/vm/mig04")
    disk = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk))
    # A snapshot of a flat disk: a FlatVer2 backing over its parent's, as vSphere shows it.
    disk.backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
        fileName="[LocalDS_0] mig04/mig04-000001.vmdk", diskMode="persistent", parent=disk.backing,
        deltaDiskFormat="redoLogFormat")
    edit = vim.vm.device.VirtualDeviceSpec(operation=vim.vm.device.VirtualDeviceSpec.Operation.edit, device=disk)
    wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[edit])))

    proc = v2p("migrate", uri(vcsim, "mig04"), "--vmid", "123", "--no-boot-check",
               V2P_VSPHERE_PASSWORD=vcsim.password)
    assert proc.returncode == 0, proc.stderr
    assert "fetch: scsi0:0: 2 link(s) of [LocalDS_0] mig04/mig04-000001.vmdk" in proc.stdout + proc.stderr
    assert_same_bytes(expected, v2p.disk(123))


def test_a_missing_extent_is_refused_in_one_line(vcsim: Vcsim, si: Any, samples: Path, inproc: Any) -> None:
    folder = sample_vm(si, samples, "mig03")
    (folder / "esxi-flat.vmdk").unlink()
    shown = inproc.bare("migrate", uri(vcsim, "mig03"), "--vmid", "122", "--no-boot-check",
                        V2P_VSPHERE_PASSWORD=vcsim.password)
    assert shown.returncode != 0 and "Traceback" not in shown.stderr
    error = [line for line in shown.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and "/DC0/vm/mig03: scsi0:0 ([LocalDS_0] mig03/esxi.vmdk): downloading " \
        "[LocalDS_0] mig03/esxi-flat.vmdk: HTTP 404" in error[0], shown.stderr



# -- the pieces alone (no server: the fast tier) ----------------------------------------------------------

def test_datastore_paths_stay_inside_their_datastore_folder() -> None:
    from v2p.errors import SourceError
    from v2p.sources.vsphere_api import parse_uri
    from v2p.sources.vsphere_fetch import DatastoreFile, datacenter_path

    file = DatastoreFile.parse("[ds 1] web01/web01.vmdk", "vm")
    assert (file.datastore, file.path, file.name, str(file)) == ("ds 1", "web01/web01.vmdk", "web01.vmdk",
                                                                 "[ds 1] web01/web01.vmdk")
    assert str(file.sibling("web01-flat.vmdk", "vm")) == "[ds 1] web01/web01-flat.vmdk"
    for bad in ("web01/web01.vmdk", "[ds1] /etc/passwd", "[ds1] a/../../b.vmdk", "[ds1] "):
        with pytest.raises(SourceError):
            DatastoreFile.parse(bad, "vm")
    for bad in ("../x-flat.vmdk", "/vmfs/volumes/ds1/x-flat.vmdk", "sub/x-flat.vmdk", ".."):
        with pytest.raises(SourceError, match="not a file beside it"):
            file.sibling(bad, "vm")
    assert datacenter_path(parse_uri("vsphere://u@vc/DC0/vm/web01")) == "DC0"
    assert datacenter_path(parse_uri("vsphere://u@vc/Europe/DC1/vm/prod/web01")) == "Europe/DC1"


class _Body:
    """A response body in chunks, as requests' ``iter_content`` gives it."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def iter_content(self, _size: int) -> Iterator[bytes]:
        yield from self.chunks


def test_zero_blocks_are_skipped_and_the_part_s_size_is_how_far_it_got(tmp_path: Path) -> None:
    from v2p.sources.vsphere_api import parse_uri
    from v2p.sources.vsphere_fetch import BLOCK, DatastoreFile, Fetcher

    fetcher = Fetcher(parse_uri("vsphere://u@vc/DC0/vm/web01"), "vmware_soap_session=x", "vm")
    data = [b"\1" * BLOCK + bytes(3 * BLOCK), bytes(4 * BLOCK)]  # data, then only zeros to the end
    part = tmp_path / "x-flat.vmdk.part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        end = fetcher._write(_Body(data), fd, 0, 8 * BLOCK, DatastoreFile("ds", "x/x-flat.vmdk"), lambda n: None)
    finally:
        os.close(fd)
    assert end == part.stat().st_size == 8 * BLOCK  # trailing zeros: the size, not the blocks
    assert part.read_bytes() == b"".join(data)
    assert part.stat().st_blocks * 512 <= 2 * BLOCK
    assert fetcher.downloaded == 8 * BLOCK


def test_a_disk_not_downloaded_measures_as_its_capacity_and_reads_nothing(tmp_path: Path) -> None:
    """What preflight's space check and a plan's measure get before the VM may be read."""
    from v2p import convert
    from v2p.errors import V2PError
    from v2p.sources.vsphere_fetch import unread_endpoint
    from v2p.storage import Volume

    endpoint = unread_endpoint(32 * MiB, "vmfsThin")
    assert convert.measure(endpoint, "raw") == 32 * MiB
    assert convert.measure(endpoint, "qcow2") >= 32 * MiB
    with pytest.raises((V2PError, OSError)):
        convert.convert(endpoint, Volume("", tmp_path / "out.raw", "raw"), capacity=32 * MiB)
