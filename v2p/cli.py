"""The ``v2p`` command: parses arguments, calls the library, prints.

No logic a library user would need lives here; errors arrive as V2PError and
leave as one line on stderr and a non-zero exit (``-v`` adds the traceback, and the
library's log: every external command with its argv and duration). The arguments themselves (the
parser, its value checks) are ``cli_args``'.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import select
import shlex
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from . import api, cli_vsphere, interrupts
from .boot_outcomes import BOOT_SKIPPED, boot_exit_code, boot_outcome, boot_words
from .cli_args import build_parser, given, say
from .errors import V2PError, shown_path
from .eventlines import EventPrinter, kept, logged
from .events import Event
from .inspect import DiskImage
from .logfile import RunLog
from .option_table import OPTIONS
from .options import (
    OptionError,
)
from .plan_status import stopped_in
from .stages import STAGES, dance_boot
from .targets.base import BOOT_FAILED, BOOT_UP


def main(argv: Sequence[str] | None = None) -> int:
    _standard_streams()
    interrupts.install()  # SIGTERM stops a run the way Ctrl-C does: resumable, one line
    try:
        args = build_parser().parse_args(argv)
    except OptionError as exc:  # a value check run by argparse (see cli_args._seconds)
        say(f"v2p: error: {exc}")
        return exc.exit_code
    if args.verbose:
        _log_to_stderr()
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # a reader gone away shows here, not in the interpreter's exit flush
        return code
    except V2PError as exc:
        if args.verbose:
            traceback.print_exc()
        say(f"v2p: error: {exc}")
        for note in getattr(exc, "__notes__", ()):  # what else went wrong on the way out
            say(f"v2p: {note}")
        return exc.exit_code
    except OSError as exc:  # a path v2p was given or keeps state in is unusable
        if isinstance(exc, BrokenPipeError) and _stdout_gone():
            return _reader_gone()
        if args.verbose:
            traceback.print_exc()
        where = f"{shown_path(exc.filename)}: " if exc.filename else ""
        say(f"v2p: error: {where}{exc.strerror or exc}")
        return 1
    except KeyboardInterrupt:
        print(interrupts.STOPPED, file=sys.stderr)
        return interrupts.exit_status()


def _log_to_stderr() -> None:
    """``-v``: the library's DEBUG records (each external command it runs) as ``v2p: debug:`` lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("v2p: %(levelname)s: %(name)s: %(message)s"))
    logger = logging.getLogger("v2p")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)




def _standard_streams() -> None:
    """Started with stdin, stdout or stderr closed (``v2p ... >&-``), the next file v2p opens would
    get that descriptor, and whatever is printed (or a child writes there) would land in it: give each
    closed one /dev/null first, and Python a stream for it (it has None for a descriptor closed at start)."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False, errors="backslashreplace"))


def _stdout_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader has closed it (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _reader_gone() -> int:
    """Exit as Unix tools do when the reader of their output goes (`v2p status | head -1`): quietly,
    with the status of a process ended by SIGPIPE. stdout becomes /dev/null so that the interpreter's
    last flush of what is still buffered does not fail again ("Exception ignored ...")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "plan":
        return _plan(args)
    if args.command == "vsphere":
        return cli_vsphere.run(args)
    # The operator's own --target: their environment's PVE secret goes with it.
    target = api.make_target(args.target, directory=args.target_dir, accel=args.accel, env=os.environ)
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "migrate":
        return _migrate(args, target)
    if args.command == "status":
        return _status(args, target)
    if args.command == "storage":
        if not isinstance(target, api.LocalTarget):
            raise OptionError("v2p storage manages the local target's storage.cfg",
                              hint="on Proxmox VE use pvesm or the web UI")
        return _storage(args, target)
    if args.command == "dance":
        result = api.dance(args.vmid, target=target, bus=args.bus, confirmed=args.confirmed,
                           drivers_iso=args.drivers_iso, net_drivers=args.net_drivers, arch=args.arch,
                           dance_wait=args.dance_wait, boot_wait=args.boot_wait,
                           shutdown_timeout=args.shutdown_timeout, start=args.start, on_event=EventPrinter())
        boot = dance_boot(result)  # boot 2 on virtio, judged as any boot check (a failed one rolled back)
        print(f"VM {args.vmid} now boots from {result['system_disk']}; {boot_words(boot['outcome'], boot['signal'])}")
        return boot_exit_code(boot["outcome"])
    return _vm(args, target)


