"""What the preflight checks before anything is made, apart from the stages that call it: the named
rules for this VM, the boot layout a disk's inspection found, the target's permissions, the drivers
ISO and its folders, and the progress of an upload to the target.
"""

from __future__ import annotations

from pathlib import Path

from . import drivers, pveconfig, rules
from .events import Event
from .options import MigrationOptions, OptionError
from .sources import DiskFacts
from .spec import VMSpec
from .stage_context import Context, Record
from .targets.base import ByteProgress, Target


def check_rules(spec: VMSpec, options: MigrationOptions, disks: list[Record], *,
                chosen_ostype: str | None) -> list[rules.Finding]:
    """The named preflight rules for this VM with these options (``disks``: the inspect stage's rows;
    ``chosen_ostype``: MigrationOptions.chosen_ostype of the user's options)."""
    return rules.check(spec, options, ostype=chosen_ostype, bridges=options.networks,
                       default_bridge=options.bridge, chains={d["label"]: d["chain"] for d in disks},
                       capacities={d["label"]: d["capacity"] for d in disks}, ignore=options.ignore_rules,
                       boots={d["label"]: (d["boot_firmware"], d.get("boot_detail", "")) for d in disks
                              if d.get("boot_firmware")})


def boot_layout(given: DiskFacts) -> Record:
    """An inspect record's ``boot_firmware``/``boot_detail`` (what check_rules' ``boots`` reads)."""
    if given.boot_firmware is None:
        return {}
    firmware, detail = given.boot_firmware
    return {"boot_firmware": firmware, "boot_detail": detail}


def check_access(ctx: Context) -> None:
    """The target's permissions for everything this migration will write (the Create and Attach
    stages' config, the boot check's or --start's power), before anything is made."""
    create = pveconfig.vm_config(ctx.spec, ctx.options, bridges=ctx.options.networks,
                                 default_bridge=ctx.options.bridge, tag=ctx.tag(), mac_seed=ctx.migration_id,
                                 ostype=ctx.options.ostype)
    update: dict[str, str] = {}
    if ctx.spec.firmware == "efi":
        update["efidisk0"] = pveconfig.efidisk(ctx.options.storage, secure_boot=ctx.spec.secure_boot)
    placed = pveconfig.disk_keys(ctx.spec, ctx.options, ostype=ctx.options.ostype or "l26")
    by_label = {disk.label: index for index, disk in enumerate(ctx.disks())}
    for disk, key in placed:  # each disk a new volume on the storage (PVE's STORAGE:GiB)
        update[key] = f"{ctx.options.storage}:{max(1, ctx.facts(by_label[disk.label]).capacity >> 30)}"
    update["boot"] = pveconfig.boot_order([key for _disk, key in placed])
    power = bool(ctx.options.boot_check or ctx.options.start or ctx.options.needs_dance)
    ctx.target.check_access(ctx.vmid, create, update, storage=ctx.options.storage, power=power,
                            dance=bool(ctx.options.needs_dance), drivers_iso=ctx.options.drivers_iso)


def upload_progress(ctx: Context, stage: str, what: str, disk: int | None = None) -> ByteProgress | None:
    """Progress of an upload to the target during ``stage`` (None: the target uploads nothing,
    ``Capabilities.uploads``), as events of the step ``upload``: a line
    when it starts and when all is sent (the target then checks and stores it), ``progress`` events
    with the bytes sent between (``data['bytes']``/``data['total']``, as a disk's write has, and
    ``data['moved']``, the same: every byte of an upload is sent)."""

    def report(done: int, total: int) -> None:
        if done == 0:
            ctx.emit(Event("info", stage, f"upload: sending {what} to the target ({total} bytes; first its "
                           "SHA-256, which the target checks)", disk=disk, step="upload"))
        data = {"percent": 100.0 * done / total if total else 100.0, "bytes": done, "total": total, "moved": done}
        ctx.emit(Event("progress", stage, data=data if disk is None else {"disk": disk, **data},
                       disk=disk, done=done, total=total, step="upload"))
        if done >= total:
            ctx.emit(Event("info", stage, f"upload: {what} sent; the target checks and stores it",
                           disk=disk, step="upload"))
    return report if ctx.target.capabilities.uploads else None


def check_drivers(target: Target, options: MigrationOptions, *, progress: ByteProgress | None = None) -> Record:
    """Find the drivers ISO and make sure it has what this Windows needs (before anything is made);
    an upload of it reports to ``progress``."""
    given = options.drivers_iso
    if given and "," in given:
        raise OptionError(f"drivers ISO {given}: a path with a comma cannot go into a VM config",
                          hint="rename or link the ISO")
    path, volid = target.drivers_iso(given, progress=progress)
    if path is None:  # only on the target: attached as it is, its drivers unchecked
        return {"drivers_iso": volid, "driver_folders": {}}
    return {"drivers_iso": volid, "driver_folders": driver_folders(path, options)}


def driver_folders(path: Path, options: MigrationOptions) -> dict[str, str]:
    """The folders of the drivers ISO at ``path`` this Windows needs ({} if it needs none); a
    ``DriversError`` for a file that is no ISO, or an ISO without them."""
    iso = drivers.read_iso(path)
    if not options.needs_dance:
        return {}
    storage_driver = "viostor" if options.bus == "virtio" else "vioscsi"
    wanted = (storage_driver, "NetKVM") if options.net_drivers else (storage_driver,)
    assert options.ostype is not None
    return iso.require(wanted, options.ostype, options.arch)
