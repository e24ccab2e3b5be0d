"""A VMware ``.vmx`` file and the disks it names, as a v2p source.

Reads VMware's ``key = "value"`` config (keys case-insensitive, the last of a
duplicated key wins, ``|XX`` escapes, an ``.encoding`` line) into a ``VMSpec``
and hands each disk to ``inspect_disk``, which checks and consolidates it
(snapshot chains included). Disk files must stay inside the ``.vmx``'s folder,
checked by the same helper that checks VMDK extents. Not for: judging the
hardware (``rules``) or mapping it to KVM (the PVE config mapping).
"""

from __future__ import annotations

import codecs
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import rules
from ..convert import file_identity, source_fingerprint
from ..errors import SourceError, UnsafeSourceError
from ..inspect import inspect_disk
from ..inspect import vmdk as vmdk_parser
from ..inspect.model import SECTOR, DiskImage
from ..inspect.qemu_input import qemu_source
from ..spec import CONTROLLER_KINDS, CdromSpec, DiskSpec, NicSpec, VMSpec, controller_order
from .base import DiskInput, LocalSource

# A .vmx is a few KiB; a big one carries guestinfo blobs. Past this it is not a .vmx.
MAX_VMX = 4 << 20
# What VMware runs a VM with when the key is missing (memsize: 32 MiB, as virt-v2v notes).
DEFAULT_MEMSIZE = 32
# libvirt's vmx driver documents vlance as ethernetN.virtualDev's default.
DEFAULT_NIC = "vlance"

_DISK_TYPES = {"disk", "plaindisk", "scsi-harddisk", "ata-harddisk"}
_RDM_TYPES = {"rawdisk"}
_CDROM_TYPES = {"cdrom-image", "cdrom-raw", "atapi-cdrom"}
_RDM_CREATE_TYPES = {"vmfsrawdevicemap", "vmfspassthroughrawdevicemap", "fulldevice", "partitioneddevice",
                     "vmfsrdm", "vmfsraw"}
# Devices VMware itself adds to the virtual USB controllers (the pointer, the hub): not passthrough.
_VIRTUAL_USB = {"hid", "hub", "mouse", "keyboard"}
_CONTROLLER_MODEL = {"sata": "ahci", "nvme": "nvme"}

_LINE = re.compile(r'^\s*(?P<key>[^\s="#|]+)\s*=\s*(?:"(?P<quoted>[^"]*)"|(?P<bare>[^\s"#]+))\s*(?:#.*)?$')
_ENCODING = re.compile(rb'^[ \t]*\.encoding[ \t]*=[ \t]*"([^"\r\n]*)"', re.IGNORECASE | re.MULTILINE)
_ESCAPE = re.compile(rb"\|([0-9A-Fa-f]{2})")
_SLOT = re.compile(r"^(ide|sata|scsi|nvme)(\d{1,4}):(\d{1,4})\.present$")
_NIC = re.compile(r"^ethernet(\d{1,4})\.present$")
_USB = re.compile(r"^(usb|usb_xhci):(\d{1,4})\.present$")
_PCI = re.compile(r"^pcipassthru(\d{1,4})\.present$")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}([:-])(?:[0-9A-Fa-f]{2}\1){4}[0-9A-Fa-f]{2}$")
# What VM Encryption leaves in a disk's (text or embedded) descriptor: vSphere's wrapped key
# (encryptionKeys) and its crypto I/O filter, or a hosted product's key safe.
_DISK_CRYPT = re.compile(rb'^[ \t]*(?:encryptionkeys|encryption\.keysafe|encryption\.data)[ \t]*='
                         rb'|^[ \t]*ddb\.iofilters[ \t]*=[ \t]*"[^"\r\n]*vmwarevmcrypt', re.IGNORECASE | re.MULTILINE)
