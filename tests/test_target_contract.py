"""The contract every target keeps, checked against each kind of target for real.

The pipeline holds a ``Target`` and never asks which kind: whatever one kind
does here, every kind must do. A kind is one entry of ``KINDS``: how to make
one in a folder, where a volume's bytes can be read to check them, and the
places its disk sinks can write to (each set up for real: a dir storage, an
LVM volume group on a loop device, a loop device written in place). The
sample guest boots under QEMU TCG.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from lvm_loop.loop_activation import LoopActivation

from blockdev import LVM_ENV, loop_device, volume_group
from fakes import FakeGuest, FakeTarget
from targetwatch import observe
from v2p.endpoint import DiskEndpoint
from v2p.errors import NoSuchVMError, TargetError, ToolError, VerifyError, VMIDExistsError
from v2p.options import OptionError
from v2p.storage.lvm import LvmStorage
from v2p.targets.base import DiskSink, Target, VMConfig
from v2p.targets.local import LocalTarget
from v2p.targets.proxmox import ProxmoxTarget, target_from_url
from v2p.volumes import VolumeRef

MiB = 1 << 20
Place = dict[str, Any]  # the disk_sink keywords that send a disk to one place: storage, device


def _local_place(target: Target, place: str, tmp: Path, stack: contextlib.ExitStack,
                 monkeypatch: pytest.MonkeyPatch) -> Place:
    assert isinstance(target, LocalTarget)
    if place == "dir":
        return {"storage": "local"}
    if place == "lvm":
        for key, value in LVM_ENV.items():  # for any `python -m v2p` it starts
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(LvmStorage, "activation", LoopActivation())
        vg, _pv = stack.enter_context(volume_group(tmp))
        target.add_storage("vmdata", "lvm", {"vgname": vg})
        return {"storage": "vmdata"}
    if place == "device":
        device = stack.enter_context(loop_device(tmp / "device.img", 32 * MiB))
        return {"storage": "local", "device": str(device)}
    raise AssertionError(place)


def _local_volume_file(target: Target, volid: str) -> tuple[Path, str]:
    assert isinstance(target, LocalTarget)
    return target.volume_file(volid)


def _fake_make(folder: Path) -> Target:
    """The fake with the contract's guests scripted: VM 150's (the sample guest) reports itself and powers
    off; 151's and 152's (the halting disk) stay up and ignore the power button."""
    made = FakeTarget(folder)
    made.guests[150] = FakeGuest(output="v2p-guest: poweroff\n", powers_off=True)
    made.guests[151] = made.guests[152] = FakeGuest(obeys_power_button=False)
    return made


def _fake_volume_file(target: Target, volid: str) -> tuple[Path, str]:
    assert isinstance(target, FakeTarget)
    ref = VolumeRef.parse(volid)
    return target.storage(ref.storage).path_of(volid), "qcow2" if ref.volname.endswith(".qcow2") else "raw"


@dataclass(frozen=True)
class Kind:
    make: Callable[[Path], Target]
    volume_file: Callable[[Target, str], tuple[Path, str]]  # (path, format) of a volume's bytes
    places: tuple[str, ...]
    place: Callable[[Target, str, Path, contextlib.ExitStack, pytest.MonkeyPatch], Place]
    close: Callable[[Target], None] = lambda target: None  # after the test: stop what make started
    skips: dict[str, str] = field(default_factory=dict)  # test name -> why this kind cannot run it


_SIMS: dict[int, Any] = {}  # id(target) -> the PVE simulator it talks to


def _sim_make(folder: Path, *, on_node: bool = False, release: str | None = None) -> Target:
    """``on_node``: v2p on the node itself, writing the sim's storage (``on-node=1``). ``release``: a
    node of that release as a fresh install leaves it (its VM disks on local-lvm); for the path from a
    workstation, `local` set up as docs/proxmox.md says, its content types kept plus ``import``."""
    from pve_sim.fixture import start_or_skip
    sim = start_or_skip(folder / "sim", release=release).start()
    sim.cluster.guest_shuts_down = False  # the stop test's halting guest ignores the power button
    storage = "local" if release is None else "local-lvm"
    url = f"pve://root@pam!v2p@{sim.host}/{sim.cluster.node}?storage={storage}&fingerprint={sim.fingerprint}"
    url += "&on-node=1" if on_node else ""
    if release is not None and not on_node:
        sim.cluster.set_content("local", sim.cluster.storage("local").content | {"import"})
    made = ProxmoxTarget(target_from_url(url, {"V2P_PVE_TOKEN": sim.tokens["root@pam!v2p"]}),
                         state_root=folder / "state")
    _SIMS[id(made)] = sim
    return made


def _sim_volume_file(target: Target, volid: str) -> tuple[Path, str]:
    """A remote PVE sink's volid is ``STORAGE:0,import-from=VOLID,...``: its bytes are the uploaded
    file; an on-node sink's is the volume itself."""
    cluster = _SIMS[id(target)].cluster
    source = volid.split("import-from=", 1)[1].split(",")[0] if "import-from=" in volid else volid
    return cluster.volume_path(source), "qcow2" if source.endswith(".qcow2") else "raw"


