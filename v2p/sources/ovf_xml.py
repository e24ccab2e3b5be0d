"""The OVF envelope as XML: parsed safely, and the parts that say what the package holds.

defusedxml refuses DTDs, entities and external references, so an XML bomb or an
entity reading ``/etc/passwd`` never gets expanded. A file name the envelope
gives is checked to stay inside the package (``check_href``). Here too: the
References and DiskSection, the hardware section VMware's platform uses, the
deployment option that applies, the boot order. Not for: what the hardware items
mean for the VM (``ovf_mapping``), or opening any file (``ovf_package``).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import defusedxml.ElementTree as DET
from defusedxml import DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden

from ..errors import SourceError, UnsafeSourceError
from ..inspect import vmdk

OVF_NAMESPACES = ("http://schemas.dmtf.org/ovf/envelope/1", "http://schemas.dmtf.org/ovf/envelope/2")
VMW = "http://www.vmware.com/schema/ovf"
# rasd (items), vssd (the system), and OVF 2's epasd / sasd (ethernet and storage items)
CIM = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/"
# VMware's largest VM has a few hundred devices (256 disks, 10 NICs, controllers): many more items
# is not a VM, and placing them on controllers would cost time that grows with their square.
MAX_ITEMS = 2_000
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class FileRef:
    """One ``References/File``: a file of the package, by its id."""

    id: str
    href: str
    size: int | None = None
    compression: str | None = None
    chunked: bool = False


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


def tag_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def tag_ns(tag: str) -> str:
    return tag[1:].split("}", 1)[0] if tag.startswith("{") else ""


def attr(element: ET.Element, key: str) -> str | None:
    """An OVF attribute (``ovf:key`` in either OVF namespace, or unqualified)."""
    for namespace in OVF_NAMESPACES:
        value = element.get(f"{{{namespace}}}{key}")
        if value is not None:
            return value
    return element.get(key)


def vmw(element: ET.Element, key: str) -> str | None:
    return element.get(f"{{{VMW}}}{key}")


def children(element: ET.Element, local: str) -> list[ET.Element]:
    return [child for child in element if tag_name(child.tag) == local and tag_ns(child.tag) in OVF_NAMESPACES]


def to_int(text: str | None) -> int | None:
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


def is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1", "yes")


def parse_xml(data: bytes, name: str) -> ET.Element:
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


def references(root: ET.Element, name: str) -> dict[str, FileRef]:
    files: dict[str, FileRef] = {}
    for section in children(root, "References"):
        for element in children(section, "File"):
            if len(files) >= MAX_ITEMS:
                raise SourceError(f"{name}: more than {MAX_ITEMS} files in References: not one VM's: refused")
            file_id, href = attr(element, "id") or "", attr(element, "href") or ""
            if file_id in files:
                raise SourceError(f"{name}: two files with the id {file_id!r} in References")
            check_href(href, name)
            files[file_id] = FileRef(file_id, href, to_int(attr(element, "size")),
                                     attr(element, "compression") or None,
                                     attr(element, "chunkSize") is not None)
    return files


@dataclass(frozen=True)
class DiskRef:
    file_id: str | None
    capacity: int


def disk_section(root: ET.Element, name: str, files: dict[str, FileRef],
                  warnings: list[str]) -> dict[str, DiskRef]:
    disks: dict[str, DiskRef] = {}
    for element in root.iter():
        if tag_name(element.tag) != "Disk" or tag_ns(element.tag) not in OVF_NAMESPACES:
            continue
        if len(disks) >= MAX_ITEMS:
            raise SourceError(f"{name}: more than {MAX_ITEMS} disks in the DiskSection: not one VM's: refused")
        disk_id = attr(element, "diskId") or ""
        file_id = attr(element, "fileRef")
        if file_id is not None and file_id not in files:
            raise SourceError(f"{name}: disk {disk_id!r} names the file {file_id!r}, which References lacks")
        amount = to_int(attr(element, "capacity"))
        unit = units(attr(element, "capacityAllocationUnits"), 1)
        capacity = amount * unit if amount is not None and unit is not None else 0
        if not capacity:
            warnings.append(f"disk {disk_id!r}: capacity {attr(element, 'capacity')!r} "
                            f"{attr(element, 'capacityAllocationUnits') or ''} not understood; "
                            "taking the disk file's own")
        disks[disk_id] = DiskRef(file_id, capacity)
    return disks


def hardware_section(system: ET.Element, name: str) -> ET.Element:
    sections = children(system, "VirtualHardwareSection")
    if not sections:
        raise SourceError(f"{name}: the VirtualSystem has no VirtualHardwareSection")
    for section in sections:  # one per virtualization platform; VMware's is vmx-NN
        for system_element in children(section, "System"):
            kinds = [c.text or "" for c in system_element if tag_name(c.tag) == "VirtualSystemType"]
            if any("vmx" in kind for kind in kinds):
                return section
    return sections[0]


def deployment_option(root: ET.Element) -> str | None:
    """The deployment option whose items apply: the default one, else the first."""
    options = [c for s in children(root, "DeploymentOptionSection") for c in children(s, "Configuration")]
    for option in options:
        if is_true(attr(option, "default")):
            return attr(option, "id")
    return attr(options[0], "id") if options else None


def resource_type(element: ET.Element) -> int | None:
    """An item's CIM ResourceType, read without building the item."""
    for child in element:
        if tag_name(child.tag) == "ResourceType" and tag_ns(child.tag).startswith(CIM):
            return to_int(child.text)
    return None


def boot_instance(system: ET.Element) -> str | None:
    """The InstanceID of the first disk in VMware's boot order section, if it has one."""
    for element in system.iter(f"{{{VMW}}}BootOrderSection"):
        if (vmw(element, "type") or "").lower() == "disk":
            return vmw(element, "instanceId")
    return None
