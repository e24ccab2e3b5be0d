"""Plans: many migrations described in one YAML file, checked before anything runs.

    defaults: {target: local, storage: local, bus: virtio}
    vms:
      - {source: vms/web01/web01.vmx, vmid: 120, name: web01}
      - {source: disks/win7.vmdk, vmid: auto, os: win7}

``Plan.load(path)`` reads a plan keeping each key's line and column, so every problem can be shown
as ``FILE:LINE:COLUMN: message``; ``Plan.problems()`` adds what only the world can say (missing
sources, unknown storages, a VM's preflight rule errors) without touching any target.
``Plan.status()`` reads the migrations' state files; ``Plan.run()`` hands the VMs to ``v2p.planrun``.
Not for: running migrations (``planrun``), nor deciding a VM's hardware (``options``, ``rules``).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from . import api, drivers, pveconfig, rules, stages
from .credentials import SECRET_NAME
from .errors import StateError, V2PError, one_line
from .fsutil import read_regular
from .option_table import OPTION, OPTIONS, PLAN_WORDS, Option
from .options import MigrationOptions, OptionError, check_option, check_text, check_vmid
from .sources import is_uri, open_source
from .state import MigrationState
from .targets.base import Target
from .targets.factory import KINDS, kind_of, target_keys
from .targets.kind_local import ACCELS

if TYPE_CHECKING:
    from .planrun import PlanReport

__all__ = ["Plan", "PlanError", "PlanVM", "Problem", "VMStatus"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a plan. ``line``/``column`` are 1-based; 0 when the plan came from a dict
    (then ``where`` names the place: ``vms[2].vmid``)."""

    file: str
    line: int
    column: int
    message: str
    where: str = ""

    def __str__(self) -> str:
        # One line whatever the plan's values hold (a source path with a newline in it).
        if self.line:
            return one_line(f"{self.file}:{self.line}:{self.column}: {self.message}")
        return one_line(f"{self.file}: {self.where}: {self.message}" if self.where else f"{self.file}: {self.message}")


class PlanError(V2PError):
    """A plan that cannot be used as it stands; ``problems`` lists every one."""

    exit_code = 2

    def __init__(self, problems: list[Problem], *, file: str) -> None:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{problems[0]}{more}", hint=f"see them all: v2p plan validate {file}")
        self.problems = problems


@dataclass
class PlanVM:
    """One VM of a plan, defaults already merged in."""

    name: str  # `name:` or the source file's stem; unique in the plan
    source: str  # a URI as written, or an absolute path (a relative one is relative to the plan file's folder)
    vmid: int | Literal["auto"]
    target: str | dict[str, Any]  # what api.make_target takes
    node: str | None  # PVE node (already folded into a pve:// target URL; kept for limits)
    options: dict[str, Any]  # MigrationOptions keyword arguments
    line: int  # where the VM starts in the plan file (for messages)
    # Where each of its keys was written, the defaults' own for keys it did not set (for messages).
    positions: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)
    where: str = field(default="", repr=False, compare=False)  # vms[N]: its place in the plan


@dataclass
class VMStatus:
    """Where one VM of a plan stands, from its migration record (``state``: not started, running,
    unfinished, interrupted, failed, finished, other (its VMID holds another source's migration),
    unreadable, unknown (its target could not be asked)); ``boot``: how its boot check ended, once
    it did (up, unconfirmed, failed, skipped; "" before), ``boot_signal`` what was seen."""

    name: str
    vmid: int | None  # None: an ``auto`` VM not started yet, or a target that could not be asked
    state: str
    stage: str | None = None  # the last stage recorded
    detail: str = ""
    boot: str = ""
    boot_signal: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vmid": self.vmid, "state": self.state, "stage": self.stage,
                "detail": self.detail, "boot": self.boot or None, "boot_signal": self.boot_signal or None}


# --------------------------------------------------------------------------------------------------
# What a plan may say.

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


def _plan_words(text: str) -> str:
    return _FLAG.sub(lambda match: PLAN_WORDS[match.group(0)], text)


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------------------
# YAML with positions.

