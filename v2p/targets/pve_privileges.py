"""The PVE privileges one migration needs, per ACL path, and the check that the token or user has them
all before anything is made (a migration refused half-way for a permission leaves a VM shell behind).

What PVE checks, read from its sources (proxmox/qemu-server ``src/PVE/API2/Qemu.pm``, proxmox/pve-storage
``src/PVE/Storage.pm`` and ``src/PVE/API2/Storage/{Content,Status}.pm``, proxmox/pve-guest-common
``src/PVE/GuestHelpers.pm``, proxmox/pve-access-control ``src/PVE/RPCEnvironment.pm``):

* ``create_vm``: VM.Allocate on /vms/{vmid}; each key as ``$check_vm_modify_config_perm`` maps it
  (the VM.Config.* of its option group; drives are checked by ``$check_storage_access`` instead);
* ``update_vm`` (POST .../config): the same per key, and ``$check_drive_perms``: VM.Config.Disk for a disk,
  VM.Config.CDROM for a CD drive; deleting ``unusedN`` needs VM.Config.Disk and, for the VM's own volume,
  Datastore.AllocateSpace on its storage (PVE::QemuServer::try_deallocate_drive);
* ``$check_storage_access``: a new volume (``STORAGE:N``) needs Datastore.AllocateSpace on /storage/STORAGE;
  an ``import-from`` source, an existing volume or an ISO goes through PVE::Storage::check_volume_access:
  Datastore.Allocate, or for ``iso``/``import`` volumes Datastore.AllocateSpace or Datastore.Audit;
* ``check_bridge_access`` (qemu-server >= 8.0.1, PVE 8.0; PVE::GuestHelpers::check_vnet_access):
  SDN.Use on /sdn/zones/localnetwork/BRIDGE for a bridge without a VLAN tag (an SDN vnet is in its zone);
* the upload (PVE::API2::Storage::Status ``upload``): Datastore.AllocateTemplate on the storage; deleting
  it (PVE::API2::Storage::Content ``delete``): Datastore.Allocate; listing a storage's content or the
  node's storages: Datastore.Audit or Datastore.AllocateSpace;
* reading a VM (config, status, cluster/resources) VM.Audit; start, shutdown, stop VM.PowerMgmt; the
  guest agent (PVE::API2::Qemu::Agent) VM.Monitor before qemu-server 9.0.3, VM.GuestAgent.Audit since.

The token's effective privileges come from ``GET /access/permissions?path=P`` (pve-access-control
since January 2020, PVE 6.1: every release v2p supports), one call per path: PVE
computes them there as its own checks do (RPCEnvironment::permissions: inheritance with propagate,
NoAccess, pools, and a privilege-separated token's intersection with its user).

Not here: making the calls (``proxmox``), whether a release can take the path at all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import TargetError
from ..volumes import VolumeRef, new_volume_storage, parse_drive, parse_property_string

if TYPE_CHECKING:
    from .pve_host import PveHost

# PVE::API2::Qemu's option groups, as $check_vm_modify_config_perm maps them to privileges.
_KEY_GROUPS: dict[str, frozenset[str]] = {
    "VM.Config.CPU": frozenset({"cores", "cpu", "runningcpu", "cpulimit", "cpuunits", "numa", "smp", "sockets",
                                "vcpus"}),
    "VM.Config.Memory": frozenset({"memory", "balloon", "shares", "allow-ksm"}),
    "VM.Config.HWType": frozenset({"acpi", "hotplug", "kvm", "machine", "runningmachine", "scsihw", "smbios1",
                                   "tablet", "vga", "watchdog", "audio0", "rng0"}),
    "VM.Config.Options": frozenset({"agent", "autostart", "bios", "description", "keyboard", "localtime",
                                    "migrate_downtime", "migrate_speed", "name", "onboot", "ostype", "protection",
                                    "reboot", "startdate", "startup", "tdf", "template"}),
    "VM.PowerMgmt": frozenset({"freeze"}),
    "VM.Config.Disk": frozenset({"boot", "bootdisk", "vmstatestorage"}),
}
_DRIVE = re.compile(r"(?:ide|sata|scsi|virtio)\d+|efidisk0|tpmstate0")
AGENT_RELEASE = (9, 0)  # qemu-server 9.0.3 / libpve-access-control 9.0.2: VM.Monitor -> VM.GuestAgent.*


@dataclass(frozen=True)
class Need:
    """One privilege on one ACL path; ``alternatives`` satisfy it too (PVE's check_any)."""

    path: str
    privilege: str
    why: str
    alternatives: tuple[str, ...] = ()

    def met_by(self, held: set[str]) -> bool:
        return self.privilege in held or any(alt in held for alt in self.alternatives)

    def __str__(self) -> str:
        also = f" (or {' or '.join(self.alternatives)})" if self.alternatives else ""
        return f"{self.path}: {self.privilege}{also}"


def key_privilege(key: str) -> str:
    """The privilege ``$check_vm_modify_config_perm`` asks for a non-drive config key."""
    if re.fullmatch(r"net\d+", key):
        return "VM.Config.Network"
    if re.fullmatch(r"numa\d+", key):
        return "VM.Config.CPU"
    if re.fullmatch(r"serial\d+", key):  # $check_vm_create_serial_perm: 'socket' only, for non-root
        return "VM.Config.HWType"
    for privilege, keys in _KEY_GROUPS.items():
        if key in keys:
            return privilege
    raise TargetError(f"v2p would set the PVE config key {key!r}, which only root@pam may set")


def _volume_access(volid: str, vmid: int, why: str) -> list[Need]:
    """PVE::Storage::check_volume_access for a volume named in a config: an ISO or an import volume
    needs Datastore.AllocateSpace or Audit (or Allocate); the VM's own volume needs nothing more."""
    ref = VolumeRef.parse(volid)
    if ref.owned_by(vmid):
        return []
    return [Need(f"/storage/{ref.storage}", "Datastore.Audit", why,
                 ("Datastore.AllocateSpace", "Datastore.Allocate"))]


def config_needs(vmid: int, values: Mapping[str, str], *, create: bool) -> list[Need]:
    """What ``create_vm`` (``create``) or ``update_vm`` checks for setting ``values``."""
    vm = f"/vms/{vmid}"
    needs: list[Need] = []
    for key, value in values.items():
        if _DRIVE.fullmatch(key):
            drive = parse_drive(value)
            volid, opts, cdrom = drive.volume, drive.options, drive.is_cdrom
            if not create:
                needs.append(Need(vm, "VM.Config.CDROM" if cdrom else "VM.Config.Disk", f"{key} (update_vm)"))
            new = new_volume_storage(volid)
            if new and not cdrom:
                needs.append(Need(f"/storage/{new}", "Datastore.AllocateSpace", f"a new volume for {key}"))
            elif VolumeRef.maybe(volid):
                needs += _volume_access(volid, vmid, f"{key} names {volid}")
            if opts.get("import-from"):
                needs += _volume_access(opts["import-from"], vmid, f"{key} imports {opts['import-from']}")
            continue
        if re.fullmatch(r"unused\d+", key):
            continue
        needs.append(Need(vm, key_privilege(key), f"config key {key}"))
        opts = parse_property_string(value, default_key="model") if re.fullmatch(r"net\d+", key) else {}
        if opts.get("bridge"):
            # PVE::GuestHelpers::check_vnet_access: a plain Linux bridge is in zone 'localnetwork'.
            needs.append(Need(f"/sdn/zones/localnetwork/{opts['bridge']}", "SDN.Use", f"{key} on {opts['bridge']}"))
    return needs


def migration_needs(vmid: int, create: Mapping[str, str], update: Mapping[str, str], *,
                    upload_storage: str | None, storage: str, on_node: bool, power: bool,
                    agent_privilege: str | None = None, iso_upload: str | None = None,
                    node: str | None = None) -> list[Need]:
    """Every (path, privilege) a migration of VM ``vmid`` needs: ``create`` the keys of POST /qemu,
    ``update`` those set later; ``upload_storage`` the import storage of the remote path (None on the
    node); ``power`` whether the VM is started (boot check, --start, driver dance); ``iso_upload`` the
    storage the drivers ISO is uploaded into; ``node`` the node (its status tells the room uploads spool in)."""
    vm = f"/vms/{vmid}"
    needs = [Need(vm, "VM.Allocate", "create the VM (and destroy it on a failure)"),
             Need(vm, "VM.Audit", "read the VM's config and status")]
    needs += config_needs(vmid, create, create=True)
    needs += config_needs(vmid, update, create=False)
    # PVE::QemuServer::try_deallocate_drive: a disk left unused on a rerun is deleted from the storage.
    needs.append(Need(f"/storage/{storage}", "Datastore.AllocateSpace", "delete a disk left unused"))
    if upload_storage:
        where = f"/storage/{upload_storage}"
        needs += [Need(where, "Datastore.AllocateTemplate", "upload the disks (import content)"),
                  Need(where, "Datastore.Allocate", "delete the uploads once imported"),
                  Need(where, "Datastore.Audit", "list the uploads", ("Datastore.AllocateSpace",))]
    if on_node:
        # PVE::API2::Storage::Config read (the storage's path), Content create/info/delete of the volumes.
        needs.append(Need(f"/storage/{storage}", "Datastore.Allocate", "write the disks on the node"))
    if power:
        needs.append(Need(vm, "VM.PowerMgmt", "start and stop the VM"))
        if on_node:
            needs.append(Need(vm, key_privilege("serial0"), "serial0=socket (the boot check's console)"))
        if agent_privilege:
            needs.append(Need(vm, agent_privilege, "ask the guest agent"))
    if iso_upload:
        needs.append(Need(f"/storage/{iso_upload}", "Datastore.AllocateTemplate", "upload the drivers ISO"))
    if node and (upload_storage or iso_upload):
        # pve-manager PVE/API2/Nodes.pm, status (rootfs): room for an upload's /var/tmp spool (pve_space)
        needs.append(Need(f"/nodes/{node}", "Sys.Audit", "room for the uploads' /var/tmp spool"))
    unique: dict[tuple[str, str], Need] = {}
    for need in needs:
        unique.setdefault((need.path, need.privilege), need)
    return list(unique.values())


def agent_privilege(release: tuple[int, ...]) -> str:
    """The guest agent's read privilege on this release (qemu-server 9.0.3's 'more specific guest agent
    privileges'; libpve-access-control 9.0.2 dropped VM.Monitor)."""
    return "VM.GuestAgent.Audit" if release >= AGENT_RELEASE else "VM.Monitor"


def missing(needs: list[Need], held: Mapping[str, set[str]]) -> list[Need]:
    """The needs ``held`` (path -> effective privileges there) does not meet."""
    return [need for need in needs if not need.met_by(held.get(need.path, set()))]


def effective(target: PveHost, paths: set[str]) -> dict[str, set[str]]:
    """The caller's effective privileges on each path, as PVE computes them (``GET /access/permissions``
    with ``path``: PVE::API2::AccessControl ``permissions`` -> RPCEnvironment::permissions)."""
    held: dict[str, set[str]] = {}
    for path in sorted(paths):
        answer: Any = target.call("GET", "access/permissions", path=path) or {}
        privs = answer.get(path, {}) if isinstance(answer, dict) else {}
        held[path] = {str(priv) for priv in privs} if isinstance(privs, dict) else set()
    return held


def check(target: PveHost, needs: list[Need], *, who: str) -> None:
    """Refuse, in one error naming every ``path: privilege`` missing, a migration ``who`` cannot finish."""
    lacking = missing(needs, effective(target, {need.path for need in needs}))
    if lacking:
        raise TargetError(f"PVE {who} lacks privileges this migration needs: "
                          + ", ".join(str(need) for need in lacking),
                          hint="grant them before anything is made: see docs/proxmox.md, 'Privileges, checked first' "
                               "(pveum role add V2P ...; pveum acl modify PATH -token ... -role V2P)")
