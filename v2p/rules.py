"""Named preflight rules: what a VM has that stops its migration, changes on the way, or is worth a note.

Each rule has a stable id (for ``--ignore-rule``, the README and ``inspect
--json``), a severity (``error`` stops the VM before anything is created,
``warning`` is shown and recorded, ``info`` is a note) and a one-line reason.
Pure: ``check`` judges a spec plus what inspection learned; it reads nothing.
Not for: deciding the KVM hardware (``pveconfig.py``), which these rules
explain where it differs from VMware's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace

from . import pveconfig
from .errors import RuleError
from .option_table import OPTION
from .options import MigrationOptions, OptionError
from .spec import VMSpec, dns_name, pve_ostype

# PVE's own limit, qemu-server's PVE/QemuServer.pm: `my $MAX_NETS = 32;` then
# `for (my $i = 0; $i < $MAX_NETS; $i++) { $confdesc->{"net$i"} = $netdesc; }`, so net0..net31
# and a net32 key is refused by the API (the local target would boot it and fail the check).
MAX_NICS = 32
# The most disks any first-boot bus holds (SCSI's 31): more are refused whatever --bus says.
MAX_DISKS = max(len(keys) for keys in pveconfig.SLOTS.values())


@dataclass(frozen=True)
class Rule:
    severity: str
    ignorable: bool  # --ignore-rule may downgrade this error to a warning
    reason: str
    hint: str | None = None  # what to do about its error, when that is not --ignore-rule


RULES: dict[str, Rule] = {
    "encrypted-vm": Rule("error", False, "the VM is encrypted by VMware: its disks are ciphertext whose keys "
                                         "stay in vCenter's key provider; decrypt it in VMware first",
                         hint="decrypt the VM in VMware first"),
    "rdm-disk": Rule("error", False, "a raw device mapping points at a LUN: the bytes are not in the VM's "
                                     "files; copy the LUN into a virtual disk in VMware first",
                     hint="copy the LUN into a virtual disk in VMware first"),
    "shared-disk": Rule("error", True, "a multi-writer disk is shared with other VMs: the copy is only "
                                       "consistent if all of them are off, and it is no longer shared"),
    "zero-capacity-disk": Rule("error", False, "a disk of 0 bytes: nothing to migrate and no volume to "
                                               "create; remove it from the VM",
                               hint="remove the empty disk from the VM in VMware"),
    "too-many-disks": Rule("error", False, "more disks than the first boot's bus holds (IDE 3 beside the "
                                           "CD-ROM, SATA 6, SCSI 31, virtio 16); choose another --bus"),
    "too-many-nics": Rule("error", False, f"more NICs than PVE's net0..net{MAX_NICS - 1} ({MAX_NICS}); remove "
                                          "NICs in VMware first",
                          hint="remove NICs from the VM in VMware first"),
    "unmapped-network": Rule("error", False, "a NIC's VMware network has no --network NAME=BRIDGE and no "
                                             "default bridge was given"),
    "powered-on": Rule("error", False, "the VM is running: its guest writes to the disks while they are "
                                       "read; v2p shuts it down first only when asked (--shutdown)",
                       hint="--shutdown shuts the guest down through VMware Tools (powering the VM off after "
                            "--shutdown-wait seconds), or shut it down in vSphere first"),
    "independent-disk": Rule("warning", False, "an independent disk was never in VMware's snapshots; it is "
                                               "migrated as a normal disk"),
    "vsan-vvol-datastore": Rule("warning", False, "a disk lies on a vSAN or VVol datastore: its bytes are "
                                                  "objects, not a -flat.vmdk the datastore file service can "
                                                  "serve; if reading it fails, export the VM (OVF) instead"),
    "nvme-controller": Rule("warning", False, "PVE offers no NVMe controller: the disk is attached on the "
                                              "VM's first-boot bus instead"),
    "firmware-mismatch": Rule("warning", False, "the VM's firmware is not one its boot disk can boot by: a "
                                                "BIOS VM whose disk boots only by UEFI, or an EFI VM whose "
                                                "disk has no EFI system partition; --bios chooses"),
    "efi-lsi": Rule("warning", False, "OVMF has no LSI/BusLogic/MegaRAID driver: an EFI VM's disks go to "
                                      "virtio-scsi (or IDE/SATA for Windows) instead"),
    "vtpm": Rule("warning", False, "the vTPM's state does not move: BitLocker will ask for its recovery "
                                   "key, and sealed secrets are lost"),
    "passthrough-device": Rule("warning", False, "USB / PCI passthrough devices belong to the ESXi host: "
                                                 "dropped"),
    "unknown-guest-os": Rule("warning", False, "v2p does not know the guest OS: it is mapped to PVE's "
                                               "'other' (give --os to choose)"),
    "snapshot-chain": Rule("info", False, "a disk has snapshots: the consolidated disk (the state VMware "
                                          "runs) is migrated, the snapshots are not kept"),
    "vm-snapshots": Rule("info", False, "the VM has snapshots: its current state is migrated, the snapshots "
                                        "are not kept (nothing is consolidated or removed on the source)"),
    "changed-block-tracking": Rule("info", False, "changed-block tracking is on: v2p copies every disk whole, "
                                                  "the -ctk.vmdk files stay behind"),
    "tools-not-running": Rule("info", False, "VMware Tools are not running in the guest: it cannot be shut down "
                                             "cleanly, --shutdown powers it off (its IPs are unknown too)"),
    "secure-boot": Rule("info", False, "EFI secure boot stays on with pre-enrolled Microsoft and "
                                       "distribution keys; keys enrolled by hand (MOK, own PK) do not move"),
    "uefi-disk": Rule("info", False, "a loose disk that only UEFI can boot (GPT, an EFI system partition, no "
                                     "BIOS boot code) gets OVMF, q35 and an EFI vars disk; --bios seabios "
                                     "keeps SeaBIOS"),
    "vm-name": Rule("info", False, "the VM name is not a DNS name, which PVE requires: it is cleaned"),
    "generated-mac": Rule("info", False, "a NIC has no usable MAC: v2p gives it a random one in Proxmox's "
                                         "range, kept for every rerun of the migration (DHCP reservations "
                                         "keyed on the old one will not match)"),
    "unmapped-device": Rule("info", False, "hardware v2p has no KVM counterpart for is dropped"),
}

IGNORABLE = frozenset(rule_id for rule_id, rule in RULES.items() if rule.ignorable)


@dataclass(frozen=True)
class Finding:
    id: str
    severity: str  # "error" | "warning" | "info"
    message: str  # what the VM has, in no surface's words (no CLI flag, plan key or keyword)
    ignored: bool = False  # an error the user downgraded with --ignore-rule
    hint: str | None = None  # an error's way out, as the CLI says it (``--bus scsi``)
    options: tuple[str, ...] = ()  # the library keywords that way out names (``bus``)

    def to_dict(self) -> dict[str, object]:
        """As ``inspect --json`` shows it: an error with its ``hint`` and ``options`` too."""
        data = asdict(self)
        if self.severity != "error":
            del data["hint"], data["options"]
        return data

    def __str__(self) -> str:
        # The way out of an error whose message no longer says it: the options it names.
        return f"{self.severity}: {self.id}: {self.message}" + (f" (hint: {self.hint})" if self.options else "")


def check_ignore(ids: Iterable[str]) -> set[str]:
    """The --ignore-rule ids, checked: unknown ids and errors that are never safe to ignore are refused."""
    wanted = set(ids)
    for rule_id in sorted(wanted):
        if rule_id not in RULES:
            raise OptionError(f"--ignore-rule {rule_id!r}: no such rule",
                              hint="rules: " + ", ".join(sorted(RULES)))
        rule = RULES[rule_id]
        if rule.severity == "error" and not rule.ignorable:
            raise OptionError(f"--ignore-rule {rule_id}: this rule cannot be ignored ({rule.reason})")
    return wanted


def check(spec: VMSpec, options: MigrationOptions, *, ostype: str | None = None,
          bridges: Mapping[str, str] | None = None, default_bridge: str | None = None,
          chains: Mapping[str, int] | None = None, capacities: Mapping[str, int] | None = None,
          boots: Mapping[str, tuple[str, str]] | None = None, ignore: Iterable[str] = ()) -> list[Finding]:
    """Every rule ``spec`` trips, in ``RULES`` order (then the VM's order of disks / NICs).

    ``ostype`` is the user's explicit --os (None: the spec's guest OS decides). ``chains`` maps a
    disk's label (``scsi0:1``) to the length of its snapshot chain, ``capacities`` to its size in
    bytes, both as inspection found them (a .vmx spec says neither); ``boots`` to the firmware that
    can boot it and what shows it (``DiskImage.boot_firmware``, ``boot_detail``). An ignored error
    comes back as a warning with ``ignored`` set.
    """
    ignored = check_ignore(ignore)
    found = list(_findings(spec, options, ostype=ostype, bridges=bridges or {}, default_bridge=default_bridge,
                           chains=chains or {}, capacities=capacities or {}))
    found += _firmware_findings(spec, boots or {})
    order = list(RULES)
    found.sort(key=lambda finding: order.index(finding.id))  # stable: the VM's own order within a rule
    return [replace(f, severity="warning", ignored=True, hint=None, options=())
            if f.severity == "error" and f.id in ignored else _with_hint(f) for f in found]


def _with_hint(finding: Finding) -> Finding:
    """An error with its way out: its own, --ignore-rule where that is allowed, else its rule's."""
    if finding.severity != "error" or finding.hint is not None:
        return finding
    if finding.id in IGNORABLE:
        return replace(finding, hint=f"if that is safe here: {_flag('ignore_rules')} {finding.id}",
                       options=("ignore_rules",))
    return replace(finding, hint=RULES[finding.id].hint)


