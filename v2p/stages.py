"""The stages of a migration, each small: ``run`` does the work and returns its
record; ``holds`` says whether a recorded result is still true, so a resumed
run can skip it.

Stages talk to the target through the ``Target`` interface only and to the
state file through the pipeline only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import convert, drivers
from .bootwatch import clean
from .dance import DanceOptions, DriverDance
from .errors import SourceError, TargetError, VMIDExistsError
from .events import Event, EventHandler
from .inspect import DiskImage, inspect_disk
from .options import MigrationOptions, OptionError, mac_for
from .runner import which
from .state import FieldType
from .storage import Storage, Volume
from .targets.base import Target
from .testhooks import hold_point

Record = dict[str, Any]
GUEST_LINES = 20  # the guest's last serial lines shown after a boot check
CHECK_STOP_GRACE = 5.0  # seconds the boot check's VM gets to act on the power button


@dataclass
class Context:
    """What every stage of one migration may read."""

    source: Path
    vmid: int
    options: MigrationOptions
    target: Target
    migration_id: str
    workdir: Path
    emit: EventHandler
    image: DiskImage | None = None
    records: dict[str, Record] = field(default_factory=dict)
    recorded: set[str] = field(default_factory=set)  # stages the state file had when this run began
    _storage: Storage | None = None

    @property
    def guest_owns_disk(self) -> bool:
        """Once attached, the disk is the guest's: it writes to it on every boot."""
        return "attach" in self.recorded

    def disk(self) -> DiskImage:
        if self.image is None:
            self.image = inspect_disk(self.source)
        return self.image

    def qemu_source(self) -> convert.Source:
        return convert.qemu_source(self.disk(), self.workdir)

    def storage(self) -> Storage:
        """The storage the disk goes to (looked up once: the target reads its storage.cfg)."""
        if self._storage is None:
            if self.options.device:
                self._storage = self.target.device_storage(self.options.device)
            else:
                self._storage = self.target.storage(self.options.storage)
        return self._storage

    def fmt(self) -> str:
        """The disk format: asked for, or the storage's preferred one; refused if it cannot hold it."""
        storage = self.storage()
        fmt = self.options.fmt or storage.formats()[0]
        if fmt not in storage.formats():
            raise OptionError(f"--format {fmt}: {storage.describe()} holds {'/'.join(storage.formats())} "
                              "volumes only", hint="leave --format out to get the storage's own format")
        return fmt

    def tag(self) -> str:
        return f"v2p migration {self.migration_id}"


class Stage:
    """One step of the pipeline."""

    name = "stage"
    summary = ""
    # The fields of its record that ``holds`` and later stages read: a resumed run checks
    # them on load, so a damaged state file is one clear error instead of a traceback.
    fields: dict[str, FieldType] = {}

    def run(self, ctx: Context) -> Record:
        raise NotImplementedError

    def holds(self, ctx: Context, record: Record) -> bool:
        """A recorded check stays true; stages that produce something re-check it."""
        return True


class Inspect(Stage):
    name = "inspect"
    summary = "identify the disk's flavor and extents, refuse anything unsafe"
    fields = {"image": dict, "files": list}

    def run(self, ctx: Context) -> Record:
        ctx.image = None
        image = ctx.disk()
        for kind, text in image.messages:
            ctx.emit(Event("warning" if kind == "warning" else "info", self.name, text))
        chain = f", snapshot chain of {len(image.chain)}" if image.parent else ""
        ctx.emit(Event("info", self.name, f"{image.path.name}: {image.flavor}, "
                       f"{image.capacity} bytes, {len(image.extents)} extent(s){chain}, "
                       f"boot signature {image.boot_signature}"))
        return {"image": image.to_dict(), "files": convert.source_fingerprint(image)}

    def holds(self, ctx: Context, record: Record) -> bool:
        try:
            return convert.source_fingerprint(ctx.disk()) == record["files"]
        except (SourceError, OSError):
            return False


class Preflight(Stage):
    name = "preflight"
    summary = "VMID free, storage usable with room for the disk, QEMU present"
    fields = {"storage": str, "format": str}

    def run(self, ctx: Context) -> Record:
        if ctx.target.vm_exists(ctx.vmid) and not _ours(ctx):
            raise VMIDExistsError(f"VMID {ctx.vmid} already exists on the {ctx.target.kind} target",
                                  hint=f"pick another --vmid, or remove it: v2p vm rm {ctx.vmid}")
        storage = ctx.storage()
        fmt = ctx.fmt()
        image = ctx.disk()
        if ctx.options.copy_with == "dd" and not image.is_plain_raw:
            raise OptionError(f"--copy-with dd: {image.path.name} is {image.flavor}, dd copies raw data only",
                              hint="leave --copy-with out: qemu-img reads every flavor")
        if ctx.options.copy_with == "dd" and fmt != "raw":
            raise OptionError("--copy-with dd writes raw disks only", hint="add --format raw")
        storage.check(image.capacity, force=ctx.options.force)
        required = storage.required_bytes(image.capacity, convert.measure(ctx.qemu_source(), fmt))
        free = storage.free_bytes()
        if required > free:
            raise TargetError(f"not enough space on {storage.describe()}: the disk needs {required} bytes, "
                              f"{free} are free", hint="free some space or choose another --storage")
        if ctx.options.boot_check or ctx.options.start or ctx.options.needs_dance:
            which("qemu-system-x86_64")
        record: Record = {"storage": storage.describe(), "format": fmt, "required_bytes": required,
                          "free_bytes": free}
        if ctx.options.needs_dance:
            record.update(check_drivers(ctx.target, ctx.options))
        return record


