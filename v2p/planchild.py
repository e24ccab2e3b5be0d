"""The child processes of a plan run and the lines between them and the parent.

The parent's end (``Children``): start ``python -m v2p.planchild`` with its one job as a JSON line on stdin
(never argv: ``ps`` shows argv to every user, and a target URL or an option may carry what must not show
there), keep stdin open (its end of file tells the child the parent is gone), read every child's stdout and
stderr through one selector, hand each JSON line on and keep the tail of the rest. The child's end
(``child_main``): run the job, write each ``Event`` as one JSON line with the VMID added, then a last
``result``, ``error`` or ``interrupted`` line; its exit code is the CLI's.

Not for: what the lines mean to the run (``planrun``: results, retries) nor which VM starts when
(``planschedule``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from . import api, interrupts
from .boot_outcomes import BootFailed, boot_exit_code
from .errors import BootCheckError, V2PError
from .eventlines import logged
from .events import Event
from .logfile import RunLog
from .targets.base import BOOT_FAILED

STDERR_TAIL = 20  # lines of a child's stderr kept for the report when it dies without an error line
EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(Event))


@dataclass
class Child:
    index: int
    proc: subprocess.Popen[bytes]
    started: float
    buffers: dict[int, bytes] = field(default_factory=dict)
    open_fds: set[int] = field(default_factory=set)
    last: dict[str, Any] | None = None  # the result/error/interrupted line
    stderr: list[str] = field(default_factory=list)


class Children:
    """The parent's end: one selector over every child's stdout and stderr. ``on_message(child, message)``
    gets each JSON object a child writes on stdout; other lines are kept in ``child.stderr`` (its tail)."""

    def __init__(self, on_message: Callable[[Child, dict[str, Any]], None]) -> None:
        self.on_message = on_message
        self.selector = selectors.DefaultSelector()

    def spawn(self, index: int, job: dict[str, Any]) -> Child:
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (package_root, env.get("PYTHONPATH"))))
        # A session of its own: a Ctrl-C on the terminal reaches the parent only, which passes it on, so
        # every child is stopped in one way whether the parent got SIGINT, SIGTERM or its stop flag.
        proc = subprocess.Popen([sys.executable, "-m", "v2p.planchild"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        child = Child(index, proc, time.monotonic())
        try:
            proc.stdin.write(json.dumps(job).encode() + b"\n")
            proc.stdin.flush()  # kept open: its end of file tells the child that the parent is gone
        except BrokenPipeError:
            pass  # it died at once: its stderr says why
        for stream in (proc.stdout, proc.stderr):
            os.set_blocking(stream.fileno(), False)
            self.selector.register(stream, selectors.EVENT_READ, child)
            child.open_fds.add(stream.fileno())
        return child

    def wait(self, timeout: float) -> None:
        """Read what the children wrote within ``timeout`` seconds."""
        for key, _mask in self.selector.select(timeout=timeout):
            self._read(key.data, key.fd)

    def reap(self, child: Child) -> int:
        """The exit status of a child whose stdout and stderr have ended (128 + N: killed by signal N)."""
        code = child.proc.wait()
        assert child.proc.stdin is not None
        with contextlib.suppress(OSError):
            child.proc.stdin.close()
        if code < 0:  # killed by a signal, not stopped by one
            code = 128 - code
        return code

    def close(self) -> None:
        self.selector.close()

    def _read(self, child: Child, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(fd)
            child.open_fds.discard(fd)
            rest = child.buffers.pop(fd, b"")
            if rest:
                self._line(child, fd, rest)
            return
        lines = (child.buffers.get(fd, b"") + data).split(b"\n")
        child.buffers[fd] = lines.pop()
        for line in lines:
            self._line(child, fd, line)

    def _line(self, child: Child, fd: int, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip("\r")
        assert child.proc.stdout is not None
        if fd != child.proc.stdout.fileno():
            if text.strip():
                child.stderr = [*child.stderr[-(STDERR_TAIL - 1):], text]
            return
        try:
            message = json.loads(text)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            child.stderr = [*child.stderr[-(STDERR_TAIL - 1):], text]
            return
        self.on_message(child, message)


def event_of(message: dict[str, Any]) -> Event:
    """The ``Event`` a child sent as ``message`` (it sends every field: ``asdict``), whatever this Event has."""
    given = {name: message[name] for name in EVENT_FIELDS if name in message}
    return Event(**{**given, "kind": str(message["kind"]), "stage": str(message.get("stage", "")),
                    "message": str(message.get("message", "")), "data": dict(message.get("data") or {})})


# -- the child ---------------------------------------------------------------------------------------------

class _Lines:
    """The child's stdout: one JSON object a line; once the parent is gone, nothing (not an error)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.gone = False
        self.lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        with self.lock:
            if self.gone:
                return
            try:
                self.stream.write(json.dumps(message, default=str) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                self.gone = True


def _watch_parent() -> None:
    """Stop the migration as Ctrl-C does once stdin ends: the parent is gone (however it died)."""
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGINT)


