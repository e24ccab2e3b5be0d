"""The qemu-system-x86_64 command line of a VM, from its PVE-style config.

Only argv building: no process is started here (``supervisor``), no file
is read (the target passes the config and how to find a volume).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ..errors import TargetError
from ..pveconfig import DISK_KEY, parse_boot_order
from ..runner import which
from ..volumes import parse_drive
from . import efi
from .base import VMConfig

SCSI_CONTROLLERS = {
    "lsi": "lsi53c895a", "lsi53c810": "lsi53c810", "megasas": "megasas", "pvscsi": "pvscsi",
    "virtio-scsi-pci": "virtio-scsi-pci", "virtio-scsi-single": "virtio-scsi-pci",
}
NIC_MODELS = {"e1000": "e1000", "virtio": "virtio-net-pci", "rtl8139": "rtl8139",
              "vmxnet3": "vmxnet3", "e1000e": "e1000e"}


def split_property(value: str) -> tuple[str, dict[str, str]]:
    """``'local:1/a.qcow2,size=1G'`` -> ``('local:1/a.qcow2', {'size': '1G'})``."""
    first, *rest = value.split(",")
    opts = {}
    for item in rest:
        key, _, val = item.partition("=")
        opts[key] = val
    return first, opts


def build(vmid: int, config: VMConfig, accel: str, *, run_dir: Path, qmp_path: Path,
          volume_file: Callable[[str], tuple[Path, str]], serial_socket: Path | None = None) -> list[str]:
    """The qemu-system-x86_64 argv for VM ``vmid`` with ``config``; ``volume_file`` maps a
    volume id to (path, format). The serial port is logged to ``run_dir/serial.log``; with
    ``serial0: socket`` in the config it is also a listening unix socket at ``serial_socket``
    (as qemu-server makes ``/var/run/qemu-server/<vmid>.serial0``)."""
    firmware = efi.firmware(vmid, config)
    machine = _machine(vmid, config, firmware)
    serial = f"file,id=serial0,path={_qemu_escape(run_dir / 'serial.log')}"
    if config.get("serial0") == "socket" and serial_socket is not None:
        serial = (f"socket,id=serial0,path={_qemu_escape(serial_socket)},server=on,wait=off,"
                  f"logfile={_qemu_escape(run_dir / 'serial.log')}")
    argv = [
        which("qemu-system-x86_64"), "-name", config.get("name", f"vm{vmid}"),
        "-machine", machine,
        "-accel", accel, "-m", config.get("memory", "512"),
        "-smp", config.get("cores", "1"), "-nodefaults", "-display", "none",
        "-qmp", f"unix:{_qemu_escape(qmp_path)},server=on,wait=off",
        "-pidfile", str(run_dir / "qemu.pid"),
        "-chardev", serial,
        "-device", "isa-serial,chardev=serial0",
        "-chardev", f"file,id=fwlog,path={_qemu_escape(run_dir / 'firmware.log')}",
        "-device", "isa-debugcon,iobase=0x402,chardev=fwlog",
        # A guest kernel's panic becomes QMP GUEST_PANICKED (Linux drivers/misc/pvpanic, Windows
        # 10+ pvpanic.sys; QEMU hw/misc/pvpanic-isa.c, port 0x505), the VM pauses: a boot check sign.
        "-device", "pvpanic",
    ]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    if firmware is not None:
        argv += _pflash_args(config, firmware, volume_file)
    order = parse_boot_order(config)
    argv += _disk_args(vmid, config, order, volume_file, q35=machine.startswith("q35"))
    argv += _nic_args(config, order, run_dir)
    return argv

def _machine(vmid: int, config: VMConfig, firmware: efi.Firmware | None) -> str:
    machine = config.get("machine", "")
    q35 = "q35" in machine
    if firmware is None or not firmware.secure:
        return "q35" if q35 else "pc"
    # OVMF's Secure Boot build keeps its variables safe in SMM, which it only supports on q35.
    if machine and not q35:
        raise TargetError(f"VM {vmid}: Secure Boot (efidisk0 pre-enrolled-keys=1) needs a q35 machine, "
                          f"the config says machine: {machine}",
                          hint="set machine: q35, or pre-enrolled-keys=0")
    return "q35,smm=on"


def _pflash_args(config: VMConfig, firmware: efi.Firmware,
                 volume_file: Callable[[str], tuple[Path, str]]) -> list[str]:
    """OVMF as two flash chips: the code read-only, the VM's efidisk0 as its variable store."""
    argv = ["-drive", f"if=pflash,unit=0,format=raw,readonly=on,file={_qemu_escape(firmware.code)}"]
    if firmware.secure:
        # Only SMM code may write the vars flash: the guest OS cannot bypass Secure Boot.
        argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    disk = efi.efidisk_options(config)
    if disk is None:
        # Like PVE without an efidisk: variables live for one run only (a throwaway overlay).
        return argv + ["-drive", f"if=pflash,unit=1,format=raw,snapshot=on,"
                       f"file={_qemu_escape(firmware.vars_template)}"]
    path, fmt = volume_file(disk[0])
    # A raw vars volume may be bigger than the flash (an LV is whole extents): use its head.
    size = f",size={firmware.vars_size}" if fmt == "raw" else ""
    return argv + ["-drive", f"if=pflash,unit=1,id=drive-efidisk0,format={fmt}{size},"
                   f"file={_qemu_escape(path)}"]


