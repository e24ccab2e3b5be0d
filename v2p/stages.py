"""The stages of a migration, each small: ``run`` does the work and returns its
record; ``holds`` says whether a recorded result is still true, so a resumed
run can skip it.

Stages talk to the target through the ``Target`` interface only and to the
state file through the pipeline only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import convert
from .errors import SourceError, TargetError, VMIDExistsError
from .events import Event, EventHandler
from .inspect import DiskImage, inspect_disk
from .options import MigrationOptions, mac_for
from .runner import which
from .targets.base import Target

Record = dict[str, Any]


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

    def disk(self) -> DiskImage:
        if self.image is None:
            self.image = inspect_disk(self.source)
        return self.image

    def qemu_source(self) -> convert.Source:
        return convert.qemu_source(self.disk(), self.workdir)

    def tag(self) -> str:
        return f"v2p migration {self.migration_id}"


class Stage:
    """One step of the pipeline."""

    name = "stage"
    summary = ""

    def run(self, ctx: Context) -> Record:
        raise NotImplementedError

    def holds(self, ctx: Context, record: Record) -> bool:
        """A recorded check stays true; stages that produce something re-check it."""
        return True


class Inspect(Stage):
    name = "inspect"
    summary = "identify the disk's flavor and extents, refuse anything unsafe"

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
    summary = "VMID free, room for the disk, QEMU present"

    def run(self, ctx: Context) -> Record:
        if ctx.target.vm_exists(ctx.vmid) and not _ours(ctx):
            raise VMIDExistsError(f"VMID {ctx.vmid} already exists on the {ctx.target.kind} target",
                                  hint=f"pick another --vmid, or remove it: v2p vm rm {ctx.vmid}")
        volume = ctx.target.allocate_volume(ctx.vmid, ctx.options.fmt, 0)
        required = convert.measure(ctx.qemu_source(), ctx.options.fmt)
        free = ctx.target.free_bytes(volume)
        if required > free:
            raise TargetError(f"not enough space for {volume.volid}: need {required} bytes, "
                              f"{free} free at {volume.path.parent}",
                              hint="free some space or use another --target-dir")
        if ctx.options.boot_check or ctx.options.start:
            which("qemu-system-x86_64")
        return {"volid": volume.volid, "required_bytes": required, "free_bytes": free}


def _ours(ctx: Context) -> bool:
    try:
        return ctx.tag() in ctx.target.get_config(ctx.vmid).get("description", "")
    except TargetError:
        return False


class Create(Stage):
    name = "create"
    summary = "create the VM shell (no disk yet)"

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
    summary = "qemu-img convert into the target storage (temporary name until verified)"

    def run(self, ctx: Context) -> Record:
        volume = ctx.target.allocate_volume(ctx.vmid, ctx.options.fmt, 0)
        partial = _partial(volume.path)
        volume.path.parent.mkdir(parents=True, exist_ok=True)
        volume.path.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
        source = ctx.qemu_source()
        bwlimit = ctx.options.bwlimit * 1024 if ctx.options.bwlimit else None

        def progress(percent: float) -> None:
            ctx.emit(Event("progress", self.name, data={"percent": percent}))

        try:
            convert.convert(source, ctx.options.fmt, partial, capacity=ctx.disk().capacity,
                            bwlimit=bwlimit, on_progress=progress)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return {"volid": volume.volid, "path": str(volume.path), "partial": str(partial),
                "fmt": ctx.options.fmt, "fingerprint": convert.fingerprint(partial)}

    def holds(self, ctx: Context, record: Record) -> bool:
        return any(_same_file(Path(record[key]), record["fingerprint"]) for key in ("partial", "path"))


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.v2p-partial")


def _same_file(path: Path, fingerprint: dict[str, Any]) -> bool:
    try:
        return convert.fingerprint(path) == fingerprint
    except OSError:
        return False


class Verify(Stage):
    name = "verify"
    summary = "qemu-img compare against the source, then give the disk its final name"

    def run(self, ctx: Context) -> Record:
        made = ctx.records["convert"]
        final, partial = Path(made["path"]), Path(made["partial"])
        candidate = partial if partial.exists() else final
        convert.compare(ctx.qemu_source(), candidate, made["fmt"], capacity=ctx.disk().capacity)
        if candidate == partial:
            os.replace(partial, final)
            _fsync_dir(final.parent)
        return {"path": str(final), "fingerprint": convert.fingerprint(final)}

    def holds(self, ctx: Context, record: Record) -> bool:
        return _same_file(Path(record["path"]), record["fingerprint"])


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Attach(Stage):
    name = "attach"
    summary = "attach the disk (IDE for Windows, SCSI otherwise) and make it the boot disk"

    def run(self, ctx: Context) -> Record:
        key = f"{ctx.options.disk_bus}0"
        volid = ctx.records["convert"]["volid"]
        value = f"{volid},size={_pve_size(ctx.disk().capacity)}"
        ctx.target.set_config(ctx.vmid, {key: value, "boot": f"order={key}"})
        return {"key": key, "value": value}

    def holds(self, ctx: Context, record: Record) -> bool:
        try:
            return ctx.target.get_config(ctx.vmid).get(record["key"]) == record["value"]
        except TargetError:
            return False


def _pve_size(capacity: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if capacity % (1 << shift) == 0:
            return f"{capacity >> shift}{unit}"
    return str(capacity)


class BootCheck(Stage):
    name = "boot"
    summary = "boot the VM and watch it come up"

    def run(self, ctx: Context) -> Record:
        if not ctx.options.boot_check:
            return {"skipped": True}
        report = ctx.target.boot_check(ctx.vmid, timeout=ctx.options.boot_timeout)
        for line in report.serial.splitlines():
            if line.strip():
                ctx.emit(Event("info", self.name, f"guest: {line.strip()}"))
        ctx.emit(Event("info", self.name, f"guest {report.outcome} after {report.seconds}s "
                       f"({report.accel})"))
        return {"outcome": report.outcome, "seconds": report.seconds, "accel": report.accel,
                "resets": report.resets, "serial": report.serial[-4096:]}


class Finish(Stage):
    name = "finish"
    summary = "start the VM or leave it stopped; report"

    def run(self, ctx: Context) -> Record:
        status = ctx.target.status(ctx.vmid)
        if ctx.options.start and status != "running":
            ctx.target.start(ctx.vmid)
        elif not ctx.options.start and status == "running":
            ctx.target.stop(ctx.vmid, timeout=30)
        status = ctx.target.status(ctx.vmid)
        ctx.emit(Event("info", self.name, f"VM {ctx.vmid} is {status}"))
        return {"status": status, "config": ctx.target.get_config(ctx.vmid)}


STAGES: tuple[Stage, ...] = (Inspect(), Preflight(), Create(), Convert(), Verify(), Attach(),
                             BootCheck(), Finish())