_SIM_SKIPS = {
    "test_config_round_trip": "PVE refuses a disk key naming a volume that does not exist (the test's scsi1); "
                              "test_proxmox_target has a round trip with PVE's own rules",
    "test_the_sample_guest_runs_then_stops": "the simulator runs no guest: no serial output, no ACPI power-off",
}

KINDS: dict[str, Kind] = {
    "fake": Kind(_fake_make, _fake_volume_file, ("dir",), lambda *args: {"storage": "local"}),
    "local": Kind(lambda folder: LocalTarget(folder, accel="tcg"), _local_volume_file,
                  ("dir", "lvm", "device"), _local_place),
    "proxmox-sim": Kind(_sim_make, _sim_volume_file, ("local",), lambda *args: {"storage": "local"},
                        close=lambda target: _SIMS.pop(id(target)).stop(), skips=_SIM_SKIPS),
    # local-lvm: a volume PVE allocates, written in place under its final name.
    "proxmox-node": Kind(lambda folder: _sim_make(folder, on_node=True), _sim_volume_file,
                         ("local", "local-lvm"), lambda _target, place, *rest: {"storage": place},
                         close=lambda target: _SIMS.pop(id(target)).stop(), skips=_SIM_SKIPS),
    # The releases where the paths' behaviour differs (tests/pve_sim/releases.py): 8.4 is the first
    # that takes a qcow2 upload into `import` (the workstation path); 8.0 takes none, so it is the
    # on-node path's oldest node. 9.x is the default simulator above.
    "proxmox-sim@8.4": Kind(lambda folder: _sim_make(folder, release="8.4"), _sim_volume_file,
                            ("local-lvm",), lambda *args: {"storage": "local-lvm"},
                            close=lambda target: _SIMS.pop(id(target)).stop(), skips=_SIM_SKIPS),
    "proxmox-node@8.0": Kind(lambda folder: _sim_make(folder, on_node=True, release="8.0"), _sim_volume_file,
                             ("local-lvm",), lambda *args: {"storage": "local-lvm"},
                             close=lambda target: _SIMS.pop(id(target)).stop(), skips=_SIM_SKIPS),
}


_BOOTING_KINDS = {"local"}  # its start runs the guest under QEMU (the simulators here run none: no run_vms)


def _tiered(value: Any, kind: str, *, running: bool = False) -> Any:
    """A fixture parameter of kind ``kind``: one that starts the PVE simulator is marked so, and every
    real kind is slow (it boots a guest or runs a storage end to end); the fake is the fast tier's.
    ``running``: for a test that starts its VMs, a kind whose start boots a guest is marked ``boots``
    (per kind, so a mark here: the ``boots`` fixture would mark every kind)."""
    if kind.startswith("proxmox"):
        return pytest.param(value, marks=[pytest.mark.pve_sim, pytest.mark.slow])
    if running and kind in _BOOTING_KINDS:
        return pytest.param(value, marks=[pytest.mark.boots, pytest.mark.slow])
    return value if kind == "fake" else pytest.param(value, marks=pytest.mark.slow)


