"""The stages of a migration, each small: ``run`` does the work and returns its
record; ``holds`` says whether a recorded result is still true, so a resumed
run can skip it.

Stages talk to the target through the ``Target`` interface only and to the
state file through the pipeline only.
"""

from __future__ import annotations

from . import pveconfig
from .boot_outcomes import BOOT_SKIPPED, BootFailed, boot_outcome, failed_hint
from .bootwatch import clean
from .convert import same_files
from .dance import DanceOptions, DriverDance
from .errors import (
    SourceError,
    TargetError,
    V2PError,
)
from .events import Event
from .options import MigrationOptions
from .stage_checks import boot_layout, ours, preflight_checks, upload_progress
from .stage_context import Context, Record, disk_stage
from .state import FieldType
from .targets.base import BOOT_FAILED, BOOT_UNCONFIRMED, BOOT_UP, ByteProgress, KeyProgress
from .testhooks import hold_point
from .windows import Checkpoint, StaleCheckpoint

GUEST_LINES = 20  # the guest's last serial lines shown after a boot check
CHECK_STOP_GRACE = 5.0  # seconds the boot check's VM gets to act on the power button



class Stage:
    """One step of the pipeline."""

    name = "stage"
    summary = ""
    # The fields of its record that ``holds`` and later stages read: a resumed run checks
    # them on load, so a damaged state file is one clear error instead of a traceback.
    fields: dict[str, FieldType] = {}
    disk: int | None = None  # the disk a per-disk stage works on (its events say so)

    def run(self, ctx: Context) -> Record:
        raise NotImplementedError

    def holds(self, ctx: Context, record: Record) -> bool:
        """A recorded check stays true; stages that produce something re-check it."""
        return True

    def applies(self, options: MigrationOptions) -> bool:
        """Whether the stage does anything for a VM with these (resolved) options; one that does not
        only records that it was skipped, and a dry run does not list it."""
        return True


class Inspect(Stage):
    name = "inspect"
    summary = "read the VM's hardware and every disk's flavor and extents, refuse anything unsafe"
    fields = {"spec": dict, "disks": list, "files": list}

    def run(self, ctx: Context) -> Record:
        ctx.close_inputs()
        disks = []
        for index, disk in enumerate(ctx.disks()):
            given = ctx.facts(index)
            for kind, text in given.messages:
                ctx.emit(Event("warning" if kind == "warning" else "info", self.name, text, disk=index))
            image = given.image
            chain = f", snapshot chain of {len(image.chain)}" if image is not None and image.parent else ""
            boot = f", boot signature {image.boot_signature}" if image is not None else ""
            where = image.path.name if image is not None else disk.source
            ctx.emit(Event("info", self.name, f"{where}: {given.flavor}, {given.capacity} bytes"
                           + (f", {len(image.extents)} extent(s)" if image is not None else "") + chain + boot,
                           disk=index))
            disks.append({"label": disk.label, "source": disk.source, "capacity": given.capacity,
                          "flavor": given.flavor, "chain": len(image.chain) if image is not None else 1,
                          **boot_layout(given),
                          "image": image.to_dict() if image is not None else None})
        for text in ctx.source.notices():
            ctx.emit(Event("warning", self.name, text))
        record = {"spec": ctx.spec.to_dict(), "disks": disks, "files": ctx.source.fingerprint()}
        if ctx.spec.guest_ips():  # read while the guest still runs: the end of the migration shows them
            record["guest_ips"] = ctx.spec.guest_ips()
        return record

    def holds(self, ctx: Context, record: Record) -> bool:
        try:
            return same_files(record["files"], ctx.source.fingerprint())
        except (SourceError, OSError):
            return False


class Preflight(Stage):
    name = "preflight"
    summary = "rules, VMID free, target rights and bridges, storage usable with room for every disk, QEMU present"
    fields = {"storage": str, "format": str, "findings": list}

    def run(self, ctx: Context) -> Record:
        # The checks make nothing (a dry run makes the same ones: stage_checks.preflight_checks); what
        # this stage makes is the drivers ISO's upload among them and, last, the source made fit to read.
        record = preflight_checks(ctx, upload=True)
        prepared = ctx.prepare_source(self.name)  # last: a VM is shut down only when all else says go
        if prepared:
            record["source"] = prepared
        return record


