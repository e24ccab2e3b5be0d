"""What the library does to a VM v2p made, after (or apart from) its migration: the driver dance,
removal, the recorded migrations and the left-overs of a target.

Not for: migrating (``migration``) or inspecting (``vmreport``).
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from . import pveconfig
from .dance import DanceOptions, DriverDance
from .errors import (
    ForeignVMError,
    NoSuchVMError,
    StateError,
    TargetError,
)
from .events import EventHandler, ignore
from .fsutil import remove_tree
from .migration import TargetSpec, as_target, one_line_os_errors
from .options import MigrationOptions, OptionError, check_bool, check_seconds, check_vmid
from .pipeline import check_records
from .stage_checks import check_drivers
from .state import MigrationState, VmidLock, list_states
from .targets.base import Target


def dance(vmid: int, *, target: TargetSpec = None, bus: str = "virtio", confirmed: bool = False,
          drivers_iso: str | None = None, net_drivers: bool = True, arch: str = "amd64",
          dance_wait: float = 600.0, boot_wait: float = 120.0, shutdown_timeout: float = 120.0,
          start: bool = False, on_event: EventHandler = ignore) -> dict[str, Any]:
    """Move an existing Windows VM's system disk from IDE to virtio (the two-boot dance).

    ``confirmed``: the operator says the guest has its drivers (``v2p dance --continue``).
    ``start``: leave the VM running on virtio afterwards (default: shut it down).
    """
    check_vmid(vmid)
    confirmed, start = check_bool("confirmed", confirmed), check_bool("start", start)
    dance_wait = check_seconds("--dance-wait", dance_wait)
    boot_wait = check_seconds("--boot-wait", boot_wait)
    shutdown_timeout = check_seconds("--shutdown-timeout", shutdown_timeout, zero=True)
    target = as_target(target)
    config = target.get_config(vmid)
    with VmidLock(target.state_dir(), vmid), one_line_os_errors():
        target.remove_temporaries(vmid)
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


def remove(vmid: int, target: TargetSpec = None, *, confirm_name: str | None = None) -> None:
    """Remove a VM v2p made, its volumes (never a user's block device) and its records.

    A VM is v2p's when its description carries the tag of the migration that its record names
    (``<vmid>.json``). Any other VM (made by hand or another tool, a clone of a v2p VM, one whose
    record is gone) is removed only when ``confirm_name`` is its name (its VMID when it has none);
    otherwise ``ForeignVMError`` and the VM is left as it is (v2p's own records of that VMID, which
    describe no VM of v2p's, are discarded). A ``confirm_name`` that is not the VM's name is refused
    the same way, whoever made the VM.
    """
    target = as_target(target)
    check_vmid(vmid)
    if confirm_name is not None and not isinstance(confirm_name, str):
        raise OptionError(f"confirm_name must be the VM's name (a string), not {type(confirm_name).__name__}")
    with VmidLock(target.state_dir(), vmid), one_line_os_errors():
        # A damaged record is discarded all the same; it is read only to tell whose the VM is.
        records = [MigrationState(target.state_dir(), vmid, suffix) for suffix in ("", ".dance")]
        recorded = any(os.path.lexists(record.path) for record in records)
        if target.vm_exists(vmid):
            config = target.get_config(vmid)
            name = config.get("name") or str(vmid)
            again = f"v2p vm rm {vmid} --force --confirm-name {_quoted(name)}"
            if confirm_name is not None and confirm_name != name:
                raise ForeignVMError(f"VM {vmid} is called {_quoted(name)}, not {_quoted(confirm_name)}: "
                                     "nothing removed", hint=f"type its name back exactly: {again}")
            ours = any(records[0].names(tag) for tag in pveconfig.tagged_by(config))
            if confirm_name is None and not ours:
                _discard(target, vmid, records)
                discarded = "; discarded v2p's migration records of that VMID" if recorded else ""
                raise ForeignVMError(f"VM {vmid} ({_quoted(name)}) was not made by v2p (no migration record "
                                     f"here names it): not removed{discarded}",
                                     hint=f"to remove it anyway, type its name back: {again}")
            target.destroy_vm(vmid)
        elif not recorded:
            raise NoSuchVMError(f"VMID {vmid} does not exist on the {target.kind} target and has no "
                                "migration record", hint="see: v2p vm list, v2p status")
        _discard(target, vmid, records)


def _discard(target: Target, vmid: int, records: list[MigrationState]) -> None:
    """v2p's own traces of a VMID: its work folder, its config temporaries and its records (all of
    them are tried; something not v2p's at a record's name is left for the user, named)."""
    remove_tree(target.state_dir() / f"{vmid}.work")
    target.remove_temporaries(vmid)
    left = []
    for record in records:
        try:
            record.remove()
        except TargetError as exc:
            left.append(exc)
    if left:
        raise left[0]


def _quoted(name: str) -> str:
    """A VM's name as a shell word on one line (a hand-written config may name it anything)."""
    return shlex.quote(name) if name.isprintable() else repr(name)


def leftovers(target: TargetSpec = None) -> dict[str, dict[str, Any]]:
    """What v2p meant to delete on ``target`` and could not (an upload PVE refused to delete), retried
    now: what is still left, by volume id, with ``vmid``, ``error`` and ``since``. Every migration on
    the target retries them too."""
    return as_target(target).retry_leftovers()


def status(target: TargetSpec = None, vmid: int | None = None) -> list[MigrationState]:
    """The recorded migrations on ``target`` (all, or the one for ``vmid``)."""
    if vmid is not None:
        check_vmid(vmid)
    target = as_target(target)
    states = [s for s in list_states(target.state_dir()) if vmid is None or s.vmid == vmid]
    for state in states:
        if state.error is None:
            try:
                check_records(state)
            except StateError as exc:
                state.error = exc
    return states
