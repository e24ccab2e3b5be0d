"""The ``v2p`` command's arguments: the parser (its flags built from ``option_table``), the value checks
argparse runs, and the migration options a command line gives, as the library's keywords.

Not for: running a command or printing its outcome (``cli``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from . import __version__, api, cli_vsphere
from .errors import one_line
from .option_table import OPTION, OPTIONS, Option
from .options import (
    OptionError,
    check_seconds,
    check_whole,
    parse_seconds,
    parse_vmid,
    parse_whole,
)
from .storage import KINDS
from .targets.factory import KINDS as TARGET_KINDS
from .targets.kind_local import ACCELS

PROGRESS = ("auto", "plain", "json")  # --progress: how a long step's progress is shown
EXAMPLES = """examples:
  v2p inspect win7.vmdk
  v2p migrate win7.vmdk --vmid 102 --os win7
  v2p status 102
  v2p vm list
  v2p plan validate pipelines/wave-local.yaml
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but misuse ends in one ``v2p: error:`` line like every other error, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        say(f"v2p: error: {message} (hint: see {self.prog} --help)")
        sys.exit(2)


# Value checks run as argparse types and raise OptionError, which argparse lets through to main():
# the message is then the library's own, and the exit code the same as for the library's checks.
def _seconds(option: str, *, zero: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = parse_seconds(text)
        return check_seconds(option, text if value is None else value, zero=zero, typed=text)
    return parse


def _whole(option: str, bounds: tuple[int, int], unit: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = parse_whole(text)
        return check_whole(option, text if value is None else value, bounds, unit, typed=text)
    return parse


def _vmid_or_auto(text: str) -> int | str:
    return api.AUTO if text == api.AUTO else parse_vmid(text)


def _target_dir(text: str) -> str:
    if not text:
        raise OptionError("--target-dir is empty", hint="give a directory, or leave the option out for "
                          "$V2P_TARGET_DIR or ~/.local/share/v2p/local")
    return text


def _add_option(parser: argparse.ArgumentParser, option: Option, *, default: Any = None,
                help_text: str | None = None) -> None:
    """``option``'s flag on ``parser``, read as its kind says, into ``args.<keyword>``. ``default``:
    None for ``migrate``, whose options left out are left to the library (or the target: storage) by
    ``given``. ``help_text``: instead of the table's."""
    assert option.flag is not None
    kwargs: dict[str, Any] = {"dest": option.keyword, "default": default, "help": help_text or option.help}
    if option.metavar:
        kwargs["metavar"] = option.metavar
    if option.kind == "choice":
        kwargs["choices"] = option.choices
    elif option.kind == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction if option.negatable else "store_true"
    elif option.kind == "whole":
        kwargs["type"] = _whole(option.flag, option.bounds, option.unit)
    elif option.kind == "seconds":
        kwargs["type"] = _seconds(option.flag, zero=option.zero)
    elif option.kind in ("bridges", "rules"):
        kwargs.update(action="append", type=_network if option.kind == "bridges" else str)
    parser.add_argument(option.flag, **kwargs)


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The migration options given on the command line, as the library's keywords."""
    given = {option.keyword: getattr(args, option.keyword) for option in OPTIONS
             if getattr(args, option.keyword, None) is not None}
    if "networks" in given:
        given["networks"] = dict(given["networks"])
    return given


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="v2p", description="Move VMware VMs onto KVM.",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"v2p {__version__}")
    _add_globals(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="tell what a disk is, or what a VM (.vmx, .ovf, .ova, VM folder) "
                       "would become and which preflight rules it trips")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--vmid", type=parse_vmid, default=100, help="the VMID a VM's config is shown for (default: 100)")
    for keyword, text in (("networks", "the bridge for the NICs on VMware network NAME (repeatable)"),
                          ("bridge", "the bridge for NICs whose network has no --network"),
                          ("ignore_rules", "turn an ignorable rule's error into a warning")):
        _add_option(p, OPTION[keyword], default=[] if keyword != "bridge" else None,
                    help_text=f"as for migrate: {text}")

    p = sub.add_parser("migrate", help="migrate a VMware VM (.vmx, .ovf, .ova, VM folder) or one disk to a new VM")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--vmid", type=_vmid_or_auto, required=True,
                   help="the new VM's id, or auto: the next free one on the target (rerun, it resumes)")
    for option in OPTIONS:
        if option.flag is not None:
            _add_option(p, option)
    p.add_argument("--dry-run", action="store_true", help="print the stages and stop")
    p.add_argument("--json", action="store_true", help="the result (or with --dry-run the stages) as one JSON "
                   "object on stdout; the progress lines go to stderr")
    _add_progress(p)

    p = sub.add_parser("dance", help="move an existing Windows VM from IDE to virtio (two boots)")
    p.add_argument("vmid", type=parse_vmid, metavar="VMID")
    p.add_argument("--bus", choices=("virtio", "scsi"), default="virtio")
    p.add_argument("--continue", dest="confirmed", action="store_true",
                   help="the guest has its drivers now (after v2p asked you to check)")
    for keyword in ("drivers_iso", "net_drivers", "arch", "dance_wait"):
        _add_option(p, OPTION[keyword], default=OPTION[keyword].default)
    p.add_argument("--boot-wait", type=_seconds("--boot-wait"), default=120.0,
                   help="seconds to watch the virtio boot for a STOP code (default: 120)")
    _add_option(p, OPTION["shutdown_timeout"], default=OPTION["shutdown_timeout"].default)
    _add_option(p, OPTION["start"], default=False, help_text="leave the VM running on virtio afterwards "
                "(default: shut it down)")

    p = sub.add_parser("status", help="show the stages of recorded migrations")
    p.add_argument("vmid", nargs="?", type=parse_vmid, metavar="VMID")
    p.add_argument("--json", action="store_true")

    st = sub.add_parser("storage", help="the local target's storages").add_subparsers(
        dest="storage_command", required=True, metavar="ACTION")
    st.add_parser("list", help="list storages with their free space").add_argument(
        "--json", action="store_true", help="machine-readable output")
    sp = st.add_parser("add", help="add a storage to storage.cfg")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--type", dest="kind", choices=sorted(KINDS), required=True)
    sp.add_argument("--path", help="dir: the directory")
    sp.add_argument("--vgname", help="lvm/lvmthin: the volume group")
    sp.add_argument("--thinpool", help="lvmthin: the thin pool")
    sp.add_argument("--lvm-config", help="lvm: extra --config for every LVM command (e.g. a device filter)")

    pl = sub.add_parser("plan", help="migrate many VMs from a YAML plan (see pipelines/)").add_subparsers(
        dest="plan_command", required=True, metavar="ACTION")
    pp = pl.add_parser("validate", help="report every problem of a plan (FILE:LINE:COLUMN: message), "
                       "touching nothing")
    pp.add_argument("plan", metavar="PLAN")
    pp = pl.add_parser("status", help="each VM's stage and result, from the state files (also while a "
                       "plan runs)")
    pp.add_argument("plan", metavar="PLAN")
    pp.add_argument("--json", action="store_true", help="machine-readable output")
    pp = pl.add_parser("run", help="migrate (or resume) every VM of a plan, several at once")
    pp.add_argument("plan", metavar="PLAN")
    pp.add_argument("--parallel", type=_whole("--parallel", (1, 64)), default=None,
                    help="migrations at once (default: 2, which keeps a 2-core machine responsive)")
    pp.add_argument("--dry-run", action="store_true", help="show what each VM would do and stop")
    pp.add_argument("--json", action="store_true", help="write a machine-readable report on stdout")
    _add_progress(pp)
    pp.add_argument("--per-storage", type=_whole("--per-storage", (1, 64)), default=None,
                    help="migrations at once onto one target storage (default: 3)")
    pp.add_argument("--per-node", type=_whole("--per-node", (1, 64)), default=None,
                    help="migrations at once onto one PVE node (default: 4)")

    vm = sub.add_parser("vm", help="manage VMs on the local target").add_subparsers(
        dest="vm_command", required=True, metavar="ACTION")
    vm.add_parser("list", help="list VMs").add_argument("--json", action="store_true",
                                                        help="machine-readable output")
    for name, text in (("show", "print a VM's config"), ("start", "start a VM"),
                       ("stop", "shut a VM down (ACPI, then hard)"),
                       ("rm", "remove a VM, its disks and its migration record")):
        vp = vm.add_parser(name, help=text)
        vp.add_argument("vmid", type=parse_vmid, metavar="VMID")
        if name == "show":
            vp.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "rm":
            vp.add_argument("--force", action="store_true",
                            help="remove it even if v2p did not make it: its name must be typed back "
                            "(--confirm-name, or asked for when stdin is a terminal)")
            vp.add_argument("--confirm-name", metavar="NAME", help="with --force: the VM's name (its VMID "
                            "if it has none)")
        if name == "stop":
            vp.add_argument("--timeout", type=_seconds("--timeout", zero=True), default=60.0,
                            help="seconds to wait for the guest before a hard stop; 0 stops it hard at "
                            "once (default: 60)")
    cli_vsphere.add_parser(sub)
    _globals_on_every_command(parser)
    return parser


