"""The one mapping from a VM spec plus the user's options to a PVE qemu-server config.

Every target builds its VM from these functions (the local target and,
next, Proxmox itself), so the hardware a migrated VM gets is decided once:
``vm_config`` is the VM shell without disks, ``disk_keys`` where each disk
sits for the first boot, ``boot_order``/``disk_value``/``efidisk``/``tpmstate``
the values around them. Pure: no I/O, no target. Not for: judging whether a
VM may be migrated at all (``rules.py``), nor the driver dance's later layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .errors import RuleError
from .options import WINDOWS_OSTYPES, MigrationOptions, mac_for_nic
from .spec import DiskSpec, VMSpec, dns_name
from .volumes import Drive, new_volume, parse_property_string, print_drive

# PVE's key slots per bus, in the order v2p fills them. ide2 is PVE's CD-ROM slot (the drivers
# ISO goes there in the dance), so IDE holds three disks.
SLOTS: dict[str, tuple[str, ...]] = {
    "ide": ("ide0", "ide1", "ide3"),
    "sata": tuple(f"sata{i}" for i in range(6)),
    "scsi": tuple(f"scsi{i}" for i in range(31)),
    "virtio": tuple(f"virtio{i}" for i in range(16)),
}
CDROM_KEY = "ide2"
# A config key that names a drive (disk or CD-ROM): the one place that knows which keys are drives.
DISK_KEY = re.compile(r"^(ide|sata|scsi|virtio)(\d+)$")
# SCSI controllers OVMF (as Debian and PVE ship it) has no driver for: an EFI VM cannot boot from them.
NO_OVMF_DRIVER = ("lsi", "lsi53c810", "megasas")
# VMware's SCSI controllers of the LSI/BusLogic families (virtualDev / OVF ResourceSubType).
VMWARE_LSI = ("lsilogic", "lsisas1068", "lsilogicsas", "buslogic")
DEFAULT_BRIDGE = "vmbr0"  # where a NIC without a network name goes: PVE's standard bridge
_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
# How a VM's description says which migration made it: "imported from NAME (v2p migration ID)".
_TAG = re.compile(r"\(v2p migration ([0-9a-f]{1,32})\)")


def migration_tag(migration_id: str) -> str:
    """The words a VM's description carries to say migration ``migration_id`` made it."""
    return f"v2p migration {migration_id}"


def tagged_by(config: Mapping[str, str]) -> list[str]:
    """The ids of the migrations whose tag the VM config's description carries ([]: not v2p's). More
    than one when the source VM's own name held such words, or the user added some."""
    return _TAG.findall(config.get("description", ""))


def content_added(storage: str, current: Iterable[str], content: str) -> str:
    """The ``pvesm set`` line that gives ``storage`` the ``content`` type and keeps every type it has
    (``current``, in its order): ``--content`` sets the whole list (pve-storage
    ``PVE/API2/Storage/Config.pm``, ``update``), so a line naming only some types takes the rest away."""
    kept = [kind for kind in current if kind]
    return f"pvesm set {storage} --content {','.join(kept + ([] if content in kept else [content]))}"


def resolve_ostype(spec: VMSpec, explicit: str | None = None) -> str:
    """The PVE ostype of the migrated VM: the user's ``--os`` when given, else the spec's guest OS."""
    return explicit or spec.ostype


def is_windows(ostype: str) -> bool:
    return ostype in WINDOWS_OSTYPES


def first_boot_buses(options: MigrationOptions, *, ostype: str) -> tuple[str, ...]:
    """The buses the disks are attached to for the first boot, filled in this order.

    Windows has no virtio driver yet: IDE, then SATA beyond IDE's three disks (the dance
    moves them later when --bus virtio/scsi asks); a forced --bus ide or sata is kept alone.
    Everything else goes straight to its bus (SCSI on virtio-scsi unless --bus says).
    """
    if is_windows(ostype):
        return (options.bus,) if options.bus in ("ide", "sata") else ("ide", "sata")
    return (options.bus or "scsi",)