@pytest.fixture(params=[_tiered(k, k) for k in sorted(KINDS)])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# For a test that starts VMs: the ``kind`` fixture's kinds, those that boot a guest marked so.
running_kinds = pytest.mark.parametrize("kind", [_tiered(k, k, running=True) for k in sorted(KINDS)])


@pytest.fixture
def target(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.node.originalname in KINDS[kind].skips:
        pytest.skip(KINDS[kind].skips[request.node.originalname])
    made = KINDS[kind].make(tmp_path / "target")
    yield made
    for vmid in made.list_vms():  # no VM outlives its test, even a failed one
        with contextlib.suppress(TargetError):
            made.destroy_vm(vmid)
    KINDS[kind].close(made)


@dataclass
class Placed:
    """A target and one place its disks can go to (the ``disk_sink`` keywords that send them there)."""

    target: Target
    place: Place
    kind: Kind

    def sink(self, vmid: int, index: int = 0, fmt: str | None = None) -> DiskSink:
        return self.target.disk_sink(vmid, index, fmt=fmt, **self.place)

    @property
    def device(self) -> bool:
        """A user's block device: there before anything is written, and never deleted (a volume a
        target allocates to write in place comes and goes with the disk)."""
        return "device" in self.place

    def same_bytes(self, volid: str, raw: Path) -> subprocess.CompletedProcess[str]:
        """qemu-img compare of the volume's bytes with ``raw`` (a device may be longer:
        its tail must then read as zeros)."""
        path, fmt = self.kind.volume_file(self.target, volid)
        return subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, str(raw), str(path)],
                              capture_output=True, text=True)


@pytest.fixture(params=[_tiered((k, p), k) for k in sorted(KINDS) for p in KINDS[k].places], ids="-".join)
def placed(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Placed]:
    kind_name, place = request.param
    kind = KINDS[kind_name]
    if request.node.originalname in kind.skips:
        pytest.skip(kind.skips[request.node.originalname])
    made = kind.make(tmp_path / "target")
    with contextlib.ExitStack() as stack:
        yield Placed(made, kind.place(made, place, tmp_path, stack, monkeypatch), kind)
        for vmid in made.list_vms():
            with contextlib.suppress(TargetError):
                made.destroy_vm(vmid)
    kind.close(made)


def raw_input(path: Path) -> DiskEndpoint:
    return DiskEndpoint("raw", str(path))


def guest_config(volid: str, size: str, **extra: str) -> VMConfig:
    return {"name": "contract", "memory": "64", "cores": "1", "ostype": "other",
            "ide0": f"{volid},size={size}", "boot": "order=ide0", **extra}


def home(target: Target) -> str:
    """The storage a kind's VM disks go to by default (a PVE release's fresh install: local-lvm)."""
    return target.settings.storage if isinstance(target, ProxmoxTarget) else "local"


def put_disk(target: Target, vmid: int, raw: Path) -> DiskSink:
    """``raw`` written, verified and committed as disk 0 of ``vmid`` on the default storage."""
    sink = target.disk_sink(vmid, 0, fmt=None, storage=home(target))
    capacity = raw.stat().st_size
    sink.write(raw_input(raw), capacity=capacity)
    sink.verify(raw_input(raw), capacity=capacity)
    sink.commit()
    return sink


@pytest.fixture
def halting_disk(tmp_path: Path) -> Path:
    """A 1 MiB disk whose boot sector halts with interrupts off: a guest that stays up and
    ignores the ACPI power button (cli; hlt; jmp back to hlt)."""
    disk = tmp_path / "halt.raw"
    sector = b"\xfa\xf4\xeb\xfd".ljust(510, b"\0") + b"\x55\xaa"
    disk.write_bytes(sector.ljust(MiB, b"\0"))
    return disk


