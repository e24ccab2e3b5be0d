"""A plan checked against the world, read-only: its sources exist and pass the preflight rules, its
targets answer, their storages, bridges, nodes and VMIDs are the ones the plan names.

Not for: the plan's text (``plan_schema``), nor what a check of one target kind needs (the target's
own methods answer).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import api, drivers, pveconfig, rules, stage_checks
from .errors import NoSpaceError, V2PError, VMIDExistsError
from .options import MigrationOptions, did_you_mean
from .plan_model import PlanVM, Problem
from .plan_schema import cluster, plan_words
from .sources import is_uri, open_source
from .state import MigrationState
from .targets.base import Target


class Targets:
    """Each distinct target made once; a target that cannot be made or reached is remembered as such."""

    def __init__(self) -> None:
        self.made: dict[str, Target | V2PError] = {}

    def get(self, spec: str | dict[str, Any]) -> Target | V2PError:
        key = repr(sorted(spec.items())) if isinstance(spec, dict) else spec
        if key not in self.made:
            try:
                self.made[key] = api.make_target(spec, env=os.environ)  # a plan is the operator's own
            except V2PError as exc:
                self.made[key] = exc
        return self.made[key]


@dataclass
class Facts:
    """What a target says about itself that a plan may contradict (asked once per target)."""

    where: str  # for messages: "the local target", "PVE node pve1"
    storages: dict[str, frozenset[str] | None]  # name -> content types (None: any)
    bridges: frozenset[str] | None  # None: the target cannot tell
    error: V2PError | None = None
    nodes: list[str] | None = None  # the cluster's nodes, when the one named is not among them

    @classmethod
    def of(cls, target: Target) -> Facts:
        where = target.place()
        try:
            target.check_usable()
            node = target.node()
            if node is not None:
                nodes = target.nodes()
                if node not in nodes:
                    return cls(where, {}, None, nodes=nodes)
            return cls(where, target.storage_contents(), target.bridges())
        except V2PError as exc:
            return cls(where, {}, None, exc)


class Checker:
    def __init__(self, file: str, vms: list[PlanVM], *, unbuilt: list[PlanVM], partial: set[int],
                 preflight: bool = True) -> None:
        self.file = file
        self.preflight = preflight  # each VM found fine so far through the run's own preflight too
        self.vms = vms
        self.unbuilt = unbuilt  # VMs the reader left out for their problems: only their sources are checked
        self.partial = partial  # VMs (by id) with a setting left out for its problem: no rule checks
        self.targets = Targets()
        self.facts: dict[int, Facts] = {}
        self.unreachable: dict[str, V2PError] = {}
        self.found: list[Problem] = []
        self.of_vm: dict[int, list[Problem]] = {}  # id(PlanVM) -> its problems

    def at(self, vm: PlanVM, key: str, message: str) -> None:
        line, column = vm.positions.get(key, (vm.line, 1))
        problem = Problem(self.file, line, column, message, f"{vm.where or vm.name}.{key}" if not line else "")
        self.found.append(problem)
        self.of_vm.setdefault(id(vm), []).append(problem)

    def check(self, found: list[Problem]) -> None:
        for vm in self.vms:
            target = self.targets.get(vm.target)
            if isinstance(target, V2PError):
                self.at(vm, "target" if "target" in vm.positions else "source", f"target: {target}")
            else:
                facts = self.facts.get(id(target))
                if facts is None:
                    # One cluster out of reach is one problem, not one per node the plan names.
                    known = self.unreachable.get(cluster(vm.target))
                    facts = self.facts[id(target)] = Facts("", {}, None, known) if known else Facts.of(target)
                    if facts.error is not None:
                        self.unreachable.setdefault(cluster(vm.target), facts.error)
                if facts.error is not None:
                    self.at(vm, "target" if "target" in vm.positions else "source", f"target: {facts.error}")
                elif facts.nodes is not None:
                    node = vm.node or ""
                    self.at(vm, "node" if "node" in vm.positions else "target",
                            f"node: no node called {node!r} in the PVE cluster{did_you_mean(node, facts.nodes)}"
                            f" (known: {', '.join(facts.nodes) or 'none'})")
                else:
                    self.storage(vm, target, facts)
                    self.bridges(vm, facts)
                    self.vmid(vm, target)
            # The rules would judge the VM without the setting its problem left out: noise.
            report = self.rules(vm) if self.source(vm) and id(vm) not in self.partial else None
            self.drivers(vm, target, report)
            self.device(vm, target, report)
            if self.preflight and not self.of_vm.get(id(vm)) and not isinstance(target, V2PError):
                self.run_preflight(vm, target)
        for vm in self.unbuilt:
            self.source(vm)
        found += self.found

    def source(self, vm: PlanVM) -> bool:
        if is_uri(vm.source):
            return True  # a remote source: its kind says what is wrong with it when it is opened
        path = Path(vm.source)
        if not path.exists():
            self.at(vm, "source", f"source {path}: no such file or folder")
            return False
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            self.at(vm, "source", f"source {path}: not readable by this user")
            return False
        return True

    def storage(self, vm: PlanVM, target: Target, facts: Facts) -> None:
        if vm.options.get("device"):
            return
        name = vm.options.get("storage") or target.default_storage()
        key = "storage" if "storage" in vm.positions else "target"
        if name not in facts.storages:
            known = sorted(facts.storages)
            self.at(vm, key, f"storage: no storage called {name!r} on the {facts.where}"
                             f"{did_you_mean(name, known)} (known: {', '.join(known) or 'none'})")
            return
        content = facts.storages[name]
        if content is not None and "images" not in content:
            self.at(vm, key, f"storage: {name} on the {facts.where} does not hold VM disks (its content: "
                             f"{', '.join(sorted(content))}; see: "
                             f"{pveconfig.content_added(name, sorted(content), 'images')})")

    def bridges(self, vm: PlanVM, facts: Facts) -> None:
        """The bridges named, checked as the run's preflight checks them (``stage_checks.unknown_bridges``)."""
        for key, _written, why in stage_checks.unknown_bridges(facts.bridges, vm.options.get("networks") or {},
                                                                vm.options.get("bridge"), where=facts.where):
            self.at(vm, key, f"{key}: {why}")

    def run_preflight(self, vm: PlanVM, target: Target) -> None:
        """The migration's own preflight (``Migration.preview``: the checks the run makes before it makes
        anything, nothing made), for what only it tells: room for the disks together, the target's
        rights, a --copy-with the disks cannot take, a VMID taken since; at the key it is about."""
        try:
            api.Migration(vm.source, vm.vmid, target=target, **vm.options).preview()
        except V2PError as exc:
            said = plan_words(str(exc))
            key = next((key for key in vm.positions if said.startswith(f"{key} ") or said.startswith(f"{key}:")),
                        "vmid" if isinstance(exc, VMIDExistsError) else
                        "storage" if isinstance(exc, NoSpaceError) and "storage" in vm.positions else "source")
            self.at(vm, key, said if said.startswith(f"{key}") else f"preflight: {said}")

    def vmid(self, vm: PlanVM, target: Target) -> None:
        """A VMID another VM holds (one no migration of this source made) would fail the run."""
        if not isinstance(vm.vmid, int):
            return
        try:
            if not target.vm_exists(vm.vmid):
                return
            record = MigrationState(target.state_dir(), vm.vmid)
            ours = record.load() and record.data.get("request", {}).get("source") == described(vm.source)
        except V2PError:
            return  # the storage check has said what is wrong with the target, or the record is for status
        if not ours:
            self.at(vm, "vmid", f"vmid {vm.vmid} is taken on the {target.kind} target by a VM this plan's "
                                "migration did not make (pick another, or vmid: auto)")

    def drivers(self, vm: PlanVM, target: Target | V2PError, report: api.VMReport | None) -> None:
        """The drivers ISO the run would read, checked as the run checks it (without uploading it to a
        PVE node): a file that is an ISO, with this Windows' drivers when the VM needs the dance."""
        iso = vm.options.get("drivers_iso")
        if not isinstance(iso, str) or not iso:
            return
        try:
            if ":" in iso and not iso.startswith("/"):  # a volume on the target: only a local one is read here
                if isinstance(target, V2PError):
                    return
                path: Path | None = target.iso_file(iso)
                if path is None:
                    return
            else:
                path = drivers.locate(iso)
            if path is not None:
                options = dict(vm.options)
                if report is not None and report.ostype:  # the VM's own, as the run resolves it
                    options["ostype"] = report.ostype
                stage_checks.driver_folders(path, MigrationOptions(**options))
        except V2PError as exc:
            said = plan_words(str(exc))
            named = said.startswith("drivers ISO ")
            self.at(vm, "drivers_iso", "drivers_iso" + said.removeprefix("drivers ISO") if named
                    else f"drivers_iso: {said}")

    def device(self, vm: PlanVM, target: Target | V2PError, report: api.VMReport | None) -> None:
        """A ``device:`` checked as the run's preflight checks it: it exists, is a block device, and
        (the VM's disk known) is large enough, unmounted, unused and blank (or ``force``)."""
        device = vm.options.get("device")
        if not isinstance(device, str) or isinstance(target, V2PError):
            return
        try:
            storage = target.device_storage(device)
            if report is not None and report.disks:
                storage.check(report.disks[0].capacity, force=bool(vm.options.get("force")))
            else:
                storage.free_bytes()
        except V2PError as exc:
            self.at(vm, "device", f"device: {plan_words(str(exc))}")

    def rules(self, vm: PlanVM) -> api.VMReport | None:
        """The preflight rules' errors, and a source the inspection refuses."""
        try:
            source = api.vm_source(vm.source)
            if source is None:
                if os.path.isdir(vm.source):
                    self.at(vm, "source", f"source {vm.source}: a folder to migrate must hold exactly one .vmx")
                else:
                    api.inspect(vm.source)
                return None
            report = api.inspect_vm(source, vmid=vm.vmid if isinstance(vm.vmid, int) else 100,
                                    **{k: v for k, v in vm.options.items() if k != "device"})
        except V2PError as exc:
            self.at(vm, "source", f"source {vm.source}: {exc}")
            return None
        errors = [finding for finding in report.findings if finding.severity == "error"]
        for finding in errors:
            key = "networks" if finding.id == "unmapped-network" and "networks" in vm.positions else "source"
            hint = " (map it under networks:, or set bridge:)" if finding.id == "unmapped-network" else ""
            ignorable = f" (if that is safe here: ignore_rules: [{finding.id}])" if finding.id in rules.IGNORABLE \
                else ""
            self.at(vm, key, f"rule {finding.id}: {plan_words(finding.message)}{hint}{ignorable}")
        if report.error is not None and not errors:
            self.at(vm, "source", f"source {vm.source}: {report.error}")
        return report


def described(source: str) -> str:
    """What a migration of ``source`` records as its source (``Source.describe()``)."""
    try:
        return open_source(source).describe()
    except V2PError:
        return source
