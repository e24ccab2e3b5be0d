"""PVE's access control as the simulator applies it: ACL entries on paths (with propagation), roles,
API tokens with or without privilege separation, ``GET /access/permissions``, and the checks qemu-server
and pve-storage make in their code (not in the schema's ``permissions``) for the calls v2p makes.

Sources (proxmox/pve-access-control, proxmox/qemu-server, proxmox/pve-storage, proxmox/pve-guest-common):

* ``PVE::AccessControl::roles``: the path is walked from ``/``; at each level a token's own entries, else
  the user's, replace what was inherited; an entry applies below its own path only with ``propagate``.
* ``PVE::RPCEnvironment::permissions``/``$compile_acl_path``: ``root@pam`` has everything; a token without
  privsep has its user's privileges; a privsep token has the intersection of its own and its user's.
* ``PVE::RPCEnvironment::check``/``check_any``: "Permission check failed (PATH, PRIV)" (403).

Not here: which account exists (``server.PVESim``), what the calls do (``cluster``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .cluster import PVEError

ROOT = "root@pam"

# PVE::API2::Qemu: the option groups of $check_vm_modify_config_perm.
CPU_OPTIONS = {"cores", "cpu", "runningcpu", "cpulimit", "cpuunits", "numa", "smp", "sockets", "vcpus"}
MEMORY_OPTIONS = {"memory", "balloon", "shares", "allow-ksm"}
HWTYPE_OPTIONS = {"acpi", "hotplug", "kvm", "machine", "runningmachine", "scsihw", "smbios1", "tablet", "vga",
                  "watchdog", "audio0", "rng0"}
GENERAL_OPTIONS = {"agent", "autostart", "bios", "description", "keyboard", "localtime", "migrate_downtime",
                   "migrate_speed", "name", "onboot", "ostype", "protection", "reboot", "startdate", "startup",
                   "tdf", "template"}
POWER_OPTIONS = {"freeze"}
DISK_OPTIONS = {"boot", "bootdisk", "vmstatestorage"}
DRIVE_KEY = re.compile(r"(?:ide[0-3]|sata[0-5]|scsi(?:[0-9]|[1-2][0-9]|30)|virtio(?:[0-9]|1[0-5])|efidisk0|tpmstate0)")
# PVE::QemuServer::Drive's NEW_DISK_RE: a new volume of N GiB, on a storage or the default one.
NEW_DISK = re.compile(r"^(([^/:\s]+):)?(\d+(\.\d+)?)$")


def perm_error(path: str, privs: list[str]) -> PVEError:
    """PVE::Exception::raise_perm_exc as RPCEnvironment::check/check_any call it."""
    return PVEError(403, f"Permission check failed ({path}, {'|'.join(privs)})")


@dataclass
class Acl:
    """user.cfg's roles, ACL entries and token flags. ``entries``: (path, user or token id, role, propagate)."""

    roles: dict[str, set[str]] = field(default_factory=dict)
    entries: list[tuple[str, str, str, bool]] = field(default_factory=list)
    privsep: dict[str, bool] = field(default_factory=dict)  # token id -> privilege separation

    def grant(self, path: str, who: str, privs: set[str] | str, *, propagate: bool = True) -> None:
        """An ACL entry: a role name, or a set of privileges (made into a role of its own)."""
        role = privs if isinstance(privs, str) else f"role{len(self.roles)}"
        if not isinstance(privs, str):
            self.roles[role] = set(privs)
        self.entries.append((path.rstrip("/") or "/", who, role, propagate))

    def governs(self, who: str) -> bool:
        """Whether this ACL decides for ``who`` (someone it names, or a token of a user it names)."""
        if who == ROOT:
            return False
        user = who.split("!")[0]
        return who in self.privsep or any(entry[1] in (who, user) for entry in self.entries)

    def _roles(self, who: str, path: str) -> dict[str, bool]:
        """PVE::AccessControl::roles for one user or token id (groups are not simulated)."""
        found: dict[str, bool] = {}
        parts = [""] if path == "/" else path.split("/")
        prefix = ""
        for index, part in enumerate(parts):
            prefix = "/" if index == 0 else (prefix.rstrip("/") + "/" + part)
            final = index == len(parts) - 1
            here = {role: prop for (where, name, role, prop) in self.entries
                    if where == prefix and name == who and (final or prop)}
            if here:
                found = here  # overwrite previous settings
        if "NoAccess" in found:
            return {"NoAccess": found["NoAccess"]}
        return found

    def _privs(self, who: str, path: str) -> dict[str, bool]:
        privs: dict[str, bool] = {}
        for role, prop in self._roles(who, path).items():
            for priv in self.roles.get(role, set()):
                privs[priv] = privs.get(priv, False) or prop
        return privs

    def permissions(self, who: str, path: str) -> dict[str, bool]:
        """PVE::RPCEnvironment::permissions: privilege -> propagate flag, on ``path``."""
        everything = {priv: True for priv in ALL_PRIVILEGES}
        if who == ROOT or who.split("!")[0] == ROOT and not self.privsep.get(who, False):
            return everything
        user, _, token = who.partition("!")
        user_privs = everything if user == ROOT else self._privs(user, path)
        if not token or not self.privsep.get(who, False):
            return user_privs
        own = self._privs(who, path)
        return {priv: own[priv] and user_privs[priv] for priv in own if priv in user_privs}

    def check(self, who: str, path: str, privs: list[str], *, any_of: bool = False) -> None:
        held = self.permissions(who, path)
        if any_of:
            if not any(priv in held for priv in privs):
                raise perm_error(path, privs)
            return
        for priv in privs:
            if priv not in held:
                raise perm_error(path, [priv])

    def allowed(self, who: str, path: str, privs: list[str], *, any_of: bool = False) -> bool:
        try:
            self.check(who, path, privs, any_of=any_of)
        except PVEError:
            return False
        return True

    def answer(self, p: dict[str, str], who: str) -> dict[str, dict[str, int]]:
        """GET /access/permissions (PVE::API2::AccessControl ``permissions``): one path, or the tree's
        default paths and those named in ACL entries (RPCEnvironment::get_effective_permissions)."""
        userid = p.get("userid") or who
        if userid != who and userid.split("!")[0] != who:
            self.check(who, "/access", ["Sys.Audit"])
        if p.get("path"):
            paths = [p["path"]]
        else:
            paths = sorted({"/", "/access", "/access/groups", "/nodes", "/pool", "/sdn", "/storage", "/vms",
                            *(entry[0] for entry in self.entries)})
        out = {}
        for path in paths:
            privs = self.permissions(userid, path)
            if privs or p.get("path"):
                out[path] = {priv: int(prop) for priv, prop in sorted(privs.items())}
        return {path: privs for path, privs in out.items() if privs} if not p.get("path") else out


