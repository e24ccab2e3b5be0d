"""`v2p plan run` for real: YAML plans of mixed VMs (loose disks, a .vmx, an .ova, the Windows stand-in with
its driver dance, the Linux sample guest) run by the real CLI, each migration in a child process, guests
booted under QEMU TCG on the local target and through the PVE simulator; a SIGKILL of the run in the middle
then a rerun; one VM failing while the others finish; Ctrl-C; the free space reserved across children."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pve_sim.fixture import pve_fixture  # noqa: F401
from test_dance import drivers_iso, standin  # noqa: F401 - drivers_iso is a fixture
from test_whole_vm import make_vm

from conftest import ROOT, V2P, guest_report
from v2p.plan import PlanVM
from v2p.planrun import run_plan
from v2p.state import VmidLock

MiB = 1 << 20

OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References><File ovf:href="appliance-disk1.vmdk" ovf:id="file1" ovf:size="{size}"/></References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="32" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1"
        ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="appliance">
    <Info>A virtual machine</Info>
    <Name>appliance</Name>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian11_64Guest"><Info>OS</Info></OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:ElementName>1 virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:ElementName>256MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>256</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""

# (name, VMID, what the guest must say on its serial port): the bus each one is expected to boot from.
WAVE = [
    ("ide01", 401, ("ide", "8086:7010")),
    ("blk01", 402, ("virtio-blk", "1af4:1001")),
    ("web01", 403, ("virtio-scsi", "1af4:1004")),
    ("appliance", 404, ("sata", "8086:2922")),
    ("win7", 405, "v2p-guest: windows up on virtio-blk (viostor)"),
    ("linux01", 406, ("virtio-scsi", "1af4:1004")),
]


def make_ova(folder: Path, samples: Path) -> Path:
    """An OVA (tar: .ovf first) holding the sample guest as a streamOptimized disk, read in place."""
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    disk = samples / "streamOptimized" / "streamOptimized.vmdk"
    ovf = OVF.format(size=disk.stat().st_size).encode()
    ova = folder / "appliance.ova"
    with tarfile.open(ova, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("appliance.ovf")
        info.size = len(ovf)
        import io

        tar.addfile(info, io.BytesIO(ovf))
        tar.add(disk, arcname="appliance-disk1.vmdk")
    return ova


def wave_sources(tmp_path: Path, manifest: dict[str, Any], samples: Path) -> dict[str, Path]:
    """The six sources of the wave, in a folder of their own."""
    src = tmp_path / "src"
    loose = {}
    for name, flavor in (("ide01", "monolithicSparse"), ("blk01", "twoGbMaxExtentSparse"), ("linux01", "esxi")):
        entry = manifest["flavors"][flavor]
        shutil.copytree(samples / entry["dir"], src / name)
        loose[name] = src / name / Path(entry["descriptor"]).name
    vmx, _raws = make_vm(src / "web01", samples)
    return {**loose, "web01": vmx, "appliance": make_ova(src / "appliance", samples),
            "win7": standin(manifest, tmp_path, "winguest")}


def wave_plan(sources: dict[str, Path], target: str, iso: Path, *, extra: str = "") -> str:
    return f"""\
defaults:
  target: {target}
  bridge: vmbr0
  boot_timeout: 120
{extra}vms:
  - source: {sources["ide01"]}
    vmid: 401
    name: ide01
    bus: ide
  - source: {sources["blk01"]}
    vmid: 402
    name: blk01
    bus: virtio
  - source: {sources["web01"]}
    vmid: 403
    name: web01
    networks: {{LAN: vmbr0, DMZ: vmbr1}}
  - source: {sources["appliance"]}
    vmid: 404
    name: appliance
    bus: sata
  - source: {sources["win7"]}
    vmid: 405
    name: win7
    os: win7
    bus: virtio
    drivers_iso: {iso}
  - source: {sources["linux01"]}
    vmid: 406
    name: linux01
