"""Event kinds: one typed list (``EventKind``), each documented, every kind v2p emits in it."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path
from typing import get_args

import pytest

import v2p
from v2p.events import EVENT_KINDS, PLAN_KINDS, STAGE_KINDS, Event, EventKind

SOURCES = sorted(Path(v2p.__file__).parent.rglob("*.py"))


def emitted_kinds() -> set[str]:
    """The kinds v2p's own code writes as the first argument of ``Event(...)`` or of the dance's ``_say``,
    and ``progress`` where it calls ``Event.progress(...)``."""
    found: set[str] = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id == "Event" and node.func.attr == "progress":
                found.add("progress")
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            args = node.args if name == "Event" else node.args[1:] if name == "_say" else []
            if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                found.add(args[0].value)
    return found


def test_every_kind_emitted_is_a_kind_and_every_kind_is_emitted() -> None:
    assert emitted_kinds() == set(get_args(EventKind)) == EVENT_KINDS


def test_every_kind_is_documented() -> None:
    documented = set(re.findall(r"``([a-z]+(?:-[a-z]+)?)``", Event.__doc__ or ""))
    assert EVENT_KINDS <= documented, sorted(EVENT_KINDS - documented)
    assert STAGE_KINDS | PLAN_KINDS < EVENT_KINDS


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown event kind 'stage-end'"):
        Event("stage-end", "convert")  # type: ignore[arg-type]


def test_an_event_survives_the_plan_childs_json_line() -> None:
    """``v2p plan run``'s children send ``asdict`` as JSON; the parent makes the same Event of it."""
    event = Event("progress", "convert:1", data={"percent": 50}, vmid=120, disk=1, done=5, total=10)
    assert Event(**json.loads(json.dumps(dataclasses.asdict(event)))) == event
