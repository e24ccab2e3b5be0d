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

if TYPE_CHECKING:
    from .api import (
        Migration,
        MigrationStatus,
        Preview,
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
    from .events import Event
    from .inspect import DiskImage, Flavor
    from .options import MigrationOptions, OptionError
    from .plan import Plan, PlanError

# The rest is imported when first used: ``v2p`` (the command) imports this package before it can
# install its signal handlers, and the whole library takes most of a second to import under load;
# a Ctrl-C in that time must still end in one line (see __main__).
_LAZY = {
    **dict.fromkeys(("Migration", "MigrationStatus", "Preview", "dance", "inspect", "inspect_vm", "leftovers",
                     "local_target", "make_target", "migrate", "remove", "status"), "api"),
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


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def _api_function(name: str) -> property:
    def get(_package: types.ModuleType) -> Any:
        return __getattr__(name)

    def keep(_package: types.ModuleType, _value: Any) -> None:
        pass  # the submodule, bound here by the import system: reached through sys.modules, as before

    return property(get, keep)


class _Package(types.ModuleType):
    """``v2p.inspect`` and ``v2p.dance`` are the functions (as they were when this package imported
    everything at once), not the submodules of those names, which bind themselves here when something
    first imports them."""

    inspect = _api_function("inspect")
    dance = _api_function("dance")


sys.modules[__name__].__class__ = _Package


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
           "Preview",
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