def _plan(args: argparse.Namespace) -> int:
    from .plan import Plan, PlanError

    if args.target != "local":
        raise OptionError("--target does not apply to plans: each VM's target is the plan's target: key",
                          hint=f"set target: under defaults: in {args.plan}")
    # --target-dir / --accel: for the plan's VMs on the local target whose plan names no dir / accel.
    accel = args.accel if args.accel != "auto" else None
    if args.plan_command == "validate":
        try:
            plan = Plan.load(args.plan, strict=False, local_dir=args.target_dir, accel=accel)
            problems = plan.problems()
        except PlanError as exc:  # a text that cannot be read as YAML at all
            problems = exc.problems
        for problem in problems:
            say(str(problem))
        if problems:
            return PlanError.exit_code
        print(f"{args.plan}: {len(plan.vms)} VM{'s' if len(plan.vms) != 1 else ''}, OK")
        return 0
    plan = Plan.load(args.plan, local_dir=args.target_dir, accel=accel)
    if args.plan_command == "status":
        return _plan_status(args, plan)
    from .planview import PlanView, dry_run_text, summary

    # With --json or --progress=json, stdout holds JSON alone: the view goes to stderr.
    machine = args.progress == "json"
    view = PlanView(sys.stderr if args.json or machine else sys.stdout,
                    live=None if args.progress == "auto" else False)
    events = _JsonLines() if machine else None
    log = None if args.dry_run else _plan_log(plan, args)
    log_view = PlanView(log.stream, live=False) if log is not None else None
    tried = False

    def on_event(vm: Any, event: Event) -> None:
        nonlocal tried
        view(vm, event)
        if log is not None and log_view is not None:
            if not tried and event.kind == "vm-start":
                tried = True
                kept(log, say)
            log_view(vm, event)
        if events is not None:
            events(event, vm=vm.name)

    options: dict[str, Any] = {key: value for key, value in (
        ("parallel", args.parallel), ("per_storage", args.per_storage), ("per_node", args.per_node))
        if value is not None}
    try:
        with log or contextlib.nullcontext():
            report = plan.run(dry_run=args.dry_run, on_event=on_event, accel=args.accel, logs=log is not None,
                              **options)
            if log is not None and log.path is not None:
                print(summary(report), file=log.stream)
    finally:
        view.close()
        _said_log(log)
    if events is not None:
        events.send({"kind": "result", **report.to_dict(), "log": log and log.path and str(log.path)})
    elif args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif args.dry_run:
        print(dry_run_text(report))
    else:
        print(summary(report))
    if report.interrupted is not None:
        print("v2p: interrupted; rerun the same command to resume", file=sys.stderr)
    return report.exit_code


def _plan_log(plan: Any, args: argparse.Namespace) -> RunLog | None:
    """``plan run``'s log: ``plan-<name>-<time>.log`` in the state folder of its first VM's target, kept
    once a VM starts (a plan whose every VM is refused makes nothing)."""
    if not plan.vms:
        return None
    try:
        target = api.make_target(plan.vms[0].target, accel=args.accel, env=os.environ)
    except V2PError:
        return None  # that VM fails in its own words
    return RunLog(target.state_dir(), f"plan-{Path(args.plan).stem}")


def _plan_status(args: argparse.Namespace, plan: Any) -> int:
    statuses = plan.status()
    if args.json:
        print(json.dumps([status.to_dict() for status in statuses], indent=2))
    else:
        width = max([len(status.name) for status in statuses] + [4])
        print(f"{'VM':<{width}}  {'VMID':>9}  {'STATE':<11}  STAGE / DETAIL")
        for status in statuses:
            vmid = str(status.vmid) if status.vmid is not None else "auto"
            # An interrupted, failed or copying VM's detail says the stage it is in; its last recorded
            # stage beside that would read as where it stopped.
            last = status.stage if status.state not in ("interrupted", "failed") and status.percent is None else None
            about = ", ".join(part for part in (last and f"[{last}]", status.detail) if part)
            print(f"{status.name:<{width}}  {vmid:>9}  {status.state:<11}  {about}".rstrip())
    return 5 if any(status.state == "unreadable" for status in statuses) else 0


