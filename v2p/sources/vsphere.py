"""The vSphere source: a VM in vCenter or on an ESXi host, named ``vsphere://HOST/DC/vm/FOLDER.../NAME``.

Its hardware becomes the same ``VMSpec`` a ``.vmx`` or an OVF gives, in their vocabulary (a controller
model is what a ``.vmx``'s ``virtualDev`` says, ``pvscsi``, ``lsisas1068``; a NIC's likewise; the guest
id goes through ``spec.pve_ostype`` like the ``.vmx``'s ``guestOS``): vSphere's device classes are named
the way VMware's own OVF export names them and mapped through ``ovf_mapping``'s table. A disk's facts
come from its backing (capacity, thin or thick, the datastore path), no byte read.

The session (``vsphere_api.Session``) opens with the source's life (``open``/``close``); ``spec`` outside
it logs in for the read and out again. A disk's bytes: once ``prepare`` let the VM be read (it is
off, or was shut down), ``disk_endpoint`` downloads its files (every link of its snapshot chain) from the
datastore file service into the migration's workdir (``vsphere_fetch``: resumed after a kill, sparse)
and hands the pipeline that local copy, inspected as a ``.vmx``'s disk is: convert and verify read it,
never the datastore a second time. Before that (preflight's space check), a stand-in the size of the
disk that reads nothing.

Not here: the login, TLS and the property reads (``vsphere_api``), the listing (``vsphere_inventory``),
the download (``vsphere_fetch``).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .. import rules
from ..endpoint import DiskEndpoint
from ..errors import SourceError, UnsafeSourceError
from ..events import Event
from ..inspect import inspect_disk
from ..inspect.qemu_input import qemu_source
from ..spec import CONTROLLER_KINDS, CdromSpec, DiskSpec, NicSpec, VMSpec, controller_order
from .base import DiskFacts, DiskInput, Source
from .ovf_mapping import _NIC_MODELS, _SCSI_MODELS
from .vmx import _CONTROLLER_MODEL, canonical_mac, canonical_uuid
from .vsphere_api import Session, find_password, parse_uri
from .vsphere_fetch import DatastoreFile, Fetcher, fetch_disk, unread_endpoint
from .vsphere_parallel import Downloads, HostSlots
from .vsphere_power import add_runtime_facts, datastore_types
from .vsphere_power import prepare as prepare_vm

if TYPE_CHECKING:
    from ..options import MigrationOptions

T = TypeVar("T")

# The VM properties ``spec`` reads, in one call.
VM_PROPERTIES = ("name", "config", "runtime.powerState", "runtime.host", "snapshot", "guest.toolsRunningStatus",
                 "guest.net")

# vSphere's controller classes as VMware's OVF export names them (rasd:ResourceSubType), which
# ovf_mapping turns into the .vmx's virtualDev names; IDE, SATA and NVMe have one model each.
_SCSI_SUBTYPE = {"ParaVirtualSCSIController": "VirtualSCSI", "VirtualLsiLogicSASController": "lsilogicsas",
                 "VirtualLsiLogicController": "lsilogic", "VirtualBusLogicController": "buslogic"}
_OTHER_CONTROLLERS = {"VirtualIDEController": "ide", "VirtualAHCIController": "sata", "VirtualNVMEController": "nvme"}
# vSphere's NIC classes as the .vmx's ethernetN.virtualDev (and OVF's subtype, for PCNet32) names them.
_NIC_DEV = {"VirtualVmxnet3": "vmxnet3", "VirtualVmxnet3Vrdma": "vmxnet3", "VirtualVmxnet2": "vmxnet2",
            "VirtualVmxnet": "vmxnet", "VirtualE1000": "e1000", "VirtualE1000e": "e1000e", "VirtualPCNet32": "pcnet32"}
# Devices KVM has no place for, as the .vmx source words them; PCI/USB/SR-IOV go to ``passthrough``.
_UNMAPPED = {"VirtualSoundCard": "sound card", "VirtualEnsoniq1371": "sound card", "VirtualHdAudioCard": "sound card",
             "VirtualSoundBlaster16": "sound card", "VirtualFloppy": "floppy drive", "VirtualSerialPort": "serial port",
             "VirtualParallelPort": "parallel port"}


def class_name(obj: Any) -> str:
    """``VirtualLsiLogicSASController`` for a ``vim.vm.device.VirtualLsiLogicSASController``."""
    return type(obj).__name__.rsplit(".", 1)[-1]


def disk_capacity(device: Any) -> int:
    return int(device.capacityInBytes or 0) or int(device.capacityInKB or 0) * 1024


def disk_flavor(backing: Any) -> str:
    """The disk's kind as inspection names VMware's (``inspect.model.Flavor``)."""
    kind = class_name(backing)
    if kind == "FlatVer2BackingInfo":
        return "vmfsThin" if backing.thinProvisioned else "vmfsEagerZeroedThick" if backing.eagerlyScrub else "vmfs"
    if kind == "SeSparseBackingInfo":
        return "seSparse"
    if kind.startswith("Sparse"):
        return "vmfsSparse"
    return "vmfs"  # a raw device map (refused as such), or a backing v2p has not met: VMFS's own


def chain_depth(backing: Any) -> int:
    """How many files the disk reads: 1, plus one per snapshot delta below the current one."""
    depth = 1
    while getattr(backing, "parent", None) is not None and depth < 256:
        backing, depth = backing.parent, depth + 1
    return depth


def vm_spec(config: Any, network_names: Mapping[str, str], where: str) -> VMSpec:
    """The ``VMSpec`` of a VM's ``config`` (a ``vim.vm.ConfigInfo``); ``network_names`` gives a
    distributed port group's name by its key. ``where`` names the VM in messages."""
    hardware = config.hardware
    cores = int(hardware.numCoresPerSocket or 1)
    vcpus = int(hardware.numCPU or 1)
    if vcpus % cores:
        raise SourceError(f"{where}: numCPU {vcpus} is not a multiple of numCoresPerSocket {cores}")
    firmware = (config.firmware or "bios").lower()
    if firmware not in ("bios", "efi"):
        raise SourceError(f"{where}: firmware {firmware!r} is neither efi nor bios")
    boot_options = config.bootOptions
    spec = VMSpec(
        name=config.name,
        uuid=canonical_uuid(config.uuid, f"{where}: config.uuid") if config.uuid else None,
        firmware=firmware,
        secure_boot=firmware == "efi" and bool(boot_options and boot_options.efiSecureBootEnabled),
        sockets=vcpus // cores,
        cores=cores,
        memory_mib=int(hardware.memoryMB or 0),
        guest_os=config.guestId or None,
        home_encrypted=config.keyId is not None,
    )
    devices = list(hardware.device or ())
    by_key = {device.key: device for device in devices}
    disks = [d for d in devices if class_name(d) == "VirtualDisk"]
    rules.refuse_counts(spec.name, disks=len(disks), nics=sum(1 for d in devices if _is_nic(d)))
    for device in devices:
        kind = class_name(device)
        label = device.deviceInfo.label if device.deviceInfo else kind
        if kind == "VirtualDisk":
            spec.disks.append(_disk(device, by_key, where))
        elif kind == "VirtualCdrom":
            controller, model = _controller(by_key.get(device.controllerKey), label, where)
            image = device.backing.fileName if class_name(device.backing) == "IsoBackingInfo" else None
            bus = by_key[device.controllerKey].busNumber
            spec.cdroms.append(CdromSpec(controller, bus, int(device.unitNumber or 0), image or None))
        elif kind in ("VirtualPCIPassthrough", "VirtualSriovEthernetCard"):
            spec.passthrough.append(f"{label}: PCI device" + (f" ({device.deviceInfo.summary})"
                                                               if device.deviceInfo else ""))
        elif _is_nic(device):
            spec.nics.append(_nic(device, network_names, where))
        elif kind == "VirtualUSB":
            spec.passthrough.append(f"{label}: USB device from the host")
        elif kind == "VirtualTPM":
            spec.tpm = True
        elif kind in _UNMAPPED:
            spec.unmapped.append(f"{label}: {_UNMAPPED[kind]}")
    spec.disks.sort(key=controller_order)
    spec.cdroms.sort(key=lambda c: (CONTROLLER_KINDS.index(c.controller), c.bus, c.unit))
    spec.encrypted = any(disk.encrypted for disk in spec.disks)
    _mark_boot(spec, boot_options, disks, by_key)
    return spec