"""


def local_target(folder: Path) -> str:
    return f"{{kind: local, dir: {folder}, accel: tcg}}"


def plan_run(v2p: V2P, plan: Path, *args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
    return v2p("plan", "run", str(plan), *args, timeout=timeout, **env)


def concurrency(output: str) -> int:
    """The most VMs that ran at once, from the plain lines' `started` and outcome lines."""
    running, most = set(), 0
    for line in output.splitlines():
        match = re.match(r"\[([^\]]+)\]( VMID \d+)? (started|migrated|nothing to do|failed|interrupted)", line)
        if not match:
            continue
        if match.group(3) == "started":
            running.add(match.group(1))
        else:
            running.discard(match.group(1))
        most = max(most, len(running))
    return most


def assert_booted_as_expected(serial_of: Any, manifest: dict[str, Any]) -> None:
    for name, vmid, expected in WAVE:
        serial = serial_of(vmid)
        if isinstance(expected, str):
            assert expected in serial and "STOP 0x" not in serial, f"{name}: {serial[-1500:]}"
        else:
            assert guest_report(serial) == (*expected, manifest["marker"]), name


def test_six_vms_at_parallel_3_all_boot_on_their_bus_and_a_rerun_does_nothing(
        tmp_path, manifest, samples, drivers_iso, v2p: V2P):  # noqa: F811
    target = tmp_path / "target"
    plan = tmp_path / "wave.yaml"
    plan.write_text(wave_plan(wave_sources(tmp_path, manifest, samples), local_target(target), drivers_iso))
    proc = plan_run(v2p, plan, "--parallel", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert concurrency(proc.stdout) == 3, proc.stdout  # three at once, never more
    for name, vmid, _expected in WAVE:
        assert re.search(rf"^{name} +{vmid}  migrated ", proc.stdout, re.M), proc.stdout
    assert "6 of 6 VMs migrated" in proc.stdout
    assert_booted_as_expected(v2p.serial, manifest)
    configs = {vmid: v2p.config(vmid) for _name, vmid, _expected in WAVE}
    assert configs[405]["boot"] == "order=virtio0" and configs[404]["boot"] == "order=sata0"
    # The same command again: every VM is finished, nothing is written (the JSON report says so).
    again = plan_run(v2p, plan, "--parallel", "3", "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["ok"] and [vm["result"] for vm in report["vms"]] == ["nothing to do"] * 6
    assert all(vm["bytes_moved"] == 0 for vm in report["vms"])
    assert {configs[vmid] == v2p.config(vmid) for _n, vmid, _e in WAVE} == {True}


@pytest.mark.usefixtures("boots")
def test_the_same_wave_onto_the_pve_simulator(pve, tmp_path, manifest, samples, drivers_iso,  # noqa: F811
                                               v2p: V2P):
    pve.runner = pve.run_vms()
    pve.cluster.bridges.append("vmbr1")  # the wave's DMZ network: plan run checks the node has it
    url = (f"pve://root@pam!v2p@{pve.host}/{pve.cluster.node}?storage=local&fingerprint={pve.fingerprint}"
           "&on-node=1")  # on the node: the dance reads the guest's serial port (no operator needed)
    plan = tmp_path / "wave-pve.yaml"
    plan.write_text(wave_plan(wave_sources(tmp_path, manifest, samples), f'"{url}"', drivers_iso))
    env = {"V2P_PVE_TOKEN": pve.tokens["root@pam!v2p"], "XDG_DATA_HOME": str(tmp_path / "xdg"),
           "V2P_PVE_QEMU_RUN_DIR": str(pve.runner.qemu_server_dir)}
    proc = plan_run(v2p, plan, "--parallel", "3", **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert concurrency(proc.stdout) == 3
    assert sorted(pve.cluster.vms) == [vmid for _n, vmid, _e in WAVE]
    assert_booted_as_expected(lambda vmid: (pve.runner.run_dir(vmid) / "serial.log").read_text(errors="replace"),
                              manifest)
    assert pve.refused == [], pve.refused
    assert pve.unsimulated == [], pve.unsimulated


def slow_plan(tmp_path: Path, manifest: dict[str, Any], samples: Path, target: Path) -> Path:
    """Four VMs without boot checks: a quick one, a .vmx whose 24 MiB data disk is written at 4 MiB/s
    after its boot disk, a 16 MiB loose disk written at 2 MiB/s, and one more that waits for a slot."""
    src = tmp_path / "src"
    for name in ("quick", "last"):
        shutil.copytree(samples / "monolithicSparse", src / name)
    (src / "slow").mkdir()
    raw_vmdk(src / "slow" / "monolithicSparse.vmdk", 16)
    vmx, _raws = make_vm(src / "web01", samples)
    raw_vmdk(vmx.parent / "data.vmdk", 24)  # random bytes: bwlimit slows what is really copied
    plan = tmp_path / "slow.yaml"
    plan.write_text(f"""\
defaults:
  target: {local_target(target)}
  bridge: vmbr0
  boot_check: false
vms:
  - {{source: {src / "quick" / "monolithicSparse.vmdk"}, vmid: 501, name: quick}}
  - {{source: {vmx}, vmid: 502, name: web01, bwlimit: 4096}}
  - {{source: {src / "slow" / "monolithicSparse.vmdk"}, vmid: 503, name: slow, bwlimit: 2048}}
  - {{source: {src / "last" / "monolithicSparse.vmdk"}, vmid: 504, name: last}}
""")
    return plan


def read_until(proc: subprocess.Popen[str], done: Any, timeout: float = 120) -> str:
    """The run's stdout up to the moment ``done(text so far)`` holds."""
    import select

    assert proc.stdout is not None
    fd, seen = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    while not done(seen.decode(errors="replace")):
        assert time.monotonic() < deadline, seen.decode()
        if select.select([fd], [], [], 0.2)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, seen.decode() + (proc.stderr.read() if proc.stderr else "")
            seen += chunk
    return seen.decode(errors="replace")


def children(output: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"started \(process (\d+)\)", output)]


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, [pid for pid in pids if alive(pid)]
        time.sleep(0.1)


def volumes(target: Path) -> dict[int, list[str]]:
    return {int(folder.name): sorted(p.name for p in folder.iterdir()) for folder in (target / "images").iterdir()}


def test_sigkill_midway_then_rerun_finishes_without_redoing_or_duplicating(tmp_path, manifest, samples,
                                                                          v2p: V2P):
    target = tmp_path / "target"
    plan = slow_plan(tmp_path, manifest, samples, target)
    args = ("plan", "run", str(plan), "--parallel", "2")
    proc = v2p.popen(*args)
    seen = read_until(proc, lambda text: "[quick] VMID 501 migrated" in text and "[web01] [convert] done" in text
                      and "[slow] VMID 503 started" in text)
    pids = children(seen)
    assert len(pids) == 3 and "[last] VMID 504 started" not in seen
    finished_at = v2p.state(501)["finished_at"]
    web01_convert = v2p.state(502)["stages"]["convert"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Run again at once: the killed run's children may still be stopping and hold their VMIDs' locks;
    # the new run waits for them rather than run a second migration of a VMID next to theirs.
    rerun = v2p.popen(*args)
    wait_gone(pids)  # the children noticed their parent's end and stopped, resumably
    assert not orphans(target)  # nor did anything they ran outlive them
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out + err
    assert "[quick] [finish] VM 501 was already migrated" in out  # finished: not redone
    assert "[web01] [convert] already done" in out and "[web01] [convert:1] done in" in out
    assert v2p.state(501)["finished_at"] == finished_at
    assert v2p.state(502)["stages"]["convert"] == web01_convert
    assert "4 of 4 VMs migrated" in out
    # One VM per VMID, one volume per disk, no temporary volume left behind.
    assert sorted(p.stem for p in (target / "qemu-server").glob("*.conf")) == ["501", "502", "503", "504"]
    assert volumes(target) == {501: ["vm-501-disk-0.qcow2"], 503: ["vm-503-disk-0.qcow2"],
                               504: ["vm-504-disk-0.qcow2"],
                               502: [f"vm-502-disk-{i}.qcow2" for i in range(3)]}


def orphans(target: Path) -> list[str]:
    """qemu-img or QEMU processes working on ``target`` whose parent is gone (init adopted them)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        cmdline = _cmdline(pid)
        if b"qemu" in cmdline and str(target).encode() in cmdline:
            try:
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == 1:
                found.append(cmdline.decode(errors="replace"))
    return found


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_ctrl_c_stops_every_child_resumably_and_says_how_to_resume(tmp_path, manifest, samples, v2p: V2P):
    target = tmp_path / "target"
    plan = slow_plan(tmp_path, manifest, samples, target)
    proc = v2p.popen("plan", "run", str(plan), "--parallel", "2")
    seen = read_until(proc, lambda text: "[web01] [convert:1] write" in text and "[slow] [convert] write" in text)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, seen + out + err
    assert "rerun the same command" in err or "run the same command again" in err, err
    wait_gone(children(seen + out))
    assert re.search(r"^web01 +502  interrupted", out, re.M) and re.search(r"^last +504  not started", out, re.M)
    assert "convert:1" not in v2p.state(502)["stages"]  # the half-written disk is not counted as done
    again = plan_run(v2p, plan)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[web01] [convert] already done" in again.stdout and "4 of 4 VMs migrated" in again.stdout


def test_one_vm_failing_does_not_stop_the_others(tmp_path, manifest, samples, v2p: V2P):
    src = tmp_path / "src"
    for name in ("a", "b"):
        shutil.copytree(samples / "monolithicSparse", src / name)
    broken = src / "broken.vmdk"
    broken.write_bytes(b"KDMV" + os.urandom(4096))  # a sparse VMDK's magic over garbage
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""\
defaults: {{target: {local_target(tmp_path / "target")}, boot_check: false}}
vms:
  - {{source: {src / "a" / "monolithicSparse.vmdk"}, vmid: 601, name: a}}
  - {{source: {broken}, vmid: 602, name: broken}}
  - {{source: {src / "b" / "monolithicSparse.vmdk"}, vmid: 603, name: b}}
""")
    proc = plan_run(v2p, plan, "--parallel", "2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert re.search(r"^a +601  migrated", proc.stdout, re.M) and re.search(r"^b +603  migrated", proc.stdout, re.M)
    assert re.search(r"^broken +602  failed", proc.stdout, re.M)
    assert re.search(r"^broken: .*broken\.vmdk", proc.stdout, re.M), proc.stdout  # the summary says why
    assert "2 of 3 VMs migrated" in proc.stdout
    report = json.loads(plan_run(v2p, plan, "--json").stdout)
    assert [vm["result"] for vm in report["vms"]] == ["nothing to do", "failed", "nothing to do"]
    assert report["vms"][1]["exit_code"] == 2 and not report["ok"]


@pytest.mark.slow
def test_a_vmid_locked_by_another_run_waits_for_it_and_gives_up_after_a_while(tmp_path, manifest, samples):
    target = tmp_path / "target"
    shutil.copytree(samples / "monolithicSparse", tmp_path / "src")
    source = tmp_path / "src" / "monolithicSparse.vmdk"
    (target / "migrations").mkdir(parents=True)
    vm = PlanVM("locked", source, 701, {"kind": "local", "dir": str(target), "accel": "tcg"}, None,
                {"boot_check": False}, 1)
    lock = VmidLock(target / "migrations", 701).__enter__()
    threading.Timer(3, lock.__exit__).start()
    seen: list[str] = []
    report = run_plan([vm], on_event=lambda run, event: seen.append(f"{event.kind} {event.message}"))
    assert [run.result for run in report.vms] == ["migrated"], report.vms[0].error
    assert "info VMID 701 is locked by another run; waiting" in seen
    assert (target / "qemu-server" / "701.conf").exists()
    # Held for longer than the plan waits: the VM fails with the lock's own message, nothing is made.
    other = PlanVM("other", source, 702, vm.target, None, {"boot_check": False}, 2)
    with VmidLock(target / "migrations", 702):
        report = run_plan([other], lock_wait=2)
    assert report.vms[0].result == "failed" and "VMID 702 is locked by another v2p run" in str(report.vms[0].error)
    assert not (target / "qemu-server" / "702.conf").exists()


@pytest.fixture
def small_storage(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 100 MiB tmpfs: room for one 50 MiB raw disk at a time (52 MiB with v2p's margin), not for two."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder = tmp_path / "small"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100M", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def raw_vmdk(path: Path, mib: int) -> Path:
    """A monolithicSparse VMDK of ``mib`` MiB, every byte written (raw output needs all of it)."""
    raw = path.with_suffix(".raw")
    raw.write_bytes(os.urandom(mib * MiB))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(raw), str(path)], check=True)
    raw.unlink()
    return path


def test_free_space_is_reserved_across_running_vms(tmp_path, small_storage, v2p: V2P):
    target = tmp_path / "target"
    added = v2p("storage", "add", "small", "--type", "dir", "--path", str(small_storage))
    assert added.returncode == 0, added.stderr
    disks = {name: raw_vmdk(tmp_path / f"{name}.vmdk", mib) for name, mib in (("one", 50), ("two", 50),
                                                                              ("huge", 160))}
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""\
defaults: {{target: {local_target(target)}, storage: small, format: raw, boot_check: false, bwlimit: 16384}}
vms:
  - {{source: {disks["huge"]}, vmid: 802, name: huge}}
  - {{source: {disks["one"]}, vmid: 801, name: one}}
  - {{source: {disks["two"]}, vmid: 803, name: two}}
""")
    proc = plan_run(v2p, plan, "--parallel", "3")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    # Each 50 MiB VM passes its own preflight on the empty storage, but not both together: the second
    # waits for the first instead of both writing into the same free space and one of them running out
    # of it halfway; once the first is done there is no room left, which it is told before it writes.
    assert "[two] VMID 803 waiting for 0.05 GiB on " in out and "(0.10 GiB free, 0.05 GiB reserved by the VMs " \
        "running there)" in out, out
    assert "[two] VMID 803 started" not in out and concurrency(out) == 1
    assert re.search(r"^one +801  migrated", out, re.M)
    assert re.search(r"^two: not enough space on dir: small: the disk needs 54525952 bytes", out, re.M), out
    assert re.search(r"^huge: not enough space on dir: small", out, re.M), out
    assert out.index("[huge] VMID 802 failed") < out.index("[one] VMID 801 started")  # never fits: at once
    assert sorted(p.name for p in (target / "qemu-server").iterdir()) == ["801.conf"]
    assert sorted(p.name for p in small_storage.rglob("*") if p.is_file()) == ["vm-801-disk-0.raw"]


def test_dry_run_shows_each_vms_stages_and_touches_nothing(tmp_path, manifest, samples, v2p: V2P):
    target = tmp_path / "target"
    plan = slow_plan(tmp_path, manifest, samples, target)
    proc = plan_run(v2p, plan, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[web01]\n  would migrate " in proc.stdout
    assert "\n    vm:        web01: 3 disk(s)" in proc.stdout, proc.stdout
    assert re.search(r"^  would migrate \S+web01.vmx to VMID 502 on the local target", proc.stdout, re.M)
    for index in range(3):
        assert f" -> scsi{index} local:502/vm-502-disk-{index}.qcow2, needs " in proc.stdout
    assert proc.stdout.count("    convert    write the disk") == 4
    assert not (target / "qemu-server").exists() and not list(target.glob("migrations/*.json"))


def child(job: dict[str, Any]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "v2p.planchild"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(job) + "\n")
    proc.stdin.flush()
    return proc


def test_the_child_takes_its_job_on_stdin_and_stops_when_its_parent_is_gone(tmp_path, manifest, samples):
    """`ps` shows argv to every user: the job (target URL, options) is not in it. The child's stdin
    stays open while its parent lives: its end (the parent killed, even with SIGKILL) stops the child
    the way Ctrl-C does, resumably."""
    shutil.copytree(samples / "monolithicSparse", tmp_path / "src")
    target = {"kind": "local", "dir": str(tmp_path / "target"), "accel": "tcg"}
    job = {"name": "a", "source": str(tmp_path / "src" / "monolithicSparse.vmdk"), "vmid": 901,
           "target": target, "options": {"boot_check": False}}
    proc = child(job)
    assert b"901" not in _cmdline(str(proc.pid)) and b"target" not in _cmdline(str(proc.pid))
    assert proc.stdout is not None and proc.stdin is not None
    lines = [json.loads(line) for line in iter(proc.stdout.readline, "")]
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    assert all(line["vmid"] == 901 for line in lines)
    assert [line["stage"] for line in lines if line.get("kind") == "stage-done"][:2] == ["inspect", "preflight"]
    assert lines[-1]["result"]["nothing_to_do"] is False

    raw_vmdk(tmp_path / "slow.vmdk", 16)
    proc = child({**job, "source": str(tmp_path / "slow.vmdk"), "vmid": 902,
                  "options": {"boot_check": False, "bwlimit": 1024}})
    assert proc.stdout is not None and proc.stdin is not None
    for line in iter(proc.stdout.readline, ""):
        if json.loads(line).get("kind") == "progress":
            break
    proc.stdin.close()  # what a parent's death looks like from here
    assert proc.wait(timeout=30) == 130
    assert json.loads(proc.stdout.read().splitlines()[-1]) == {"vmid": 902, "interrupted": 2}
    state = json.loads((tmp_path / "target" / "migrations" / "902.json").read_text())
    assert not state["finished"] and "convert" not in state["stages"] and state["failed"]["error"] == "interrupted"


def test_per_storage_limit(tmp_path, manifest, samples, v2p: V2P):
    src = tmp_path / "src"
    lines = []
    for index, name in enumerate(("a", "b", "c")):
        shutil.copytree(samples / "monolithicSparse", src / name)
        lines.append(f"  - {{source: {src / name / 'monolithicSparse.vmdk'}, vmid: {611 + index}, name: {name}}}")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"defaults: {{target: {local_target(tmp_path / 'target')}, boot_check: false}}\nvms:\n"
                    + "\n".join(lines) + "\n")
    proc = plan_run(v2p, plan, "--parallel", "3", "--per-storage", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert concurrency(proc.stdout) == 1, proc.stdout
    assert f"[b] VMID 612 waiting for a free slot on {tmp_path / 'target'}:local (at most 1 at once)" in proc.stdout
    assert "3 of 3 VMs migrated" in proc.stdout


def test_live_view_on_a_terminal(tmp_path, manifest, samples, v2p: V2P):
    """On a TTY: one line per VM (stage, bytes of the disk's total, rate) redrawn in place."""
    import pty

    plan = slow_plan(tmp_path, manifest, samples, tmp_path / "target")
    master, slave = pty.openpty()
    proc = subprocess.Popen(v2p.argv("plan", "run", str(plan), "--parallel", "3"), stdout=slave, stderr=slave,
                            stdin=subprocess.DEVNULL, env=v2p.env(), cwd=ROOT)
    os.close(slave)
    screen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's last writer is gone
            break
        if not chunk:
            break
        screen += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0, screen.decode(errors="replace")
    text = screen.decode(errors="replace")
    # tqdm draws each VM's line in place: percent, position of the disk's total, bytes written, rate, ETA
    assert re.search(r"web01 +502  convert:1: [0-9]+ % of 24\.0 MiB, [0-9.]+ [KM]iB/s, ETA 0:00:[0-9]{2}", text), \
        text[-3000:]
    assert re.search(r"last +504  (queued|waiting|running)", text)
    assert "[web01] [convert] write" not in text  # stage lines are the plain output's, not the live view's
    assert re.search(r"^web01 +502  migrated ", text.replace("\r", ""), re.M)


@pytest.mark.slow
def test_stop_flag_from_another_thread_stops_the_run_resumably(tmp_path, manifest, samples):
    """A panel runs a plan in a worker thread and stops it from another: as Ctrl-C does on the CLI."""
    plan = slow_plan(tmp_path, manifest, samples, tmp_path / "target")
    from v2p.plan import Plan

    vms = Plan.load(plan).vms
    stop = threading.Event()
    seen: list[tuple[str, str]] = []

    def on_event(run: Any, event: Any) -> None:
        seen.append((run.name, event.kind))
        if run.name == "slow" and event.kind == "progress":
            stop.set()

    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(run_plan(vms, parallel=3, on_event=on_event, stop=stop)))
    worker.start()
    worker.join(timeout=120)
    report = result[0]
    assert report.interrupted == signal.SIGINT and report.exit_code == 130
    results = {vm.name: vm.result for vm in report.vms}
    assert results["slow"] == "interrupted" and results["quick"] in ("migrated", "interrupted")
    assert not json.loads((tmp_path / "target" / "migrations" / "503.json").read_text())["finished"]
    again = run_plan(vms, parallel=3)
    assert again.ok and [vm.result for vm in again.vms if vm.name == "slow"] == ["migrated"]


def test_rule_warnings_read_as_warnings_in_plan_output() -> None:
    """Findings of warning severity (kind "finding") keep their "warning:" label in `plan run`'s lines."""
    import io

    from v2p.events import Event
    from v2p.planrun import VMRun
    from v2p.planview import PlanView

    out = io.StringIO()
    view = PlanView(out, live=False)
    vm = VMRun(name="web01", vmid=120, node="", storage="local")
    view(vm, Event("finding", "preflight", "vtpm: the TPM state does not move",
                   data={"rule": "vtpm", "severity": "warning"}))
    view(vm, Event("finding", "preflight", "snapshot-chain: consolidated", data={"rule": "snapshot-chain",
                                                                                 "severity": "info"}))
    lines = out.getvalue().splitlines()
    assert lines == ["[web01] [preflight] warning: vtpm: the TPM state does not move",
                     "[web01] [preflight] snapshot-chain: consolidated"]


@pytest.mark.slow
def test_a_child_that_ignores_sigint_is_killed_after_the_grace(monkeypatch) -> None:
    """A stuck migration must not hold a stopped run forever: after STOP_GRACE it gets SIGKILL."""
    import signal as sig
    import time as clock

    from v2p import planchild, planrun

    monkeypatch.setattr(planrun, "STOP_GRACE", 0.5)
    runner = planrun._Runner([], parallel=1, per_storage=1, per_node=1, on_event=lambda vm, event: None,
                             stop=None, accel="tcg", lock_wait=1, refused={})
    stuck = subprocess.Popen(["sh", "-c", "trap '' INT; sleep 60"])
    try:
        clock.sleep(0.2)  # the trap is set
        child = planchild.Child(0, stuck, clock.monotonic(), open_fds={-1})
        runner.running[0] = child
        runner._interrupt(sig.SIGINT)
        runner._tick()
        assert stuck.poll() is None  # SIGINT ignored, still within the grace
        clock.sleep(0.6)
        runner._tick()
        assert stuck.wait(timeout=5) == -sig.SIGKILL
    finally:
        stuck.kill()
        runner.children.close()
