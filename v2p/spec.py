"""The VM spec: the one hardware model every source produces and every target is built from.

A source (a loose disk, a ``.vmx``, an ``.ovf``/``.ova``, later vSphere) turns
what the user named into a ``VMSpec``: firmware, CPUs, memory, guest OS, disks
on their controllers as VMware had them, NICs with their MACs, CD-ROMs, TPM,
and what could not be mapped. Plain data, no I/O; ``to_dict``/``from_dict``
round-trip it through the state file. Not for: deciding the KVM side (the
PVE config mapping lives in ``pveconfig.py``) or judging it (``rules.py``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

CONTROLLER_KINDS = ("ide", "sata", "scsi", "nvme")

# VMware's guest OS ids -> PVE ostype. Both spellings: the .vmx / OVF vmw:osType key
# ("windows9-64", "vmware-photon-64") and vSphere's guestId ("windows9_64Guest",
# "vmwarePhoton64Guest", "otherGuest64"), normalised by _guest_key. Matched in order, by prefix
# (more specific first); what matches nothing is "other" (a rule says so).
_GUEST_OS = (
    # windows2019srvNext is Server 2022, windows2022srvNext Server 2025: PVE's win11 covers both.
    ("windows2019srvnext", "win11"), ("windows2022srv", "win11"), ("windows11", "win11"), ("windows12", "win11"),
    ("windows2019srv", "win10"), ("windows9srv", "win10"), ("windows9server", "win10"), ("windows9", "win10"),
    ("windows8srv", "win8"), ("windows8server", "win8"), ("windows8", "win8"), ("windowshyperv", "win8"),
    ("windows7srv", "win7"), ("windows7server", "win7"), ("windows7", "win7"), ("winserver2008r2", "win7"),
    ("longhorn", "w2k8"), ("winlonghorn", "w2k8"), ("winvista", "wvista"),
    ("winnet", "w2k3"), ("winxp", "wxp"), ("win2000", "w2k"), ("windows", "win10"),
    ("debian", "l26"), ("ubuntu", "l26"), ("centos", "l26"), ("rhel", "l26"), ("redhat", "l26"),
    ("oraclelinux", "l26"), ("sles", "l26"), ("suse", "l26"), ("opensuse", "l26"), ("fedora", "l26"),
    ("asianux", "l26"), ("amazonlinux", "l26"), ("rockylinux", "l26"), ("almalinux", "l26"),
    ("vmwarephoton", "l26"), ("coreos", "l26"), ("mandrake", "l26"), ("mandriva", "l26"),
    ("turbolinux", "l26"), ("miraclelinux", "l26"), ("pardus", "l26"), ("genericlinux", "l26"),
    ("other6xlinux", "l26"), ("other5xlinux", "l26"), ("other4xlinux", "l26"), ("other3xlinux", "l26"),
    ("other26xlinux", "l26"), ("other24xlinux", "l24"), ("otherlinux", "l26"),
    ("solaris", "solaris"),
)


def _guest_key(guest_os: str) -> str:
    """One spelling for both id forms: lower case, no '-'/'_', no 'Guest' and no '64' suffix."""
    key = re.sub(r"[-_\s]", "", guest_os.lower())
    key = key.removesuffix("guest").removesuffix("64")
    return key.removesuffix("guest")  # otherGuest64


def pve_ostype(guest_os: str | None) -> str | None:
    """The PVE ostype for a VMware guest OS id (.vmx ``guestOS`` or vSphere ``guestId``), None if unknown."""
    if not guest_os or not guest_os.strip():
        return None
    key = _guest_key(guest_os)
    for prefix, ostype in _GUEST_OS:
        if key.startswith(prefix):
            return ostype
    return None


@dataclass
class DiskSpec:
    """One virtual disk as VMware had it."""

    controller: str  # "ide" | "sata" | "scsi" | "nvme"
    bus: int  # the controller's number (scsi1 -> 1)
    unit: int  # the disk's place on it (scsi1:2 -> 2)
    source: str  # where the source finds its bytes: a file name relative to the VM, an OVF file id
    capacity: int = 0  # bytes; 0 until the disk is inspected when the spec does not say
    controller_model: str | None = None  # lsilogic, lsisas1068, pvscsi, buslogic, ahci, ...
    mode: str = "persistent"  # independent-persistent, independent-nonpersistent, ...
    shared: bool = False  # multi-writer
    rdm: bool = False  # a raw device map (the "disk" is a pointer to a LUN)
    boot: bool = False  # the disk VMware boots from
    encrypted: bool = False  # VM Encryption: its bytes are ciphertext whose key stays with VMware
    datastore_type: str | None = None  # vSphere's summary.type of its datastore (VMFS, NFS, vsan, VVOL)

    @property
    def label(self) -> str:
        return f"{self.controller}{self.bus}:{self.unit}"

    @property
    def independent(self) -> bool:
        return self.mode.startswith("independent")


@dataclass
class NicSpec:
    """One network adapter."""

    model: str  # VMware's virtualDev: vmxnet3, e1000, e1000e, vlance, ...
    mac: str | None = None  # kept: Windows and DHCP reservations key on it
    network: str | None = None  # the port group / network name
    ips: list[str] = field(default_factory=list)  # the guest's addresses on it (10.0.0.5/24), as Tools saw them


@dataclass
class CdromSpec:
    controller: str
    bus: int
    unit: int
    image: str | None = None  # an ISO file name, if one was attached


@dataclass
class VMSpec:
    """A VM's hardware, as the source describes it."""

    name: str
    uuid: str | None = None  # the SMBIOS (BIOS) UUID: Windows activation and licences key on it
    firmware: str = "bios"  # "bios" | "efi"
    # Who chose ``firmware``: "source" (the .vmx / OVF says, BIOS when it says nothing, as VMware
    # does), "disk" (a loose disk: its partition table, see sources/disk.py), "option" (--bios).
    firmware_from: str = "source"
    secure_boot: bool = False
    sockets: int = 1
    cores: int = 1  # per socket
    memory_mib: int = 512
    guest_os: str | None = None  # VMware's id, as written
    disks: list[DiskSpec] = field(default_factory=list)
    nics: list[NicSpec] = field(default_factory=list)
    cdroms: list[CdromSpec] = field(default_factory=list)
    tpm: bool = False
    # The disks are ciphertext (one of them, or the whole configuration is, so none can be read);
    # a vTPM only needs the VM's home files (NVRAM, secrets in the config) encrypted: home_encrypted.
    encrypted: bool = False
    home_encrypted: bool = False
    passthrough: list[str] = field(default_factory=list)  # USB / PCI devices that cannot move
    unmapped: list[str] = field(default_factory=list)  # other things the source had that v2p drops
    # What a running hypervisor knows (vSphere; None/empty for files): the power state when read
    # (poweredOn, poweredOff, suspended), whether VMware Tools run in the guest, the names of the
    # VM's snapshots, whether changed-block tracking is on.
    power_state: str | None = None
    tools_running: bool | None = None
    snapshots: list[str] = field(default_factory=list)
    cbt: bool = False

    @property
    def running(self) -> bool:
        """Its guest may write to its disks now (powered on, or suspended with its memory kept)."""
        return self.power_state in ("poweredOn", "suspended")

    @property
    def ostype(self) -> str:
        return pve_ostype(self.guest_os) or "other"

    @property
    def vcpus(self) -> int:
        return self.sockets * self.cores

    def boot_disk(self) -> DiskSpec | None:
        """VMware's boot disk, else the first disk of the first controller."""
        for disk in self.disks:
            if disk.boot:
                return disk
        return self.disks[0] if self.disks else None

    def ordered_disks(self) -> list[DiskSpec]:
        """The disks in VMware's order with the boot disk first."""
        boot = self.boot_disk()
        return [d for d in self.disks if d is boot] + [d for d in self.disks if d is not boot]

    def guest_ips(self) -> dict[str, dict[str, Any]]:
        """``{"net0": {"mac": ..., "ips": ["10.0.0.5/24"]}}`` for each NIC the guest had addresses on (as
        its hypervisor saw them): what an admin needs to give the new NIC the old static address."""
        return {f"net{index}": {"mac": nic.mac, "ips": list(nic.ips)} for index, nic in enumerate(self.nics)
                if nic.ips}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VMSpec:
        fields = dict(data)
        fields["disks"] = [DiskSpec(**d) for d in data.get("disks", [])]
        fields["nics"] = [NicSpec(**n) for n in data.get("nics", [])]
        fields["cdroms"] = [CdromSpec(**c) for c in data.get("cdroms", [])]
        return cls(**fields)


def controller_order(disk: DiskSpec) -> tuple[int, int, int]:
    """VMware's order of disks: by controller kind as the BIOS sees them, then bus, then unit."""
    return (("ide", "sata", "scsi", "nvme").index(disk.controller), disk.bus, disk.unit)


def dns_name(text: str) -> str:
    """``text`` as a VM name PVE accepts (a DNS name): other characters become '-'."""
    clean = re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-.")
    clean = re.sub(r"-{2,}", "-", clean)
    return clean[:63].strip("-.") or "imported-vm"
