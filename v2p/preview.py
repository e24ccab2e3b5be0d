"""What a dry run shows: ``Preview``, the outcome of the real preflight run with nothing made
(``Migration.preview()``, ``v2p migrate --dry-run``, ``v2p plan run --dry-run``).

It holds the source as parsed and mapped, the VM config the run would write, every rule finding, each
disk with the room it needs and where that was checked, the bridges and storages checked, the target
reached, and the stages the run will do for this VM. Not for: making the checks (``stage_checks``)
nor walking the stages (``pipeline``); this module only holds and words what they found.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class PreviewDisk:
    """One disk of the VM: what the source says of it, where it goes, the room it needs there.

    ``key``: its config key on the first boot (``scsi0``, ``ide0``); ``volid``: the volume it becomes;
    ``required_bytes``/``free_bytes``/``storage``: the room the target's disk sink asked for and saw
    (None when the preflight was done before, on a resumed migration: not checked again)."""

    index: int
    label: str
    source: str
    capacity: int
    flavor: str
    key: str | None
    volid: str | None = None
    storage: str | None = None
    required_bytes: int | None = None
    free_bytes: int | None = None


@dataclass(frozen=True)
class PreviewStage:
    """A stage the run will do for this VM: ``done`` when an earlier run did it and it still holds
    (the run skips it)."""

    name: str
    summary: str
    done: bool = False


@dataclass
class Preview:
    """What ``migrate`` would do for one VM, from the same preflight as the real run (``Migration.preview``).

    ``vmid``, ``source`` (as the state file names it), ``name`` (as the VM gets it), ``sockets``/``cores``,
    ``memory_mib``, ``firmware``, ``ostype``: the VM as the source says it with the options applied (``--memory`` or a
    plan's ``memory:`` included). ``config``: what the VM is created with and what the attach stage sets
    (a MAC v2p generates is ``options.MAC_PLACEHOLDER``; on a resumed migration the recorded config).
    ``findings``: every rule finding (``Finding.to_dict``). ``disks``: ``PreviewDisk`` each. ``storage``,
    ``format``, ``required_bytes``, ``free_bytes``: the disks' storage (as the target describes it) and
    the room they need there together; ``where``: the storage or device as asked; ``storages``: every
    storage the disks take room on until the run ends (a PVE upload's import storage too), each with
    ``required_bytes`` and ``free_bytes``. ``bridges``: those
    checked against the target (none where it cannot tell). ``target``: ``kind``, ``place``, ``version``
    (PVE's), ``rights`` (each ``path: privilege`` checked) and ``bridges_known`` (whether it can tell).
    ``drivers_iso``: the ISO the driver dance attaches (None: no dance), ``driver_folders`` the
    folders of it this Windows gets its drivers from. ``stages``: the stages this run
    does, in order. ``warnings``: what the inspection warned of. ``nothing_to_do``: set (the reason) when
    the VM was migrated before with these settings.
    """

    vmid: int
    source: str
    name: str
    sockets: int
    cores: int
    memory_mib: int
    firmware: str
    ostype: str
    config: dict[str, str]
    target: dict[str, Any]
    findings: list[dict[str, Any]] = field(default_factory=list)
    disks: list[PreviewDisk] = field(default_factory=list)
    storage: str = ""
    format: str = ""
    required_bytes: int | None = None
    free_bytes: int | None = None
    storages: dict[str, dict[str, int]] = field(default_factory=dict)  # each checked: required_bytes, free_bytes
    bridges: list[str] = field(default_factory=list)
    drivers_iso: str | None = None
    driver_folders: dict[str, str] = field(default_factory=dict)  # driver -> its folder on the ISO
    stages: list[PreviewStage] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    nothing_to_do: str | None = None
    where: str = ""  # where the disks go, as asked: ``storage local``, or the device

    def plan(self) -> list[tuple[str, str, bool]]:
        """The stages as ``Migration.plan()`` gives them: (name, what it does, already done)."""
        return [(stage.name, stage.summary, stage.done) for stage in self.stages]

    def to_dict(self) -> dict[str, Any]:
        """As ``migrate --dry-run --json`` prints it."""
        data = asdict(self)
        data["target"] = self.target.get("kind")  # as before: the kind; all of it under target_reached
        data["target_reached"] = dict(self.target)
        data["keys"] = [disk.key for disk in self.disks]
        return data

    def lines(self) -> list[str]:
        """The dry run in words, one line each (the CLI prints them, a plan indents them)."""
        reached = self.target
        about = ", ".join(part for part in (reached.get("place"), reached.get("version")) if part)
        lines = [f"would migrate {self.source} to VMID {self.vmid} on the {reached.get('kind')} target"
                 + (f" ({about})" if about else "")]
        if self.nothing_to_do:
            return [*lines, f"  nothing to do: {self.nothing_to_do}"]
        lines.append(f"  vm:        {self.name}: {len(self.disks)} disk(s), {self.sockets}x{self.cores} vCPU, "
                     f"{self.memory_mib} MiB, {self.firmware}, ostype {self.ostype}")
        for disk in self.disks:
            room = f", needs {_size(disk.required_bytes)} on {disk.storage} ({_size(disk.free_bytes)} free)" \
                if disk.required_bytes is not None else ""
            lines.append(f"  disk {disk.index}:    {disk.label} {disk.source}, {_size(disk.capacity)} {disk.flavor}"
                         f" -> {disk.key or '?'} {disk.volid or ''}".rstrip() + room)
        if self.required_bytes is not None:
            lines.append(f"  storage:   {self.storage} ({self.format}): the disks need {_size(self.required_bytes)},"
                         f" {_size(self.free_bytes)} free")
        for name, held in self.storages.items():
            if name != self.storage:
                lines.append(f"  storage:   {name} (until the run ends): needs {_size(held['required_bytes'])}, "
                             f"{_size(held['free_bytes'])} free")
        if self.bridges:
            lines.append(f"  bridges:   {', '.join(self.bridges)} (on the {reached.get('place')})")
        elif reached.get("bridges_known"):
            lines.append("  bridges:   none named (--network, --bridge)")
        else:
            lines.append("  bridges:   not checked (the target cannot tell its bridges)")
        if reached.get("rights"):
            by_path: dict[str, list[str]] = {}
            for right in reached["rights"]:
                path, _, privilege = str(right).partition(": ")
                by_path.setdefault(path, []).append(privilege)
            lines.append(f"  rights:    {len(reached['rights'])} checked: "
                         + "; ".join(f"{path}: {', '.join(held)}" for path, held in by_path.items()))
        if self.drivers_iso:
            folders = ", ".join(self.driver_folders.values())
            lines.append(f"  drivers:   {self.drivers_iso}" + (f" ({folders})" if folders else ""))
        for finding in self.findings:
            ignored = " (ignored)" if finding.get("ignored") else ""
            lines.append(f"  rule:      {finding['severity']}: {finding['id']}: {finding['message']}{ignored}")
        for text in self.warnings:
            lines.append(f"  warning:   {text}")
        lines.append("  config:")
        lines += [f"    {key}: {value}" for key, value in self.config.items()]
        lines.append("  stages:")
        lines += [f"    {stage.name:<10} {'done, would skip' if stage.done else stage.summary}"
                  for stage in self.stages]
        return lines

    def text(self) -> str:
        return "\n".join(self.lines())


def _size(count: int | None) -> str:
    """Bytes for a person: 1.5 GiB, 320.0 MiB (the exact count is in ``--json``)."""
    if count is None:
        return "?"
    return f"{count / GiB:.1f} GiB" if count >= GiB else f"{count / MiB:.1f} MiB"