def _ours(ctx: Context) -> bool:
    return ours(ctx)


class Create(Stage):
    name = "create"
    summary = "create the VM shell (hardware from the source, no disk yet)"
    fields = {"config": dict}

    def run(self, ctx: Context) -> Record:
        config = pveconfig.vm_config(ctx.spec, ctx.options, bridges=ctx.options.networks,
                                     default_bridge=ctx.options.bridge, tag=ctx.tag(), mac_seed=ctx.migration_id,
                                     ostype=ctx.options.ostype)
        if _ours(ctx):
            ctx.target.destroy_vm(ctx.vmid)
        ctx.target.create_vm(ctx.vmid, config)
        if ctx.spec.firmware == "efi":
            # The VM's own UEFI variable store, numbered after its data disks (which keep VMware's order).
            config["efidisk0"] = ctx.target.efidisk(ctx.vmid, storage=ctx.options.storage,
                                                    secure=ctx.spec.secure_boot, index=len(ctx.disks()))
            ctx.target.set_config(ctx.vmid, {"efidisk0": config["efidisk0"]})
        return {"config": config}

    def holds(self, ctx: Context, record: Record) -> bool:
        return _ours(ctx)


class Convert(Stage):
    """Disk ``index`` of the VM written through the target's disk sink (``convert`` for the boot
    disk, ``convert:N`` after it), into a temporary volume until it is verified."""

    summary = "write the disk onto the target storage (a temporary volume until verified)"
    fields = {"volid": str, "fmt": str, "fingerprint": dict}

    def __init__(self, index: int = 0) -> None:
        self.index = self.disk = index
        self.name = disk_stage("convert", index)

    def run(self, ctx: Context) -> Record:
        sink, capacity = ctx.sink(self.index), ctx.facts(self.index).capacity
        source = ctx.copy_source(self.index, self.name)
        try:
            files: object = ctx.source.fingerprint()  # what a checkpoint applies to
        except (V2PError, OSError):
            files = None  # unknown now: no checkpoint of this run is taken up again

        def progress(done: int, moved: int) -> None:
            ctx.emit(Event.progress(self.name, done, capacity, disk=self.index, moved=moved))

        def checkpoint(point: Checkpoint) -> None:
            ctx.checkpoint({"stage": self.name, "disk": self.index, "total": capacity, "volid": sink.volid,
                            "copied_with": ctx.options.copy_with, "source": files, **point.record()})
            hold_point(f"{self.name}:window:{point.done // point.window}")

        def write(start: Checkpoint | None) -> None:
            if ctx.options.copy_with == "dd":  # preflight refused dd for anything but plain raw data
                sink.write_dd(source, progress=progress, start=start, on_checkpoint=checkpoint)
            else:
                bwlimit = ctx.options.bwlimit * 1024 if ctx.options.bwlimit else None
                sink.write(source, capacity=capacity, progress=progress, bwlimit=bwlimit, start=start,
                           on_checkpoint=checkpoint)

        start = self._resume_point(ctx, capacity, files)
        try:
            write(start)
        except StaleCheckpoint as exc:
            self._starts_over(ctx, exc.message)
            write(None)
        return {"volid": sink.volid, "fmt": sink.fmt, "copied_with": ctx.options.copy_with,
                "fingerprint": sink.fingerprint()}

    def _starts_over(self, ctx: Context, why: str) -> None:
        ctx.emit(Event("info", self.name, f"disk {self.index}: the copy an earlier run stopped cannot go on "
                       f"({why}): it starts over", disk=self.index))

    def _resume_point(self, ctx: Context, capacity: int, files: object) -> Checkpoint | None:
        """The checkpoint an earlier run left for this disk, if it still applies to the source and the
        request (the sink checks the destination); a line says why one that does not is dropped."""
        saved = ctx.saved_progress
        if not isinstance(saved, dict) or saved.get("stage") != self.name:
            return None
        point = Checkpoint.of(saved)
        why = "its checkpoint is damaged" if point is None else \
            "the disk's size changed" if saved.get("total") != capacity else \
            "the source changed since" if files is None or saved.get("source") != files else \
            "it goes to another volume now" if saved.get("volid") != ctx.sink(self.index).volid else \
            f"it was copied with {saved.get('copied_with')}" if saved.get("copied_with") != ctx.options.copy_with \
            else None
        if why is not None or point is None:
            self._starts_over(ctx, str(why))
            return None
        ctx.emit(Event("info", self.name, f"disk {self.index}: the copy goes on at byte {point.done} of {capacity} "
                       f"({100 * point.done // capacity} %), where an earlier run stopped", disk=self.index))
        return point

    def holds(self, ctx: Context, record: Record) -> bool:
        sink = ctx.sink(self.index)
        if ctx.guest_owns_disk:  # it writes, a qcow2 grows: only that it is still there
            return sink.exists() or sink.written()
        return bool(sink.volid == record["volid"] and sink.fingerprint() == record["fingerprint"])


