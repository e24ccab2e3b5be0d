"""Proxmox VE 8.0 to 9.1: the sample disk migrates on every release where the chosen path works
(on the node everywhere, the upload path from 8.4 on), and is refused in preflight, in one line
naming the release, what it lacks and what works instead, with nothing made, where it does not.
No request the release would reject is ever sent (the simulator plays each release's code:
tests/pve_sim/releases.py), the cleanup's listings included."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from pve_sim.releases import RELEASES
from pve_sim.server import PVESim

from conftest import V2P, assert_same_bytes, one_line_error
from v2p.errors import TargetError
from v2p.targets.pve_releases import CAPABILITIES, REMOTE_PATH, PveRelease

VMID = 150
FLAVOR = "monolithicSparse"  # a small sample qemu-img maps (the simulated LVs are files, not devices)


@pytest.fixture(params=list(RELEASES))
def node(request: pytest.FixtureRequest, tmp_path: Path, pve_start: Any) -> Any:
    with pve_start(tmp_path / "pve", release=request.param) as sim:
        yield sim


def run(v2p: V2P, sim: PVESim, tmp_path: Path, query: str, *args: str) -> subprocess.CompletedProcess[str]:
    url = f"pve://root@pam!v2p@{sim.host}/{sim.cluster.node}?fingerprint={sim.fingerprint}&{query}"
    return v2p("--target", url, *args, V2P_PVE_TOKEN=sim.tokens["root@pam!v2p"], XDG_DATA_HOME=str(tmp_path / "xdg"))


def migrate(v2p: V2P, sim: PVESim, tmp_path: Path, src: Any, query: str) -> subprocess.CompletedProcess[str]:
    return run(v2p, sim, tmp_path, query, "migrate", str(src.descriptor), "--vmid", str(VMID), "--no-boot-check")


def uploads(sim: PVESim) -> list[Any]:
    return [entry for entry in sim.log if entry.path.endswith("/upload")]


def test_on_the_node_every_release_migrates_and_removes(node: PVESim, tmp_path: Path, samples: Path,
                                                        source_of: Any, v2p: V2P) -> None:
    proc = migrate(v2p, node, tmp_path, source_of(FLAVOR), "storage=local-lvm&on-node=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    volid = node.cluster.vms[VMID].config["scsi0"].split(",")[0]
    assert volid == f"local-lvm:vm-{VMID}-disk-0"
    assert_same_bytes(samples / "guest.raw", node.cluster.volume_path(volid), "raw")
    migrated = len(node.log)
    removed = run(v2p, node, tmp_path, "storage=local-lvm&on-node=1", "vm", "rm", str(VMID))
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert VMID not in node.cluster.vms and node.volumes() == []
    assert uploads(node) == []
    # 8.0 has no 'import' content type: the cleanup's listing of it would be a 400 there
    assert node.refused == [] and node.unsimulated == []
    # the removal asks the release (may it list 'import' content?) once; the on-node path needs nothing
    assert [entry.path for entry in node.log[migrated:]].count("/version") == 1


@pytest.mark.parametrize("release", ["8.4", "9.0", "9.1"])
def test_the_upload_path_migrates_where_the_release_takes_it(release: str, tmp_path: Path, samples: Path,
                                                             source_of: Any, v2p: V2P, pve_start: Any) -> None:
    with pve_start(tmp_path / "pve", release=release) as sim:
        if "import" not in sim.cluster.storages["local"].content:  # a fresh 8.x install: the admin adds it
            sim.cluster.set_content("local", sim.cluster.storages["local"].content | {"import"})
        proc = migrate(v2p, sim, tmp_path, source_of(FLAVOR), "storage=local-lvm&import=local")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        volid = sim.cluster.vms[VMID].config["scsi0"].split(",")[0]
        assert volid == f"local-lvm:vm-{VMID}-disk-0"
        assert_same_bytes(samples / "guest.raw", sim.cluster.volume_path(volid), "raw")
        assert len(uploads(sim)) == 1 and sim.volumes() == [volid]
        assert [entry.path for entry in sim.log].count("/version") == 1  # preflight asked, once
        removed = run(v2p, sim, tmp_path, "storage=local-lvm&import=local", "vm", "rm", str(VMID))
        assert removed.returncode == 0, removed.stdout + removed.stderr
        assert sim.volumes() == [] and sim.refused == [] and sim.unsimulated == []


@pytest.mark.parametrize("release, lacks", [
    ("8.0", "cannot list a storage's 'import' content"),
    ("8.2", "cannot keep and upload files in a directory storage's 'import' content"),
    ("8.3", "cannot upload a .qcow2/.raw/.vmdk disk image into 'import' content (PVE 8.4 and later can"),
])
def test_the_upload_path_is_refused_before_anything_is_made(release: str, lacks: str, tmp_path: Path,
                                                             source_of: Any, v2p: V2P, pve_start: Any) -> None:
    with pve_start(tmp_path / "pve", release=release) as sim:
        if release == "8.3":  # an admin gave `local` the import content type: uploads of OVAs only
            sim.cluster.set_content("local", sim.cluster.storages["local"].content | {"import"})
        line = one_line_error(migrate(v2p, sim, tmp_path, source_of(FLAVOR), "storage=local-lvm&import=local"))
        manager = RELEASES[release].manager
        assert f"PVE {manager} cannot take the upload path" in line and lacks in line, line
        assert "on-node=1" in line, line
        assert sim.cluster.vms == {} and sim.volumes() == [] and uploads(sim) == []
        assert not [entry for entry in sim.log if entry.method != "GET"], sim.log
        assert sim.refused == [] and sim.unsimulated == []
        assert not list((tmp_path / "xdg").rglob("*.qcow2"))


# -- the table itself, against GET /version's answers ---------------------------------------------

@pytest.mark.parametrize("answer, missing", [
    ({"version": "8.0.3", "release": "8.0"}, 4),
    ({"version": "8.1.4", "release": "8.1"}, 4),
    ({"version": "8.1.8", "release": "8.1"}, 3),
    ({"version": "8.2.2", "release": "8.2"}, 3),
    ({"version": "8.2.9", "release": "8.2"}, 1),
    ({"version": "8.3.0", "release": "8.3"}, 1),
    ({"version": "8.3.6", "release": "8.3"}, 0),
    ({"version": "8.4.1", "release": "8.4"}, 0),
    ({"version": "9.0.3", "release": "9.0"}, 0),
    ({"version": "9.1.1", "release": "9.1"}, 0),
    ({"version": "10.0", "release": "10.0"}, 0),
])
def test_what_each_pve_manager_version_can_do(answer: dict[str, str], missing: int) -> None:
    release = PveRelease.from_answer(answer, "node")
    assert len(release.lacks(REMOTE_PATH)) == missing


@pytest.mark.parametrize("answer", [{}, {"version": "unknown"}, "8.3.0", None])
def test_an_unreadable_version_is_one_error(answer: Any) -> None:
    with pytest.raises(TargetError, match="GET /version answered no version v2p can read"):
        PveRelease.from_answer(answer, "node")


def test_each_threshold_matches_the_simulated_packages() -> None:
    """The simulator decides by package version, v2p by pve-manager's: they agree on every release."""
    by_package = {"libpve-storage-perl": "storage", "qemu-server": "qemu_server"}
    for rel in RELEASES.values():
        seen = PveRelease.from_answer({"version": rel.manager}, "sim")
        for capability in CAPABILITIES:
            package = getattr(rel, by_package[capability.package])
            assert seen.has(capability) == (package >= capability.package_version), (rel.name, capability.what)


