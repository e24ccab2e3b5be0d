"""What a migration would make of a VM, without a target: ``inspect_vm`` (hardware, config, disks,
preflight findings), ``inspect`` (a disk) and ``inspect_all``.

Not for: migrating (``migration``); nothing here writes anywhere but a private scratch folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import pveconfig, rules
from .errors import (
    RuleError,
    SourceError,
    V2PError,
    shown,
)
from .fsutil import scratch_dir
from .inspect import DiskImage, Row, inspect_disk, inspect_paths
from .migration import check_source
from .options import MigrationOptions, OptionError, check_vmid
from .sources import DiskSource, Source, open_source
from .spec import DiskSpec, VMSpec
from .stage_checks import boot_layout, check_rules


def inspect(path: str | os.PathLike[str]) -> DiskImage:
    """Inspect a disk image (headers only) and return what it is, or raise SourceError."""
    return inspect_disk(check_source(path))


@dataclass
class VMDisk:
    """One disk of an inspected VM: where it goes on the first boot and what inspection found."""

    spec: DiskSpec
    key: str | None  # its PVE key (scsi0, ide0, ...); None when the disks do not fit the bus
    capacity: int
    flavor: str | None = None
    image: DiskImage | None = None  # None for a disk read in place from an OVA, or a refused one
    messages: tuple[tuple[str, str], ...] = ()
    error: V2PError | None = None

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return "refused"
        return "warning" if any(kind == "warning" for kind, _text in self.messages) else "ok"

    def to_dict(self) -> dict[str, object]:
        """Today's disk row (``inspect --json`` of a disk), with the VM's label and key in front."""
        head: dict[str, object] = {"label": self.spec.label, "key": self.key, "source": self.spec.source}
        if self.error is not None:
            return {**head, "path": self.spec.source, "verdict": "refused", "reason": str(self.error)}
        if self.image is not None:
            return {**head, **self.image.to_dict()}
        return {**head, "path": self.spec.source, "flavor": self.flavor, "capacity": self.capacity,
                "verdict": self.verdict,
                "warnings": [text for kind, text in self.messages if kind == "warning"],
                "notes": [text for kind, text in self.messages if kind == "note"]}


@dataclass
class VMReport:
    """What ``inspect_vm`` found: the VM's hardware, the PVE config a migration with these options
    would create, each disk, the preflight rules' findings, and the error migrate would stop with."""

    path: str  # the source as it describes itself: a path, or a URI
    kind: str  # the source's kind: vmx, ovf, ova
    vmid: int
    spec: VMSpec | None = None
    ostype: str | None = None  # the PVE ostype the VM gets
    config: dict[str, str] = field(default_factory=dict)
    disks: list[VMDisk] = field(default_factory=list)
    findings: list[rules.Finding] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the source's own (an OVA without a manifest, ...)
    error: V2PError | None = None

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return "refused"
        warned = (self.warnings or any(f.severity == "warning" for f in self.findings)
                  or any(disk.verdict == "warning" for disk in self.disks))
        return "warning" if warned else "ok"

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "path": str(self.path), "kind": self.kind, "vmid": self.vmid,
            "spec": self.spec.to_dict() if self.spec is not None else None, "ostype": self.ostype,
            "config": dict(self.config), "disks": [disk.to_dict() for disk in self.disks],
            "findings": [finding.to_dict() for finding in self.findings], "warnings": list(self.warnings),
            "verdict": self.verdict}
        if self.error is not None:
            data["reason"] = str(self.error)
        return data


# The volume a disk would get: inspect touches no target, so the storage stays a placeholder.
PLACEHOLDER_VOLID = "<storage>:vm-{vmid}-disk-{index}"
UNMAPPED_BRIDGE = "<unmapped>"  # a NIC whose network has no bridge (the unmapped-network rule says so)


def vm_source(path: str | os.PathLike[str]) -> Source | None:
    """The source for ``path`` when it is a VM (a .vmx, a folder holding exactly one, an .ovf or
    .ova), None when it is a disk or a folder of disks (``inspect_paths`` takes those)."""
    try:
        source = open_source(path)
    except V2PError:  # a folder with no .vmx, or several: a folder of disks
        return None
    return None if isinstance(source, DiskSource) else source