def _is_nic(device: Any) -> bool:
    return class_name(device) in _NIC_DEV or (hasattr(device, "macAddress") and hasattr(device, "addressType"))


def _controller(controller: Any, label: str, where: str) -> tuple[str, str | None]:
    """(kind, model) of the controller a device sits on, in the .vmx's words."""
    kind = class_name(controller) if controller is not None else "none"
    if kind in _SCSI_SUBTYPE:
        return "scsi", _SCSI_MODELS[_SCSI_SUBTYPE[kind].lower()]
    if kind in _OTHER_CONTROLLERS:
        bus = _OTHER_CONTROLLERS[kind]
        return bus, _CONTROLLER_MODEL.get(bus)
    raise SourceError(f"{where}: {label} sits on a controller v2p does not know ({kind})")


def _disk(device: Any, by_key: Mapping[int, Any], where: str) -> DiskSpec:
    label = device.deviceInfo.label if device.deviceInfo else f"disk {device.key}"
    controller = by_key.get(device.controllerKey)
    kind, model = _controller(controller, label, where)
    assert controller is not None  # _controller refused a disk on none
    backing = device.backing
    file_name = getattr(backing, "fileName", None)
    if not file_name:
        raise SourceError(f"{where}: {label} has no backing file")
    mode = str(getattr(backing, "diskMode", None) or "persistent").replace("_", "-")
    return DiskSpec(controller=kind, bus=int(controller.busNumber), unit=int(device.unitNumber or 0),
                    source=file_name, capacity=disk_capacity(device), controller_model=model, mode=mode,
                    shared=getattr(backing, "sharing", None) == "sharingMultiWriter"
                    or getattr(controller, "sharedBus", "noSharing") not in (None, "noSharing"),
                    rdm=class_name(backing).startswith("RawDiskMapping"),
                    encrypted=getattr(backing, "keyId", None) is not None)