@dataclass
class Node:
    """A value read from the plan with where it was written (line 0: from a dict)."""

    value: Any  # scalars: the Python value; mappings: list[tuple[Node, Node]]; sequences: list[Node]
    kind: str  # scalar, map, seq
    line: int = 0
    column: int = 0
    where: str = ""  # the path to it: vms[2].vmid
    text: str | None = None  # a plain scalar's text as written (None: quoted, or from a dict)

    def items(self) -> Iterator[tuple[str, Node, Node]]:
        for key, value in self.value:
            yield str(key.value if key.text is None else key.text), key, value

    def describe(self) -> str:
        if self.kind == "map":
            return "a mapping"
        if self.kind == "seq":
            return "a list"
        value = self.value
        if value is None:
            return "nothing"
        if isinstance(value, bool):
            return f"the yes/no value {self.text or str(value).lower()}"
        if isinstance(value, (int, float)):
            return f"the number {self.text or value}"
        if isinstance(value, str):
            return f"the text {value[:40]!r}"
        return f"the value {self.text or value!r}"


def _from_yaml(node: yaml.Node, where: str, constructor: yaml.constructor.SafeConstructor) -> Node:
    line, column = node.start_mark.line + 1, node.start_mark.column + 1
    if isinstance(node, yaml.MappingNode):
        pairs = []
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            pairs.append((_from_yaml(key, where, constructor),
                          _from_yaml(value, f"{where}.{name}" if where else str(name), constructor)))
        return Node(pairs, "map", line, column, where)
    if isinstance(node, yaml.SequenceNode):
        return Node([_from_yaml(item, f"{where}[{index}]", constructor) for index, item in enumerate(node.value)],
                    "seq", line, column, where)
    if node.tag == "tag:yaml.org,2002:int" and len(node.value) > MAX_NUMBER:
        raise yaml.constructor.ConstructorError(
            None, None, f"a number {len(node.value)} characters long: no setting takes one that large",
            node.start_mark)
    value = constructor.construct_object(node)
    plain = node.style is None
    return Node(value, "scalar", line, column, where, node.value if plain else None)


def _from_data(data: Any, where: str = "") -> Node:
    if isinstance(data, dict):
        pairs = []
        for key, value in data.items():
            path = f"{where}.{key}" if where else str(key)
            pairs.append((Node(str(key), "scalar", where=path), _from_data(value, path)))
        return Node(pairs, "map", where=where)
    if isinstance(data, (list, tuple)):
        return Node([_from_data(item, f"{where}[{index}]") for index, item in enumerate(data)], "seq", where=where)
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    return Node(data, "scalar", where=where)


# A plan holds a few settings per VM: its text is small, shallow, and made of plain scalars.
MAX_BYTES = 1 << 20  # 1 MiB: some 10,000 VMs
MAX_DEPTH = 16  # the plan, vms:, a VM, its networks:/target: ... need 4
MAX_NUMBER = 30  # characters of a number as written: every range a plan key takes fits in 18 digits
_SCALARS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:null")


class _PlanLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML's stubs type SafeLoader as Any
    """YAML's SafeLoader reading plain text, numbers, true/false and nothing else: what else YAML 1.1
    reads into a value on its own (dates, the merge key ``<<``, ``=``) is read as text, which the key's
    type check then names (``vmid: expected a whole number ..., found the text '2024-02-30'``)."""

    yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag in _SCALARS]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _mark(exc: yaml.YAMLError) -> tuple[int, int]:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)


# --------------------------------------------------------------------------------------------------
# The plan.

