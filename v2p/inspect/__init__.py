"""Inspection: what kind of disk a file is, and whether v2p can safely take it.

``inspect_disk(path)`` reads headers only (never a whole disk), uses libmagic
for a first coarse look and v2p's own VMDK parser for the rest, and returns a
``DiskImage`` or raises a ``SourceError`` saying why the file is refused.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from ..errors import SourceError, UnsafeSourceError
from . import vmdk
from .model import SECTOR, DiskImage, Extent, ExtentKind, Flavor

__all__ = ["DiskImage", "Extent", "ExtentKind", "Flavor", "describe", "inspect_disk"]

_FLAT_CREATE_TYPES = {
    "monolithicFlat": Flavor.MONOLITHIC_FLAT,
    "twoGbMaxExtentFlat": Flavor.TWO_GB_MAX_EXTENT_FLAT,
    "vmfs": Flavor.VMFS,
    "vmfsThin": Flavor.VMFS_THIN,
    "vmfsEagerZeroedThick": Flavor.VMFS_EAGER_ZEROED_THICK,
    "vmfsPreallocated": Flavor.VMFS,
}
_SPARSE_CREATE_TYPES = {
    "monolithicSparse": Flavor.MONOLITHIC_SPARSE,
    "twoGbMaxExtentSparse": Flavor.TWO_GB_MAX_EXTENT_SPARSE,
    "streamOptimized": Flavor.STREAM_OPTIMIZED,
}
_DELTA_CREATE_TYPES = {"vmfsSparse", "seSparse"}
_DEVICE_CREATE_TYPES = {"vmfsRawDeviceMap", "vmfsPassthroughRawDeviceMap", "fullDevice",
                        "partitionedDevice", "vmfsRDM", "vmfsRaw"}
_NO_PARENT = "ffffffff"
_HEAD = 64 * 1024


def describe(path: Path) -> str:
    """libmagic's description of ``path`` (the coarse first pass), or '' if it cannot say."""
    try:
        import magic

        return str(magic.from_file(str(path)))
    except Exception:  # libmagic missing or unreadable file: the parser decides alone
        return ""


def inspect_disk(path: str | os.PathLike[str]) -> DiskImage:
    """Inspect the disk at ``path``; raise SourceError if it is not one v2p can take."""
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise SourceError(f"{name}: no such file", hint="check the path")
    if path.is_dir():
        raise SourceError(f"{name} is a directory, not a disk image",
                          hint="give the .vmdk descriptor inside it")
    if not path.is_file():
        raise SourceError(f"{name} is not a regular file")
    path = Path(os.path.abspath(path))
    size = path.stat().st_size
    if size == 0:
        raise SourceError(f"{name} is empty (0 bytes), not a disk image")
    try:
        with open(path, "rb") as src:
            head = src.read(_HEAD)
            tail = b""
            if size >= SECTOR:
                src.seek(size - SECTOR)
                tail = src.read(SECTOR)
    except OSError as exc:
        raise SourceError(f"{name}: cannot read: {exc.strerror}") from None

    if head.startswith(vmdk.KDMV):
        return _hosted_sparse(path, name, head, size)
    if head.startswith(vmdk.COWD) or (len(head) >= 8 and struct.unpack_from("<Q", head)[0]
                                       == vmdk.SESPARSE_MAGIC):
        raise SourceError(f"{name} is an ESX snapshot delta extent",
                          hint="give the snapshot's descriptor (NAME-000001.vmdk), "
                               "or consolidate the snapshots in VMware first")
    if vmdk.looks_like_descriptor(head):
        if size > vmdk.MAX_DESCRIPTOR:
            raise SourceError(f"{name} looks like a VMDK descriptor but is {size} bytes; "
                              f"descriptors are a few KiB: refused")
        return _from_descriptor(path, name, head[:size] if size <= _HEAD else path.read_bytes())
    other = _other_format(path, name, head, tail, size)
    if other is not None:
        return other
    return _raw(path, name, head, size)


