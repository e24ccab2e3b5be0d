"""Making a target from what a user wrote: ``make_target`` looks the kind up in the table (``kinds``),
after the built-in kinds (``kind_local``, ``kind_pve``) have registered themselves. The CLI, plans
and the library all build targets here.

Not here: the table itself (``kinds``), any kind's own code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..errors import shown
from ..options import OptionError, check_text
from . import kind_local, kind_pve  # the built-in kinds: each registers itself on import
from .base import Target
from .kinds import KINDS, TargetKind, TargetOptions, kind_of, register, target_keys, unknown_dict

__all__ = ["KINDS", "Target", "TargetKind", "TargetOptions", "check_target_spec", "kind_of", "kind_local", "kind_pve",
           "make_target", "register", "target_keys"]


def _examples() -> str:
    return " or ".join(kind.example for kind in KINDS.values())


def check_target_spec(where: object) -> None:
    """What ``make_target`` takes, by type: a wrong one is an ``OptionError`` naming ``target``."""
    if where is not None and not isinstance(where, (str, dict)):
        raise OptionError(f"target={shown(where)}: must be \"local\", a pve:// URL, a dict such as "
                          '{"kind": "local", "dir": ...}, or a Target')
    if isinstance(where, str):
        check_text("--target", where)
    if isinstance(where, dict):
        keys = target_keys()
        for key, value in where.items():
            if key not in keys:
                raise OptionError(f"target: unknown key {shown(key)}", hint="a target dict has " + ", ".join(keys))
            if key == "dir":
                check_text("target: dir", value)
            elif not isinstance(value, str):
                raise OptionError(f"target: {key}={shown(value)}: must be text")


def make_target(where: str | dict[str, Any] | None = None, *, directory: str | os.PathLike[str] | None = None,
                accel: str = "auto", secret: str | None = None, env: Mapping[str, str] | None = None) -> Target:
    """A target from a URL or a dict: ``None``/``"local"``/``{"kind": "local", "dir": ...}`` is the embedded
    QEMU target, ``"pve://[user@realm[!token]@]host[:port]/node?storage=..."`` a Proxmox VE node.

    A PVE secret never comes from the URL. It is ``secret`` when given; else ``$V2P_PVE_TOKEN`` /
    ``$V2P_PVE_PASSWORD`` or the secrets file, sent only to the host the environment configures
    (``$V2P_PVE_HOST`` or pve.conf): a URL naming any other is refused. ``env`` (``os.environ`` from the
    CLI and plans, whose URLs are the operator's own) vouches for the URL: that environment's secret goes
    to whatever host it names. Never pass ``env`` for a URL a client sent."""
    check_target_spec(where)
    options = TargetOptions(directory, accel, secret, env)
    if isinstance(where, dict):
        settings = dict(where)
        name = settings.pop("kind", next(iter(KINDS)))
        if name not in KINDS:
            raise unknown_dict(name)
        return KINDS[name].from_dict(settings, options)
    url = where if where is not None else next(iter(KINDS.values())).words[0]
    kind = kind_of(url)
    if kind is None:
        raise OptionError(f"--target {url!r}: not a target v2p knows", hint=f"use {_examples()}")
    return kind.from_url(url, options)

