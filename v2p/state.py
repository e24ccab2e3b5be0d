"""The state file: one versioned JSON document per migration, written atomically.

Each stage's record says when it finished and what it produced. Writes go to a
temporary file, are fsynced and renamed over the old one, so a ``kill -9`` at
any moment leaves either the old state or the new, never a torn one. A lock
file (``flock``) keeps two runs off one VMID. Secrets never go in here: the
pipeline records paths, sizes, hashes and the VM config only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import LockedError, StateError, TargetError, V2PError
from .fsutil import (
    listdir_own,
    open_lock_file,
    own_dir,
    read_small,
    remove_entry,
    remove_stale_temporaries,
    write_atomic,
)
from .pveconfig import migration_tag

STATE_VERSION = 1
# A state file's name is its VMID: ASCII digits only (str.isdigit() also takes '²' and '١').
_VMID_NAME = re.compile(r"[1-9][0-9]{2,8}")

# What a field of a record may hold, for the checks on load.
FieldType = type | tuple[type, ...]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def vmid_of_name(stem: str) -> int | None:
    """The VMID a file called ``<stem>.json`` / ``<stem>.conf`` is for, or None for any other name."""
    return int(stem) if _VMID_NAME.fullmatch(stem) else None


class MigrationState:
    """The state of one migration (one VMID), backed by ``<dir>/<vmid><suffix>.json``.

    The driver dance keeps its own file (suffix ``.dance``) so that
    ``v2p dance`` can run it on a VM that v2p did not migrate.
    """

    def __init__(self, directory: Path, vmid: int, suffix: str = "") -> None:
        self.directory = directory
        self.vmid = vmid
        self.suffix = suffix
        self.path = directory / f"{vmid}{suffix}.json"
        self.data: dict[str, Any] = {}
        self.error: StateError | None = None  # set by list_states for a file that cannot be read
        self.text = ""  # what ``load`` read, kept for ``names`` when it is damaged

    def load(self) -> bool:
        """Read the file if there is one; return whether there was.

        Anything but what v2p writes (valid JSON of another shape, a record
        missing a field, a field of the wrong type) is a StateError naming the
        file, never a traceback later on.
        """
        try:
            raw = self.text = read_small(self.path).decode()
        except FileNotFoundError:
            return False
        except UnicodeDecodeError:
            raise self.damaged("it is not text") from None
        except TargetError as exc:  # not a plain file, too big, unreadable
            raise StateError(exc.message, hint=self.discard_hint) from None
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read state file: {exc.strerror}",
                             hint=self.discard_hint) from None
        try:
            data = json.loads(raw, parse_constant=_no_constant)
        except (json.JSONDecodeError, ValueError, RecursionError) as exc:
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            raise StateError(f"{self.path}: state file is not valid JSON ({msg})",
                             hint=self.discard_hint) from None
        if isinstance(data, dict) and type(data.get("version")) is int and data["version"] != STATE_VERSION:
            raise StateError(f"{self.path}: state file version {data['version']} is not {STATE_VERSION}",
                             hint="finish it with the v2p that wrote it, or discard it: "
                             f"v2p vm rm {self.vmid}")
        self._check(data)
        self.data = data
        return True

    def names(self, migration_id: str) -> bool:
        """Whether this is the record of migration ``migration_id``. A damaged record (which
        ``v2p vm rm`` must still be able to discard with its VM) is searched as text for the id:
        its ``migration_id`` field or the tag its recorded VM config carries. Anything but a regular
        file (a FIFO, a link, a folder) names no migration and is not opened."""
        try:
            if not stat.S_ISREG(os.lstat(self.path).st_mode):
                return False
        except OSError:
            return False
        try:
            return self.load() and self.data.get("migration_id") == migration_id
        except StateError:
            return (f'"migration_id": "{migration_id}"' in self.text
                    or f"({migration_tag(migration_id)})" in self.text)

    @property
    def discard_hint(self) -> str:
        return f"discard it (and the VM, if one was made) with: v2p vm rm {self.vmid}"

    def damaged(self, what: str) -> StateError:
        return StateError(f"{self.path}: state file is damaged: {what}", hint=self.discard_hint)

    def _check(self, data: object) -> None:
        if not isinstance(data, dict):
            raise self.damaged(f"expected a JSON object, found {_json_type(data)}")
        fields: dict[str, FieldType] = {"version": int, "vmid": int, "request": dict, "started_at": str,
                                        "stages": dict, "finished": bool}
        if not self.suffix:
            fields["migration_id"] = str
        check_fields(data, fields, "", self.damaged)
        check_fields(data, {"finished_at": str, "result": dict, "failed": dict}, "", self.damaged,
                     optional=True)
        if data["vmid"] != self.vmid:
            raise self.damaged(f"it is for VMID {data['vmid']}, not {self.vmid}")
        for name, record in data["stages"].items():
            where = f"stages.{name}."
            if not isinstance(record, dict):
                raise self.damaged(f"{where[:-1]} is {_json_type(record)}, not an object")
            check_fields(record, {"finished_at": str, "seconds": (int, float), "result": dict}, where,
                         self.damaged)

    def start(self, request: dict[str, Any], **extra: Any) -> None:
        """Write the first record, whole (a kill never leaves a half-made one)."""
        self.data = {"version": STATE_VERSION, "vmid": self.vmid, "request": request,
                     "started_at": now(), "stages": {}, "finished": False, **extra}
        self.save()

    @property
    def stages(self) -> dict[str, Any]:
        stages: dict[str, Any] = self.data.setdefault("stages", {})
        return stages

    def record(self, stage: str, result: dict[str, Any], *, seconds: float) -> None:
        self.stages[stage] = {"finished_at": now(), "seconds": round(seconds, 3), "result": result}
        self.data.pop("failed", None)
        if isinstance(self.data.get("progress"), dict) and self.data["progress"].get("stage") == stage:
            del self.data["progress"]  # the stage's record says all its checkpoint said
        self.save()

    def checkpoint(self, progress: dict[str, Any]) -> None:
        """Record how far an unfinished per-disk copy is (``progress``: ``stage``, ``disk``, ``done``,
        ``total`` and what its stage needs to resume): the one checkpoint of the migration, replaced by
        the next and dropped with the stage's record."""
        self.data["progress"] = progress
        self.save()

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=2) + "\n")

    def remove(self) -> None:
        """Remove the state file (and its temporaries) without reading it or following anything
        at its name; a folder with something in it there is left, with a TargetError saying so."""
        self.remove_temporaries()
        try:
            with own_dir(self.directory.parent, self.directory.name, create=False) as folder:
                remove_entry(folder, self.path.name, self.directory)
        except FileNotFoundError:
            return

    def remove_temporaries(self) -> None:
        """Temporary files of this state file left by a run killed mid-write (call under the VMID lock)."""
        remove_stale_temporaries(self.directory, self.path.name)