def bus_capacity(options: MigrationOptions, *, ostype: str) -> int:
    """How many disks the first-boot buses hold together."""
    return sum(len(SLOTS[bus]) for bus in first_boot_buses(options, ostype=ostype))


def too_many_disks(spec: VMSpec, options: MigrationOptions, *, ostype: str) -> str | None:
    """Why the disks do not fit on the first-boot buses, or None when they do."""
    buses = first_boot_buses(options, ostype=ostype)
    room = bus_capacity(options, ostype=ostype)
    if len(spec.disks) <= room:
        return None
    where = " and ".join(f"{bus} ({len(SLOTS[bus])})" for bus in buses)
    return f"{len(spec.disks)} disks, but the first boot's {where} hold{'s' if len(buses) == 1 else ''} {room}"


def disk_keys(spec: VMSpec, options: MigrationOptions, *, ostype: str) -> list[tuple[DiskSpec, str]]:
    """Each disk (boot disk first, then VMware's order) with the PVE key it has on the first boot."""
    reason = too_many_disks(spec, options, ostype=ostype)
    if reason:
        raise RuleError(f"VM {spec.name}: too-many-disks: {reason}",
                        hint="choose a bus with more room: --bus scsi (31 disks) or --bus virtio (16)")
    slots = [key for bus in first_boot_buses(options, ostype=ostype) for key in SLOTS[bus]]
    disks = spec.ordered_disks()
    return list(zip(disks, slots[:len(disks)], strict=True))


def boot_order(keys: list[str]) -> str:
    """PVE's ``boot`` value: only the boot disk (the first key), as the driver dance expects it.

    The data disks get no boot index: a stale boot loader on one must not win over the boot disk.
    """
    if not keys:
        raise ValueError("boot_order needs at least the boot disk's key")
    return f"order={keys[0]}"


def parse_boot_order(config: Mapping[str, str]) -> list[str]:
    """The keys of ``boot: order=a;b`` in order; without one, the first disk (as v2p's local target
    boots a config that names none)."""
    boot = config.get("boot", "")
    if boot.startswith("order="):
        return [item for item in boot[len("order="):].split(";") if item]
    return sorted(key for key in config if DISK_KEY.match(key))[:1]


def pve_size(capacity: int) -> str:
    """A byte count as PVE writes ``size=`` (the largest unit that divides it exactly)."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if capacity % (1 << shift) == 0:
            return f"{capacity >> shift}{unit}"
    return str(capacity)


def parse_pve_size(value: str) -> int | None:
    """``size=`` as PVE writes it (``32G``, ``540K``, a plain byte count) in bytes; None if it is not one."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", value.strip())
    if not match:
        return None
    return int(float(match.group(1)) * (1 << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[match.group(2)]))


def disk_value(volid: str, capacity: int) -> str:
    """The value of a disk key: ``local:120/vm-120-disk-0.qcow2,size=32G``."""
    return print_drive(Drive(volid, {"size": pve_size(capacity)}))


def cdrom_value(volume: str) -> str:
    """The value of a CD-ROM drive holding ``volume`` (an ISO's volid, or ``none`` for an empty drive)."""
    return print_drive(Drive(volume, {"media": "cdrom"}))


def agent_enabled(value: str) -> bool:
    """Whether an ``agent`` value (``1``, ``enabled=1,fstrim_cloned_disks=1``) turns the guest agent on."""
    try:
        return parse_property_string(value, default_key="enabled").get("enabled") == "1"
    except ValueError:
        return False


def efidisk(storage: str, *, secure_boot: bool) -> str:
    """The value of ``efidisk0`` for a new EFI vars volume on ``storage`` (PVE's ``STORAGE:1`` syntax).

    4m is the OVMF build with secure boot support; pre-enrolled keys (Microsoft and the major
    distributions) only when VMware had secure boot on, else the guest would start enforcing it.
    """
    return print_drive(Drive(new_volume(storage, 1), {"efitype": "4m",
                                                     "pre-enrolled-keys": str(1 if secure_boot else 0)}))


def tpmstate(storage: str) -> str:
    """The value of ``tpmstate0`` for a fresh TPM 2.0 (VMware's TPM state never moves)."""
    return print_drive(Drive(new_volume(storage, 1), {"version": "v2.0"}))


