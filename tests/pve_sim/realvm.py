"""Running the simulator's VMs for real: a started VM's config becomes a
``qemu-system-x86_64`` under TCG, built by v2p's own command-line builder
(qemu-server's job on a real node) and supervised by v2p's ``QemuProcess``.

Every QEMU stays tethered to the test process (it cannot outlive it) and
``PVESim.stop()`` stops what still runs. Turn on with ``PVESim.run_vms()``.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from v2p.targets import qemu_cmdline
from v2p.targets.supervisor import QemuProcess, close_quietly

from .cluster import VM, Cluster


class QemuRunner:
    def __init__(self, cluster: Cluster, run_root: Path) -> None:
        self.cluster = cluster
        self.run_root = run_root
        self.processes: dict[int, QemuProcess] = {}
        self._qmp_lock = threading.Lock()  # QEMU's QMP socket takes one client at a time

    def run_dir(self, vmid: int) -> Path:
        """Where VM ``vmid`` keeps ``serial.log`` (its serial port), ``qemu.log`` and its pidfile."""
        return self.run_root / str(vmid)

    def _qmp_path(self, vmid: int) -> Path:
        # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
        return self.qemu_server_dir / f"{vmid}.qmp"

    @property
    def qemu_server_dir(self) -> Path:
        """The node's /var/run/qemu-server: ``<vmid>.serial0`` sockets (``serial0: socket``) live here."""
        tag = hashlib.sha1(str(self.run_root).encode()).hexdigest()[:12]
        folder = Path(tempfile.gettempdir()) / f"pve-sim-{tag}"
        folder.mkdir(mode=0o700, exist_ok=True)
        return folder

    def volume_file(self, volid: str) -> tuple[Path, str]:
        path = self.cluster.volume_path(volid)
        done = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True,
                              text=True, timeout=60, check=True)
        fmt: str = json.loads(done.stdout)["format"]
        return path, fmt

    def argv(self, vm: VM) -> list[str]:
        config = dict(vm.config)
        # PVE 9's memory is a property string; the builder takes MiB.
        config["memory"] = config.get("memory", "512").removeprefix("current=").split(",")[0]
        run_dir = self.run_dir(vm.vmid)
        argv = qemu_cmdline.build(vm.vmid, config, "tcg", run_dir=run_dir, qmp_path=self._qmp_path(vm.vmid),
                                  volume_file=self.volume_file,
                                  serial_socket=self.qemu_server_dir / f"{vm.vmid}.serial0")
        # A node counts a NIC's bytes on its tap device (/proc/net/dev); here each NIC's user-mode
        # netdev gets two dumps: what the guest sent (the netdev's receive queue, "rx") and what
        # it was sent ("tx") (QEMU net/filter.c: a packet passes the sender's tx filters, then
        # its peer's rx filters).
        for key in sorted(k for k in config if re.fullmatch(r"net\d+", k)):
            for queue, name in (("rx", "sent"), ("tx", "received")):
                argv += ["-object", f"filter-dump,id=sim-{name}-{key},netdev={key},queue={queue},"
                         f"file={self._dump(vm.vmid, key, name)}"]
        return argv

    def _dump(self, vmid: int, key: str, name: str) -> Path:
        return self.run_dir(vmid) / f"{key}-{name}.pcap"

    def query(self, vm: VM, command: str) -> Any:
        """One QMP command's ``return`` from VM ``vm``'s QEMU (qemu-server's ``mon_cmd``); None
        if it does not run."""
        process = self.processes.get(vm.vmid)
        if process is None or not process.running():
            return None
        with self._qmp_lock:
            try:
                monitor = process.qmp()
            except Exception:  # QEMU exited between the look and the connection
                return None
            try:
                return monitor.cmd(command)
            finally:
                close_quietly(monitor)

    def nic_bytes(self, vm: VM, key: str) -> tuple[int, int]:
        """(bytes the guest sent, bytes it was sent) on NIC ``key`` since it started: what its tap
        device's receive and transmit counters are on a node."""
        return (pcap_bytes(self._dump(vm.vmid, key, "sent")),
                pcap_bytes(self._dump(vm.vmid, key, "received")))

    def start(self, vm: VM) -> None:
        argv = self.argv(vm)
        run_dir = self.run_dir(vm.vmid)
        run_dir.mkdir(parents=True, exist_ok=True)
        for path in run_dir.glob("net*.pcap"):  # the counters start again with each run
            path.unlink()
        for name in ("serial.log", "firmware.log", "qemu.log", "qemu.pid"):
            (run_dir / name).unlink(missing_ok=True)
            (run_dir / name).touch()
        process = QemuProcess(str(vm.vmid), run_dir, self._qmp_path(vm.vmid))
        self.processes[vm.vmid] = process
        close_quietly(process.launch(argv))

    def running(self, vm: VM) -> bool:
        process = self.processes.get(vm.vmid)
        return process is not None and process.running()

    def stop(self, vm: VM) -> None:
        process = self.processes.pop(vm.vmid, None)
        if process is not None:
            process.kill()

    def powerdown(self, vm: VM, timeout: float) -> bool:
        """ACPI power button; whether the guest powered off within ``timeout``."""
        process = self.processes.get(vm.vmid)
        if process is None or not process.running():
            return True
        monitor = process.qmp()
        try:
            monitor.cmd("system_powerdown")
        finally:
            close_quietly(monitor)
        if process.wait_exit(timeout):
            self.processes.pop(vm.vmid, None)
            return True
        return False


def pcap_bytes(path: Path) -> int:
    """The bytes of every frame in the pcap file QEMU's filter-dump writes (net/dump.c: a
    ``pcap_file_hdr``, then per frame a ``pcap_sf_pkthdr`` whose ``len`` is the frame's length),
    host byte order as QEMU writes it; 0 if there is none yet. A frame being written is skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    if len(data) < 24:
        return 0
    order = "<" if struct.unpack_from("<I", data)[0] == 0xA1B2C3D4 else ">"
    total, offset = 0, 24
    while offset + 16 <= len(data):
        _sec, _usec, caplen, length = struct.unpack_from(f"{order}IIII", data, offset)
        if offset + 16 + caplen > len(data):
            break
        total += length
        offset += 16 + caplen
    return total
