"""The one interface every target implements (local QEMU, Proxmox, ...).

The pipeline talks to a ``Target`` only; it never asks which kind it holds.
VM configs are dicts keyed by PVE's qemu-server names (``name``, ``cores``,
``scsi0``, ``net0``, ``boot``...), values as PVE writes them.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

from ..storage import BlockStorage, Storage

VMConfig = dict[str, str]


@dataclass
class BootReport:
    """What a boot check saw: how the guest ended up and what it said."""

    outcome: str  # "up" | "powered-off" | "running" (no sign either way before the timeout)
    seconds: float
    signal: str = ""  # what ended the check: "login prompt on the serial console", ...
    serial: str = ""
    firmware: str = ""
    resets: int = 0
    accel: str = ""
    notes: list[str] = field(default_factory=list)


class Target(abc.ABC):
    """A place VMs are migrated to."""

    kind: str = "target"

    @abc.abstractmethod
    def describe(self) -> dict[str, str]:
        """What identifies this target in the state file (no secrets)."""

    @abc.abstractmethod
    def state_dir(self) -> Path:
        """Where migration state files for this target live."""

    @abc.abstractmethod
    def vm_exists(self, vmid: int) -> bool: ...

    @abc.abstractmethod
    def list_vms(self) -> list[int]: ...

    @abc.abstractmethod
    def create_vm(self, vmid: int, config: VMConfig) -> None:
        """Create the VM shell; refuse if ``vmid`` is taken."""

    @abc.abstractmethod
    def get_config(self, vmid: int) -> VMConfig: ...

    @abc.abstractmethod
    def set_config(self, vmid: int, updates: VMConfig, delete: tuple[str, ...] = ()) -> None: ...

    @abc.abstractmethod
    def destroy_vm(self, vmid: int) -> None:
        """Stop the VM if needed and remove it with its disks."""

    @abc.abstractmethod
    def storage(self, name: str) -> Storage:
        """The configured storage called ``name`` (as PVE names storages)."""

    def iso_places(self) -> tuple[Path, ...]:
        """Where this target keeps ISO images (searched for the drivers ISO)."""
        return ()

    def device_storage(self, device: str) -> Storage:
        """A block device on the target host, written in place."""
        return BlockStorage(device)

    @abc.abstractmethod
    def status(self, vmid: int) -> str:
        """'running' or 'stopped'."""

    @abc.abstractmethod
    def start(self, vmid: int, *, hold: bool = False) -> None:
        """Start the VM; ``hold``: it dies with this process until ``release``d (v2p's own boots)."""

    def held(self, vmid: int) -> bool:
        """Whether the VM runs held by this process (dies with it)."""
        return False

    def release(self, vmid: int) -> None:
        """Let a held VM outlive this process (no-op if it is not held)."""
        return None  # a target whose VMs never die with v2p has nothing to let go

    @abc.abstractmethod
    def stop(self, vmid: int, *, timeout: float = 60.0) -> bool:
        """Shut the VM down (power button, then hard after ``timeout``); True if it went cleanly."""

    @abc.abstractmethod
    def guest_output(self, vmid: int) -> str:
        """What the guest printed on its serial port since it was last started ('' if unknown)."""

    @abc.abstractmethod
    def observe(self, vmid: int, *, timeout: float, patterns: dict[str, str]) -> tuple[str, str]:
        """Watch a running VM until a pattern (name -> regex) matches its output, it
        stops, or ``timeout`` passes: ("<name>" | "stopped" | "timeout", output)."""

    @abc.abstractmethod
    def boot_check(self, vmid: int, *, timeout: float) -> BootReport:
        """Boot the VM held, watch it until it is up (``v2p.bootwatch``), powers off or
        ``timeout`` passes, and report what happened; a guest still running is left held."""
