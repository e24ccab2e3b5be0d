"""Progress reporting: the pipeline emits ``Event``s, callers decide how to show them.

The CLI turns them into lines and a tqdm bar; a hosting panel can forward them
to its own UI. Nothing in the library prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """One thing that happened during a migration.

    ``kind`` is one of: ``stage-start``, ``stage-done``, ``stage-skip``,
    ``progress`` (``data['percent']``), ``warning``, ``info``.
    """

    kind: str
    stage: str
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


EventHandler = Callable[[Event], None]


def ignore(_event: Event) -> None:
    """The default handler: events go nowhere."""
