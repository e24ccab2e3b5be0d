"""The driver dance's layouts, in-process on the fake target (tests/fakes.py): which bus each disk is on
in boot 1, boot 2 and after a rollback, the temporary disk added and removed, the drivers ISO and the
NIC, driven by the guest's scripted I/O counters (``FakeTarget.guest_io``) and boot outcomes.

That a real Windows stand-in installs its driver and boots on virtio is test_dance.py's (slow tier).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes import FakeGuest, FakeTarget, up
from v2p.dance import DanceOptions, DriverDance
from v2p.errors import DanceError, OperatorNeeded
from v2p.targets.base import BOOT_FAILED, BootReport, Capabilities, GuestIO, VMConfig

VMID = 312
ISO = "local:iso/virtio-win.iso"
SYSTEM = f"local:{VMID}/vm-{VMID}-disk-0.qcow2,size=32M"
# The Windows VM as the attach stage leaves it: every disk on IDE/SATA, the VM's own empty CD drive.
BEFORE: VMConfig = {
    "name": "win", "memory": "256", "ostype": "win7", "bios": "seabios", "boot": "order=ide0",
    "ide0": SYSTEM, "ide1": f"local:{VMID}/vm-{VMID}-disk-1.qcow2,size=64M",
    "ide3": f"local:{VMID}/vm-{VMID}-disk-2.qcow2,size=64M", "sata0": f"local:{VMID}/vm-{VMID}-disk-3.qcow2,size=64M",
    "ide2": "none,media=cdrom", "net0": "e1000=00:0C:29:12:34:70,bridge=vmbr0",
}
# ``v2p.dance`` the attribute is the library's dance function: the module, by its entry in sys.modules.
dance = sys.modules["v2p.dance"]
TEMP_VOLID = f"local:{VMID}/vm-{VMID}-disk-4.qcow2"  # the first disk index the config does not name


def reads_virtio(config: VMConfig) -> GuestIO:
    """A guest with the virtio driver: it reads every disk on a virtio bus."""
    return GuestIO(reads={key: 4096 for key in config if key.startswith(("virtio", "scsi"))})


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Boot 1's watch looks without sleeping, and a target without counters is known at once."""
    monkeypatch.setattr(dance, "POLL", 0.0)
    monkeypatch.setattr(dance, "NO_COUNTERS", 0.0)


@pytest.fixture
def fake(tmp_path: Path) -> FakeTarget:
    made = FakeTarget(tmp_path / "target")
    made.create_vm(VMID, BEFORE)
    made.guests[VMID] = FakeGuest(io=reads_virtio)
    return made


def danced(target: FakeTarget, bus: str = "virtio", boot1_wait: float = 1.0) -> DriverDance:
    return DriverDance(target, VMID, DanceOptions(bus=bus, iso_volid=ISO, boot1_wait=boot1_wait))


def disks(config: VMConfig) -> dict[str, str]:
    return {key: value for key, value in config.items() if key[:3] in ("ide", "sat", "vir", "scs")}


def test_virtio_layouts_of_boot_1_and_boot_2(fake: FakeTarget) -> None:
    result = danced(fake).run()
    assert result["system_disk"] == "virtio0" and result["confirmed"]
    boot1, boot2 = (s.config for s in fake.started)
    assert [s.how for s in fake.started] == ["start", "boot_check"]
    # Boot 1: every disk where it was, the temporary disk on the first virtio key no disk takes after the
    # move, the drivers ISO in the VM's CD drive, a virtio NIC beside the old one.
    assert disks(boot1) == {**disks(BEFORE), "virtio4": f"{TEMP_VOLID},size=1G", "ide2": f"{ISO},media=cdrom"}
    assert boot1["boot"] == "order=ide0" and boot1["net1"].startswith("virtio=")
    # Boot 2: the disks on virtio in order (system disk first, then IDE before SATA), the VM's own CD
    # drive back, the NIC on virtio, the temporary disk gone with its volume.
    assert disks(boot2) == {"virtio0": SYSTEM, "virtio1": BEFORE["ide1"], "virtio2": BEFORE["ide3"],
                            "virtio3": BEFORE["sata0"], "ide2": "none,media=cdrom"}
    assert boot2["boot"] == "order=virtio0" and "net1" not in boot2
    assert boot2["net0"] == "virtio=00:0C:29:12:34:70,bridge=vmbr0"
    assert [args for name, args in fake.calls if name == "remove_volume"] == [(VMID, TEMP_VOLID)]
    assert fake.volumes() == []  # the temporary disk was the only file made
    assert fake.get_config(VMID) == boot2


