"""The public library surface: everything the CLI can do, as functions.

    from v2p import migrate
    result = migrate("win7.vmdk", 102, ostype="win7", on_event=print)

Progress arrives as ``Event``s through ``on_event``; errors are ``V2PError``s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import pveconfig
from .dance import DanceOptions, DriverDance
from .errors import NoSuchVMError, StateError
from .events import EventHandler, ignore
from .fsutil import remove_tree
from .inspect import DiskImage, Row, inspect_disk, inspect_paths
from .options import MigrationOptions, OptionError, check_seconds, check_vmid
from .pipeline import Pipeline, check_records
from .sources import Source
from .stages import check_drivers
from .state import MigrationState, VmidLock, list_states
from .targets.base import Target
from .targets.local import LocalTarget

__all__ = ["LocalTarget", "Migration", "Row", "Target", "dance", "inspect", "inspect_paths", "local_target",
           "migrate", "remove", "status"]


def local_target(directory: str | os.PathLike[str] | None = None, *, accel: str = "auto") -> LocalTarget:
    """The embedded QEMU target (``V2P_TARGET_DIR`` or the XDG data dir by default)."""
    # An empty folder name (an unset shell variable, most likely) must not quietly mean the default one.
    if directory is not None and not os.fspath(directory):
        raise OptionError("--target-dir is empty", hint="give a directory, or leave the option out for "
                          "$V2P_TARGET_DIR or ~/.local/share/v2p/local")
    if directory is None and os.environ.get("V2P_TARGET_DIR") == "":
        raise OptionError("$V2P_TARGET_DIR is set but empty",
                          hint="set it to a directory, or unset it for ~/.local/share/v2p/local")
    return LocalTarget(Path(directory) if directory is not None else None, accel=accel)


class Migration:
    """One migration of ``source`` to ``vmid``; ``run()`` starts or resumes it."""

    def __init__(self, source: str | os.PathLike[str] | Source, vmid: int, *, target: Target | None = None,
                 on_event: EventHandler = ignore, **options: Any) -> None:
        self.options = MigrationOptions(**options)
        self.target = target or local_target()
        self.pipeline = Pipeline(source, vmid, self.options, self.target, emit=on_event)

    def plan(self) -> list[tuple[str, str, bool]]:
        """The stages as (name, what it does, already done), without running anything."""
        return self.pipeline.plan()

    def disk_keys(self) -> list[str]:
        """The config keys the VM's disks get on their first boot (ide0, scsi0, ...), boot disk first."""
        spec = self.options.hardware(self.pipeline.source.spec())
        options = self.options.resolved(spec)
        assert options.ostype is not None
        return [key for _disk, key in pveconfig.disk_keys(spec, options, ostype=options.ostype)]

    def run(self) -> dict[str, Any]:
        """Run every stage not yet done; return the final state record."""
        return self.pipeline.run()


def migrate(source: str | os.PathLike[str] | Source, vmid: int, *, target: Target | None = None,
            on_event: EventHandler = ignore, **options: Any) -> dict[str, Any]:
    """Migrate (or resume migrating) ``source`` to VM ``vmid``; see ``MigrationOptions``."""
    return Migration(source, vmid, target=target, on_event=on_event, **options).run()


def dance(vmid: int, *, target: Target | None = None, bus: str = "virtio", confirmed: bool = False,
          drivers_iso: str | None = None, net_drivers: bool = True, arch: str = "amd64",
          dance_wait: float = 600.0, boot_wait: float = 120.0, shutdown_timeout: float = 120.0,
          start: bool = False, on_event: EventHandler = ignore) -> dict[str, Any]:
    """Move an existing Windows VM's system disk from IDE to virtio (the two-boot dance).

    ``confirmed``: the operator says the guest has its drivers (``v2p dance --continue``).
    ``start``: leave the VM running on virtio afterwards (default: shut it down).
    """
    check_vmid(vmid)
    dance_wait = check_seconds("--dance-wait", dance_wait)
    boot_wait = check_seconds("--boot-wait", boot_wait)
    shutdown_timeout = check_seconds("--shutdown-timeout", shutdown_timeout, zero=True)
    target = target or local_target()
    config = target.get_config(vmid)
    with VmidLock(target.state_dir(), vmid):
        pending = DriverDance.pending(target, vmid)
        if pending:
            # Finish the dance that was started, with its own settings (its ISO is attached).
            if bus != pending["bus"] and bus != "virtio":
                raise OptionError(f"VM {vmid} is half-way through a dance onto {pending['bus']}, not {bus}",
                                  hint=f"run: v2p dance {vmid} --continue")
            bus, iso_volid, net_drivers = pending["bus"], pending["iso_volid"], pending["net_drivers"]
        else:
            options = MigrationOptions(ostype=config.get("ostype", "win10"), bus=bus, drivers_iso=drivers_iso,
                                       net_drivers=net_drivers, arch=arch)
            if not options.is_windows:
                raise OptionError(f"VM {vmid} has ostype {options.ostype}: the driver dance is for Windows guests")
            iso_volid = check_drivers(target, options)["drivers_iso"]
        dance_options = DanceOptions(bus=bus, iso_volid=iso_volid, net_drivers=net_drivers,
                                     boot1_wait=dance_wait, boot2_wait=boot_wait,
                                     shutdown_timeout=shutdown_timeout)
        result = DriverDance(target, vmid, dance_options, emit=on_event).run(confirmed=confirmed)
        if not start and target.status(vmid) == "running":
            target.stop(vmid, timeout=shutdown_timeout)
        elif start:
            target.release(vmid)  # the dance's boots die with v2p unless kept
        return result


def remove(vmid: int, target: Target | None = None) -> None:
    """Remove a VM, its volumes (never a user's block device) and its records."""
    target = target or local_target()
    check_vmid(vmid)
    with VmidLock(target.state_dir(), vmid):
        # Records are removed without being read: this is how a damaged one is discarded.
        records = [MigrationState(target.state_dir(), vmid, suffix) for suffix in ("", ".dance")]
        recorded = any(os.path.lexists(record.path) for record in records)
        if target.vm_exists(vmid):
            target.destroy_vm(vmid)
        elif not recorded:
            raise NoSuchVMError(f"VMID {vmid} does not exist on the {target.kind} target and has no "
                                "migration record", hint="see: v2p vm list, v2p status")
        for record in records:
            record.remove()
        remove_tree(target.state_dir() / f"{vmid}.work")


def inspect(path: str | os.PathLike[str]) -> DiskImage:
    """Inspect a disk image (headers only) and return what it is, or raise SourceError."""
    return inspect_disk(path)


def status(target: Target | None = None, vmid: int | None = None) -> list[MigrationState]:
    """The recorded migrations on ``target`` (all, or the one for ``vmid``)."""
    target = target or local_target()
    states = [s for s in list_states(target.state_dir()) if vmid is None or s.vmid == vmid]
    for state in states:
        if state.error is None:
            try:
                check_records(state)
            except StateError as exc:
                state.error = exc
    return states