# -- VMs and their configs ------------------------------------------------------

def test_create_refuses_a_taken_vmid(target: Target) -> None:
    assert not target.vm_exists(120)
    target.create_vm(120, {"name": "first", "memory": "64"})
    assert target.vm_exists(120)
    with pytest.raises(VMIDExistsError, match="120"):
        target.create_vm(120, {"name": "second", "memory": "64"})
    assert target.get_config(120)["name"] == "first"


def test_config_round_trip(target: Target) -> None:
    config = {"name": "round-trip", "memory": "2048", "cores": "2",
              "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1",
              "scsi1": "local:121/vm-121-disk-1.qcow2,size=1G,discard=on",
              "description": "imported from web 01.vmx (v2p migration abc)"}
    target.create_vm(121, config)
    assert target.get_config(121) == config
    target.set_config(121, {"cores": "4", "boot": "order=scsi1;net0", "tags": "a;b"}, delete=("scsi1", "nosuch"))
    expected = {**config, "cores": "4", "boot": "order=scsi1;net0", "tags": "a;b"}
    del expected["scsi1"]
    assert target.get_config(121) == expected


def test_config_of_a_missing_vm(target: Target) -> None:
    with pytest.raises(NoSuchVMError):
        target.get_config(122)
    with pytest.raises(NoSuchVMError):
        target.set_config(122, {"name": "x"})
    with pytest.raises(NoSuchVMError):
        target.destroy_vm(122)


def test_list_vms(target: Target) -> None:
    assert target.list_vms() == []
    for vmid in (131, 130, 1000):
        target.create_vm(vmid, {"name": f"vm{vmid}"})
    assert target.list_vms() == [130, 131, 1000]
    target.destroy_vm(131)
    assert target.list_vms() == [130, 1000]


# -- disk sinks -----------------------------------------------------------------

def test_disk_sink_write_verify_commit_remove(placed: Placed, samples: Path) -> None:
    raw = samples / "guest.raw"
    capacity = raw.stat().st_size
    sink = placed.sink(140)
    if placed.device:  # there before anything is written, and always "written"
        assert sink.exists() and sink.written()
    else:
        assert not sink.exists() and not sink.written() and sink.fingerprint() == {}
    volid = sink.volid

    sink.write(raw_input(raw), capacity=capacity)
    assert sink.written()
    assert sink.exists() is sink.in_place  # nothing under the final name until verified
    written = sink.fingerprint()
    assert written
    sink.verify(raw_input(raw), capacity=capacity)

    assert sink.commit() == volid
    assert sink.exists() and sink.written() is sink.in_place
    assert sink.commit() == volid  # idempotent
    assert sink.fingerprint() == written  # the rename kept what the record says
    proc = placed.same_bytes(volid, raw)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # A resumed run (a fresh sink) finds the committed volume, verifies it there and
    # commits it again without harm.
    again = placed.sink(140)
    assert again.volid == volid and again.exists() and again.fingerprint() == written
    again.verify(raw_input(raw), capacity=capacity)
    assert again.commit() == volid

    again.remove()
    fresh = placed.sink(140)
    if placed.device:  # a user's device is never deleted
        assert fresh.exists()
    else:
        assert not fresh.exists() and not fresh.written() and fresh.fingerprint() == {}
        with pytest.raises(TargetError, match="nothing written"):
            fresh.commit()


@pytest.mark.parametrize("offset", [0, 12 * MiB + 7], ids=["data", "hole"])
def test_verify_fails_on_one_flipped_byte(placed: Placed, samples: Path, tmp_path: Path,
                                          offset: int) -> None:
    raw = samples / "guest.raw"
    capacity = raw.stat().st_size
    flipped = tmp_path / "flipped.raw"
    shutil.copyfile(raw, flipped)
    with open(flipped, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))
    sink = placed.sink(141)
    sink.write(raw_input(raw), capacity=capacity)
    with pytest.raises(VerifyError):
        sink.verify(raw_input(flipped), capacity=capacity)
    assert sink.exists() is sink.in_place  # a failed verify commits nothing
    sink.commit()
    with pytest.raises(VerifyError):  # nor does it pass once committed
        placed.sink(141).verify(raw_input(flipped), capacity=capacity)