def check_drivers(target: Target, options: MigrationOptions) -> Record:
    """Find the drivers ISO and make sure it has what this Windows needs (before anything is made)."""
    given = options.drivers_iso
    if given and "," in given:
        raise OptionError(f"drivers ISO {given}: a path with a comma cannot go into a VM config",
                          hint="rename or link the ISO")
    if given and ":" in given and not given.startswith("/"):
        path = target.storage(given.split(":", 1)[0]).path_of(given)  # a PVE volid: local:iso/NAME.iso
        volid = given
    else:
        path = drivers.locate(given, target.iso_places())
        volid = str(path.resolve())
    iso = drivers.read_iso(path)
    storage_driver = "viostor" if options.bus == "virtio" else "vioscsi"
    wanted = (storage_driver, "NetKVM") if options.net_drivers else (storage_driver,)
    folders = iso.require(wanted, options.ostype, options.arch)
    return {"drivers_iso": volid, "driver_folders": folders}


def _ours(ctx: Context) -> bool:
    try:
        return ctx.tag() in ctx.target.get_config(ctx.vmid).get("description", "")
    except TargetError:
        return False


class Create(Stage):
    name = "create"
    summary = "create the VM shell (no disk yet)"
    fields = {"config": dict}

    def run(self, ctx: Context) -> Record:
        opts = ctx.options
        config = {
            "name": opts.name or _vm_name(ctx.source),
            "cores": str(opts.cores),
            "memory": str(opts.memory),
            "ostype": opts.ostype,
            "bios": "seabios",
            "scsihw": opts.scsihw,
            "net0": f"{opts.nic_model}={mac_for(ctx.vmid, ctx.source)},bridge=vmbr0",
            "description": f"imported from {ctx.source.name} ({ctx.tag()})",
        }
        if _ours(ctx):
            ctx.target.destroy_vm(ctx.vmid)
        ctx.target.create_vm(ctx.vmid, config)
        return {"config": config}

    def holds(self, ctx: Context, record: Record) -> bool:
        return _ours(ctx)


def _vm_name(source: Path) -> str:
    stem = source.name.removesuffix(".vmdk").removesuffix("-flat")
    clean = "".join(c if c.isalnum() or c == "-" else "-" for c in stem).strip("-")
    return clean[:63] or "imported-vm"


class Convert(Stage):
    name = "convert"
    summary = "write the disk onto the target storage (a temporary volume until verified)"
    fields = {"volid": str, "partial_volid": str, "partial": str, "fmt": str, "block": bool, "fingerprint": dict}

    def run(self, ctx: Context) -> Record:
        storage, fmt, image = ctx.storage(), ctx.fmt(), ctx.disk()
        final = storage.volume(ctx.vmid, 0, fmt)
        partial = storage.allocate(ctx.vmid, 0, fmt, image.capacity, force=ctx.options.force)
        zero = storage.reads_as_zero(partial)

        def progress(percent: float) -> None:
            ctx.emit(Event("progress", self.name, data={
                "percent": percent, "bytes": int(image.capacity * percent / 100), "total": image.capacity}))

        try:
            if ctx.options.copy_with == "dd":
                convert.copy_dd(image, partial, target_is_zero=zero, on_progress=progress)
            else:
                bwlimit = ctx.options.bwlimit * 1024 if ctx.options.bwlimit else None
                convert.convert(ctx.qemu_source(), partial, capacity=image.capacity, target_is_zero=zero,
                                bwlimit=bwlimit, on_progress=progress)
        except BaseException:
            storage.remove(partial)
            raise
        return {"volid": final.volid, "partial_volid": partial.volid, "partial": str(partial.path),
                "fmt": fmt, "block": partial.is_block, "copied_with": ctx.options.copy_with,
                "target_was_zero": zero, "fingerprint": convert.fingerprint(partial.path)}

    def holds(self, ctx: Context, record: Record) -> bool:
        paths = [Path(record["partial"])]
        try:
            paths.append(ctx.storage().path_of(record["volid"]))
        except TargetError:
            pass
        return any(_same_file(path, record["fingerprint"], ctx.guest_owns_disk) for path in paths)


