"""The ``.ovf`` and ``.ova`` sources: an OVF envelope (1.x or 2.x) and the files it names.

``OvfSource`` reads the files beside the ``.ovf``; ``OvaSource`` reads them
inside the tar, in place: every member is checked but nothing is extracted, and
every disk member (sparse VMDK, raw, qcow2, VHD(X), VDI) is converted straight
from its offset in the archive. A ``.mf`` manifest is checked before a file it
lists is used. The jobs beside them, one module each: ``ovf_xml`` (the XML,
parsed safely), ``ovf_mapping`` (the envelope to a ``VMSpec``), ``ovf_package``
(the manifest and package checks both share), ``ova_tar`` (the archive's
members). Not for: deciding the KVM side (``spec.py`` onwards).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

from ..convert import file_identity
from ..endpoint import DiskEndpoint
from ..errors import SourceError
from ..inspect import bootsector, check_raw, describe_bytes, foreign_format, inspect_disk, read_head, vmdk
from ..inspect.model import SECTOR, Flavor
from ..inspect.qemu_input import INFO_TIMEOUT, qemu_source
from ..pinned import FileId, PinnedFiles, open_checked
from ..runner import run
from ..spec import DiskSpec
from .base import DiskInput
from .ova_tar import Member, MemberFile, scan_tar
from .ovf_package import OvfPackage
from .ovf_xml import check_href


class OvfSource(OvfPackage):
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
        return DiskInput(image.capacity, image.flavor.value, image, tuple(image.messages), endpoint=qemu)

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


class OvaSource(OvfPackage):
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
        return MemberFile(open_checked(self.path, self._id, follow=False), member.offset, member.size)

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
            qemu = DiskEndpoint("raw", "json:" + json.dumps(window), member.size, Flavor.RAW.value, pins)
            flavor, capacity = Flavor.RAW, member.size
        else:
            flavor, fmt = found
            self.verify(href)  # before qemu-img reads a byte of it
            spec: dict[str, Any] = {"driver": fmt, "file": window}
            if fmt == "qcow2":
                spec["backing"] = None
            qemu = DiskEndpoint(fmt, "json:" + json.dumps(spec), None, flavor.value, pins)
            info = json.loads(run(["qemu-img", "info", "--output=json", "-f", fmt, qemu.filename],
                                  timeout=INFO_TIMEOUT, pass_fds=qemu.fds).stdout)
            capacity = int(info["virtual-size"])
            qemu = replace(qemu, capacity=capacity)
        note = (f"{member.name} ({flavor.value}) is read in place from {self.path.name} (offset {member.offset}, "
                f"{member.size} bytes); nothing is extracted")
        return DiskInput(capacity, flavor.value, None, (("note", note),), boot=_boot(qemu), endpoint=qemu)

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
        qemu = DiskEndpoint("vmdk", "json:" + json.dumps({"driver": "vmdk", "file": window, "backing": None}),
                            header.capacity * SECTOR, flavor.value, pins)
        note = (f"{member.name} is read in place from {self.path.name} (offset {member.offset}, "
                f"{member.size} bytes); nothing is extracted")
        return DiskInput(header.capacity * SECTOR, flavor.value, None, (("note", note),), boot=_boot(qemu),
                         endpoint=qemu)

    def fingerprint(self) -> list[dict[str, Any]]:
        return [file_identity(self.path)]


def _boot(qemu: DiskEndpoint) -> bootsector.BootLayout:
    """How a disk read in place boots: its first sectors, read through the same checked window."""
    return bootsector.layout(read_head(qemu.fmt, qemu.filename, qemu.fds))
