"""The ``pve`` pytest fixture: a running simulator in the test's tmp_path, stopped (with
any QEMU it runs) at the end. Use it with ``from pve_sim.fixture import pve_fixture  # noqa: F401``."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .schema import SchemaNotFound, schema_candidates
from .server import PVESim


def start_or_skip(root: Path, **options: Any) -> PVESim:
    """A simulator (not started: use it as a context manager, or ``.start()``); the test is skipped,
    saying where to put it, when the PVE API schema is nowhere to be found (../shared/pve/README.md).
    Where a run must not skip them (``.ci/run`` sets ``V2P_REQUIRE_PVE_SCHEMA=1``), it fails instead."""
    try:
        return PVESim(root, **options)
    except SchemaNotFound:
        message = f"no PVE API schema: put apidoc.json at {schema_candidates()[-3]} or set V2P_PVE_SCHEMA"
        if os.environ.get("V2P_REQUIRE_PVE_SCHEMA"):
            pytest.fail(message + " (V2P_REQUIRE_PVE_SCHEMA is set: PVE tests may not be skipped)")
        pytest.skip(message)


@pytest.fixture(name="pve")
def pve_fixture(tmp_path: Path) -> Iterator[PVESim]:
    with start_or_skip(tmp_path / "pve", login_delay=0.3) as sim:
        yield sim


TOKEN_USER = "root@pam!v2p"  # the simulator's root API token


def pve_url(sim: PVESim, user: str = TOKEN_USER) -> str:
    """The ``--target`` of the simulator's node, its ``local`` storage, its certificate pinned."""
    return f"pve://{user}@{sim.host}/{sim.cluster.node}?storage=local&fingerprint={sim.fingerprint}"


def on_pve(v2p: Any, sim: PVESim, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``v2p`` command (conftest's ``V2P``) against the simulator with its root token."""
    result: subprocess.CompletedProcess[str] = v2p("--target", pve_url(sim), *args,
                                                   V2P_PVE_TOKEN=sim.tokens[TOKEN_USER],
                                                   XDG_DATA_HOME=str(tmp_path / "xdg"))
    return result
