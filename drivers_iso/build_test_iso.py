"""Build a small ISO with the real virtio-win directory layout, for tests.

The layout is virtio-win's own (``viostor/<os>/<arch>/viostor.inf``,
``vioscsi/...``, ``NetKVM/<os>/<arch>/netkvm.inf``); the files are tiny text
stand-ins, not drivers. Usage:

    python drivers_iso/build_test_iso.py OUT.iso [--omit w7] [--drivers viostor,vioscsi,NetKVM]

Needs xorriso (Debian package ``xorriso``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

OS_DIRS = ["xp", "2k3", "2k8", "2k8R2", "w7", "w8", "w8.1", "2k12", "2k12R2", "w10", "2k16", "2k19",
           "w11", "2k22", "2k25"]
ARCHES = ["amd64", "x86"]
DRIVERS = {"viostor": "viostor", "vioscsi": "vioscsi", "NetKVM": "netkvm", "Balloon": "balloon"}


def build(out: Path, *, omit: tuple[str, ...] = (), drivers: tuple[str, ...] = tuple(DRIVERS)) -> Path:
    if shutil.which("xorriso") is None:
        sys.exit("build_test_iso: xorriso not found (apt-get install xorriso)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "virtio-win"
        for driver in drivers:
            base = DRIVERS[driver]
            for os_dir in OS_DIRS:
                if os_dir in omit:
                    continue
                for arch in ARCHES:
                    folder = root / driver / os_dir / arch
                    folder.mkdir(parents=True)
                    inf = f"; v2p test stand-in for {driver} {os_dir} {arch}\n[Version]\n"
                    (folder / f"{base}.inf").write_text(inf + 'Signature="$WINDOWS NT$"\n')
                    (folder / f"{base}.sys").write_bytes(b"MZ" + bytes(62))
                    (folder / f"{base}.cat").write_bytes(b"0")
        (root / "guest-agent").mkdir()
        (root / "guest-agent" / "qemu-ga-x86_64.msi").write_bytes(b"msi")
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-J", "-R", "-V", "virtio-win-test",
                        "-o", str(out), str(root)], check=True, capture_output=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--omit", action="append", default=[], help="leave out this OS folder (e.g. w7)")
    parser.add_argument("--drivers", default=",".join(DRIVERS), help="comma-separated driver folders")
    args = parser.parse_args()
    build(args.out, omit=tuple(args.omit), drivers=tuple(args.drivers.split(",")))
    print(args.out)


if __name__ == "__main__":
    main()
