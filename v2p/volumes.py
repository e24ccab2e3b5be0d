"""PVE volume ids and drive values: the one parser and the one printer of each.

A volume id is ``STORAGE:VOLNAME`` (pve-storage ``parse_volume_id``). Its name says more
in PVE's layouts, read here as pve-storage's plugins read them: a directory storage keeps
disk M of VM N as ``N/vm-N-disk-M.FMT``, a block storage (LVM, LVM-thin, ZFS, RBD) as
``vm-N-disk-M``; ISO images are ``iso/NAME``, disk images to import ``import/NAME``.

A drive value (``local:100/vm-100-disk-0.qcow2,size=32G,cache=none``) is a PVE property
string whose default key is the volume: ``parse_drive``/``print_drive`` as qemu-server's
``Drive.pm`` has them. Pure text: no storage is asked. Not for: where a volume's bytes
live (``storage/``, the targets), nor which config keys are drives (``pveconfig.DISK_KEY``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

# The VMID and the rest of a volume name PVE gives a VM's volume, after the folder a directory
# storage puts it in: vm-N-disk-M, vm-N-cloudinit, base-N-disk-M (a template's).
_OWNED = re.compile(r"(?:(?P<folder>\d+)/)?(?P<kind>vm|base)-(?P<vmid>\d+)-(?P<rest>[^/]+)")
_DISK = re.compile(r"disk-(?P<index>\d+)(?:\.(?P<fmt>\w+))?")
# PVE's syntax for a volume to allocate (``STORAGE:SIZE_IN_GIB``, qemu-server's NEW_DISK_RE).
_NEW = re.compile(r"(?P<storage>[^/:\s]+):(?P<size>\d+(?:\.\d+)?)")
# The drive's volume: qemu-server's default key ``file`` (``volume`` is its alias).
_VOLUME_KEYS = ("file", "volume")


def disk_name(vmid: int, index: int, fmt: str | None = None) -> str:
    """PVE's name for disk ``index`` of VM ``vmid``: ``vm-N-disk-M``, with ``.FMT`` on a directory storage."""
    return f"vm-{vmid}-disk-{index}" + (f".{fmt}" if fmt else "")


def import_name(vmid: int, index: int) -> str:
    """The file v2p uploads disk ``index`` of VM ``vmid`` as (into a storage's ``import/``)."""
    return f"v2p-{vmid}-disk-{index}.qcow2"


