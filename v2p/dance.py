"""The IDE -> virtio two-boot driver dance for Windows guests.

Windows only installs a storage driver for a device it sees, and cannot boot
from virtio until it has one. So: boot 1 on IDE with a small temporary virtio
disk, the drivers ISO and a virtio NIC attached; wait until the guest has the
driver; shut down; move every disk on IDE/SATA to virtio (the system disk
first, the others in their order) and the NIC to virtio; boot 2 and confirm.
A failed boot 2 is rolled back to the IDE layout and boot-checked there: the
VM is never left unbootable.

How boot 1 knows the driver is in, whatever the guest prints: the moment
Windows binds viostor (or vioscsi) to the temporary disk, its partition
manager reads that disk, and Windows loads the driver for it on every boot
after. Nothing else reads it: the firmware reads only the disk it boots
(SeaBIOS, measured: 0 bytes; src/boot.c reads the boot drive's MBR only), so
the temporary disk's read counter (``Target.guest_io``) is the sign. Where the
firmware might scan disks (OVMF), only reads after the boot disk shows the OS
loading count. A target that cannot count (no ``guest_io``) or a guest that
never reads it within ``--dance-wait`` hands over to the operator
(``v2p dance VMID --continue``). Boot 2, and the rollback's boot, are judged
as any boot is (``Target.boot_check``, ``v2p.bootwatch``).

Every step is a record in the dance's own state file (``<vmid>.dance.json``),
so a crash anywhere resumes at the right step, and ``v2p dance VMID`` can
dance a VM v2p did not migrate. Only the ``Target`` interface is used. The
boots are held (they die with v2p); only a boot left for the operator to
install drivers in is released.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .bootwatch import OS_READ_BYTES, boot_devices, failure_sign, mib
from .errors import DanceError, OperatorNeeded, StateError, TargetError
from .events import Event, EventHandler, EventKind, ignore
from .interrupts import check as check_interrupts
from .options import mac_for_nic
from .pveconfig import CDROM_KEY, DISK_KEY, SLOTS, cdrom_value
from .state import FieldType, MigrationState, check_fields, now
from .targets.base import BOOT_FAILED, BOOT_UP, BootReport, GuestIO, Target, VMConfig
from .testhooks import hold_point
from .volumes import VolumeRef, drive_is_cdrom, drive_volume

TEMP_DISK_BYTES = 1 << 30
POLL = 0.25  # seconds between two looks at a boot-1 guest's counters
NO_COUNTERS = 5.0  # a target that gives no counters for this long after the start cannot count
STEPS = ("layout1", "boot1", "shutdown1", "layout2", "boot2")
_FIRST_BOOT_KEY = re.compile(r"^(ide|sata)(\d+)$")
# Where the drivers ISO may go when ide2, PVE's CD-ROM slot, holds a disk.
_CD_KEYS = (CDROM_KEY, *SLOTS["ide"], *SLOTS["sata"])


@dataclass
class DanceOptions:
    """How the dance runs."""

    bus: str = "virtio"  # "virtio" (viostor, virtio0) or "scsi" (vioscsi, scsi0 on virtio-scsi-pci)
    iso_volid: str = ""  # the drivers ISO as the target names it (path or storage:iso/NAME.iso)
    net_drivers: bool = True
    boot1_wait: float = 600.0  # how long to wait for the guest to read its temporary disk
    boot2_wait: float = 120.0  # the boot check of boot 2 (and of a rollback's boot)
    shutdown_timeout: float = 120.0


class TemporaryDiskReads:
    """Whether a boot-1 guest reads the dance's temporary disk: the sign its virtio driver is in.

    Fed ``GuestIO`` samples; ``seen`` is the bytes the guest read there once it did. Which reads
    count: all of them under SeaBIOS, which reads only the disk it boots (src/boot.c
    ``boot_disk``: the boot drive's MBR; its virtio-blk and virtio-scsi set-up reads no sector:
    0 bytes measured on i440fx and q35); under OVMF, whose drivers may read a disk's partition
    table while it connects devices, only those after the boot disk has read ``OS_READ_BYTES`` (an
    OS loading itself; the firmware is done by then). A guest already running when the watch began
    (a rerun finding boot 1 up) under OVMF: only reads from then on.
    """

    def __init__(self, temp_key: str, boot_key: str, *, firmware_scans: bool, fresh: bool) -> None:
        self.temp_key = temp_key
        self.boot_key = boot_key
        self.baseline: int | None = None if firmware_scans and fresh else 0
        self._late = firmware_scans and not fresh
        self.seen: int | None = None

    def feed(self, io: GuestIO) -> int | None:
        read = io.reads.get(self.temp_key, 0)
        if self._late:
            self.baseline, self._late = read, False
        if self.baseline is None and io.reads.get(self.boot_key, 0) >= OS_READ_BYTES:
            self.baseline = read
        if self.seen is None and self.baseline is not None and read > self.baseline:
            self.seen = read - self.baseline
        return self.seen


class DriverDance:
    """Runs (or resumes) the dance for one VM."""

    def __init__(self, target: Target, vmid: int, options: DanceOptions, *,
                 emit: EventHandler = ignore) -> None:
        self.target = target
        self.vmid = vmid
        self.options = options
        self.emit = emit
        self.state = MigrationState(target.state_dir(), vmid, suffix=".dance")
        self.step: str | None = None  # the step running now, named on its events

    # -- bookkeeping ---------------------------------------------------------
    def _load(self) -> None:
        if not load_record(self.state):
            self.state.start(self.request())

    def request(self) -> dict[str, Any]:
        return {"vmid": self.vmid, "bus": self.options.bus, "iso_volid": self.options.iso_volid,
                "net_drivers": self.options.net_drivers}

    @classmethod
    def pending(cls, target: Target, vmid: int) -> dict[str, Any] | None:
        """The settings of an unfinished dance of ``vmid``, if there is one."""
        state = MigrationState(target.state_dir(), vmid, suffix=".dance")
        if load_record(state) and not state.data["finished"]:
            return dict(state.data["request"])
        return None

    def _done(self, step: str) -> dict[str, Any] | None:
        record = self.state.stages.get(step)
        return record["result"] if record else None

    def _record(self, step: str, result: dict[str, Any]) -> dict[str, Any]:
        self.state.stages[step] = {"finished_at": now(), "seconds": 0, "result": result}
        self.state.save()
        self.emit(Event("info", "drivers", f"{step}: done", step=step))
        hold_point(f"dance:{step}")
        return result

    def _say(self, text: str, kind: EventKind = "info") -> None:
        self.emit(Event(kind, "drivers", text, step=self.step))

    # -- the dance -----------------------------------------------------------
    def run(self, *, confirmed: bool = False) -> dict[str, Any]:
        """Run every step not yet done; ``confirmed``: the operator says the guest has its drivers."""
        self._load()
        if self.state.data.get("finished"):
            self._say(f"VM {self.vmid} already danced onto {self.state.data['result']['system_disk']}")
            return dict(self.state.data["result"])
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "layout1": self._layout1, "boot1": lambda: self._boot1(confirmed),
            "shutdown1": self._shutdown1, "layout2": self._layout2, "boot2": self._boot2,
        }
        for step in STEPS:
            if self._done(step) is None:
                self.step = step
                self._record(step, steps[step]())
        boot2 = self._done("boot2") or {}
        result = {"bus": self.options.bus, "system_disk": (self._done("layout2") or {})["system_disk"],
                  "confirmed": _confirmed(boot2), "boot1": self._done("boot1"), "boot2": boot2}
        self.state.data["finished"] = True
        self.state.data["result"] = result
        self.state.save()
        return result

    def _layout1(self) -> dict[str, Any]:
        config = self.target.get_config(self.vmid)
        system_key = _system_disk(config)
        system = config[system_key]
        prefix = "virtio" if self.options.bus == "virtio" else "scsi"
        moves = _plan_moves(config, system_key, prefix, self.vmid)
        # The temporary disk takes a key no disk has now or after the move, so that layout 2
        # never sets and deletes one key at once.
        taken = set(config) | {new for _old, _value, new in moves}
        temp_key = next(key for key in SLOTS[prefix] if key not in taken)
        cd_key = next((k for k in _CD_KEYS if k not in config or drive_is_cdrom(config[k])), "")
        if not cd_key:
            raise DanceError(f"VM {self.vmid}: no IDE or SATA slot is free for the drivers ISO",
                             hint="detach a CD-ROM or disk from ide0-3/sata0-5")
        # The temporary disk goes where the system disk is; a raw device gets it on "local".
        system_ref = VolumeRef.maybe(drive_volume(system))
        storage = "local" if system.startswith("/") or system_ref is None else system_ref.storage
        temp_value = self.target.new_disk(self.vmid, config, storage=storage, size=TEMP_DISK_BYTES)
        updates: VMConfig = {temp_key: temp_value, "boot": f"order={system_key}",
                             cd_key: cdrom_value(self.options.iso_volid)}
        if self.options.bus == "scsi":
            updates["scsihw"] = "virtio-scsi-pci"
        if self.options.net_drivers and "net1" not in config:
            # A temporary NIC, made once (this step is recorded): random, as PVE's own, so that two
            # dances on two clusters do not share a MAC on one network.
            updates["net1"] = f"virtio={mac_for_nic(secrets.token_hex(6), 1)},bridge=vmbr0"
        self.target.set_config(self.vmid, updates)
        self._say(f"boot 1 layout: system disk on {system_key}, temporary {temp_key}, drivers ISO on {cd_key}")
        # The target may have allocated the temporary volume only now (PVE's STORAGE:SIZE): its name
        # is in the config. Everything else layout 2 and a rollback need is the config before the dance.
        temp_volid = drive_volume(self.target.get_config(self.vmid)[temp_key])
        return {"system_key": system_key, "system_value": config[system_key], "temp_key": temp_key,
                "temp_volid": temp_volid, "net0": config.get("net0", ""),
                "boot": config.get("boot", ""), "moves": [list(move) for move in moves],
                "cd_key": cd_key, "cd_value": _own_cd(config.get(cd_key, ""), self.options.iso_volid),
                "scsihw": config.get("scsihw", "")}

    def _boot1(self, confirmed: bool) -> dict[str, Any]:
        layout = self._done("layout1") or {}
        temp_key = layout["temp_key"]
        running = self.target.status(self.vmid) == "running"
        if confirmed and not running:
            # The operator says the guest has its drivers and it is already shut down.
            return {"signal": "operator", "at": now()}
        if not running:
            self.target.start(self.vmid, hold=True)
            self._say(f"boot 1 (IDE): waiting for the guest to install the virtio drivers (it reads {temp_key} "
                      "once it has them)")
            hold_point("dance:boot1-started")
        else:
            self._say(f"boot 1 is under way: still waiting for the guest to read {temp_key}")
        config = self.target.get_config(self.vmid)
        reads = TemporaryDiskReads(temp_key, layout["system_key"], firmware_scans=config.get("bios") == "ovmf",
                                   fresh=not running)
        # With the operator's word there is nothing to wait for: just look once.
        started = time.monotonic()
        deadline = started + (0.0 if confirmed else self.options.boot1_wait)
        counted, counts = False, self.target.capabilities.guest_io
        while True:
            check_interrupts()
            io = self.target.guest_io(self.vmid) if counts else None
            failure = failure_sign(self.target.guest_output(self.vmid))
            if failure:
                self.target.stop(self.vmid, timeout=5)
                raise DanceError(f"VM {self.vmid} stopped with {failure[1]} on its first (IDE) boot",
                                 hint="the guest does not boot on IDE either: check it in VMware first")
            if io is not None:
                counted = True
                seen = reads.feed(io)
                if seen is not None:
                    self._say(f"the guest read {mib(seen)} of {temp_key}: its virtio storage driver is in")
                    return {"signal": "temporary disk reads", "disk": temp_key, "reads": seen,
                            "seconds": round(time.monotonic() - started, 2), "at": now()}
            if self.target.status(self.vmid) != "running" or time.monotonic() >= deadline:
                break
            if not counted and (not counts or time.monotonic() - started >= NO_COUNTERS):
                break  # the target cannot count this guest's reads: no sign can come
            time.sleep(POLL)
        if confirmed:
            return {"signal": "operator", "at": now()}
        # The operator installs the drivers in this very boot: it must outlive v2p.
        self.target.release(self.vmid)
        why = f"no sign that the guest has the virtio drivers after {self.options.boot1_wait:g}s: it never " \
              f"read its temporary disk {temp_key}" if counted \
            else f"the {self.target.kind} target cannot tell from here what the guest reads, so its driver " \
                 "install cannot be seen"
        raise OperatorNeeded(
            f"VM {self.vmid}: {why} (it is up on IDE with the drivers ISO attached)",
            hint=f"install them in the guest (Device Manager, the ISO on the CD drive), then run: "
                 f"v2p dance {self.vmid} --continue")

    def _shutdown1(self) -> dict[str, Any]:
        if self.target.status(self.vmid) != "running":
            return {"clean": True, "was_running": False}
        clean = self.target.stop(self.vmid, timeout=self.options.shutdown_timeout)
        if not clean:
            self._say(f"the guest did not shut down within {self.options.shutdown_timeout:g}s of the "
                      "power button: it was stopped hard", "warning")
        return {"clean": clean}

    def _layout2(self) -> dict[str, Any]:
        before = self._done("layout1") or {}
        config = self.target.get_config(self.vmid)
        moves = _moves(before, self.options.bus)
        new_key = moves[0][2]
        updates = {new: value for _old, value, new in moves}
        updates["boot"] = f"order={new_key}"
        cd_key, cd_value = before.get("cd_key", CDROM_KEY), before.get("cd_value", "")
        if cd_value:
            updates[cd_key] = cd_value  # the VM's own CD-ROM drive, back in place of the drivers ISO
        if before["net0"]:
            updates["net0"] = re.sub(r"^[a-z0-9]+=", "virtio=", before["net0"])
        # Idempotent: a rerun after a crash sets the same keys and finds the old ones gone.
        gone = (before["temp_key"], cd_key, "net1", *(old for old, _value, _new in moves))
        delete = tuple(key for key in gone if key in config and key not in updates)
        self.target.set_config(self.vmid, updates, delete=delete)
        self._remove_temp(before)
        moved = ", ".join(f"{old} -> {new}" for old, _value, new in moves)
        self._say(f"boot 2 layout: disks {moved}, NIC -> virtio, temporary disk removed")
        return {"system_disk": new_key, "disks": {old: new for old, _value, new in moves}}

    def _remove_temp(self, before: dict[str, Any]) -> None:
        self.target.remove_volume(self.vmid, before["temp_volid"])

    def _boot2(self) -> dict[str, Any]:
        # Judged as any boot is: I/O on the virtio system disk, no reset loop, network, no STOP code.
        self._say("boot 2 (virtio): watching the guest come up")
        report = self.target.boot_check(self.vmid, timeout=self.options.boot2_wait)
        if report.outcome == BOOT_FAILED:
            self._rollback(report.signal)
        if report.outcome != BOOT_UP:
            self._say(f"boot 2 on virtio is not confirmed: {report.signal}", "warning")
        return _boot_record(report)

    def _rollback(self, what: str) -> None:
        before = self._done("layout1") or {}
        self.target.stop(self.vmid, timeout=5)
        moves = _moves(before, self.options.bus)
        updates = {old: value for old, value, _new in moves}
        updates["boot"] = before["boot"] or f"order={before['system_key']}"
        if before["net0"]:
            updates["net0"] = before["net0"]
        delete = tuple(new for _old, _value, new in moves if new not in updates)
        self.target.set_config(self.vmid, updates, delete=delete)
        report = self.target.boot_check(self.vmid, timeout=self.options.boot2_wait)
        self.target.stop(self.vmid, timeout=self.options.shutdown_timeout)
        back = {BOOT_UP: f"it boots there again ({report.signal})",
                BOOT_FAILED: f"but it fails there too ({report.signal})"}.get(
                    report.outcome, f"its boot there is not confirmed ({report.signal})")
        # Start the next attempt from the IDE layout: the dance's records go.
        self.state.remove()
        raise DanceError(
            f"VM {self.vmid} did not boot on virtio ({what}): the guest has no virtio storage driver; "
            f"rolled back to {before['system_key']}, {back}",
            hint="install the viostor driver in the guest, then run: v2p dance "
                 f"{self.vmid} --bus {self.options.bus}")


def _confirmed(boot2: dict[str, Any]) -> bool:
    """Whether boot 2 was seen up (a record from before boot checks had outcomes: its word)."""
    return bool(boot2.get("outcome") == BOOT_UP or boot2.get("confirmed_by"))


def _boot_record(report: BootReport) -> dict[str, Any]:
    """What the dance keeps of a boot check: how it ended, what said so, and the signs seen."""
    return {"outcome": report.outcome, "signal": report.signal, "seconds": report.seconds,
            "resets": report.resets, "signs": report.signs}


# What each part of a dance record must hold: the fields the steps, a rerun and the pipeline read.
_REQUEST: dict[str, FieldType] = {"bus": str, "iso_volid": str, "net_drivers": bool}
_RESULT: dict[str, FieldType] = {"bus": str, "system_disk": str, "confirmed": bool}
_STEP_FIELDS: dict[str, dict[str, FieldType]] = {
    "layout1": {"system_key": str, "system_value": str, "temp_key": str, "temp_volid": str, "net0": str,
                "boot": str},
    "layout2": {"system_disk": str},
}
_STEP_OPTIONAL: dict[str, dict[str, FieldType]] = {
    "layout1": {"moves": list, "cd_key": str, "cd_value": str, "scsihw": str},
}


def load_record(state: MigrationState) -> bool:
    """Load a dance record (``<vmid>.dance.json``) and check it holds what the dance reads;
    return whether there was one.

    A damaged record is a one-line ``StateError`` naming the file, never a guess: it is not
    treated as absent, since a dance half done (a temporary disk and the drivers ISO attached,
    disks moved to virtio) cannot be told from the VM's config alone, and redoing it from there
    would plan the moves from the wrong layout. The hint says how to start afresh.
    """
    hint = (f"check the VM's disks and CD-ROM (v2p vm show {state.vmid}: a dance half done leaves a "
            f"temporary disk and the drivers ISO attached), then delete {state.path} and run the dance again")

    def damaged(what: str) -> StateError:
        return StateError(f"{state.path}: dance record is damaged: {what}", hint=hint)

    try:
        if not state.load():
            return False
    except StateError as exc:
        if exc.hint == state.discard_hint:
            raise StateError(exc.message, hint=hint) from None
        raise
    data = state.data
    check_fields(data["request"], _REQUEST, "request.", damaged)
    if data["finished"]:
        if "result" not in data:
            raise damaged("it is finished but has no result")
        check_fields(data["result"], _RESULT, "result.", damaged)
    stages = data["stages"]
    for index, step in enumerate(STEPS):
        if step not in stages:
            continue
        missing = [earlier for earlier in STEPS[:index] if earlier not in stages]
        if missing:
            raise damaged(f"step {step} is recorded, but not {missing[0]} before it")
        result = stages[step]["result"]
        check_fields(result, _STEP_FIELDS.get(step, {}), f"stages.{step}.result.", damaged)
        check_fields(result, _STEP_OPTIONAL.get(step, {}), f"stages.{step}.result.", damaged, optional=True)
        if step == "layout1":
            for move in result.get("moves", []):
                if not (isinstance(move, list) and len(move) == 3 and all(isinstance(m, str) for m in move)):
                    raise damaged(f"stages.layout1.result.moves holds {str(move)[:40]!r}, not [old key, value, "
                                  "new key]")
            if "moves" in result and not result["moves"]:
                raise damaged("stages.layout1.result.moves is empty (the system disk moves at least)")
    return True


def _plan_moves(config: VMConfig, system_key: str, prefix: str, vmid: int) -> list[tuple[str, str, str]]:
    """(old key, value, new key) for each disk layout 2 moves: the system disk onto ``prefix``0,
    then every other IDE/SATA disk in the order the first boot had them (IDE, then SATA)."""
    others = sorted((key for key, value in config.items() if _FIRST_BOOT_KEY.match(key) and key != system_key
                     and not drive_is_cdrom(value) and drive_volume(value) != "none"),
                    key=lambda key: (not key.startswith("ide"), int(re.sub(r"\D", "", key))))
    moving = [system_key, *others]
    # A disk already on the target bus that does not move keeps its key.
    free = [key for key in SLOTS[prefix] if key not in config or key in moving]
    if len(free) < len(moving):
        raise DanceError(f"VM {vmid}: {len(moving)} disks to move onto {prefix}, but only {len(free)} "
                         f"{prefix} slots are free", hint="use --bus scsi (31 slots)" if prefix == "virtio" else None)
    return [(old, config[old], new) for old, new in zip(moving, free, strict=False)]


def _moves(layout1: dict[str, Any], bus: str) -> list[tuple[str, str, str]]:
    """The moves a layout 1 record planned; a record written before every disk moved has only the system disk."""
    if "moves" in layout1:
        return [(old, value, new) for old, value, new in layout1["moves"]]
    return [(layout1["system_key"], layout1["system_value"], "virtio0" if bus == "virtio" else "scsi0")]


def _own_cd(value: str, iso_volid: str) -> str:
    """The VM's own CD-ROM drive; "" if it is the drivers ISO (a layout 1 rerun after a crash
    finds the ISO it had attached already)."""
    return "" if drive_volume(value) == iso_volid else value


def _system_disk(config: VMConfig) -> str:
    booted, _nics = boot_devices(config)
    if booted is not None:
        return booted
    disks = sorted(k for k in config if DISK_KEY.match(k) and not drive_is_cdrom(config[k]))
    if not disks:
        raise TargetError("the VM has no disk to move to virtio")
    return disks[0]

