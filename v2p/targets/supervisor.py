"""One VM's QEMU process: started, driven over QMP, stopped.

Every QEMU starts under a ``Tether`` (see ``v2p.tether``), paused: until it
is released, it dies with this process. ``vm start`` and ``--start`` release
it as soon as it runs; the boot check and the driver dance's boots hold it,
so a v2p killed in the middle leaves no guest behind.

Not here: what the command line holds (``qemu_cmdline``), where a target
keeps its files (the target), what a boot shows (``v2p.bootwatch``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from ..errors import TargetError, ToolError
from ..fsutil import read_small
from ..interrupts import check as check_interrupts
from ..testhooks import hold_point
from ..tether import Tether

QMP_WAIT = 30.0


class QemuProcess:
    """The QEMU of one VM, found through its pidfile and QMP socket."""

    def __init__(self, name: str, run_dir: Path, qmp_path: Path) -> None:
        self.name = name
        self.run_dir = run_dir
        self.qmp_path = qmp_path
        self._tether: Tether | None = None

    # -- looking ----------------------------------------------------------
    def pid(self) -> int | None:
        """QEMU's pid if it runs (the pidfile, checked against /proc so a reused pid does not count)."""
        try:
            pid = int(read_small(self.run_dir / "qemu.pid", limit=64).strip())
        except (FileNotFoundError, ValueError, TargetError):  # none, or not a pid file QEMU wrote
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"qemu-system" in cmdline and str(self.qmp_path).encode() in cmdline else None

    def running(self) -> bool:
        return self.pid() is not None

    def held(self) -> bool:
        """Whether this QEMU dies with this process."""
        return self._tether is not None and self._tether.alive()

    # -- starting ---------------------------------------------------------
    def launch(self, argv: list[str]) -> Any:
        """Start QEMU paused (``-S``) and held, connect QMP, then let the guest run.

        Connecting before the first guest instruction means no event is
        missed, even from a guest that powers off within milliseconds.
        Returns the connected monitor. On any failure or interrupt, QEMU is gone.
        """
        self.qmp_path.unlink(missing_ok=True)
        self._tether = tether = Tether([*argv, "-S"], log=self.run_dir / "qemu.log")
        monitor = None
        try:
            deadline = time.monotonic() + QMP_WAIT
            while not self.qmp_path.exists():
                check_interrupts()
                if not tether.alive():
                    raise self._failed(f"exit {tether.exit_status()}")
                if time.monotonic() > deadline:
                    raise ToolError(f"qemu-system-x86_64 did not open its QMP socket for VM {self.name} "
                                    f"in {QMP_WAIT:g}s")
                time.sleep(0.02)
            try:
                monitor = self._connect(tether, deadline)
                hold_point("qemu:paused")
                monitor.cmd("cont")
            except Exception as exc:
                # QEMU opens its QMP socket before its drives: a drive it cannot open
                # shows here as a refused connection, the real reason is in qemu.log.
                time.sleep(0.2)
                raise self._failed(f"cannot talk QMP: {exc}") from None
        except BaseException:
            self.kill()
            if monitor is not None:
                close_quietly(monitor)  # QEMU is gone: the socket closes at once
            raise
        return monitor

    def _connect(self, tether: Tether, deadline: float) -> Any:
        """QMP, once QEMU listens: its socket file appears at bind(), a moment before listen(), and a
        connection in between is refused (seen under load), so a refusal is retried while QEMU runs."""
        while True:
            try:
                return self.qmp()
            except Exception as exc:
                refused = isinstance(getattr(exc, "exc", exc), ConnectionRefusedError)
                if not refused or not tether.alive() or time.monotonic() > deadline:
                    raise
            check_interrupts()
            time.sleep(0.05)

    def _failed(self, fallback: str) -> ToolError:
        text = _read(self.run_dir / "qemu.log").strip()
        exited = self._tether is not None and not self._tether.alive()
        reason = text.splitlines()[-1] if exited and text else fallback
        return ToolError(f"qemu-system-x86_64 could not start VM {self.name}: {reason}")

    def release(self) -> None:
        """Let this QEMU outlive v2p (a VM the user wants running)."""
        if self._tether is not None:
            self._tether.release()
            self._tether = None

    def qmp(self) -> Any:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        class Monitor(QEMUMonitorProtocol):
            def __del__(self) -> None:
                # qemu.qmp closes a forgotten session when collected; one an interrupt broke off
                # mid-call cannot be closed again, and its traceback would land on stderr at exit.
                try:
                    super().__del__()
                except Exception:  # noqa: S110 - nothing is left to close
                    pass

        monitor = Monitor(str(self.qmp_path))
        monitor.connect(negotiate=True)
        return monitor

    # -- stopping ---------------------------------------------------------
    def wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        self._forget()
        return True

    def kill(self) -> None:
        if self._tether is not None:
            self._tether.cut()
            self._tether = None
        pid = self.pid()
        if pid:
            os.kill(pid, signal.SIGKILL)
        self.wait_exit(10)

    def stop(self, timeout: float) -> bool:
        """ACPI power button, then (after ``timeout``) QMP quit, then SIGKILL.

        Returns whether the guest shut down on the power button by itself.
        """
        if not self.running():
            self._forget()
            return True
        clean = False
        try:
            monitor = self.qmp()
            try:
                monitor.cmd("system_powerdown")
                clean = self.wait_exit(timeout)
                if not clean:
                    monitor.cmd("quit")
            finally:
                close_quietly(monitor)
        except Exception:  # QMP gone: the process is about to exit or is wedged
            pass
        if not self.wait_exit(10):
            self.kill()
        return clean

    def _forget(self) -> None:
        self.qmp_path.unlink(missing_ok=True)
        if self._tether is not None:  # QEMU is gone: its tether is ending too
            self._tether.cut()
            self._tether = None


def close_quietly(monitor: Any) -> None:
    try:
        monitor.close()
    except Exception:  # QEMU already exited and closed the socket: nothing to close
        pass


def _read(path: Path) -> str:
    try:
        return read_small(path).decode(errors="replace")
    except FileNotFoundError:
        return ""