def _flag(keyword: str) -> str:
    flag = OPTION[keyword].flag
    assert flag is not None, keyword
    return flag


def enforce(spec: VMSpec, findings: list[Finding]) -> None:
    """Raise a ``RuleError`` naming every error left (warnings and notes pass): its message says
    what the VM has, its hint each way out as the CLI says it, its ``findings`` the errors (each
    with the library ``options`` its way out names)."""
    errors = [_with_hint(f) for f in findings if f.severity == "error"]
    if not errors:
        return
    said = "; ".join(f"{f.id}: {f.message}" for f in errors)
    count = f"{len(errors)} rule errors: " if len(errors) > 1 else ""
    hints = list(dict.fromkeys(f.hint for f in errors if f.hint))
    raise RuleError(f"VM {spec.name}: {count}{said}", hint="; ".join(hints) or None, findings=errors)


def refuse_counts(name: str, *, disks: int, nics: int) -> None:
    """Raise the rule's ``RuleError`` when a VM has more disks or NICs than any PVE VM can hold.

    For sources to call with bare counts, before any disk is opened: a VM of 10,000 disks is
    refused at once, not after each of them was inspected. ``check`` reports the same rules
    (and the bus-dependent disk limit) for a VM that passes this.
    """
    if disks > MAX_DISKS:
        raise RuleError(f"VM {name}: too-many-disks: {disks} disks, more than any bus holds "
                        f"(SCSI {MAX_DISKS}): refused before reading them",
                        hint="remove disks from the VM in VMware, or move their data onto fewer disks")
    if nics > MAX_NICS:
        raise RuleError(f"VM {name}: too-many-nics: {nics} NICs, more than PVE's net0..net{MAX_NICS - 1}",
                        hint="remove NICs from the VM in VMware first")


