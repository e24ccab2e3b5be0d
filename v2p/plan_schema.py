"""What a plan may say (its keys, their types, the targets it names) and the reader that turns its
text or a dict into ``PlanVM``s, collecting every problem with where it was written.

Not for: checks against the world (``plan_checks``: sources, storages, bridges, rules).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from . import api, rules
from .credentials import SECRET_NAME
from .option_table import OPTION, OPTIONS, PLAN_WORDS, Option
from .options import MigrationOptions, OptionError, check_option, check_vmid, did_you_mean
from .plan_model import PlanError, PlanVM, Problem
from .plan_yaml import MAX_DEPTH, Node, PlanLoader, error_mark, from_yaml
from .sources import is_uri
from .targets.factory import KINDS, kind_of, target_keys


@dataclass(frozen=True)
class Key:
    kind: str  # str, int, bool, seconds, map, list, target, vmid, path
    option: str | None = None  # the MigrationOptions argument it sets
    choices: tuple[str, ...] = ()
    place: str = "both"  # both, vm (per VM only)


# How a plan writes each kind of option (option_table.Kind).
_PLAN_KINDS = {"choice": "str", "text": "str", "device": "str", "vm-name": "str", "bridge": "str", "bridges": "map",
               "rules": "list", "whole": "int", "seconds": "seconds", "bool": "bool"}


def _key(option: Option) -> Key:
    return Key(_PLAN_KINDS[option.kind], option.keyword, option.choices, "vm" if option.per_vm else "both")


KEYS: dict[str, Key] = {
    "source": Key("path", place="vm"),
    "vmid": Key("vmid"),
    "target": Key("target"),
    "node": Key("str"),
    **{option.plan_key: _key(option) for option in OPTIONS if option.plan_key is not None},
}
TOP_KEYS = ("defaults", "vms")
TARGET_KEYS = target_keys()
SECRET = SECRET_NAME  # keys that hold a secret wherever they appear: refused, never echoed
SECRET_HINT = "secrets stay out of plans: set $V2P_PVE_TOKEN (or $V2P_PVE_PASSWORD), or use the secrets file"
# The CLI's option names in messages of deeper checks (rules, drivers, devices), as a plan spells them.
_FLAG = re.compile("|".join(re.escape(flag) for flag in sorted(PLAN_WORDS, key=len, reverse=True)) + r"\b")
_DECIMAL = re.compile(r"0|[1-9][0-9]*", re.ASCII)
_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?", re.ASCII)


def plan_words(text: str) -> str:
    return _FLAG.sub(lambda match: PLAN_WORDS[match.group(0)], text)



class Reader:
    """Turns the YAML text (or a dict) into PlanVMs, collecting every problem on the way."""

    def __init__(self, file: str, base: Path, *, local_dir: str | None, accel: str | None) -> None:
        self.file = file
        self.base = base
        self.local_dir = local_dir
        self.accel = accel
        self.problems: list[Problem] = []
        self.default_names: set[str] = set()
        self.unbuilt: list[PlanVM] = []  # VMs left out for their problems: only their sources are checked
        self.partial: set[int] = set()  # VMs (by id) with a setting left out for its problem: no rule checks

    def problem(self, node: Node, message: str) -> None:
        self.problems.append(Problem(self.file, node.line, node.column, message, node.where))

    def parse(self, text: str) -> Node | None:
        """The YAML document as Nodes; plain YAML only (no anchors, aliases or tags), no duplicate keys."""
        depth = 0
        try:
            for event in yaml.parse(text, Loader=PlanLoader):
                mark = event.start_mark
                at = Node(None, "scalar", mark.line + 1, mark.column + 1)
                if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                    depth += 1
                    if depth > MAX_DEPTH:  # composing it would recurse once per level
                        self.problem(at, f"nested more than {MAX_DEPTH} levels deep: a plan is defaults: "
                                         "and vms:, each VM a mapping of settings")
                        return None
                elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                    depth -= 1
                if isinstance(event, yaml.AliasEvent):
                    self.problem(at, f"alias *{event.anchor}: plans are plain YAML (no anchors or aliases); "
                                     "put shared settings under defaults:")
                elif getattr(event, "anchor", None):
                    self.problem(at, f"anchor &{event.anchor}: plans are plain YAML (no anchors or aliases); "
                                     "put shared settings under defaults:")
                elif getattr(event, "tag", None) and not (isinstance(event, yaml.ScalarEvent) and event.tag == "!"):
                    self.problem(at, f"tag {event.tag}: plans are plain YAML (no tags)")
            if self.problems:
                return None
            node = yaml.compose(text, Loader=PlanLoader)
            if node is None:
                self.problems.append(Problem(self.file, 1, 1,
                                             "the plan is empty: it needs vms: (and may have defaults:)"))
                return None
            return from_yaml(node, "", PlanLoader(""))
        except yaml.YAMLError as exc:
            line, column = error_mark(exc)
            what = getattr(exc, "problem", None) or str(exc)
            context = getattr(exc, "context", None)
            said = what if isinstance(exc, yaml.constructor.ConstructorError) else \
                f"not valid YAML: {context + ', ' if context else ''}{what}"
            self.problems.append(Problem(self.file, line, column, said))
            return None

    def vms_of(self, root: Node | None, *, strict: bool) -> list[PlanVM]:
        """The plan's VMs (``strict``: raise ``PlanError`` listing every problem of its text)."""
        vms = self.vms(root) if root is not None else []
        if strict and self.problems:
            raise PlanError(self.problems, file=self.file)
        return vms

    # -- the structure ---------------------------------------------------------
    def mapping(self, node: Node, what: str) -> dict[str, tuple[Node, Node]] | None:
        """A mapping's keys (their text) with their nodes; duplicate keys and secrets are problems."""
        if node.kind != "map":
            self.problem(node, f"{what}: expected a mapping (key: value lines), found {node.describe()}")
            return None
        seen: dict[str, tuple[Node, Node]] = {}
        for name, key, value in node.items():
            if name in seen:
                self.problem(key, f"{what}: key {name!r} appears twice (first on line {seen[name][0].line})"
                             if key.line else f"{what}: key {name!r} appears twice")
                continue
            seen[name] = (key, value)
        return seen

    def vms(self, root: Node) -> list[PlanVM]:
        top = self.mapping(root, "the plan")
        if top is None:
            return []
        for name, (key, _value) in top.items():
            if name not in TOP_KEYS:
                self.unknown(key, name, TOP_KEYS, "the plan", "a plan has defaults: and vms:")
        defaults: dict[str, tuple[Node, Node]] = {}
        if "defaults" in top:
            if top["defaults"][1].kind == "map":
                self.default_names = {name for name, _key, _value in top["defaults"][1].items()}
            defaults = self.settings(top["defaults"][1], "defaults", vm=False) or {}
        if "vms" not in top:
            self.problems.append(Problem(self.file, root.line or 0, root.column or 0,
                                         "the plan has no vms: (a list of the VMs to migrate)", "vms"))
            return []
        listed = top["vms"][1]
        if listed.kind != "seq":
            self.problem(listed, f"vms: expected a list of VMs (lines starting with '- '), found {listed.describe()}")
            return []
        if not listed.value:
            self.problem(listed, "vms: the list is empty")
        out = []
        for index, entry in enumerate(listed.value):
            vm = self.vm(entry, index, defaults)
            if vm is not None:
                out.append(vm)
        self.duplicates(out)
        return out

    def unknown(self, key: Node, name: str, known: Any, what: str, hint: str = "") -> None:
        if SECRET.search(name):
            self.problem(key, f"{what}: {name!r} looks like a secret: refused ({SECRET_HINT})")
            return
        if name == "<<":
            self.problem(key, f"{what}: the merge key <<: is not for plans: put shared settings under defaults:")
            return
        mean = did_you_mean(name, known)
        self.problem(key, f"{what}: unknown key {name!r}{mean}" + (f" ({hint})" if hint and not mean else ""))

    def settings(self, node: Node, what: str, *, vm: bool) -> dict[str, tuple[Node, Node]] | None:
        """The known keys of ``defaults:`` or one VM, each checked for its type."""
        found = self.mapping(node, what)
        if found is None:
            return None
        good: dict[str, tuple[Node, Node]] = {}
        for name, (key, value) in found.items():
            spec = KEYS.get(name)
            if spec is None:
                self.unknown(key, name, KEYS, what, "see pipelines/ for examples")
                continue
            if spec.place == "vm" and not vm:
                self.problem(key, f"defaults: {name} is set per VM, not in defaults")
                continue
            if self.typed(name, spec, value):
                good[name] = (key, value)
        return good

    def typed(self, name: str, spec: Key, node: Node) -> bool:
        """Whether ``node`` has the type key ``name`` takes (a problem said if not)."""
        value, kind = node.value, spec.kind
        if node.kind == "scalar" and value is None:
            self.problem(node, f"{name}: no value given")
            return False
        if kind in ("str", "path"):
            if node.kind != "scalar" or not isinstance(value, str):
                quote = f" (hint: quote it: {name}: \"{node.text}\")" if node.text is not None else ""
                self.problem(node, f"{name}: expected text, found {node.describe()}{quote}")
                return False
            if spec.choices and value not in spec.choices:
                self.problem(node, f"{name}: unknown {name} {value!r}{did_you_mean(value, spec.choices)}"
                             f" (one of: {', '.join(spec.choices)})")
                return False
            return True
        if kind == "bool":
            if node.kind != "scalar" or not isinstance(value, bool):
                self.problem(node, f"{name}: expected true or false, found {node.describe()}")
                return False
            return True
        if kind in ("int", "vmid"):
            if kind == "vmid" and value == api.AUTO:
                return True
            written = node.text if node.text is not None else (str(value) if type(value) is int else None)
            if node.kind != "scalar" or type(value) is not int or written is None or not _DECIMAL.fullmatch(written):
                also = " or auto" if kind == "vmid" else ""
                octal = " (YAML reads a leading 0 as octal)" if written and re.fullmatch(r"0[0-9]+", written) else ""
                self.problem(node, f"{name}: expected a whole number in the digits 0-9{also}, "
                                   f"found {node.describe()}{octal}")
                return False
            return True
        if kind == "seconds":
            written = node.text if node.text is not None else str(value)
            if node.kind != "scalar" or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not _SECONDS.fullmatch(written):
                self.problem(node, f"{name}: expected a number of seconds, found {node.describe()}")
                return False
            return True
        if kind == "map":
            entries = self.mapping(node, name)
            if entries is None:
                return False
            good = True
            for network, (_key, bridge) in entries.items():
                if bridge.kind != "scalar" or not isinstance(bridge.value, str):
                    self.problem(bridge, f"{name}: {network!r}: expected a bridge name, found {bridge.describe()}")
                    good = False
            return good
        if kind == "list":
            items = value if node.kind == "seq" else None
            if items is None or any(item.kind != "scalar" or not isinstance(item.value, str) for item in items):
                self.problem(node, f"{name}: expected a list of rule ids, found {node.describe()}")
                return False
            return True
        if kind == "target":
            return self.target_typed(node)
        raise AssertionError(kind)

    def target_typed(self, node: Node) -> bool:
        if node.kind == "scalar" and isinstance(node.value, str):
            return self.url_checked(node, node.value)
        entries = self.mapping(node, "target")
        if entries is None:
            return False
        good = True
        for name, (key, value) in entries.items():
            if name not in TARGET_KEYS:
                self.unknown(key, name, TARGET_KEYS, "target", "a target has " + ", ".join(TARGET_KEYS))
                good = False
            elif value.kind != "scalar" or not isinstance(value.value, str):
                self.problem(value, f"target: {name}: expected text, found {value.describe()}")
                good = False
        if not good:
            return False
        kind = entries["kind"][1].value if "kind" in entries else next(iter(KINDS))
        if kind not in KINDS:
            self.problem(entries["kind"][1], f"target: unknown kind {kind!r}{did_you_mean(kind, KINDS)}"
                                             f" ({' or '.join(KINDS)})")
            return False
        if "url" in KINDS[kind].keys:  # a kind named by its URL
            if "url" not in entries:
                self.problem(node, f"target: a {kind} target needs url: {KINDS[kind].example}")
                return False
            return self.url_checked(entries["url"][1], entries["url"][1].value)
        for name, allowed in KINDS[kind].choices.items():
            if name in entries and entries[name][1].value not in allowed:
                self.problem(entries[name][1], f"target: {name} is {', '.join(allowed[:-1])} or {allowed[-1]}")
                return False
        return True

    def url_checked(self, node: Node, url: str) -> bool:
        kind = kind_of(url)
        if kind is None:
            known = ", or ".join(kind.example for kind in KINDS.values())
            self.problem(node, f"target: {url[:40]!r} is not a target v2p knows ({known})")
            return False
        refused = kind.refusal(url)
        if refused is not None:
            self.problem(node, f"target: {refused} ({SECRET_HINT})")
            return False
        return True

    # -- one VM -------------------------------------------------------------------
    def vm(self, entry: Node, index: int, defaults: dict[str, tuple[Node, Node]]) -> PlanVM | None:
        own = self.settings(entry, f"vms[{index}]", vm=True)
        if own is None:
            return None
        vm = self.vm_of(entry, index, own, defaults)
        if vm is None and "source" in own:
            # Still worth knowing whether it exists: every problem is said at once.
            node = own["source"][1]
            self.unbuilt.append(PlanVM(f"vms[{index}]", self.source_of(node.value), "auto", "local", None, {},
                                       entry.line, {"source": (node.line, node.column)}, f"vms[{index}]"))
        return vm

    def vm_of(self, entry: Node, index: int, own: dict[str, tuple[Node, Node]],
              defaults: dict[str, tuple[Node, Node]]) -> PlanVM | None:
        what = f"vms[{index}]"
        given = {name for name, _key, _value in entry.items()}
        # A VM's own value that is wrong must not quietly become the default's: the key is left out.
        merged = {name: pair for name, pair in {**defaults, **own}.items() if name in own or name not in given}
        whole = not any(name in KEYS and name not in own for name in given)
        if "source" not in given:
            self.problem(entry, f"{what}: no source: (the .vmx, .ovf, .ova, VM folder or disk to migrate)")
        if "vmid" not in given and "vmid" not in self.default_names:
            self.problem(entry, f"{what}: no vmid: (a number, or auto for the next free one)")
        values = {name: value.value for name, (_key, value) in merged.items()}
        positions = {name: (value.line, value.column) for name, (_key, value) in merged.items()}
        options: dict[str, Any] = {}
        for name, (_key, value) in merged.items():
            spec = KEYS[name]
            if spec.option is None:
                continue
            chosen = self.option_value(name, value)
            try:
                check_option(OPTION[spec.option], chosen, label=name)
                if name == "ignore_rules":
                    rules.check_ignore(chosen)
            except OptionError as exc:
                said = plan_words(exc.message)
                self.problem(value, said if said.startswith((f"{name} ", f"{name}:")) else f"{name}: {said}")
                whole = False
                continue
            options[spec.option] = chosen
        vmid: int | Literal["auto"] = values.get("vmid", api.AUTO)
        if isinstance(vmid, int):
            try:
                check_vmid(vmid)
            except OptionError as exc:
                self.problem(merged["vmid"][1], f"vmid: {exc}")
                return None
        target, node = self.target_of(merged)
        if "source" not in own or "vmid" not in merged or target is None:
            return None
        try:
            MigrationOptions(**options)  # what only the options together say (bwlimit with dd, ...)
        except OptionError as exc:
            self.problem(entry, f"{what}: {plan_words(str(exc))}")
            return None
        name = values.get("name") or Path(values["source"].rstrip("/")).stem
        vm = PlanVM(name, self.source_of(values["source"]), vmid, target, node, options, entry.line, positions, what)
        if not whole:
            self.partial.add(id(vm))
        return vm

    def source_of(self, written: str) -> str:
        """A VM's ``source:``: a URI a source kind reads as written, else a path made absolute against
        the plan's folder (``~`` expanded)."""
        if is_uri(written):
            return written
        return os.path.normpath(self.base / os.path.expanduser(written))

    def option_value(self, name: str, node: Node) -> Any:
        if name == "networks":
            return {network: bridge.value for network, _key, bridge in node.items()}
        if name == "ignore_rules":
            return tuple(item.value for item in node.value)
        if name == "drivers_iso" and node.value and ":" not in node.value:  # a path, not a volume (local:iso/...)
            return os.path.normpath(self.base / os.path.expanduser(node.value))
        if KEYS[name].kind == "seconds":
            return float(node.value)
        return node.value

    def target_of(self, merged: dict[str, tuple[Node, Node]]) -> tuple[str | dict[str, Any] | None, str | None]:
        """The target as api.make_target takes it, with the VM's node folded into a pve:// URL."""
        given: Any = merged["target"][1] if "target" in merged else None
        node = merged["node"][1] if "node" in merged else None
        spec: Any = "local" if given is None else given.value
        if isinstance(spec, list):
            spec = {name: value.value for name, _key, value in given.items()}
            if "url" in KINDS[spec.get("kind", next(iter(KINDS)))].keys:  # a kind named by its URL
                spec = spec["url"]
        if isinstance(spec, dict) or spec == "local":
            if node is not None:
                self.problem(node, "node: applies to a pve:// target only")
                return None, None
            local = dict(spec) if isinstance(spec, dict) else {"kind": "local"}
            if local.get("dir"):
                local["dir"] = os.path.normpath(self.base / os.path.expanduser(local["dir"]))
            elif self.local_dir:
                local["dir"] = self.local_dir
            if self.accel and "accel" not in local:
                local["accel"] = self.accel
            return ("local" if local == {"kind": "local"} else local), None
        url = str(spec)
        kind = kind_of(url)
        if kind is None or kind.with_node is None:
            if node is not None:
                self.problem(node, "node: applies to a pve:// target only")
                return None, None
            return url, None
        try:
            return kind.with_node(url, None if node is None else node.value)
        except OptionError as exc:
            assert node is not None
            self.problem(node, f"node: {exc.message}")
            return None, None

    def duplicates(self, vms: list[PlanVM]) -> None:
        names: dict[str, PlanVM] = {}
        vmids: dict[tuple[str, int], PlanVM] = {}
        autos: dict[str, PlanVM] = {}

        def said(vm: PlanVM, key: str, message: str) -> None:
            line, column = vm.positions.get(key, vm.positions.get("source", (vm.line, 1)))
            self.problems.append(Problem(self.file, line, column, message, "" if line else f"{vm.where}.{key}"))

        def place(vm: PlanVM) -> str:
            return f"line {vm.line}" if vm.line else vm.where

        for vm in vms:
            if vm.name in names:
                said(vm, "name", f"name {vm.name!r} is also the name of the VM on {place(names[vm.name])} "
                                 "(names are unique in a plan: set name: to tell them apart)")
            names.setdefault(vm.name, vm)
            if isinstance(vm.vmid, int):
                key = (cluster(vm.target), vm.vmid)
                if key in vmids:
                    said(vm, "vmid", f"vmid {vm.vmid} is also VM {vmids[key].name}'s ({place(vmids[key])}) on the "
                                     "same target")
                vmids.setdefault(key, vm)
            elif vm.source in autos:
                said(vm, "vmid", f"vmid auto: VM {autos[vm.source].name} ({place(autos[vm.source])}) migrates the "
                                 "same source with vmid auto: both would resume one migration")
            else:
                autos[vm.source] = vm


def cluster(target: str | dict[str, Any]) -> str:
    """What shares one VMID space: a local target's folder, a PVE cluster (any node)."""
    if isinstance(target, dict):
        return f"local:{target.get('dir', '')}"
    kind = kind_of(target)
    return kind.cluster(target) if kind is not None else target