def _storage(args: argparse.Namespace, target: api.LocalTarget) -> int:
    if args.storage_command == "add":
        options = {key: value for key, value in (
            ("path", args.path), ("vgname", args.vgname), ("thinpool", args.thinpool),
            ("lvm-config", args.lvm_config)) if value}
        target.add_storage(args.name, args.kind, options)
        print(f"storage {args.name} ({args.kind}) added to {target.storage_cfg}")
        return 0
    rows = []
    for name, storage in target.storages().items():
        row: dict[str, Any] = {"name": name, "type": storage.kind, "options": dict(storage.options),
                               "free_bytes": None, "error": None}
        try:
            row["free_bytes"] = storage.free_bytes()
            free = f"{row['free_bytes'] / (1 << 30):.1f} GiB free"
        except V2PError as exc:
            row["error"] = str(exc)
            free = f"unavailable: {exc}"
        rows.append(row)
        if not args.json:
            print(f"{name:<12} {storage.kind:<8} {', '.join(f'{k}={v}' for k, v in storage.options.items())}"
                  f"  ({free})")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    rows = api.inspect_all(args.paths, vmid=args.vmid, networks=dict(args.networks), bridge=args.bridge,
                           ignore_rules=tuple(args.ignore_rules))
    if args.json:
        print(json.dumps([row.to_dict() for row in rows], indent=2))
    else:
        for row in rows:
            if isinstance(row, api.VMReport):
                _print_vm(row)
            elif row.image is not None:
                _print_image(row.image)
            else:
                print(f"{row.path}\n  verdict:  refused: {row.error}")
    refused = [row.error for row in rows if row.error is not None]
    for error in refused:
        say(f"v2p: error: {error}")
    return max((error.exit_code for error in refused), default=0)


def _print_vm(report: api.VMReport) -> None:
    print(f"{report.path}")
    spec = report.spec
    if spec is None:  # the VM's description itself is refused
        print(f"  verdict:   refused: {report.error}")
        return
    print(f"  vm:        {spec.name} ({report.kind})")
    print(f"  firmware:  {spec.firmware}" + (", secure boot" if spec.secure_boot else ""))
    print(f"  cpu:       {spec.sockets} socket(s) x {spec.cores} core(s)")
    print(f"  memory:    {spec.memory_mib} MiB")
    print(f"  guest os:  {spec.guest_os or '(not named)'} -> {report.ostype}")
    for disk in report.disks:
        about = [disk.spec.controller_model or disk.spec.controller, disk.spec.mode,
                 f"{disk.capacity} bytes ({disk.capacity / (1 << 20):.1f} MiB)",
                 *([disk.flavor] if disk.flavor else [])]
        print(f"  disk:      {disk.spec.label} {disk.spec.source}{' (boot)' if disk.spec is spec.boot_disk() else ''}, "
              f"{', '.join(about)}{f' -> {disk.key}' if disk.key else ''}: {disk.verdict}")
        if disk.error is not None:
            print(f"    refused: {disk.error}")
        for kind, text in disk.messages:
            print(f"    {kind + ':':<9}{text}")
    for index, nic in enumerate(spec.nics):
        network = f"network {nic.network!r}" if nic.network is not None else "no network"
        print(f"  nic:       net{index} {nic.model}, MAC {nic.mac or '(none)'}, {network}")
    for cdrom in spec.cdroms:
        print(f"  cdrom:     {cdrom.controller}{cdrom.bus}:{cdrom.unit}" + (f", {cdrom.image}" if cdrom.image else ""))
    if spec.tpm:
        print("  tpm:       vTPM")
    for device in spec.passthrough:
        print(f"  passthru:  {device}")
    for thing in spec.unmapped:
        print(f"  unmapped:  {thing}")
    for text in report.warnings:
        print(f"  warning:   {text}")
    print(f"  config:    VMID {report.vmid} (volumes on <storage> once migrated)")
    for key, value in report.config.items():
        print(f"    {key}: {value}")
    for finding in report.findings:
        print(f"  rule:      {finding}" + (" (ignored)" if finding.ignored else ""))
    print(f"  verdict:   {report.verdict}" + (f": {report.error}" if report.error else ""))