def import_index(name: str, vmid: int) -> int | None:
    """The disk index of ``name`` if it is one of v2p's uploads for VM ``vmid`` (``import_name``), else None."""
    match = re.fullmatch(rf"v2p-{vmid}-disk-(\d+)\.qcow2", name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class VolumeRef:
    """A PVE volume id, ``STORAGE:VOLNAME``; ``str()`` prints it back unchanged."""

    storage: str
    volname: str

    def __post_init__(self) -> None:
        if not self.storage or ":" in self.storage or "/" in self.storage or not self.volname:
            raise ValueError(f"{self.storage}:{self.volname} is not a PVE volume id (STORAGE:VOLUME)")

    def __str__(self) -> str:
        return f"{self.storage}:{self.volname}"

    @classmethod
    def parse(cls, volid: str) -> VolumeRef:
        """``local:100/vm-100-disk-0.qcow2`` -> storage ``local``, volname ``100/vm-100-disk-0.qcow2``;
        ValueError for anything else (a path, ``none``, a name without a storage)."""
        storage, sep, volname = volid.partition(":")
        if not sep:
            raise ValueError(f"{volid!r} is not a PVE volume id (STORAGE:VOLUME)")
        return cls(storage, volname)

    @classmethod
    def maybe(cls, text: str) -> VolumeRef | None:
        """The volume id ``text`` is, or None when it is something else a drive may name: a path
        (``/dev/sdb``), ``none``, ``cdrom``."""
        try:
            return cls.parse(text)
        except ValueError:
            return None

    @classmethod
    def disk(cls, storage: str, vmid: int, index: int, fmt: str | None = None) -> VolumeRef:
        """Disk ``index`` of VM ``vmid`` on ``storage``: the directory layout (``N/vm-N-disk-M.FMT``)
        with a format, the block layout (``vm-N-disk-M``) without one."""
        name = disk_name(vmid, index, fmt)
        return cls(storage, f"{vmid}/{name}" if fmt else name)

    @classmethod
    def iso(cls, storage: str, name: str) -> VolumeRef:
        """ISO image ``name`` on ``storage`` (``STORAGE:iso/NAME``)."""
        return cls(storage, f"iso/{name}")

    @classmethod
    def imported(cls, storage: str, name: str) -> VolumeRef:
        """Disk image ``name`` in ``storage``'s ``import`` content (``STORAGE:import/NAME``)."""
        return cls(storage, f"import/{name}")

    @property
    def content(self) -> str:
        """PVE's content type of the volume by its name: ``iso``, ``import``, else ``images``."""
        folder, sep, rest = self.volname.partition("/")
        return folder if sep and folder in ("iso", "import") and rest and "/" not in rest else "images"

    @property
    def filename(self) -> str:
        """The name after the last folder (``vm-100-disk-0.qcow2``, ``virtio-win.iso``)."""
        return self.volname.rpartition("/")[2]

    @property
    def folder(self) -> int | None:
        """The VMID folder of a directory storage's volume (``100`` of ``100/vm-100-disk-0.qcow2``)."""
        match = _OWNED.fullmatch(self.volname)
        return int(match["folder"]) if match and match["folder"] else None

    @property
    def vmid(self) -> int | None:
        """The VMID the volume's name gives (``vm-N-...``, ``base-N-...``), None for other names."""
        match = _OWNED.fullmatch(self.volname)
        return int(match["vmid"]) if match else None

    @property
    def fmt(self) -> str | None:
        """The format a directory volume's extension names (``qcow2``, ``raw``); None without one."""
        match = _OWNED.fullmatch(self.volname)
        disk = _DISK.fullmatch(match["rest"]) if match else None
        return disk["fmt"] if disk else None

    @property
    def disk_index(self) -> int | None:
        """M of a ``vm-N-disk-M`` volume (either layout), None for other volumes."""
        match = _OWNED.fullmatch(self.volname)
        disk = _DISK.fullmatch(match["rest"]) if match and match["kind"] == "vm" else None
        return int(disk["index"]) if disk else None

    def owned_by(self, vmid: int) -> bool:
        """Whether the name makes it VM ``vmid``'s own volume (``vm-N-``/``base-N-``, in folder N
        if in one): pve-storage's ``check_volume_access`` lets the VM use it without more."""
        return self.vmid == vmid and self.folder in (None, vmid)

    def disk_of(self, vmid: int) -> int | None:
        """M when this is disk M of VM ``vmid`` (``vm-N-disk-M``, in folder N if in one), else None."""
        return self.disk_index if self.owned_by(vmid) else None


def new_volume(storage: str, gib: int) -> str:
    """PVE's request for a new volume of ``gib`` GiB on ``storage`` (``STORAGE:SIZE``), as a drive's volume."""
    return f"{storage}:{gib}"


def new_volume_storage(volume: str) -> str | None:
    """The storage of a ``STORAGE:SIZE`` allocation request, None if ``volume`` is not one."""
    match = _NEW.fullmatch(volume)
    return match["storage"] if match else None


def parse_property_string(text: str, default_key: str | None = None) -> dict[str, str]:
    """A PVE property string (``a=1,b=2``; a part without ``=`` is ``default_key``'s value) as
    a dict in its order (pve-common ``parse_property_string``). Empty parts are skipped; ValueError
    for a key given twice or a value without a key where there is no default key."""
    found: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            if default_key is None:
                raise ValueError(f"{text!r}: {part!r} has no key")
            key, value = default_key, part
        if key in found:
            raise ValueError(f"{text!r}: {key} is given twice")
        found[key] = value
    return found


def print_property_string(values: Mapping[str, str], default_key: str | None = None) -> str:
    """``values`` as a PVE property string in their order, ``default_key``'s value first without its key."""
    first = [value for key, value in values.items() if key == default_key]
    return ",".join(first + [f"{key}={value}" for key, value in values.items() if key != default_key])


@dataclass(frozen=True)
class Drive:
    """A drive value of a VM config: the ``volume`` (a volume id, ``STORAGE:SIZE`` to allocate, a
    path, ``none`` or ``cdrom``) and its options in the order they were written."""

    volume: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> VolumeRef | None:
        """The volume id the drive names, None when it names a path, ``none``, ``cdrom`` or a new volume."""
        return None if new_volume_storage(self.volume) else VolumeRef.maybe(self.volume)

    @property
    def is_cdrom(self) -> bool:
        return self.options.get("media") == "cdrom"


def parse_drive(value: str) -> Drive:
    """A drive key's value -> ``Drive`` (qemu-server ``parse_drive``, without the schema's checks);
    ``file=``/``volume=`` name the volume too. ValueError when the value names no volume or a key twice."""
    options = parse_property_string(value, default_key="file")
    named = [key for key in _VOLUME_KEYS if key in options]
    if len(named) != 1 or not options[named[0]]:
        raise ValueError(f"{value!r} is not a drive value (VOLUME,key=value,...)")
    volume = options.pop(named[0])
    return Drive(volume, options)


def print_drive(drive: Drive) -> str:
    """``Drive`` -> a drive key's value, the volume first (qemu-server ``print_drive``)."""
    return print_property_string({"file": drive.volume, **drive.options}, default_key="file")


def drive_is_cdrom(value: str) -> bool:
    """Whether a config value is a CD-ROM drive (``media=cdrom``), as qemu-server's ``drive_is_cdrom``."""
    try:
        return parse_drive(value).is_cdrom
    except ValueError:
        return False


def drive_volume(value: str) -> str:
    """The volume a config value names if it is a drive value, else "" (any key's value may be
    given: ``name``, ``description``, ``net0``, ...)."""
    try:
        return parse_drive(value).volume
    except ValueError:
        return ""
