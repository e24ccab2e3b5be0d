"""`v2p --target pve://...` end to end against the PVE API simulator (every request schema-checked):
the remote path converts locally, uploads to an `import` storage and attaches with import-from."""

from __future__ import annotations

from pve_sim.fixture import pve_fixture  # noqa: F401

from conftest import V2P, assert_same_bytes, one_line_error


def pve_url(sim, storage: str = "local") -> str:  # type: ignore[no-untyped-def]
    return f"pve://root@pam!v2p@{sim.host}/{sim.cluster.node}?storage={storage}&fingerprint={sim.fingerprint}"


def run(v2p: V2P, sim, tmp_path, *args: str):  # type: ignore[no-untyped-def]
    return v2p("--target", pve_url(sim), *args, V2P_PVE_TOKEN=sim.tokens["root@pam!v2p"],
               XDG_DATA_HOME=str(tmp_path / "xdg"))


def test_loose_disk_migrates_onto_pve(pve, tmp_path, manifest, samples, source_of, v2p: V2P):
    src = source_of("monolithicSparse")
    proc = run(v2p, pve, tmp_path, "migrate", str(src.descriptor), "--vmid", "150", "--no-boot-check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = pve.cluster.vms[150].config
    volid = config["scsi0"].split(",")[0]
    assert volid.startswith("local:150/vm-150-disk-"), config
    assert "import-from" not in config["scsi0"]
    assert config["boot"] == "order=scsi0" and config["ostype"] == "l26"
    assert_same_bytes(samples / "guest.raw", pve.cluster.volume_path(volid))
    assert pve.tokens["root@pam!v2p"] not in (proc.stdout + proc.stderr)
    # once finished, neither the upload nor the local staging copy stays behind
    assert pve.volumes() == [volid], pve.volumes()
    assert not list((tmp_path / "xdg").rglob("*.qcow2"))
    again = run(v2p, pve, tmp_path, "migrate", str(src.descriptor), "--vmid", "150", "--no-boot-check")
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr


def test_vmid_taken_on_pve_is_refused(pve, tmp_path, manifest, source_of, v2p: V2P):
    src = source_of("monolithicSparse")
    assert run(v2p, pve, tmp_path, "migrate", str(src.descriptor), "--vmid", "150",
               "--no-boot-check").returncode == 0
    line = one_line_error(run(v2p, pve, tmp_path, "migrate", str(src.descriptor), "--vmid", "150", "--cores", "2",
                              "--no-boot-check"))
    assert "VMID 150 already exists" in line


def test_the_urls_storage_is_where_disks_go(pve, tmp_path, manifest, samples, source_of, v2p: V2P):
    src = source_of("monolithicSparse")
    url = pve_url(pve, "local-lvm")
    proc = v2p("--target", url, "migrate", str(src.descriptor), "--vmid", "151", "--no-boot-check",
               V2P_PVE_TOKEN=pve.tokens["root@pam!v2p"], XDG_DATA_HOME=str(tmp_path / "xdg"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    volid = pve.cluster.vms[151].config["scsi0"].split(",")[0]
    assert volid.startswith("local-lvm:vm-151-disk-"), volid
    assert_same_bytes(samples / "guest.raw", pve.cluster.volume_path(volid), "raw")
    # --storage still wins over the URL's
    proc = v2p("--target", url, "migrate", str(src.descriptor), "--vmid", "152", "--no-boot-check",
               "--storage", "local", V2P_PVE_TOKEN=pve.tokens["root@pam!v2p"], XDG_DATA_HOME=str(tmp_path / "xdg"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert pve.cluster.vms[152].config["scsi0"].startswith("local:152/vm-152-disk-")


def test_a_url_without_node_finds_the_only_one(pve, tmp_path, manifest, source_of, v2p: V2P):
    src = source_of("monolithicSparse")
    # everything from the environment, as a site would set it once: --target pve
    proc = v2p("--target", "pve", "migrate", str(src.descriptor), "--vmid", "153", "--no-boot-check",
               V2P_PVE_HOST=pve.host.split(":")[0], V2P_PVE_PORT=pve.host.split(":")[1],
               V2P_PVE_USER="root@pam!v2p", V2P_PVE_FINGERPRINT=pve.fingerprint,
               V2P_PVE_TOKEN=pve.tokens["root@pam!v2p"], XDG_DATA_HOME=str(tmp_path / "xdg"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert pve.cluster.vms[153].config["scsi0"].startswith("local-lvm:vm-153-disk-")  # PVE's default storage