def _print_image(image: DiskImage) -> None:
    print(f"{image.path}")
    print(f"  flavor:    {image.flavor}" + (f" (createType {image.create_type})"
                                            if image.create_type and image.create_type != image.flavor
                                            else ""))
    print(f"  capacity:  {image.capacity} bytes ({image.capacity / (1 << 20):.1f} MiB), "
          f"{image.allocated} allocated")
    if image.adapter_type:
        print(f"  adapter:   {image.adapter_type}")
    if image.header:
        head = image.header
        print(f"  header:    KDMV version {head['version']}, flags {head['flags']:#x}, "
              f"grain {head['grain_sectors']} sectors, compression {head['compress_algorithm']}")
    if image.magic:
        print(f"  libmagic:  {image.magic}")
    for depth, link in enumerate(image.chain):
        if depth:
            print(f"  parent:    {link.path.name} ({link.flavor}, CID {link.cid})")
        for extent in link.extents:
            where = f" {extent.path.name}" if extent.path else ""
            offset = f" @ sector {extent.offset}" if extent.offset else ""
            print(f"  {'extent:' if not depth else '  extent:':<10} {extent.kind.value} "
                  f"{extent.sectors} sectors{where}{offset}")
    if image.boot_signature:
        boots = {"bios": "boots by BIOS", "efi": "boots only by UEFI", "both": "boots by BIOS and UEFI",
                 "none": "no firmware can boot it"}.get(image.boot_firmware or "")
        print(f"  boot:      {image.boot_signature}" + (f", {boots} ({image.boot_detail})" if boots else ""))
    for kind, text in image.messages:
        print(f"  {kind + ':':<10} {text}")
    print(f"  verdict:   {image.verdict}")


class _JsonLines:
    """``--progress=json``: every event as one JSON object a line on stdout (``dataclasses.asdict``, and the
    VM's name for a plan's), then the result as the last line (``{"kind": "result", ...}``)."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def __call__(self, event: Event, **more: Any) -> None:
        self.send({**more, **dataclasses.asdict(event)})

    def send(self, message: dict[str, Any]) -> None:
        print(json.dumps(message, default=str), file=self.out, flush=True)


def _handlers(handlers: list[Callable[[Event], None]]) -> Callable[[Event], None]:
    """One event handler calling each of ``handlers`` in turn (those added later too)."""
    def each(event: Event) -> None:
        for handler in handlers:
            handler(event)
    return each


def _said_log(log: RunLog | None, out: TextIO | None = None) -> None:
    """Where the run's log is, if it kept one: on ``out``, else on stderr."""
    if log is not None and log.path is not None:
        line = f"v2p: the log of this run: {shown_path(str(log.path))}"
        if out is None:
            say(line)
        else:
            print(line, file=out)


def _migrate(args: argparse.Namespace, target: api.Target) -> int:
    # With --json or --progress=json, stdout holds JSON alone: the lines a person reads go to stderr.
    machine = args.progress == "json"
    out = sys.stderr if args.json or machine else sys.stdout
    printer = EventPrinter(out, live=None if args.progress == "auto" else False)
    handlers: list[Callable[[Event], None]] = [printer]
    events = _JsonLines() if machine else None
    if events is not None:
        handlers.append(events)
    migration = api.Migration(args.source, args.vmid, target=target, on_event=_handlers(handlers), **given(args))
    args.json = args.json or (machine and args.dry_run)  # a dry run streams nothing: its JSON, as --json's
    if args.dry_run:  # the real run's checks, nothing made; refused as the real run would be
        preview = migration.preview()
        print(json.dumps(preview.to_dict(), indent=2) if args.json else preview.text())
        return 0
    log = RunLog(target.state_dir(), str(migration.vmid))
    handlers.append(logged(log, say))
    try:
        with log:
            result = migration.run()
    except BaseException as exc:
        printer.close_bar()
        if events is not None:
            events.send(_failed(migration.vmid, exc, log))
        if log.path is not None and isinstance(exc, V2PError):
            exc.add_note(f"the log of this run: {shown_path(str(log.path))}")  # under the error line
        elif not isinstance(exc, KeyboardInterrupt):  # stopped: one line, the rerun resumes (and logs on)
            _said_log(log)
        raise
    printer.close_bar()
    boot = boot_words(result["boot"], result["boot_signal"])
    _said_log(log, out)  # on stdout (unless it holds JSON), before the result: stderr stays for trouble
    if not result.get("nothing_to_do"):  # else the pipeline's event already said so
        print(f"VM {migration.vmid} migrated from {args.source}; {boot}", file=out)
        _print_guest_ips(result, out)
    elif result["boot"] != BOOT_UP:  # what the recorded check saw still holds
        print(f"VM {migration.vmid}: {boot}", file=out)
    code = boot_exit_code(result["boot"])
    if events is not None:
        events.send({"kind": "result", "vmid": migration.vmid, "ok": code == 0, "exit_code": code, "error": None,
                     "log": log.path and str(log.path), "result": result})
    elif args.json:  # the record, as v2p status --json shows it
        print(json.dumps(result, indent=2))
    return code


