"""The Proxmox target checks the token's effective privileges (``GET /access/permissions``) against
what the migration needs, per path, before anything is made; the simulator checks them as PVE's code
does (per-key VM.Config.*, Datastore.AllocateSpace for a new volume, SDN.Use on a bridge, a
privilege-separated token's intersection with its user)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pve_sim.acl import ALL_PRIVILEGES, Acl, check_qemu_params
from pve_sim.cluster import PVEError
from pve_sim.fixture import pve_fixture  # noqa: F401

from conftest import V2P, assert_same_bytes, one_line_error

USER, TOKEN, SECRET = "v2p@pve", "v2p@pve!mig", "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
VMID = 160
# The role docs/proxmox.md gives, per path, for the remote path (disks on local-lvm, uploads into local, NIC on
# vmbr0), no boot check. /vms is granted with propagate, so /vms/160 inherits it.
ROLE = {
    "/vms": ("VM.Allocate", "VM.Audit", "VM.Config.CPU", "VM.Config.Memory", "VM.Config.Options",
             "VM.Config.HWType", "VM.Config.Network", "VM.Config.Disk"),
    "/storage/local-lvm": ("Datastore.AllocateSpace",),
    "/storage/local": ("Datastore.AllocateTemplate", "Datastore.Allocate", "Datastore.Audit"),
    "/sdn/zones/localnetwork/vmbr0": ("SDN.Use",),
    "/nodes/pve1": ("Sys.Audit",),  # GET /nodes/{node}/status: room for the upload's /var/tmp spool
}
# The on-node path (on-node=1): no upload; v2p reads the storage's path and writes its volumes itself.
ROLE_ON_NODE = {
    "/vms": ROLE["/vms"],
    "/storage/local": ("Datastore.AllocateSpace", "Datastore.Allocate"),
    "/sdn/zones/localnetwork/vmbr0": ("SDN.Use",),
}
CHECKED = {"/vms": f"/vms/{VMID}"}  # where PVE (and v2p's error) names the need


def grant(sim: Any, role: dict[str, tuple[str, ...]]) -> None:
    """A user with every privilege on / and its privilege-separated token with ``role`` per path."""
    sim.users[USER] = "pw"
    sim.tokens[TOKEN] = SECRET
    sim.acl.privsep[TOKEN] = True
    sim.acl.grant("/", USER, set(ALL_PRIVILEGES))
    for path, privs in role.items():
        if privs:
            sim.acl.grant(path, TOKEN, set(privs))


def migrate(v2p: V2P, sim: Any, tmp_path: Path, src: Path, *args: str, on_node: bool = False) -> Any:
    where = "storage=local&on-node=1" if on_node else "storage=local-lvm&import=local"
    url = f"pve://{TOKEN}@{sim.host}/{sim.cluster.node}?{where}&fingerprint={sim.fingerprint}"
    return v2p("--target", url, "migrate", str(src), "--vmid", str(VMID), "--no-boot-check",
               "--bridge", "vmbr0", *args, V2P_PVE_TOKEN=SECRET, XDG_DATA_HOME=str(tmp_path / "xdg"))


def made(sim: Any) -> list[str]:
    """What a refused migration must not have made: requests that change the node, VMs, volumes."""
    changing = [f"{e.method} {e.path}" for e in sim.log if e.method != "GET"]
    return changing + [f"VM {vmid}" for vmid in sim.cluster.vms] + sim.volumes()


CASES = [(path, priv) for path, privs in ROLE.items() for priv in privs]


@pytest.mark.parametrize(("path", "priv"), CASES, ids=[f"{p}:{q}" for p, q in CASES])
def test_a_token_lacking_one_privilege_is_refused_before_anything_is_made(
        pve: Any, tmp_path: Path, manifest: Any, source_of: Any, v2p: V2P, path: str, priv: str) -> None:
    grant(pve, {where: tuple(p for p in privs if (where, p) != (path, priv)) for where, privs in ROLE.items()})
    before = pve.volumes()
    proc = migrate(v2p, pve, tmp_path, source_of("monolithicSparse").descriptor)
    line = one_line_error(proc)
    assert f"{CHECKED.get(path, path)}: {priv}" in line, line
    assert "lacks privileges" in line and SECRET not in line
    assert pve.volumes() == before and not pve.cluster.vms and not any(e.method != "GET" for e in pve.log), \
        made(pve)
    assert not any(e.path.endswith("/upload") for e in pve.log)


ON_NODE_CASES = [(path, priv) for path, privs in ROLE_ON_NODE.items() for priv in privs]


@pytest.mark.parametrize(("path", "priv"), ON_NODE_CASES, ids=[f"{p}:{q}" for p, q in ON_NODE_CASES])
def test_on_the_node_a_token_lacking_one_privilege_is_refused(
        pve: Any, tmp_path: Path, manifest: Any, source_of: Any, v2p: V2P, path: str, priv: str) -> None:
    grant(pve, {where: tuple(p for p in privs if (where, p) != (path, priv))
                for where, privs in ROLE_ON_NODE.items()})
    before = pve.volumes()
    line = one_line_error(migrate(v2p, pve, tmp_path, source_of("monolithicSparse").descriptor, on_node=True))
    assert f"{CHECKED.get(path, path)}: {priv}" in line, line
    assert pve.volumes() == before and not pve.cluster.vms and not any(e.method != "GET" for e in pve.log)


def test_on_the_node_the_documented_role_migrates(pve: Any, tmp_path: Path, manifest: Any, samples: Path,
                                                  source_of: Any, v2p: V2P) -> None:
    grant(pve, ROLE_ON_NODE)
    proc = migrate(v2p, pve, tmp_path, source_of("monolithicSparse").descriptor, on_node=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    volid = pve.cluster.vms[VMID].config["scsi0"].split(",")[0]
    assert volid.startswith(f"local:{VMID}/vm-{VMID}-disk-"), volid
    assert_same_bytes(samples / "guest.raw", pve.cluster.volume_path(volid))
    assert not pve.refused, pve.refused


def test_a_token_lacking_several_is_told_each(pve: Any, tmp_path: Path, manifest: Any, source_of: Any,
                                              v2p: V2P) -> None:
    grant(pve, {"/vms": ROLE["/vms"][:2], "/storage/local-lvm": ROLE["/storage/local-lvm"]})
    line = one_line_error(migrate(v2p, pve, tmp_path, source_of("monolithicSparse").descriptor))
    for wanted in ("/vms/160: VM.Config.CPU", "/vms/160: VM.Config.Disk", "/storage/local: Datastore.Allocate",
                   "/storage/local: Datastore.AllocateTemplate", "/sdn/zones/localnetwork/vmbr0: SDN.Use"):
        assert wanted in line, line
    assert not pve.cluster.vms and not any(e.method != "GET" for e in pve.log)


def test_the_documented_role_migrates(pve: Any, tmp_path: Path, manifest: Any, samples: Path, source_of: Any,
                                      v2p: V2P) -> None:
    grant(pve, ROLE)
    proc = migrate(v2p, pve, tmp_path, source_of("monolithicSparse").descriptor)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = pve.cluster.vms[VMID].config
    volid = config["scsi0"].split(",")[0]
    assert volid.startswith(f"local-lvm:vm-{VMID}-disk-"), config
    assert_same_bytes(samples / "guest.raw", pve.cluster.volume_path(volid), "raw")
    assert pve.volumes() == [volid]  # the upload deleted (Datastore.Allocate on local)
    assert not pve.refused, pve.refused


# -- the simulator's own checks, as qemu-server makes them --------------------------------------------

def _acl(privs: dict[str, set[str]], *, privsep: bool = True) -> Acl:
    acl = Acl()
    acl.privsep[TOKEN] = privsep
    acl.grant("/", USER, set(ALL_PRIVILEGES))
    for path, held in privs.items():
        acl.grant(path, TOKEN, held)
    return acl


@pytest.mark.parametrize(("key", "value", "path", "priv"), [
    ("cores", "2", "/vms/170", "VM.Config.CPU"),
    ("memory", "512", "/vms/170", "VM.Config.Memory"),
    ("scsihw", "virtio-scsi-pci", "/vms/170", "VM.Config.HWType"),
    ("description", "x", "/vms/170", "VM.Config.Options"),
    ("net0", "virtio,bridge=vmbr1", "/vms/170", "VM.Config.Network"),
    ("boot", "order=scsi0", "/vms/170", "VM.Config.Disk"),
    ("scsi0", "local-lvm:1", "/vms/170", "VM.Config.Disk"),
    ("ide2", "local:iso/x.iso,media=cdrom", "/vms/170", "VM.Config.CDROM"),
])
def test_sim_checks_each_config_key_as_update_vm(key: str, value: str, path: str, priv: str) -> None:
    everything = set(ALL_PRIVILEGES) - {priv}
    acl = _acl({"/": everything})
    with pytest.raises(PVEError, match=rf"Permission check failed \({path}, {priv}\)"):
        check_qemu_params(acl, TOKEN, 170, {key: value}, create=False)
    check_qemu_params(_acl({"/": set(ALL_PRIVILEGES)}), TOKEN, 170, {key: value}, create=False)


def test_sim_checks_storage_and_bridge_as_pve() -> None:
    vm = {"VM.Config.Disk", "VM.Config.Network", "VM.Allocate"}
    acl = _acl({"/vms": vm, "/storage/local": {"Datastore.Audit"}})
    with pytest.raises(PVEError, match=r"\(/storage/local-lvm, Datastore.AllocateSpace\)"):
        check_qemu_params(acl, TOKEN, 170, {"scsi0": "local-lvm:0,import-from=local:import/a.qcow2"}, create=False)
    acl.grant("/storage/local-lvm", TOKEN, {"Datastore.AllocateSpace"})
    check_qemu_params(acl, TOKEN, 170, {"scsi0": "local-lvm:0,import-from=local:import/a.qcow2"}, create=False)
    with pytest.raises(PVEError, match=r"\(/sdn/zones/localnetwork/vmbr0, SDN.Use\)"):
        check_qemu_params(acl, TOKEN, 170, {"net0": "virtio,bridge=vmbr0"}, create=True)
    acl.grant("/sdn/zones", TOKEN, {"SDN.Use"})  # propagates down to the bridge
    check_qemu_params(acl, TOKEN, 170, {"net0": "virtio,bridge=vmbr0"}, create=True)


def test_sim_permissions_inherit_and_intersect_as_pve() -> None:
    acl = _acl({"/vms": {"VM.Audit", "VM.Allocate"}})
    acl.grant("/vms/5", TOKEN, {"VM.Audit"}, propagate=False)  # a deeper entry replaces the inherited one
    assert set(acl.permissions(TOKEN, "/vms/4")) == {"VM.Audit", "VM.Allocate"}
    assert set(acl.permissions(TOKEN, "/vms/5")) == {"VM.Audit"}
    acl.entries = [e for e in acl.entries if e[1] != USER]
    acl.grant("/vms", USER, {"VM.Audit"})
    assert set(acl.permissions(TOKEN, "/vms/4")) == {"VM.Audit"}  # privsep: the user's privileges bound it
    acl.privsep[TOKEN] = False
    assert set(acl.permissions(TOKEN, "/vms/4")) == {"VM.Audit"}  # no privsep: the user's own
    assert acl.answer({"path": "/vms/4"}, TOKEN) == {"/vms/4": {"VM.Audit": 1}}
    acl.grant("/", USER, set(ALL_PRIVILEGES), propagate=False)  # not below /
    assert set(acl.permissions(USER, "/storage/x")) == set()


def test_the_documented_role_is_exactly_what_v2p_checks() -> None:
    from v2p.targets.pve_privileges import migration_needs

    docs = (Path(__file__).parent.parent / "docs" / "proxmox.md").read_text().replace("\\\n", " ")
    found = re.search(r'pveum role add V2P -privs "([^"]+)"', docs)
    assert found, "docs/proxmox.md's role line"
    create = {"name": "x", "sockets": "1", "cores": "1", "memory": "512", "ostype": "win11", "bios": "ovmf",
              "scsihw": "pvscsi", "machine": "q35", "smbios1": "uuid=1", "ide2": "none,media=cdrom",
              "net0": "e1000=00:11:22:33:44:55,bridge=vmbr0", "description": "imported"}
    update = {"efidisk0": "local-lvm:1,efitype=4m", "ide0": "local-lvm:1", "boot": "order=ide0",
              "ide3": "local:iso/virtio-win.iso,media=cdrom"}
    needed: set[str] = set()
    for on_node in (False, True):
        needed |= {need.privilege for need in migration_needs(
            VMID, create, update, upload_storage=None if on_node else "local", storage="local-lvm",
            on_node=on_node, power=True, iso_upload="local", node="pve1")}
    assert set(found.group(1).split()) == needed


@pytest.mark.parametrize(("iso", "path", "priv"), [
    ("local:iso/virtio-win.iso", "/vms/170", "VM.Config.CDROM"),
    ("local:iso/virtio-win.iso", "/vms/170", "VM.PowerMgmt"),
    # check_volume_access: any of Audit, AllocateSpace, Allocate lets the ISO be attached
    ("local:iso/virtio-win.iso", "/storage/local", "Datastore.Audit Datastore.AllocateSpace Datastore.Allocate"),
    ("local:iso/virtio-win.iso", "/sdn/zones/localnetwork/vmbr0", "SDN.Use"),  # the dance's second NIC
    (None, "/storage/local", "Datastore.AllocateTemplate"),  # a local ISO file is uploaded
])
def test_the_driver_dance_needs_are_checked(pve: Any, tmp_path: Path, iso: str | None, path: str,
                                            priv: str) -> None:
    from v2p.errors import TargetError
    from v2p.targets.proxmox import ProxmoxTarget, target_from_url

    everything = set(ALL_PRIVILEGES) - {"VM.Monitor", "VM.GuestAgent.Audit"}
    grant(pve, {"/": tuple(everything)})
    pve.acl.grant(path, TOKEN, everything - set(priv.split()))
    url = f"pve://{TOKEN}@{pve.host}/{pve.cluster.node}?storage=local-lvm&import=local-lvm" \
          f"&fingerprint={pve.fingerprint}"
    target = ProxmoxTarget(target_from_url(url, {"V2P_PVE_TOKEN": SECRET}), state_root=tmp_path / "state")
    create = {"name": "w", "ostype": "win11", "net0": "e1000=00:11:22:33:44:55,bridge=vmbr1"}
    update = {"ide0": "local-lvm:1", "boot": "order=ide0"}
    target.check_access(170, create, update, storage="local-lvm", power=False)  # no dance: all there
    with pytest.raises(TargetError, match=rf"{path}: {priv.split()[0]}\b"):
        target.check_access(170, create, update, storage="local-lvm", power=True, dance=True, drivers_iso=iso)
    assert not pve.cluster.vms and not any(e.method != "GET" for e in pve.log)