def volume_owner(volname: str) -> tuple[str, int | None]:
    """(vtype, owner VMID) as PVE::Storage::Plugin::parse_volname gives them for the names v2p meets."""
    for vtype in ("iso", "import", "vztmpl", "backup", "snippets"):
        if volname.startswith(f"{vtype}/"):
            return vtype, None
    found = re.match(r"(?:\d+/)?(?:vm|base)-(\d+)-", volname)
    return "images", int(found.group(1)) if found else None


def check_volume_access(acl: Acl, who: str, vmid: int | None, volid: str) -> None:
    """PVE::Storage::check_volume_access."""
    storage, _, volname = volid.partition(":")
    if not volname:
        if who != ROOT:
            raise PVEError(403, "Only root can pass arbitrary filesystem paths.")
        return
    if acl.allowed(who, f"/storage/{storage}", ["Datastore.Allocate"]):
        return
    vtype, owner = volume_owner(volname)
    if vtype in ("iso", "vztmpl", "import"):
        acl.check(who, f"/storage/{storage}", ["Datastore.AllocateSpace", "Datastore.Audit"], any_of=True)
    elif owner is not None and vmid is not None and owner == vmid:
        return  # we are owner - allow access
    elif vtype == "images" and owner is not None:
        acl.check(who, f"/storage/{storage}", ["Datastore.Audit"])
        acl.check(who, f"/vms/{owner}", ["VM.Config.Disk"])
    else:
        raise PVEError(403, f"missing privileges to access {volid}")


def _drive(value: str) -> tuple[str, dict[str, str]]:
    file, *rest = value.split(",")
    if "=" in file:  # file=... given as a key
        rest.insert(0, file)
        file = ""
    opts = dict(item.partition("=")[::2] for item in rest)
    return opts.pop("file", file), opts