class Verify(Stage):
    """Disk ``index``: compared with the source, then given its final name."""

    summary = "compare the written disk with the source, then give the volume its final name"
    fields = {"volid": str, "verified": bool, "fingerprint": dict}

    def __init__(self, index: int = 0) -> None:
        self.index = self.disk = index
        self.name = disk_stage("verify", index)

    def run(self, ctx: Context) -> Record:
        sink = ctx.sink(self.index)
        # A run killed (or out of space for its state file) between the rename and the record
        # left the volume under its final name: the sink verifies it wherever it is.
        if ctx.options.verify:
            sink.verify(ctx.copy_source(self.index, self.name), capacity=ctx.facts(self.index).capacity,
                        progress=self._compared(ctx))
        else:
            ctx.emit(Event("warning", self.name, "--no-verify: the written disk was not compared", disk=self.index))
        ctx.drop_stage(self.index)
        volid = sink.commit(progress=upload_progress(ctx, self.name, f"disk {self.index}", self.index))
        hold_point(f"{self.name}:committed")
        return {"volid": volid, "verified": ctx.options.verify, "fingerprint": sink.fingerprint()}

    def _compared(self, ctx: Context) -> ByteProgress:
        """The compare's progress as events of step ``compare`` (bytes of the disk compared so far)."""
        def report(done: int, total: int) -> None:
            ctx.emit(Event.progress(self.name, done, total, disk=self.index, step="compare"))
        return report

    def holds(self, ctx: Context, record: Record) -> bool:
        if ctx.options.verify and not record.get("verified") and not ctx.guest_owns_disk:
            return False  # recorded with --no-verify, asked for now (too late once the guest wrote to it)
        sink = ctx.sink(self.index)
        if ctx.guest_owns_disk:
            return sink.exists()
        return sink.exists() and sink.fingerprint() == record["fingerprint"]


class Attach(Stage):
    name = "attach"
    summary = "attach every disk (IDE/SATA for Windows, SCSI otherwise), the boot disk first in the boot order"
    fields = {"keys": dict}

    def run(self, ctx: Context) -> Record:
        assert ctx.options.ostype is not None
        placed = pveconfig.disk_keys(ctx.spec, ctx.options, ostype=ctx.options.ostype)
        by_label = {disk.label: index for index, disk in enumerate(ctx.disks())}
        updates: dict[str, str] = {}
        for disk, key in placed:
            index = by_label[disk.label]
            volid = ctx.records[disk_stage("verify", index)]["volid"]
            updates[key] = pveconfig.disk_value(volid, ctx.facts(index).capacity)
        updates["boot"] = pveconfig.boot_order([key for _disk, key in placed])
        current = ctx.target.get_config(ctx.vmid)
        keys = {key: updates[key] for _disk, key in placed}
        for disk, key in placed:
            if key in current and ctx.sink(by_label[disk.label]).attached(current[key]):
                # A killed run's import that the target finished without it (PVE's import goes on; one
                # import per disk): sent again, it would be a second copy of the disk.
                keys[key] = current[key]
                del updates[key]
        if len(updates) == 1:
            ctx.emit(Event("info", self.name, "the disks were attached by an earlier run (its import finished "
                           "after it stopped)"))
        elif len(updates) <= len(placed):
            ctx.emit(Event("info", self.name, f"{', '.join(k for k in keys if k not in updates)}: attached by an "
                           "earlier run (its import finished after it stopped)"))
        if current.get("boot") == updates["boot"]:
            del updates["boot"]
        if updates:
            before = set(current.values())
            ctx.target.set_config(ctx.vmid, updates, progress=self._import_progress(
                ctx, {key: by_label[disk.label] for disk, key in placed}))
            self._drop_duplicates(ctx, before)
        return {"keys": keys}

    def _import_progress(self, ctx: Context, disks: dict[str, int]) -> KeyProgress:
        """A copy the target makes of a disk as it is attached (PVE's import task), as ``progress``
        events of the step ``import``: bytes of the disk, as its convert has them."""
        def report(key: str, done: int, total: int) -> None:
            ctx.emit(Event.progress(self.name, done, total, disk=disks[key], step="import", moved=done))
        return report

    @staticmethod
    def _drop_duplicates(ctx: Context, before: set[str]) -> None:
        """A disk volume of this migration's that turned up unused while the disks were attached is
        an earlier run's copy of a disk (its import finished just as this one began, and PVE made
        this run's copy the disk): deleted, so no second copy of a disk stays behind."""
        for key, value in ctx.target.get_config(ctx.vmid).items():
            if key.startswith("unused") and value not in before and \
                    any(ctx.sink(index).attached(value) for index in range(len(ctx.disks()))):
                ctx.emit(Event("info", "attach", f"{value}: an earlier run's copy of a disk ({key}), removed"))
                ctx.target.remove_volume(ctx.vmid, value)

    def holds(self, ctx: Context, record: Record) -> bool:
        # The driver dance moves the disks (ide0 -> virtio0): attached anywhere still counts.
        try:
            values = list(ctx.target.get_config(ctx.vmid).values())
        except TargetError:
            return False
        return all(any(ctx.sink(index).attached(value) for value in values) for index in range(len(ctx.disks())))


