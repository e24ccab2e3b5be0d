"""Inspection: what kind of disk a file is, and whether v2p can safely take it.

``inspect_disk(path)`` reads headers only (never a whole disk), uses libmagic
for a first coarse look and v2p's own VMDK parser for the rest, follows and
checks snapshot chains, and returns a ``DiskImage`` or raises a
``SourceError`` saying why the file is refused. ``inspect_paths`` does the
same for files and whole VM folders, one row per disk.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import SourceError, UnsafeSourceError, V2PError
from ..fsutil import scratch_dir
from ..pinned import FileId
from ..runner import run
from . import bootsector, vmdk
from .model import SECTOR, DiskImage, Extent, ExtentKind, Flavor
from .qemu_input import image_info, qemu_source

__all__ = ["inspect_disk", "inspect_paths", "Row", "DiskImage", "Extent", "ExtentKind", "Flavor",
           "describe", "describe_bytes", "foreign_format", "check_raw", "read_head"]

_FLAT_CREATE_TYPES = {
    "monolithicflat": Flavor.MONOLITHIC_FLAT,
    "twogbmaxextentflat": Flavor.TWO_GB_MAX_EXTENT_FLAT,
    "vmfs": Flavor.VMFS,
    "vmfsthin": Flavor.VMFS_THIN,
    "vmfseagerzeroedthick": Flavor.VMFS_EAGER_ZEROED_THICK,
    "vmfspreallocated": Flavor.VMFS,
}
_SPARSE_CREATE_TYPES = {
    "monolithicsparse": Flavor.MONOLITHIC_SPARSE,
    "twogbmaxextentsparse": Flavor.TWO_GB_MAX_EXTENT_SPARSE,
    "streamoptimized": Flavor.STREAM_OPTIMIZED,
}
_DELTA_CREATE_TYPES = {"vmfssparse": Flavor.VMFS_SPARSE, "sesparse": Flavor.SE_SPARSE}
_DEVICE_CREATE_TYPES = {"vmfsrawdevicemap", "vmfspassthroughrawdevicemap", "fulldevice",
                        "partitioneddevice", "vmfsrdm", "vmfsraw"}
_DELTA_KINDS = (ExtentKind.VMFSSPARSE, ExtentKind.SESPARSE)
_HEAD = 64 * 1024
MAX_CHAIN = 64
DISK_SUFFIXES = (".vmdk", ".qcow2", ".vhd", ".vhdx", ".vdi", ".img", ".raw")


def describe(path: Path) -> str:
    """libmagic's description of ``path`` (the coarse first pass), or '' if it cannot say."""
    try:
        import magic

        return str(magic.from_file(str(path)))
    except Exception:  # libmagic missing or unreadable file: the parser decides alone
        return ""