def child_main() -> int:
    """``python -m v2p.planrun``: run one job read from stdin; events and the outcome as JSON lines."""
    interrupts.install()
    out = _Lines(sys.stdout)
    line = sys.stdin.readline()
    if not line:
        return 1  # the parent went before it could say what to do
    migration: api.Migration | None = None
    log: RunLog | None = None
    to_log: Callable[[Event], None] | None = None

    def emit(event: Event) -> None:
        sent = dataclasses.asdict(event)
        sent["vmid"] = migration.vmid if migration is not None else sent.get("vmid")
        out.send(sent)
        if to_log is not None:
            to_log(event)

    def its_log() -> dict[str, Any]:
        return {"log": str(log.path)} if log is not None and log.path is not None else {}

    try:
        job = json.loads(line)
        threading.Thread(target=_watch_parent, name="v2p-parent-watch", daemon=True).start()
        target = api.make_target(job["target"], accel=job.get("accel", "auto"), env=os.environ)
        migration = api.Migration(job["source"], job["vmid"], target=target, on_event=emit, **job["options"])
        if job.get("log"):  # as v2p migrate keeps one (eventlines.logged); its warning goes to the stderr tail
            log = RunLog(target.state_dir(), str(migration.vmid))
            to_log = logged(log, lambda line: print(line, file=sys.stderr, flush=True))
        with log or contextlib.nullcontext():
            result = migration.run()
        out.send({"vmid": migration.vmid, "result": {"nothing_to_do": bool(result.get("nothing_to_do")),
                                                     "finished_at": result.get("finished_at"),
                                                     "boot": result["boot"], "boot_signal": result["boot_signal"]},
                  **its_log()})
        return boot_exit_code(result["boot"])
    except V2PError as exc:
        failed: dict[str, Any] = {}
        if isinstance(exc, BootCheckError):
            seen = exc.record.get("signal") if isinstance(exc, BootFailed) else None
            failed = {"boot": BOOT_FAILED, "boot_signal": str(seen or exc.message)}
        out.send({"vmid": migration.vmid if migration is not None else None, "error": exc.message,
                  "hint": exc.hint, "text": str(exc), "type": type(exc).__name__, "exit_code": exc.exit_code,
                  "notes": list(getattr(exc, "__notes__", ())), **failed, **its_log()})
        return exc.exit_code
    except KeyboardInterrupt:
        signum = interrupts.received() or signal.SIGINT
        out.send({"vmid": migration.vmid if migration is not None else None, "interrupted": signum, **its_log()})
        return 128 + signum
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a path unusable, a job not as written above
        where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        out.send({"vmid": migration.vmid if migration is not None else None, "error": f"{where}{text}",
                  "text": f"{where}{text}", "type": type(exc).__name__, "exit_code": 1, **its_log()})
        return 1


if __name__ == "__main__":
    sys.exit(child_main())
