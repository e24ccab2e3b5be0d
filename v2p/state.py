"""The state file: one versioned JSON document per migration, written atomically.

Each stage's record says when it finished and what it produced. Writes go to a
temporary file, are fsynced and renamed over the old one, so a ``kill -9`` at
any moment leaves either the old state or the new, never a torn one. A lock
file (``flock``) keeps two runs off one VMID. Secrets never go in here: the
pipeline records paths, sizes, hashes and the VM config only.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from .errors import LockedError, StateError

STATE_VERSION = 1


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class MigrationState:
    """The state of one migration (one VMID), backed by ``<dir>/<vmid><suffix>.json``.

    The driver dance keeps its own file (suffix ``.dance``) so that
    ``v2p dance`` can run it on a VM that v2p did not migrate.
    """

    def __init__(self, directory: Path, vmid: int, suffix: str = "") -> None:
        self.directory = directory
        self.vmid = vmid
        self.path = directory / f"{vmid}{suffix}.json"
        self.data: dict[str, Any] = {}

    def load(self) -> bool:
        """Read the file if there is one; return whether there was."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read state file: {exc.strerror}") from None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise StateError(f"{self.path}: state file is not valid JSON ({exc.msg})",
                             hint="remove it to start this migration over") from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            version = data.get("version") if isinstance(data, dict) else "?"
            raise StateError(f"{self.path}: state file version {version} is not {STATE_VERSION}",
                             hint="finish it with the v2p that wrote it")
        self.data = data
        return True

    def start(self, request: dict[str, Any]) -> None:
        self.data = {"version": STATE_VERSION, "vmid": self.vmid, "request": request,
                     "started_at": now(), "stages": {}, "finished": False}
        self.save()

    @property
    def stages(self) -> dict[str, Any]:
        stages: dict[str, Any] = self.data.setdefault("stages", {})
        return stages

    def record(self, stage: str, result: dict[str, Any], *, seconds: float) -> None:
        self.stages[stage] = {"finished_at": now(), "seconds": round(seconds, 3), "result": result}
        self.save()

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as handle:
            json.dump(self.data, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class VmidLock:
    """An exclusive, non-blocking ``flock`` on ``<dir>/<vmid>.lock``; released when the process dies."""

    def __init__(self, directory: Path, vmid: int) -> None:
        self.path = directory / f"{vmid}.lock"
        self.vmid = vmid
        self._fd: int | None = None

    def __enter__(self) -> VmidLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(f"VMID {self.vmid} is locked by another v2p run ({self.path})",
                              hint="wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def list_states(directory: Path) -> list[MigrationState]:
    states = []
    for path in sorted(directory.glob("*.json"), key=lambda p: (len(p.stem), p.stem)):
        if path.stem.isdigit():
            state = MigrationState(directory, int(path.stem))
            state.load()
            states.append(state)
    return states
