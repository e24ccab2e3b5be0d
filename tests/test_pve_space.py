"""Room where PVE needs it (issue 16, points 5 and 6): an upload is spooled by pveproxy into the node's
/var/tmp (root file system, ``GET /nodes/{node}/status`` rootfs) and copied into the import storage, then
imported into the disk's storage while the upload stays; storages on one file system share its room.
And the storage kinds as pve-storage's plugins make them: btrfs raw only, cephfs no VM disks, glusterfs
gone in PVE 9, RBD on the node only with krbd. Every refusal comes before anything is made."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import requests
from pve_sim.fixture import pve_fixture, start_or_skip  # noqa: F401
from pve_sim.server import PVESim

from conftest import V2P, one_line_error
from v2p.errors import TargetError
from v2p.options import OptionError
from v2p.targets.proxmox import ProxmoxTarget, target_from_url

VMID = 150


def url(sim: PVESim, query: str = "") -> str:
    return f"pve://root@pam!v2p@{sim.host}/{sim.cluster.node}?fingerprint={sim.fingerprint}{query}"


def migrate(v2p: V2P, sim: PVESim, tmp_path: Path, src: Any, storage: str, *extra: str,
            query: str = "") -> subprocess.CompletedProcess[str]:
    return v2p("--target", url(sim, query), "migrate", str(src.descriptor), "--vmid", str(VMID), "--no-boot-check",
               "--storage", storage, *extra, V2P_PVE_TOKEN=sim.tokens["root@pam!v2p"],
               XDG_DATA_HOME=str(tmp_path / "xdg"))


def target_of(sim: PVESim, tmp_path: Path, query: str = "") -> ProxmoxTarget:
    return ProxmoxTarget(target_from_url(url(sim, query), {"V2P_PVE_TOKEN": sim.tokens["root@pam!v2p"]}),
                         state_root=tmp_path / "state")


def staged_size(src: Any) -> int:
    """What v2p uploads: the disk as qcow2 (``qemu-img measure``, as v2p's preflight measures it)."""
    out = subprocess.run(["qemu-img", "measure", "--output=json", "-f", "vmdk", "-O", "qcow2", str(src.descriptor)],
                         check=True, capture_output=True, text=True).stdout
    return int(json.loads(out)["required"])


def assert_nothing_made(sim: PVESim) -> None:
    assert VMID not in sim.cluster.vms and sim.volumes() == []
    assert not [e for e in sim.log if e.path.endswith("/upload")]  # nothing sent, nothing spooled
    assert not [e for e in sim.log if e.method == "POST" and "/qemu" in e.path]
    assert not list(sim.var_tmp.glob("pveupload-*")) if sim.var_tmp.exists() else True
    assert sim.refused == [] and sim.unsimulated == []


# -- the node's root file system ------------------------------------------------------------------

def test_an_upload_that_fits_the_storage_but_not_var_tmp_is_refused_first(
        pve: PVESim, tmp_path: Path, manifest: dict[str, Any], source_of: Any, v2p: V2P) -> None:
    src = source_of("monolithicSparse")
    pve.cluster.add_storage("imports", "dir", {"import"})  # on a disk of its own, with room
    pve.cluster.set_free("imports", 1 << 30)
    pve.cluster.set_free("/", 64 << 10)  # the node's / (and so /var/tmp) nearly full
    line = one_line_error(migrate(v2p, pve, tmp_path, src, "local-lvm", query="&import=imports"))
    assert "not enough space on node pve1's root file system (/var/tmp)" in line, line
    assert f"for the upload of v2p-{VMID}-disk-0.qcow2" in line and f"{64 << 10} free" in line, line
    assert "pveproxy spools every upload in /var/tmp" in line, line
    assert_nothing_made(pve)


def test_local_on_the_root_fs_takes_the_upload_twice(pve: PVESim, tmp_path: Path, manifest: dict[str, Any],
                                                     source_of: Any, v2p: V2P) -> None:
    """A fresh install's local (/var/lib/vz) is on /: the spool and its copy into local:import are there at
    once, so / needs the upload twice; room for it once is not enough."""
    src = source_of("monolithicSparse")
    staged = staged_size(src)
    pve.cluster.set_free("/", staged + staged // 2)
    line = one_line_error(migrate(v2p, pve, tmp_path, src, "local-lvm"))
    assert "not enough space on node pve1's root file system (/var/tmp and storage local)" in line, line
    assert f"{2 * staged} bytes needed, {staged + staged // 2} free" in line, line
    assert_nothing_made(pve)


def test_the_import_and_the_upload_add_up_on_one_file_system(
        pve: PVESim, tmp_path: Path, manifest: dict[str, Any], source_of: Any, v2p: V2P) -> None:
    """The upload stays in local:import while PVE copies it into the disk's storage: two storages on one
    file system need both at once, though each fits alone."""
    src = source_of("monolithicSparse")
    staged, final = staged_size(src), 32 << 20  # raw: the whole capacity
    pve.cluster.add_storage("vz2", "dir", {"images"}).on_rootfs = True
    free = final + staged // 2
    pve.cluster.set_free("/", free)
    line = one_line_error(migrate(v2p, pve, tmp_path, src, "vz2", "--format", "raw"))
    assert "not enough space on node pve1's root file system (storage local, vz2)" in line, line
    assert f"for the import of v2p-{VMID}-disk-0.qcow2 into vz2" in line, line
    assert f"{staged + final} bytes needed, {free} free" in line, line
    assert_nothing_made(pve)


def test_the_counts_reach_the_import_storage_and_the_target_storage(pve: PVESim, tmp_path: Path,
                                                                    manifest: dict[str, Any],
                                                                    source_of: Any) -> None:
    """Checked in-process: each place is refused at exactly what it needs, and passes one byte above."""
    from v2p.endpoint import DiskEndpoint

    src = source_of("monolithicSparse")
    staged, final = staged_size(src), 32 << 20
    pve.cluster.add_storage("imports", "dir", {"import"})
    pve.cluster.add_storage("disks", "dir", {"images"})
    pve.cluster.set_free("/", 1 << 30)
    target = target_of(pve, tmp_path, "&import=imports")
    given = DiskEndpoint("vmdk", str(src.descriptor))
    for place, needed, what in (("imports", staged, "for the upload of"), ("disks", final, "for the import of")):
        other = "disks" if place == "imports" else "imports"
        pve.cluster.set_free(other, 1 << 30)
        pve.cluster.set_free(place, needed - 1)
        with pytest.raises(TargetError, match=f"not enough space on PVE storage {place} {what}") as caught:
            target.disk_sink(VMID, 0, fmt="raw", storage="disks").check(given, capacity=32 << 20)
        assert f"{needed} bytes needed, {needed - 1} free" in str(caught.value)
        pve.cluster.set_free(place, needed)
        assert target.disk_sink(VMID, 0, fmt="raw", storage="disks").check(given, capacity=32 << 20)
    assert pve.volumes() == [] and VMID not in pve.cluster.vms


def test_the_simulator_fails_a_spool_past_the_root_fs_as_pveproxy(pve: PVESim, tmp_path: Path) -> None:
    """pveproxy's ``syswrite`` to /var/tmp/pveupload-* failing: 500, nothing spooled, nothing stored."""
    data = bytes(range(256)) * 1024  # 256 KiB
    pve.cluster.set_free("/", 100 << 10)
    auth = {"Authorization": f"PVEAPIToken=root@pam!v2p={pve.tokens['root@pam!v2p']}"}
    fields = {"content": "import", "checksum-algorithm": "sha256", "checksum": hashlib.sha256(data).hexdigest()}
    answer = requests.post(f"{pve.url}/nodes/pve1/storage/local/upload", data=fields,
                           files={"filename": ("d.raw", data)}, headers=auth, verify=str(pve.cert_file), timeout=60)
    assert (answer.status_code, answer.reason) == (500, "write to temporary file failed - No space left on device")
    assert pve.volumes() == [] and not list(pve.var_tmp.glob("pveupload-*"))
    status = requests.get(f"{pve.url}/nodes/pve1/status", headers=auth, verify=str(pve.cert_file), timeout=60)
    rootfs = status.json()["data"]["rootfs"]
    assert rootfs["avail"] == 100 << 10 and rootfs["total"] - rootfs["used"] == rootfs["free"]


# -- storage kinds -------------------------------------------------------------------------------

def test_btrfs_takes_raw_only(pve: PVESim, tmp_path: Path, manifest: dict[str, Any], source_of: Any,
                              v2p: V2P) -> None:
    pve.cluster.add_storage("tank", "btrfs", {"images", "import"})
    src = source_of("monolithicSparse")
    line = one_line_error(migrate(v2p, pve, tmp_path, src, "tank", "--format", "qcow2"))
    assert "--format qcow2: PVE storage tank (btrfs) holds raw volumes only" in line, line
    assert "add --format raw" in line, line
    assert_nothing_made(pve)
    assert target_of(pve, tmp_path).disk_sink(VMID, 0, fmt=None, storage="tank").fmt == "raw"  # its own, unasked


def test_cephfs_holds_no_vm_disks(pve: PVESim, tmp_path: Path, manifest: dict[str, Any], source_of: Any,
                                  v2p: V2P) -> None:
    pve.cluster.add_storage("cephfs", "cephfs", {"iso", "backup", "import"})
    src = source_of("monolithicSparse")
    line = one_line_error(migrate(v2p, pve, tmp_path, src, "cephfs"))
    assert "PVE storage cephfs is cephfs: CephFS holds no VM disks in PVE (no 'images' content" in line, line
    assert_nothing_made(pve)


def test_glusterfs_is_gone_in_pve_9_not_in_8(pve: PVESim, tmp_path: Path) -> None:
    pve.cluster.add_storage("gluster", "glusterfs", {"images", "import"})
    with pytest.raises(TargetError, match=r"PVE storage gluster is glusterfs, which PVE 9\.\d no longer supports"):
        target_of(pve, tmp_path).disk_sink(VMID, 0, fmt=None, storage="gluster")
    with start_or_skip(tmp_path / "pve8", release="8.4") as old:
        old.cluster.add_storage("gluster", "glusterfs", {"images", "import"})
        assert target_of(old, tmp_path / "8").disk_sink(VMID, 0, fmt=None, storage="gluster").fmt == "qcow2"
        with pytest.raises(OptionError, match=r"--format vmdk: PVE storage gluster \(glusterfs\) holds qcow2/raw"):
            target_of(old, tmp_path / "8").disk_sink(VMID, 0, fmt="vmdk", storage="gluster")


def test_rbd_without_krbd_is_refused_on_the_node(pve: PVESim, tmp_path: Path) -> None:
    """Without krbd PVE gives an RBD volume's path as an ``rbd:`` URI (RBDPlugin.pm, path): no device here."""
    pve.cluster.add_storage("ceph", "rbd", {"images"})
    target = target_of(pve, tmp_path, "&on-node=1")
    with pytest.raises(TargetError, match="PVE storage ceph is rbd without krbd") as caught:
        target.disk_sink(VMID, 0, fmt=None, storage="ceph")
    assert "drop on-node=1" in str(caught.value.hint)
    assert pve.volumes() == []


def test_the_drivers_iso_upload_is_checked_for_room_too(pve: PVESim, tmp_path: Path) -> None:
    """Every upload is spooled in /var/tmp, the drivers ISO's too: a / without room for it and its copy
    in local (on /) is refused before it is sent."""
    iso = tmp_path / "virtio-win.iso"
    iso.write_bytes(b"\0" * (1 << 20))  # refused before PVE would look at it
    pve.cluster.set_free("/", (1 << 20) + (1 << 19))
    with pytest.raises(TargetError, match=r"not enough space on node pve1's root file system \(/var/tmp and "
                                          r"storage local\) for the upload of virtio-win\.iso") as caught:
        target_of(pve, tmp_path).drivers_iso(str(iso))
    assert f"{2 << 20} bytes needed" in str(caught.value)
    assert not [e for e in pve.log if e.path.endswith("/upload")] and pve.volumes() == []


def test_every_upload_of_a_vm_is_counted_on_its_import_storage(pve: PVESim, tmp_path: Path, samples: Path,
                                                               v2p: V2P) -> None:
    """Each upload stays in the import storage until the migration ends: a three-disk VM whose disks fit
    there one at a time, not all together, is refused before anything is made (each disk's own check
    passed before)."""
    from test_whole_vm import make_vm

    vmx, _raws = make_vm(tmp_path / "web01", samples)
    staged = []
    for name in ("esxi.vmdk", "data.vmdk", "logs.vmdk"):
        out = subprocess.run(["qemu-img", "measure", "--output=json", "-f", "vmdk", "-O", "qcow2",
                              str(vmx.parent / name)], check=True, capture_output=True, text=True).stdout
        staged.append(int(json.loads(out)["required"]))
    pve.cluster.add_storage("imports", "dir", {"import"})
    free = sum(staged) - 1
    assert free >= max(staged)  # each upload fits there alone
    pve.cluster.set_free("imports", free)
    done = v2p("--target", url(pve, "&import=imports"), "migrate", str(vmx), "--vmid", str(VMID),
               "--no-boot-check", "--storage", "local-lvm", "--network", "LAN=vmbr0", "--network", "DMZ=vmbr0",
               V2P_PVE_TOKEN=pve.tokens["root@pam!v2p"], XDG_DATA_HOME=str(tmp_path / "xdg"))
    line = one_line_error(done)
    assert f"not enough space on PVE {pve.cluster.node}:imports: the disks need {sum(staged)} bytes there, " \
           f"{free} are free" in line, line
    assert_nothing_made(pve)
