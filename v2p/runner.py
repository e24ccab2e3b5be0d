"""The one way v2p runs external programs.

Argv lists only (never a shell string), a timeout on every call, stderr
captured and turned into a ``ToolError`` that keeps the program's own message.
Every call is logged on the ``v2p.runner`` logger at DEBUG: its argv, exit
status and duration (``record.argv``, ``record.returncode``, ``record.seconds``).

Children get SIGKILL when v2p dies: each program is started through
``setpriv --pdeathsig KILL`` (util-linux), which sets the parent-death signal
and then execs the program in its place, so a ``kill -9`` of v2p never leaves a
``qemu-img`` writing behind the back of the next run. Not ``preexec_fn``: code
between fork and exec is unsafe when other threads run (a panel's migrations
in threads). The signal fires when the *thread* that started the program ends;
the calls below wait for their program in that thread, so that is never early.

A migration cancelled from another thread (``interrupts.CancelToken``) kills
the program it is waiting for at once; the call then raises ``Cancelled``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO

from . import interrupts
from .errors import ToolError

log = logging.getLogger(__name__)

INSTALL_HINTS = {
    "qemu-img": "install it: apt-get install qemu-utils",
    "qemu-system-x86_64": "install it: apt-get install qemu-system-x86",
    "nasm": "install it: apt-get install nasm",
    "setpriv": "install it: apt-get install util-linux",
}


# What ``qemu-img ... -p`` prints as it goes ("    (12.34/100%)"), the percent as group 1.
QEMU_IMG_PERCENT = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")

def _tethered(argv: list[str]) -> list[str]:
    """``argv`` run so that it dies with the thread that starts it (see the module docstring)."""
    return [which("setpriv"), "--pdeathsig", "KILL", "--", *argv]


@contextmanager
def _started(argv: list[str], **popen: object) -> Iterator[subprocess.Popen[bytes]]:
    """Popen of ``argv`` (already resolved), killed on cancel, on any exception, and logged at the end."""
    started = time.monotonic()
    popen.setdefault("stdin", subprocess.DEVNULL)
    proc: subprocess.Popen[bytes] = subprocess.Popen(_tethered(argv), **popen)  # type: ignore[call-overload]
    try:
        with interrupts.on_cancel(proc.kill):
            yield proc
    except BaseException:
        proc.kill()
        raise
    finally:
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        seconds = time.monotonic() - started
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: exit %s after %.3fs", shlex.join(argv), proc.returncode, seconds,
                      extra={"argv": list(argv), "returncode": proc.returncode, "seconds": seconds})


def which(program: str) -> str:
    """Absolute path of ``program``, or a ToolError saying how to install it."""
    path = shutil.which(program)
    if path is None:
        raise ToolError(f"{program} not found on PATH", hint=INSTALL_HINTS.get(program))
    return path


def _fail(argv: Sequence[str], what: str, stderr: str) -> ToolError:
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    detail = lines[-1] if lines else "no message"
    return ToolError(f"{argv[0]} {what}: {detail}")


def run(argv: Sequence[str], *, timeout: float, check: bool = True,
        input: str | None = None,  # noqa: A002 - subprocess.run's name
        pass_fds: Sequence[int] = ()) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion (``input`` on its stdin, else nothing); raise ToolError on timeout
    or (if ``check``) non-zero exit, ``Cancelled`` if this thread's migration is cancelled meanwhile.
    ``pass_fds``: open files the program gets under the same numbers (``/dev/fd/N``)."""
    interrupts.check()
    argv = [which(argv[0]), *argv[1:]]
    stdin = subprocess.PIPE if input is not None else subprocess.DEVNULL
    with _started(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  pass_fds=tuple(pass_fds)) as proc:
        try:
            out, err = proc.communicate(input.encode() if input is not None else None, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            raise ToolError(f"{argv[0]} timed out after {timeout:g}s",
                            hint="the input may be corrupt or absurdly large") from exc
    interrupts.check()  # killed because the migration was cancelled: that, not its exit status
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if check and proc.returncode != 0:
        raise _fail(argv, f"failed (exit {proc.returncode})", stderr)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def run_streaming(
    argv: Sequence[str], *, timeout: float, on_chunk: Callable[[str], None], stream: str = "stdout",
    pass_fds: Sequence[int] = (), watch: Callable[[int | None], None] | None = None,
) -> None:
    """Run ``argv``, feeding each piece of its ``stream`` (split on CR or LF) to ``on_chunk``.

    The other stream is kept for the error message; ``pass_fds`` as for ``run``. ``watch`` gets the
    program's pid once it runs, and None once it has ended but before it is reaped, so that what the
    kernel counted for it (``/proc/PID/io``) can still be read by that pid then.
    """
    interrupts.check()
    argv = [which(argv[0]), *argv[1:]]
    with _started(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=tuple(pass_fds)) as proc:
        if watch is not None:
            watch(proc.pid)
        watched, other = (proc.stdout, proc.stderr) if stream == "stdout" else (proc.stderr, proc.stdout)
        errbuf: list[str] = []
        seen: list[str] = []
        reader = threading.Thread(target=lambda: errbuf.append(_read_all(other)), daemon=True)
        reader.start()
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout, expire)
        timer.start()
        try:
            assert watched is not None
            piece = b""
            while data := os.read(watched.fileno(), 4096):
                for char in data:
                    if char in b"\r\n":
                        if piece:
                            text = piece.decode(errors="replace")
                            seen.append(text)
                            on_chunk(text)
                        piece = b""
                    else:
                        piece += bytes((char,))
            if watch is not None:
                with contextlib.suppress(ChildProcessError):  # reaped already (by a kill's poll): nothing to read
                    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # ended, not reaped: its pid still counts
                watch(None)
            rc = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            reader.join()
    interrupts.check()  # killed because the migration was cancelled: that, not its exit status
    if timed_out.is_set():
        raise ToolError(f"{argv[0]} timed out after {timeout:g}s")
    if rc != 0:
        message = (errbuf[0] if errbuf else "") if stream == "stdout" else "\n".join(seen[-5:])
        raise _fail(argv, f"failed (exit {rc})", message)


def _read_all(stream: IO[bytes] | None) -> str:
    return stream.read().decode(errors="replace") if stream is not None else ""
