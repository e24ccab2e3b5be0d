"""Reading a VM's serial port from its unix socket, as ``qm terminal`` does on a PVE node.

qemu-server makes ``serial0: socket`` a listening socket
(``/var/run/qemu-server/<vmid>.serial0``, ``server=on,wait=off``): QEMU drops
what the guest writes while nobody is connected. So the tap connects from a
thread that starts trying before the VM is started and keeps what it reads.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

RETRY = 0.02  # seconds between connection attempts while the socket is not there yet
LIMIT = 4 << 20  # keep the last 4 MiB: a chatty guest must not grow the buffer without end


class SerialTap:
    """Everything the guest writes to the serial socket at ``path`` from now on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._data = bytearray()
        self._thread = threading.Thread(target=self._run, name=f"serial {path.name}", daemon=True)
        self._thread.start()

    def _connect(self) -> socket.socket | None:
        while not self._stop.is_set():
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect(str(self.path))
                conn.settimeout(0.2)
                return conn
            except OSError:  # not made yet, or a stale socket of an earlier QEMU
                conn.close()
                time.sleep(RETRY)
        return None

    def _run(self) -> None:
        conn = self._connect()
        if conn is None:
            return
        self.connected.set()
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not chunk:  # QEMU exited
                    break
                with self._lock:
                    self._data += chunk
                    del self._data[:-LIMIT]

    def text(self) -> str:
        with self._lock:
            return self._data.decode(errors="replace")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
