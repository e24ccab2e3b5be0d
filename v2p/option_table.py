"""The one declaration of every migration option: its library keyword, kind, range or choices,
default, help, CLI flag and plan key.

``MigrationOptions`` (``options``) takes its defaults and checks from here, ``v2p migrate``'s flags
(``cli.build_parser``) and a plan's option keys (``plan.KEYS``) are built from here, and
``tests/test_option_table.py`` proves the three agree. Pure data: what a kind means (a bridge
name's pattern, a seconds value's limits) is checked in ``options``.
Not for: options of one command only (``--dry-run``, ``dance --boot-wait``), nor plan keys that are
not options (``source``, ``vmid``, ``target``, ``node``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

WINDOWS_OSTYPES = {"wxp", "w2k", "w2k3", "w2k8", "wvista", "win7", "win8", "win10", "win11"}
OSTYPES = WINDOWS_OSTYPES | {"l24", "l26", "solaris", "other"}
BUSES = ("ide", "sata", "scsi", "virtio")
FORMATS = ("qcow2", "raw")
COPIERS = ("qemu-img", "dd")
BIOSES = ("seabios", "ovmf")  # PVE's bios values v2p may set
SCSIHW = ("lsi", "lsi53c810", "megasas", "pvscsi", "virtio-scsi-pci", "virtio-scsi-single")
# virtio-win's folder names for the guest's architecture. Not ARM64 (which virtio-win has too): v2p's
# targets run x86 guests only (QEMU's x86_64 system emulator, PVE's x86 VMs).
ARCHES = ("amd64", "x86")

# A day: longer waits are typing mistakes, and timer calls overflow on huge values.
MAX_SECONDS = 86400.0
CORES = (1, 512)
SOCKETS = (1, 16)
MEMORY = (16, 4 << 20)  # MiB: 16 MiB - 4 TiB
BWLIMIT = (1, 1 << 30)  # KiB/s: up to 1 TiB/s

# What a value is, and so how each surface reads and checks it:
#   choice   one of ``choices`` (None too when the default is None)
#   text     a path or a name: a str without control characters
#   device   text, an absolute path
#   vm-name  a DNS name, as PVE requires of a VM's name
#   bridge   a Linux bridge name (None too when the default is None)
#   bridges  VMware network name -> bridge name
#   rules    a list of preflight rule ids (``rules.check_ignore`` knows which)
#   whole    a whole number within ``bounds``
#   seconds  a finite number of seconds, positive (or 0 when ``zero``), at most MAX_SECONDS
#   bool     True or False
#   extra    a dict for callers' own use (library only)
Kind = Literal["choice", "text", "device", "vm-name", "bridge", "bridges", "rules", "whole", "seconds", "bool",
               "extra"]


@dataclass(frozen=True)
class Option:
    """One migration option as each surface spells it."""

    keyword: str  # MigrationOptions' field: the library keyword
    kind: Kind
    default: Any
    help: str  # the CLI's help, in the user's words; a plan key means the same
    flag: str | None = None  # on ``v2p migrate`` (None: library only)
    plan_key: str | None = None  # in a plan's defaults: or a VM (None: not in plans)
    choices: tuple[str, ...] = ()
    choices_are: str = ""  # what the choices are, for the library's hint ("a PVE ostype")
    bounds: tuple[int, int] = (0, 0)  # whole: the range
    unit: str = ""  # whole: what it counts, after the range in messages
    zero: bool = False  # seconds: 0 is a choice too (act at once)
    per_vm: bool = False  # a plan sets it per VM only, never under defaults:
    negatable: bool = True  # bool: the CLI also has --no-FLAG
    metavar: str | None = None
    volatile: bool = False  # a resumed migration may change it (not in ``MigrationOptions.identity()``)

    @property
    def optional(self) -> bool:
        """None is a value too: "not said, the VM's own (or the target's) decides"."""
        return self.default is None


OPTIONS: tuple[Option, ...] = (
    Option("ostype", "choice", None, "PVE ostype; Windows types boot from IDE, others from SCSI (default: the VM's "
           "guest OS; l26 for a loose disk)", "--os", "os", tuple(sorted(OSTYPES)), choices_are="a PVE ostype"),
    Option("bus", "choice", None, "disk bus (default: ide for Windows, scsi otherwise)", "--bus", "bus", BUSES),
    Option("fmt", "choice", None, "disk format (default: qcow2 on dir storages, raw on lvm and devices)",
           "--format", "format", FORMATS),
    Option("name", "vm-name", None, "the new VM's name: letters, digits, '-' and '.' (default: the VM's own, made so)",
           "--name", "name", per_vm=True),
    Option("cores", "whole", None, "per socket (default: the VM's; 1 for a loose disk)", "--cores", "cores",
           bounds=CORES),
    Option("memory", "whole", None, "MiB (default: the VM's; 512 for a loose disk)", "--memory", "memory",
           bounds=MEMORY, unit="MiB"),
    Option("sockets", "whole", None, "default: the VM's (1 for a loose disk)", "--sockets", "sockets",
           bounds=SOCKETS),
    Option("networks", "bridges", {}, "put the VM's NICs on VMware network NAME onto bridge BRIDGE (repeatable)",
           "--network", "networks", metavar="NAME=BRIDGE"),
    Option("bridge", "bridge", None, "the bridge for NICs whose network has no --network (default: none for "
           "named networks: refused; vmbr0 for a loose disk's NIC)", "--bridge", "bridge"),
    Option("ignore_rules", "rules", (), "turn an ignorable preflight rule's error into a warning (see v2p inspect)",
           "--ignore-rule", "ignore_rules", metavar="ID"),
    Option("scsihw", "choice", "virtio-scsi-pci", "the SCSI controller for scsi disks (default: virtio-scsi-pci)",
           "--scsihw", "scsihw", SCSIHW),
    Option("bios", "choice", None, "the VM's firmware (default: the VM's; for a loose disk ovmf when only UEFI can "
           "boot it, else seabios)", "--bios", "bios", BIOSES),
    Option("start", "bool", False, "leave the VM running at the end (default: stopped)", "--start", "start",
           volatile=True),
    Option("boot_check", "bool", True, "boot the VM once and watch it come up (default: on)", "--boot-check",
           "boot_check", volatile=True),
    Option("boot_timeout", "seconds", 60.0, "seconds (default: 60)", "--boot-timeout", "boot_timeout",
           volatile=True),
    Option("bwlimit", "whole", None, "limit conversion I/O to this many KiB/s", "--bwlimit", "bwlimit",
           bounds=BWLIMIT, unit="KiB/s", volatile=True),
    Option("storage", "text", "local", "target storage (default: local; on PVE the pve:// URL's storage=)",
           "--storage", "storage"),
    Option("device", "device", None, "write the disk onto this block device instead of a storage", "--to-device",
           "device", per_vm=True, metavar="DEVICE"),
    Option("copy_with", "choice", "qemu-img", "qemu-img (default, every flavor) or dd (raw/flat sources only)",
           "--copy-with", "copy_with", COPIERS),
    Option("verify", "bool", True, "compare the written disk with the source (default: on)", "--verify", "verify",
           volatile=True),
    # Not in plans: a plan never overwrites a device that carries data.
    Option("force", "bool", False, "overwrite a device that carries a partition table or file system, or is held "
           "open", "--force", negatable=False, volatile=True),
    Option("drivers_iso", "text", None, "virtio-win ISO for the Windows driver dance (a path, or a PVE volume such "
           "as local:iso/virtio-win.iso)", "--drivers-iso", "drivers_iso", volatile=True),
    Option("net_drivers", "bool", True, "Windows onto virtio: also install NetKVM and move the NIC to virtio "
           "(default: on)", "--net-drivers", "net_drivers"),
    Option("arch", "choice", "amd64", "the Windows guest's architecture", "--arch", "arch", ARCHES),
    Option("dance_wait", "seconds", 600.0, "seconds to wait for the guest to install its drivers on the IDE boot "
           "(default: 600)", "--dance-wait", "dance_wait", volatile=True),
    Option("shutdown_timeout", "seconds", 120.0, "seconds the guest gets to shut down on the power button; 0 stops "
           "it hard at once (default: 120)", "--shutdown-timeout", "shutdown_timeout", zero=True, volatile=True),
    # The source VM's own power: a running vSphere VM is refused unless asked to stop it (sources that
    # are files have nothing running: for them it does nothing, so a plan's defaults may say it).
    Option("shutdown", "bool", False, "a running source VM (vSphere): shut its guest down through VMware Tools, "
           "power it off if it has not stopped after --shutdown-wait (default: a running VM is refused)",
           "--shutdown", "shutdown", negatable=False, volatile=True),
    Option("shutdown_wait", "seconds", 300.0, "seconds --shutdown waits for the guest to shut down before it "
           "powers the VM off; 0 powers it off at once (default: 300)", "--shutdown-wait", "shutdown_wait",
           zero=True, volatile=True),
    Option("keep_on_failure", "bool", False, "on an error while the VM and its disks are made, keep them for a "
           "rerun that resumes (default: remove what this migration made)", "--keep-on-failure",
           "keep_on_failure", negatable=False, volatile=True),
    Option("extra", "extra", {}, "a library caller's own data, kept in the migration's record"),
)

OPTION: dict[str, Option] = {option.keyword: option for option in OPTIONS}
# The CLI's flags as a plan spells them, for messages of deeper checks that name a flag.
PLAN_WORDS: dict[str, str] = {option.flag: option.plan_key for option in OPTIONS if option.flag and option.plan_key}
