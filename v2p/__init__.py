"""v2p: move VMware virtual machines onto KVM (Proxmox VE, plain QEMU).

    from v2p import migrate
    migrate("win7.vmdk", 102, ostype="win7")
"""

from .api import Migration, inspect, local_target, migrate, status
from .errors import V2PError
from .events import Event
from .inspect import DiskImage, Flavor
from .plan import Plan, PlanError

__all__ = [
           "DiskImage",
           "Event",
           "Flavor",
           "Migration",
           "Plan",
           "PlanError",
           "V2PError",
           "inspect",
           "local_target",
           "migrate",
           "status",
]
__version__ = "0.1.0"