class Drivers(Stage):
    name = "drivers"
    summary = "Windows onto virtio: the two-boot driver dance (IDE first, then virtio)"

    def applies(self, options: MigrationOptions) -> bool:
        return options.needs_dance

    def run(self, ctx: Context) -> Record:
        if not ctx.options.needs_dance:
            return {"skipped": True}
        options = DanceOptions(bus=ctx.options.bus or "virtio",
                               iso_volid=ctx.records["preflight"]["drivers_iso"],
                               net_drivers=ctx.options.net_drivers, boot1_wait=ctx.options.dance_wait,
                               boot2_wait=ctx.options.boot_timeout,  # boot 2 is this migration's boot check
                               shutdown_timeout=ctx.options.shutdown_timeout)
        return DriverDance(ctx.target, ctx.vmid, options, emit=ctx.emit).run()


class BootCheck(Stage):
    name = "boot"
    summary = "boot the VM and watch for a sign that its OS runs (or that it failed)"

    def applies(self, options: MigrationOptions) -> bool:
        return options.boot_check or options.needs_dance  # the dance's second boot is judged here

    def run(self, ctx: Context) -> Record:
        dance = ctx.records.get("drivers", {})
        boot2 = dance.get("boot2")
        boot2 = boot2 if isinstance(boot2, dict) else {}
        if dance.get("confirmed") or boot2.get("outcome") == BOOT_UNCONFIRMED:
            # The dance's boot 2 (on virtio) was a boot check of this very layout: a second one would
            # see what it saw (an unconfirmed boot 2 stays unconfirmed, it is not booted again).
            seen = dance_boot(dance)
            if seen["outcome"] == BOOT_FAILED:
                raise BootFailed(f"VM {ctx.vmid} did not boot on virtio: {seen['signal']}",
                                 hint=failed_hint(seen["signal"]), record=seen)
            return {"skipped": "the driver dance's second boot (on virtio) was the boot check", **seen}
        if not ctx.options.boot_check:
            return {"skipped": True}
        report = ctx.target.boot_check(ctx.vmid, timeout=ctx.options.boot_timeout)
        # A real guest prints hundreds of kernel lines: its last words are what tell.
        lines = [line.strip() for line in clean(report.serial).splitlines() if line.strip()]
        for line in lines[-GUEST_LINES:]:
            ctx.emit(Event("info", self.name, f"guest: {line}"))
        outcome, signal = boot_outcome({"outcome": report.outcome, "signal": report.signal})
        if outcome == BOOT_SKIPPED:  # a target's word this stage does not know: claim nothing
            outcome, signal = BOOT_UNCONFIRMED, f"the check ended as {report.outcome!r}: {report.signal}"
        for sign, seen in report.signs.items():
            ctx.emit(Event("info", self.name, f"sign: {sign} at {seen.get('at', '?')}s"
                           + (f" ({seen['value']})" if seen.get("value") not in (None, "") else "")))
        record = {"outcome": outcome, "signal": signal, "signs": dict(report.signs), "seconds": report.seconds,
                  "accel": report.accel, "resets": report.resets, "notes": list(report.notes),
                  "serial": report.serial[-4096:]}
        accel = f" ({report.accel})" if report.accel else ""
        if outcome == BOOT_FAILED:
            ctx.emit(Event("info", self.name, f"boot failed after {report.seconds}s: {signal}{accel}"))
            raise BootFailed(f"VM {ctx.vmid} did not boot: {signal}", hint=failed_hint(signal), record=record)
        if outcome == BOOT_UNCONFIRMED:
            ctx.emit(Event("warning", self.name, f"boot not confirmed after {report.seconds}s: {signal}{accel}"))
        else:
            ctx.emit(Event("info", self.name, f"guest up after {report.seconds}s: {signal}{accel}"))
        for note in report.notes:
            ctx.emit(Event("info", self.name, note))
        return record

    def holds(self, ctx: Context, record: Record) -> bool:
        if record.get("outcome") == BOOT_FAILED:
            return False  # a rerun boots it again (the user may have fixed the VM meanwhile)
        return not (ctx.options.boot_check and record.get("skipped") is True)


