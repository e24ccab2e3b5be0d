"""The ``pve`` pytest fixture: a running simulator in the test's tmp_path, stopped (with
any QEMU it runs) at the end. Use it with ``from pve_sim.fixture import pve_fixture  # noqa: F401``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .schema import SchemaNotFound, schema_candidates
from .server import PVESim


@pytest.fixture(name="pve")
def pve_fixture(tmp_path: Path) -> Iterator[PVESim]:
    try:
        sim = PVESim(tmp_path / "pve", login_delay=0.3)
    except SchemaNotFound:
        pytest.skip(f"no PVE API schema: put apidoc.json at {schema_candidates()[-3]} or set V2P_PVE_SCHEMA")
    with sim:
        yield sim
