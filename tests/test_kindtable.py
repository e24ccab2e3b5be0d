"""The one table both kinds registries are: a name registered once, a URI's kind found by its scheme."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from v2p import sources
from v2p.kindtable import KindTable, scheme_of
from v2p.targets import factory, kinds


@dataclass(frozen=True)
class Kind:
    name: str
    schemes: tuple[str, ...] = ()


def test_a_name_is_registered_once_and_kinds_keep_their_order() -> None:
    table: KindTable[Kind] = KindTable("source")
    first, second = table.register(Kind("a", ("x",))), table.register(Kind("b", ("y", "z")))
    assert list(table) == ["a", "b"] and table["a"] is first
    with pytest.raises(ValueError, match="source kind 'a' is registered twice"):
        table.register(Kind("a"))
    assert table.by_scheme("z://host/path") is second and table.by_scheme("y:/not-a-uri") is None
    assert table.by_scheme("w://host") is None and table.by_scheme("/a/path") is None


def test_scheme_of() -> None:
    assert scheme_of("pve://root@pam@host/node") == "pve" and scheme_of("vsphere+x://vc") == "vsphere+x"
    assert scheme_of("local") is None and scheme_of("C:/x") is None and scheme_of("1x://y") is None


def test_sources_and_targets_share_it() -> None:
    assert isinstance(sources.KINDS, KindTable) and kinds.KINDS is factory.KINDS  # the kinds registered
    assert sources.register == sources.KINDS.register and kinds.register == kinds.KINDS.register
    with pytest.raises(ValueError, match="target kind 'local' is registered twice"):
        kinds.register(kinds.KINDS["local"])
