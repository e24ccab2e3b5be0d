"""What a vCenter or ESXi host holds, for ``v2p vsphere ls`` and the library: datacenters, VM folders and
VMs, each VM with its power state, guest OS, CPUs, memory, disks (size, thin or thick, datastore path,
snapshot chain depth), snapshots, VMware Tools state and guest IPs. One login, one PropertyCollector read.

Not here: printing it (``cli_vsphere``), one VM's hardware as a spec (``vsphere``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import SourceError
from .vsphere import chain_depth, class_name, disk_capacity, disk_flavor
from .vsphere_api import HOST_ENV, Session, VsphereUri, find_password, parse_uri

_ENTITY = ("name", "parent")
_VM = ("parentVApp", "runtime.powerState", "config.guestFullName", "config.guestId", "config.template",
       "config.hardware.numCPU", "config.hardware.memoryMB", "config.hardware.device", "snapshot",
       "guest.toolsRunningStatus", "guest.toolsVersionStatus2", "guest.ipAddress", "guest.net")


def default_uri(env: Mapping[str, str]) -> str:
    """``vsphere://$V2P_VSPHERE_HOST``: the whole inventory of the configured host."""
    host = env.get(HOST_ENV, "")
    if not host:
        raise SourceError("no vSphere host named", hint=f"v2p vsphere ls vsphere://HOST, or set ${HOST_ENV}")
    return f"vsphere://{host}"


def inventory(uri: str, env: Mapping[str, str]) -> dict[str, list[dict[str, Any]]]:
    """``{"datacenters": [...], "folders": [...], "vms": [...]}`` at or below the path ``uri`` names
    (``vsphere://HOST`` for all of it), each with its inventory ``path``; a VM also with its ``uri``."""
    where = parse_uri(uri, env)
    session = Session(where, find_password(where, env)).connect()
    try:
        return _read(session, where)
    finally:
        session.close()


def _read(session: Session, where: VsphereUri) -> dict[str, list[dict[str, Any]]]:
    from pyVmomi import vim

    found = session.retrieve(
        [vim.Datacenter, vim.Folder, vim.VirtualMachine, vim.VirtualApp],
        {vim.ManagedEntity: _ENTITY, vim.Folder: ("childType",), vim.VirtualMachine: _VM,
         vim.VirtualApp: ("parentFolder",)})
    by_obj = {obj: props for obj, props in found}

    def path(obj: Any) -> tuple[str, ...]:
        names: list[str] = []
        for _ in range(256):  # a parent loop would be vCenter's bug; not an endless one here
            props = by_obj.get(obj)
            if props is None:  # the root folder ("Datacenters") is no part of a path
                break
            names.append(props.get("name", "?"))
            obj = props.get("parent") or props.get("parentVApp") or props.get("parentFolder")
        return tuple(reversed(names))

    scope = where.path
    out: dict[str, list[dict[str, Any]]] = {"datacenters": [], "folders": [], "vms": []}
    for obj, props in found:
        names = path(obj)
        if names[:len(scope)] != scope:
            continue
        shown = "/" + "/".join(names)
        if isinstance(obj, vim.Datacenter):
            out["datacenters"].append({"name": props.get("name"), "path": shown})
        elif isinstance(obj, vim.Folder):
            if "VirtualMachine" in (props.get("childType") or ()) or "Datacenter" in (props.get("childType") or ()):
                out["folders"].append({"name": props.get("name"), "path": shown})
        elif isinstance(obj, vim.VirtualMachine):
            out["vms"].append(_vm(props, shown, str(where.at(names))))
    for rows in out.values():
        rows.sort(key=lambda row: str(row["path"]))
    return out


def _vm(props: Mapping[str, Any], path: str, uri: str) -> dict[str, Any]:
    devices = props.get("config.hardware.device") or ()
    disks = [{"label": device.deviceInfo.label if device.deviceInfo else f"disk {device.key}",
              "capacity": disk_capacity(device),
              "thin": bool(getattr(device.backing, "thinProvisioned", False)),
              "flavor": disk_flavor(device.backing),
              "file": getattr(device.backing, "fileName", None),
              "chain": chain_depth(device.backing)}
             for device in devices if class_name(device) == "VirtualDisk"]
    ips: list[str] = []
    for nic in props.get("guest.net") or ():
        ips += [ip for ip in nic.ipAddress or () if ip not in ips]
    if props.get("guest.ipAddress") and props["guest.ipAddress"] not in ips:
        ips.insert(0, props["guest.ipAddress"])
    snapshot = props.get("snapshot")
    return {
        "path": path, "uri": uri, "name": path.rsplit("/", 1)[-1],
        "power": props.get("runtime.powerState"),
        "template": bool(props.get("config.template")),
        "guest_os": props.get("config.guestFullName") or props.get("config.guestId"),
        "guest_id": props.get("config.guestId"),
        "cpus": props.get("config.hardware.numCPU"),
        "memory_mib": props.get("config.hardware.memoryMB"),
        "disks": disks,
        "snapshots": _count(snapshot.rootSnapshotList if snapshot is not None else ()),
        "tools": props.get("guest.toolsRunningStatus"),
        "tools_version": props.get("guest.toolsVersionStatus2"),
        "ips": ips,
    }


def _count(trees: Any) -> int:
    return sum(1 + _count(tree.childSnapshotList or ()) for tree in trees or ())