def _same_file(path: Path, fingerprint: dict[str, Any], guest_owned: bool = False) -> bool:
    """Whether ``path`` is still what was written; once the guest owns it (it writes, a
    qcow2 grows), only that it is still there."""
    if guest_owned:
        return path.exists()
    try:
        return convert.fingerprint(path) == fingerprint
    except OSError:
        return False


class Verify(Stage):
    name = "verify"
    summary = "compare the written disk with the source, then give the volume its final name"
    fields = {"path": str, "verified": bool, "fingerprint": dict}

    def run(self, ctx: Context) -> Record:
        made = ctx.records["convert"]
        storage = ctx.storage()
        partial = Volume(made["partial_volid"], Path(made["partial"]), made["fmt"], made["block"])
        final = storage.volume(ctx.vmid, 0, made["fmt"])
        # A run killed (or out of space for its state file) between the rename and the
        # record left the written volume under its final name: verify it there.
        committed = partial.path != final.path and not storage.exists(partial) and storage.exists(final)
        written = Volume(final.volid, storage.path_of(final.volid), final.fmt, final.is_block) \
            if committed else partial
        if ctx.options.verify:
            convert.compare(ctx.qemu_source(), written, capacity=ctx.disk().capacity)
        else:
            ctx.emit(Event("warning", self.name, "--no-verify: the written disk was not compared"))
        if not committed:
            storage.commit(partial, final)
            hold_point("verify:committed")
        path = storage.path_of(final.volid)
        return {"path": str(path), "verified": ctx.options.verify, "fingerprint": convert.fingerprint(path)}

    def holds(self, ctx: Context, record: Record) -> bool:
        if ctx.options.verify and not record.get("verified") and not ctx.guest_owns_disk:
            return False  # recorded with --no-verify, asked for now (too late once the guest wrote to it)
        return _same_file(Path(record["path"]), record["fingerprint"], ctx.guest_owns_disk)


class Attach(Stage):
    name = "attach"
    summary = "attach the disk (IDE for Windows, SCSI otherwise) and make it the boot disk"
    fields = {"key": str, "value": str}

    def run(self, ctx: Context) -> Record:
        key = f"{ctx.options.attach_bus}0"
        volid = ctx.records["convert"]["volid"]
        value = f"{volid},size={_pve_size(ctx.disk().capacity)}"
        ctx.target.set_config(ctx.vmid, {key: value, "boot": f"order={key}"})
        return {"key": key, "value": value}

    def holds(self, ctx: Context, record: Record) -> bool:
        # The driver dance moves the disk (ide0 -> virtio0): attached anywhere still counts.
        try:
            return record["value"] in ctx.target.get_config(ctx.vmid).values()
        except TargetError:
            return False


def _pve_size(capacity: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if capacity % (1 << shift) == 0:
            return f"{capacity >> shift}{unit}"
    return str(capacity)


class Drivers(Stage):
    name = "drivers"
    summary = "Windows onto virtio: the two-boot driver dance (IDE first, then virtio)"

    def run(self, ctx: Context) -> Record:
        if not ctx.options.needs_dance:
            return {"skipped": True}
        options = DanceOptions(bus=ctx.options.bus or "virtio",
                               iso_volid=ctx.records["preflight"]["drivers_iso"],
                               net_drivers=ctx.options.net_drivers, boot1_wait=ctx.options.dance_wait,
                               shutdown_timeout=ctx.options.shutdown_timeout)
        return DriverDance(ctx.target, ctx.vmid, options, emit=ctx.emit).run()


class BootCheck(Stage):
    name = "boot"
    summary = "boot the VM and watch it come up"

    def run(self, ctx: Context) -> Record:
        if ctx.records.get("drivers", {}).get("confirmed"):
            return {"skipped": "the driver dance's second boot confirmed the guest is up on virtio"}
        if not ctx.options.boot_check:
            return {"skipped": True}
        report = ctx.target.boot_check(ctx.vmid, timeout=ctx.options.boot_timeout)
        # A real guest prints hundreds of kernel lines: its last words are what tell.
        lines = [line.strip() for line in clean(report.serial).splitlines() if line.strip()]
        for line in lines[-GUEST_LINES:]:
            ctx.emit(Event("info", self.name, f"guest: {line}"))
        ctx.emit(Event("info", self.name, f"guest {report.outcome} after {report.seconds}s: {report.signal} "
                       f"({report.accel})"))
        return {"outcome": report.outcome, "signal": report.signal, "seconds": report.seconds,
                "accel": report.accel, "resets": report.resets, "serial": report.serial[-4096:]}

    def holds(self, ctx: Context, record: Record) -> bool:
        return not (ctx.options.boot_check and record.get("skipped") is True)


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


STAGES: tuple[Stage, ...] = (Inspect(), Preflight(), Create(), Convert(), Verify(), Attach(), Drivers(),
                             BootCheck(), Finish())
