"""A plan's YAML read into ``Node``s that keep where each value was written (line, column, path).

Only plain YAML: text, numbers, true/false; no anchors, aliases or tags (``plan_schema`` refuses them).
Not for: what the keys mean (``plan_schema``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml


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


def from_yaml(node: yaml.Node, where: str, constructor: yaml.constructor.SafeConstructor) -> Node:
    line, column = node.start_mark.line + 1, node.start_mark.column + 1
    if isinstance(node, yaml.MappingNode):
        pairs = []
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            pairs.append((from_yaml(key, where, constructor),
                          from_yaml(value, f"{where}.{name}" if where else str(name), constructor)))
        return Node(pairs, "map", line, column, where)
    if isinstance(node, yaml.SequenceNode):
        return Node([from_yaml(item, f"{where}[{index}]", constructor) for index, item in enumerate(node.value)],
                    "seq", line, column, where)
    if node.tag == "tag:yaml.org,2002:int" and len(node.value) > MAX_NUMBER:
        raise yaml.constructor.ConstructorError(
            None, None, f"a number {len(node.value)} characters long: no setting takes one that large",
            node.start_mark)
    value = constructor.construct_object(node)
    plain = node.style is None
    return Node(value, "scalar", line, column, where, node.value if plain else None)


def from_data(data: Any, where: str = "") -> Node:
    if isinstance(data, dict):
        pairs = []
        for key, value in data.items():
            path = f"{where}.{key}" if where else str(key)
            pairs.append((Node(str(key), "scalar", where=path), from_data(value, path)))
        return Node(pairs, "map", where=where)
    if isinstance(data, (list, tuple)):
        return Node([from_data(item, f"{where}[{index}]") for index, item in enumerate(data)], "seq", where=where)
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    return Node(data, "scalar", where=where)


# A plan holds a few settings per VM: its text is small, shallow, and made of plain scalars.
MAX_BYTES = 1 << 20  # 1 MiB: some 10,000 VMs
MAX_DEPTH = 16  # the plan, vms:, a VM, its networks:/target: ... need 4
MAX_NUMBER = 30  # characters of a number as written: every range a plan key takes fits in 18 digits
_SCALARS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:null")


class PlanLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML's stubs type SafeLoader as Any
    """YAML's SafeLoader reading plain text, numbers, true/false and nothing else: what else YAML 1.1
    reads into a value on its own (dates, the merge key ``<<``, ``=``) is read as text, which the key's
    type check then names (``vmid: expected a whole number ..., found the text '2024-02-30'``)."""

    yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag in _SCALARS]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def error_mark(exc: yaml.YAMLError) -> tuple[int, int]:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)