def inspect_disk(path: str | os.PathLike[str], *, check_boot: bool = True, link_ok: bool = True) -> DiskImage:
    """Inspect the disk at ``path``; raise SourceError if it is not one v2p can take.

    With ``check_boot``, also read the first two sectors of the (consolidated)
    disk through qemu-img and report the MBR/GPT boot signature. ``link_ok``:
    ``path`` may be a symbolic link the caller named (a loose disk); a path v2p
    resolved itself (a .vmx's or .ovf's disk) is pinned without following one.
    """
    path = Path(path)
    name = str(path)
    # First: every later message names the file, and must stay one line.
    vmdk.refuse_line_break(os.path.abspath(path))
    named_link = link_ok and os.path.islink(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise SourceError(f"{name} is a dangling symbolic link") from None
        raise SourceError(f"{name}: no such file", hint="check the path") from None
    except OSError as exc:
        raise SourceError(f"{name}: cannot read: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise SourceError(f"{name} is a directory, not a disk image",
                          hint="give the .vmdk descriptor inside it (`v2p inspect` takes folders)")
    kind = vmdk.file_kind(mode)
    if kind is not None:
        raise SourceError(f"{name} is {kind}, not a regular file")
    image = _inspect_file(Path(os.path.abspath(path)), name, _Walk())
    image = replace(image, magic=describe(image.path), named_link=named_link)
    return _with_boot_signature(image) if check_boot else image


@dataclass
class _Walk:
    """What inspecting one chain has met so far, top link first."""

    visited: set[Path] = field(default_factory=set)
    # what qemu-img will hold open for the links seen: their extent lines and the links themselves
    extents: int = 0
    links: int = 0


def _inspect_file(path: Path, name: str, walk: _Walk) -> DiskImage:
    """The image at ``path``, its files' identities recorded as read (``DiskImage.ids``)."""
    walk.visited.add(Path(os.path.realpath(path)))
    try:
        with vmdk.open_regular(path, name) as src:
            opened = FileId.of(os.fstat(src.fileno()))
            size = opened.size
            if size == 0:
                raise SourceError(f"{name} is empty (0 bytes), not a disk image")
            head = src.read(_HEAD)
            tail = b""
            if size >= SECTOR:
                src.seek(size - SECTOR)
                tail = src.read(SECTOR)
            text = head
            if _HEAD < size <= vmdk.MAX_DESCRIPTOR and vmdk.looks_like_descriptor(head):
                src.seek(0)
                text = src.read()
    except OSError as exc:
        raise SourceError(f"{name}: cannot read: {exc.strerror}") from None
    image = _inspect_bytes(path, name, head, tail, text, size, walk)
    return replace(image, ids={**image.ids, path: opened})


def _inspect_bytes(path: Path, name: str, head: bytes, tail: bytes, text: bytes, size: int,
                   walk: _Walk) -> DiskImage:
    if head.startswith(vmdk.KDMV):
        return _hosted_sparse(path, name, head, size, walk)
    if head.startswith(vmdk.COWD) or (len(head) >= 8 and struct.unpack_from("<Q", head)[0]
                                       == vmdk.SESPARSE_MAGIC):
        raise SourceError(f"{name} is an ESX snapshot delta extent, not a disk on its own",
                          hint="give the snapshot's descriptor (NAME-000001.vmdk) that names it")
    if vmdk.looks_like_descriptor(head):
        if size > vmdk.MAX_DESCRIPTOR:
            raise SourceError(f"{name} looks like a VMDK descriptor but is {size} bytes; "
                              f"descriptors are a few KiB: refused")
        return _from_descriptor(path, name, text, walk)
    other = _other_format(path, name, head, tail)
    if other is not None:
        return other
    return _raw(path, name, head, size)


def _hosted_sparse(path: Path, name: str, head: bytes, size: int, walk: _Walk) -> DiskImage:
    header = vmdk.check_sparse_extent(path, name)
    walk.links += 1
    vmdk.check_open_files(walk.extents, walk.links, name)
    desc = None
    if header.descriptor_offset and header.descriptor_size:
        start, length = header.descriptor_offset * SECTOR, header.descriptor_size * SECTOR
        if length > vmdk.MAX_DESCRIPTOR or start + length > size:
            raise SourceError(f"{name}: embedded descriptor lies outside the file")
        with vmdk.open_regular(path, name) as src:
            src.seek(start)
            desc = vmdk.parse_descriptor(src.read(length), name)
        described = sum(sectors for _a, sectors, _k, _f, _o in desc.extents)
        if desc.extents and described != header.capacity:
            raise SourceError(f"{name}: header capacity is {header.capacity} sectors, its embedded "
                              f"descriptor says {described} (capacity mismatch)")
    warnings: list[str] = []
    if header.stream_optimized:
        flavor = Flavor.STREAM_OPTIMIZED
    elif desc is None:
        flavor = Flavor.SPARSE_EXTENT
        warnings.append(f"{path.name} is one sparse extent with no descriptor; converting it "
                        "alone (other extents of the disk, if any, are not included)")
    else:
        flavor = Flavor.MONOLITHIC_SPARSE
    extent = Extent(header.capacity, ExtentKind.SPARSE, path)
    image = DiskImage(path, flavor, "vmdk", header.capacity * SECTOR, (extent,),
                      adapter_type=desc.adapter_type if desc else None,
                      create_type=desc.create_type if desc else None, warnings=tuple(warnings),
                      cid=desc.cid if desc else None, ddb=dict(desc.ddb) if desc else {},
                      header={"version": header.version, "flags": header.flags,
                              "grain_sectors": header.grain_size,
                              "compress_algorithm": header.compress_algorithm})
    if desc is not None and desc.parent_cid is not None:
        return _with_parent(image, desc, name, walk)
    return image


def _from_descriptor(path: Path, name: str, data: bytes, walk: _Walk) -> DiskImage:
    desc = vmdk.parse_descriptor(data, name)
    create_type = desc.create_type or ""
    key = create_type.lower()
    if key in _DEVICE_CREATE_TYPES:
        raise UnsafeSourceError(f"{name}: createType {create_type} maps a physical device; "
                                "there is no disk data in the folder: refused",
                                hint="copy the device's contents into a disk inside VMware first")
    if key in _FLAT_CREATE_TYPES:
        flavor = _FLAT_CREATE_TYPES[key]
    elif key in _SPARSE_CREATE_TYPES:
        flavor = _SPARSE_CREATE_TYPES[key]
    elif key in _DELTA_CREATE_TYPES:
        flavor = _DELTA_CREATE_TYPES[key]
    else:
        raise SourceError(f"{name}: unknown createType {create_type!r}",
                          hint="v2p knows monolithicSparse/Flat, twoGbMaxExtent*, streamOptimized, "
                               "vmfs*, vmfsSparse and seSparse")
    delta_kinds = {kind for _a, _s, kind, _f, _o in desc.extents} & {k.value for k in _DELTA_KINDS}
    if (delta_kinds or key in _DELTA_CREATE_TYPES) and desc.parent_cid is None:
        raise SourceError(f"{name}: {create_type} snapshot delta without a parent "
                          "(parentCID is ffffffff): its unwritten sectors are unknown")
    seen: dict[Path, os.stat_result] = {}
    extents = vmdk.validate_extents(desc, path, extents_above=walk.extents, links_above=walk.links, seen=seen)
    walk.extents += len(desc.extents)
    walk.links += 1
    for extent in extents:
        plain = extent.kind.is_raw or extent.kind is ExtentKind.ZERO
        if key in _FLAT_CREATE_TYPES and not plain:
            raise SourceError(f"{name}: createType {create_type} with a {extent.kind.value} extent")
    warnings = []
    notes = []
    if all(e.kind.is_raw or e.kind is ExtentKind.ZERO for e in extents):
        notes.append(f"{path.name} describes flat (raw) extents; converting them as raw data")
    if key in ("vmfsthin", "vmfseagerzeroedthick"):
        notes.append(f"qemu-img refuses createType {create_type}; v2p reads its raw extents itself")
    if any(access == "RDONLY" for access, *_rest in desc.extents):
        warnings.append(f"{path.name} has RDONLY extents; reading them like RW ones")
    image = DiskImage(path, flavor, "vmdk", sum(e.size for e in extents), extents,
                      adapter_type=desc.adapter_type, create_type=create_type,
                      warnings=tuple(warnings), notes=tuple(notes), cid=desc.cid, ddb=dict(desc.ddb),
                      ids={extent: FileId.of(st) for extent, st in seen.items()})
    if desc.parent_cid is not None:
        return _with_parent(image, desc, name, walk)
    return image


def _with_parent(image: DiskImage, desc: vmdk.Descriptor, name: str, walk: _Walk) -> DiskImage:
    """Attach the checked parent chain below ``image`` (a snapshot delta)."""
    hint = desc.parent_hint
    if not hint:
        raise SourceError(f"{name} is a snapshot (parentCID {desc.parent_cid}) but names no "
                          "parentFileNameHint", hint="give the base disk's descriptor instead")
    parent_path = vmdk.resolve_inside(image.path.parent, hint, name, "parent")
    if parent_path in walk.visited:
        raise UnsafeSourceError(f"{name}: the snapshot chain loops back to {parent_path.name}: refused")
    if len(walk.visited) >= MAX_CHAIN:
        raise SourceError(f"{name}: snapshot chain longer than {MAX_CHAIN}: refused")
    vmdk.stat_named(parent_path, name, "parent disk", hint,
                    missing_hint="copy the whole VM folder, base disk included")
    parent = _inspect_file(parent_path, parent_path.name, walk)
    if parent.cid is None or parent.cid != desc.parent_cid:
        raise SourceError(
            f"{name}: parentCID {desc.parent_cid} does not match the CID {parent.cid} of its parent "
            f"{parent_path.name} (the parent changed after the snapshot was taken)",
            hint="this chain is inconsistent; consolidate the snapshots in VMware")
    if parent.capacity != image.capacity:
        raise SourceError(f"{name}: {image.capacity} bytes, its parent {parent_path.name} "
                          f"{parent.capacity} bytes (capacity mismatch)")
    return replace(image, parent=parent, parent_cid=desc.parent_cid)


def describe_bytes(head: bytes) -> str:
    """libmagic's description of a file's first bytes (for data v2p reads in place, not by path)."""
    try:
        import magic

        return str(magic.from_buffer(head))
    except Exception:  # libmagic missing: the checks decide alone
        return ""


def _other_format(path: Path, name: str, head: bytes, tail: bytes) -> DiskImage | None:
    found = foreign_format(name, head, tail)
    return _foreign(path, *found) if found is not None else None


def foreign_format(name: str, head: bytes, tail: bytes) -> tuple[Flavor, str] | None:
    """qcow2, VHD, VHDX, VDI: formats qemu-img reads itself, told apart by their magic; the flavor
    and qemu's format name, None for anything else. ``head``: the first 64 KiB, ``tail``: the
    last 512 bytes. What makes one read another file (a qcow2 backing or data file, a VHD's
    parent) or need a key is refused here, from these bytes alone."""
    if head.startswith(b"QFI\xfb") and len(head) >= 72:
        backing_offset, = struct.unpack_from(">Q", head, 8)
        if backing_offset:
            raise UnsafeSourceError(f"{name} is a qcow2 image with a backing file: refused",
                                    hint="flatten it first: qemu-img convert -O qcow2 in out")
        version, = struct.unpack_from(">I", head, 4)
        crypt, = struct.unpack_from(">I", head, 32)
        if crypt:
            raise SourceError(f"{name} is an encrypted qcow2 image: refused",
                              hint="decrypt it with qemu-img convert and the key first")
        if version >= 3 and len(head) >= 80 and struct.unpack_from(">Q", head, 72)[0] & 0x4:
            raise UnsafeSourceError(f"{name} is a qcow2 image with an external data file: refused",
                                    hint="convert it to a self-contained image first")
        return Flavor.QCOW2, "qcow2"
    if head.startswith(b"vhdxfile"):
        return Flavor.VHDX, "vhdx"
    if len(head) >= 0x44 and struct.unpack_from("<I", head, 0x40)[0] == 0xBEDA107F:
        return Flavor.VDI, "vdi"
    for footer in (tail, head[:SECTOR]):
        if footer.startswith(b"conectix") and len(footer) >= 0x40:
            disk_type, = struct.unpack_from(">I", footer, 0x3C)
            if disk_type == 4:
                raise SourceError(f"{name} is a differencing VHD (it needs its parent): refused",
                                  hint="merge it into its parent first")
            return Flavor.VHD, "vpc"
    return None


def _foreign(path: Path, flavor: Flavor, fmt: str) -> DiskImage:
    """A format qemu-img reads itself; its size is whatever qemu-img says it is
    (a VHD's footer and qemu's CHS rounding can disagree)."""
    capacity = int(str(image_info(path, fmt)["virtual-size"]))
    return DiskImage(path, flavor, fmt, capacity,
                     notes=(f"{path.name} is not a VMDK but a {flavor.value} image; "
                            f"converting it as {fmt}",))


def _raw(path: Path, name: str, head: bytes, size: int) -> DiskImage:
    check_raw(name, head, size, describe(path))
    flavor = Flavor.FLAT_EXTENT if path.name.endswith("-flat.vmdk") else Flavor.RAW
    warning = f"{path.name}: no VMDK descriptor found; treating it as raw data"
    if flavor is Flavor.FLAT_EXTENT:
        sibling = path.with_name(path.name[: -len("-flat.vmdk")] + ".vmdk")
        if sibling.exists():
            warning += f" (its descriptor {sibling.name} is beside it: pass that instead)"
    extent = Extent(size // SECTOR, ExtentKind.FLAT, path, 0)
    return DiskImage(path, flavor, "raw", size, (extent,), warnings=(warning,))


def check_raw(name: str, head: bytes, size: int, kind: str) -> None:
    """Refuse raw data of ``size`` bytes starting with ``head`` unless it is a disk: whole sectors,
    and a boot signature or a partition table / file system libmagic names (``kind``)."""
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


def _with_boot_signature(image: DiskImage) -> DiskImage:
    """Read the first sectors of the consolidated disk (through v2p's validated source): the boot
    signature, and the partition table the firmware choice needs (``bootsector.layout``)."""
    with scratch_dir("boot-sector") as tmp:
        source = qemu_source(image, Path(tmp))
        try:
            data = read_head(source.fmt, source.filename, source.fds, workdir=Path(tmp))
        finally:
            source.close()
    if data[512:520] == b"EFI PART":
        signature = "gpt"
    elif data[510:512] == b"\x55\xaa":
        signature = "mbr"
    else:
        signature = "none"
    boot = bootsector.layout(data)
    warnings = list(image.warnings)
    if signature == "none":
        text = (f"{image.path.name}: no MBR or GPT boot signature in the first sector; "
                "a VM will not boot from this disk (fine for a data disk)")
        if any(link.growable for link in image.chain):
            text += "; if it should boot, re-export it from VMware as a preallocated disk " \
                    "(descriptor plus -flat.vmdk) and try again"
        warnings.append(text)
    return replace(image, boot_signature=signature, boot_firmware=boot.firmware, boot_detail=boot.detail,
                   warnings=tuple(warnings))


def read_head(fmt: str, filename: str, fds: tuple[int, ...] = (), *, workdir: Path | None = None) -> bytes:
    """The disk's first sectors as ``bootsector.layout`` needs them, read by qemu-img from ``filename``
    (format ``fmt``, a path or a ``json:`` spec reading the pinned ``fds``): ``SECTORS_READ``, and
    further for a GPT whose entries lie beyond them. Fewer when the disk is smaller. ``workdir``:
    a private folder to write the copy in (else a scratch folder of its own)."""
    if workdir is None:
        with scratch_dir("boot-sector") as tmp:
            return read_head(fmt, filename, fds, workdir=Path(tmp))
    data = _read_sectors(fmt, filename, fds, bootsector.SECTORS_READ, workdir)
    wanted = bootsector.entries_end(data)
    if wanted > len(data) == bootsector.SECTORS_READ * SECTOR:
        data = _read_sectors(fmt, filename, fds, -(-wanted // SECTOR), workdir)
    return data


def _read_sectors(fmt: str, filename: str, fds: tuple[int, ...], sectors: int, workdir: Path) -> bytes:
    out = workdir / "head.raw"
    run(["qemu-img", "dd", "-f", fmt, "-O", "raw", "bs=512", f"count={sectors}", f"if={filename}",
         f"of={out}"], timeout=30, pass_fds=fds)
    data = out.read_bytes()
    out.unlink()
    return data


@dataclass(frozen=True)
class Row:
    """One disk found by ``inspect_paths``: inspected, or refused with the reason."""

    path: Path
    image: DiskImage | None = None
    error: V2PError | None = None

    @property
    def verdict(self) -> str:
        return "refused" if self.image is None else self.image.verdict

    def to_dict(self) -> dict[str, object]:
        if self.image is not None:
            return self.image.to_dict()
        return {"path": str(self.path), "verdict": "refused", "reason": str(self.error)}


def inspect_paths(paths: list[str | os.PathLike[str]]) -> list[Row]:
    """Inspect files and VM folders; a folder yields a row per disk (extents and
    snapshot parents are shown under the disk that uses them, not as rows)."""
    rows: list[Row] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            rows += _inspect_folder(path)
        else:
            rows.append(_row(path))
    return rows


def _row(path: Path) -> Row:
    try:
        return Row(path, image=inspect_disk(path))
    except V2PError as exc:
        return Row(path, error=exc)


def _inspect_folder(folder: Path) -> list[Row]:
    # Anything but a folder is a row: a FIFO or socket named like a disk is
    # refused as what it is, not passed over.
    candidates = sorted(p for p in folder.iterdir() if p.suffix.lower() in DISK_SUFFIXES and not p.is_dir())
    rows = [_row(p) for p in candidates]
    used: set[Path] = set()
    for row in rows:
        if row.image is not None:
            used.update(f for f in row.image.files if f != Path(os.path.realpath(row.path)))
            used.update(link.path for link in row.image.chain[1:])
    shown = []
    for row in rows:
        real = Path(os.path.realpath(row.path))
        if real in used or Path(os.path.abspath(row.path)) in used:
            continue
        if row.image is None and isinstance(row.error, SourceError) and "snapshot delta extent" in str(
                row.error) and any(r.image is not None for r in rows):
            continue
        shown.append(row)
    if not candidates:
        raise SourceError(f"{folder}: no disk images in this folder",
                          hint="a VMware VM folder holds NAME.vmdk (and NAME-flat.vmdk) files")
    return shown