def _failed(vmid: int, exc: BaseException, log: RunLog) -> dict[str, Any]:
    """``--progress=json``'s last line for a run that ended in ``exc``."""
    if isinstance(exc, V2PError):
        code, error = exc.exit_code, str(exc)
    elif isinstance(exc, KeyboardInterrupt):
        code, error = interrupts.exit_status(), "interrupted; rerun the same command to resume"
    else:
        code, error = 1, f"{type(exc).__name__}: {exc}"
    return {"kind": "result", "vmid": vmid, "ok": False, "exit_code": code, "error": error,
            "log": log.path and str(log.path), "result": None}


def _print_guest_ips(result: dict[str, Any], out: TextIO) -> None:
    """The guest's addresses on its old NICs (the inspect stage's record), for an admin restoring a static one."""
    found = ((result.get("stages") or {}).get("inspect") or {}).get("result", {}).get("guest_ips") or {}
    if found:
        print("the guest's addresses before the migration (a static one must be set again on the new NIC):",
              file=out)
    for net, nic in found.items():
        print(f"  {net} ({nic.get('mac') or 'no MAC'}): was {', '.join(nic.get('ips') or ())}", file=out)


def _status(args: argparse.Namespace, target: api.Target) -> int:
    states = api.status(target, args.vmid)
    damaged = [state for state in states if state.error is not None]
    for volid, left in api.leftovers(target).items():
        print(f"left on the target: {volid} (VMID {left['vmid']}): deleting it failed since {left['since']}: "
              f"{left['error']}; retried by every run and v2p status", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps([{"vmid": s.vmid, "error": str(s.error)} if s.error else api.with_boot(s.data)
                          for s in states], indent=2))
        return 5 if damaged else 0
    if not states:
        if args.vmid is not None:  # asked for one that is not there: an error, on stderr
            say(f"v2p: error: no migration recorded for VMID {args.vmid}")
            return 1
        print("no migration recorded for any VM")
        return 0
    for state in states:
        if state.error is not None:
            print(f"VMID {state.vmid}: unreadable record: {state.error}")
            continue
        data = state.data
        failed = data.get("failed")
        boot, signal = boot_outcome(data["stages"].get("boot", {}).get("result"))
        rerun = _resume_command(args, target, data["request"], state.vmid)
        if data["finished"]:
            verdict = f"finished; {boot_words(boot, signal)}"
        elif failed and boot == BOOT_FAILED:
            verdict = f"{boot_words(boot, signal)} (to check the boot again: {rerun})"
        elif failed:
            verdict = f"stopped in {stopped_in(data, failed.get('stage'))}: {failed.get('error')} (to resume: {rerun})"
        else:
            verdict = f"unfinished{f' in {stopped_in(data)}' if data.get('progress') else ''} (to resume: {rerun})"
        print(f"VMID {state.vmid}: {data['request']['source']} — {verdict}")
        stages = data["stages"]
        for name in (stage.name for stage in STAGES):
            record = stages.get(name)
            when = f"done {record['finished_at']} ({record['seconds']:.2f}s)" if record else "pending"
            if name == "boot" and record and boot != BOOT_SKIPPED:
                when = f"{'failed' if boot == BOOT_FAILED else 'done'} {record['finished_at']} " \
                       f"({record['seconds']:.2f}s): {boot_words(boot, signal)}"
            print(f"  {name:<10} {when}")
    return 5 if damaged else 0