def _ide_address(index: int, *, q35: bool) -> str:
    """Where ``ide<index>`` sits, as Proxmox places it (qemu-server's print_drivedevice_full).

    i440fx's PIIX3 has two buses of two units. q35's IDE buses are the ICH9 AHCI's six ports,
    one unit each (QEMU refuses unit 1 there): Proxmox keeps the even indices on their i440fx
    bus (ide0 ide.0, ide2 ide.1) and moves the odd ones up two (ide1 ide.2, ide3 ide.3), and a
    config must start here as it would on Proxmox.
    """
    bus, unit = index // 2, index % 2
    if q35:
        bus, unit = bus + 2 * unit, 0
    return f"bus=ide.{bus},unit={unit}"


def _disk_args(vmid: int, config: VMConfig, order: list[str],
               volume_file: Callable[[str], tuple[Path, str]], *, q35: bool = False) -> list[str]:
    argv: list[str] = []
    scsihw = config.get("scsihw", "lsi")
    controllers: set[str] = set()
    for key in sorted(config):
        match = DISK_KEY.match(key)
        if not match:
            continue
        bus, index = match.group(1), int(match.group(2))
        try:
            drive = parse_drive(config[key])
        except ValueError as exc:
            raise TargetError(f"VM {vmid}: {key}: {exc}") from None
        volid, opts = drive.volume, drive.options
        boot = f",bootindex={order.index(key) + 1}" if key in order else ""
        if opts.get("media") == "cdrom":
            if volid == "none":
                continue
            path, _fmt = volume_file(volid)
            argv += ["-drive", f"file={_qemu_escape(path)},format=raw,if=none,id=drive-{key},media=cdrom,"
                     "readonly=on",
                     "-device", f"ide-cd,{_ide_address(index, q35=q35)},drive=drive-{key}{boot}"]
            continue
        if volid == "none":
            continue
        path, fmt = volume_file(volid)
        argv += ["-drive", f"file={_qemu_escape(path)},format={fmt},if=none,id=drive-{key},cache=writeback"]
        if bus == "ide":
            argv += ["-device", f"ide-hd,{_ide_address(index, q35=q35)},drive=drive-{key}{boot}"]
        elif bus == "sata":
            if "ahci" not in controllers:
                argv += ["-device", "ahci,id=ahci0"]
                controllers.add("ahci")
            argv += ["-device", f"ide-hd,bus=ahci0.{index},drive=drive-{key}{boot}"]
        elif bus == "scsi":
            if "scsi" not in controllers:
                if scsihw not in SCSI_CONTROLLERS:
                    raise TargetError(f"VM {vmid}: unknown scsihw {scsihw!r}")
                argv += ["-device", f"{SCSI_CONTROLLERS[scsihw]},id=scsihw0"]
                controllers.add("scsi")
            argv += ["-device", f"scsi-hd,bus=scsihw0.0,scsi-id={index},drive=drive-{key}{boot}"]
        else:
            argv += ["-device", f"virtio-blk-pci,drive=drive-{key}{boot}"]
    return argv


def _qemu_escape(path: Path) -> str:
    """A path as one value of a QEMU ``key=value,...`` option (commas doubled)."""
    return str(path).replace(",", ",,")


def pcap_name(key: str) -> str:
    """The file in the run folder where NIC ``key``'s guest-sent frames are dumped."""
    return f"{key}.pcap"


def _nic_args(config: VMConfig, order: list[str], run_dir: Path) -> list[str]:
    argv: list[str] = []
    for key in sorted(config):
        if not re.fullmatch(r"net\d+", key):
            continue
        model_mac, opts = split_property(config[key])
        model, _, mac = model_mac.partition("=")
        if model not in NIC_MODELS:
            raise TargetError(f"unknown NIC model {model!r} in {key}")
        device = f"{NIC_MODELS[model]},netdev={key}"
        if mac:
            device += f",mac={mac}"
        device += f",bootindex={order.index(key) + 1}" if key in order else ",romfile="
        # What the guest sends, as pcap: the boot check's network sign. ``queue=rx`` is the
        # netdev's receive queue, the frames the NIC sends to it (QEMU net/filter.c, docs of
        # ``-object filter-dump``; net/dump.c writes each frame as it passes, unbuffered).
        argv += ["-netdev", f"user,id={key}", "-device", device,
                 "-object", f"filter-dump,id=dump-{key},netdev={key},queue=rx,"
                 f"file={_qemu_escape(run_dir / pcap_name(key))}"]
    return argv