class Plan:
    """A list of VMs to migrate, read from YAML (``load``) or a dict (``from_dict``)."""

    def __init__(self, path: Path | None, vms: list[PlanVM], *, problems: list[Problem] | None = None,
                 file: str | None = None) -> None:
        self.path = path
        self.vms = vms
        self.file = file or (str(path) if path is not None else "<plan>")
        self._read_problems = list(problems or [])  # what reading it found (a strict load raises them)
        self._unbuilt: list[PlanVM] = []
        self._partial: set[int] = set()

    # -- reading -------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str], *, strict: bool = True, local_dir: str | None = None,
             accel: str | None = None) -> Plan:
        """Read the plan at ``path``. ``strict``: raise ``PlanError`` listing every problem of its
        text (else keep them for ``problems()`` and leave the broken VMs out). ``local_dir`` /
        ``accel``: for VMs on the local target whose plan names no ``dir`` (the CLI's --target-dir)."""
        file = check_text("plan", path, controls=True) or ""
        where = Path(os.path.abspath(file))
        raw = read_regular(file, MAX_BYTES, what="plan", error=OptionError)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
            raise PlanError([Problem(file, line, column, f"the plan is not UTF-8 text (byte {raw[exc.start]:#04x})")],
                            file=file) from None
        reader = _Reader(file, where.parent, local_dir=local_dir, accel=accel)
        root = reader.parse(text)
        return reader.plan(where, root, strict=strict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base: str | os.PathLike[str], strict: bool = True,
                  local_dir: str | None = None, accel: str | None = None) -> Plan:
        """A plan from the data a YAML plan holds; relative sources are relative to ``base``."""
        reader = _Reader("<plan>", Path(os.path.abspath(base)), local_dir=local_dir, accel=accel)
        return reader.plan(None, _from_data(data), strict=strict)

    # -- checking --------------------------------------------------------------
    def problems(self) -> list[Problem]:
        """Every problem of the plan: its text's, then what the sources and targets say (missing or
        unreadable sources, unknown storages, VMIDs taken by other VMs, preflight rule errors).
        Touches nothing: no state file, no VM, no lock; a target that cannot be reached is one problem."""
        found = list(self._read_problems)
        _Checker(self).check(found)
        unique: dict[tuple[int, int, str, str], Problem] = {}
        for problem in found:
            unique.setdefault((problem.line, problem.column, problem.where, problem.message), problem)
        return sorted(unique.values(), key=lambda p: (p.line, p.column))

    # -- state -----------------------------------------------------------------
    def status(self) -> list[VMStatus]:
        """Each VM's state from its migration record (read-only, no lock: a running plan is shown)."""
        targets = _Targets()
        return [_status_of(vm, targets) for vm in self.vms]

    def run(self, **options: Any) -> PlanReport:
        """Run every VM of the plan (``v2p.planrun.run_plan``: parallel, dry_run, on_event, ...)."""
        from .planrun import run_plan

        if self._read_problems:
            raise PlanError(self._read_problems, file=self.file)
        # Every check validate makes, before anything is made: a VM with a problem fails at once (no
        # state folder, no lock, no VM); the others run.
        checker = _Checker(self)
        checker.check([])
        refused = {}
        for vm in self.vms:
            found = sorted(checker.of_vm.get(id(vm), []), key=lambda p: (p.line, p.column))
            if found:
                more = f" (and {len(found) - 1} more: v2p plan validate {self.file})" if len(found) > 1 else ""
                refused[vm.name] = f"{found[0]}{more}"
        return run_plan(self.vms, refused=refused, **options)