def _resume_command(args: argparse.Namespace, target: api.Target, request: dict[str, Any], vmid: int) -> str:
    """The ``v2p migrate`` line that resumes a recorded migration: its source and VMID, the target
    as this command was given it, and every option the record holds that a resume must repeat
    (``MigrationOptions.identity``), spelled as ``migrate``'s flags."""
    words = ["v2p"]
    if target.kind != "local":
        words += ["--target", args.target]
    elif args.target_dir is not None:
        words += ["--target-dir", str(args.target_dir)]
    words += ["migrate", str(request.get("source")), "--vmid", str(vmid)]
    recorded = request.get("options")
    recorded = recorded if isinstance(recorded, dict) else {}
    for option in OPTIONS:
        value = recorded.get(option.keyword, option.default)
        if not option.flag or option.volatile or value == option.default or \
                (option.keyword == "storage" and value == target.default_storage()):
            continue
        if option.kind == "bool":
            words += [option.flag if value else f"--no-{option.flag[2:]}"]
        elif option.kind == "bridges" and isinstance(value, dict):
            words += [word for name, bridge in value.items() for word in (option.flag, f"{name}={bridge}")]
        elif option.kind == "rules" and isinstance(value, list):
            words += [word for rule in value for word in (option.flag, str(rule))]
        elif value is not None:
            words += [option.flag, str(value)]
    return shlex.join(words)


def _how_to_reach(target: api.LocalTarget, vmid: int) -> None:
    """What a local VM offers once started (qemu_cmdline.build): its serial port logged to a file, no
    display, and each NIC on QEMU's user-mode network, whatever bridge its config names."""
    log = target.serial_log(vmid)
    print(f"  serial console: written to {log} (follow it: tail -f {shlex.quote(str(log))}); no display "
          "(QEMU runs with -display none: no VNC)")
    config = target.get_config(vmid)
    for key in sorted(key for key in config if key.startswith("net") and key[3:].isdigit()):
        bridge = dict(part.partition("=")[::2] for part in config[key].split(",")[1:]).get("bridge")
        named = f"its config's bridge {bridge}" if bridge else "no bridge"
        print(f"  {key}: not connected to {named}: the local target gives each NIC QEMU's user-mode network "
              "(outbound NAT through this host; nothing reaches the guest)")


def _confirmed_name(args: argparse.Namespace, target: api.Target) -> str | None:
    """``vm rm --force``: the VM's name as the user typed it back (``--confirm-name``, or asked for on
    a terminal); the library removes a VM it did not make only when that is its name."""
    if not args.force:
        if args.confirm_name is not None:
            raise OptionError("--confirm-name goes with --force", hint=f"v2p vm rm {args.vmid} --force "
                              "--confirm-name NAME")
        return None
    if args.confirm_name is not None:
        return str(args.confirm_name)
    if not sys.stdin.isatty():
        raise OptionError(f"vm rm {args.vmid} --force: the VM's name must be typed back",
                          hint=f"add --confirm-name NAME (see: v2p vm show {args.vmid})")
    if not target.vm_exists(args.vmid):
        return None
    name = target.get_config(args.vmid).get("name") or str(args.vmid)
    try:
        return input(f"VM {args.vmid} is called {name!r}; type its name to remove it: ")
    except EOFError:
        return ""


def _vm(args: argparse.Namespace, target: api.Target) -> int:
    command = args.vm_command
    if command == "list":
        rows = [{"vmid": vmid, "status": target.status(vmid), "name": target.get_config(vmid).get("name", "")}
                for vmid in target.list_vms()]
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'VMID':>6}  {'STATUS':<8} NAME" if rows else "no VMs")
        for row in rows:
            print(f"{row['vmid']:>6}  {row['status']:<8} {row['name']}")
        return 0
    vmid = args.vmid
    if command == "show":
        config = dict(sorted(target.get_config(vmid).items()))
        if args.json:
            print(json.dumps(config, indent=2))
        else:
            for key, value in config.items():
                print(f"{key}: {value}")
    elif command == "start":
        target.start(vmid)
        print(f"VM {vmid} started")
        if isinstance(target, api.LocalTarget):
            _how_to_reach(target, vmid)
    elif command == "stop":
        target.stop(vmid, timeout=args.timeout)
        print(f"VM {vmid} stopped")
    elif command == "rm":
        api.remove(vmid, target, confirm_name=_confirmed_name(args, target))
        print(f"VM {vmid} removed")
    for text in target.task_warnings():  # the target's tasks succeeded, with these warnings
        print(f"warning: {text}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