def check_qemu_params(acl: Acl, who: str, vmid: int, params: dict[str, str | None], *, create: bool) -> None:
    """What PVE::API2::Qemu's create_vm and update_vm check in their code before anything is made:
    VM.Allocate (create), $check_storage_access, $check_vm_modify_config_perm, the serial port
    ($check_vm_create_serial_perm), update_vm's $check_drive_perms and deletions, and
    PVE::QemuServer::check_bridge_access (PVE::GuestHelpers::check_vnet_access: SDN.Use on
    /sdn/zones/localnetwork/BRIDGE for a plain bridge without a VLAN tag)."""
    if who == ROOT:
        return
    vm = f"/vms/{vmid}"
    skip = {"node", "vmid", "digest", "delete", "revert", "skiplock", "background_delay", "force", "start",
            "storage", "pool", "archive", "unique", "live-restore", "import-working-storage"}
    settings = {key: value or "" for key, value in params.items() if key not in skip}
    if create:
        acl.check(who, vm, ["VM.Allocate"])
        if params.get("start") == "1":
            acl.check(who, vm, ["VM.PowerMgmt"])
    deleted = [key for key in re.split(r"[,;\s]+", params.get("delete") or "") if key]
    for key in [*deleted, *settings]:
        if DRIVE_KEY.fullmatch(key) or key == "cdrom" or re.fullmatch(r"(unused|usb|hostpci|virtiofs)\d+", key) \
                or key == "tags":
            continue
        if key.startswith("serial"):
            if key in settings and settings[key] != "socket":
                raise PVEError(403, f"only root can set '{key}' config for real devices")
            acl.check(who, vm, ["VM.Config.HWType"])
        elif key in CPU_OPTIONS or re.fullmatch(r"numa\d+", key):
            acl.check(who, vm, ["VM.Config.CPU"])
        elif key in MEMORY_OPTIONS:
            acl.check(who, vm, ["VM.Config.Memory"])
        elif key in HWTYPE_OPTIONS:
            acl.check(who, vm, ["VM.Config.HWType"])
        elif key in GENERAL_OPTIONS:
            acl.check(who, vm, ["VM.Config.Options"])
            if key == "startup":
                acl.check(who, "/", ["Sys.Modify"])
        elif key in POWER_OPTIONS:
            acl.check(who, vm, ["VM.PowerMgmt"])
        elif key in DISK_OPTIONS:
            acl.check(who, vm, ["VM.Config.Disk"])
        elif re.fullmatch(r"net\d+", key):
            acl.check(who, vm, ["VM.Config.Network"])
        else:
            raise PVEError(403, f"only root can set '{key}' config")
    for key in deleted:
        if key.startswith("unused") or DRIVE_KEY.fullmatch(key):
            acl.check(who, vm, ["VM.Config.Disk"])
    for key, value in settings.items():
        if not DRIVE_KEY.fullmatch(key):
            continue
        volid, opts = _drive(value)
        cdrom = opts.get("media") == "cdrom"
        if not create:  # update_vm's $check_drive_perms
            acl.check(who, vm, ["VM.Config.CDROM" if cdrom else "VM.Config.Disk"])
        new = NEW_DISK.match(volid)
        if not volid or volid in ("none", "cloudinit"):
            pass
        elif cdrom and volid == "cdrom":
            acl.check(who, "/", ["Sys.Console"])
        elif not cdrom and new:
            storage = new.group(2) or params.get("storage") or ""
            acl.check(who, f"/storage/{storage}", ["Datastore.AllocateSpace"])
        else:
            check_volume_access(acl, who, vmid, volid)
        source = opts.get("import-from")
        if source:
            _vtype, owner = volume_owner(source.partition(":")[2])
            if owner is not None and ":" in source:
                acl.check(who, f"/vms/{owner}", ["VM.Clone"])
            else:
                check_volume_access(acl, who, vmid, source)
    for key, value in settings.items():
        if re.fullmatch(r"net\d+", key):
            _model, opts = _drive(value)
            bridge = opts.get("bridge")
            if bridge and not opts.get("tag") and not opts.get("trunks"):
                acl.check(who, f"/sdn/zones/localnetwork/{bridge}", ["SDN.Use"])
            elif bridge:
                for tag in re.split(r"[;]", opts.get("trunks") or opts.get("tag") or ""):
                    acl.check(who, f"/sdn/zones/localnetwork/{bridge}/{tag}", ["SDN.Use"])


def schema_check(acl: Acl, who: str, check: Any, params: dict[str, str | None]) -> None:
    """A schema ``permissions.check`` (``perm``, ``and``, ``or``) against the ACL, paths filled in."""
    if not isinstance(check, list) or not check:
        return
    head = check[0]
    if head == "perm":
        path = re.sub(r"\{([\w-]+)\}", lambda m: params.get(m.group(1)) or m.group(0), check[1])
        acl.check(who, path, list(check[2]), any_of="any" in check[3:])
    elif head == "and":
        for sub in check[1:]:
            schema_check(acl, who, sub, params)
    elif head == "or":
        errors = []
        for sub in check[1:]:
            try:
                schema_check(acl, who, sub, params)
                return
            except PVEError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


