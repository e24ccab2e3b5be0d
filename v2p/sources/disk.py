"""A loose disk: one ``.vmdk`` (any flavor) or another image file, without a VM around it.

The hardware is not in the file: the spec has one disk on the controller the
descriptor's ``ddb.adapterType`` names (else SCSI) and nothing else; the
user's options (``--os``, ``--cores``, ``--memory``, ``--bios``) fill in the
rest. The firmware is the one the disk can boot with: UEFI for a disk only
UEFI can boot (``inspect/bootsector.py``), else BIOS, as before.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..convert import source_fingerprint
from ..inspect import DiskImage, inspect_disk
from ..inspect.qemu_input import qemu_source
from ..spec import DiskSpec, NicSpec, VMSpec, dns_name
from .base import DiskInput, LocalSource

# ddb.adapterType -> (controller, VMware's controller model)
_ADAPTERS = {"ide": ("ide", None), "buslogic": ("scsi", "buslogic"), "lsilogic": ("scsi", "lsilogic"),
             "legacyesx": ("scsi", "buslogic"), "lsisas1068": ("scsi", "lsisas1068"),
             "pvscsi": ("scsi", "pvscsi")}


class DiskSource(LocalSource):
    """One disk file; hardware from the user's options."""

    kind = "disk"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(os.path.abspath(path))
        self._image: DiskImage | None = None

    def describe(self) -> str:
        return str(self.path)

    def image(self) -> DiskImage:
        if self._image is None:
            self._image = inspect_disk(self.path)
        return self._image

    def spec(self) -> VMSpec:
        image = self.image()
        controller, model = _ADAPTERS.get((image.adapter_type or "").lower(), ("scsi", None))
        stem = self.path.name.removesuffix(".vmdk").removesuffix("-flat")
        disk = DiskSpec(controller=controller, bus=0, unit=0, source=self.path.name, capacity=image.capacity,
                        controller_model=model, boot=True)
        # A VM without a NIC is rarely what anyone wants: one, its model and MAC from the mapping.
        # A disk BIOS can boot too (a hybrid GPT, an MBR) stays on SeaBIOS: PVE's default, and the
        # firmware such a disk most likely had. The rules say so when the disk chose UEFI.
        firmware = "efi" if image.boot_firmware == "efi" else "bios"
        return VMSpec(name=dns_name(stem), disks=[disk], nics=[NicSpec(model="e1000")], firmware=firmware,
                      firmware_from="disk")

    def disk_input(self, disk: DiskSpec, workdir: Path) -> DiskInput:
        image = self.image()
        return DiskInput(image.capacity, str(image.flavor), image, tuple(image.messages),
                         endpoint=qemu_source(image, workdir))

    def fingerprint(self) -> list[dict[str, Any]]:
        return source_fingerprint(self.image())
