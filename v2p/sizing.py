"""How much room a VM's disks need, summed from what each disk's sink says (``DiskSink.check``).

One sum for the two places that ask: the preflight stage (which refuses a VM whose disks do not fit
together) and ``plan run`` (which holds a VM back until its storage has room, less what the VMs
running there reserved). Not for: measuring a disk (the sinks do, with ``qemu-img measure``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SpaceNeed:
    """The disks' room so far: on their own storage, and on every storage any of them keeps room on
    until the migration ends (``also``: a PVE upload in its import storage)."""

    storage: str = ""  # the disks' storage, as the last sink described it
    required: int = 0  # bytes every disk needs there
    free: int | None = None  # bytes free there, as the last sink saw them
    held: dict[str, list[int]] = field(default_factory=dict)  # storage -> [bytes needed, bytes free]

    def add(self, room: dict[str, Any]) -> None:
        """Count one disk: ``room`` is its sink's ``check()`` answer."""
        self.storage, self.free = str(room["storage"]), int(room["free_bytes"])
        self.required += int(room["required_bytes"])
        for place in (room, *room.get("also", ())):
            self.held.setdefault(place["storage"], [0, int(place["free_bytes"])])[0] += int(place["required_bytes"])

    def short(self) -> tuple[str, int, int] | None:
        """The first storage the disks do not fit on together (each fits alone: its sink said so), as
        (storage, bytes needed, bytes free); None when they all fit."""
        for storage, (needed, free) in self.held.items():
            if needed > free:
                return storage, needed, free
        return None