# pve-access-control PVE::AccessControl's $privgroups (9.x) plus VM.Monitor (8.x).
ALL_PRIVILEGES = (
    "VM.Config.Disk", "VM.Config.CPU", "VM.Config.Memory", "VM.Config.Network", "VM.Config.HWType",
    "VM.Config.Options", "VM.Allocate", "VM.Clone", "VM.Migrate", "VM.Replicate", "VM.Snapshot",
    "VM.Snapshot.Rollback", "VM.Config.CDROM", "VM.Config.Cloudinit", "VM.Console", "VM.Backup", "VM.PowerMgmt",
    "VM.Audit", "VM.Monitor", "VM.GuestAgent.Audit", "VM.GuestAgent.Unrestricted", "VM.GuestAgent.FileRead",
    "VM.GuestAgent.FileWrite", "VM.GuestAgent.FileSystemMgmt", "Sys.PowerMgmt", "Sys.Modify", "Sys.Incoming",
    "Sys.AccessNetwork", "Sys.Console", "Sys.Syslog", "Sys.Audit", "Datastore.Allocate",
    "Datastore.AllocateTemplate", "Datastore.AllocateSpace", "Datastore.Audit", "SDN.Allocate", "SDN.Audit",
    "SDN.Use", "Realm.Allocate", "User.Modify", "Group.Allocate", "Realm.AllocateUser", "Pool.Allocate",
    "Pool.Audit", "Permissions.Modify", "Mapping.Use", "Mapping.Audit", "Mapping.Modify",
)


def acl_checks(acl: Acl, who: str, endpoint: Any, params: dict[str, str | None]) -> None:
    """Every check PVE makes on this call before it does anything: the schema's ``permissions.check``
    and, where the handler checks in its code, that code's checks."""
    key = (endpoint.method, endpoint.template)
    check = (endpoint.info.get("permissions") or {}).get("check")
    schema_check(acl, who, check, params)
    if key == ("POST", "/nodes/{node}/qemu"):
        check_qemu_params(acl, who, int(params.get("vmid") or 0), params, create=True)
    elif key in (("POST", "/nodes/{node}/qemu/{vmid}/config"), ("PUT", "/nodes/{node}/qemu/{vmid}/config")):
        check_qemu_params(acl, who, int(params.get("vmid") or 0), params, create=False)
    elif key == ("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}"):
        # PVE::API2::Storage::Content's delete: Datastore.Allocate, but for a VM's own backup.
        storage, volume = params.get("storage") or "", params.get("volume") or ""
        vtype, owner = volume_owner(volume.partition(":")[2] if ":" in volume else volume)
        if vtype == "backup" and owner is not None:
            acl.check(who, f"/storage/{storage}", ["Datastore.AllocateSpace"])
            acl.check(who, f"/vms/{owner}", ["VM.Backup"])
        else:
            acl.check(who, f"/storage/{storage}", ["Datastore.Allocate"])
    elif key == ("GET", "/nodes/{node}/storage/{storage}/content/{volume}"):
        volume = params.get("volume") or ""
        volid = volume if ":" in volume else f"{params.get('storage')}:{volume}"
        check_volume_access(acl, who, None, volid)  # Content.pm's info, with no VMID
    elif key == ("POST", "/nodes/{node}/storage/{storage}/content"):
        acl.check(who, f"/storage/{params.get('storage')}", ["Datastore.AllocateSpace"])


def acl_filter(acl: Acl, who: str, method: str, template: str, params: dict[str, str], data: Any) -> Any:
    """What list calls leave out for want of a privilege: /cluster/resources the guests without VM.Audit,
    /nodes/{node}/storage the storages without Datastore.Audit or AllocateSpace (PVE::API2::Storage::Status
    index), a content listing the volumes check_volume_access refuses (PVE::API2::Storage::Content index)."""
    if method != "GET" or not isinstance(data, list):
        return data
    if template == "/cluster/resources":
        return [entry for entry in data if "vmid" not in entry
                or acl.allowed(who, f"/vms/{entry['vmid']}", ["VM.Audit"])]
    if template == "/nodes/{node}/storage":
        return [entry for entry in data if acl.allowed(
            who, f"/storage/{entry.get('storage')}", ["Datastore.Audit", "Datastore.AllocateSpace"], any_of=True)]
    if template == "/nodes/{node}/storage/{storage}/content":
        kept = []
        for entry in data:
            try:
                check_volume_access(acl, who, None, str(entry.get("volid", "")))
            except PVEError:
                continue
            kept.append(entry)
        return kept
    return data
