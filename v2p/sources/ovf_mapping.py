"""From an OVF envelope to the VM v2p migrates: the hardware items mapped onto a ``VMSpec``.

``parse_envelope`` reads the XML only (``ovf_xml``): nothing the envelope names is
opened here. CIM ResourceTypes, VMware's Config/ExtraConfig keys and the
controllers' numbering are read the way vSphere writes them. Not for: the
package's files (``ovf_package``) or deciding the KVM side (``spec.py`` onwards).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from .. import rules
from ..errors import SourceError
from ..spec import CdromSpec, DiskSpec, NicSpec, VMSpec, controller_order
from .ovf_xml import (
    CIM,
    MAX_ITEMS,
    OVF_NAMESPACES,
    VMW,
    DiskRef,
    FileRef,
    attr,
    boot_instance,
    children,
    deployment_option,
    disk_section,
    hardware_section,
    is_true,
    parse_xml,
    references,
    resource_type,
    tag_name,
    tag_ns,
    to_int,
    units,
    vmw,
)

# DMTF CIM ResourceType values v2p reads
CPU, MEMORY, IDE, SCSI, ETHERNET, IO_SLOT, IO_DEVICE, FLOPPY, CD, DVD, DISK, OTHER_STORAGE, USB = (
    3, 4, 5, 6, 10, 12, 13, 14, 15, 16, 17, 20, 23)
_SCSI_MODELS = {"lsilogic": "lsilogic", "lsilogicsas": "lsisas1068", "virtualscsi": "pvscsi",
                "buslogic": "buslogic"}
_NIC_MODELS = {"pcnet32": "vlance"}
# Every VMware VM has these; KVM brings its own display and has no VMCI: dropping them says nothing.
_SILENT = {(24, ""), (1, "vmware.vmci")}


@dataclass
class Envelope:
    """What an OVF descriptor says: the VM, the files it names, and what looked odd."""

    spec: VMSpec
    files: dict[str, FileRef]
    warnings: list[str] = field(default_factory=list)

    def disk_file(self, disk: DiskSpec, name: str) -> FileRef:
        ref = self.files.get(disk.source)
        if ref is None:
            raise SourceError(f"{name}: no file {disk.source!r} in the References section for {disk.label}")
        return ref


def _uuid(text: str | None) -> str | None:
    """A UUID in its canonical form, from VMware's "56 4d ...-..." or the plain one; None if not one."""
    digits = re.sub(r"[\s-]", "", text or "").lower()
    if not re.fullmatch(r"[0-9a-f]{32}", digits):
        return None
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def _mac(text: str | None) -> str | None:
    digits = re.sub(r"[:.-]", "", (text or "").strip()).lower()
    if not re.fullmatch(r"[0-9a-f]{12}", digits):
        return None
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


@dataclass
class _Item:
    """One ``Item`` (or OVF 2 ``EthernetPortItem`` / ``StorageItem``) of the hardware section."""

    props: dict[str, str]  # CIM properties by local name (rasd, epasd, sasd alike)
    config: dict[str, str]  # vmw:Config / vmw:ExtraConfig, keys lower-cased
    cores_per_socket: str | None

    @property
    def instance(self) -> str:
        return self.props.get("InstanceID", "")

    @property
    def rtype(self) -> int | None:
        return to_int(self.props.get("ResourceType"))

    @property
    def subtype(self) -> str:
        return self.props.get("ResourceSubType", "").strip()

    @property
    def label(self) -> str:
        return self.props.get("ElementName") or f"item {self.instance}"

    def describe(self) -> str:
        what = f"ResourceType {self.rtype}" + (f", {self.subtype}" if self.subtype else "")
        return f"{self.label} ({what})"


