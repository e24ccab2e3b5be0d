"""What the preflight checks before anything is made (``preflight_checks``: the one preflight of the real
run, ``migrate --dry-run``, ``plan validate``, ``plan run --dry-run`` and ``Migration.preview``), and the
pieces it is made of: the named rules for this VM, the boot layout a disk's inspection found, the
target's permissions and bridges, the drivers ISO and its folders, and the progress of an upload to the
target. Not here: what the preflight stage makes (the ISO's upload, the source's shutdown: ``stages``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from . import drivers, pveconfig, rules
from .errors import VMID_TAKEN_HINT, NoSpaceError, TargetError, VMIDExistsError
from .events import Event
from .options import MigrationOptions, OptionError, did_you_mean
from .runner import which
from .sizing import SpaceNeed
from .sources import DiskFacts
from .spec import VMSpec
from .stage_context import Context, Record
from .targets.base import ByteProgress, Target, no_dd


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


def create_config(ctx: Context) -> dict[str, str]:
    """The config the create stage makes the VM with (a preview's MACs: ``options.MAC_PLACEHOLDER``)."""
    tag = ctx.tag() if ctx.migration_id else pveconfig.migration_tag("<id>")  # a preview: no migration yet
    return pveconfig.vm_config(ctx.spec, ctx.options, bridges=ctx.options.networks,
                               default_bridge=ctx.options.bridge, tag=tag, mac_seed=ctx.migration_id or None,
                               ostype=ctx.options.ostype)


def check_access(ctx: Context) -> list[str]:
    """The target's permissions for everything this migration will write (the Create and Attach
    stages' config, the boot check's or --start's power), before anything is made; the rights checked."""
    create = create_config(ctx)
    update: dict[str, str] = {}
    if ctx.spec.firmware == "efi":
        update["efidisk0"] = pveconfig.efidisk(ctx.options.storage, secure_boot=ctx.spec.secure_boot)
    placed = pveconfig.disk_keys(ctx.spec, ctx.options, ostype=ctx.options.ostype or "l26")
    by_label = {disk.label: index for index, disk in enumerate(ctx.disks())}
    for disk, key in placed:  # each disk a new volume on the storage (PVE's STORAGE:GiB)
        update[key] = f"{ctx.options.storage}:{max(1, ctx.facts(by_label[disk.label]).capacity >> 30)}"
    update["boot"] = pveconfig.boot_order([key for _disk, key in placed])
    power = bool(ctx.options.boot_check or ctx.options.start or ctx.options.needs_dance)
    return ctx.target.check_access(ctx.vmid, create, update, storage=ctx.options.storage, power=power,
                                   dance=bool(ctx.options.needs_dance), drivers_iso=ctx.options.drivers_iso)


def unknown_bridges(known: frozenset[str] | None, networks: Mapping[str, str], bridge: str | None, *,
                    where: str) -> list[tuple[str, str, str]]:
    """The bridges named (``networks``: VMware network -> bridge, ``bridge``: the default one) that
    the target does not have (``known``: ``Target.bridges()``; None: it cannot tell, nothing is
    refused; ``where``: ``Target.place()``), as (option keyword, what the user wrote, why it is
    refused) for each, in order."""
    if known is None:
        return []
    wanted = [("networks", f"{network}={name}", name) for network, name in networks.items()]
    if bridge:
        wanted.append(("bridge", bridge, bridge))
    names = sorted(known)
    return [(keyword, written, f"no bridge called {name!r} on the {where}{did_you_mean(name, names)} "
             f"(known: {', '.join(names) or 'none'})") for keyword, written, name in wanted if name not in known]


def check_bridges(ctx: Context) -> list[str]:
    """Refuse a --network or --bridge that names a bridge the target does not have; the bridges
    checked (none where the target cannot tell, as the local target, whose NICs are QEMU's own)."""
    known = ctx.target.bridges()
    for keyword, written, why in unknown_bridges(known, ctx.options.networks, ctx.options.bridge,
                                                 where=ctx.target.place()):
        flag = "--network" if keyword == "networks" else "--bridge"
        raise TargetError(f"{flag} {written}: {why}",
                          hint="map it to a bridge the node has (ip link show type bridge on the node)")
    if known is None:
        return []
    return sorted({*ctx.options.networks.values(), *([ctx.options.bridge] if ctx.options.bridge else [])})


def preflight_checks(ctx: Context, *, upload: bool = True) -> Record:
    """Every check of the preflight, in the order the real run makes them, making nothing but (with
    ``upload``) the drivers ISO's upload to a target that needs it: the VMID free (or this migration's
    VM), the rules (each finding an event), the target's rights, bridges, format and storages with room
    for every disk, the dd and device limits, QEMU for a boot, the drivers ISO holding this Windows'
    drivers. Returns the preflight stage's record (and what a dry run shows of it): ``storage``,
    ``format``, ``required_bytes``, ``free_bytes``, ``findings``, ``disks`` (each disk's room),
    ``bridges``, ``rights``, ``drivers_iso``/``driver_folders``. The same ``V2PError`` as the real
    run's for the same refusal: ``upload`` False (a dry run) only leaves out sending the ISO."""
    if ctx.target.vm_exists(ctx.vmid) and not ours(ctx):
        raise VMIDExistsError(f"VMID {ctx.vmid} already exists on the {ctx.target.kind} target",
                              hint=VMID_TAKEN_HINT)
    findings = check_rules(ctx.spec, ctx.options, ctx.records["inspect"]["disks"], chosen_ostype=ctx.chosen_ostype)
    # Errors too, before enforce raises: a panel lists every finding, not only the first error.
    for finding in findings:
        ctx.emit(Event("finding", "preflight", f"{finding.id}: {finding.message}",
                       data={"rule": finding.id, "severity": finding.severity}))
    rules.enforce(ctx.spec, findings)
    rights = check_access(ctx)  # before the sinks: a storage the token may not see is not even listed
    bridges = check_bridges(ctx)
    fmt = ctx.sink(0).fmt  # the sink refuses a --format its storage cannot hold
    if ctx.options.device and len(ctx.disks()) > 1:
        raise OptionError(f"--to-device takes one disk; {ctx.source.describe()} has {len(ctx.disks())}",
                          hint="migrate onto a storage (--storage) instead")
    if ctx.options.copy_with == "dd" and not ctx.target.capabilities.copies_with_dd:
        raise no_dd()
    space, rooms = SpaceNeed(), []
    for index in range(len(ctx.disks())):
        given, endpoint = ctx.facts(index), ctx.endpoint(index)
        if ctx.options.copy_with == "dd" and endpoint.raw is None:
            raise OptionError(f"--copy-with dd: disk {index} is {given.flavor}, dd copies raw data only",
                              hint="leave --copy-with out: qemu-img reads every flavor")
        room = ctx.sink(index).check(endpoint, capacity=given.capacity)
        space.add(room)
        rooms.append({"disk": index, "volid": ctx.sink(index).volid, **room})
    if ctx.options.copy_with == "dd" and fmt != "raw":
        raise OptionError("--copy-with dd writes raw disks only", hint="add --format raw")
    short = space.short()  # each disk fits alone; all of them must fit together
    if short is not None:
        storage, needed, free = short
        raise NoSpaceError(f"not enough space on {storage}: the disks need {needed} bytes there, "
                           f"{free} are free", hint="free some space or choose another --storage")
    if ctx.options.boot_check or ctx.options.start or ctx.options.needs_dance:
        which("qemu-system-x86_64")
    record: Record = {"storage": space.storage, "format": fmt, "required_bytes": space.required,
                      "free_bytes": space.free, "findings": [f.to_dict() for f in findings], "disks": rooms,
                      "bridges": bridges, "rights": rights}
    if ctx.options.needs_dance:
        record.update(check_drivers(ctx.target, ctx.options, upload=upload,
                                    progress=upload_progress(ctx, "preflight", "the drivers ISO")))
    return record


def ours(ctx: Context) -> bool:
    """Whether VM ``ctx.vmid`` is the one this migration made (its tag in the VM's description)."""
    if not ctx.migration_id:
        return False
    try:
        return ctx.migration_id in pveconfig.tagged_by(ctx.target.get_config(ctx.vmid))
    except TargetError:
        return False


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
        ctx.emit(Event.progress(stage, done, total, disk=disk, step="upload", moved=done))
        if done >= total:
            ctx.emit(Event("info", stage, f"upload: {what} sent; the target checks and stores it",
                           disk=disk, step="upload"))
    return report if ctx.target.capabilities.uploads else None


def check_drivers(target: Target, options: MigrationOptions, *, progress: ByteProgress | None = None,
                  upload: bool = True) -> Record:
    """Find the drivers ISO and make sure it has what this Windows needs (before anything is made);
    an upload of it reports to ``progress`` (``upload`` False: nothing is sent, see ``Target.drivers_iso``)."""
    given = options.drivers_iso
    if given and "," in given:
        raise OptionError(f"drivers ISO {given}: a path with a comma cannot go into a VM config",
                          hint="rename or link the ISO")
    path, volid = target.drivers_iso(given, progress=progress, upload=upload)
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
