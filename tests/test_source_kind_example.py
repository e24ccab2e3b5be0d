"""The example source kind (tests/kinds/httpdisk.py) through the whole disk path: a disk served over
HTTP behind a cookie is migrated onto the local target like any other source, read once, its cookie
in no argv, log, state file or output, and its source closed however the run ends."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kinds.httpdisk import CLOSED, COOKIE_ENV, DiskServer

from conftest import one_line_error
from v2p import runner


@pytest.fixture
def served(samples: Path) -> Iterator[DiskServer]:
    with DiskServer(samples / "guest.raw", "session=" + secrets.token_hex(16)) as server:
        yield server


@pytest.fixture
def argvs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every argv v2p's runner starts, as it starts it."""
    seen: list[list[str]] = []
    started = runner._started

    def recording(argv: list[str], **popen: Any) -> Any:
        seen.append(list(argv))
        return started(argv, **popen)

    monkeypatch.setattr(runner, "_started", recording)
    return seen


@pytest.fixture
def debug_log() -> Iterator[list[str]]:
    """The runner's log lines at DEBUG (each argv it ran, its exit and stderr)."""
    lines: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("v2p.runner")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def files_holding(folder: Path, secret: bytes) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and secret in path.read_bytes()]


def test_a_disk_over_http_is_migrated_read_once_and_its_cookie_stays_secret(
        served: DiskServer, inproc: Any, samples: Path, tmp_path: Path, argvs: list[list[str]],
        debug_log: list[str]) -> None:
    proc = inproc("migrate", served.uri, "--vmid", "180", "--format", "raw", "--no-boot-check",
                  **{COOKIE_ENV: served.cookie})
    assert proc.returncode == 0, proc.stderr
    assert inproc.disk(180, "raw").read_bytes() == (samples / "guest.raw").read_bytes()
    # One read of the source: the copy, staged locally, is what convert and verify read.
    size = (samples / "guest.raw").stat().st_size
    assert served.overlaps() == [] and served.bytes_sent() <= size
    assert "fetch: reading disk 0 from the source" in proc.stdout + proc.stderr
    # The cookie went to qemu-img as a secret object in a file, never on a command line.
    value = served.cookie.removeprefix("session=")
    qemu = [argv for argv in argvs if any("testhttp-cookie" in arg for arg in argv)]
    assert qemu and all("--object" in argv for argv in qemu)
    for argv in argvs:
        assert not any(value in arg for arg in argv), argv
    assert debug_log and not any(value in line for line in debug_log)
    assert value not in proc.stdout + proc.stderr
    assert files_holding(tmp_path, value.encode()) == []  # the state file, the target's logs, the workdir
    objects = [arg for argv in qemu for arg in argv if arg.startswith("secret,")]
    assert objects and not any(Path(arg.partition("file=")[2]).exists() for arg in objects)  # removed after
    assert served.uri in CLOSED


def test_a_wrong_cookie_is_one_line_and_the_source_is_closed(served: DiskServer, inproc: Any) -> None:
    CLOSED.clear()
    line = one_line_error(inproc("migrate", served.uri, "--vmid", "181", "--format", "raw", "--no-boot-check",
                                 **{COOKIE_ENV: "session=wrong"}))
    assert "403" in line and "wrong" not in line
    assert served.refused and not served.ranges
    assert served.uri in CLOSED


def test_secrets_reach_qemu_img_in_private_files_removed_after() -> None:
    import stat

    from v2p.endpoint import DiskEndpoint, qemu_args

    with qemu_args(DiskEndpoint("raw", "x", secrets={"a": b"first-value", "b": b"second-value"})) as args:
        files = [Path(arg.partition("file=")[2]) for arg in args if arg.startswith("secret,")]
        assert args[0::2] == ["--object", "--object"] and len(files) == 2
        assert [path.read_bytes() for path in files] == [b"first-value", b"second-value"]
        assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in files)
        assert stat.S_IMODE(files[0].parent.stat().st_mode) == 0o700
        assert not any("value" in arg for arg in args)
    assert not files[0].parent.exists()
    with qemu_args(DiskEndpoint("raw", "x")) as none:
        assert none == []
