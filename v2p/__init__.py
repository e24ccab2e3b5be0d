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

import sys
import types
from typing import TYPE_CHECKING, Any

from .errors import (
    BootCheckError,
    Cancelled,
    DanceError,
    DriversError,
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

if TYPE_CHECKING:
    from .api import (
        Migration,
        MigrationStatus,
        dance,
        inspect,
        inspect_vm,
        local_target,
        make_target,
        migrate,
        remove,
        status,
    )
    from .events import Event
    from .inspect import DiskImage, Flavor
    from .options import MigrationOptions, OptionError
    from .plan import Plan, PlanError

# The rest is imported when first used: ``v2p`` (the command) imports this package before it can
# install its signal handlers, and the whole library takes most of a second to import under load;
# a Ctrl-C in that time must still end in one line (see __main__).
_LAZY = {
    **dict.fromkeys(("Migration", "MigrationStatus", "dance", "inspect", "inspect_vm", "local_target",
                     "make_target", "migrate", "remove", "status"), "api"),
    "Event": "events",
    **dict.fromkeys(("DiskImage", "Flavor"), "inspect"),
    **dict.fromkeys(("MigrationOptions", "OptionError"), "options"),
    **dict.fromkeys(("Plan", "PlanError"), "plan"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """``v2p.inspect`` is the function (as it was when this package imported everything at once), not
    the subpackage of that name, which binds itself here when something first imports it."""

    @property
    def inspect(self) -> Any:
        from .api import inspect

        return inspect

    @inspect.setter
    def inspect(self, value: Any) -> None:
        pass  # the subpackage, bound by the import system: reached through sys.modules, as before


sys.modules[__name__].__class__ = _Package


__all__ = [
           "BootCheckError",
           "Cancelled",
           "DanceError",
           "DiskImage",
           "DriversError",
           "Event",
           "Flavor",
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
           "local_target",
           "make_target",
           "migrate",
           "remove",
           "status",
]
__version__ = "0.1.0"