def _item(element: ET.Element) -> _Item:
    props: dict[str, str] = {}
    config: dict[str, str] = {}
    cores = None
    for child in element:
        namespace, local = tag_ns(child.tag), tag_name(child.tag)
        if namespace.startswith(CIM):
            props.setdefault(local, (child.text or "").strip())
        elif namespace == VMW and local in ("Config", "ExtraConfig"):
            key = vmw(child, "key") or attr(child, "key")
            if key:
                config[key.lower()] = vmw(child, "value") or attr(child, "value") or ""
        elif namespace == VMW and local == "CoresPerSocket":
            cores = (child.text or "").strip()
    cores = cores or vmw(element, "CoresPerSocket")
    return _Item(props, config, cores)


def parse_envelope(data: bytes, name: str) -> Envelope:
    """The VM an OVF descriptor describes; SourceError when it is unsafe or not one v2p can read.

    ``name`` is how messages name the descriptor. Reads the XML only: nothing
    it names is opened here.
    """
    root = parse_xml(data, name)
    if tag_name(root.tag) != "Envelope" or tag_ns(root.tag) not in OVF_NAMESPACES:
        raise SourceError(f"{name}: not an OVF envelope (the root element is {tag_name(root.tag)!r} "
                          f"in {tag_ns(root.tag) or 'no namespace'!r})")
    warnings: list[str] = []
    if any(tag_name(e.tag) == "VirtualSystemCollection" for e in root):
        raise SourceError(f"{name}: the package holds a collection of virtual machines (a vApp); "
                          "v2p migrates one VM at a time", hint="export each VM as its own OVF")
    systems = [e for e in root if tag_name(e.tag) == "VirtualSystem"]
    if len(systems) != 1:
        raise SourceError(f"{name}: {len(systems)} VirtualSystem elements; an OVF of one VM has exactly one")
    system = systems[0]
    vm_name = next(((e.text or "").strip() for e in children(system, "Name")), "") or \
        (attr(system, "id") or "").strip() or Path(name).stem
    hardware = hardware_section(system, name)
    configuration = deployment_option(root)
    elements = [element for element in hardware
                if tag_name(element.tag) in ("Item", "EthernetPortItem", "StorageItem")
                and tag_ns(element.tag) in OVF_NAMESPACES
                # an item of another deployment option is not this VM's
                and (not (attr(element, "configuration") or "").split()
                     or configuration in (attr(element, "configuration") or "").split())]
    # Counted first, from the bare elements: before the References and items are worked through,
    # and long before any disk file is opened.
    rules.refuse_counts(vm_name, disks=sum(1 for e in elements if resource_type(e) == DISK),
                        nics=sum(1 for e in elements if resource_type(e) == ETHERNET))
    if len(elements) > MAX_ITEMS:
        raise SourceError(f"{name}: {len(elements)} hardware items, more than {MAX_ITEMS}: not one VM's "
                          "hardware: refused")
    files = references(root, name)
    disks = disk_section(root, name, files, warnings)
    spec = VMSpec(name=vm_name)
    for section in children(system, "OperatingSystemSection"):
        spec.guest_os = vmw(section, "osType") or None
    items = [_item(element) for element in elements]
    config: dict[str, str] = {}
    for element in hardware:
        if tag_ns(element.tag) == VMW and tag_name(element.tag) in ("Config", "ExtraConfig"):
            key = vmw(element, "key") or attr(element, "key")
            if key:
                config[key.lower()] = vmw(element, "value") or attr(element, "value") or ""
    _system_settings(spec, hardware, config, files, warnings)
    by_instance = _map_items(spec, items, disks, files, name, warnings)
    boot = by_instance.get(boot_instance(system) or "")
    if boot is not None:
        boot.boot = True
    spec.disks.sort(key=controller_order)
    spec.cdroms.sort(key=lambda c: (("ide", "sata", "scsi", "nvme").index(c.controller), c.bus, c.unit))
    return Envelope(spec, files, warnings)