def _finding(rule_id: str, message: str, severity: str | None = None, *, hint: str | None = None,
             options: tuple[str, ...] = ()) -> Finding:
    severity = severity or RULES[rule_id].severity
    if severity != "error":  # a note or warning: no way out to take
        return Finding(rule_id, severity, message)
    return Finding(rule_id, severity, message, hint=hint, options=options)


def _firmware_findings(spec: VMSpec, boots: Mapping[str, tuple[str, str]]) -> Iterator[Finding]:
    """What the boot disk's partition table says about the VM's firmware (sources/disk.py chose a
    loose disk's from it; a .vmx's, an OVF's or --bios's may disagree with it: kept, and said)."""
    disk = spec.boot_disk()
    if disk is None or disk.label not in boots:
        return
    can, detail = boots[disk.label]
    about = f"boot disk {disk.label} ({disk.source}): {detail}"
    if spec.firmware_from == "disk":
        if spec.firmware == "efi":
            yield _finding("uefi-disk", f"{about}: only UEFI can boot it, so the VM gets OVMF (bios: ovmf, "
                                        "machine: q35, an efidisk); --bios seabios keeps SeaBIOS")
        return
    efi = spec.firmware == "efi"
    if (efi and can != "bios") or (not efi and can != "efi"):
        return
    by_option = spec.firmware_from == "option"
    said = f"--bios {'ovmf' if efi else 'seabios'}" if by_option else f"the source says {'EFI' if efi else 'BIOS'}"
    outcome = "OVMF will most likely find no boot loader on it" if efi else "SeaBIOS cannot boot it"
    kept = "kept as asked" if by_option else f"kept (--bios {'seabios' if efi else 'ovmf'} to change)"
    yield _finding("firmware-mismatch", f"{said}, but {about}: {outcome}; {kept}")


