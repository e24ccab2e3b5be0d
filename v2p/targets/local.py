"""The embedded default target: VMs in a directory, run by qemu-system-x86_64.

Laid out like a Proxmox node so configs and disks carry over unchanged:
``qemu-server/<vmid>.conf`` holds the config with PVE's key names, and disks
live in PVE's directory-storage layout ``images/<vmid>/vm-<vmid>-disk-N.fmt``
(storage id ``local``). A running VM is a QEMU process driven over QMP
(``supervisor``); its serial port and SeaBIOS's debug log go to files under
``run/<vmid>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from ..bootwatch import RESET, SETTLE, STOPPED, BootWatch, Verdict, boot_devices
from ..errors import VMID_TAKEN_HINT, NoSuchVMError, TargetError, ToolError, VMIDExistsError, shown_path
from ..fsutil import (
    data_home,
    describe_mode,
    fresh_file,
    listdir_own,
    own_dir,
    private_dir,
    read_small,
    remove_entry,
    remove_stale_temporaries,
    remove_tree_at,
    write_atomic,
)
from ..interrupts import check as check_interrupts
from ..runner import run
from ..state import vmid_of_name
from ..storage import Storage, check_storage, default_dir_storage, parse_storage_cfg
from ..volumes import Drive, VolumeRef, drive_volume, print_drive
from . import efi, qemu_cmdline
from .base import (
    BOOT_FAILED,
    BootReport,
    ByteProgress,
    Capabilities,
    DiskSink,
    GuestIO,
    KeyProgress,
    Target,
    VMConfig,
)
from .sink import storage_sink
from .supervisor import QemuProcess, close_quietly

_accel_cache: dict[str, str] = {}
LOG_LIMIT = 64 << 20  # a guest's serial log, read whole while it is watched


def default_dir() -> Path:
    """``$V2P_TARGET_DIR``, else ``$XDG_DATA_HOME/v2p/local`` (``~/.local/share/v2p/local``)."""
    if os.environ.get("V2P_TARGET_DIR"):
        return Path(os.environ["V2P_TARGET_DIR"])
    return data_home() / "local"


def probe_accel(requested: str = "auto") -> str:
    """'kvm' or 'tcg'. ``auto`` picks KVM only if a VM with ``-cpu host`` actually starts on it.

    Some hosts expose a /dev/kvm on which ``-cpu host`` aborts (nested,
    paravirtual KVM); there guests must run under TCG.
    """
    if requested in ("kvm", "tcg"):
        return requested
    if requested != "auto":
        raise TargetError(f"unknown accelerator {requested!r}", hint="use auto, kvm or tcg")
    if "auto" not in _accel_cache:
        usable = os.access("/dev/kvm", os.R_OK | os.W_OK)
        if usable:
            try:
                proc = run(["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-M", "pc", "-nodefaults",
                            "-display", "none", "-S", "-monitor", "stdio"], input="quit\n", timeout=20, check=False)
                usable = proc.returncode == 0
            except ToolError:  # timed out: as good as unusable
                usable = False
        _accel_cache["auto"] = "kvm" if usable else "tcg"
    return _accel_cache["auto"]


def parse_config(text: str) -> VMConfig:
    """Parse a qemu-server config (``key: value`` lines; snapshots sections ignored)."""
    config: VMConfig = {}
    for line in text.splitlines():
        if line.startswith("["):
            break
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if sep:
            config[key.strip()] = value.strip()
    return config


def format_config(config: VMConfig) -> str:
    for key, value in config.items():
        if "\n" in value or "\r" in value or not re.fullmatch(r"[a-z][a-z0-9_-]*", key):
            raise TargetError(f"config {key!r} = {value!r}: keys are lower-case words, values one line")
    return "".join(f"{key}: {config[key]}\n" for key in sorted(config))


class LocalTarget(Target):
    """VMs kept in ``directory`` and run locally under QEMU."""

    kind = "local"
    capabilities = Capabilities(guest_io=True, copies_with_dd=True)

    def __init__(self, directory: Path | None = None, *, accel: str = "auto") -> None:
        self.directory = Path(os.path.abspath(directory or default_dir()))
        self.accel_request = accel
        self._vms: dict[int, QemuProcess] = {}
        self._monitors: dict[int, Any] = {}  # the QMP session a boot check holds (QEMU takes one at a time)
        self._dumps: dict[tuple[int, str], PcapCount] = {}

    # -- layout ---------------------------------------------------------
    def describe(self) -> dict[str, str]:
        return {"kind": self.kind, "dir": str(self.directory)}

    def state_dir(self) -> Path:
        return self.directory / "migrations"

    def _conf(self, vmid: int) -> Path:
        return self.directory / "qemu-server" / f"{vmid}.conf"

    def _run_dir(self, vmid: int) -> Path:
        return self.directory / "run" / str(vmid)

    def _qmp_path(self, vmid: int) -> Path:
        # AF_UNIX paths are limited to 108 bytes; a deep target dir would not fit.
        tag = hashlib.sha1(str(self.directory).encode()).hexdigest()[:12]
        base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        return Path(base) / f"v2p-{os.getuid()}" / f"{tag}-{vmid}.qmp"

    def _socket_dir(self, vmid: int) -> Path:
        """The QMP socket's folder: ours alone (0700), or refused."""
        return private_dir(self._qmp_path(vmid).parent)

    def serial_log(self, vmid: int) -> Path:
        return self._run_dir(vmid) / "serial.log"

    # -- storages -------------------------------------------------------
    @property
    def storage_cfg(self) -> Path:
        return self.directory / "storage.cfg"

    def storages(self) -> dict[str, Storage]:
        """``storage.cfg`` in the target dir (PVE syntax); ``local`` is the dir itself by default."""
        found: dict[str, Storage] = {"local": default_dir_storage(self.directory)}
        found.update(parse_storage_cfg(self._storage_cfg_text(), str(self.storage_cfg)))
        return found

    def _storage_cfg_text(self) -> str:
        return self._read_text(self.storage_cfg) or ""

    @staticmethod
    def _read_text(path: Path) -> str | None:
        """A text file of the target (a config, storage.cfg), read safely; None when there is none."""
        try:
            return read_small(path).decode()
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            raise TargetError(f"{path} is not text: refused",
                              hint=f"it is not v2p's: look at it, then remove it by hand (rm {path})") from None

    def storage(self, name: str) -> Storage:
        storages = self.storages()
        if name not in storages:
            raise TargetError(f"no storage called {name!r} on the local target",
                              hint=f"known: {', '.join(storages)}; add one to {self.storage_cfg}")
        return storages[name]

    def disk_sink(self, vmid: int, index: int, *, fmt: str | None, storage: str, device: str | None = None,
                  force: bool = False) -> DiskSink:
        return storage_sink(self, vmid, index, fmt=fmt, storage=storage, device=device, force=force)

    def efidisk(self, vmid: int, *, storage: str, secure: bool, index: int) -> str:
        volid = efi.create_efidisk(self.storage(storage), vmid, secure=secure, index=index)
        return efi.efidisk_value(volid, secure=secure)

    def new_disk(self, vmid: int, config: VMConfig, *, storage: str, size: int) -> str:
        place = self.storage(storage)
        refs = (VolumeRef.maybe(drive_volume(value)) for value in config.values())
        used = {ref.disk_of(vmid) for ref in refs if ref}
        for index in range(1, 100):
            if index in used:
                continue  # named by the config (on any storage, in any format, or not made yet)
            if not any(place.exists(v) for v in (place.volume(vmid, index, fmt) for fmt in place.formats())):
                volume = place.create_empty(vmid, index, size)
                return print_drive(Drive(volume.volid, {"size": f"{size >> 30}G"}))
        raise TargetError(f"VM {vmid}: no free disk index on storage {storage}")

    def remove_volume(self, vmid: int, volid: str) -> None:
        ref = VolumeRef.parse(volid)
        place = self.storage(ref.storage)
        if any(drive_volume(value) == volid for value in self.get_config(vmid).values()):
            raise TargetError(f"VM {vmid}: volume {volid} is still in use")
        index = ref.disk_of(vmid)
        if index is None:
            return
        for volume in (place.volume(vmid, index, fmt) for fmt in place.formats()):
            if volume.volid == volid and place.exists(volume):
                place.remove(volume)

    def drivers_iso(self, given: str | None, *, progress: ByteProgress | None = None) -> tuple[Path | None, str]:
        ref = VolumeRef.maybe(given) if given and not given.startswith("/") else None
        if given and ref:  # a PVE volid: local:iso/NAME.iso
            return self.storage(ref.storage).path_of(given), given
        return super().drivers_iso(given)

    def iso_places(self) -> tuple[Path, ...]:
        return (self.directory / "template" / "iso" / "virtio-win.iso",)

    def iso_file(self, volume: str) -> Path | None:
        return self.drivers_iso(volume)[0]

    def place(self) -> str:
        return f"local target {self.directory}"

    def check_usable(self) -> None:
        # The run makes the folder (and its parents): it must be one, or be makeable under one.
        existing = self.directory
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise TargetError(f"{shown_path(existing)} is {describe_mode(os.lstat(existing).st_mode)}, not a "
                              "folder: the target folder cannot be made there")

    def storage_contents(self) -> dict[str, frozenset[str] | None]:
        # Its VMs' NICs are QEMU user networking: a bridge name is only recorded in the config (no bridges()).
        return {name: None for name in self.storages()}

    def add_storage(self, name: str, kind: str, options: dict[str, str]) -> None:
        """Add a storage to storage.cfg (checked by parsing the result first)."""
        check_storage(name, kind, options)
        storages = self.storages()
        if name in storages:
            raise TargetError(f"storage {name!r} already exists in {self.storage_cfg}")
        text = self._storage_cfg_text()
        text += f"\n{kind}: {name}\n" + "".join(f"\t{key} {value}\n" for key, value in options.items())
        parse_storage_cfg(text, str(self.storage_cfg))
        write_atomic(self.storage_cfg, text, root=self.directory)

    def volume_file(self, volid: str) -> tuple[Path, str]:
        """(path, format) of a disk named in a config: ``storage:volume`` or a device path."""
        if volid.startswith("/"):
            return Path(volid), "raw"
        ref = VolumeRef.maybe(volid)
        if ref is None:
            raise TargetError(f"volume {volid!r} names no storage")
        path = self.storage(ref.storage).path_of(volid)
        return path, "qcow2" if ref.volname.endswith(".qcow2") else "raw"

    # -- VMs ------------------------------------------------------------
    def vm_exists(self, vmid: int) -> bool:
        return os.path.lexists(self._conf(vmid))  # whatever is there: get_config says what is wrong with it

    def list_vms(self) -> list[int]:
        names = listdir_own(self.directory / "qemu-server")
        found = (vmid_of_name(name[:-len(".conf")]) for name in names if name.endswith(".conf"))
        return sorted(vmid for vmid in found if vmid is not None)

    def create_vm(self, vmid: int, config: VMConfig) -> None:
        path = self._conf(vmid)
        if self.vm_exists(vmid):
            raise VMIDExistsError(f"VMID {vmid} already exists on the local target ({path})",
                                  hint=VMID_TAKEN_HINT)
        self._write_config(vmid, config)

    def _write_config(self, vmid: int, config: VMConfig) -> None:
        write_atomic(self._conf(vmid), format_config(config), root=self.directory)

    def remove_temporaries(self, vmid: int) -> None:
        path = self._conf(vmid)
        remove_stale_temporaries(path.parent, path.name)  # write_atomic's, for <vmid>.conf

    def get_config(self, vmid: int) -> VMConfig:
        text = self._read_text(self._conf(vmid))
        if text is None:
            raise NoSuchVMError(f"VMID {vmid} does not exist on the local target", hint="see: v2p vm list")
        return parse_config(text)

    def set_config(self, vmid: int, updates: VMConfig, delete: tuple[str, ...] = (), *,
                   progress: KeyProgress | None = None) -> None:
        config = self.get_config(vmid)
        for key in delete:
            config.pop(key, None)
        config.update(updates)
        self._write_config(vmid, config)

    def destroy_vm(self, vmid: int) -> None:
        if not self.vm_exists(vmid):
            raise NoSuchVMError(f"VMID {vmid} does not exist on the local target")
        if self.status(vmid) == "running":
            self._kill(vmid)
        for storage in self.storages().values():
            storage.remove_vm(vmid)
        with contextlib.suppress(FileNotFoundError), own_dir(self.directory, "run", create=False) as runs:
            remove_tree_at(runs, str(vmid))
        with own_dir(self.directory, "qemu-server", create=False) as configs:
            remove_entry(configs, self._conf(vmid).name, self._conf(vmid).parent)

    # -- running --------------------------------------------------------
    def _vm(self, vmid: int) -> QemuProcess:
        process = self._vms.get(vmid)
        if process is None:
            process = self._vms[vmid] = QemuProcess(str(vmid), self._run_dir(vmid), self._qmp_path(vmid))
        return process

    def status(self, vmid: int) -> str:
        self.get_config(vmid)
        return "running" if self._vm(vmid).running() else "stopped"

    def command_line(self, vmid: int, accel: str) -> list[str]:
        """The qemu-system-x86_64 argv for VM ``vmid`` as its config stands."""
        return qemu_cmdline.build(vmid, self.get_config(vmid), accel, run_dir=self._run_dir(vmid),
                                  qmp_path=self._qmp_path(vmid), volume_file=self.volume_file)

    def start(self, vmid: int, *, hold: bool = False) -> None:
        close_quietly(self._launch(vmid))
        if not hold:
            self._vm(vmid).release()

    def held(self, vmid: int) -> bool:
        return self._vm(vmid).held()

    def release(self, vmid: int) -> None:
        self._vm(vmid).release()

    def _launch(self, vmid: int) -> Any:
        """Start the VM held (it dies with v2p until released); returns its QMP monitor."""
        accel = probe_accel(self.accel_request)
        if self.status(vmid) == "running":
            raise TargetError(f"VM {vmid} is already running")
        argv = self.command_line(vmid, accel)
        # QEMU and the tether open these by name: make each a fresh file of ours, never a planted link.
        with own_dir(self.directory, "run", str(vmid)) as run_dir:
            nics = [key for key in self.get_config(vmid) if re.fullmatch(r"net\d+", key)]
            for name in ("serial.log", "firmware.log", "qemu.log", "qemu.pid", *map(qemu_cmdline.pcap_name, nics)):
                fresh_file(run_dir, name)
        for old in [known for known in self._dumps if known[0] == vmid]:
            del self._dumps[old]
        for key in nics:
            self._dumps[vmid, key] = PcapCount(self._run_dir(vmid) / qemu_cmdline.pcap_name(key))
        self._socket_dir(vmid)
        return self._vm(vmid).launch(argv)

    def _kill(self, vmid: int) -> None:
        self._vm(vmid).kill()

    def stop(self, vmid: int, *, timeout: float = 60.0) -> bool:
        """ACPI power button, then (after ``timeout``) QMP quit, then SIGKILL.

        Returns whether the guest shut down on the power button by itself.
        """
        self.get_config(vmid)  # no such VM: NoSuchVMError, as status() and the PVE target's stop say
        return self._vm(vmid).stop(timeout)

    def guest_output(self, vmid: int) -> str:
        return _read(self.serial_log(vmid))

    def guest_io(self, vmid: int) -> GuestIO | None:
        """Bytes read per drive (QMP ``query-blockstats``, ``drive-<key>``), bytes the guest sent
        per NIC (its ``filter-dump`` pcap) and whether it panicked (``query-status``
        ``guest-panicked``: under ``-action panic=pause``; with QEMU 7.2's default, poweroff, the
        panic comes as the GUEST_PANICKED event the boot check reads instead)."""
        vm = self._vm(vmid)
        if not vm.running():
            return None
        monitor = self._monitors.get(vmid)
        try:
            if monitor is not None:
                return self._guest_io(vmid, monitor)
            monitor = vm.qmp()
            try:
                return self._guest_io(vmid, monitor)
            finally:
                close_quietly(monitor)
        except Exception:  # QEMU exiting or gone: nothing to count
            return None

    def _guest_io(self, vmid: int, monitor: Any) -> GuestIO:
        reads = {}
        for entry in monitor.cmd("query-blockstats"):  # qemu.qmp's ``cmd`` gives the return value
            device = entry.get("device", "")
            if device.startswith("drive-"):
                reads[device[len("drive-"):]] = int(entry["stats"]["rd_bytes"])
        status = monitor.cmd("query-status").get("status")
        sent = {key: dump.count() for (owner, key), dump in self._dumps.items() if owner == vmid}
        return GuestIO(reads=reads, sent=sent, panicked=status == "guest-panicked")

    def boot_check(self, vmid: int, *, timeout: float, settle: float = SETTLE) -> BootReport:
        """Boot the VM held and watch it (``bootwatch``) until it is up, failed, or ``timeout``
        passes (unconfirmed); every quarter second its serial and firmware logs, QMP events and
        ``guest_io`` counters are fed to the watch.

        An up or unconfirmed guest still running is left running, still held (it dies with
        this process): the caller releases or stops it. A failed one is killed (it has nothing
        to run; ``vm start`` boots it again), as is any on an interrupt.
        """
        vm = self._vm(vmid)
        if vm.running():
            vm.kill()  # left by an earlier run's check (or a released VM): check a fresh boot
        accel = probe_accel(self.accel_request)
        run_dir = self._run_dir(vmid)
        serial, firmware = run_dir / "serial.log", run_dir / "firmware.log"
        boot_disk, boot_nics = boot_devices(self.get_config(vmid))
        started = time.monotonic()
        monitor = self._launch(vmid)
        self._monitors[vmid] = monitor
        watch = BootWatch(vmid, timeout=timeout, settle=settle, started=started, serial_log=str(serial),
                          boot_disk=boot_disk, boot_nics=boot_nics)
        verdict: Verdict | None = None
        try:
            while verdict is None:
                check_interrupts()
                now = time.monotonic()
                io = self.guest_io(vmid)
                if io is not None:
                    watch.observe_io(now, io)
                verdict = watch.look(_read(serial), _read(firmware), now)
                if verdict is not None:
                    break
                for event in _events(monitor, wait=0.25):
                    if event.get("event") == RESET:
                        watch.reset(time.monotonic(), _read(firmware))
                    else:
                        watch.event(time.monotonic(), str(event.get("event")), event.get("data"))
                if not vm.running():
                    watch.event(time.monotonic(), STOPPED)
        except BaseException:
            self._monitors.pop(vmid, None)
            close_quietly(monitor)
            vm.kill()
            raise
        self._monitors.pop(vmid, None)
        close_quietly(monitor)
        if verdict.outcome == BOOT_FAILED:
            vm.kill()
        elif "stopped" in watch.signs and not vm.wait_exit(10):
            vm.kill()  # it stopped: QEMU exits by itself, or never will
        return watch.report(time.monotonic(), serial=_read(serial), firmware=_read(firmware)[-2000:], accel=accel)


