"""Every sample flavor migrates to the local target and boots on the bus the
options ask for; the guest itself reports the controller and the last sector."""

from __future__ import annotations

import pytest

from conftest import FLAVORS, assert_same_bytes, guest_report

EXPECTED = [
    # (extra options, controller the guest must report)
    (["--os", "win7"], "ide"),
    (["--os", "l26"], "virtio-scsi"),
]


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize(("options", "controller"), EXPECTED, ids=["win7-ide", "l26-scsi"])
def test_every_flavor_migrates_and_boots(flavor, options, controller, samples, manifest, source_of, v2p):
    src = source_of(flavor)
    proc = v2p("migrate", str(src.descriptor), "--vmid", "102", *options)
    assert proc.returncode == 0, proc.stderr
    got_controller, _pci, marker = guest_report(v2p.serial(102))
    assert got_controller == controller
    assert marker == manifest["marker"]
    assert_same_bytes(samples / "guest.raw", v2p.disk(102))
    config = v2p.config(102)
    bus = "ide0" if controller == "ide" else "scsi0"
    assert config[bus].startswith("local:102/vm-102-disk-0.qcow2,size=32M")
    assert config["boot"] == f"order={bus}"
    assert v2p.state(102)["finished"] is True


@pytest.mark.parametrize(("options", "controller", "pci"), [
    (["--bus", "virtio"], "virtio-blk", "1af4:1001"),
    (["--bus", "sata"], "sata", "8086:2922"),
    (["--os", "l26", "--scsihw", "lsi"], "lsi", "1000:0012"),
])
def test_bus_choice_reaches_the_guest(options, controller, pci, manifest, source_of, v2p):
    src = source_of("monolithicSparse")
    proc = v2p("migrate", str(src.descriptor), "--vmid", "103", *options)
    assert proc.returncode == 0, proc.stderr
    assert guest_report(v2p.serial(103)) == (controller, pci, manifest["marker"])


def test_raw_format_lands_as_raw_file(samples, source_of, v2p):
    src = source_of("monolithicFlat")
    proc = v2p("migrate", str(src.descriptor), "--vmid", "104", "--format", "raw", "--no-boot-check")
    assert proc.returncode == 0, proc.stderr
    disk = v2p.disk(104, "raw")
    assert disk.read_bytes() == (samples / "guest.raw").read_bytes()
    assert v2p.config(104)["scsi0"].startswith("local:104/vm-104-disk-0.raw")


def test_dry_run_prints_stages_and_creates_nothing(source_of, v2p):
    src = source_of("esxi")
    proc = v2p("migrate", str(src.descriptor), "--vmid", "105", "--os", "win7", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    for stage in ("inspect", "preflight", "create", "convert", "verify", "attach", "boot", "finish"):
        assert f"    {stage} " in proc.stdout
    assert "    drivers " not in proc.stdout  # Windows left on IDE (no --bus virtio): no driver dance
    assert "    ide0: local:105/vm-105-disk-0.qcow2" in proc.stdout
    assert not (v2p.target / "qemu-server").exists()
    assert not (v2p.target / "images").exists()


@pytest.mark.usefixtures("boots")
def test_library_migrate_reports_events(manifest, source_of, tmp_path):
    from v2p import local_target, migrate

    src = source_of("streamOptimized")
    events = []
    target = local_target(tmp_path / "lib-target", accel="tcg")
    result = migrate(src.descriptor, 106, target=target, ostype="win10", on_event=events.append)
    assert result["finished"] is True
    done = [e.stage for e in events if e.kind == "stage-done"]
    # Windows left on IDE (no bus asked for): no driver dance, its stage is not announced
    assert done == ["inspect", "preflight", "create", "convert", "verify", "attach", "boot", "finish"]
    guest = [e.message for e in events if e.stage == "boot" and e.message.startswith("guest: ")]
    assert any("controller=ide" in line for line in guest)
    assert any(manifest["marker"] in line for line in guest)