# -- the simulator plays each release's code -------------------------------------------------------

def test_the_simulator_refuses_what_each_release_refuses(tmp_path: Path, pve_start: Any) -> None:
    from pve_sim.cluster import PVEError

    with pve_start(tmp_path / "pve", release="8.0") as sim:
        assert sim.cluster.version({}, "root@pam")["version"] == "8.0.3"
        with pytest.raises(PVEError) as caught:
            sim.cluster.content_list({"storage": "local", "content": "import"}, "root@pam")
        assert caught.value.status == 400
    for release in ("8.0", "8.2"):
        with pve_start(tmp_path / release, release=release) as sim:
            with pytest.raises(PVEError, match="Parameter verification failed"):
                sim.cluster.set_content("local", {"iso", "import"})
            spool = tmp_path / release / "x.qcow2"
            spool.write_bytes(b"")
            with pytest.raises(PVEError) as caught:
                sim.cluster.upload({"storage": "local", "content": "import", "filename": "x.qcow2"}, "root@pam",
                                   spool)
            assert caught.value.status == 400 and caught.value.errors == {
                "content": "upload content type 'import' not allowed" if release == "8.2"
                else "invalid content type 'import'"}
    with pve_start(tmp_path / "8.3", release="8.3") as sim:
        sim.cluster.set_content("local", {"iso", "import"})
        with pytest.raises(PVEError) as caught:
            sim.cluster.upload({"storage": "local", "content": "import", "filename": "x.qcow2"}, "root@pam",
                               tmp_path / "8.3" / "x.qcow2")
        assert caught.value.errors == {"filename": "invalid filename or wrong extension"}
    with pve_start(tmp_path / "8.2b", release="8.2") as sim:
        with pytest.raises(PVEError) as caught:
            sim.cluster._prepare_disks(VMID, {"scsi0": "local-lvm:0,import-from=local:import/x.qcow2"}, "root@pam")
        assert caught.value.errors == {"scsi0": "local:import/x.qcow2 has wrong type 'import' - not an image"}


@pytest.mark.parametrize("release, local", [
    ("8.0", "backup,iso,vztmpl"), ("8.4", "backup,iso,vztmpl"), ("9.0", "backup,import,iso,vztmpl"),
])
def test_a_fresh_install_has_its_releases_storages(release: str, local: str, tmp_path: Path, pve_start: Any) -> None:
    with pve_start(tmp_path / "pve", release=release) as sim:
        found = {entry["storage"]: entry["content"] for entry in sim.cluster.storage_list({}, "root@pam")}
        assert found == {"local": local, "local-lvm": "images,rootdir"}


@pytest.mark.usefixtures("pve_start")  # it starts one as its own process
def test_anyone_can_start_it(tmp_path: Path) -> None:
    """``python -m tests.pve_sim --release 8.4 --port 0``: the URL, fingerprint and a token, then it serves."""
    import os
    import re
    import signal
    import sys

    import requests

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "tests.pve_sim", "--release", "8.4", "--port", "0",
                             "--root", str(tmp_path / "sim")], cwd=root, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert proc.stdout is not None
        head = "".join(proc.stdout.readline() for _ in range(6))
        url = re.search(r"simulated at (\S+)", head)
        token = re.search(r"API token:\s+(\S+)", head)
        assert url and token and re.search(r"fingerprint: ([0-9A-F]{2}:){31}[0-9A-F]{2}", head), head
        assert "pve://root@pam!v2p@127.0.0.1:" in head and "local (dir: backup,iso,vztmpl)" in head, head
        cert = tmp_path / "sim" / "tls" / "pve-ssl.pem"
        answer = requests.get(f"{url.group(1)}/version", verify=str(cert), timeout=10,
                              headers={"Authorization": f"PVEAPIToken={token.group(1)}"})
        assert answer.json()["data"]["version"] == "8.4.1"
        assert "11111111-2222" not in token.group(1)  # a token of its own, not the tests' fixed one
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
