"""The public library surface: everything the CLI can do, as functions.

    from v2p import migrate
    result = migrate("win7.vmdk", 102, ostype="win7", on_event=print)
    result = migrate("web01.vmx", "auto", target="pve://root@pam!v2p@pve1/pve1")  # the next free VMID

Progress arrives as ``Event``s through ``on_event`` (or ``Migration.events()``); errors are
``V2PError``s, each with a ``message`` and, apart, a ``hint`` for people. Nothing here prints
or exits; external commands are logged on the ``v2p.runner`` logger at DEBUG.

Its parts live by job: ``migration`` (one migration), ``vmreport`` (inspecting without a target),
``vmops`` (dance, remove, status, left-overs); the target factory is ``targets.factory``.
"""

from __future__ import annotations

from .inspect import Row, inspect_paths
from .migration import (
    AUTO,
    AUTO_TRIES,
    Migration,
    MigrationStatus,
    TargetSpec,
    as_target,
    check_source,
    earlier_migration,
    migrate,
    with_boot,
)
from .preview import Preview, PreviewDisk, PreviewStage
from .targets.base import Target
from .targets.factory import make_target
from .targets.kind_local import local_target
from .targets.local import LocalTarget
from .vmops import dance, leftovers, remove, status
from .vmreport import VMDisk, VMReport, inspect, inspect_all, inspect_vm, vm_source

__all__ = ["AUTO", "AUTO_TRIES", "LocalTarget", "Migration", "MigrationStatus", "Preview", "PreviewDisk",
           "PreviewStage", "Row", "Target", "TargetSpec",
           "VMDisk", "VMReport", "as_target", "check_source", "dance", "earlier_migration", "inspect", "inspect_all",
           "inspect_paths", "inspect_vm", "leftovers", "local_target", "make_target", "migrate", "remove", "status",
           "vm_source", "with_boot"]