def inspect_vm(path: str | os.PathLike[str] | Source, *, vmid: int = 100, **options: Any) -> VMReport:
    """Inspect a whole VM as ``migrate`` would see it with ``options`` (``MigrationOptions``:
    networks, bridge, ignore_rules, ...), without a target: hardware, config, disks, findings.

    An unsafe or broken VM is not raised but reported (``VMReport.error``, verdict ``refused``);
    options that are wrong in themselves (a bad bridge name, an unknown rule id) raise ``OptionError``.
    """
    check_vmid(vmid)
    migration = MigrationOptions.of(options)
    rules.check_ignore(migration.ignore_rules)
    source = path if isinstance(path, Source) else vm_source(check_source(path))
    if source is None:
        raise SourceError(f"{path} is not a VM (.vmx, .ovf, .ova or a folder with one .vmx)",
                          hint="inspect disks with v2p inspect DISK")
    report = VMReport(source.describe(), source.kind, vmid)
    try:
        spec = migration.hardware(source.spec())
    except V2PError as exc:
        report.error = exc
        return report
    resolved = migration.resolved(spec)
    assert resolved.ostype is not None
    report.spec, report.ostype = spec, resolved.ostype
    report.warnings = source.notices()
    try:
        keys = {disk.label: key for disk, key in pveconfig.disk_keys(spec, resolved, ostype=resolved.ostype)}
    except RuleError:  # too many disks for the bus: the too-many-disks rule says so
        keys = {}
    records = []
    # The pipeline's inspect stage, disk by disk, in a private folder qemu_source may write to.
    with scratch_dir("inspect-vm") as workdir:
        for index, disk in enumerate(spec.ordered_disks()):
            try:
                given = source.disk_facts(disk, Path(workdir) / str(index))
            except V2PError as exc:
                report.disks.append(VMDisk(disk, keys.get(disk.label), disk.capacity, error=exc))
                report.error = report.error or exc
                continue
            finally:
                source.release_disks()  # nothing is read from it after
            report.disks.append(VMDisk(disk, keys.get(disk.label), given.capacity, given.flavor, given.image,
                                       given.messages))
            chain = len(given.image.chain) if given.image is not None else 1
            records.append({"label": disk.label, "chain": chain, "capacity": given.capacity,
                            **boot_layout(given)})
    report.findings = check_rules(spec, resolved, records, chosen_ostype=migration.chosen_ostype(spec))
    try:
        rules.enforce(spec, report.findings)
    except RuleError as exc:
        # Before a disk's own refusal: the rule says why (an RDM, an encrypted disk) in the words
        # --ignore-rule and the README use; the disk's row keeps its own reason.
        report.error = exc
    report.config = _vm_config(spec, resolved, vmid, report.disks)
    return report


def _vm_config(spec: VMSpec, options: MigrationOptions, vmid: int, disks: list[VMDisk]) -> dict[str, str]:
    """The config the create and attach stages would write, with placeholder volumes."""
    assert options.ostype is not None
    unmapped = {nic.network: UNMAPPED_BRIDGE for nic in spec.nics
                if nic.network is not None and nic.network not in options.networks and not options.bridge}
    config = pveconfig.vm_config(spec, options, bridges={**unmapped, **options.networks},
                                 default_bridge=options.bridge, tag="v2p migration <id>", mac_seed=None,
                                 ostype=options.ostype)
    if spec.firmware == "efi":
        config["efidisk0"] = pveconfig.efidisk("<storage>", secure_boot=spec.secure_boot)
    placed = [(index, disk) for index, disk in enumerate(disks) if disk.key is not None]
    for index, disk in placed:
        assert disk.key is not None
        config[disk.key] = pveconfig.disk_value(PLACEHOLDER_VOLID.format(vmid=vmid, index=index), disk.capacity)
    if placed:
        config["boot"] = pveconfig.boot_order([disk.key for _index, disk in placed if disk.key])
    return config


def inspect_all(paths: list[str | os.PathLike[str]], *, vmid: int = 100,
                **options: Any) -> list[Row | VMReport]:
    """``inspect_paths`` for disks and folders of disks, ``inspect_vm`` for each VM among ``paths``."""
    if not isinstance(paths, (list, tuple)):
        raise OptionError(f"paths={shown(paths)}: must be a list of paths")
    out: list[Row | VMReport] = []
    for path in paths:
        source = vm_source(check_source(path))
        if source is None:
            out += inspect_paths([path])
        else:
            out.append(inspect_vm(source, vmid=vmid, **options))
    return out