# Keys that hold the VM home's key safe: vSphere (encryption.bundle; a vTPM requires it) and
# hosted products (encryption.keySafe + encryption.data; "fast" encryption leaves the disks plain).
_HOME_CRYPT = ("encryption.keySafe", "encryption.data", "encryption.bundle")
# The text encodings a .vmx may declare, by codecs.lookup's name: what VMware writes (UTF-8, the
# Windows and ISO code pages, the East Asian multi-byte sets) and other ASCII-compatible ones, in
# which a newline, '=', '"' and '|' are those bytes. Python also registers bytes-to-bytes codecs
# (hex, zlib, rot13, ...), stateful or 16-bit ones (utf-16, iso2022) and "undefined": never text here.
TEXT_ENCODINGS = frozenset({
    "utf-8", "utf-8-sig", "ascii", "mac-roman", "koi8-r", "koi8-u", "tis-620",
    *(f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16)),
    *(f"cp{n}" for n in (437, 850, 852, 866, 874, 932, 949, 1250, 1251, 1252, 1253, 1254, 1255, 1256,
                          1257, 1258)),
    "shift_jis", "euc_jp", "gb2312", "gbk", "gb18030", "big5", "big5hkscs", "euc_kr",
})
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


@dataclass
class VmxFile:
    """A parsed .vmx: lower-case key -> (decoded value, line number of the setting that won)."""

    name: str  # the file, as messages name it
    settings: dict[str, tuple[str, int]] = field(default_factory=dict)

    def get(self, key: str) -> str | None:
        item = self.settings.get(key.lower())
        return item[0] if item else None

    def where(self, key: str) -> str:
        """``file:line`` of ``key`` (the file alone if it is not set)."""
        item = self.settings.get(key.lower())
        return f"{self.name}:{item[1]}" if item else self.name

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.get(key)
        if value is None or not value.strip():
            return default
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise SourceError(f"{self.where(key)}: {key} = {value!r} is not TRUE or FALSE")

    def number(self, key: str, default: int) -> int:
        value = self.get(key)
        if value is None or not value.strip():
            return default
        text = value.strip()
        if not re.fullmatch(r"\d{1,9}", text) or int(text) == 0:
            raise SourceError(f"{self.where(key)}: {key} = {value!r} is not a positive whole number")
        return int(text)


def parse_vmx(data: bytes, name: str) -> VmxFile:
    """Parse the bytes of a .vmx; raise ``SourceError`` (naming ``name`` and the line) on anything else."""
    if data.startswith((vmdk_parser.KDMV, vmdk_parser.COWD)) or vmdk_parser.looks_like_descriptor(data[:4096]):
        raise SourceError(f"{name} is a VMDK disk, not a .vmx VM configuration",
                          hint="give the .vmx beside it, or migrate the .vmdk on its own")
    data = data.removeprefix(codecs.BOM_UTF8)
    nul = data.find(b"\0")
    if nul >= 0:
        raise SourceError(f"{name}: binary data (a NUL byte at offset {nul}): not a .vmx file")
    encoding = "utf-8"
    declared = _ENCODING.search(data)
    if declared:
        encoding = _text_encoding(declared.group(1), name, data.count(b"\n", 0, declared.start()) + 1)
    vmx = VmxFile(name)
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        try:
            line = raw.decode(encoding)
        except UnicodeError as exc:
            at = getattr(exc, "start", None)
            byte = f" (byte {raw[at]:#04x})" if isinstance(at, int) and 0 <= at < len(raw) else ""
            raise SourceError(f"{name}:{number}: not {encoding} text{byte}: not a .vmx file") from None
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        bad = _CONTROL.search(line)
        if bad:
            raise SourceError(f"{name}:{number}: binary data (control character {ord(bad.group()):#04x}): "
                              "not a .vmx file")
        match = _LINE.match(line)
        if match is None:
            raise SourceError(f"{name}:{number}: not a .vmx setting: {stripped[:60]!r}",
                              hint='each line of a .vmx is key = "value", a # comment, or blank')
        value = match.group("quoted")
        if value is None:
            value = match.group("bare")
        vmx.settings[match.group("key").lower()] = (_unescape(value, encoding, name, number), number)
    if not vmx.settings:
        raise SourceError(f"{name}: no settings in it: not a .vmx file")
    return vmx


def _text_encoding(raw: bytes, name: str, line: int) -> str:
    """The codec of a ``.encoding`` label, if it is one of ``TEXT_ENCODINGS``; else a one-line SourceError."""
    label = raw.decode("ascii", "replace").strip()
    shown = repr(label[:40]) + ("..." if len(label) > 40 else "")
    hint = 'VMware writes .encoding = "UTF-8" (or the Windows code page of the host, such as "windows-1252")'
    try:
        encoding = codecs.lookup(label).name
    except (LookupError, ValueError):  # ValueError: a label with a NUL
        raise SourceError(f"{name}:{line}: .encoding {shown} is not an encoding v2p knows", hint=hint) from None
    if encoding not in TEXT_ENCODINGS:
        raise SourceError(f"{name}:{line}: .encoding {shown} is not a text encoding a .vmx can be written in: "
                          "refused", hint=hint)
    return encoding