def test_a_failed_write_leaves_no_temporary_volume(placed: Placed, tmp_path: Path) -> None:
    sink = placed.sink(142)
    with pytest.raises(ToolError):
        sink.write(raw_input(tmp_path / "missing.raw"), capacity=MiB)
    assert sink.written() is placed.device and sink.exists() is placed.device


def test_disk_sink_formats(placed: Placed) -> None:
    preferred = placed.sink(143)
    assert placed.sink(143, fmt=preferred.fmt).volid == preferred.volid
    if not placed.device:  # a device holds one disk, whichever index it is given for
        assert placed.sink(143, 1).volid != preferred.volid
    with pytest.raises(OptionError, match="--format vmdk"):
        placed.sink(143, fmt="vmdk")


def test_disk_sink_check(placed: Placed, samples: Path) -> None:
    raw = samples / "guest.raw"
    sink = placed.sink(145)
    room = sink.check(raw_input(raw), capacity=raw.stat().st_size)
    assert room["format"] == sink.fmt and room["storage"]
    assert 0 < room["required_bytes"] <= room["free_bytes"]
    assert not sink.written() or placed.device  # a check writes nothing


def test_disk_sink_on_an_unknown_storage(target: Target) -> None:
    with pytest.raises(TargetError, match="nosuch"):
        target.disk_sink(144, 0, fmt=None, storage="nosuch")


# -- running VMs ----------------------------------------------------------------

@running_kinds
def test_the_sample_guest_runs_then_stops(target: Target, samples: Path) -> None:
    sink = put_disk(target, 150, samples / "guest.raw")
    target.create_vm(150, guest_config(sink.volid, "32M"))
    assert target.status(150) == "stopped"
    target.start(150)
    try:
        # Under TCG it is up and powered off again some 0.1 s after start returns: on a busy
        # machine it may be gone before status is asked (the halting guest below pins "running").
        status = target.status(150)
        assert status == "running" or "v2p-guest: poweroff" in target.guest_output(150), status
        # The guest reports itself, then powers the VM off over ACPI.
        seen, output = observe(target, 150, timeout=90, patterns={})
        assert seen == "stopped", output[-2000:]
        assert "v2p-guest: poweroff" in target.guest_output(150)
        assert target.status(150) == "stopped"
        assert target.stop(150, timeout=5) is True  # stopping a stopped VM: nothing to do
        assert target.status(150) == "stopped"
    finally:
        if target.status(150) == "running":
            target.stop(150, timeout=1)


@running_kinds
def test_stop_a_guest_that_ignores_the_power_button(target: Target, halting_disk: Path) -> None:
    sink = put_disk(target, 151, halting_disk)
    target.create_vm(151, guest_config(sink.volid, "1M"))
    target.start(151)
    try:
        assert target.status(151) == "running"
        with pytest.raises(TargetError, match="already running"):
            target.start(151)
        assert target.stop(151, timeout=2) is False  # not by itself: stopped hard
        assert target.status(151) == "stopped"
    finally:
        if target.status(151) == "running":
            target.stop(151, timeout=1)


@running_kinds
def test_destroy_removes_a_running_vm_and_its_disks(target: Target, halting_disk: Path) -> None:
    sink = put_disk(target, 152, halting_disk)
    target.create_vm(152, guest_config(sink.volid, "1M"))
    target.start(152)
    assert target.status(152) == "running"
    target.destroy_vm(152)
    assert not target.vm_exists(152) and 152 not in target.list_vms()
    fresh = target.disk_sink(152, 0, fmt=None, storage=home(target))
    assert not fresh.exists() and not fresh.written()
    target.create_vm(152, {"name": "again"})  # the VMID is free again
    assert target.get_config(152) == {"name": "again"}