def _add_progress(parser: argparse.ArgumentParser) -> None:
    """``--progress`` and its alias ``--machine-readable`` (virt-v2v's name) on ``migrate`` and ``plan run``."""
    parser.add_argument("--progress", choices=PROGRESS, default="auto",
                        help="auto: a bar per step on a terminal, else a plain line every 10 s or 10 %%; "
                        "plain: those lines on a terminal too; json: every event as one JSON object a line "
                        "on stdout, the result as the last line (human lines go to stderr)")
    parser.add_argument("--machine-readable", dest="progress", action="store_const", const="json",
                        help="the same as --progress=json")


def _add_globals(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options every command takes, before its name or after it. ``suppress``: a command's copy,
    without defaults, so that leaving it out after the command keeps what was given before it (and
    one given after it wins over one given before)."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="show every external command run (argv, exit status, seconds) on stderr, and "
                        "tracebacks on errors")
    parser.add_argument("--target", default=default("local"), metavar="TARGET",
                        help="where VMs go: " + " or ".join(kind.usage for kind in TARGET_KINDS.values()))
    parser.add_argument("--target-dir", type=_target_dir, default=default(None),
                        help="local target directory (default: $V2P_TARGET_DIR or ~/.local/share/v2p/local)")
    parser.add_argument("--accel", choices=ACCELS, default=default("auto"),
                        help="QEMU acceleration for the local target (default: auto)")


def _globals_on_every_command(parser: argparse.ArgumentParser) -> None:
    """The global options on each command's and action's parser too (``v2p status --target-dir D``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _add_globals(command, suppress=True)
                _globals_on_every_command(command)


def say(line: str) -> None:
    """One line on stderr, whatever a user's value in it holds (see ``one_line``)."""
    try:
        print(one_line(line), file=sys.stderr)
    except OSError:  # nobody is listening on stderr either
        pass


def _network(text: str) -> tuple[str, str]:
    name, sep, bridge = text.rpartition("=")
    if not sep or not name or not bridge:
        raise argparse.ArgumentTypeError(f"--network {text!r}: expected NAME=BRIDGE")
    return name, bridge

