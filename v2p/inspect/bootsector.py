"""What a disk's first sectors say about the firmware that can boot it.

``layout(head)`` reads the MBR (sector 0) and, on a GPT disk, the GPT header
(sector 1) and its partition entries from ``head``, the disk's first bytes
(``SECTORS_READ`` sectors hold the usual table; ``entries_end`` says how far
an unusual one reaches). Pure: it parses bytes, it reads nothing; inspection
(``inspect/__init__.py``) hands it the sectors it read. Not for: choosing the
VM's firmware (the loose disk source does, and ``rules.py`` explains it).

A disk boots by BIOS when its MBR holds boot code that has something to
start: on a plain MBR disk any code (it is the BIOS way); on a GPT disk a
BIOS boot partition (where GRUB's core.img lives), a partition with the
"legacy BIOS bootable" attribute (syslinux's gptmbr.bin boots that one), an
active or non-protective entry in the MBR (a hybrid MBR, which classic MBR
code boots), or GRUB's own boot.img (which loads core.img from sectors it
was given). A Windows GPT disk carries Windows' MBR code in its protective
MBR ("The GPT Protective MBR and Partition Table", D. B. Sedory: the same
code as an MBR disk of Windows 7/8), which only boots an active MBR
partition and finds none: that code alone does not make a disk BIOS-bootable.
A disk boots by UEFI when it has an EFI system partition (GPT type
C12A7328-..., or MBR OS type 0xEF: UEFI 2.10, 5.2 and 5.3.3).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

SECTOR = 512
SECTORS_READ = 34  # the MBR, the GPT header and 128 entries of 128 bytes: every usual GPT
MAX_ENTRIES_BYTES = 1 << 20  # a GPT whose entries reach further is not read (no real one does)
ESP_TYPE = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
BIOS_BOOT_TYPE = uuid.UUID("21686148-6449-6E6F-744E-656564454649")  # "Hah!IdontNeedEFI"
LEGACY_BIOS_BOOTABLE = 1 << 2  # GPT partition attribute bit 2, "Legacy BIOS Bootable" (UEFI 2.10, 5.3.3)
MBR_ESP, MBR_PROTECTIVE, MBR_ACTIVE = 0xEF, 0xEE, 0x80
_CODE = slice(0, 440)  # the MBR's boot code (then the disk signature and the partition table)
# GRUB's boot.img (grub-core/boot/i386/pc/boot.S, notification_string: .asciz "GRUB ").
_GRUB_BOOT_IMG = b"GRUB \0"


@dataclass(frozen=True)
class BootLayout:
    """How a disk can boot: ``table`` (mbr, gpt, none), whether BIOS and UEFI can, and why."""

    table: str
    bios: bool
    efi: bool
    detail: str  # a few words on what was found: "GPT, an EFI system partition, no BIOS boot code"

    @property
    def firmware(self) -> str:
        """``bios``, ``efi`` (UEFI only), ``both`` or ``none``: which firmware can boot the disk."""
        if self.bios and self.efi:
            return "both"
        return "bios" if self.bios else "efi" if self.efi else "none"


def entries_end(head: bytes) -> int:
    """How many bytes from the disk's start ``layout`` needs: more than ``SECTORS_READ`` sectors
    only for a GPT whose entries lie further (and at most ``MAX_ENTRIES_BYTES`` past them)."""
    header = _gpt_header(head)
    if header is None:
        return SECTORS_READ * SECTOR
    first_lba, count, size = header
    end = first_lba * SECTOR + count * size
    return max(SECTORS_READ * SECTOR, end) if count * size <= MAX_ENTRIES_BYTES else SECTORS_READ * SECTOR


def layout(head: bytes) -> BootLayout:
    """The boot layout of a disk whose first bytes are ``head`` (at least its first sector)."""
    if len(head) < SECTOR or head[510:512] != b"\x55\xaa":
        return BootLayout("none", False, False, "no boot signature in the first sector")
    code = any(head[_CODE])
    mbr = [(head[446 + 16 * i], head[446 + 16 * i + 4]) for i in range(4)]
    if head[SECTOR:SECTOR + 8] != b"EFI PART":
        esp = any(kind == MBR_ESP for _status, kind in mbr)
        words = ["MBR", "boot code" if code else "no boot code"] + (["an EFI system partition"] if esp else [])
        return BootLayout("mbr", code, esp, ", ".join(words))
    parts = _gpt_entries(head)
    esp = any(kind == ESP_TYPE for kind, _attrs in parts)
    bios_boot = any(kind == BIOS_BOOT_TYPE for kind, _attrs in parts)
    legacy = any(attrs & LEGACY_BIOS_BOOTABLE for _kind, attrs in parts)
    hybrid = any(status == MBR_ACTIVE or kind not in (0, MBR_PROTECTIVE) for status, kind in mbr)
    grub = _GRUB_BOOT_IMG in head[_CODE]
    reasons = [why for found, why in ((bios_boot, "a BIOS boot partition"),
                                      (legacy, "a legacy-BIOS-bootable partition"),
                                      (hybrid, "a hybrid MBR"), (grub, "GRUB's boot.img")) if found]
    bios = code and bool(reasons)
    words = ["GPT", "an EFI system partition" if esp else "no EFI system partition"]
    if not code:
        words.append("no BIOS boot code")
    elif bios:
        words.append("BIOS boot code and " + " and ".join(reasons))
    else:
        words.append("MBR boot code with nothing to boot (no BIOS boot partition, no legacy-BIOS-bootable "
                     "or active partition)")
    return BootLayout("gpt", bios, esp, ", ".join(words))


def _gpt_header(head: bytes) -> tuple[int, int, int] | None:
    """(first LBA of the entries, their count, an entry's size) of the primary GPT header, or None."""
    header = head[SECTOR:2 * SECTOR]
    if len(header) < 92 or header[:8] != b"EFI PART":
        return None
    first_lba, count, size = struct.unpack_from("<QII", header, 72)
    if size < 128 or size % 8 or count == 0 or first_lba < 2:
        return None
    return first_lba, count, size


def _gpt_entries(head: bytes) -> list[tuple[uuid.UUID, int]]:
    """(type, attributes) of each used GPT entry within ``head`` (entries beyond it are not seen)."""
    header = _gpt_header(head)
    if header is None:
        return []
    first_lba, count, size = header
    out = []
    for index in range(count):
        start = first_lba * SECTOR + index * size
        entry = head[start:start + 128]
        if len(entry) < 128:
            break
        kind = uuid.UUID(bytes_le=entry[:16])
        if kind.int:
            out.append((kind, struct.unpack_from("<Q", entry, 48)[0]))
    return out
