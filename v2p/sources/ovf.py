"""The ``.ovf`` and ``.ova`` sources: an OVF envelope (1.x or 2.x) and the files it names.

One envelope parser serves both (``parse_envelope``): defusedxml refuses DTDs,
entities and external references, so an XML bomb or an entity reading
``/etc/passwd`` never gets expanded. ``OvfSource`` reads the files beside the
``.ovf``; ``OvaSource`` reads them inside the tar, in place: every member is
checked but nothing is extracted, and every disk member (sparse VMDK, raw,
qcow2, VHD(X), VDI) is converted straight from its offset in the archive. A ``.mf`` manifest is checked before
a file it lists is used. Not for: deciding the KVM side (``spec.py`` onwards).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import defusedxml.ElementTree as DET
from defusedxml import DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden

from .. import rules
from ..convert import file_identity
from ..errors import SourceError, UnsafeSourceError
from ..inspect import bootsector, check_raw, describe_bytes, foreign_format, inspect_disk, read_head, vmdk
from ..inspect.model import SECTOR, Flavor
from ..inspect.qemu_input import INFO_TIMEOUT, QemuInput, qemu_source
from ..pinned import FileId, PinnedFiles, open_checked
from ..runner import run
from ..spec import CdromSpec, DiskSpec, NicSpec, VMSpec, controller_order
from .base import DiskInput, Source

OVF_NAMESPACES = ("http://schemas.dmtf.org/ovf/envelope/1", "http://schemas.dmtf.org/ovf/envelope/2")
VMW = "http://www.vmware.com/schema/ovf"
# rasd (items), vssd (the system), and OVF 2's epasd / sasd (ethernet and storage items)
CIM = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/"

# An envelope is a few KiB to a few hundred (EULAs); a manifest a line per file.
MAX_ENVELOPE = 32 << 20
MAX_MANIFEST = 1 << 20
# A real OVA holds a handful of members; a tar of millions of empty ones is an attack on memory.
MAX_MEMBERS = 10_000
# VMware's largest VM has a few hundred devices (256 disks, 10 NICs, controllers): many more items
# is not a VM, and placing them on controllers would cost time that grows with their square.
MAX_ITEMS = 2_000
CHUNK = 1 << 20

_HASHES = {"sha1": 40, "sha256": 64, "sha512": 128}
_MANIFEST_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9A-Fa-f]+)$", re.IGNORECASE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")

# DMTF CIM ResourceType values v2p reads
CPU, MEMORY, IDE, SCSI, ETHERNET, IO_SLOT, IO_DEVICE, FLOPPY, CD, DVD, DISK, OTHER_STORAGE, USB = (
    3, 4, 5, 6, 10, 12, 13, 14, 15, 16, 17, 20, 23)
_SCSI_MODELS = {"lsilogic": "lsilogic", "lsilogicsas": "lsisas1068", "virtualscsi": "pvscsi",
                "buslogic": "buslogic"}
_NIC_MODELS = {"pcnet32": "vlance"}
# Every VMware VM has these; KVM brings its own display and has no VMCI: dropping them says nothing.
_SILENT = {(24, ""), (1, "vmware.vmci")}


@dataclass(frozen=True)
class FileRef:
    """One ``References/File``: a file of the package, by its id."""

    id: str
    href: str
    size: int | None = None
    compression: str | None = None
    chunked: bool = False


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


@dataclass(frozen=True)
class Digest:
    algorithm: str  # hashlib's name: sha1, sha256, sha512
    hexdigest: str


# ---------------------------------------------------------------------------------------------
# the envelope


def check_href(href: str, name: str, what: str = "file") -> str:
    """Refuse a file name that is not a plain relative name inside the package."""
    if not href:
        raise UnsafeSourceError(f"{name}: a {what} reference has an empty name")
    if "\x00" in href:
        raise UnsafeSourceError(f"{name}: {what} {href!r} contains a NUL byte: refused")
    vmdk.refuse_line_break(href, name, what)
    if href.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", href):
        raise UnsafeSourceError(f"{name}: {what} {href!r} is an absolute path: refused",
                                hint="an OVF names its files relative to itself")
    if _SCHEME.match(href):
        raise UnsafeSourceError(f"{name}: {what} {href!r} is a URL: refused",
                                hint="v2p reads only the files of the package; download them first")
    if ".." in re.split(r"[\\/]", href):
        raise UnsafeSourceError(f"{name}: {what} {href!r} leaves the package folder: refused")
    return href


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _ns(tag: str) -> str:
    return tag[1:].split("}", 1)[0] if tag.startswith("{") else ""


def _attr(element: ET.Element, key: str) -> str | None:
    """An OVF attribute (``ovf:key`` in either OVF namespace, or unqualified)."""
    for namespace in OVF_NAMESPACES:
        value = element.get(f"{{{namespace}}}{key}")
        if value is not None:
            return value
    return element.get(key)


def _vmw(element: ET.Element, key: str) -> str | None:
    return element.get(f"{{{VMW}}}{key}")


def _children(element: ET.Element, local: str) -> list[ET.Element]:
    return [child for child in element if _local(child.tag) == local and _ns(child.tag) in OVF_NAMESPACES]


def _int(text: str | None) -> int | None:
    try:
        return int((text or "").strip())
    except ValueError:
        return None


def units(text: str | None, default: int) -> int | None:
    """Bytes per unit of a DMTF allocation unit ("byte * 2^20", "byte*10^9", "MegaBytes")."""
    if text is None or not text.strip():
        return default
    key = re.sub(r"\s+", "", text).lower()
    match = re.fullmatch(r"(?:byte|bytes)(?:\*(2|10)\^(\d{1,2}))?", key)
    if match:
        return int(match.group(1)) ** int(match.group(2)) if match.group(1) else 1
    return {"kilobytes": 1 << 10, "kb": 1 << 10, "megabytes": 1 << 20, "mb": 1 << 20,
            "gigabytes": 1 << 30, "gb": 1 << 30, "terabytes": 1 << 40, "tb": 1 << 40}.get(key)


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


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1", "yes")


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
        return _int(self.props.get("ResourceType"))

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
        namespace, local = _ns(child.tag), _local(child.tag)
        if namespace.startswith(CIM):
            props.setdefault(local, (child.text or "").strip())
        elif namespace == VMW and local in ("Config", "ExtraConfig"):
            key = _vmw(child, "key") or _attr(child, "key")
            if key:
                config[key.lower()] = _vmw(child, "value") or _attr(child, "value") or ""
        elif namespace == VMW and local == "CoresPerSocket":
            cores = (child.text or "").strip()
    cores = cores or _vmw(element, "CoresPerSocket")
    return _Item(props, config, cores)


def _parse_xml(data: bytes, name: str) -> ET.Element:
    hint = "an OVF needs no DTD or entities; remove the <!DOCTYPE ...> block"
    try:
        root: ET.Element = DET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DTDForbidden:
        raise UnsafeSourceError(f"{name}: the OVF declares a DTD (<!DOCTYPE>), where entity bombs and "
                                "external entities live: refused", hint=hint) from None
    except EntitiesForbidden as exc:
        raise UnsafeSourceError(f"{name}: the OVF declares the entity {exc.name!r}: refused", hint=hint) from None
    except ExternalReferenceForbidden as exc:
        raise UnsafeSourceError(f"{name}: the OVF refers to an external resource {exc.sysid!r}: refused",
                                hint=hint) from None
    except ET.ParseError as exc:
        raise SourceError(f"{name}: not well-formed XML ({exc})",
                          hint="the .ovf is damaged or not an OVF descriptor") from None
    return root


def parse_envelope(data: bytes, name: str) -> Envelope:
    """The VM an OVF descriptor describes; SourceError when it is unsafe or not one v2p can read.

    ``name`` is how messages name the descriptor. Reads the XML only: nothing
    it names is opened here.
    """
    root = _parse_xml(data, name)
    if _local(root.tag) != "Envelope" or _ns(root.tag) not in OVF_NAMESPACES:
        raise SourceError(f"{name}: not an OVF envelope (the root element is {_local(root.tag)!r} "
                          f"in {_ns(root.tag) or 'no namespace'!r})")
    warnings: list[str] = []
    if any(_local(e.tag) == "VirtualSystemCollection" for e in root):
        raise SourceError(f"{name}: the package holds a collection of virtual machines (a vApp); "
                          "v2p migrates one VM at a time", hint="export each VM as its own OVF")
    systems = [e for e in root if _local(e.tag) == "VirtualSystem"]
    if len(systems) != 1:
        raise SourceError(f"{name}: {len(systems)} VirtualSystem elements; an OVF of one VM has exactly one")
    system = systems[0]
    vm_name = next(((e.text or "").strip() for e in _children(system, "Name")), "") or \
        (_attr(system, "id") or "").strip() or Path(name).stem
    hardware = _hardware_section(system, name)
    configuration = _configuration(root)
    elements = [element for element in hardware
                if _local(element.tag) in ("Item", "EthernetPortItem", "StorageItem")
                and _ns(element.tag) in OVF_NAMESPACES
                # an item of another deployment option is not this VM's
                and (not (_attr(element, "configuration") or "").split()
                     or configuration in (_attr(element, "configuration") or "").split())]
    # Counted first, from the bare elements: before the References and items are worked through,
    # and long before any disk file is opened.
    rules.refuse_counts(vm_name, disks=sum(1 for e in elements if _resource_type(e) == DISK),
                        nics=sum(1 for e in elements if _resource_type(e) == ETHERNET))
    if len(elements) > MAX_ITEMS:
        raise SourceError(f"{name}: {len(elements)} hardware items, more than {MAX_ITEMS}: not one VM's "
                          "hardware: refused")
    files = _references(root, name)
    disks = _disk_section(root, name, files, warnings)
    spec = VMSpec(name=vm_name)
    for section in _children(system, "OperatingSystemSection"):
        spec.guest_os = _vmw(section, "osType") or None
    items = [_item(element) for element in elements]
    config: dict[str, str] = {}
    for element in hardware:
        if _ns(element.tag) == VMW and _local(element.tag) in ("Config", "ExtraConfig"):
            key = _vmw(element, "key") or _attr(element, "key")
            if key:
                config[key.lower()] = _vmw(element, "value") or _attr(element, "value") or ""
    _system_settings(spec, hardware, config, files, warnings)
    by_instance = _map_items(spec, items, disks, files, name, warnings)
    boot = by_instance.get(_boot_instance(system) or "")
    if boot is not None:
        boot.boot = True
    spec.disks.sort(key=controller_order)
    spec.cdroms.sort(key=lambda c: (("ide", "sata", "scsi", "nvme").index(c.controller), c.bus, c.unit))
    return Envelope(spec, files, warnings)


def _references(root: ET.Element, name: str) -> dict[str, FileRef]:
    files: dict[str, FileRef] = {}
    for section in _children(root, "References"):
        for element in _children(section, "File"):
            if len(files) >= MAX_ITEMS:
                raise SourceError(f"{name}: more than {MAX_ITEMS} files in References: not one VM's: refused")
            file_id, href = _attr(element, "id") or "", _attr(element, "href") or ""
            if file_id in files:
                raise SourceError(f"{name}: two files with the id {file_id!r} in References")
            check_href(href, name)
            files[file_id] = FileRef(file_id, href, _int(_attr(element, "size")),
                                     _attr(element, "compression") or None,
                                     _attr(element, "chunkSize") is not None)
    return files


@dataclass(frozen=True)
class _Disk:
    file_id: str | None
    capacity: int


def _disk_section(root: ET.Element, name: str, files: dict[str, FileRef],
                  warnings: list[str]) -> dict[str, _Disk]:
    disks: dict[str, _Disk] = {}
    for element in root.iter():
        if _local(element.tag) != "Disk" or _ns(element.tag) not in OVF_NAMESPACES:
            continue
        if len(disks) >= MAX_ITEMS:
            raise SourceError(f"{name}: more than {MAX_ITEMS} disks in the DiskSection: not one VM's: refused")
        disk_id = _attr(element, "diskId") or ""
        file_id = _attr(element, "fileRef")
        if file_id is not None and file_id not in files:
            raise SourceError(f"{name}: disk {disk_id!r} names the file {file_id!r}, which References lacks")
        amount = _int(_attr(element, "capacity"))
        unit = units(_attr(element, "capacityAllocationUnits"), 1)
        capacity = amount * unit if amount is not None and unit is not None else 0
        if not capacity:
            warnings.append(f"disk {disk_id!r}: capacity {_attr(element, 'capacity')!r} "
                            f"{_attr(element, 'capacityAllocationUnits') or ''} not understood; "
                            "taking the disk file's own")
        disks[disk_id] = _Disk(file_id, capacity)
    return disks


def _hardware_section(system: ET.Element, name: str) -> ET.Element:
    sections = _children(system, "VirtualHardwareSection")
    if not sections:
        raise SourceError(f"{name}: the VirtualSystem has no VirtualHardwareSection")
    for section in sections:  # one per virtualization platform; VMware's is vmx-NN
        for system_element in _children(section, "System"):
            kinds = [c.text or "" for c in system_element if _local(c.tag) == "VirtualSystemType"]
            if any("vmx" in kind for kind in kinds):
                return section
    return sections[0]


def _configuration(root: ET.Element) -> str | None:
    """The deployment option whose items apply: the default one, else the first."""
    options = [c for s in _children(root, "DeploymentOptionSection") for c in _children(s, "Configuration")]
    for option in options:
        if _true(_attr(option, "default")):
            return _attr(option, "id")
    return _attr(options[0], "id") if options else None


def _system_settings(spec: VMSpec, hardware: ET.Element, config: dict[str, str],
                     files: dict[str, FileRef], warnings: list[str]) -> None:
    if config.get("firmware", "").strip().lower() == "efi":
        spec.firmware = "efi"
    spec.secure_boot = _true(config.get("bootoptions.efisecurebootenabled")) or \
        _true(config.get("uefi.secureboot.enabled"))
    spec.tpm = _true(config.get("vtpm.present"))
    # An OVF export writes its disks through the host, decrypted: only the VM home's keys can be left.
    spec.home_encrypted = any(key in config for key in ("encryption.keysafe", "encryption.data", "encryption.bundle"))
    for key in ("uuid.bios", "uuid"):
        if spec.uuid is None and key in config:
            spec.uuid = _uuid(config[key])
    if spec.uuid is None:
        for system_element in _children(hardware, "System"):
            for child in system_element:
                if _local(child.tag) == "VirtualSystemIdentifier":
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
        address = _int(item.props.get("Address"))
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
    unit = _int(item.props.get("AddressOnParent"))
    if unit is None:
        unit = next(n for n in range(len(controller.units) + 1) if n not in controller.units)
    if unit in controller.units or not 0 <= unit < 256:
        raise SourceError(f"{name}: {item.label}: {controller.kind}{controller.bus}:{unit} is taken twice "
                          "or out of range", hint="the OVF is inconsistent")
    controller.units.add(unit)
    return controller, unit


def _map_items(spec: VMSpec, items: list[_Item], disks: dict[str, _Disk], files: dict[str, FileRef],
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
            amount = _int(item.props.get("VirtualQuantity"))
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
    vcpus = _int(item.props.get("VirtualQuantity")) or 1
    cores = _int(item.cores_per_socket) or 1
    if cores < 1 or vcpus % cores:
        cores = 1
    spec.sockets, spec.cores = vcpus // cores, cores


def _disk(item: _Item, controllers: dict[str, _Controller], disks: dict[str, _Disk],
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


def _resource_type(element: ET.Element) -> int | None:
    """An item's CIM ResourceType, read without building the item."""
    for child in element:
        if _local(child.tag) == "ResourceType" and _ns(child.tag).startswith(CIM):
            return _int(child.text)
    return None


