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
MASK = "***"
FORMAT = "v2p: %(levelname)s: %(name)s: %(message)s"  # as -v shows them on stderr


def log_name(what: str, *, now: datetime.datetime | None = None) -> str:
    """``<what>-20261207T174924Z.log``; ``what`` reduced to letters, digits, ``.``, ``_`` and ``-``."""
    when = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', what).strip('.') or 'run'}-{when}.log"


class _Lines(io.TextIOBase):
    """A text stream onto the log's descriptor: each whole line stamped, secrets masked, written at once."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
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
                os.write(self.fd, "".join(f"{stamp} {_masked(line)}\n" for line in whole).encode(errors="replace"))
        return len(text)

    def close(self) -> None:
        with self.lock:
            if self.pending:
                os.write(self.fd, (_masked(self.pending) + "\n").encode(errors="replace"))
                self.pending = ""
        super().close()


def _masked(line: str) -> str:
    for secret in secrets_seen():
        line = line.replace(secret, MASK)
    return line


class RunLog:
    """One run's log file; a context that routes the ``v2p`` logger's DEBUG records into it meanwhile."""

    def __init__(self, state_dir: Path, what: str) -> None:
        with own_dir(state_dir.parent, state_dir.name, LOGS) as folder:
            name = log_name(what)
            for attempt in range(1, 100):
                try:
                    self.fd = create_exclusive(folder, name)[1]
                    break
                except FileExistsError:  # two runs in one second
                    name = log_name(f"{what}.{attempt}")
            else:
                raise FileExistsError(state_dir / LOGS / name)
        self.path = state_dir / LOGS / name
        self.stream: TextIO = _Lines(self.fd)  # type: ignore[assignment]
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(logging.Formatter(FORMAT))
        self.handler.setLevel(logging.DEBUG)
        self._level = logging.NOTSET

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
        os.close(self.fd)