def check_fields(data: Mapping[str, Any], fields: Mapping[str, FieldType], where: str,
                 damaged: Any, *, optional: bool = False) -> None:
    """Raise ``damaged(what)`` unless each of ``fields`` is present in ``data`` with its type."""
    for key, kind in fields.items():
        if key not in data:
            if optional:
                continue
            raise damaged(f"{where}{key} is missing")
        value = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # JSON true/false are bools, and bool is an int in Python: keep them apart.
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            expected = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise damaged(f"{where}{key} is {_json_type(value)}, expected {expected}")
        if isinstance(value, float) and not math.isfinite(value):
            raise damaged(f"{where}{key} is not a finite number")


_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "a whole number",
               float: "a number", bool: "true/false"}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


class VmidLock:
    """An exclusive, non-blocking ``flock`` on ``<dir>/<vmid>.lock``; released when the process dies."""

    def __init__(self, directory: Path, vmid: int) -> None:
        self.path = directory / f"{vmid}.lock"
        self.vmid = vmid
        self._fd: int | None = None

    def __enter__(self) -> VmidLock:
        fd = open_lock_file(self.path)
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
    """Every migration state file in ``directory`` (by VMID); one that cannot be read carries its ``error``."""
    states: list[MigrationState] = []
    found = []
    for name in listdir_own(directory):
        vmid = vmid_of_name(name[:-len(".json")]) if name.endswith(".json") else None
        if vmid is not None:
            found.append(vmid)
    for vmid in sorted(found):
        state = MigrationState(directory, vmid)
        try:
            state.load()
        except StateError as exc:
            state.error = exc
        states.append(state)
    return states


class Leftovers:
    """What v2p made on a target and meant to delete, whose deletion failed (PVE answered 500, the
    node was away): ``<dir>/leftovers.json``, ``{volid: {"vmid", "error", "since"}}``. An entry stays
    until a retry finds the volume gone or deletes it; every run on the target and ``v2p status``
    retry (``Target.retry_leftovers``) and report what is still left. A leftover of a VMID another
    run holds is left to that run (it may have made a volume of the same name since)."""

    LIMIT = 1 << 20  # bytes: a list of volume ids, never more

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "leftovers.json"

    def add(self, volid: str, vmid: int, error: str) -> None:
        with self._locked():
            entries = self._read()
            entries[volid] = {"vmid": vmid, "error": error, "since": entries.get(volid, {}).get("since", now())}
            write_atomic(self.path, json.dumps(entries, indent=2) + "\n")

    def retry(self, delete: Callable[[str], None], *, holding: int | None = None) -> dict[str, dict[str, Any]]:
        """Call ``delete(volid)`` (which succeeds when the volume is gone already) for each leftover
        whose VMID is ``holding`` (the caller holds its lock) or free; return what is still left."""
        if not os.path.lexists(self.path):  # the usual case: nothing to lock, nothing made
            return {}
        with self._locked():
            entries = self._read()
            for volid, entry in list(entries.items()):
                try:
                    with contextlib.ExitStack() as held:
                        if entry["vmid"] != holding:
                            held.enter_context(VmidLock(self.directory, entry["vmid"]))
                        delete(volid)
                    del entries[volid]
                except LockedError:
                    continue
                except V2PError as exc:
                    entry["error"] = exc.message
            if entries:
                write_atomic(self.path, json.dumps(entries, indent=2) + "\n")
            else:
                with contextlib.suppress(OSError):  # gone already, or not v2p's list: nothing to keep
                    self.path.unlink()
            return entries

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = open_lock_file(self.directory / "leftovers.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for a few API calls at most
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict[str, dict[str, Any]]:
        """The entries; a file that is not what v2p writes counts as none (it is rewritten on the next
        add: a damaged list must not stop migrations)."""
        try:
            data = json.loads(read_small(self.path, limit=self.LIMIT) or b"{}")
        except (OSError, TargetError, ValueError, RecursionError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {volid: entry for volid, entry in data.items()
                if isinstance(entry, dict) and type(entry.get("vmid")) is int
                and isinstance(entry.get("error"), str) and isinstance(entry.get("since"), str)}