def _boot_instance(system: ET.Element) -> str | None:
    """The InstanceID of the first disk in VMware's boot order section, if it has one."""
    for element in system.iter(f"{{{VMW}}}BootOrderSection"):
        if (_vmw(element, "type") or "").lower() == "disk":
            return _vmw(element, "instanceId")
    return None


# ---------------------------------------------------------------------------------------------
# the manifest


def parse_manifest(data: bytes, name: str) -> dict[str, Digest]:
    """``SHA256(file)= hex`` lines (SHA1, SHA256, SHA512) by file name."""
    out: dict[str, Digest] = {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SourceError(f"{name}: the manifest is not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _MANIFEST_LINE.match(line.strip())
        if not match:
            raise SourceError(f"{name}: line {number} is not ALGORITHM(file)= digest",
                              hint="v2p reads SHA1, SHA256 and SHA512 manifests")
        algorithm, fname, digest = match.group(1).lower(), match.group(2), match.group(3).lower()
        check_href(fname, name, "manifest entry")
        if len(digest) != _HASHES[algorithm]:
            raise SourceError(f"{name}: line {number}: a {algorithm.upper()} digest has "
                              f"{_HASHES[algorithm]} hex digits, not {len(digest)}")
        if fname in out and out[fname] != Digest(algorithm, digest):
            raise SourceError(f"{name}: {fname} is listed twice with different digests")
        out[fname] = Digest(algorithm, digest)
    return out


def _read_bounded(src: BinaryIO, size: int, limit: int, name: str, what: str) -> bytes:
    if size > limit:
        raise SourceError(f"{name}: the {what} is {size} bytes; more than the {limit} v2p reads: refused")
    return src.read(size)


# ---------------------------------------------------------------------------------------------
# the sources


class _Package(Source):
    """What ``.ovf`` and ``.ova`` share: the envelope, the manifest, verified files.

    ``warnings`` collects what the user should see (no manifest, a file the
    manifest does not cover, a signature not checked); it fills as ``spec()``
    and ``disk_input()`` run.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.given = str(path)
        # the real file: its folder is where the package's files are, and no link of ours moves it
        self.path = Path(os.path.realpath(path))
        vmdk.refuse_line_break(str(self.path))
        self.warnings: list[str] = []
        self._envelope: Envelope | None = None
        self._manifest: dict[str, Digest] | None = None
        self._manifest_name: str | None = None
        self._verified: set[str] = set()

    def describe(self) -> str:
        return self.given

    # what each kind of package provides
    def _open_package(self) -> None:
        """Check the container (the tar) before anything is read from it."""

    def _descriptor_name(self) -> str:
        raise NotImplementedError

    def _size(self, href: str) -> int | None:
        """Bytes of the package's file ``href``; None when it is missing."""
        raise NotImplementedError

    def _open(self, href: str) -> BinaryIO:
        """``href``'s bytes, position 0 at its start (a plain file, or a view into the tar)."""
        raise NotImplementedError

    def _where(self, href: str) -> str:
        """``href`` as messages name it."""
        raise NotImplementedError

    # shared
    def envelope(self) -> Envelope:
        if self._envelope is None:
            self._open_package()
            ovf = self._descriptor_name()
            size = self._size(ovf)
            if size is None:
                raise SourceError(f"{self._where(ovf)}: no such file")
            with self._open(ovf) as src:
                data = _read_bounded(src, size, MAX_ENVELOPE, self._where(ovf), "OVF descriptor")
            envelope = parse_envelope(data, self._where(ovf))
            self._load_manifest(ovf)
            self._verify_bytes(ovf, data)
            self._check_files(envelope)
            self.warnings += envelope.warnings
            self._envelope = envelope
        return self._envelope

    def spec(self) -> VMSpec:
        return VMSpec.from_dict(self.envelope().spec.to_dict())

    def _load_manifest(self, ovf: str) -> None:
        mf = re.sub(r"\.ovf$", "", ovf, flags=re.IGNORECASE) + ".mf"
        size = self._size(mf)
        if size is None:
            self._manifest = None
            self.warnings.append(f"{self._where(ovf)}: no manifest ({Path(mf).name}); "
                                 "the files cannot be checked for damage")
            return
        with self._open(mf) as src:
            data = _read_bounded(src, size, MAX_MANIFEST, self._where(mf), "manifest")
        self._manifest = parse_manifest(data, self._where(mf))
        self._manifest_name = mf
        for fname in self._manifest:
            if self._size(fname) is None:
                raise SourceError(f"{self._where(mf)}: lists {fname}, which is missing",
                                  hint="copy the whole package again")
        if self._size(re.sub(r"\.mf$", ".cert", mf)) is not None:
            self.warnings.append(f"{self._where(mf)}: the package is signed; v2p checks the manifest's "
                                 "digests but not the signature")

    def _check_files(self, envelope: Envelope) -> None:
        disk_files = {d.source for d in envelope.spec.disks}
        for ref in envelope.files.values():
            size = self._size(ref.href)
            if size is None:
                if ref.id in disk_files:
                    raise SourceError(f"{self._where(ref.href)}: the disk file is missing",
                                      hint="copy the whole package again")
                continue
            if ref.id not in disk_files:
                continue
            if ref.compression and ref.compression != "identity":
                raise SourceError(f"{self._where(ref.href)}: the file is {ref.compression}-compressed; "
                                  "v2p reads uncompressed packages", hint="re-export it with ovftool "
                                  "without --compress, or unpack the file first")
            if ref.chunked:
                raise SourceError(f"{self._where(ref.href)}: the file is split in chunks (ovf:chunkSize); "
                                  "not supported", hint="re-export it with ovftool without --chunkSize")
            if ref.size is not None and ref.size != size:
                raise SourceError(f"{self._where(ref.href)}: {size} bytes, the OVF says {ref.size} "
                                  "(an incomplete copy?)", hint="copy the package again")

    def _digest_for(self, href: str) -> Digest | None:
        if self._manifest is None:
            return None
        digest = self._manifest.get(href)
        if digest is None:
            self.warnings.append(f"{self._where(href)}: not listed in the manifest; not checked")
        return digest

    def _mismatch(self, href: str, digest: Digest) -> SourceError:
        return SourceError(f"{self._where(href)}: its {digest.algorithm.upper()} does not match the "
                           f"manifest {Path(self._manifest_name or '').name}: refused",
                           hint="the file is damaged or was changed; copy the package again")

    def _verify_bytes(self, href: str, data: bytes) -> None:
        digest = self._digest_for(href)
        if digest is not None:
            if hashlib.new(digest.algorithm, data).hexdigest() != digest.hexdigest:
                raise self._mismatch(href, digest)
            self._verified.add(href)

    def verify(self, href: str, copy: Callable[[bytes], object] | None = None, *,
               through: str | None = None) -> None:
        """Check ``href`` against the manifest, reading it once in 1 MiB pieces (each also
        handed to ``copy``, when given); a file already checked is not read again unless copied.
        ``through``: the pinned file to read (``/dev/fd/N``), which is what the copy reads."""
        if href in self._verified and copy is None:
            return
        digest = self._digest_for(href)
        if digest is None and copy is None:
            return
        hasher = hashlib.new(digest.algorithm) if digest is not None else None
        with open(through, "rb") if through is not None else self._open(href) as src:
            while chunk := src.read(CHUNK):
                if hasher is not None:
                    hasher.update(chunk)
                if copy is not None:
                    copy(chunk)
        if digest is not None and hasher is not None:
            if hasher.hexdigest() != digest.hexdigest:
                raise self._mismatch(href, digest)
            self._verified.add(href)

    def verify_all(self) -> None:
        """Check every file the manifest lists (spec() checks only the descriptor, disk_input() its disk)."""
        self.envelope()
        for fname in self._manifest or {}:
            self.verify(fname)

    def _file_of(self, disk: DiskSpec) -> FileRef:
        return self.envelope().disk_file(disk, self._where(self._descriptor_name()))

    def notices(self) -> list[str]:
        return list(self.warnings)


class OvfSource(_Package):
    """An ``.ovf`` descriptor with its files in the same folder."""

    kind = "ovf"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self.folder = self.path.parent

    def _descriptor_name(self) -> str:
        return self.path.name

    def _resolve(self, href: str) -> Path:
        check_href(href, str(self.path))
        return vmdk.resolve_inside(self.folder, href, str(self.path), "file")

    def _size(self, href: str) -> int | None:
        path = self._resolve(href)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SourceError(f"{path}: cannot read: {exc.strerror}") from None
        kind = vmdk.file_kind(st.st_mode)
        if kind is not None:
            raise SourceError(f"{path} is {kind}, not a regular file")
        return st.st_size

    def _open(self, href: str) -> BinaryIO:
        path = self._resolve(href)
        return vmdk.open_regular(path, str(path))

    def _where(self, href: str) -> str:
        return str(self.folder / href)

    def disk_input(self, disk: DiskSpec, workdir: Path) -> DiskInput:
        ref = self._file_of(disk)
        image = inspect_disk(self._resolve(ref.href), link_ok=False)
        # One folder per disk, as for a .vmx: qemu_source writes its descriptors under fixed names.
        qemu = qemu_source(image, workdir / f"{disk.controller}{disk.bus}-{disk.unit}")
        try:
            # The manifest is checked on the file qemu-img will read, not on whatever the path holds.
            assert qemu.pins is not None
            self.verify(ref.href, through=qemu.pins.path(image.path))
        except BaseException:
            qemu.close()
            raise
        return DiskInput(qemu, image.capacity, image.flavor.value, image, tuple(image.messages))

    def fingerprint(self) -> list[dict[str, Any]]:
        envelope = self.envelope()
        names = [self.path.name]
        if self._manifest_name:
            names.append(self._manifest_name)
        names += [envelope.disk_file(d, str(self.path)).href for d in envelope.spec.disks]
        out: list[dict[str, Any]] = []
        for href in dict.fromkeys(names):
            out.append(file_identity(self._resolve(href)))
        return out


@dataclass(frozen=True)
class Member:
    """A regular file inside the tar: where its bytes lie."""

    name: str
    offset: int
    size: int


class _MemberView(io.RawIOBase):
    """A read-only file of ``size`` bytes starting at ``offset`` in ``fd`` (which it does not own)."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        super().__init__()
        self._fd, self._offset, self._size, self._pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = max(0, min(len(buffer), self._size - self._pos))
        data = os.pread(self._fd, want, self._offset + self._pos) if want else b""
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


class _MemberFile(io.BufferedReader):
    """A member view that closes the archive's descriptor with itself."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        super().__init__(_MemberView(fd, offset, size), CHUNK)
        self._owned_fd = fd

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._owned_fd >= 0:
                os.close(self._owned_fd)
                self._owned_fd = -1


def scan_tar(path: Path, name: str) -> dict[str, Member]:
    """Every member of the tar at ``path``, checked: plain relative names, regular files only.

    Reads the headers only (tarfile seeks over the data); nothing is extracted.
    """
    members: dict[str, Member] = {}
    with vmdk.open_regular(path, name) as handle:
        total = os.fstat(handle.fileno()).st_size
        try:
            with tarfile.open(fileobj=handle, mode="r:") as tar:
                while (info := tar.next()) is not None:
                    if len(members) >= MAX_MEMBERS:
                        raise SourceError(f"{name}: more than {MAX_MEMBERS} members; not an OVA: refused")
                    member = _check_member(info, name)
                    if member.name in members:
                        raise UnsafeSourceError(f"{name}: member {member.name!r} appears twice "
                                                "(which one is meant?): refused")
                    if member.offset + member.size > total:
                        raise SourceError(f"{name}: member {member.name!r} runs past the end of the "
                                          "archive (cut short)", hint="copy the .ova again")
                    members[member.name] = member
        except tarfile.TarError as exc:
            raise SourceError(f"{name}: not a readable tar archive ({exc})",
                              hint="an .ova is an uncompressed tar of the .ovf, .mf and disks") from None
    return members


def _check_member(info: tarfile.TarInfo, name: str) -> Member:
    text = info.name
    if "\x00" in text:
        raise UnsafeSourceError(f"{name}: member name {text!r} contains a NUL byte: refused")
    vmdk.refuse_line_break(text, name, "member")
    if text.startswith("/"):
        raise UnsafeSourceError(f"{name}: member {text!r} has an absolute name: refused")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeSourceError(f"{name}: member {text!r} leaves the archive's folder (..): refused")
    kind = None
    if info.issym():
        kind = f"a symbolic link to {info.linkname!r}"
    elif info.islnk():
        kind = f"a hard link to {info.linkname!r}"
    elif info.ischr() or info.isblk():
        kind = "a device"
    elif info.isfifo():
        kind = "a FIFO"
    elif info.isdir():
        kind = "a folder"
    elif info.issparse():
        kind = "a GNU sparse file"
    elif not info.isreg():
        kind = "not a regular file"
    if kind is not None:
        raise UnsafeSourceError(f"{name}: member {text!r} is {kind}; an OVA holds plain files only: refused")
    if not parts:
        raise UnsafeSourceError(f"{name}: a member has the empty name {text!r}: refused")
    return Member("/".join(parts), info.offset_data, info.size)


class OvaSource(_Package):
    """An ``.ova``: a tar holding the ``.ovf``, its ``.mf`` and the disks, read in place."""

    kind = "ova"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self._members: dict[str, Member] | None = None
        self._id = FileId(-1, -1, -1, -1)  # the archive as first opened (``_open_package``)
        self._ovf = ""

    def _open_package(self) -> None:
        if self._members is not None:
            return
        # Every later read of the archive must find this very file (see ``_open``).
        with vmdk.open_regular(self.path, str(self.path)) as handle:
            self._id = FileId.of(os.fstat(handle.fileno()))
            members = scan_tar(Path(f"/dev/fd/{handle.fileno()}"), str(self.path))
        ovfs = [m for m in members if m.lower().endswith(".ovf")]
        if len(ovfs) != 1:
            raise SourceError(f"{self.path}: {len(ovfs)} .ovf descriptors in the archive; an OVA has one",
                              hint="is this an OVA? `tar tf` lists what it holds")
        if next(iter(members)) != ovfs[0]:
            self.warnings.append(f"{self.path}: the .ovf is not the first member (the OVF standard "
                                 "puts it first); read anyway")
        self._members, self._ovf = members, ovfs[0]

    def members(self) -> dict[str, Member]:
        self._open_package()
        assert self._members is not None
        return self._members

    def _descriptor_name(self) -> str:
        self._open_package()
        return self._ovf

    def _size(self, href: str) -> int | None:
        member = self.members().get(href.removeprefix("./"))
        return member.size if member else None

    def _member(self, href: str) -> Member:
        member = self.members().get(href.removeprefix("./"))
        if member is None:
            raise SourceError(f"{self._where(href)}: no such member in the archive")
        return member

    def _open(self, href: str) -> BinaryIO:
        member = self._member(href)
        return _MemberFile(open_checked(self.path, self._id, follow=False), member.offset, member.size)

    def _where(self, href: str) -> str:
        return f"{self.path}: member {href}"

    def disk_input(self, disk: DiskSpec, workdir: Path) -> DiskInput:
        """Every disk member is read where it lies in the archive: nothing is copied out, so
        inspecting an OVA of a 4 GiB disk reads headers (and its digest), and a killed run leaves
        nothing behind. What the member's own bytes say is checked before the digest is taken."""
        ref = self._file_of(disk)
        member = self._member(ref.href)
        where = self._where(ref.href)
        if member.size == 0:
            raise SourceError(f"{where} is empty (0 bytes), not a disk image")
        with self._open(ref.href) as src:
            head = src.read(64 * 1024)
            if head.startswith(vmdk.KDMV):
                self.verify(ref.href)
                return self._in_place(src, member, where)
            src.seek(max(0, member.size - SECTOR))
            tail = src.read(SECTOR)
        if vmdk.looks_like_descriptor(head):
            raise SourceError(f"{where}: a VMDK text descriptor whose data lies in other files; "
                              "v2p converts self-contained disks from an OVA",
                              hint="re-export with ovftool (streamOptimized disks), or unpack the OVA "
                                   "with tar and give v2p the .ovf")
        if head.startswith(vmdk.COWD) or head[:8] == vmdk.SESPARSE_MAGIC.to_bytes(8, "little"):
            raise SourceError(f"{where} is an ESX snapshot delta extent, not a disk on its own",
                              hint="consolidate the snapshots in VMware and export again")
        return self._window(ref.href, member, where, disk, head, tail)

    def _window(self, href: str, member: Member, where: str, disk: DiskSpec, head: bytes,
                tail: bytes) -> DiskInput:
        """A raw, qcow2, VHD(X) or VDI member: its format's driver over a raw window of the archive
        (the archive checked when its tar was read, whatever is at its path by then: see pinned.py)."""
        pins = PinnedFiles({self.path: self._id})
        window: dict[str, Any] = {"driver": "raw", "offset": member.offset, "size": member.size,
                                  "file": {"driver": "file", "filename": pins.path(self.path)}}
        found = foreign_format(where, head, tail)
        if found is None:
            check_raw(where, head, member.size, describe_bytes(head))
            if disk.capacity and disk.capacity != member.size:
                raise SourceError(f"{where}: a raw disk of {member.size} bytes, but the OVF declares a capacity "
                                  f"of {disk.capacity}: refused", hint="the package is damaged; export it again")
            self.verify(href)
            qemu = QemuInput("raw", "json:" + json.dumps(window), pins)
            flavor, capacity = Flavor.RAW, member.size
        else:
            flavor, fmt = found
            self.verify(href)  # before qemu-img reads a byte of it
            spec: dict[str, Any] = {"driver": fmt, "file": window}
            if fmt == "qcow2":
                spec["backing"] = None
            qemu = QemuInput(fmt, "json:" + json.dumps(spec), pins)
            info = json.loads(run(["qemu-img", "info", "--output=json", "-f", fmt, qemu.filename],
                                  timeout=INFO_TIMEOUT, pass_fds=qemu.fds).stdout)
            capacity = int(info["virtual-size"])
        note = (f"{member.name} ({flavor.value}) is read in place from {self.path.name} (offset {member.offset}, "
                f"{member.size} bytes); nothing is extracted")
        return DiskInput(qemu, capacity, flavor.value, None, (("note", note),), boot=_boot(qemu))

    def _in_place(self, src: BinaryIO, member: Member, where: str) -> DiskInput:
        """A hosted sparse VMDK (streamOptimized, as OVAs carry): qemu reads it where it lies,
        through a raw window of the archive, after v2p checked its header and tables there."""
        header = vmdk.check_sparse_stream(src, member.size, where)
        if header.descriptor_offset and header.descriptor_size:
            start, length = header.descriptor_offset * SECTOR, header.descriptor_size * SECTOR
            if length > vmdk.MAX_DESCRIPTOR or start + length > member.size:
                raise SourceError(f"{where}: embedded descriptor lies outside the disk")
            src.seek(start)
            desc = vmdk.parse_descriptor(src.read(length), where)
            if desc.parent_cid is not None:
                raise SourceError(f"{where}: a snapshot delta (parentCID {desc.parent_cid}); an OVA "
                                  "disk must stand alone", hint="consolidate the snapshots and export again")
            described = sum(sectors for _a, sectors, _k, _f, _o in desc.extents)
            if desc.extents and described != header.capacity:
                raise SourceError(f"{where}: header capacity is {header.capacity} sectors, its embedded "
                                  f"descriptor says {described} (capacity mismatch)")
        flavor = Flavor.STREAM_OPTIMIZED if header.stream_optimized else Flavor.MONOLITHIC_SPARSE
        # qemu reads the archive checked above, whatever is at its path by then (see pinned.py).
        pins = PinnedFiles({self.path: self._id})
        window = {"driver": "raw", "offset": member.offset, "size": member.size,
                  "file": {"driver": "file", "filename": pins.path(self.path)}}
        qemu = QemuInput("vmdk", "json:" + json.dumps({"driver": "vmdk", "file": window, "backing": None}), pins)
        note = (f"{member.name} is read in place from {self.path.name} (offset {member.offset}, "
                f"{member.size} bytes); nothing is extracted")
        return DiskInput(qemu, header.capacity * SECTOR, flavor.value, None, (("note", note),), boot=_boot(qemu))

    def fingerprint(self) -> list[dict[str, Any]]:
        return [file_identity(self.path)]


def _boot(qemu: QemuInput) -> bootsector.BootLayout:
    """How a disk read in place boots: its first sectors, read through the same checked window."""
    return bootsector.layout(read_head(qemu.fmt, qemu.filename, qemu.fds))
