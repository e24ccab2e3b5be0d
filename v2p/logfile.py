"""A log file per migration and per plan run, in the target's state folder, so a failed night can be read.

``RunLog`` writes ``<state_dir>/logs/<vmid>-<UTC time>.log`` (``plan-<name>-<UTC time>.log`` for a plan
run): each line stamped with the UTC time, holding what ``-v`` shows (the library's DEBUG records: every
command run, its argv, exit status and seconds) and whatever its caller writes to ``stream`` (the CLI
writes the event lines there, and progress every few seconds). The folder is v2p's own (``fsutil``: 0700,
never through a link), each file new and 0600. Every secret v2p has read in this process
(``credentials.secrets_seen``) is masked in every line, should one ever reach a message.

The library writes no log file unless asked: the CLI opens one for ``migrate`` and ``plan run``; a
library user who wants the same opens a ``RunLog`` around the run (its records are the ``v2p`` logger's,
which a caller may also route anywhere with ``logging``). Not for: what the lines say (``cli``).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import re
import threading
from pathlib import Path
from types import TracebackType
from typing import TextIO

from .credentials import secrets_seen
from .fsutil import create_exclusive, own_dir

LOGS = "logs"  # under the target's state folder
KEEP = 20  # logs kept per VMID (per plan): the newest
MASK = "***"
FORMAT = "v2p: %(levelname)s: %(name)s: %(message)s"  # as -v shows them on stderr


def log_name(what: str, *, now: datetime.datetime | None = None) -> str:
    """``<what>-20261207T174924Z.log``; ``what`` reduced to letters, digits, ``.``, ``_`` and ``-``."""
    when = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{_stem(what)}-{when}.log"


def _stem(what: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", what).strip(".") or "run"


class _Lines(io.TextIOBase):
    """A text stream onto the log: each whole line stamped, secrets masked, written at once; held in memory
    until the log is kept (``RunLog.keep``), dropped if it never is."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.held: list[str] = []
        self.pending = ""
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self.lock:
            self.pending += text
            *whole, self.pending = self.pending.split("\n")
            if whole:
                stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                self._out("".join(f"{stamp} {_masked(line)}\n" for line in whole))
        return len(text)

    def _out(self, text: str) -> None:
        if self.fd is None:
            self.held.append(text)
        else:
            os.write(self.fd, text.encode(errors="replace"))

    def start(self, fd: int) -> None:
        with self.lock:
            self.fd = fd
            held, self.held = "".join(self.held), []
            os.write(fd, held.encode(errors="replace"))

    def close(self) -> None:
        with self.lock:
            if self.pending:
                self._out(_masked(self.pending) + "\n")
                self.pending = ""
            self.held = []
        super().close()


def _masked(line: str) -> str:
    for secret in secrets_seen():
        line = line.replace(secret, MASK)
    return line


class RunLog:
    """One run's log file; a context that routes the ``v2p`` logger's DEBUG records into it meanwhile.

    Nothing is written until ``keep()``: a run refused before it makes anything (a bad input, a rule) says
    so in one line and leaves no file; the CLI keeps the log once a stage after the preflight starts."""

    def __init__(self, state_dir: Path, what: str) -> None:
        self.state_dir, self.what = state_dir, what
        self.path: Path | None = None  # once kept
        self.fd: int | None = None
        self.stream: TextIO = _Lines()  # type: ignore[assignment]
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(logging.Formatter(FORMAT))
        self.handler.setLevel(logging.DEBUG)
        self._level = logging.NOTSET

    def keep(self) -> Path:
        """Make the file (with what was written so far) and write on into it; its path."""
        if self.path is not None:
            return self.path
        with own_dir(self.state_dir.parent, self.state_dir.name, LOGS) as folder:
            name = log_name(self.what)
            for attempt in range(1, 100):
                try:
                    self.fd = create_exclusive(folder, name)[1]
                    break
                except FileExistsError:  # two runs of it in one second
                    name = log_name(f"{self.what}.{attempt}")
            else:
                raise FileExistsError(self.state_dir / LOGS / name)
            _prune(folder, self.what, keep=name)
        self.path = self.state_dir / LOGS / name
        self.stream.start(self.fd)  # type: ignore[attr-defined]
        return self.path

    def follow(self, what: str) -> None:
        """The run is about ``what`` now (a ``vmid: auto`` migration that found its VMID taken at create and
        moved on to the next): a kept file takes its name, keeping its time (a link then an unlink in the
        folder: a file already there under that name is left alone, and so is this one's name)."""
        if _stem(what) == _stem(self.what):
            return
        old, self.what = self.what, what
        if self.path is None:
            return
        name = _stem(what) + self.path.name[len(_stem(old)):]
        with own_dir(self.state_dir.parent, self.state_dir.name, LOGS) as folder:
            try:
                os.link(self.path.name, name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
            except FileExistsError:
                return
            os.unlink(self.path.name, dir_fd=folder)
        self.path = self.path.with_name(name)

    def __enter__(self) -> RunLog:
        logger = logging.getLogger("v2p")
        self._level = logger.level
        logger.addHandler(self.handler)
        logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            self.stream.write(f"v2p: ended by {type(exc).__name__}: {exc}\n")
        logger = logging.getLogger("v2p")
        logger.removeHandler(self.handler)
        if not any(handler.level <= logging.DEBUG for handler in logger.handlers):
            logger.setLevel(self._level)
        self.stream.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _prune(folder: int, what: str, *, keep: str) -> None:
    """Leave the KEEP newest logs of ``what`` (their names sort by time): a VM migrated again and again, or
    a plan run every night, must not fill the state folder."""
    pattern = re.compile(re.escape(_stem(what)) + r"(\.\d+)?-\d{8}T\d{6}Z\.log")
    mine = sorted((name for name in os.listdir(folder) if pattern.fullmatch(name)),
                  key=lambda name: name.rsplit("-", 1)[1])
    for name in mine[:-KEEP]:
        if name != keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=folder)
