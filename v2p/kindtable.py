"""A table of kinds, as ``sources`` and ``targets`` each keep one: by name, in the order registered,
a name registered once, a URI found by its scheme (``vsphere://...``, ``pve://...``).

Not for: what a kind is or does (``sources.SourceKind``, ``targets.kinds.TargetKind``).
"""

from __future__ import annotations

import re
from typing import Generic, Protocol, TypeVar

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


class Kind(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def schemes(self) -> tuple[str, ...]: ...


K = TypeVar("K", bound=Kind)


def scheme_of(text: str) -> str | None:
    """The scheme of a URI (``pve`` of ``pve://host/node``); None: ``text`` is no URI."""
    scheme = _SCHEME.match(text)
    return scheme.group(1) if scheme is not None else None


class KindTable(dict[str, K], Generic[K]):
    """Kinds by name, in the order registered."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what  # "source", "target": for the programming error below

    def register(self, kind: K) -> K:
        """Add ``kind`` to the table (a name already taken is a programming error)."""
        if kind.name in self:
            raise ValueError(f"{self.what} kind {kind.name!r} is registered twice")
        self[kind.name] = kind
        return kind

    def by_scheme(self, text: str) -> K | None:
        """The kind whose URI scheme ``text`` starts with; None: no URI, or a scheme no kind reads."""
        scheme = scheme_of(text)
        if scheme is None:
            return None
        return next((kind for kind in self.values() if scheme in kind.schemes), None)
