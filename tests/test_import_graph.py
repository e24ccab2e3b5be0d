"""No import cycle inside v2p: the module graph, built from the source with ``ast``, is acyclic.

Every import counts wherever it is written: at the top, inside a function (an import put there to
dodge a cycle is still the cycle), or under ``TYPE_CHECKING``. Importing ``v2p.a.b`` runs
``v2p/a/__init__.py`` first, so it is an edge to the package ``v2p.a`` as well, unless the importer
is itself inside ``v2p.a`` (its package is already being imported). The root ``v2p`` package, which
imports everything to offer it to library users, is not counted as a target.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "v2p"


def modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package), for every ``.py`` under ``root``."""
    found: dict[str, tuple[Path, bool]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        if package:
            parts.pop()
        found[".".join(parts)] = (path, package)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of ``root``'s package it imports (see the module docstring)."""
    found = modules(root)
    top = root.name

    def known(name: str) -> str:
        while name not in found:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, (path, package) in found.items():
        here = name if package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {known(alias.name) for alias in node.names if alias.name.split(".")[0] == top}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.split(".")[0] != top:
                    continue
                for alias in node.names:  # ``from .inspect import vmdk``: the submodule, if it is one
                    sub = f"{module}.{alias.name}"
                    targets.add(sub if sub in found else known(module))
        for target in list(targets):
            parts = target.split(".")
            for depth in range(2, len(parts)):  # the packages the import runs on the way
                parent = ".".join(parts[:depth])
                if not name.startswith(parent + "."):
                    targets.add(parent)
        targets.discard(name)
        targets.discard(top)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_v2p_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE)
    assert "v2p.targets.proxmox" in graph and "v2p.inspect" in graph  # the walk found the package
    assert cycles(graph) == []


def test_the_graph_sees_function_local_and_package_imports(tmp_path: Path) -> None:
    """The checker finds the two kinds of cycle v2p had: one through an import inside a function
    (``inspect -> convert -> inspect.model``, the package running first) and one under TYPE_CHECKING."""
    pkg = tmp_path / "v2p"
    (pkg / "inspect").mkdir(parents=True)
    (pkg / "targets").mkdir()
    (pkg / "__init__.py").write_text("from . import convert\n")
    (pkg / "convert.py").write_text("from .inspect.model import DiskImage\n")
    (pkg / "inspect" / "__init__.py").write_text("def f():\n    from ..convert import qemu_source\n")
    (pkg / "inspect" / "model.py").write_text("DiskImage = object\n")
    (pkg / "inspect" / "vmdk.py").write_text("from .model import DiskImage\n")  # a sibling: no cycle
    (pkg / "targets" / "__init__.py").write_text("")
    (pkg / "targets" / "proxmox.py").write_text("from .pve_node import OnNodeSink\n")
    (pkg / "targets" / "pve_node.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .proxmox import ProxmoxTarget\n")
    assert sorted(cycles(import_graph(pkg))) == [["v2p.convert", "v2p.inspect"],
                                         ["v2p.targets.proxmox", "v2p.targets.pve_node"]]
