"""The table of target kinds: what names each (words, URL schemes, dict keys) and how it is built.

A kind's module makes one ``TargetKind`` and ``register``s it; ``v2p.targets.make_target`` and plan
checks look kinds up here and nowhere else. Not here: any kind's own code.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..kindtable import KindTable, scheme_of
from ..options import OptionError

if TYPE_CHECKING:
    from .base import Target


@dataclass(frozen=True)
class TargetOptions:
    """What a caller adds to a target's URL or dict: the local folder and acceleration (CLI
    ``--target-dir``/``--accel``), a secret given in code, and the environment that vouches for the URL
    (see ``make_target``)."""

    directory: str | os.PathLike[str] | None = None
    accel: str = "auto"
    secret: str | None = None
    env: Mapping[str, str] | None = None


def _no_refusal(url: str) -> str | None:
    return None


def _same(url: str) -> str:
    return url


@dataclass(frozen=True)
class TargetKind:
    """One kind of target, as the table knows it."""

    name: str  # a target dict's "kind": local, proxmox
    example: str  # how a user names one: "local", "pve://HOST/NODE"
    usage: str  # the same for --help, with what it is: "local (default: the embedded QEMU target)"
    dict_example: str  # the dict form: '{"kind": "local"}'
    from_url: Callable[[str, TargetOptions], Target]
    from_dict: Callable[[dict[str, Any], TargetOptions], Target]
    words: tuple[str, ...] = ()  # whole strings naming the kind ("local"; "pve": settings from elsewhere)
    schemes: tuple[str, ...] = ()  # URL schemes: ("pve",) for pve://...
    keys: tuple[str, ...] = ()  # a target dict's keys besides "kind"
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)  # a key's allowed values, if few
    # What a plan may not write in one of its URLs (a secret): the refusal's message, else None.
    refusal: Callable[[str], str | None] = _no_refusal
    # The URL going to the plan's ``node:`` (None: the one it names) and that node (``OptionError``: not
    # a node name); None: the kind has no nodes (``node:`` is refused).
    with_node: Callable[[str, str | None], tuple[str, str | None]] | None = None
    # What shares one VMID space with ``url`` (a PVE cluster, whichever node the URL names).
    cluster: Callable[[str], str] = _same

    def names(self, url: str) -> bool:
        """Whether ``url`` is one of this kind's."""
        return url in self.words or scheme_of(url) in self.schemes


KINDS: KindTable[TargetKind] = KindTable("target")  # by name, in the order registered (the first is the default)
register = KINDS.register


def kind_of(url: str) -> TargetKind | None:
    """The kind a target URL (or word) names; None: no kind knows it."""
    return next((kind for kind in KINDS.values() if kind.names(url)), None)


def target_keys() -> tuple[str, ...]:
    """Every key a target dict may hold, ``kind`` first."""
    return ("kind", *dict.fromkeys(key for kind in KINDS.values() for key in kind.keys))


def unknown_dict(name: object) -> OptionError:
    """A target dict naming no kind this table has (or missing what its kind needs)."""
    return OptionError(f"unknown target {name!r}",
                       hint="use " + " or ".join(kind.dict_example for kind in KINDS.values()))