def _system_settings(spec: VMSpec, hardware: ET.Element, config: dict[str, str],
                     files: dict[str, FileRef], warnings: list[str]) -> None:
    if config.get("firmware", "").strip().lower() == "efi":
        spec.firmware = "efi"
    spec.secure_boot = is_true(config.get("bootoptions.efisecurebootenabled")) or \
        is_true(config.get("uefi.secureboot.enabled"))
    spec.tpm = is_true(config.get("vtpm.present"))
    # An OVF export writes its disks through the host, decrypted: only the VM home's keys can be left.
    spec.home_encrypted = any(key in config for key in ("encryption.keysafe", "encryption.data", "encryption.bundle"))
    for key in ("uuid.bios", "uuid"):
        if spec.uuid is None and key in config:
            spec.uuid = _uuid(config[key])
    if spec.uuid is None:
        for system_element in children(hardware, "System"):
            for child in system_element:
                if tag_name(child.tag) == "VirtualSystemIdentifier":
                    spec.uuid = _uuid(child.text)
    nvram = config.get("nvram")
    if nvram:
        href = next((f.href for f in files.values() if f.id == nvram or f.href == nvram), nvram)
        spec.unmapped.append(f"NVRAM file {href} (EFI variables): not carried over, OVMF starts afresh")


@dataclass
class _Controller:
    kind: str
    model: str | None
    bus: int = -1
    units: set[int] = field(default_factory=set)


def _controller_kind(item: _Item) -> tuple[str, str | None] | None:
    sub = item.subtype.lower()
    if item.rtype == IDE:
        return ("ide", None)
    if item.rtype == SCSI:
        return ("scsi", _SCSI_MODELS.get(sub, sub or "lsilogic"))
    if item.rtype in (OTHER_STORAGE, 1) and "nvme" in sub:
        return ("nvme", "nvme")
    if item.rtype == OTHER_STORAGE and sub in ("vmware.sata.ahci", "ahci"):
        return ("sata", "ahci")
    return None


def _controllers(items: list[_Item]) -> dict[str, _Controller]:
    """Controllers by InstanceID, numbered per kind: their rasd:Address when it is a free
    number, else the lowest free one, in the order they appear."""
    found: list[tuple[_Item, _Controller]] = []
    for item in items:
        kind = _controller_kind(item)
        if kind is not None:
            found.append((item, _Controller(*kind)))
    taken: dict[str, set[int]] = {}
    for item, controller in found:
        address = to_int(item.props.get("Address"))
        if address is not None and 0 <= address < 64 and address not in taken.setdefault(controller.kind, set()):
            controller.bus = address
            taken[controller.kind].add(address)
    for _, controller in found:
        if controller.bus < 0:
            used = taken.setdefault(controller.kind, set())
            controller.bus = next(n for n in range(len(used) + 1) if n not in used)
            used.add(controller.bus)
    return {item.instance: controller for item, controller in found}


def _host_disk(item: _Item) -> str | None:
    host = item.props.get("HostResource", "")
    match = re.fullmatch(r"(?:ovf:)?/(disk|file)/(.+)", host)
    return f"{match.group(1)}:{match.group(2)}" if match else None


def _place(item: _Item, controllers: dict[str, _Controller], name: str) -> tuple[_Controller, int]:
    controller = controllers.get(item.props.get("Parent", ""))
    if controller is None:
        raise SourceError(f"{name}: {item.label} hangs on controller {item.props.get('Parent')!r}, "
                          "which is not a controller of the VM", hint="the OVF is inconsistent")
    unit = to_int(item.props.get("AddressOnParent"))
    if unit is None:
        unit = next(n for n in range(len(controller.units) + 1) if n not in controller.units)
    if unit in controller.units or not 0 <= unit < 256:
        raise SourceError(f"{name}: {item.label}: {controller.kind}{controller.bus}:{unit} is taken twice "
                          "or out of range", hint="the OVF is inconsistent")
    controller.units.add(unit)
    return controller, unit


