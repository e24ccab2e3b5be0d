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
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from v2p.targets import qemu_cmdline
from v2p.targets.local import PcapCount
from v2p.targets.supervisor import QemuProcess, close_quietly

from .cluster import VM, Cluster


class QemuRunner:
    def __init__(self, cluster: Cluster, run_root: Path) -> None:
        self.cluster = cluster
        self.run_root = run_root
        self.processes: dict[int, QemuProcess] = {}
        self._qmp_lock = threading.Lock()  # QEMU's QMP socket takes one client at a time
        self._counts: dict[tuple[int, str], tuple[PcapCount, PcapCount]] = {}

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
        # qemu-server gives a VM no pvpanic device (PVE/QemuServer.pm config_to_command adds none):
        # a guest's panic shows on PVE as nothing but the guest's own words.
        at = argv.index("pvpanic")
        del argv[at - 1:at + 1]
        # A node counts a NIC's bytes on its tap device (/proc/net/dev). The builder dumps what the
        # guest sends (its user-mode netdev's receive queue, qemu_cmdline.pcap_name); here a second
        # dump takes what the guest is sent: the netdev's transmit queue, "tx" (QEMU net/filter.c:
        # a frame passes its sender's tx filters, then its peer's rx filters).
        for key in sorted(k for k in config if re.fullmatch(r"net\d+", k)):
            argv += ["-object", f"filter-dump,id=sim-received-{key},netdev={key},queue=tx,"
                     f"file={run_dir / _received(key)}"]
        return argv

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
            except Exception:
                if process.running():
                    raise
                return None  # it exited mid-command (a guest's power-off)
            finally:
                close_quietly(monitor)

    def nic_bytes(self, vm: VM, key: str) -> tuple[int, int]:
        """(bytes the guest sent, bytes it was sent) on NIC ``key`` since it started: what its tap
        device's receive and transmit counters are on a node; counted as the local target counts
        (``PcapCount``)."""
        run_dir = self.run_dir(vm.vmid)
        with self._qmp_lock:
            counts = self._counts.setdefault((vm.vmid, key), (
                PcapCount(run_dir / qemu_cmdline.pcap_name(key)), PcapCount(run_dir / _received(key))))
            return counts[0].count(), counts[1].count()

    def start(self, vm: VM) -> None:
        argv = self.argv(vm)
        run_dir = self.run_dir(vm.vmid)
        run_dir.mkdir(parents=True, exist_ok=True)
        for path in run_dir.glob("net*.pcap"):  # the counters start again with each run
            path.unlink()
        for found in [found for found in self._counts if found[0] == vm.vmid]:
            del self._counts[found]
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



def _received(key: str) -> str:
    return f"{key}-received.pcap"
