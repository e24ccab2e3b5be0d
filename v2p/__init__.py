"""v2p: move VMware virtual machines onto KVM (Proxmox VE, plain QEMU).

    from v2p import migrate
    migrate("win7.vmdk", 102, ostype="win7")

    from v2p import Migration
    migration = Migration("web01.vmx", "auto", target="pve://root@pam!v2p@pve1/pve1")
    for event in migration.events():   # or on_event=..., and migration.run()
        ...                            # migration.status, migration.cancel() from any thread

The library never prints and never exits: errors are ``V2PError`` subclasses
(``message`` and ``hint`` apart), progress comes as ``Event``s, and external
commands are logged on the ``v2p.*`` loggers at DEBUG.
"""

from .api import (
    Migration,
    MigrationStatus,
    dance,
    inspect,
    inspect_vm,
    leftovers,
    local_target,
    make_target,
    migrate,
    remove,
    status,
)
from .errors import (
    BootCheckError,
    Cancelled,
    DanceError,
    DriversError,
    ForeignVMError,
    LockedError,
    NoSpaceError,
    NoSuchVMError,
    OperatorNeeded,
    RuleError,
    SourceError,
    StateError,
    TargetError,
    ToolError,
    V2PError,
    VerifyError,
    VMIDExistsError,
)
from .events import Event
from .inspect import DiskImage, Flavor
from .options import MigrationOptions, OptionError
from .plan import Plan, PlanError

__all__ = [
           "BootCheckError",
           "Cancelled",
           "DanceError",
           "DiskImage",
           "DriversError",
           "Event",
           "Flavor",
           "ForeignVMError",
           "LockedError",
           "Migration",
           "MigrationOptions",
           "MigrationStatus",
           "NoSpaceError",
           "NoSuchVMError",
           "OperatorNeeded",
           "OptionError",
           "Plan",
           "PlanError",
           "RuleError",
           "SourceError",
           "StateError",
           "TargetError",
           "ToolError",
           "V2PError",
           "VMIDExistsError",
           "VerifyError",
           "dance",
           "inspect",
           "inspect_vm",
           "leftovers",
           "local_target",
           "make_target",
           "migrate",
           "remove",
           "status",
]
__version__ = "0.1.0"