def _map_items(spec: VMSpec, items: list[_Item], disks: dict[str, DiskRef], files: dict[str, FileRef],
               name: str, warnings: list[str]) -> dict[str, DiskSpec]:
    """Fill ``spec`` from the items; return the disks by their item's InstanceID (for the boot order)."""
    controllers = _controllers(items)
    used_disks: set[str] = set()
    by_instance: dict[str, DiskSpec] = {}
    for item in items:
        rtype, sub = item.rtype, item.subtype.lower()
        if item.instance in controllers:
            continue
        if rtype == CPU:
            _cpus(spec, item)
        elif rtype == MEMORY:
            amount = to_int(item.props.get("VirtualQuantity"))
            unit = units(item.props.get("AllocationUnits"), 1 << 20)
            if amount is None or unit is None:
                raise SourceError(f"{name}: memory {item.props.get('VirtualQuantity')!r} "
                                  f"{item.props.get('AllocationUnits', '')!r} not understood")
            spec.memory_mib = amount * unit >> 20
        elif rtype == DISK:
            disk = _disk(item, controllers, disks, files, used_disks, name, spec.unmapped)
            if disk is not None:
                spec.disks.append(disk)
                by_instance[item.instance] = disk
        elif rtype in (CD, DVD):
            controller, unit = _place(item, controllers, name)
            host = _host_disk(item) or ""
            image = files[host[5:]].href if host.startswith("file:") and host[5:] in files else None
            spec.cdroms.append(CdromSpec(controller.kind, controller.bus, unit, image))
        elif rtype == ETHERNET:
            mac = _mac(item.props.get("Address"))
            if item.props.get("Address") and mac is None:
                warnings.append(f"{item.label}: {item.props['Address']!r} is not a MAC address; "
                                "the NIC gets a new one")
            spec.nics.append(NicSpec(_NIC_MODELS.get(sub, sub or "e1000"), mac,
                                     item.props.get("Connection") or None))
        elif "vtpm" in sub:
            spec.tpm = True
        elif rtype in (IO_SLOT, IO_DEVICE) or "pcipassthrough" in sub or \
                (rtype != USB and "usb" in sub) or ("passthrough" in sub and rtype not in (CD, DVD, FLOPPY)):
            spec.passthrough.append(item.describe())
        elif (rtype, sub) not in _SILENT:
            spec.unmapped.append(item.describe())
    for disk_id in disks:
        if disk_id not in used_disks:
            spec.unmapped.append(f"disk {disk_id!r} of the DiskSection is on no controller: not migrated")
    return by_instance


def _cpus(spec: VMSpec, item: _Item) -> None:
    vcpus = to_int(item.props.get("VirtualQuantity")) or 1
    cores = to_int(item.cores_per_socket) or 1
    if cores < 1 or vcpus % cores:
        cores = 1
    spec.sockets, spec.cores = vcpus // cores, cores


def _disk(item: _Item, controllers: dict[str, _Controller], disks: dict[str, DiskRef],
          files: dict[str, FileRef], used: set[str], name: str, unmapped: list[str]) -> DiskSpec | None:
    host = _host_disk(item)
    if host is None:
        raise SourceError(f"{name}: {item.label} has no HostResource ovf:/disk/ID naming its disk")
    kind, ref = host.split(":", 1)
    if kind == "disk":
        disk = disks.get(ref)
        if disk is None:
            raise SourceError(f"{name}: {item.label} uses disk {ref!r}, which the DiskSection lacks")
        if ref in used:
            raise SourceError(f"{name}: disk {ref!r} is attached twice")
        used.add(ref)
        if disk.file_id is None:
            unmapped.append(f"{item.label}: a blank {disk.capacity >> 20} MiB disk with no file: not created")
            _place(item, controllers, name)
            return None
        file_id, capacity = disk.file_id, disk.capacity
    else:
        if ref not in files:
            raise SourceError(f"{name}: {item.label} uses file {ref!r}, which References lacks")
        file_id, capacity = ref, 0
    controller, unit = _place(item, controllers, name)
    mode = (item.config.get("backing.diskmode") or "persistent").replace("_", "-")
    shared = item.config.get("backing.sharing", "").lower() == "sharingmultiwriter"
    return DiskSpec(controller.kind, controller.bus, unit, file_id, capacity, controller.model, mode, shared)
