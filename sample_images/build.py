#!/usr/bin/env python3
"""Build the v2p sample guest disk and one VMDK per VMware disk flavor.

Usage:
    python3 sample_images/build.py OUTDIR [--size-mib 32] [--force] [--quiet]

Produces (all paths relative to OUTDIR):

    guest.bin                      assembled boot program (guest.asm)
    guest.raw                      the reference raw disk (sparse file)
    monolithicSparse/monolithicSparse.vmdk
    monolithicFlat/monolithicFlat.vmdk + monolithicFlat-flat.vmdk
    twoGbMaxExtentSparse/twoGbMaxExtentSparse.vmdk + ...-s001.vmdk
    twoGbMaxExtentFlat/twoGbMaxExtentFlat.vmdk + ...-f001.vmdk
    streamOptimized/streamOptimized.vmdk
    esxi/esxi.vmdk + esxi-flat.vmdk   (hand-written ESXi "vmfs" descriptor)
    winguest.bin, winguest.raw     Windows stand-in (nasm -DWINDOWS_STANDIN)
    winguest/winguest.vmdk         its monolithicSparse VMDK
    winguest-nodriver.bin, winguest-nodriver.raw   (nasm -DSTANDIN_NO_DRIVER)
    winguest-nodriver/winguest-nodriver.vmdk
    efi/efi.raw, efi/efi.vmdk      UEFI guest (efi_guest.asm as \\EFI\\BOOT\\BOOTX64.EFI
                                   on a FAT16 ESP in a GPT disk; monolithicSparse VMDK)
    dead/zeros.raw, dead/halt.raw, dead/resetloop.raw, dead/grubrescue.raw, dead/panic.raw
                                   dead cases (dead.asm; manifest["dead"])
    manifest.json                  what was built (written last)

The stand-ins are in manifest["standins"], NOT in manifest["flavors"]; their
serial lines are in manifest["standin_serial"] (see standin.inc).  The UEFI
guest is manifest["efi"] (its line: manifest["efi"]["expected_serial"]).

Python 3.11 standard library only; `nasm` and `qemu-img` are run through
subprocess with argv lists (the GPT and the FAT of the EFI disk are written
here, byte by byte, so no mtools/sgdisk and no mount).  The build is skipped
when manifest.json is newer than guest.asm, standin.inc, efi_guest.asm,
dead.asm and this file, was made for the same --size-mib and all listed files still exist
(--force rebuilds).  Can also be imported: build(outdir, ...) returns the
manifest dict.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import uuid
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ASM_SOURCE = HERE / "guest.asm"
ASM_INCLUDES = (HERE / "standin.inc",)  # %include'd by guest.asm
EFI_ASM_SOURCE = HERE / "efi_guest.asm"
DEAD_ASM_SOURCE = HERE / "dead.asm"
THIS_FILE = Path(__file__).resolve()

SECTOR = 512
MIB = 1024 * 1024
DEFAULT_SIZE_MIB = 32
MIN_SIZE_MIB = 12
MAX_SIZE_MIB = 64
MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1

# qemu-img vmdk subformats; the folder, file stem and createType all share the name.
QEMU_FLAVORS = (
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
)
ESXI_NAME = "esxi"
ESXI_HW_VERSION = 14

# Windows stand-ins (standin.inc): name -> NASM define.  Each gets NAME.bin,
# NAME.raw and NAME/NAME.vmdk (monolithicSparse).
STANDINS = {
    "winguest": "WINDOWS_STANDIN",
    "winguest-nodriver": "STANDIN_NO_DRIVER",
}
STANDIN_VMDK_FLAVOR = "monolithicSparse"
STANDIN_FLAG_LBA = 2048  # driver flag sector, passed to nasm as well
FLAG_MAGIC = "V2P-DRIVERS "

# UEFI guest disk: GPT, one ESP (FAT16, one sector per cluster) at 1 MiB.  The guest
# reads 10 MiB of its ESP as its "kernel" (efi_guest.asm), so the ESP is 12 MiB.
EFI_NAME = "efi"
EFI_DISK_MIB = 16
EFI_ESP_FIRST_LBA = 2048
EFI_ESP_SECTORS = 24576  # 12 MiB: 24351 clusters, inside FAT16's 4085..65524
EFI_KERNEL_BYTES = 10 * MIB  # KERNEL_BYTES in efi_guest.asm
KERNEL_BYTES = 10 * MIB  # KERNEL_BYTES in guest.asm: what the BIOS guest reads of its disk
SHUTDOWN_WAIT_S = 2  # both guests wait this long (about) between their line and the power-off

# Dead cases (dead.asm, OUTDIR/dead/NAME.raw): name -> (NASM define or None for no boot
# code, what a boot check should conclude, one-line description).
DEAD_DIR = "dead"
DEAD_MIB = 2
DEAD_CASES: dict[str, tuple[str | None, str, str]] = {
    "zeros": (None, "failed",
              "no boot code at all: SeaBIOS prints 'No bootable device.' (firmware log, "
              "isa-debugcon 0x402) and idles (QEMU's default reboot-timeout: no retry)"),
    "halt": ("DEAD_HALT", "unconfirmed",
             "boot sector that halts (cli; hlt): a stuck boot loader; reads only the MBR, "
             "prints nothing, never resets"),
    "resetloop": ("DEAD_RESETLOOP", "failed",
                  "boot sector that triple-faults (lidt limit 0; int 3): the machine resets "
                  "and boots it again, forever (QMP RESET, reason guest-reset)"),
    "grubrescue": ("DEAD_GRUBRESCUE", "failed",
                   "GRUB 2 without its prefix partition: 'error: no such partition.', "
                   "'Entering rescue mode...', 'grub rescue> ' on COM1 and the screen (INT 10h), "
                   "then idles (sti; hlt)"),
    "panic": ("DEAD_PANIC", "failed",
              "Linux that cannot mount its root: 'Kernel panic - not syncing: VFS: Unable to "
              "mount root fs on unknown-block(0,0)' on COM1, PVPANIC_PANICKED to I/O port 0x505 "
              "(GUEST_PANICKED with -device pvpanic), halts"),
}
DEAD_SERIAL = {
    "grubrescue": ["error: no such partition.", "Entering rescue mode...", "grub rescue> "],
    "panic": ["Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"],
}
EFI_LINE = "v2p-efi-guest: up"
# Fixed GUIDs, serial and timestamps keep the image byte-for-byte reproducible.
EFI_DISK_GUID = "5632502d-4546-4900-8000-000000000001"
EFI_ESP_GUID = "5632502d-4546-4900-8000-000000000002"
ESP_TYPE_GUID = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
EFI_VOLUME_ID = 0x56325045


def flag_text(viostor: bool = False, netkvm: bool = False) -> str:
    """Content of the stand-in's driver flag sector (NUL padded to 512)."""
    return f"{FLAG_MAGIC}viostor={int(viostor)} netkvm={int(netkvm)}"