def _events(monitor: Any, *, wait: float) -> list[dict[str, Any]]:
    """The QMP events that came within ``wait`` seconds, all of them if several did."""
    events = []
    try:
        event = monitor.pull_event(wait=wait)
        while event is not None:
            events.append(event)
            event = monitor.pull_event(wait=False)
    except Exception:  # nothing within the wait, or QEMU closed the socket on exit
        pass
    return events


class PcapCount:
    """Bytes of the frames in a growing pcap file (QEMU's ``filter-dump``: libpcap format, a
    24-byte header, then per frame a 16-byte record header whose last field is its length on the
    wire; net/dump.c ``dump_receive_iov``), read on from where the last count stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 24
        self._total = 0

    def count(self) -> int:
        try:
            with open(self.path, "rb") as dump:
                dump.seek(self._offset)
                data = dump.read()
        except FileNotFoundError:
            return self._total
        at = 0
        while at + 16 <= len(data):
            captured, length = struct.unpack_from("<II", data, at + 8)
            if at + 16 + captured > len(data):
                break  # a frame still being written
            self._total += length
            at += 16 + captured
        self._offset += at
        return self._total


def _read(path: Path) -> str:
    """A run log as text, line ends as Python's text mode gives them (a serial port sends \\r\\n)."""
    try:
        text = read_small(path, limit=LOG_LIMIT).decode(errors="replace")
    except FileNotFoundError:
        return ""
    return text.replace("\r\n", "\n").replace("\r", "\n")
