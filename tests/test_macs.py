"""The MACs v2p generates for NICs that have none: PVE's prefix, random per migration (two clusters
migrating the same VM onto the same VMID do not collide), and the same on every rerun of one."""

from __future__ import annotations

import json
import re

import pytest

from conftest import InProcessV2P, failing_after

GENERATED = re.compile(r"virtio=BC:24:11(:[0-9A-F]{2}){3},bridge=vmbr0")


def test_two_migrations_of_one_source_get_different_macs(source_of, inproc, tmp_path, capfd, monkeypatch):
    src = source_of("monolithicSparse")  # a loose disk: one NIC, no MAC
    other_host = InProcessV2P(tmp_path / "other-target", capfd, monkeypatch)
    for host in (inproc, other_host):  # the same VMID on two hosts
        proc = host("migrate", str(src.descriptor), "--vmid", "100", "--no-boot-check")
        assert proc.returncode == 0, proc.stderr
    first, second = inproc.config(100)["net0"], other_host.config(100)["net0"]
    assert GENERATED.fullmatch(first) and GENERATED.fullmatch(second)
    assert first != second


def test_a_rerun_keeps_its_generated_mac(source_of, inproc, monkeypatch):
    src = source_of("monolithicSparse")

    with failing_after("create"):
        failed = inproc("migrate", str(src.descriptor), "--vmid", "101", "--no-boot-check", "--keep-on-failure")
    assert failed.returncode != 0
    state = json.loads((inproc.target / "migrations" / "101.json").read_text())
    mac = state["stages"]["create"]["result"]["config"]["net0"]
    # The VM is gone too (removed by hand): the create stage runs again, from the state's migration.
    (inproc.target / "qemu-server" / "101.conf").unlink()
    rerun = inproc("migrate", str(src.descriptor), "--vmid", "101", "--no-boot-check", "--keep-on-failure")
    assert rerun.returncode == 0, rerun.stderr
    assert inproc.config(101)["net0"] == mac


@pytest.mark.parametrize("seed", ["a1b2c3d4e5f6", "0123456789ab"])
def test_one_seed_one_mac(seed: str) -> None:
    from v2p.options import mac_for_nic

    assert mac_for_nic(seed, 0) == mac_for_nic(seed, 0) != mac_for_nic(seed, 1)
    assert mac_for_nic(None, 0) == "BC:24:11:<random>"