def smbios_uuid(text: str | None) -> str | None:
    """VMware's ``uuid.bios`` (``56 4d 12 ... 9a-bc ...``) as a canonical UUID, None if it is not one.

    Written in VMware's byte order: QEMU encodes SMBIOS UUIDs the way VMware's modern virtual
    hardware does, so the guest reads the same UUID as before (Windows activation keys on it).
    """
    if not text:
        return None
    digits = re.sub(r"[\s:-]", "", text).lower()
    if not re.fullmatch(r"[0-9a-f]{32}", digits) or digits == "0" * 32:
        return None
    return "-".join((digits[:8], digits[8:12], digits[12:16], digits[16:20], digits[20:]))


def nic_mac(mac: str | None) -> str | None:
    """A NIC's MAC as PVE writes it (upper case), None when missing or not a MAC."""
    if mac is None or not _MAC.fullmatch(mac.strip()):
        return None
    return mac.strip().upper()


def nic_model(ostype: str) -> str:
    """e1000 for Windows (its driver is in every Windows; vmxnet3's came with VMware Tools), else virtio."""
    return "e1000" if is_windows(ostype) else "virtio"


def scsihw(spec: VMSpec, options: MigrationOptions) -> str:
    """The SCSI controller: the user's choice, except one OVMF cannot boot from on an EFI VM."""
    if spec.firmware == "efi" and options.scsihw in NO_OVMF_DRIVER:
        return "virtio-scsi-pci"
    return options.scsihw


def nic_bridge(network: str | None, bridges: Mapping[str, str], default_bridge: str | None) -> str | None:
    """The bridge for a NIC on VMware network ``network``; None when a named network has no mapping."""
    if network is None:
        return default_bridge or DEFAULT_BRIDGE
    return bridges.get(network, default_bridge)


def vm_config(spec: VMSpec, options: MigrationOptions, *, bridges: Mapping[str, str],
              default_bridge: str | None, tag: str, mac_seed: str | None,
              ostype: str | None = None) -> dict[str, str]:
    """The VM shell (no disks, no EFI/TPM volume) in PVE's keys.

    The hardware (sockets, cores, memory, firmware, NICs, UUID) is the spec's: a source built
    from flags (the loose disk) puts --cores/--memory into its spec. ``ostype`` is the user's
    explicit --os, if any; ``tag`` marks the VM as v2p's (the description carries it); ``mac_seed``
    the migration's, for the MACs of NICs that have none (``mac_for_nic``; None: a placeholder).
    """
    resolved = resolve_ostype(spec, ostype)
    efi = spec.firmware == "efi"
    config = {
        "name": options.name or dns_name(spec.name),
        "sockets": str(spec.sockets),
        "cores": str(spec.cores),
        "memory": str(spec.memory_mib),
        "ostype": resolved,
        "bios": "ovmf" if efi else "seabios",
        "scsihw": scsihw(spec, options),
    }
    if efi:
        # Secure boot's OVMF needs SMM, which only q35 provides; BIOS VMs stay on PVE's default
        # i440fx ("pc"), the chipset closest to VMware's 440BX.
        config["machine"] = "q35"
    uuid = smbios_uuid(spec.uuid)
    if uuid:
        config["smbios1"] = f"uuid={uuid}"
    if spec.cdroms:
        config[CDROM_KEY] = cdrom_value("none")  # ISO images stay behind; the drive is kept empty
    model = nic_model(resolved)
    for index, nic in enumerate(spec.nics):
        bridge = nic_bridge(nic.network, bridges, default_bridge)
        if bridge is None:
            raise RuleError(f"VM {spec.name}: unmapped-network: net{index} is on network {nic.network!r}, "
                            "which has no bridge", hint=f"add --network '{nic.network}=BRIDGE'")
        mac = nic_mac(nic.mac) or mac_for_nic(mac_seed, index)
        config[f"net{index}"] = f"{model}={mac},bridge={bridge}"
    name = " ".join(spec.name.split())  # one line: PVE stores the description as a comment block
    config["description"] = f"imported from {name} ({tag})"
    return config