def _unescape(value: str, encoding: str, name: str, number: int) -> str:
    """VMware's ``|XX`` escapes (|22 is ", |7C is |): bytes of the file's encoding, decoded with it."""
    if "|" not in value:
        return value
    try:
        raw = _ESCAPE.sub(lambda m: bytes.fromhex(m.group(1).decode()), value.encode(encoding))
        return raw.decode(encoding)
    except UnicodeError:
        raise SourceError(f"{name}:{number}: an |XX escape makes bytes that are not {encoding} text") from None


def read_vmx(path: Path, name: str) -> VmxFile:
    """Read and parse the .vmx at ``path`` (a regular file, at most ``MAX_VMX`` bytes)."""
    vmdk_parser.refuse_line_break(os.path.abspath(path))
    try:
        os.stat(path)
    except FileNotFoundError:
        raise SourceError(f"{name}: no such file", hint="check the path") from None
    except OSError as exc:
        raise SourceError(f"{name}: cannot read: {exc.strerror}") from None
    try:
        with vmdk_parser.open_regular(path, name) as src:
            data = src.read(MAX_VMX + 1)
    except OSError as exc:
        raise SourceError(f"{name}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_VMX:
        raise SourceError(f"{name} is larger than {MAX_VMX >> 20} MiB: not a .vmx file",
                          hint="a .vmx is a few KiB of key = \"value\" lines")
    return parse_vmx(data, name)


def sniff(head: bytes) -> bool:
    """Whether ``head`` (a file's first KiB) reads like a .vmx: for picking a source by content."""
    try:
        vmx = parse_vmx(head.rsplit(b"\n", 1)[0] if len(head) >= 1024 else head, "-")
    except SourceError:
        return False
    return any(key in vmx.settings for key in (".encoding", "config.version", "virtualhw.version"))


def canonical_uuid(text: str, where: str) -> str:
    """VMware's ``56 4d 2a ...-...`` byte list as an 8-4-4-4-12 lower-case UUID, bytes in order."""
    digits = re.sub(r"[\s-]", "", text).lower()
    if not re.fullmatch(r"[0-9a-f]{32}", digits):
        raise SourceError(f"{where}: uuid.bios = {text!r} is not 16 hex bytes")
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def canonical_mac(text: str, where: str) -> str:
    """A MAC address as upper-case hex pairs joined by colons."""
    value = text.strip()
    if not _MAC.fullmatch(value):
        raise SourceError(f"{where}: {text!r} is not a MAC address")
    return value.replace("-", ":").upper()


@dataclass(frozen=True)
class _Slot:
    """One device on a disk controller as the .vmx has it."""

    controller: str
    bus: int
    unit: int

    @property
    def label(self) -> str:
        return f"{self.controller}{self.bus}:{self.unit}"


class VmxSource(LocalSource):
    """A VMware VM given as its ``.vmx``; its disks are the files the .vmx names beside it."""

    kind = "vmx"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = str(path)
        self.folder = Path(os.path.abspath(self.path)).parent

    def describe(self) -> str:
        return self.name

    def read(self) -> VmxFile:
        return read_vmx(self.path, self.name)

    # --- the spec -----------------------------------------------------------------

    def spec(self) -> VMSpec:
        return self._build()[0]

    def _build(self) -> tuple[VMSpec, dict[str, DiskImage]]:
        """The spec, and the inspected image of each disk v2p can read (by label)."""
        vmx = self.read()
        images: dict[str, DiskImage] = {}
        cores = vmx.number("cpuid.coresPerSocket", 1)
        vcpus = vmx.number("numvcpus", 1)
        if vcpus % cores:
            raise SourceError(f"{vmx.where('numvcpus')}: numvcpus {vcpus} is not a multiple of "
                              f"cpuid.coresPerSocket {cores} ({vmx.where('cpuid.coresPerSocket')})")
        firmware = (vmx.get("firmware") or "bios").strip().lower()
        if firmware not in ("bios", "efi"):
            raise SourceError(f"{vmx.where('firmware')}: firmware = {firmware!r} is neither \"efi\" nor \"bios\"")
        uuid = vmx.get("uuid.bios")
        spec = VMSpec(
            name=vmx.get("displayName") or self.path.stem,
            uuid=canonical_uuid(uuid, vmx.where("uuid.bios")) if uuid and uuid.strip() else None,
            firmware=firmware,
            secure_boot=firmware == "efi" and vmx.flag("uefi.secureBoot.enabled"),
            sockets=vcpus // cores,
            cores=cores,
            memory_mib=vmx.number("memsize", DEFAULT_MEMSIZE),
            guest_os=vmx.get("guestOS") or None,
            tpm=vmx.flag("vtpm.present"),
            home_encrypted=any((vmx.get(key) or "").strip() for key in _HOME_CRYPT),
        )
        self._devices(vmx, spec, images)
        # Fully encrypted (hosted): the devices sit in encryption.data, so not one disk is readable.
        spec.encrypted = any(d.encrypted for d in spec.disks) or (spec.home_encrypted and not spec.disks)
        self._nics(vmx, spec)
        self._other_devices(vmx, spec)
        self._mark_boot(vmx, spec)
        return spec, images

    def _devices(self, vmx: VmxFile, spec: VMSpec, images: dict[str, DiskImage]) -> None:
        slots = []
        for key in vmx.settings:
            match = _SLOT.match(key)
            if match and vmx.flag(key):
                slots.append(_Slot(match.group(1), int(match.group(2)), int(match.group(3))))
        slots.sort(key=lambda s: (CONTROLLER_KINDS.index(s.controller), s.bus, s.unit))
        # Count before a disk is opened: each is inspected below, and a VM of thousands is refused now.
        disks = sum(1 for slot in slots if (vmx.get(f"{slot.label}.deviceType") or "").strip().lower()
                    in _DISK_TYPES | _RDM_TYPES | {""} and (slot.controller == "ide" or vmx.flag(
                        f"{slot.controller}{slot.bus}.present", default=True)))
        rules.refuse_counts(spec.name, disks=disks, nics=len(_nic_ports(vmx)))
        for slot in slots:
            ns = slot.label
            controller = f"{slot.controller}{slot.bus}"
            device_type = (vmx.get(f"{ns}.deviceType") or "").strip().lower()
            file_name = vmx.get(f"{ns}.fileName")
            if slot.controller != "ide" and not vmx.flag(f"{controller}.present", default=True):
                spec.unmapped.append(f"{ns} ({file_name or device_type or 'device'}): its controller "
                                     f"{controller} is not present, so VMware does not show it either")
                continue
            if device_type in _CDROM_TYPES:
                image = file_name if device_type == "cdrom-image" and file_name else None
                spec.cdroms.append(CdromSpec(slot.controller, slot.bus, slot.unit, image))
            elif device_type == "scsi-passthru":
                spec.passthrough.append(f"{ns}: SCSI passthrough of host device {file_name or '?'}")
            elif device_type in _DISK_TYPES | _RDM_TYPES or not device_type:
                spec.disks.append(self._disk(vmx, slot, device_type in _RDM_TYPES, images))
            else:
                spec.unmapped.append(f"{ns}: device type {device_type!r} ({file_name or 'no file'})")
        spec.disks.sort(key=controller_order)
        spec.cdroms.sort(key=lambda c: (CONTROLLER_KINDS.index(c.controller), c.bus, c.unit))

    def _disk(self, vmx: VmxFile, slot: _Slot, rdm: bool, images: dict[str, DiskImage]) -> DiskSpec:
        ns = slot.label
        file_name = vmx.get(f"{ns}.fileName")
        if not file_name:
            raise SourceError(f"{vmx.where(f'{ns}.present')}: {ns} is a disk with no fileName",
                              hint=f'add {ns}.fileName = "DISK.vmdk" or set {ns}.present = "FALSE"')
        controller = f"{slot.controller}{slot.bus}"
        sharing = (vmx.get(f"{ns}.sharing") or "none").strip().lower()
        shared_bus = (vmx.get(f"{controller}.sharedBus") or "none").strip().lower()
        model = vmx.get(f"{controller}.virtualDev") if slot.controller == "scsi" else None
        disk = DiskSpec(
            controller=slot.controller, bus=slot.bus, unit=slot.unit, source=file_name,
            controller_model=model.strip().lower() if model else _CONTROLLER_MODEL.get(slot.controller),
            mode=(vmx.get(f"{ns}.mode") or "persistent").strip().lower() or "persistent",
            shared=sharing not in ("", "none") or shared_bus not in ("", "none"),
            rdm=rdm,
        )
        path = self._disk_path(disk, vmx.where(f"{ns}.fileName"))
        descriptor = _descriptor(path, file_name)
        if descriptor is not None and (descriptor.create_type or "").lower() in _RDM_CREATE_TYPES:
            disk.rdm = True
        disk.encrypted = _encrypted_disk(path, file_name)
        if disk.rdm or disk.encrypted:
            # An RDM's data is a LUN outside the folder (refused by inspection), an encrypted disk's is
            # ciphertext: neither is inspected, the descriptor says the size.
            if descriptor is not None:
                disk.capacity = sum(sectors for _a, sectors, _k, _f, _o in descriptor.extents) * SECTOR
        else:
            images[disk.label] = self._inspect(disk, path, check_boot=False)
            disk.capacity = images[disk.label].capacity
        return disk

    def _nics(self, vmx: VmxFile, spec: VMSpec) -> None:
        for port in _nic_ports(vmx):
            ns = f"ethernet{port}"
            address_type = (vmx.get(f"{ns}.addressType") or "generated").strip().lower()
            keys = ([f"{ns}.address", f"{ns}.generatedAddress"] if address_type == "static"
                    else [f"{ns}.generatedAddress", f"{ns}.address"])
            mac = None
            for key in keys:
                value = vmx.get(key)
                if value and value.strip():
                    mac = canonical_mac(value, f"{vmx.where(key)}: {key}")
                    break
            model = (vmx.get(f"{ns}.virtualDev") or DEFAULT_NIC).strip().lower() or DEFAULT_NIC
            spec.nics.append(NicSpec(model=model, mac=mac, network=_network(vmx, ns)))

    def _other_devices(self, vmx: VmxFile, spec: VMSpec) -> None:
        for key in sorted(vmx.settings):
            usb = _USB.match(key)
            if usb and vmx.flag(key):
                ns = f"{usb.group(1)}:{usb.group(2)}"
                kind = (vmx.get(f"{ns}.deviceType") or "").strip().lower()
                if kind not in _VIRTUAL_USB:
                    spec.passthrough.append(f"{ns}: USB device {kind or 'from the host'}")
            pci = _PCI.match(key)
            if pci and vmx.flag(key):
                ns = f"pciPassthru{pci.group(1)}"
                what = vmx.get(f"{ns}.vgpu")
                what = f"vGPU {what}" if what else f"PCI device {vmx.get(f'{ns}.id') or '?'}"
                spec.passthrough.append(f"{ns}: {what}")
            if key.startswith("usb.autoconnect.device"):
                spec.passthrough.append(f"{key}: USB device {vmx.get(key)} connected from the host")
        for ns, what in (("sound", "sound card"), ("floppy0", "floppy drive"), ("floppy1", "floppy drive"),
                         ("serial0", "serial port"), ("serial1", "serial port"),
                         ("parallel0", "parallel port")):
            if vmx.flag(f"{ns}.present"):
                detail = vmx.get(f"{ns}.virtualDev") or vmx.get(f"{ns}.fileName")
                spec.unmapped.append(f"{ns}: {what}" + (f" ({detail})" if detail else ""))

    @staticmethod
    def _mark_boot(vmx: VmxFile, spec: VMSpec) -> None:
        """VMware's boot disk: ``bios.bootOrder`` naming a disk (or "hdd", then ``bios.hddOrder``),
        else ``bios.hddOrder``, else the first disk in VMware's controller order."""
        by_label = {disk.label: disk for disk in spec.disks}

        def first(order: str | None) -> DiskSpec | None:
            for entry in (order or "").split(","):
                if entry.strip().lower() in by_label:
                    return by_label[entry.strip().lower()]
            return None

        boot = None
        for entry in (vmx.get("bios.bootOrder") or "").split(","):
            entry = entry.strip().lower()
            if entry in by_label:
                boot = by_label[entry]
                break
            if entry == "hdd":
                break
        boot = boot or first(vmx.get("bios.hddOrder")) or (spec.disks[0] if spec.disks else None)
        if boot is not None:
            boot.boot = True

    # --- the disks ----------------------------------------------------------------

    def _disk_path(self, disk: DiskSpec, where: str) -> Path:
        """The disk's file: inside the .vmx's folder (no absolute path, no ``..``, no link out) and present."""
        label = f"{where}: {disk.label}"
        try:
            path = vmdk_parser.resolve_inside(self.folder, disk.source, label, "disk")
        except UnsafeSourceError as exc:
            raise UnsafeSourceError(exc.message, hint="VMware VM folders hold their disks beside the .vmx; "
                                                     "copy the disk into the folder and name it relatively") from None
        vmdk_parser.stat_named(path, label, "disk", disk.source,
                               missing_hint="copy the whole VM folder, every .vmdk included")
        return path

    def _inspect(self, disk: DiskSpec, path: Path, *, check_boot: bool) -> DiskImage:
        try:
            return inspect_disk(path, check_boot=check_boot, link_ok=False)
        except SourceError as exc:
            raise type(exc)(f"{self.name}: {disk.label} ({disk.source}): {exc.message}", hint=exc.hint) from None

    def disk_input(self, disk: DiskSpec, workdir: Path) -> DiskInput:
        path = self._disk_path(disk, self.name)
        if disk.rdm:
            raise UnsafeSourceError(f"{self.name}: {disk.label} ({disk.source}) is a raw device map: "
                                    "its data is a LUN, not a file in the VM folder: refused",
                                    hint="copy the LUN's contents into a virtual disk in VMware first")
        image = self._inspect(disk, path, check_boot=True)
        # One folder per disk: qemu_source writes its descriptors under fixed names.
        qemu = qemu_source(image, workdir / f"{disk.controller}{disk.bus}-{disk.unit}")
        return DiskInput(image.capacity, image.flavor.value, image, tuple(image.messages), endpoint=qemu)

    def fingerprint(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [file_identity(Path(os.path.abspath(self.path)))]
        spec, images = self._build()
        for disk in spec.disks:
            if disk.label in images:
                out += source_fingerprint(images[disk.label])
            else:  # a raw device map or an encrypted disk: its descriptor is what v2p read
                out.append(file_identity(self._disk_path(disk, self.name)))
        return out


def _nic_ports(vmx: VmxFile) -> list[int]:
    """The N of each present ``ethernetN``, in order."""
    return sorted(int(m.group(1)) for key in vmx.settings if (m := _NIC.match(key)) and vmx.flag(key))


def _network(vmx: VmxFile, ns: str) -> str | None:
    """The network a NIC is on: the port group (ESXi), the vmnet (Workstation custom), or the connection type."""
    for key in (f"{ns}.networkName", f"{ns}.dvs.portgroupId"):
        value = vmx.get(key)
        if value and value.strip():
            return value
    vnet = vmx.get(f"{ns}.vnet")
    if vnet and vnet.strip():
        return re.split(r"[\\/]", vnet.strip())[-1]
    connection = vmx.get(f"{ns}.connectionType")
    return connection.strip().lower() if connection and connection.strip() else None


def _encrypted_disk(path: Path, name: str) -> bool:
    """Whether VM Encryption marked the disk at ``path`` (its descriptor, text or embedded, says so)."""
    try:
        with vmdk_parser.open_regular(path, name) as src:
            head = src.read(64 * 1024)
            if vmdk_parser.looks_like_descriptor(head):
                text = head + src.read(vmdk_parser.MAX_DESCRIPTOR - len(head))
            elif head.startswith(vmdk_parser.KDMV):
                # Only the embedded descriptor: guest data behind it may hold any text.
                header = vmdk_parser.parse_sparse_header(head[:512], name)
                src.seek(header.descriptor_offset * SECTOR)
                text = src.read(min(header.descriptor_size * SECTOR, vmdk_parser.MAX_DESCRIPTOR))
            else:
                return False
    except (OSError, SourceError):
        return False
    return _DISK_CRYPT.search(text) is not None


def _descriptor(path: Path, name: str) -> vmdk_parser.Descriptor | None:
    """The text descriptor at ``path``, if it is one (to tell a raw device map before inspecting)."""
    try:
        with vmdk_parser.open_regular(path, name) as src:
            head = src.read(64 * 1024)
            if not vmdk_parser.looks_like_descriptor(head):
                return None
            head += src.read(vmdk_parser.MAX_DESCRIPTOR - len(head))
    except (OSError, SourceError):
        return None
    try:
        return vmdk_parser.parse_descriptor(head, name)
    except SourceError:
        return None
