"""Build a real Linux guest for the boot benchmark: Debian's own kernel, a
busybox-static initramfs whose init runs a getty on ttyS0, on a bootable MBR
disk (syslinux on a FAT partition), as a streamOptimized VMDK.

Nothing is mounted and nothing is installed into the host system: the kernel
and busybox packages are fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x`` into a cache folder; the disk is assembled with a hand-written
MBR, ``mformat``/``mcopy`` (mtools) and ``syslinux --offset``. Needs the Debian
packages syslinux, syslinux-common and mtools (``make bench`` installs them).

The guest is what a minimal real Linux shows on its serial console: kernel
messages, then ``v2pbench login:`` from busybox getty. It acts on the ACPI
power button (busybox acpid, with the kernel's button and evdev modules), as a
distribution with systemd-logind or acpid does.

    python3 bench/linux_guest.py OUTDIR   ->  OUTDIR/linux-guest.vmdk (1 GiB virtual)
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

DISK_MIB = 1024
PART_START = 1 << 20
PART_MIB = 128
HOSTNAME = "v2pbench"
MODULES = ("kernel/drivers/input/evdev.ko", "kernel/drivers/acpi/button.ko")

INIT = f"""#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox hostname {HOSTNAME}
for m in /lib/modules/*.ko; do /bin/busybox insmod "$m"; done
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\\n/bin/busybox poweroff -f\\n' > /etc/acpi/PWRF/00000080
chmod +x /etc/acpi/PWRF/00000080
/bin/busybox acpid -d -a /etc/acpi/actions -c /etc/acpi >/dev/null 2>&1 &
echo "Debian GNU/Linux 12 {HOSTNAME} ttyS0"
exec /bin/busybox setsid /bin/busybox getty -L 115200 ttyS0 vt100
"""

SYSLINUX_CFG = """DEFAULT linux
PROMPT 0
TIMEOUT 0
SERIAL 0 115200
LABEL linux
  KERNEL vmlinuz
  INITRD initrd.gz
  APPEND console=ttyS0,115200 panic=5
"""


def run(*argv: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, check=True, **kw)  # type: ignore[call-overload, no-any-return]


def fetch(cache: Path) -> tuple[Path, Path, Path]:
    """(vmlinuz, modules dir, busybox) unpacked from Debian's packages."""
    cache.mkdir(parents=True, exist_ok=True)
    depends = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                             text=True, check=True).stdout
    kernel_pkg = next(line.split(":", 1)[1].strip() for line in depends.splitlines()
                      if line.strip().startswith("Depends:") and "linux-image-" in line)
    for pkg in (kernel_pkg, "busybox-static"):
        if not list(cache.glob(f"{pkg.split(':')[0]}_*.deb")):
            run("apt-get", "download", "-q", pkg, cwd=cache)
    root = cache / "root"
    if not root.is_dir():
        for deb in cache.glob("*.deb"):
            run("dpkg-deb", "-x", str(deb), str(root))
    vmlinuz = next((root / "boot").glob("vmlinuz-*"))
    modules = next((root / "lib" / "modules").iterdir())
    return vmlinuz, modules, root / "bin" / "busybox"


def initramfs(busybox: Path, modules: Path) -> bytes:
    """A gzipped newc cpio: busybox, its applet links, init, two modules."""
    entries: list[tuple[str, int, bytes]] = []  # (name, mode, data)
    for folder in ("bin", "sbin", "dev", "proc", "sys", "etc", "lib", "lib/modules", "tmp"):
        entries.append((folder, stat.S_IFDIR | 0o755, b""))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
    for applet in ("sh", "mkdir", "chmod", "printf", "mount", "insmod", "hostname"):
        entries.append((f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox"))
    entries.append(("init", stat.S_IFREG | 0o755, INIT.encode()))
    for module in MODULES:
        path = modules / module
        data = path.read_bytes() if path.exists() else _xz_module(path)
        entries.append((f"lib/modules/{Path(module).name}", stat.S_IFREG | 0o644, data))
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        raw = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0))
        out.write(header.encode() + raw)
        out.write(b"\0" * (-(110 + len(raw)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
    return gzip.compress(out.getvalue(), compresslevel=6)


def _xz_module(path: Path) -> bytes:
    import lzma

    return lzma.decompress(path.with_name(path.name + ".xz").read_bytes())


def build(outdir: Path, cache: Path) -> Path:
    vmlinuz, modules, busybox = fetch(cache)
    outdir.mkdir(parents=True, exist_ok=True)
    raw = outdir / "linux-guest.raw"
    raw.unlink(missing_ok=True)
    with open(raw, "wb") as handle:
        handle.truncate(DISK_MIB << 20)
    mbr = Path("/usr/lib/syslinux/mbr/mbr.bin").read_bytes()
    # One active FAT32 (LBA) partition; CHS fields say "use LBA" as modern tools write them.
    entry = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x0C, b"\xfe\xff\xff",
                        PART_START // 512, PART_MIB << 11)
    with open(raw, "r+b") as handle:
        handle.write(mbr[:440])
        handle.seek(446)
        handle.write(entry + b"\0" * 48 + b"\x55\xaa")
    image = f"{raw}@@{PART_START}"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    run("mformat", "-i", image, "-T", str(PART_MIB << 11), "-h", "64", "-s", "32", "-F", "-v", "V2PBENCH", "::",
        env=env)
    run("syslinux", "--install", "--offset", str(PART_START), str(raw))
    (outdir / "initrd.gz").write_bytes(initramfs(busybox, modules))
    (outdir / "syslinux.cfg").write_text(SYSLINUX_CFG)
    shutil.copyfile(vmlinuz, outdir / "vmlinuz")
    for name in ("vmlinuz", "initrd.gz", "syslinux.cfg"):
        run("mcopy", "-o", "-i", image, str(outdir / name), f"::{name}", env=env)
        (outdir / name).unlink()
    vmdk = outdir / "linux-guest.vmdk"
    vmdk.unlink(missing_ok=True)
    run("qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
        str(raw), str(vmdk))
    return vmdk


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--cache", type=Path, help="where the Debian packages are kept (default: OUTDIR/debs)")
    args = parser.parse_args()
    for tool in ("mformat", "mcopy", "syslinux", "qemu-img", "apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            print(f"linux_guest: {tool} not found (apt-get install syslinux syslinux-common mtools qemu-utils)",
                  file=sys.stderr)
            return 1
    print(build(args.outdir, args.cache or args.outdir / "debs"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
