"""A vSphere VM's life while v2p reads it: what only a running hypervisor knows (power state, VMware
Tools, snapshots, changed-block tracking, datastore kinds, the guest's IPs per NIC) put into the
``VMSpec`` for the named rules, and stopping a running VM before its disks are read.

Stopping (``stop``): nothing to do for a VM that is off; a running one is refused unless ``--shutdown``
asks, and then its guest is asked to shut down through VMware Tools (``ShutdownGuest``), given
``--shutdown-wait`` seconds, and powered off (``PowerOffVM_Task``) if it still runs, at once when Tools
do not run. Every step is said. Nothing else on the VM is touched: no snapshot, no rename, no setting.

Not here: the session and property reads (``vsphere_api``), the hardware (``vsphere.py``).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from ..errors import SourceError
from ..spec import VMSpec
from .vsphere_api import Session

# What ``stop`` reads while it waits.
POWER_PROPERTIES = ("runtime.powerState", "guest.toolsRunningStatus")
POLL = 2.0  # seconds between looks at the power state while the guest shuts down
POWER_OFF_WAIT = 120.0  # seconds PowerOffVM_Task may take
SHUTDOWN_HINT = "--shutdown shuts its guest down through VMware Tools (powering it off after --shutdown-wait " \
                "seconds), or shut it down in vSphere first"


# -- facts for the rules --------------------------------------------------------------------------------

def add_runtime_facts(spec: VMSpec, props: Mapping[str, Any], datastore_types: Mapping[str, str]) -> VMSpec:
    """``spec`` (from the VM's ``config``) completed with what the running hypervisor says: power
    state, Tools, snapshot names, CBT, each disk's datastore kind and each NIC's guest IPs."""
    config = props["config"]
    spec.power_state = str(props.get("runtime.powerState") or "") or None
    spec.tools_running = props.get("guest.toolsRunningStatus") == "guestToolsRunning"
    spec.snapshots = snapshot_names(props.get("snapshot"))
    spec.cbt = bool(getattr(config, "changeTrackingEnabled", False))
    for disk in spec.disks:
        store = disk.source.partition("]")[0].lstrip("[") if disk.source.startswith("[") else ""
        disk.datastore_type = datastore_types.get(store)
    ips = guest_ips(props.get("guest.net") or ())
    for nic in spec.nics:
        nic.ips = ips.get((nic.mac or "").lower(), [])
    return spec


def snapshot_names(snapshot: Any) -> list[str]:
    """The names in a ``vim.vm.SnapshotInfo``'s tree, depth first; [] for none."""
    names: list[str] = []
    todo = list(getattr(snapshot, "rootSnapshotList", None) or ())
    while todo and len(names) < 10000:
        tree = todo.pop(0)
        names.append(str(tree.name))
        todo[:0] = list(tree.childSnapshotList or ())
    return names


def guest_ips(guest_net: Iterable[Any]) -> dict[str, list[str]]:
    """MAC (lower case) -> the guest's addresses on that NIC, ``10.0.0.5/24`` when Tools give the prefix
    length, bare otherwise, as ``vim.vm.GuestInfo.NicInfo`` reports them (IPv6 link-local left out:
    nothing to restore)."""
    found: dict[str, list[str]] = {}
    for nic in guest_net:
        mac = str(getattr(nic, "macAddress", "") or "").lower()
        if not mac:
            continue
        config = getattr(nic, "ipConfig", None)
        given = [(str(a.ipAddress), int(a.prefixLength or 0)) for a in getattr(config, "ipAddress", None) or ()]
        if not given:
            given = [(str(address), 0) for address in getattr(nic, "ipAddress", None) or ()]
        for address, prefix in given:
            try:
                if ipaddress.ip_address(address).is_link_local:
                    continue
            except ValueError:
                continue
            shown = f"{address}/{prefix}" if prefix else address
            if shown not in found.setdefault(mac, []):
                found[mac].append(shown)
    return found


def datastore_types(session: Session) -> dict[str, str]:
    """Datastore name -> ``summary.type`` (``VMFS``, ``NFS``, ``vsan``, ``VVOL``) in the whole inventory."""
    from pyVmomi import vim

    return {str(values.get("name", "")): str(values.get("summary.type", ""))
            for _, values in session.retrieve([vim.Datastore], {vim.Datastore: ("name", "summary.type")})}


# -- stopping it ----------------------------------------------------------------------------------------

class Power(Protocol):
    """What ``stop`` does to a VM (``VmPower`` on vSphere)."""

    def state(self) -> tuple[str, bool]:
        """(power state, VMware Tools running), read now."""

    def shutdown_guest(self) -> None: ...

    def power_off(self) -> None: ...


def stop(vm: Power, *, where: str, shutdown: bool, wait: float, say: Callable[[str], None],
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """The VM ``where`` powered off, or refused (``SourceError``) while it runs without ``shutdown``.
    Returns what was done, for the state file: ``{}`` for a VM that was off already."""
    state, tools = vm.state()
    if state == "poweredOff":
        return {}
    if not shutdown:
        raise SourceError(f"{where} is {_words(state)}: its disks change while it runs", hint=SHUTDOWN_HINT)
    started = clock()
    if state == "poweredOn" and tools and wait > 0:
        say(f"shutdown: asking the guest of {where} to shut down through VMware Tools "
            f"(powered off if it still runs after {wait:g}s)")
        try:
            vm.shutdown_guest()
        except SourceError as exc:
            if vm.state()[0] == "poweredOff":  # it stopped on its own meanwhile
                return {"was": state, "stopped_by": "itself", "seconds": round(clock() - started, 1)}
            say(f"shutdown: the guest shutdown was refused ({exc.message}): powering {where} off")
        else:
            while vm.state()[0] != "poweredOff":
                left = wait - (clock() - started)
                if left <= 0:
                    say(f"shutdown: the guest of {where} did not shut down within {wait:g}s: powering it off")
                    break
                sleep(min(POLL, left))
            else:
                seconds = clock() - started
                say(f"shutdown: the guest of {where} shut down after {seconds:.0f}s")
                return {"was": state, "stopped_by": "guest-shutdown", "seconds": round(seconds, 1)}
    elif state == "poweredOn" and tools:
        say(f"shutdown: --shutdown-wait 0: powering {where} off at once (no guest shutdown)")
    elif state == "poweredOn":
        say(f"shutdown: VMware Tools are not running in {where}: powering it off (no guest shutdown possible)")
    else:
        say(f"shutdown: {where} is {_words(state)}: powering it off (its suspended state is discarded)")
    vm.power_off()
    seconds = clock() - started
    say(f"shutdown: {where} is powered off")
    return {"was": state, "stopped_by": "power-off", "seconds": round(seconds, 1)}


def _words(state: str) -> str:
    return {"poweredOn": "powered on", "suspended": "suspended"}.get(state, state)


class VmPower:
    """``Power`` of one VM through an open session; faults become ``SourceError``s."""

    def __init__(self, session: Session, vm: Any, where: str) -> None:
        self.session, self.vm, self.where = session, vm, where

    def state(self) -> tuple[str, bool]:
        from pyVmomi import vim

        [(_, props)] = self.session.retrieve((), {vim.VirtualMachine: POWER_PROPERTIES}, objects=[self.vm])
        return str(props.get("runtime.powerState", "")), props.get("guest.toolsRunningStatus") == "guestToolsRunning"

    def shutdown_guest(self) -> None:
        from pyVmomi import vim, vmodl

        try:
            self.vm.ShutdownGuest()
        except (vim.fault.VimFault, vmodl.MethodFault) as exc:
            raise SourceError(_fault(exc)) from None

    def power_off(self) -> None:
        from pyVmomi import vim, vmodl

        try:
            task = self.vm.PowerOffVM_Task()
        except (vim.fault.VimFault, vmodl.MethodFault) as exc:
            raise SourceError(f"{self.where}: powering it off was refused: {_fault(exc)}") from None
        deadline = time.monotonic() + POWER_OFF_WAIT
        while time.monotonic() < deadline:
            [(_, props)] = self.session.retrieve((), {vim.Task: ("info.state", "info.error")}, objects=[task])
            if props.get("info.state") == "success":
                return
            if props.get("info.state") == "error":
                raise SourceError(f"{self.where}: powering it off failed: {_fault(props.get('info.error'))}")
            time.sleep(0.2)
        raise SourceError(f"{self.where}: powering it off did not end within {POWER_OFF_WAIT:g}s",
                          hint="look at the VM's tasks in vSphere")


def _fault(exc: Any) -> str:
    """A vSphere fault in one line: its message, else its class."""
    return str(getattr(exc, "msg", "") or type(exc).__name__.rsplit(".", 1)[-1])


def prepare(session: Session, vm: Any, *, where: str, shutdown: bool, wait: float,
            say: Callable[[str], None]) -> dict[str, Any]:
    """``Source.prepare`` of a vSphere VM: ``stop`` it through ``session``."""
    return stop(VmPower(session, vm, where), where=where, shutdown=shutdown, wait=wait, say=say)