def _nic(device: Any, network_names: Mapping[str, str], where: str) -> NicSpec:
    model = _NIC_DEV.get(class_name(device), class_name(device).lower())
    backing = device.backing
    kind = class_name(backing)
    network = None
    if kind == "NetworkBackingInfo":
        network = backing.deviceName
    elif kind == "DistributedVirtualPortBackingInfo" and backing.port is not None:
        network = network_names.get(backing.port.portgroupKey, backing.port.portgroupKey)
    elif kind == "OpaqueNetworkBackingInfo":
        network = network_names.get(backing.opaqueNetworkId, backing.opaqueNetworkId)
    mac = canonical_mac(device.macAddress, f"{where}: {device.deviceInfo.label if device.deviceInfo else 'NIC'}") \
        if device.macAddress else None
    return NicSpec(model=_NIC_MODELS.get(model, model), mac=mac, network=network or None)


def _mark_boot(spec: VMSpec, boot_options: Any, disks: list[Any], by_key: Mapping[int, Any]) -> None:
    """VMware's boot disk: the first disk of ``bootOptions.bootOrder``, else the first in controller order."""
    sources = {device.key: device.backing.fileName for device in disks}
    for entry in getattr(boot_options, "bootOrder", None) or ():
        if class_name(entry) == "VirtualMachineBootOptionsBootableDiskDevice" and entry.deviceKey in sources:
            for disk in spec.disks:
                if disk.source == sources[entry.deviceKey]:
                    disk.boot = True
                    return
    if spec.disks:
        spec.disks[0].boot = True


