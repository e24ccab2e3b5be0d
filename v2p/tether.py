"""Long-lived programs (QEMU) that die with v2p unless released.

A VM that v2p boots for itself (the boot check, the driver dance's boots)
must not outlive v2p, however v2p dies: SIGKILL, SIGTERM, SIGINT, to v2p or
to its whole process group. A VM the user asked to keep (``vm start``,
``--start``, a dance waiting for the operator) must. So QEMU is not v2p's
child: it is started by a small tether process (this file, run as a script
by the same Python) that

* sits in its own session, so a signal to v2p's process group reaches
  neither it nor QEMU;
* reads a pipe whose only writer is v2p: the kernel closes it when v2p dies,
  however it dies, and on that end-of-file the tether SIGKILLs QEMU;
* on the word ``release`` exits at once, leaving QEMU to init for good;
* exits with QEMU's own status when QEMU exits first.

Why not ``PR_SET_PDEATHSIG`` on QEMU: it fires when the *thread* that forked
it ends, it cannot be taken back to release a VM, and setting it needs a
``preexec_fn``, which is unsafe in a threaded program. The tether needs no
code between fork and exec, and the pipe's end-of-file is exact: v2p dying
at any moment after ``launch`` began, even before QEMU ran its first
instruction, ends QEMU.

This module is not for short-lived tools: those go through ``runner``.
"""

from __future__ import annotations

import logging
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

_log = logging.getLogger("v2p.tether")

_RELEASE = b"release\n"


class Tether:
    """One program started under a tether; ``pid`` is the tether's, not the program's."""

    def __init__(self, argv: Sequence[str], *, log: Path) -> None:
        read_end, self._life = os.pipe()  # both close-on-exec; stdin below is a dup2'ed copy
        try:
            with open(log, "wb") as output:
                self.proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", __file__, *argv], stdin=read_end, stdout=output,
                    stderr=output, start_new_session=True)
        except BaseException:
            os.close(self._life)
            raise
        finally:
            os.close(read_end)
        self.pid = self.proc.pid
        self._argv, self._started = list(argv), time.monotonic()
        _log.debug("%s: started (tether %s)", shlex.join(self._argv), self.pid, extra={"argv": self._argv})

    def alive(self) -> bool:
        """Whether the program still runs (while tethered)."""
        return self.proc.poll() is None

    def exit_status(self) -> int | None:
        return self.proc.poll()

    def release(self) -> None:
        """Let the program outlive v2p: the tether exits and leaves it to init."""
        if self._life >= 0:
            try:
                os.write(self._life, _RELEASE)
            except BrokenPipeError:  # the tether is gone: so is the program
                pass
            self._close()
        self.proc.wait()
        self._ended("released")

    def cut(self) -> None:
        """Kill the program now (the tether SIGKILLs it) and wait for both."""
        self._close()
        self.proc.wait()
        self._ended(f"exit {self.proc.returncode}")

    def _ended(self, how: str) -> None:
        seconds = time.monotonic() - self._started
        _log.debug("%s: %s after %.3fs", shlex.join(self._argv), how, seconds,
                  extra={"argv": self._argv, "returncode": self.proc.returncode, "seconds": seconds})

    def _close(self) -> None:
        if self._life >= 0:
            os.close(self._life)
            self._life = -1


def _serve(argv: list[str]) -> int:
    # In a session of its own, without a terminal: no job-control signal reaches the tether.
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    pidfd = os.pidfd_open(child.pid)
    while True:
        ready, _, _ = select.select([0, pidfd], [], [])
        if pidfd in ready:
            status = child.wait()
            return status if status >= 0 else 128 - status
        word = os.read(0, 64)
        if word == _RELEASE:
            return 0
        # End of file (v2p is gone, or gave the VM up) or anything else: the program goes too.
        child.kill()
        child.wait()
        return 128 + signal.SIGKILL


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