def parse_flag_sector(sector: bytes) -> dict[str, bool]:
    """{"viostor": bool, "netkvm": bool} as the stand-in reads the sector:
    anything without the magic means no driver installed."""
    text = sector[:30].decode("ascii", "replace")
    if not text.startswith(FLAG_MAGIC):
        return {"viostor": False, "netkvm": False}
    return {"viostor": text[20] == "1", "netkvm": text[29] == "1"}


def read_standin_flags(path: os.PathLike | str, flag_lba: int = STANDIN_FLAG_LBA) -> dict[str, bool]:
    """Driver flags of a RAW stand-in disk (convert other formats first)."""
    with open(path, "rb") as f:
        f.seek(flag_lba * SECTOR)
        return parse_flag_sector(f.read(SECTOR))


class BuildError(Exception):
    """A build step failed; the message is meant for humans."""


def log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"build.py: {msg}", flush=True)


def marker_for(size_mib: int) -> str:
    return f"V2P-LAST-SECTOR-{size_mib}MiB-OK"


def find_tools() -> dict[str, str]:
    tools = {}
    missing = []
    for name in ("nasm", "qemu-img"):
        path = shutil.which(name)
        if path is None:
            missing.append(name)
        else:
            tools[name] = path
    if missing:
        raise BuildError(
            "required tool(s) not found on PATH: "
            + ", ".join(missing)
            + " (on Debian: apt-get install nasm qemu-utils)"
        )
    return tools