def test_scsi_layouts(fake: FakeTarget) -> None:
    danced(fake, "scsi").run()
    boot1, boot2 = (s.config for s in fake.started)
    assert "scsi4" in boot1 and boot1["scsihw"] == "virtio-scsi-pci"
    assert {key: boot2[key] for key in ("scsi0", "scsi1", "scsi2", "scsi3")} == \
        {"scsi0": SYSTEM, "scsi1": BEFORE["ide1"], "scsi2": BEFORE["ide3"], "scsi3": BEFORE["sata0"]}
    assert not {"ide0", "ide1", "ide3", "sata0", "scsi4"} & set(boot2) and boot2["scsihw"] == "virtio-scsi-pci"


def test_a_failed_boot_2_rolls_back_to_the_ide_layout(fake: FakeTarget) -> None:
    fake.guests[VMID].boots = [BootReport(BOOT_FAILED, 9.0, signal="STOP 0x0000007B"), up("login prompt")]
    with pytest.raises(DanceError, match="rolled back to ide0, it boots there again"):
        danced(fake).run()
    assert [s.how for s in fake.started] == ["start", "boot_check", "boot_check"]
    rolled_back = fake.started[2].config
    assert disks(rolled_back) == disks(BEFORE) and rolled_back["boot"] == "order=ide0"
    assert rolled_back["net0"] == BEFORE["net0"]
    assert fake.get_config(VMID) == rolled_back and fake.status(VMID) == "stopped"
    assert DriverDance.pending(fake, VMID) is None  # the dance's records go: the next one starts from IDE


def test_a_target_that_cannot_count_hands_over_to_the_operator(fake: FakeTarget) -> None:
    fake.guests[VMID].io = lambda _config: None
    with pytest.raises(OperatorNeeded, match="the fake target cannot tell from here what the guest reads"):
        danced(fake).run()
    assert fake.status(VMID) == "running" and not fake.held(VMID)  # the operator's boot outlives v2p
    fake.stop(VMID)  # the operator shut it down once the drivers were in
    result = danced(fake).run(confirmed=True)
    assert result["boot1"]["signal"] == "operator" and result["system_disk"] == "virtio0"
    assert fake.count("new_disk") == 1 and fake.count("start") == 1


def test_a_target_without_counters_is_not_asked_for_them(fake: FakeTarget,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``Capabilities.guest_io`` False: boot 1 goes to the operator at once, without waiting for counters."""
    monkeypatch.setattr(dance, "NO_COUNTERS", 3600.0)
    fake.capabilities = Capabilities()

    def never(_config: VMConfig) -> GuestIO:
        raise AssertionError("guest_io asked of a target that cannot count")

    fake.guests[VMID].io = never
    with pytest.raises(OperatorNeeded, match="the fake target cannot tell from here what the guest reads"):
        danced(fake, boot1_wait=3600.0).run()


def test_a_guest_that_never_reads_its_temporary_disk(fake: FakeTarget) -> None:
    fake.guests[VMID].io = lambda _config: GuestIO(reads={"ide0": 64 << 20})
    with pytest.raises(OperatorNeeded, match="it never read its temporary disk virtio4"):
        danced(fake, boot1_wait=0.0).run()


def test_ovmf_reads_before_the_os_loads_do_not_count(fake: FakeTarget) -> None:
    """OVMF may read the temporary disk while it connects devices: only reads after the boot disk has
    read what only an OS loading reads count."""
    fake.set_config(VMID, {"bios": "ovmf"})
    samples = iter([GuestIO(reads={"ide0": 1 << 20, "virtio4": 512}),       # the firmware's scan
                    GuestIO(reads={"ide0": 64 << 20, "virtio4": 512}),      # the OS loads
                    GuestIO(reads={"ide0": 65 << 20, "virtio4": 512 + 4096})])  # its driver reads the disk
    fake.guests[VMID].io = lambda _config: next(samples)
    result = danced(fake).run()
    assert result["boot1"]["reads"] == 4096


@pytest.fixture
def stop_after(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, BaseException]]:
    points: dict[str, BaseException] = {}

    def hold(name: str) -> None:
        if name in points:
            raise points.pop(name)

    monkeypatch.setattr(dance, "hold_point", hold)
    yield points


@pytest.mark.parametrize("step", [*dance.STEPS[:-1], "boot1-started"])
def test_interrupted_after_each_step_resumes_with_one_temporary_disk(step: str, fake: FakeTarget,
                                                                     stop_after: dict[str, BaseException]) -> None:
    stop_after[f"dance:{step}"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        danced(fake).run()
    result = danced(fake).run()
    assert result["system_disk"] == "virtio0" and result["confirmed"]
    assert fake.count("new_disk") == 1 and fake.count("remove_volume") == 1 and fake.volumes() == []
    final = fake.started[-1].config
    assert final["virtio0"] == SYSTEM and "virtio4" not in final and final["ide2"] == "none,media=cdrom"