def _hosted_sparse(path: Path, name: str, head: bytes, size: int) -> DiskImage:
    header = vmdk.parse_sparse_header(head[:SECTOR], name)
    if size < SECTOR * 2 or (header.gd_offset != 0xFFFFFFFFFFFFFFFF
                            and header.gd_offset * SECTOR >= size):
        raise SourceError(f"{name}: VMDK sparse file is cut short ({size} bytes)",
                          hint="the copy is incomplete; copy it again")
    create_type = None
    adapter = None
    if header.descriptor_offset and header.descriptor_size:
        start, length = header.descriptor_offset * SECTOR, header.descriptor_size * SECTOR
        if length > vmdk.MAX_DESCRIPTOR or start + length > size:
            raise SourceError(f"{name}: embedded descriptor lies outside the file")
        with open(path, "rb") as src:
            src.seek(start)
            desc = vmdk.parse_descriptor(src.read(length), name)
        create_type = desc.create_type
        adapter = desc.adapter_type
        if desc.fields.get("parentcid", _NO_PARENT).lower() != _NO_PARENT:
            raise SourceError(f"{name} is a snapshot delta (it has a parent disk)",
                              hint="consolidate the snapshots in VMware first")
    warnings: list[str] = []
    if header.stream_optimized:
        flavor = Flavor.STREAM_OPTIMIZED
    elif create_type is None:
        flavor = Flavor.SPARSE_EXTENT
        warnings.append(f"{path.name} is one sparse extent with no descriptor; "
                        "converting it alone (other extents of the disk, if any, are not included)")
    else:
        flavor = Flavor.MONOLITHIC_SPARSE
    extent = Extent(header.capacity, ExtentKind.SPARSE, path)
    return DiskImage(path, flavor, "vmdk", header.capacity * SECTOR, (extent,),
                     adapter_type=adapter, create_type=create_type, warnings=tuple(warnings))


def _from_descriptor(path: Path, name: str, data: bytes) -> DiskImage:
    desc = vmdk.parse_descriptor(data, name)
    create_type = desc.create_type or ""
    if create_type in _DEVICE_CREATE_TYPES:
        raise UnsafeSourceError(f"{name}: createType {create_type} maps a physical device, "
                                "there is no disk data in the folder: refused",
                                hint="migrate the device's contents from inside the guest")
    if create_type in _DELTA_CREATE_TYPES or desc.fields.get("parentcid", _NO_PARENT).lower() != _NO_PARENT:
        raise SourceError(f"{name} is a snapshot delta (createType {create_type}, it has a parent disk)",
                          hint="consolidate the snapshots in VMware first")
    if create_type in _FLAT_CREATE_TYPES:
        flavor = _FLAT_CREATE_TYPES[create_type]
    elif create_type in _SPARSE_CREATE_TYPES:
        flavor = _SPARSE_CREATE_TYPES[create_type]
    else:
        raise SourceError(f"{name}: unknown createType {create_type!r}")
    extents = vmdk.validate_extents(desc, path)
    for extent in extents:
        plain = extent.kind.is_raw or extent.kind is ExtentKind.ZERO
        if flavor in _FLAT_CREATE_TYPES.values() and not plain:
            raise SourceError(f"{name}: createType {create_type} with a {extent.kind.value} extent")
        if extent.kind is ExtentKind.SPARSE:
            _check_sparse_extent(extent, name)
        elif not plain:
            raise SourceError(f"{name}: {extent.kind.value} extents are snapshot deltas",
                              hint="consolidate the snapshots in VMware first")
    capacity = sum(e.size for e in extents)
    warnings = []
    if all(e.kind.is_raw or e.kind is ExtentKind.ZERO for e in extents):
        warnings.append(f"{path.name} describes flat (raw) extents; converting them as raw data")
    return DiskImage(path, flavor, "vmdk", capacity, extents, adapter_type=desc.adapter_type,
                     create_type=create_type, warnings=tuple(warnings))