def run(argv: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(
            f"command failed (exit {proc.returncode}): {' '.join(argv)}\n"
            f"{proc.stdout}{proc.stderr}".rstrip()
        )
    return proc


# ---------------------------------------------------------------------------
# raw image content


def pattern_sector(lba: int) -> bytes:
    """Deterministic, never-all-zero 512 bytes for one sector."""
    digest = hashlib.sha256(f"v2p-pattern-lba-{lba}".encode()).digest()
    head = f"V2P-DATA lba={lba} ".encode()
    body = (digest * (SECTOR // len(digest) + 1))[: SECTOR - len(head)]
    return head + body


def data_layout(size_mib: int) -> list[tuple[int, int]]:
    """(first LBA, sector count) of every non-zero data run except LBA 0
    (boot program) and the last sector (marker)."""
    size_sectors = size_mib * MIB // SECTOR
    runs = [
        (8 * MIB // SECTOR, MIB // SECTOR),  # 1 MiB pattern block at 8 MiB
        (MIB // SECTOR + 5, 1),  # scattered single sectors ...
        (3 * MIB // SECTOR - 1, 1),  # ... one ending exactly at 3 MiB
        (6 * MIB // SECTOR + 33, 1),
        ((size_mib - 2) * MIB // SECTOR + 17, 1),  # near the end
    ]
    for lba, count in runs:
        assert 0 < lba and lba + count <= size_sectors - 1, (lba, count)
    return runs


def write_raw(path: Path, boot: bytes, size_mib: int,
              extra: dict[int, bytes] | None = None) -> None:
    """extra: LBA -> one sector's content (stand-in flag sector)."""
    size = size_mib * MIB
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: untouched areas stay holes
        f.seek(0)
        f.write(boot)
        for lba, data in (extra or {}).items():
            f.seek(lba * SECTOR)
            f.write(data[:SECTOR].ljust(SECTOR, b"\0"))
        for lba, count in data_layout(size_mib):
            f.seek(lba * SECTOR)
            f.write(b"".join(pattern_sector(lba + i) for i in range(count)))
        marker = marker_for(size_mib).encode("ascii")
        f.seek(size - SECTOR)
        f.write(marker + b"\0" * (SECTOR - len(marker)))


def sparse_copy(src: Path, dst: Path, chunk: int = 64 * 1024) -> None:
    """Copy src to dst, leaving all-zero chunks as holes."""
    zero = bytes(chunk)
    size = src.stat().st_size
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while True:
            buf = fi.read(chunk)
            if not buf:
                break
            if buf == zero[: len(buf)]:
                fo.seek(len(buf), os.SEEK_CUR)
            else:
                fo.write(buf)
        fo.truncate(size)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# UEFI guest disk: GPT + FAT16 ESP, written without mounting anything

_FAT_DATE = ((2024 - 1980) << 9) | (1 << 5) | 1  # 2024-01-01, fixed for reproducibility


def _dirent(name: bytes, attr: int, cluster: int, size: int = 0) -> bytes:
    """One 32-byte FAT directory entry (8.3 name already padded to 11 bytes)."""
    assert len(name) == 11
    return struct.pack("<11sBBBHHHHHHHI", name, attr, 0, 0, 0, _FAT_DATE, _FAT_DATE,
                       0, 0, _FAT_DATE, cluster, size)


def fat16_esp(files: dict[str, bytes], sectors: int, hidden: int) -> bytes:
    """A FAT16 volume of ``sectors`` sectors holding ``files`` ("EFI/BOOT/BOOTX64.EFI" ->
    content; upper-case 8.3 names only), one sector per cluster, two FATs."""
    rsvd, nfats, root_entries = 1, 2, 512
    root_sectors = root_entries * 32 // SECTOR
    fat_sectors = 1
    while True:  # the FAT must cover every cluster the rest of the volume leaves
        clusters = sectors - rsvd - nfats * fat_sectors - root_sectors
        if (clusters + 2) * 2 <= fat_sectors * SECTOR:
            break
        fat_sectors += 1
    if not 4085 <= clusters < 65525:
        raise BuildError(f"ESP of {sectors} sectors is not a FAT16 size ({clusters} clusters)")
    data_start = rsvd + nfats * fat_sectors + root_sectors

    fat = [0xFFF8, 0xFFFF]
    clusters_data: dict[int, bytes] = {}

    def alloc(data: bytes) -> int:
        count = max(1, -(-len(data) // SECTOR))
        first = len(fat)
        for i in range(count):
            fat.append(first + i + 1 if i < count - 1 else 0xFFFF)
        clusters_data[first] = data
        return first

    def short(name: str) -> bytes:
        stem, _, ext = name.partition(".")
        if not (stem.isupper() or stem.isdigit()) or len(stem) > 8 or len(ext) > 3:
            raise BuildError(f"{name}: not an upper-case 8.3 name")
        return stem.ljust(8).encode("ascii") + ext.ljust(3).encode("ascii")

    # tree: {dir name: subtree | file bytes}
    tree: dict = {}
    for path, content in files.items():
        *dirs, leaf = path.split("/")
        node = tree
        for d in dirs:
            node = node.setdefault(d, {})
        node[leaf] = content

    def write_dir(node: dict, parent: int) -> bytes:
        """Entries of the directory ``node``; allocates clusters for what it holds."""
        entries = []
        for name, child in node.items():
            if isinstance(child, dict):
                first = len(fat)
                fat.append(0xFFFF)  # one cluster per directory is plenty here
                body = (_dirent(b".          ", 0x10, first) + _dirent(b"..         ", 0x10, parent)
                        + write_dir(child, first))
                if len(body) > SECTOR:
                    raise BuildError(f"directory {name} does not fit one cluster")
                clusters_data[first] = body
                entries.append(_dirent(short(name), 0x10, first))
            else:
                entries.append(_dirent(short(name), 0x20, alloc(child), len(child)))
        return b"".join(entries)

    root = _dirent(b"V2P-EFI    ", 0x08, 0) + write_dir(tree, 0)
    if len(root) > root_entries * 32 or len(fat) - 2 > clusters:
        raise BuildError("ESP contents too large")

    volume = bytearray(sectors * SECTOR)
    boot = struct.pack("<3s8sHBHBHHBHHHII", b"\xeb\x3c\x90", b"V2P     ", SECTOR, 1, rsvd, nfats,
                       root_entries, sectors if sectors < 65536 else 0, 0xF8, fat_sectors,
                       32, 64, hidden, sectors if sectors >= 65536 else 0)
    boot += struct.pack("<BBBI11s8s", 0x80, 0, 0x29, EFI_VOLUME_ID, b"V2P-EFI    ", b"FAT16   ")
    volume[: len(boot)] = boot
    volume[510:512] = b"\x55\xaa"
    fat_bytes = b"".join(struct.pack("<H", entry) for entry in fat)
    for i in range(nfats):
        offset = (rsvd + i * fat_sectors) * SECTOR
        volume[offset : offset + len(fat_bytes)] = fat_bytes
    offset = (rsvd + nfats * fat_sectors) * SECTOR
    volume[offset : offset + len(root)] = root
    for cluster, data in clusters_data.items():
        offset = (data_start + cluster - 2) * SECTOR
        volume[offset : offset + len(data)] = data
    return bytes(volume)


def _gpt_header(my_lba: int, alt_lba: int, entries_lba: int, last_lba: int,
                entries_crc: int) -> bytes:
    fields = [b"EFI PART", 0x00010000, 92, 0, 0, my_lba, alt_lba, 34, last_lba - 33,
              uuid.UUID(EFI_DISK_GUID).bytes_le, entries_lba, 128, 128, entries_crc]
    layout = "<8sIIIIQQQQ16sQIII"
    crc = zlib.crc32(struct.pack(layout, *fields))
    fields[3] = crc
    return struct.pack(layout, *fields).ljust(SECTOR, b"\0")


def write_efi_raw(path: Path, efi_app: bytes, size_mib: int = EFI_DISK_MIB) -> None:
    """A GPT disk whose only partition is an ESP with ``efi_app`` as the removable-media
    boot file \\EFI\\BOOT\\BOOTX64.EFI (what firmware boots with no boot entries)."""
    total = size_mib * MIB // SECTOR
    last_lba = total - 1
    esp_last = EFI_ESP_FIRST_LBA + EFI_ESP_SECTORS - 1
    if esp_last > last_lba - 33:
        raise BuildError("EFI disk too small for its ESP")
    entry = struct.pack("<16s16sQQQ72s", uuid.UUID(ESP_TYPE_GUID).bytes_le,
                        uuid.UUID(EFI_ESP_GUID).bytes_le, EFI_ESP_FIRST_LBA, esp_last, 0,
                        "EFI system partition".encode("utf-16-le"))
    entries = entry.ljust(128 * 128, b"\0")
    entries_crc = zlib.crc32(entries)
    # protective MBR: one 0xEE partition over the whole disk (CHS fields saturated)
    mbr = bytearray(SECTOR)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1,
                               min(total - 1, 0xFFFFFFFF))
    mbr[510:512] = b"\x55\xaa"
    esp = fat16_esp({"EFI/BOOT/BOOTX64.EFI": efi_app}, EFI_ESP_SECTORS, EFI_ESP_FIRST_LBA)
    with open(path, "wb") as f:
        f.truncate(total * SECTOR)
        f.write(mbr)
        f.write(_gpt_header(1, last_lba, 2, last_lba, entries_crc))
        f.write(entries)
        f.seek(EFI_ESP_FIRST_LBA * SECTOR)
        f.write(esp.rstrip(b"\0"))  # the empty rest stays a hole
        f.seek((last_lba - 32) * SECTOR)
        f.write(entries)
        f.write(_gpt_header(last_lba, 1, last_lba - 32, last_lba, entries_crc))


def _build_efi(stage: Path, tools: dict[str, str], quiet: bool) -> dict:
    d = stage / EFI_NAME
    d.mkdir()
    app_path = d / "BOOTX64.EFI"
    run([tools["nasm"], "-f", "bin", "-o", str(app_path), str(EFI_ASM_SOURCE)])
    app = app_path.read_bytes()
    if app[:2] != b"MZ" or app[0x40:0x44] != b"PE\0\0":
        raise BuildError(f"{app_path}: not a PE image")
    raw_path = d / f"{EFI_NAME}.raw"
    write_efi_raw(raw_path, app)
    vmdk = d / f"{EFI_NAME}.vmdk"
    run([tools["qemu-img"], "convert", "-q", "-f", "raw", "-O", "vmdk",
         "-o", "subformat=monolithicSparse", str(raw_path), str(vmdk)])
    cmp = subprocess.run([tools["qemu-img"], "compare", "-q", "-f", "raw", "-F", "vmdk",
                          str(raw_path), str(vmdk)], capture_output=True, text=True)
    if cmp.returncode != 0:
        raise BuildError(f"{EFI_NAME}: qemu-img compare against {EFI_NAME}.raw failed "
                         f"(exit {cmp.returncode}): {cmp.stdout}{cmp.stderr}".rstrip())
    size = EFI_DISK_MIB * MIB
    log(f"{EFI_NAME}: {EFI_NAME}/{EFI_NAME}.raw + {EFI_NAME}/{EFI_NAME}.vmdk "
        f"(GPT, FAT16 ESP, BOOTX64.EFI {len(app)} bytes)", quiet)
    return {
        "dir": EFI_NAME,
        "raw": f"{EFI_NAME}/{EFI_NAME}.raw",
        "raw_sha256": sha256_file(raw_path),
        "descriptor": f"{EFI_NAME}/{EFI_NAME}.vmdk",
        "files": [f"{EFI_NAME}/{EFI_NAME}.vmdk"],
        "flavor": "monolithicSparse",
        "app": {"path": f"{EFI_NAME}/BOOTX64.EFI", "sha256": sha256_file(app_path)},
        "virtual_size": size,
        "sectors": size // SECTOR,
        "expected_serial": {"up": EFI_LINE},
        "kernel_bytes": EFI_KERNEL_BYTES,
        "shutdown_wait_s": SHUTDOWN_WAIT_S,
    }


def _build_dead(stage: Path, tools: dict[str, str], quiet: bool) -> dict:
    d = stage / DEAD_DIR
    d.mkdir()
    dead: dict[str, dict] = {}
    for name, (define, outcome, description) in DEAD_CASES.items():
        raw_path = d / f"{name}.raw"
        boot = b""
        if define is not None:
            bin_path = d / f"{name}.bin"
            run([tools["nasm"], "-f", "bin", f"-D{define}", "-o", str(bin_path), str(DEAD_ASM_SOURCE)])
            boot = bin_path.read_bytes()
            bin_path.unlink()
            if len(boot) != SECTOR or boot[510:512] != b"\x55\xaa":
                raise BuildError(f"dead.asm -D{define}: not one boot sector with 55 AA")
        with open(raw_path, "wb") as f:
            f.truncate(DEAD_MIB * MIB)
            f.write(boot)
        dead[name] = {
            "raw": f"{DEAD_DIR}/{name}.raw",
            "raw_sha256": sha256_file(raw_path),
            "virtual_size": DEAD_MIB * MIB,
            "nasm_define": define,
            "boot_check": outcome,
            "description": description,
            "expected_serial": DEAD_SERIAL.get(name, []),
        }
    log(f"{DEAD_DIR}: {', '.join(f'{n}.raw' for n in dead)} ({DEAD_MIB} MiB each)", quiet)
    return dead


# ---------------------------------------------------------------------------
# descriptors


def esxi_descriptor(sectors: int, flat_name: str, raw_sha: str) -> str:
    """An ESXi-style text descriptor for a "vmfs" (thick, flat) disk."""
    heads, spt = 255, 63  # what ESXi writes for lsilogic disks
    cylinders = max(1, sectors // (heads * spt))
    cid = raw_sha[:8]  # deterministic content ID
    long_cid = raw_sha[:32]
    uuid = " ".join(raw_sha[32 + 2 * i : 34 + 2 * i] for i in range(16))
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        f"CID={cid}\n"
        "parentCID=ffffffff\n"
        'isNativeSnapshot="no"\n'
        'createType="vmfs"\n'
        "\n"
        "# Extent description\n"
        f'RW {sectors} VMFS "{flat_name}"\n'
        "\n"
        "# The Disk Data Base \n"
        "#DDB\n"
        "\n"
        'ddb.adapterType = "lsilogic"\n'
        'ddb.deletable = "true"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        f'ddb.geometry.sectors = "{spt}"\n'
        f'ddb.longContentID = "{long_cid}"\n'
        'ddb.thinProvisioned = "0"\n'
        f'ddb.uuid = "{uuid}"\n'
        f'ddb.virtualHWVersion = "{ESXI_HW_VERSION}"\n'
    )


def read_descriptor(path: Path) -> str:
    """Descriptor text of a VMDK: the file itself, or the one embedded in a
    sparse extent (header field descriptorOffset/descriptorSize in sectors)."""
    with open(path, "rb") as f:
        head = f.read(SECTOR)
        if head[:4] == b"KDMV":
            off = int.from_bytes(head[28:36], "little")
            size = int.from_bytes(head[36:44], "little")
            f.seek(off * SECTOR)
            data = f.read(size * SECTOR)
        else:
            data = head + f.read(64 * 1024)
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")


def descriptor_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        fields[key.strip()] = value.strip().strip('"')
    return fields


def descriptor_extents(text: str) -> list[str]:
    names = []
    for line in text.splitlines():
        parts = line.split('"')
        if line.startswith(("RW ", "RDONLY ", "NOACCESS ")) and len(parts) >= 3:
            names.append(parts[1])
    return names


# ---------------------------------------------------------------------------
# build


def up_to_date(outdir: Path, size_mib: int) -> dict | None:
    manifest_path = outdir / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
        mtime = manifest_path.stat().st_mtime
    except (OSError, ValueError):
        return None
    newest_input = max(p.stat().st_mtime for p in (ASM_SOURCE, EFI_ASM_SOURCE, DEAD_ASM_SOURCE,
                                                   THIS_FILE, *ASM_INCLUDES))
    if mtime <= newest_input:
        return None
    if manifest.get("schema") != SCHEMA_VERSION or manifest.get("size_mib") != size_mib:
        return None
    if set(manifest.get("standins", {})) != set(STANDINS) or "efi" not in manifest:
        return None
    if set(manifest.get("dead", {})) != set(DEAD_CASES):
        return None
    paths = [manifest["raw"]["path"], manifest["efi"]["raw"], *manifest["efi"]["files"]]
    paths += [entry["raw"] for entry in manifest["dead"].values()]
    for entry in manifest["flavors"].values():
        paths += entry["files"]
    for entry in manifest["standins"].values():
        paths += [entry["raw"], *entry["files"]]
    if not all((outdir / p).is_file() for p in paths):
        return None
    return manifest


@contextlib.contextmanager
def locked(outdir: Path):
    """Serialise concurrent builds into the same OUTDIR (e.g. parallel tests)."""
    with open(outdir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build(outdir: os.PathLike | str, size_mib: int = DEFAULT_SIZE_MIB,
          force: bool = False, quiet: bool = False) -> dict:
    if not MIN_SIZE_MIB <= size_mib <= MAX_SIZE_MIB:
        raise BuildError(f"--size-mib must be between {MIN_SIZE_MIB} and {MAX_SIZE_MIB}")
    outdir = Path(outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    tools = find_tools()  # fail early and clearly, even when up to date

    with locked(outdir):
        if not force:
            manifest = up_to_date(outdir, size_mib)
            if manifest is not None:
                log(f"{outdir} is up to date (use --force to rebuild)", quiet)
                return manifest
        return _build(outdir, size_mib, tools, quiet)


def assemble(tools: dict[str, str], out: Path, defines: tuple[str, ...] = ()) -> bytes:
    argv = [tools["nasm"], "-f", "bin", "-I", f"{HERE}{os.sep}"]
    argv += [f"-D{d}" for d in defines]
    run(argv + ["-o", str(out), str(ASM_SOURCE)])
    boot = out.read_bytes()
    if len(boot) < SECTOR or len(boot) % SECTOR or boot[510:512] != b"\x55\xaa":
        raise BuildError(f"{out}: not a sector-aligned boot program with 55 AA")
    if len(boot) > MIB // SECTOR * SECTOR:  # must stay below the first data run
        raise BuildError("boot program too large")
    return boot


def _build(outdir: Path, size_mib: int, tools: dict[str, str], quiet: bool) -> dict:
    stage = outdir / ".stage"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    size = size_mib * MIB
    sectors = size // SECTOR
    marker = marker_for(size_mib)

    # 1. boot program
    boot_path = stage / "guest.bin"
    boot = assemble(tools, boot_path)
    log(f"assembled guest.asm ({len(boot)} bytes)", quiet)

    # 2. raw reference disk
    raw_path = stage / "guest.raw"
    write_raw(raw_path, boot, size_mib)
    raw_sha = sha256_file(raw_path)
    log(f"wrote guest.raw ({size_mib} MiB, sha256 {raw_sha[:16]}...)", quiet)

    # 3. qemu-img flavors
    flavors: dict[str, dict] = {}
    for name in QEMU_FLAVORS:
        d = stage / name
        d.mkdir()
        run([tools["qemu-img"], "convert", "-q", "-f", "raw", "-O", "vmdk",
             "-o", f"subformat={name}", str(raw_path), str(d / f"{name}.vmdk")])
        flavors[name] = {"dir": name, "descriptor": f"{name}/{name}.vmdk"}

    # 4. hand-written ESXi pair
    d = stage / ESXI_NAME
    d.mkdir()
    flat_name = f"{ESXI_NAME}-flat.vmdk"
    sparse_copy(raw_path, d / flat_name)
    (d / f"{ESXI_NAME}.vmdk").write_text(esxi_descriptor(sectors, flat_name, raw_sha))
    flavors[ESXI_NAME] = {"dir": ESXI_NAME, "descriptor": f"{ESXI_NAME}/{ESXI_NAME}.vmdk"}

    # 5. describe + verify every flavor against the raw disk
    for name, entry in flavors.items():
        desc_path = stage / entry["descriptor"]
        text = read_descriptor(desc_path)
        fields = descriptor_fields(text)
        extents = descriptor_extents(text)
        files = [entry["descriptor"]] + [
            f"{entry['dir']}/{e}" for e in extents if f"{entry['dir']}/{e}" != entry["descriptor"]
        ]
        for rel in files:
            if not (stage / rel).is_file():
                raise BuildError(f"{name}: extent file {rel} is missing")
        cmp = subprocess.run(
            [tools["qemu-img"], "compare", "-q", "-f", "raw", "-F", "vmdk",
             str(raw_path), str(desc_path)],
            capture_output=True, text=True)
        qemu_ok = cmp.returncode == 0
        if not qemu_ok and name != ESXI_NAME:
            raise BuildError(
                f"{name}: qemu-img compare against guest.raw failed "
                f"(exit {cmp.returncode}): {cmp.stdout}{cmp.stderr}".rstrip())
        entry.update({
            "flavor": fields.get("createType", ""),
            "files": files,
            "extents": [f"{entry['dir']}/{e}" for e in extents],
            "descriptor_embedded": desc_path.read_bytes()[:4] == b"KDMV",
            "adapter_type": fields.get("ddb.adapterType", ""),
            "virtual_size": size,
            "sectors": sectors,
            "marker": marker,
            "qemu_compare_ok": qemu_ok,
        })
        log(f"{name}: {', '.join(files)} (createType={entry['flavor']}, "
            f"qemu-img compare {'identical' if qemu_ok else 'not possible'})", quiet)

    # 6. Windows stand-ins: same disk, other boot program, plus the flag sector
    standins = _build_standins(stage, size_mib, tools, quiet)

    # 7. the UEFI guest (its own disk, independent of --size-mib)
    efi = _build_efi(stage, tools, quiet)

    # 8. the dead cases (tiny disks of their own)
    dead = _build_dead(stage, tools, quiet)

    manifest = {
        "schema": SCHEMA_VERSION,
        "size_mib": size_mib,
        "virtual_size": size,
        "sectors": sectors,
        "marker": marker,
        "boot": {"path": "guest.bin", "sha256": sha256_file(boot_path)},
        "raw": {"path": "guest.raw", "format": "raw", "sha256": raw_sha},
        "data_runs": [{"lba": lba, "sectors": n} for lba, n in data_layout(size_mib)],
        "expected_serial": {
            "controller_prefix": "v2p-guest: boot controller=",
            "sectors": f"v2p-guest: disk sectors={sectors}",
            "marker": f"v2p-guest: last-sector marker={marker}",
            "poweroff": "v2p-guest: poweroff",
        },
        # what the guest does besides printing, as an OS does: reads this much of its
        # boot disk before the first line, waits this long before the power-off
        "kernel_bytes": KERNEL_BYTES,
        "shutdown_wait_s": SHUTDOWN_WAIT_S,
        "flavors": flavors,
        "standins": standins,
        "efi": efi,
        "dead": dead,
        # not an image of its own: the BIOS-only guest.raw booted under OVMF (bios: ovmf)
        "bios_on_uefi": {
            "raw": "guest.raw",
            "firmware": "ovmf",
            "boot_check": "failed",
            "description": "a BIOS-only disk (MBR boot code, no EFI system partition) under "
                           "UEFI firmware: OVMF finds no boot option on it and either starts "
                           "its UEFI Shell ('Shell> ', Debian's OVMF_CODE_4M.fd) or says "
                           "'BdsDxe: No bootable option or device was found' (builds "
                           "without the shell); the disk's boot code never runs",
        },
        "standin_serial": {
            # after the same controller/sectors/marker lines as the plain guest;
            # {controller} = the name from the boot controller= line
            "stop_7b": "STOP 0x0000007B INACCESSIBLE_BOOT_DEVICE",
            "driver_viostor": "v2p-guest: driver viostor installed",
            "driver_netkvm": "v2p-guest: driver netkvm installed",
            "driver_failed": "v2p-guest: driver install failed (flag write error)",
            "up": "v2p-guest: windows up on {controller}",
            "up_viostor": "v2p-guest: windows up on {controller} (viostor)",
            "netkvm_active": "v2p-guest: netkvm active",
            "power_button": "v2p-guest: power button, shutting down",
            "poweroff": "v2p-guest: poweroff",
            "no_button": "v2p-guest: no ACPI power button, halting",
        },
    }

    # 9. move into place (replacing earlier outputs), manifest last
    standin_outputs = [p for name in standins for p in (f"{name}.bin", f"{name}.raw", name)]
    for name in ["guest.bin", "guest.raw", *flavors, *standin_outputs, EFI_NAME, DEAD_DIR]:
        target = outdir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(stage / name, target)
    shutil.rmtree(stage, ignore_errors=True)
    tmp = outdir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, outdir / MANIFEST_NAME)
    log(f"wrote {outdir / MANIFEST_NAME}", quiet)
    return manifest


def _build_standins(stage: Path, size_mib: int, tools: dict[str, str], quiet: bool) -> dict:
    size = size_mib * MIB
    sectors = size // SECTOR
    runs = data_layout(size_mib)
    flag_lba = STANDIN_FLAG_LBA
    if any(lba <= flag_lba < lba + n for lba, n in runs) or flag_lba >= sectors - 1:
        raise BuildError(f"stand-in flag LBA {flag_lba} collides with test data or the marker")
    initial = flag_text()
    standins: dict[str, dict] = {}
    for name, define in STANDINS.items():
        boot_path = stage / f"{name}.bin"
        boot = assemble(tools, boot_path, (define, f"STANDIN_FLAG_LBA={flag_lba}"))
        if len(boot) > flag_lba * SECTOR:
            raise BuildError(f"{name}: boot program reaches the flag sector")
        raw_path = stage / f"{name}.raw"
        write_raw(raw_path, boot, size_mib, {flag_lba: initial.encode("ascii")})
        d = stage / name
        d.mkdir()
        vmdk = d / f"{name}.vmdk"
        run([tools["qemu-img"], "convert", "-q", "-f", "raw", "-O", "vmdk",
             "-o", f"subformat={STANDIN_VMDK_FLAVOR}", str(raw_path), str(vmdk)])
        cmp = subprocess.run(
            [tools["qemu-img"], "compare", "-q", "-f", "raw", "-F", "vmdk",
             str(raw_path), str(vmdk)], capture_output=True, text=True)
        if cmp.returncode != 0:
            raise BuildError(f"{name}: qemu-img compare against {name}.raw failed "
                             f"(exit {cmp.returncode}): {cmp.stdout}{cmp.stderr}".rstrip())
        fields = descriptor_fields(read_descriptor(vmdk))
        standins[name] = {
            "dir": name,
            "descriptor": f"{name}/{name}.vmdk",
            "files": [f"{name}/{name}.vmdk"],
            "flavor": fields.get("createType", ""),
            "adapter_type": fields.get("ddb.adapterType", ""),
            "raw": f"{name}.raw",
            "raw_sha256": sha256_file(raw_path),
            "boot": {"path": f"{name}.bin", "sha256": sha256_file(boot_path)},
            "nasm_define": define,
            "installs_drivers": define != "STANDIN_NO_DRIVER",
            "flag_lba": flag_lba,
            "flag_format": f"{FLAG_MAGIC}viostor=<0|1> netkvm=<0|1> (ASCII, NUL padded)",
            "flag_initial": initial,
            "virtual_size": size,
            "sectors": sectors,
            "marker": marker_for(size_mib),
        }
        log(f"{name}: {name}.raw + {name}/{name}.vmdk (-D{define}, {len(boot)} bytes, "
            f"flag sector LBA {flag_lba})", quiet)
    return standins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the v2p sample guest disk (raw + every VMDK flavor).")
    parser.add_argument("outdir", help="output directory (created if missing)")
    parser.add_argument("--size-mib", type=int, default=DEFAULT_SIZE_MIB,
                        help=f"virtual disk size in MiB, {MIN_SIZE_MIB}..{MAX_SIZE_MIB} "
                             f"(default {DEFAULT_SIZE_MIB})")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if the outputs are up to date")
    parser.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    args = parser.parse_args(argv)
    if not MIN_SIZE_MIB <= args.size_mib <= MAX_SIZE_MIB:
        parser.error(f"--size-mib must be between {MIN_SIZE_MIB} and {MAX_SIZE_MIB}")
    try:
        build(args.outdir, args.size_mib, force=args.force, quiet=args.quiet)
    except BuildError as exc:
        print(f"build.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