class VsphereSource(Source):
    """A VM in vCenter or on ESXi, read through the vSphere API."""

    kind = "vsphere"

    def __init__(self, uri: str, env: Mapping[str, str] | None = None) -> None:
        self.uri = uri
        self.env = dict(os.environ) if env is None else dict(env)
        self.where = parse_uri(uri, self.env)
        if len(self.where.path) < 2:
            raise SourceError(f"{self.where.short}: names no VM", hint="vsphere://HOST/DATACENTER/vm/FOLDER/VM "
                              "(v2p vsphere ls lists them)")
        self._session: Session | None = None
        self._props: dict[str, Any] | None = None
        self._networks: dict[str, str] = {}
        self._datastore_types: dict[str, str] | None = None
        self._inputs: dict[tuple[str, Path], DiskInput] = {}
        self._prepared = False  # ``prepare`` said the VM may be read: only then are its disks downloaded
        self._downloads: dict[Path, Downloads] = {}  # by workdir: every disk's download, started at once
        self._report_lock = threading.Lock()  # the download threads report too

    def describe(self) -> str:
        return str(self.where)

    # --- the session -------------------------------------------------------------------------------

    def open(self) -> None:
        if self._session is None:
            self._session = Session(self.where, find_password(self.where, self.env)).connect()

    def report(self, event: Event) -> None:
        with self._report_lock:
            super().report(event)

    def close(self) -> None:
        self._prepared = False  # the next life asks ``prepare`` again before it reads a byte
        try:
            self._stop_downloads()
            if self._session is not None:
                self._session.close()
                self._session = None
        finally:
            super().close()

    def _read(self, use: Callable[[Session], T]) -> T:
        """``use`` the open session, or one opened for this read only."""
        if self._session is not None:
            return use(self._session)
        session = Session(self.where, find_password(self.where, self.env)).connect()
        try:
            return use(session)
        finally:
            session.close()

    def properties(self) -> dict[str, Any]:
        """The VM's properties (``VM_PROPERTIES``), read once."""
        if self._props is None:
            self._props, self._networks = self._read(self._load)
        return self._props

    def _load(self, session: Session) -> tuple[dict[str, Any], dict[str, str]]:
        from pyVmomi import vim

        vm = session.find(self.where.inventory_path)
        if vm is None or not isinstance(vm, vim.VirtualMachine):
            raise SourceError(f"{self.where.short}: no VM at /{'/'.join(self.where.path)}",
                              hint="v2p vsphere ls vsphere://HOST/DATACENTER lists the VMs and their paths")
        [(_, props)] = session.retrieve((), {vim.VirtualMachine: VM_PROPERTIES}, objects=[vm])
        if "config" not in props:
            raise SourceError(f"{self.where.short}: vSphere gives no configuration for this VM "
                              "(orphaned or inaccessible)")
        networks = {}
        for portgroup, values in session.retrieve([vim.dvs.DistributedVirtualPortgroup],
                                                  {vim.dvs.DistributedVirtualPortgroup: ("name", "key")}):
            networks[values.get("key", portgroup._moId)] = values.get("name", "")
        return props, networks

    # --- what the pipeline asks ----------------------------------------------------------------------

    def spec(self) -> VMSpec:
        spec = vm_spec(self.properties()["config"], self._networks, self.where.short)
        if self._datastore_types is None:
            self._datastore_types = self._read(datastore_types)
        return add_runtime_facts(spec, self.properties(), self._datastore_types)

    def prepare(self, options: MigrationOptions, say: Callable[[str], None]) -> dict[str, Any]:
        """A running VM shut down (``--shutdown``) or refused: ``vsphere_power.stop``. Once it passed,
        ``disk_endpoint`` downloads."""
        done = self._read(lambda session: prepare_vm(session, self._vm(session), where=self.where.short,
                                                     shutdown=options.shutdown, wait=options.shutdown_wait, say=say))
        self._prepared = True
        return done

    def _vm(self, session: Session) -> Any:
        vm = session.find(self.where.inventory_path)
        if vm is None:
            raise SourceError(f"{self.where.short}: no VM at /{'/'.join(self.where.path)} any more")
        return vm

    def _device(self, disk: DiskSpec) -> Any:
        for device in self.properties()["config"].hardware.device or ():
            if class_name(device) == "VirtualDisk" and getattr(device.backing, "fileName", None) == disk.source:
                return device
        raise SourceError(f"{self.where.short}: {disk.label} ({disk.source}) is no longer one of the VM's disks")

    def disk_facts(self, disk: DiskSpec, workdir: Path) -> DiskFacts:
        device = self._device(disk)
        flavor = disk_flavor(device.backing)
        thin = "thin" if getattr(device.backing, "thinProvisioned", False) else "thick"
        depth = chain_depth(device.backing)
        chain = f", {depth} files in its snapshot chain" if depth > 1 else ""
        return DiskFacts(disk_capacity(device), flavor,
                         messages=(("note", f"{disk.label} is {disk.source} ({thin}{chain}) on vSphere"),))

    def disk_endpoint(self, disk: DiskSpec, workdir: Path) -> DiskEndpoint:
        """The disk's files downloaded into ``workdir`` (resumed where a killed run stopped; nothing
        downloaded again when they are all there), inspected like a ``.vmx``'s disk: a local endpoint
        convert and verify both read. Before ``prepare`` (the VM may still run), a stand-in that
        measures as the whole capacity and fails any read (``unread_endpoint``)."""
        key = (disk.label, workdir)
        if key not in self._inputs:
            if not self._prepared:  # preflight's space check, a plan's measure: no byte read before ``prepare``
                device = self._device(disk)
                return unread_endpoint(disk_capacity(device), disk_flavor(device.backing))
            self._inputs[key] = self._disk_input(disk, workdir)
        return self._inputs[key].endpoint

    def _host(self) -> str:
        """The ESXi host that runs the VM (its managed object id), as a key for its download slots."""
        host = self.properties().get("runtime.host")
        return f"{self.where.host}:{self.where.port}/{getattr(host, '_moId', '')}"

    def _start_downloads(self, workdir: Path, first: DiskSpec) -> Downloads:
        """The disks of the VM from ``first`` on downloading into ``workdir``, at most ``?parallel=N`` from
        its host at once across the migrations whose workdirs share ``workdir``'s folder (the target's state
        folder). The pipeline converts and verifies the disks in order, boot disk first: the first disk it
        asks for is the first one not finished, so a resumed run does not fetch the finished ones again.
        A disk asked for later that was not started (none, in that order) starts then."""
        if workdir not in self._downloads:
            slots = HostSlots(workdir.parent / "vsphere-slots", self._host(), self.where.parallel)
            downloads = self._downloads[workdir] = Downloads(slots)
            disks = self.spec().ordered_disks()
            start = next((index for index, disk in enumerate(disks) if disk.label == first.label), 0)
            for disk in disks[start:]:
                downloads.start(disk.label, functools.partial(self._download, disk, workdir, downloads.check))
        downloads = self._downloads[workdir]
        if not downloads.started(first.label):
            downloads.start(first.label, functools.partial(self._download, first, workdir, downloads.check))
        return downloads

    def _stop_downloads(self) -> None:
        while self._downloads:
            self._downloads.popitem()[1].close()

    def _disk_input(self, disk: DiskSpec, workdir: Path) -> DiskInput:
        slot = f"{disk.controller}{disk.bus}-{disk.unit}"
        folder = workdir / f"vsphere-{slot}"
        where = f"{self.where.short}: {disk.label} ({disk.source})"
        local = self._start_downloads(workdir, disk).wait(disk.label)
        try:
            image = inspect_disk(local, check_boot=True, link_ok=False)
        except SourceError as exc:  # named as the datastore names it, not by the local copy's path
            raise type(exc)(f"{where}: {exc.message.replace(f'{folder}/', 'the downloaded ')}", hint=exc.hint) \
                from None
        endpoint = qemu_source(image, workdir / slot)
        return DiskInput(image.capacity, image.flavor.value, image, tuple(image.messages), endpoint=endpoint)

    def _download(self, disk: DiskSpec, workdir: Path, check: Callable[[], None]) -> Path:
        """Disk ``disk``'s files into ``workdir/vsphere-SLOT/`` (in a download thread; ``check`` raises
        once the migration stopped); the local current descriptor."""
        device = self._device(disk)
        where = f"{self.where.short}: {disk.label} ({disk.source})"
        if disk.rdm:
            raise UnsafeSourceError(f"{where} is a raw device map: its data is a LUN, not a datastore file: "
                                    "refused", hint="copy the LUN's contents into a virtual disk in vSphere first")
        chain: list[DatastoreFile] = []
        backing = device.backing
        while backing is not None and len(chain) < 256:
            chain.append(DatastoreFile.parse(backing.fileName, where))
            backing = getattr(backing, "parent", None)
        slot = f"{disk.controller}{disk.bus}-{disk.unit}"
        folder = workdir / f"vsphere-{slot}"
        folder.mkdir(mode=0o700, exist_ok=True)
        index = [d.label for d in self.spec().ordered_disks()].index(disk.label)
        stage = f"convert:{index}" if index else "convert"  # the first read after ``prepare``: the copy's

        fetchers: list[Fetcher] = []  # the download's, for the bytes it received (``moved``)

        def progress(done: int, total: int) -> None:
            check()
            self.report(Event.progress(stage, done, total, disk=index, step="fetch",
                                       moved=sum(f.downloaded for f in fetchers)))

        def download(session: Session) -> Path:
            fetcher = Fetcher(self.where, session.cookie, where)
            fetchers.append(fetcher)
            self.report(Event("info", stage, f"fetch: {disk.label}: {len(chain)} link(s) of {disk.source} "
                              f"from the datastore into {folder}", disk=index, step="fetch"))
            started = time.monotonic()
            local = fetch_disk(fetcher, chain, folder, progress)
            if fetcher.downloaded:
                seconds = max(time.monotonic() - started, 1e-3)
                resumed = f", resumed {fetcher.resumed} time(s) after a break" if fetcher.resumed else ""
                self.report(Event("info", stage, f"fetch: {disk.label}: {fetcher.downloaded} bytes in "
                                  f"{seconds:.1f} s ({fetcher.downloaded / seconds / (1 << 20):.0f} MiB/s)"
                                  + resumed, disk=index, step="fetch"))
            return local

        return self._read(download)

    def release_disks(self) -> None:
        self._stop_downloads()
        while self._inputs:
            self._inputs.popitem()[1].close()

    def fingerprint(self) -> list[dict[str, Any]]:
        config = self.properties()["config"]
        out: list[dict[str, Any]] = [{"path": str(self.where), "size": 0, "mtime_ns": 0,
                                      "change": str(config.changeVersion or ""), "uuid": config.instanceUuid}]
        for device in config.hardware.device or ():
            if class_name(device) == "VirtualDisk":
                out.append({"path": device.backing.fileName, "size": disk_capacity(device), "mtime_ns": 0})
        return out
