"""Running the simulator's VMs for real: a started VM's config becomes a
``qemu-system-x86_64`` under TCG, built by v2p's own command-line builder
(qemu-server's job on a real node) and supervised by v2p's ``QemuProcess``.

Every QEMU stays tethered to the test process (it cannot outlive it) and
``PVESim.stop()`` stops what still runs. Turn on with ``PVESim.run_vms()``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

from v2p.targets import qemu_cmdline
from v2p.targets.supervisor import QemuProcess, close_quietly

from .cluster import VM, Cluster


class QemuRunner:
    def __init__(self, cluster: Cluster, run_root: Path) -> None:
        self.cluster = cluster
        self.run_root = run_root
        self.processes: dict[int, QemuProcess] = {}

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
        return qemu_cmdline.build(vm.vmid, config, "tcg", run_dir=run_dir, qmp_path=self._qmp_path(vm.vmid),
                                  volume_file=self.volume_file,
                                  serial_socket=self.qemu_server_dir / f"{vm.vmid}.serial0")

    def start(self, vm: VM) -> None:
        argv = self.argv(vm)
        run_dir = self.run_dir(vm.vmid)
        run_dir.mkdir(parents=True, exist_ok=True)
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
