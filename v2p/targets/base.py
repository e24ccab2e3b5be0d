"""The one interface every target implements (local QEMU, Proxmox, ...).

The pipeline talks to a ``Target`` only; it never asks which kind it holds.
VM configs are dicts keyed by PVE's qemu-server names (``name``, ``cores``,
``scsi0``, ``net0``, ``boot``...), values as PVE writes them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import TargetError
from ..storage import BlockStorage, Storage

if TYPE_CHECKING:
    from ..endpoint import DiskEndpoint
    from ..windows import Checkpoint, CopyProgress

VMConfig = dict[str, str]
# Bytes sent so far and in all, for a transfer that is not a disk's write (an upload to the target).
ByteProgress = Callable[[int, int], None]

# A disk the target copies itself while its config is set (PVE's import-from): the disk's config key,
# bytes done and in all.
KeyProgress = Callable[[str, int, int], None]


def compared(progress: ByteProgress | None, total: int) -> Callable[[int], None] | None:
    """``progress`` as a callback of the bytes done alone (``verify.compare``'s), ``total`` being known."""
    return None if progress is None else (lambda done: progress(done, total))


# The three ends of a boot check (issue 17). ``failed`` and ``unconfirmed`` are never called "up".
BOOT_UP, BOOT_FAILED, BOOT_UNCONFIRMED = "up", "failed", "unconfirmed"


@dataclass
class GuestIO:
    """What the host side of a running VM counts, whatever the guest prints: the signs of a boot that
    need no serial console (a real VM mostly prints nothing there).

    ``reads``: bytes the guest has read from each drive since it started, keyed by the drive's config
    key (``scsi0``, ``ide0``, ``virtio1``, ``efidisk0``, ``ide2`` for a CD): QEMU's
    ``query-blockstats`` ``rd_bytes`` (locally over QMP; on PVE ``GET .../status/current``'s
    ``blockstat``, qemu-server ``vmstatus`` with ``full``, keys with ``drive-`` stripped).
    ``sent``: bytes the guest has sent on each NIC, keyed by the NIC's config key (``net0``; PVE's
    ``nics`` are keyed ``tap<vmid>i<n>``: ``netout``, the tap's receive counter).
    ``panicked``: the guest reported a panic (QEMU's ``GUEST_PANICKED``, a pvpanic device; local only).
    """

    reads: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    panicked: bool = False


@dataclass
class BootReport:
    """What a boot check saw: how the guest ended up and what said so.

    ``outcome``: ``up`` (a positive sign the OS runs, named in ``signal``), ``failed`` (a negative
    sign, named in ``signal``) or ``unconfirmed`` (neither before the timeout: ``signal`` says what was
    seen). ``signs``: each sign observed, name -> seconds after the start it appeared and its value
    (for the state file and the bench table), e.g. ``{"boot disk reads": {"at": 4.2, "value": 41943040}}``.
    """

    outcome: str  # BOOT_UP | BOOT_FAILED | BOOT_UNCONFIRMED
    seconds: float
    signal: str = ""  # what ended the check: "login prompt on the serial console", ...
    serial: str = ""
    firmware: str = ""
    resets: int = 0
    accel: str = ""
    notes: list[str] = field(default_factory=list)
    signs: dict[str, dict[str, Any]] = field(default_factory=dict)


class DiskSink(abc.ABC):
    """Where one disk of one VM goes: allocate -> write -> verify -> commit -> a volume id.

    What a caller may rely on:

    * ``volid`` is the volume id the VM config attaches, known before anything is
      written; it is the same for every sink made for the same VM, disk, format
      and storage, so a resumed run (a fresh sink) finds what an earlier one wrote.
    * Written bytes sit under a temporary name until ``commit``: a VM config never
      names a volume that was not verified, and a run killed midway leaves only a
      temporary volume (``written``) that the next ``write`` replaces.
    * A storage that writes in place (a block device, or a volume the target
      allocates under its final name, as PVE does for LVs) has no temporary name:
      there ``written`` and ``exists`` both only say that the device or volume is
      there, and ``commit`` is a no-op; the caller's record (``fingerprint``) says
      whether it holds what was written. Nothing attaches it before it is verified.
    * A full storage while writing is a ``TargetError`` whose hint says to rerun
      (the write starts over); a failed write leaves no temporary volume behind.
    * Written bytes are flushed to stable storage before ``write`` returns.
    """

    volid: str  # the final volume id the VM config attaches
    fmt: str  # "qcow2" or "raw"
    in_place: bool  # written where it stays (a block device, a target-allocated volume): nothing renamed

    @abc.abstractmethod
    def check(self, src: DiskEndpoint, *, capacity: int) -> dict[str, Any]:
        """Refuse, before anything is written, a storage that cannot take this disk; returns
        ``storage`` (its description), ``format``, ``required_bytes`` and ``free_bytes``, and in
        ``also`` (optional) the other storages the disk keeps room on until the migration ends, each
        with ``storage``, ``required_bytes``, ``free_bytes`` (a PVE upload in its import storage). With
        several disks the caller sums ``required_bytes`` per ``storage``."""

    @abc.abstractmethod
    def exists(self) -> bool:
        """The committed volume exists (on a storage written in place: the device exists)."""

    @abc.abstractmethod
    def written(self) -> bool:
        """A temporary (uncommitted) volume exists: data was (or was being) written into it.
        Whether the write finished is the caller's record to say (``fingerprint``)."""

    @abc.abstractmethod
    def write(self, src: DiskEndpoint, *, capacity: int, progress: CopyProgress | None = None,
              bwlimit: int | None = None, start: Checkpoint | None = None,
              on_checkpoint: Callable[[Checkpoint], None] | None = None) -> None:
        """Convert ``src`` (``capacity`` bytes) into a temporary volume created anew (any earlier
        temporary or committed volume of this disk is removed first), window by window (``windows``).
        ``progress`` gets the position in the disk and the bytes this run wrote, ``bwlimit`` is bytes
        (written) per second. ``on_checkpoint`` gets a ``Checkpoint`` after each window, its ``dest``
        filled with what identifies the temporary volume; given one back as ``start``, the write goes on
        from there into the same temporary volume, or raises ``StaleCheckpoint`` (nothing removed) when
        it no longer applies. On an interruption after a checkpoint the temporary volume stays; on any
        other failure it is removed."""

    def write_dd(self, src: DiskEndpoint, *, progress: CopyProgress | None = None, start: Checkpoint | None = None,
                 on_checkpoint: Callable[[Checkpoint], None] | None = None) -> None:
        """Like ``write``, but copy the bytes of a plain raw ``src`` (``src.raw``) with ``dd`` (the seed
        procedure's copier)."""
        raise no_dd()

    @abc.abstractmethod
    def verify(self, src: DiskEndpoint, *, capacity: int, progress: ByteProgress | None = None) -> None:
        """Raise ``VerifyError`` unless the temporary volume or, once committed, the committed
        one holds exactly the bytes of ``src``. Nothing is removed either way. ``progress`` learns
        the bytes compared so far of ``capacity``."""

    @abc.abstractmethod
    def commit(self, *, progress: ByteProgress | None = None) -> str:
        """Give the temporary volume its final name and return ``volid``. Idempotent: a volume
        already committed (say, by a run killed before it could record that) is left as it is.
        ``TargetError`` if there is neither. A sink whose commit sends the bytes somewhere (an
        upload) reports them to ``progress``."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Delete the temporary and the committed volume (a user's block device is never deleted)."""

    @abc.abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """A cheap identity (size, mtime, a hash of the ends) of the committed volume if it exists,
        else of the temporary one; ``{}`` if neither does. Renaming on commit keeps it, so a record
        of the written volume still matches the committed one."""

    def release(self) -> None:
        """The migration is finished: drop what only it needed (a staging copy, an upload); the
        attached volume stays. Nothing by default."""
        return None

    def attached(self, value: str) -> bool:
        """Whether a disk key's ``value`` in the VM config is this sink's volume (the attach stage
        asks it on resume; a target that rewrites the value on attach, as PVE's import-from does,
        answers for itself)."""
        return value.split(",", 1)[0] == self.volid


def no_dd() -> TargetError:
    """The refusal of ``--copy-with dd`` by a target whose sinks cannot take it (``copies_with_dd``)."""
    return TargetError("--copy-with dd: this target cannot copy disks with dd",
                       hint="leave --copy-with out: qemu-img writes to every target")


@dataclass(frozen=True)
class Capabilities:
    """What a target can do, as data: the yes/no questions the stages, the dance and the CLI ask a target,
    each answered once where the kind is declared (not by a default method that raises or returns None).

    ``guest_io``: ``Target.guest_io`` gives a running guest's I/O counters (the dance's boot-1 sign; without
    them the dance hands boot 1 to the operator at once). ``copies_with_dd``: its disk sinks take
    ``--copy-with dd`` (``DiskSink.write_dd``; preflight refuses it otherwise, before anything is made).
    ``uploads``: committing a disk or finding the drivers ISO may send bytes to the target (the stages
    then report them as progress events of the step ``upload``). ``tasks``: work on the target outlives
    v2p (PVE's tasks, and deletions that can fail half-way): the pipeline asks ``retry_leftovers`` and
    ``settle`` of such a target only.
    """

    guest_io: bool = False
    copies_with_dd: bool = False
    uploads: bool = False
    tasks: bool = False


class Target(abc.ABC):
    """A place VMs are migrated to.

    Who asks what (issue 18, "narrow the Target interface"): the stages and the pipeline use the VM and
    disk methods (``vm_exists`` .. ``destroy_vm``, ``disk_sink``, ``efidisk``, ``status``/``start``/``stop``/
    ``held``/``release``, ``boot_check``) and the task hooks (``settle``, ``retry_leftovers``,
    ``tasks_waited``, ``task_warnings``, ``remove_temporaries``, ``check_access``); the dance
    ``new_disk``, ``remove_volume``, ``guest_io``, ``guest_output``; ``api``/``cli`` ``list_vms``,
    ``next_vmid``, ``default_storage``; plan checks the read-only facts below (``place`` .. ``iso_file``).
    ``device_storage`` and ``iso_places`` serve the kinds' own sinks and ``drivers_iso``. A kind whose storages
    are v2p's own (``v2p.storage``) looks them up itself (``LocalTarget.storage``, for ``sink.storage_sink``):
    no stage asks for a storage object.
    """

    kind: str = "target"
    capabilities: Capabilities = Capabilities()

    @abc.abstractmethod
    def describe(self) -> dict[str, str]:
        """What identifies this target in the state file (no secrets)."""

    @abc.abstractmethod
    def state_dir(self) -> Path:
        """Where migration state files for this target live."""

    @abc.abstractmethod
    def vm_exists(self, vmid: int) -> bool: ...

    @abc.abstractmethod
    def list_vms(self) -> list[int]: ...

    def next_vmid(self, above: int = 0) -> int:
        """The lowest VMID above ``above`` that no guest on the target has; free when asked only,
        so creating it may still find it taken (``VMIDExistsError``)."""
        taken = set(self.list_vms())
        return next(vmid for vmid in range(max(above + 1, 100), 1_000_000_000) if vmid not in taken)

    def settle(self, vmid: int) -> list[str]:
        """Wait until no work on VM ``vmid`` that an earlier (killed) run started still runs on the
        target, so that its config is final; the ids of the tasks waited for. Nothing by default
        (a target whose work dies with v2p)."""
        return []

    def retry_leftovers(self, *, holding: int | None = None) -> dict[str, dict[str, Any]]:
        """Delete again what v2p meant to delete on the target and could not (``state.Leftovers``);
        what is still left, by volume id (``vmid``, ``error``, ``since``). ``holding``: the VMID whose
        lock the caller holds. Nothing by default (a target whose deletions do not fail half-way)."""
        return {}

    def tasks_waited(self) -> list[str]:
        """The ids of the target's own tasks (PVE UPIDs) this object waited for, oldest first."""
        return []

    def check_access(self, vmid: int, create: VMConfig, update: VMConfig, *, storage: str, power: bool,
                     dance: bool = False, drivers_iso: str | None = None) -> list[str]:
        """Refuse, before anything is made, a migration the target would refuse part-way for want of a
        permission: ``create`` the config VM ``vmid`` is created with, ``update`` what is set on it later
        (EFI store, disks, boot order) with the disks on ``storage``; ``power``: the VM is started;
        ``dance``: the driver dance runs with ``drivers_iso`` (--drivers-iso). Returns the rights it
        checked, one ``path: privilege`` each, for a dry run to show. Nothing by default (a target whose
        files are v2p's own)."""
        return []

    def version(self) -> str | None:
        """What the target runs, as it says so (PVE: pve-manager's version), for a dry run to show; None
        where there is nothing to ask."""
        return None

    def task_warnings(self) -> list[str]:
        """What the target's tasks this object waited for warned of while succeeding (a PVE task
        that ended ``WARNINGS: n``), one line each, oldest first; the caller shows them."""
        return []

    @abc.abstractmethod
    def create_vm(self, vmid: int, config: VMConfig) -> None:
        """Create the VM shell; refuse if ``vmid`` is taken."""

    @abc.abstractmethod
    def get_config(self, vmid: int) -> VMConfig: ...

    @abc.abstractmethod
    def set_config(self, vmid: int, updates: VMConfig, delete: tuple[str, ...] = (), *,
                   progress: KeyProgress | None = None) -> None:
        """Set ``updates`` and remove the keys ``delete``; ``progress``: the copy of a disk the target
        makes for a disk key (PVE's ``import-from``), if it makes one."""

    @abc.abstractmethod
    def destroy_vm(self, vmid: int) -> None:
        """Stop the VM if needed and remove it with its disks."""

    def remove_temporaries(self, vmid: int) -> None:
        """Remove what a run killed mid-write left for VM ``vmid`` in the target's own folders (its
        config's temporary files): only names v2p itself makes, a link removed and never followed.
        Call under the VMID lock (no other run writes them then); the next run and ``vm rm`` do."""
        return None  # a target that writes no files of its own (PVE writes through its API) has none

    def efidisk(self, vmid: int, *, storage: str, secure: bool, index: int) -> str:
        """The ``efidisk0`` config value for a new UEFI variable store of VM ``vmid`` on ``storage``
        (made now, or allocated by the target when the config is set); ``index``: the disk number
        it may take."""
        raise TargetError(f"the {self.kind} target cannot make an EFI variable store")

    def default_storage(self) -> str:
        """The storage disks go to when the user names none."""
        return "local"

    def new_disk(self, vmid: int, config: VMConfig, *, storage: str, size: int) -> str:
        """The config value for a new, empty disk of ``size`` bytes (whole GiB) on ``storage`` for VM
        ``vmid`` whose config is ``config``: made now, or allocated by the target when the config is
        set (read the config back for the volume id)."""
        raise TargetError(f"the {self.kind} target cannot make a new disk")

    def remove_volume(self, vmid: int, volid: str) -> None:
        """Delete volume ``volid`` of VM ``vmid`` once no config key uses it (a no-op if it is gone)."""
        raise TargetError(f"the {self.kind} target cannot remove volume {volid}")

    def drivers_iso(self, given: str | None, *, progress: ByteProgress | None = None,
                    upload: bool = True) -> tuple[Path | None, str]:
        """The virtio drivers ISO: (a local file v2p can read to check it, or None when it lives
        only on the target; the value a VM config's CD drive takes). ``given``: --drivers-iso. A
        target that uploads the file reports the bytes sent to ``progress``; ``upload`` False (a dry
        run) checks everything the upload would need and sends nothing."""
        from .. import drivers

        path = drivers.locate(given, self.iso_places())
        return path, str(path.resolve())

    def iso_places(self) -> tuple[Path, ...]:
        """Where this target keeps ISO images (searched for the drivers ISO)."""
        return ()

    def device_storage(self, device: str) -> Storage:
        """A block device on the target host, written in place."""
        return BlockStorage(device)

    # -- what a plan is checked against before anything runs (read-only; a V2PError: out of reach) --
    def place(self) -> str:
        """The target in a plan's messages, after "on the": "local target /srv/v2p", "PVE node pve1"."""
        return f"{self.kind} target"

    def check_usable(self) -> None:
        """Raise what would stop every run on this target before it made anything (a folder that cannot
        be made). Nothing by default."""
        return None

    def node(self) -> str | None:
        """The node VMs go to, on a target of several (a PVE cluster); None on a target of one place."""
        return None

    def nodes(self) -> list[str]:
        """Every node of the target's cluster, sorted (asked only when ``node`` is not None)."""
        return []

    def storage_contents(self) -> dict[str, frozenset[str] | None]:
        """The storages a plan may name, each with the content types it holds (None: any)."""
        return {}

    def bridges(self) -> frozenset[str] | None:
        """The bridges a NIC may be put on; None where the target cannot tell (or ignores them)."""
        return None

    def iso_file(self, volume: str) -> Path | None:
        """A file on this machine holding ISO volume ``volume`` (``local:iso/NAME.iso``), to check before
        a run; None when it lives only on the target (the run checks it there)."""
        return None

    @abc.abstractmethod
    def disk_sink(self, vmid: int, index: int, *, fmt: str | None, storage: str, device: str | None = None,
                  force: bool = False) -> DiskSink:
        """Where disk ``index`` of VM ``vmid`` goes: ``device`` (a block device, written in place)
        if given, else the storage called ``storage``; ``fmt`` None picks the storage's preferred
        format, one it cannot hold is an ``OptionError``. ``force``: overwrite a device that
        carries data or is open elsewhere. Nothing is touched until ``check``/``write``."""

    @abc.abstractmethod
    def status(self, vmid: int) -> str:
        """'running' or 'stopped'."""

    @abc.abstractmethod
    def start(self, vmid: int, *, hold: bool = False) -> None:
        """Start the VM; ``hold``: it dies with this process until ``release``d (v2p's own boots)."""

    def held(self, vmid: int) -> bool:
        """Whether the VM runs held by this process (dies with it)."""
        return False

    def release(self, vmid: int) -> None:
        """Let a held VM outlive this process (no-op if it is not held)."""
        return None  # a target whose VMs never die with v2p has nothing to let go

    @abc.abstractmethod
    def stop(self, vmid: int, *, timeout: float = 60.0) -> bool:
        """Shut the VM down (power button, then hard after ``timeout``); True if it went cleanly."""

    def guest_io(self, vmid: int) -> GuestIO | None:
        """The running VM's I/O counters now (``GuestIO``), or None where the target cannot tell
        (the VM not running included)."""
        return None

    @abc.abstractmethod
    def guest_output(self, vmid: int) -> str:
        """What the guest printed on its serial port since it was last started ('' if unknown)."""

    @abc.abstractmethod
    def boot_check(self, vmid: int, *, timeout: float) -> BootReport:
        """Boot the VM held, watch it until it is up (``v2p.bootwatch``), powers off or
        ``timeout`` passes, and report what happened; a guest still running is left held."""
