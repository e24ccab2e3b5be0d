"""The one way v2p runs external programs.

Argv lists only (never a shell string), a timeout on every call, stderr
captured and turned into a ``ToolError`` that keeps the program's own message.
Children get SIGKILL when v2p dies (``PR_SET_PDEATHSIG``), so a ``kill -9`` of
v2p never leaves a ``qemu-img`` writing behind the back of the next run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import IO

from .errors import ToolError

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

INSTALL_HINTS = {
    "qemu-img": "install it: apt-get install qemu-utils",
    "qemu-system-x86_64": "install it: apt-get install qemu-system-x86",
    "nasm": "install it: apt-get install nasm",
}


def _die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


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


def run(argv: Sequence[str], *, timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion; raise ToolError on timeout or (if ``check``) non-zero exit."""
    argv = [which(argv[0]), *argv[1:]]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"{argv[0]} timed out after {timeout:g}s",
                        hint="the input may be corrupt or absurdly large") from exc
    if check and proc.returncode != 0:
        raise _fail(argv, f"failed (exit {proc.returncode})", proc.stderr)
    return proc


def run_streaming(
    argv: Sequence[str], *, timeout: float, on_chunk: Callable[[str], None], stream: str = "stdout",
) -> None:
    """Run ``argv``, feeding each piece of its ``stream`` (split on CR or LF) to ``on_chunk``.

    The other stream is kept for the error message.
    """
    argv = [which(argv[0]), *argv[1:]]
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    ) as proc:
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
            rc = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
        reader.join()
    if timed_out.is_set():
        raise ToolError(f"{argv[0]} timed out after {timeout:g}s")
    if rc != 0:
        message = (errbuf[0] if errbuf else "") if stream == "stdout" else "\n".join(seen[-5:])
        raise _fail(argv, f"failed (exit {rc})", message)


def _read_all(stream: IO[bytes] | None) -> str:
    return stream.read().decode(errors="replace") if stream is not None else ""