def _findings(spec: VMSpec, options: MigrationOptions, *, ostype: str | None, bridges: Mapping[str, str],
              default_bridge: str | None, chains: Mapping[str, int],
              capacities: Mapping[str, int]) -> Iterator[Finding]:
    resolved = pveconfig.resolve_ostype(spec, ostype)
    # Only ciphertext disks stop the VM: a vTPM's encrypted home files (NVRAM) stay behind anyway.
    locked = [f"{d.label} ({d.source})" for d in spec.disks if d.encrypted]
    if locked:
        yield _finding("encrypted-vm", f"disk{'s' if len(locked) > 1 else ''} {', '.join(locked)} "
                                       f"{'are' if len(locked) > 1 else 'is'} encrypted (VM Encryption): "
                                       "decrypt in VMware first")
    elif spec.encrypted:
        yield _finding("encrypted-vm", "the VM is encrypted (VM Encryption): decrypt it in VMware first")
    for disk in spec.disks:
        if disk.rdm:
            yield _finding("rdm-disk", f"disk {disk.label} ({disk.source}) is a raw device mapping")
        if disk.shared:
            yield _finding("shared-disk", f"disk {disk.label} ({disk.source}) is shared (multi-writer): "
                                          "shut down every VM that uses it before migrating")
        if capacities.get(disk.label, disk.capacity) == 0 and not disk.encrypted:  # ciphertext: size unread
            yield _finding("zero-capacity-disk", f"disk {disk.label} ({disk.source}) has a capacity of 0 bytes")
    too_many = pveconfig.too_many_disks(spec, options, ostype=resolved)
    if too_many:
        bus = _flag("bus")
        yield _finding("too-many-disks", too_many, hint=f"{bus} scsi (31) or {bus} virtio (16)", options=("bus",))
    if len(spec.nics) > MAX_NICS:
        yield _finding("too-many-nics", f"{len(spec.nics)} NICs, but PVE has net0..net{MAX_NICS - 1}: "
                                        "remove NICs in VMware first")
    for index, nic in enumerate(spec.nics):
        if nic.network is None or nic.network in bridges:
            continue
        if default_bridge:
            yield _finding("unmapped-network", f"net{index} (network {nic.network!r}) has no --network "
                                               f"mapping: it goes to the default bridge {default_bridge}",
                           severity="info")
        else:
            yield _finding("unmapped-network", f"net{index} is on network {nic.network!r}, which has no bridge",
                           hint=f"add {_flag('networks')} '{nic.network}=BRIDGE'", options=("networks",))
    yield from _running_findings(spec, options)
    for disk in spec.disks:
        if disk.independent:
            yield _finding("independent-disk", f"disk {disk.label} is {disk.mode}: migrated as a normal disk")
    for disk in spec.disks:
        if (disk.datastore_type or "").lower() in ("vsan", "vvol"):
            yield _finding("vsan-vvol-datastore", f"disk {disk.label} ({disk.source}) is on a "
                                                  f"{disk.datastore_type} datastore")
    keys = {} if too_many else {disk.label: key for disk, key in pveconfig.disk_keys(spec, options,
                                                                                      ostype=resolved)}
    for disk in spec.disks:
        if disk.controller == "nvme":
            where = f" as {keys[disk.label]}" if disk.label in keys else ""
            yield _finding("nvme-controller", f"disk {disk.label} is on an NVMe controller: attached{where}")
    if spec.firmware == "efi":
        lsi = [d.label for d in spec.disks if (d.controller_model or "").lower() in pveconfig.VMWARE_LSI]
        if lsi:
            buses = " / ".join(pveconfig.first_boot_buses(options, ostype=resolved))
            yield _finding("efi-lsi", f"disk{'s' if len(lsi) > 1 else ''} {', '.join(lsi)} on an LSI/BusLogic "
                                      f"controller: OVMF has no driver for it, attached on {buses} instead")
        if options.scsihw in pveconfig.NO_OVMF_DRIVER:
            yield _finding("efi-lsi", f"--scsihw {options.scsihw}: OVMF has no driver for it, virtio-scsi-pci "
                                      "is used instead")
    if spec.tpm:
        where = ", in the encrypted NVRAM," if spec.home_encrypted else ""
        yield _finding("vtpm", f"the VM has a vTPM: its state{where} does not move (have the BitLocker "
                               "recovery key at hand)")
    for device in spec.passthrough:
        yield _finding("passthrough-device", f"{device} is passed through from the ESXi host: dropped")
    if ostype is None and pve_ostype(spec.guest_os) is None:
        named = f"guest OS {spec.guest_os!r}" if spec.guest_os else "no guest OS is named"
        yield _finding("unknown-guest-os", f"{named}: mapped to 'other' (give --os to choose)")
    for disk in spec.disks:
        length = chains.get(disk.label, 1)
        if length > 1:
            yield _finding("snapshot-chain", f"disk {disk.label} has {length - 1} snapshot"
                                             f"{'s' if length > 2 else ''}: the consolidated disk is migrated")
    if spec.snapshots:
        names = ", ".join(spec.snapshots[:5]) + (f" and {len(spec.snapshots) - 5} more" if len(spec.snapshots) > 5
                                                 else "")
        yield _finding("vm-snapshots", f"the VM has {len(spec.snapshots)} snapshot"
                                       f"{'s' if len(spec.snapshots) > 1 else ''} ({names}): its current state "
                                       "is migrated, the snapshots are not kept")
    if spec.cbt:
        yield _finding("changed-block-tracking", "changed-block tracking is on: every disk is copied whole")
    if spec.running and spec.tools_running is False:
        yield _finding("tools-not-running", "VMware Tools are not running in the guest: no guest shutdown "
                                            "is possible, --shutdown powers the VM off")
    if spec.firmware == "efi" and spec.secure_boot:
        yield _finding("secure-boot", "EFI secure boot: kept on, with pre-enrolled keys")
    if options.name is None and dns_name(spec.name) != spec.name:
        yield _finding("vm-name", f"VM name {spec.name!r} is not a DNS name: cleaned to {dns_name(spec.name)!r}")
    for index, nic in enumerate(spec.nics):
        if pveconfig.nic_mac(nic.mac) is None:
            had = f" (its MAC {nic.mac!r} is not one)" if nic.mac else ""
            yield _finding("generated-mac", f"net{index} has no usable MAC{had}: it gets a new one")
    for thing in spec.unmapped:
        yield _finding("unmapped-device", f"{thing}: dropped")


def _running_findings(spec: VMSpec, options: MigrationOptions) -> Iterator[Finding]:
    """A running source VM: refused, or (``--shutdown``) a note that it is shut down first."""
    if not spec.running:
        return
    state = "powered on" if spec.power_state == "poweredOn" else "suspended"
    if not options.shutdown:
        yield _finding("powered-on", f"the VM is {state}: its disks change while it runs",
                       hint=RULES["powered-on"].hint, options=("shutdown", "shutdown_wait"))
        return
    guest = spec.tools_running and spec.power_state == "poweredOn" and options.shutdown_wait > 0
    how = "its guest is shut down through VMware Tools, the VM powered off if it has not stopped after " \
          f"{options.shutdown_wait:g}s" if guest else "it is powered off"
    yield _finding("powered-on", f"the VM is {state}: before its disks are read, {how} (--shutdown)",
                   severity="info")