class _Reader:
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
            for event in yaml.parse(text, Loader=_PlanLoader):
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
            node = yaml.compose(text, Loader=_PlanLoader)
            if node is None:
                self.problems.append(Problem(self.file, 1, 1,
                                             "the plan is empty: it needs vms: (and may have defaults:)"))
                return None
            return _from_yaml(node, "", _PlanLoader(""))
        except yaml.YAMLError as exc:
            line, column = _mark(exc)
            what = getattr(exc, "problem", None) or str(exc)
            context = getattr(exc, "context", None)
            said = what if isinstance(exc, yaml.constructor.ConstructorError) else \
                f"not valid YAML: {context + ', ' if context else ''}{what}"
            self.problems.append(Problem(self.file, line, column, said))
            return None

    def plan(self, path: Path | None, root: Node | None, *, strict: bool) -> Plan:
        vms = self.vms(root) if root is not None else []
        if strict and self.problems:
            raise PlanError(self.problems, file=self.file)
        plan = Plan(path, vms, problems=self.problems, file=self.file)
        plan._unbuilt = self.unbuilt
        plan._partial = self.partial
        return plan

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
        mean = _did_you_mean(name, known)
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
                self.problem(node, f"{name}: unknown {name} {value!r}{_did_you_mean(value, spec.choices)}"
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
            self.problem(entries["kind"][1], f"target: unknown kind {kind!r}{_did_you_mean(kind, KINDS)}"
                                             f" ({' or '.join(KINDS)})")
            return False
        if "url" in KINDS[kind].keys:  # a kind named by its URL
            if "url" not in entries:
                self.problem(node, f"target: a {kind} target needs url: {KINDS[kind].example}")
                return False
            return self.url_checked(entries["url"][1], entries["url"][1].value)
        if "accel" in entries and entries["accel"][1].value not in ACCELS:
            self.problem(entries["accel"][1], "target: accel is auto, kvm or tcg")
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
                said = _plan_words(exc.message)
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
            self.problem(entry, f"{what}: {_plan_words(str(exc))}")
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
                key = (_cluster(vm.target), vm.vmid)
                if key in vmids:
                    said(vm, "vmid", f"vmid {vm.vmid} is also VM {vmids[key].name}'s ({place(vmids[key])}) on the "
                                     "same target")
                vmids.setdefault(key, vm)
            elif vm.source in autos:
                said(vm, "vmid", f"vmid auto: VM {autos[vm.source].name} ({place(autos[vm.source])}) migrates the "
                                 "same source with vmid auto: both would resume one migration")
            else:
                autos[vm.source] = vm


def _cluster(target: str | dict[str, Any]) -> str:
    """What shares one VMID space: a local target's folder, a PVE cluster (any node)."""
    if isinstance(target, dict):
        return f"local:{target.get('dir', '')}"
    kind = kind_of(target)
    return kind.cluster(target) if kind is not None else target


# --------------------------------------------------------------------------------------------------
# Checks against the world (read-only).

class _Targets:
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
class _Facts:
    """What a target says about itself that a plan may contradict (asked once per target)."""

    where: str  # for messages: "the local target", "PVE node pve1"
    storages: dict[str, frozenset[str] | None]  # name -> content types (None: any)
    bridges: frozenset[str] | None  # None: the target cannot tell
    error: V2PError | None = None
    nodes: list[str] | None = None  # the cluster's nodes, when the one named is not among them

    @classmethod
    def of(cls, target: Target) -> _Facts:
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


class _Checker:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.targets = _Targets()
        self.facts: dict[int, _Facts] = {}
        self.unreachable: dict[str, V2PError] = {}
        self.found: list[Problem] = []
        self.of_vm: dict[int, list[Problem]] = {}  # id(PlanVM) -> its problems

    def at(self, vm: PlanVM, key: str, message: str) -> None:
        line, column = vm.positions.get(key, (vm.line, 1))
        problem = Problem(self.plan.file, line, column, message, f"{vm.where or vm.name}.{key}" if not line else "")
        self.found.append(problem)
        self.of_vm.setdefault(id(vm), []).append(problem)

    def check(self, found: list[Problem]) -> None:
        for vm in self.plan.vms:
            target = self.targets.get(vm.target)
            if isinstance(target, V2PError):
                self.at(vm, "target" if "target" in vm.positions else "source", f"target: {target}")
            else:
                facts = self.facts.get(id(target))
                if facts is None:
                    # One cluster out of reach is one problem, not one per node the plan names.
                    known = self.unreachable.get(_cluster(vm.target))
                    facts = self.facts[id(target)] = _Facts("", {}, None, known) if known else _Facts.of(target)
                    if facts.error is not None:
                        self.unreachable.setdefault(_cluster(vm.target), facts.error)
                if facts.error is not None:
                    self.at(vm, "target" if "target" in vm.positions else "source", f"target: {facts.error}")
                elif facts.nodes is not None:
                    node = vm.node or ""
                    self.at(vm, "node" if "node" in vm.positions else "target",
                            f"node: no node called {node!r} in the PVE cluster{_did_you_mean(node, facts.nodes)}"
                            f" (known: {', '.join(facts.nodes) or 'none'})")
                else:
                    self.storage(vm, target, facts)
                    self.bridges(vm, facts)
                    self.vmid(vm, target)
            # The rules would judge the VM without the setting its problem left out: noise.
            report = self.rules(vm) if self.source(vm) and id(vm) not in self.plan._partial else None
            self.drivers(vm, target, report)
            self.device(vm, target, report)
        for vm in self.plan._unbuilt:
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

    def storage(self, vm: PlanVM, target: Target, facts: _Facts) -> None:
        if vm.options.get("device"):
            return
        name = vm.options.get("storage") or target.default_storage()
        key = "storage" if "storage" in vm.positions else "target"
        if name not in facts.storages:
            known = sorted(facts.storages)
            self.at(vm, key, f"storage: no storage called {name!r} on the {facts.where}"
                             f"{_did_you_mean(name, known)} (known: {', '.join(known) or 'none'})")
            return
        content = facts.storages[name]
        if content is not None and "images" not in content:
            self.at(vm, key, f"storage: {name} on the {facts.where} does not hold VM disks (its content: "
                             f"{', '.join(sorted(content))}; see: "
                             f"{pveconfig.content_added(name, sorted(content), 'images')})")

    def bridges(self, vm: PlanVM, facts: _Facts) -> None:
        if facts.bridges is None:
            return
        wanted = [("networks", bridge) for bridge in (vm.options.get("networks") or {}).values()]
        if vm.options.get("bridge"):
            wanted.append(("bridge", vm.options["bridge"]))
        for key, bridge in wanted:
            if bridge not in facts.bridges:
                known = sorted(facts.bridges)
                self.at(vm, key, f"{key}: no bridge called {bridge!r} on the {facts.where}"
                                 f"{_did_you_mean(bridge, known)} (known: {', '.join(known) or 'none'})")

    def vmid(self, vm: PlanVM, target: Target) -> None:
        """A VMID another VM holds (one no migration of this source made) would fail the run."""
        if not isinstance(vm.vmid, int):
            return
        try:
            if not target.vm_exists(vm.vmid):
                return
            record = MigrationState(target.state_dir(), vm.vmid)
            ours = record.load() and record.data.get("request", {}).get("source") == _described(vm.source)
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
                stages.driver_folders(path, MigrationOptions(**options))
        except V2PError as exc:
            said = _plan_words(str(exc))
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
            self.at(vm, "device", f"device: {_plan_words(str(exc))}")

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
            self.at(vm, key, f"rule {finding.id}: {_plan_words(finding.message)}{hint}{ignorable}")
        if report.error is not None and not errors:
            self.at(vm, "source", f"source {vm.source}: {report.error}")
        return report


def _described(source: str) -> str:
    """What a migration of ``source`` records as its source (``Source.describe()``)."""
    try:
        return open_source(source).describe()
    except V2PError:
        return source


# --------------------------------------------------------------------------------------------------
# Status.

def _status_of(vm: PlanVM, targets: _Targets) -> VMStatus:
    target = targets.get(vm.target)
    if isinstance(target, V2PError):
        return VMStatus(vm.name, vm.vmid if isinstance(vm.vmid, int) else None, "unknown", detail=f"target: {target}")
    vmid: int | None = vm.vmid if isinstance(vm.vmid, int) else None
    try:
        if vmid is None:
            options = MigrationOptions(**{"storage": target.default_storage(), **vm.options})
            vmid = api.earlier_migration(target, _described(vm.source), options)
            if vmid is None:
                return VMStatus(vm.name, None, "not started", detail="vmid auto: no migration of this source yet")
        record = MigrationState(target.state_dir(), vmid)
        if not record.load():
            return VMStatus(vm.name, vmid, "running" if _locked(record.directory, vmid) else "not started")
    except StateError as exc:
        return VMStatus(vm.name, vmid, "unreadable", detail=str(exc))
    except V2PError as exc:
        return VMStatus(vm.name, vmid, "unknown", detail=str(exc))
    data = record.data
    recorded = list(data["stages"])
    last = recorded[-1] if recorded else None
    source = data["request"].get("source")
    if source != _described(vm.source):
        return VMStatus(vm.name, vmid, "other", last, f"VMID {vmid} holds the migration of {source}, not of "
                                                      "this VM's source")
    boot_record = data["stages"].get("boot")
    boot, signal = stages.boot_outcome(boot_record.get("result") if isinstance(boot_record, dict) else None)
    if boot_record is None:
        boot = ""  # not that far yet
    if data["finished"]:
        seconds = sum(float(stage.get("seconds", 0)) for stage in data["stages"].values())
        return VMStatus(vm.name, vmid, "finished", last, f"at {data.get('finished_at', '?')} ({seconds:.1f} s of "
                        f"work); {stages.boot_words(boot, signal)}", boot, signal)
    if _locked(record.directory, vmid):
        done = f"{len(recorded)} stage(s) done" + (f", last {last}" if last else "")
        return VMStatus(vm.name, vmid, "running", last, done, boot, signal)
    failed = data.get("failed")
    if isinstance(failed, dict) and failed.get("error") == "interrupted":  # Ctrl-C, SIGTERM: resumable
        return VMStatus(vm.name, vmid, "interrupted", last, f"in {failed.get('stage')}; rerun the plan to resume",
                        boot, signal)
    if isinstance(failed, dict):
        return VMStatus(vm.name, vmid, "failed", last, f"in {failed.get('stage')}: {failed.get('error')}",
                        boot, signal)
    return VMStatus(vm.name, vmid, "unfinished", last, f"{len(recorded)} stage(s) done; rerun the plan to resume",
                    boot, signal)


def _locked(directory: Path, vmid: int) -> bool:
    """Whether a run holds VMID ``vmid``'s lock, read from /proc/locks (taking the lock, even for a
    moment, could make that run fail to start)."""
    try:
        info = (directory / f"{vmid}.lock").stat()
        held = Path("/proc/locks").read_text()
    except OSError:
        return False
    want = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    return any("FLOCK" in line and want in line.split() for line in held.splitlines())