def dance_boot(dance: Record) -> Record:
    """The boot outcome of a driver dance's second boot (on virtio): its own boot-2 record where it
    says one (up or unconfirmed: the dance rolls back a failed one), else up (a record from before
    boot checks had outcomes, which the dance kept only when it saw the guest up)."""
    boot2 = dance.get("boot2")
    boot2 = boot2 if isinstance(boot2, dict) else {}
    outcome, signal = boot_outcome(boot2 if "outcome" in boot2 else None)
    if outcome == BOOT_SKIPPED:
        by = boot2.get("confirmed_by")
        outcome, signal = BOOT_UP, {"guest": "the guest's own word on virtio (the driver dance's second boot)",
                                    "still running": "the driver dance's second boot ran on virtio without a "
                                                     "STOP code"}.get(str(by), "the driver dance's second boot")
    return {"outcome": outcome, "signal": signal}


class Finish(Stage):
    name = "finish"
    summary = "start the VM or leave it stopped; report"

    def run(self, ctx: Context) -> Record:
        record: Record = {}
        status = ctx.target.status(ctx.vmid)
        if ctx.options.start:
            if status == "running":
                ctx.target.release(ctx.vmid)  # the checked boot becomes the user's VM
            else:
                ctx.target.start(ctx.vmid)
        elif status == "running":
            # The boot check's own VM has nothing of the user's to save: a guest that does not
            # act on the power button at once is stopped hard (QEMU still flushes the disk).
            checked = "outcome" in ctx.records.get("boot", {}) and ctx.target.held(ctx.vmid)
            grace = CHECK_STOP_GRACE if checked else 30.0
            clean = ctx.target.stop(ctx.vmid, timeout=grace)
            record["stopped"] = "power button" if clean else "hard"
        status = ctx.target.status(ctx.vmid)
        how = ""
        if "stopped" in record:
            how = " (it shut down on the power button)" if record["stopped"] == "power button" else \
                f" (stopped hard: no shutdown within {grace:g}s of the power button)"
        ctx.emit(Event("info", self.name, f"VM {ctx.vmid} is {status}{how}"))
        return {**record, "status": status, "config": ctx.target.get_config(ctx.vmid)}


def stages_for(disks: int) -> tuple[Stage, ...]:
    """The stages of a VM with ``disks`` disks: each disk converted and verified in turn, boot disk first."""
    per_disk: list[Stage] = []
    for index in range(max(disks, 1)):
        per_disk += [Convert(index), Verify(index)]
    return (Inspect(), Preflight(), Create(), *per_disk, Attach(), Drivers(), BootCheck(), Finish())


STAGES: tuple[Stage, ...] = stages_for(1)  # a one-disk VM's; the names `v2p status` lists


def stage_kind(name: str) -> str:
    """``convert:2`` -> ``convert``: the stage a record name belongs to."""
    return name.partition(":")[0]