def _check_sparse_extent(extent: Extent, name: str) -> None:
    assert extent.path is not None
    with open(extent.path, "rb") as src:
        head = src.read(SECTOR)
    if not head.startswith(vmdk.KDMV):
        raise SourceError(f"{name}: sparse extent {extent.path.name!r} has no VMDK sparse header")
    header = vmdk.parse_sparse_header(head, extent.path.name)
    if header.capacity != extent.sectors:
        raise SourceError(f"{name}: extent {extent.path.name!r} holds {header.capacity} sectors, "
                          f"the descriptor says {extent.sectors} (capacity mismatch)")


def _other_format(path: Path, name: str, head: bytes, tail: bytes, size: int) -> DiskImage | None:
    """qcow2, VHD, VHDX, VDI: formats qemu-img reads itself, told apart by their magic."""
    if head.startswith(b"QFI\xfb") and len(head) >= 72:
        backing_offset, = struct.unpack_from(">Q", head, 8)
        if backing_offset:
            raise UnsafeSourceError(f"{name} is a qcow2 image with a backing file: refused",
                                    hint="flatten it first: qemu-img convert -O qcow2 in out")
        virtual, = struct.unpack_from(">Q", head, 24)
        return _foreign(path, Flavor.QCOW2, "qcow2", virtual)
    if head.startswith(b"vhdxfile"):
        return _foreign(path, Flavor.VHDX, "vhdx", None)
    if len(head) >= 0x44 and struct.unpack_from("<I", head, 0x40)[0] == 0xBEDA107F:
        return _foreign(path, Flavor.VDI, "vdi", None)
    for footer in (tail, head[:SECTOR]):
        if footer.startswith(b"conectix") and len(footer) >= 0x38:
            current, = struct.unpack_from(">Q", footer, 0x30)
            return _foreign(path, Flavor.VHD, "vpc", current)
    return None


def _foreign(path: Path, flavor: Flavor, fmt: str, capacity: int | None) -> DiskImage:
    if capacity is None:
        from ..convert import image_info

        capacity = int(str(image_info(path, fmt)["virtual-size"]))
    return DiskImage(path, flavor, fmt, capacity,
                     warnings=(f"{path.name} is not a VMDK but a {flavor.value} image; "
                               f"converting it as {fmt}",))


def _raw(path: Path, name: str, head: bytes, size: int) -> DiskImage:
    kind = describe(path)
    boot = len(head) >= SECTOR and head[510:512] == b"\x55\xaa"
    # Raw data is only taken as a disk when something says it is one: a boot
    # signature, or libmagic finding a partition table or file system on it.
    diskish = boot or any(word in kind for word in (
        "boot sector", "filesystem", "file system", "partition", "GPT", "LVM2", "swap file"))
    what = kind or "unknown data"
    if size % SECTOR:
        raise SourceError(f"{name} is {what} ({size} bytes, not a whole number of 512-byte sectors), "
                          "not a disk image", hint="give the VM's .vmdk descriptor or a raw/flat disk")
    if not diskish:
        raise SourceError(f"{name} is {what} with no boot sector, partition table or file system: "
                          "not a disk image", hint="give the VM's .vmdk descriptor or a raw/flat disk")
    flavor = Flavor.FLAT_EXTENT if path.name.endswith("-flat.vmdk") else Flavor.RAW
    warning = f"{path.name}: no VMDK descriptor found; treating it as raw data"
    if flavor is Flavor.FLAT_EXTENT:
        sibling = path.with_name(path.name[: -len("-flat.vmdk")] + ".vmdk")
        if sibling.exists():
            warning += f" (its descriptor {sibling.name} is beside it: pass that instead)"
    extent = Extent(size // SECTOR, ExtentKind.FLAT, path, 0)
    return DiskImage(path, flavor, "raw", size, (extent,), warnings=(warning,))
