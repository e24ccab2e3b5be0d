"""The context every stage of one migration reads (``Context``): the source's disks as facts and
endpoints, a non-rereadable source's local stage, the target's disk sinks; and the per-disk
stages' record names (``disk_stage``). Not here: the stages themselves (``stages.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import pveconfig
from .convert import stage
from .endpoint import DiskEndpoint
from .events import Event, EventHandler
from .fsutil import private_dir
from .options import MigrationOptions
from .sources import DiskFacts, Source
from .spec import DiskSpec, VMSpec
from .targets.base import DiskSink, Target

Record = dict[str, Any]

def disk_stage(kind: str, index: int) -> str:
    """The record name of a per-disk stage: ``convert`` / ``verify`` for the boot disk (the names a
    one-disk migration always had), ``convert:N`` / ``verify:N`` for disk N."""
    return kind if index == 0 else f"{kind}:{index}"


@dataclass
class Context:
    """What every stage of one migration may read.

    ``options`` are the user's, completed from the VM's own hardware
    (``MigrationOptions.resolved``); ``source`` is read through the Source
    interface only: no stage knows whether it is a disk, a .vmx or an .ova, nor where its bytes are.
    """

    source: Source
    vmid: int
    options: MigrationOptions
    target: Target
    migration_id: str
    workdir: Path
    emit: EventHandler
    spec: VMSpec
    chosen_ostype: str | None = None  # the user's --os (l26 for a loose disk); None: the guest OS decides
    records: dict[str, Record] = field(default_factory=dict)
    recorded: set[str] = field(default_factory=set)  # stages the state file had when this run began
    saved_progress: Record | None = None  # the checkpoint of an unfinished copy when this run began
    on_checkpoint: Callable[[Record], None] | None = None  # where ``checkpoint`` records (the state file)
    _copied: dict[int, DiskEndpoint] = field(default_factory=dict)
    _prepared: Record | None = None
    _sinks: dict[int, DiskSink] = field(default_factory=dict)

    @property
    def guest_owns_disk(self) -> bool:
        """Once attached, the disks are the guest's: it writes to them on every boot."""
        return "attach" in self.recorded

    def disks(self) -> list[DiskSpec]:
        """The VM's disks, the boot disk first: disk N of the migration is ``disks()[N]``."""
        return self.spec.ordered_disks()

    def close_inputs(self) -> None:
        """Let go of what the source holds open for its disks (the next ``facts`` inspects again)."""
        self._copied.clear()
        self.source.release_disks()

    def facts(self, index: int) -> DiskFacts:
        """Disk ``index`` as the source describes it, without a copy starting."""
        private_dir(self.workdir)  # a source writes its own folders below it: none may be a link
        return self.source.disk_facts(self.disks()[index], self.workdir)

    def endpoint(self, index: int) -> DiskEndpoint:
        """What qemu-img opens to read disk ``index`` from the source."""
        private_dir(self.workdir)
        return self.source.disk_endpoint(self.disks()[index], self.workdir)

    def prepare_source(self, stage_name: str) -> Record:
        """The source made fit to be read (``Source.prepare``: a running VM shut down or refused), once
        per run: preflight asks after its checks, and a resumed run's first disk read before it reads."""
        if self._prepared is None:
            def say(text: str) -> None:
                self.emit(Event("info", stage_name, text, step="prepare"))
            self._prepared = self.source.prepare(self.options, say)
        return self._prepared

    def copy_source(self, index: int, stage_name: str) -> DiskEndpoint:
        """What convert and verify read for disk ``index``: the source's endpoint, or, when reading
        it again would cost a second download (``rereadable`` False), a local stage of it read
        once into the workdir (``progress`` events of step ``fetch`` while it is read)."""
        self.prepare_source(stage_name)
        if index not in self._copied:
            given = self.endpoint(index)
            if given.rereadable:
                return given
            capacity = self.facts(index).capacity
            path = private_dir(self.workdir / "stage") / f"disk{index}.raw"
            if not path.is_file():
                self.emit(Event("info", stage_name, f"fetch: reading disk {index} from the source into a local "
                                f"stage ({capacity} bytes)", disk=index, step="fetch"))

            def progress(done: int, moved: int) -> None:
                self.emit(Event.progress(stage_name, done, capacity, disk=index, step="fetch", moved=moved))

            self._copied[index] = stage(given, path, capacity=capacity, on_progress=progress)
        return self._copied[index]

    def checkpoint(self, progress: Record) -> None:
        """Record how far a stage's copy of a disk is (``MigrationState.checkpoint``), for a rerun to go on from."""
        if self.on_checkpoint is not None:
            self.on_checkpoint(progress)

    def drop_stage(self, index: int) -> None:
        """Remove disk ``index``'s local stage, if it has one (its disk is verified: nothing reads it after)."""
        if self._copied.pop(index, None) is not None:
            (self.workdir / "stage" / f"disk{index}.raw").unlink(missing_ok=True)

    def sink(self, index: int) -> DiskSink:
        """Where disk ``index`` goes on the target (the stages never build a target path)."""
        if index not in self._sinks:
            self._sinks[index] = self.target.disk_sink(self.vmid, index, fmt=self.options.fmt,
                                                       storage=self.options.storage, device=self.options.device,
                                                       force=self.options.force)
        return self._sinks[index]

    def tag(self) -> str:
        return pveconfig.migration_tag(self.migration_id)
