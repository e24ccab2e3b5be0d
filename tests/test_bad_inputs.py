"""A corpus of broken and hostile inputs. Each one ends, within 2 s, in one
clear line and a non-zero exit (or, where documented, a warning and a correct
migration); nothing is created on the target, and no byte of a file outside
the image folder ever reaches an output."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import InProcessV2P, one_line_error

SECRET = b"V2P-SECRET-OUTSIDE-THE-FOLDER-" * 20  # 600 bytes
DESC = "# Disk DescriptorFile\nversion=1\nCID={cid}\nparentCID={parent}\ncreateType=\"{ct}\"\n{extra}"


def descriptor(folder: Path, name: str, extents: str, ct: str = "monolithicFlat", cid: str = "11111111",
               parent: str = "ffffffff", extra: str = "") -> Path:
    path = folder / name
    path.write_text(DESC.format(cid=cid, parent=parent, ct=ct, extra=extra) + extents + "\n")
    return path


def flat(folder: Path, name: str = "disk-flat.vmdk", size: int = 1 << 20) -> Path:
    data = bytearray(size)
    data[510:512] = b"\x55\xaa"
    (folder / name).write_bytes(bytes(data))
    return folder / name


def sparse_header(capacity: int, *, version: int = 1, grain: int = 128, gd: int = 21, gtes: int = 512,
                  compress: int = 0) -> bytes:
    head = struct.pack("<4sIIQQQQIQQQB4sH", b"KDMV", version, 3, capacity, grain, 1, 20, gtes, gd,
                       gd, 128, 0, b"\n \r\n", compress)
    return head.ljust(512, b"\0")


def sample_copy(samples: Path, folder: Path, flavor: str) -> Path:
    src = samples / flavor
    for item in src.iterdir():
        shutil.copy2(item, folder / item.name)
    return folder / f"{flavor}.vmdk"


# Each case builds its files in ``folder`` (``secret`` lies outside it; ``samples``
# is the built sample folder) and returns (path to give v2p, text the error must contain).
Case = Callable[[Path, Path, Path], tuple[Path, str]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(func: Case) -> Case:
        CASES[name] = func
        return func
    return register


@case("zero-length")
def _(f, s, samples):
    (f / "d.vmdk").write_bytes(b"")
    return f / "d.vmdk", "is empty"


@case("truncated-header-100B")
def _(f, s, samples):
    (f / "d.vmdk").write_bytes(sparse_header(65536)[:100])
    return f / "d.vmdk", "cut short (100 bytes)"


@case("header-only-512B")
def _(f, s, samples):
    (f / "d.vmdk").write_bytes(sparse_header(65536))
    return f / "d.vmdk", "cut short"


@case("sparse-cut-short")
def _(f, s, samples):
    path = sample_copy(samples, f, "monolithicSparse")
    with open(path, "r+b") as handle:
        handle.truncate(700_000)
    return path, "file cut short"


@case("stream-optimized-cut-short")
def _(f, s, samples):
    path = sample_copy(samples, f, "streamOptimized")
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 3)
    return path, "cut short"


@case("directory")
def _(f, s, samples):
    (f / "vm").mkdir()
    return f / "vm", "a folder to migrate must hold exactly one .vmx (0 found)"


@case("dangling-symlink")
def _(f, s, samples):
    (f / "d.vmdk").symlink_to(f / "nowhere.vmdk")
    return f / "d.vmdk", "dangling symbolic link"


@case("extent-symlink-leaving-folder")
def _(f, s, samples):
    (f / "disk-flat.vmdk").symlink_to(s)
    return descriptor(f, "d.vmdk", 'RW 1 FLAT "disk-flat.vmdk" 0'), "link leading out of the image folder"


@case("extent-absolute")
def _(f, s, samples):
    return descriptor(f, "d.vmdk", f'RW 1 FLAT "{s}" 0'), "is absolute: refused"


@case("extent-etc-passwd")
def _(f, s, samples):
    return descriptor(f, "d.vmdk", 'RW 8 FLAT "/etc/passwd" 0'), "is absolute: refused"


@case("extent-dotdot")
def _(f, s, samples):
    return descriptor(f, "d.vmdk", f'RW 1 FLAT "../{s.name}" 0'), "leaves the image folder"


@case("extent-deep-dotdot-vmfs")
def _(f, s, samples):
    return descriptor(f, "d.vmdk", 'RW 8 VMFS "../../../../etc/passwd"', ct="vmfs"), "leaves the image folder"


@case("extent-inner-dotdot")
def _(f, s, samples):
    (f / "sub").mkdir()
    return descriptor(f, "d.vmdk", f'RW 1 FLAT "sub/../../{s.name}" 0'), "leaves the image folder"


@case("extent-windows-absolute")
def _(f, s, samples):
    return descriptor(f, "d.vmdk", 'RW 1 FLAT "C:\\\\secret.vmdk" 0'), "is absolute"


@case("noaccess-extent")
def _(f, s, samples):
    flat(f)
    return descriptor(f, "d.vmdk", 'NOACCESS 2048 FLAT "disk-flat.vmdk" 0'), "NOACCESS"


@case("flat-smaller-than-extent")
def _(f, s, samples):
    flat(f, size=1 << 20)
    return descriptor(f, "d.vmdk", 'RW 4096 FLAT "disk-flat.vmdk" 0'), "size mismatch"


@case("flat-offset-past-end")
def _(f, s, samples):
    flat(f, size=1 << 20)
    return descriptor(f, "d.vmdk", 'RW 2048 FLAT "disk-flat.vmdk" 1'), "size mismatch"


@case("sparse-extent-capacity-mismatch")
def _(f, s, samples):
    sample_copy(samples, f, "twoGbMaxExtentSparse")
    return descriptor(f, "d.vmdk", 'RW 99999 SPARSE "twoGbMaxExtentSparse-s001.vmdk"',
                      ct="twoGbMaxExtentSparse"), "capacity mismatch"


@case("embedded-descriptor-capacity-mismatch")
def _(f, s, samples):
    path = sample_copy(samples, f, "monolithicSparse")
    data = bytearray(path.read_bytes())
    at = data.find(b"RW 65536 SPARSE")
    data[at:at + 15] = b"RW 99999 SPARSE"
    path.write_bytes(bytes(data))
    return path, "capacity mismatch"


@case("capacity-2^60-sectors")
def _(f, s, samples):
    (f / "d.vmdk").write_bytes(sparse_header(1 << 60) + bytes(4096))
    return f / "d.vmdk", "more than any VMware disk can have"


@case("capacity-2^36-sectors")
def _(f, s, samples):
    (f / "d.vmdk").write_bytes(sparse_header(1 << 36) + bytes(1 << 16))
    return f / "d.vmdk", "does not fit"


@case("capacity-2^40-sectors")
def _(f, s, samples):
    (f / "d.vmdk").write_bytes(sparse_header(1 << 40) + bytes(1 << 16))
    return f / "d.vmdk", "more than any VMware disk can have"


@case("extent-2^40-sectors")
def _(f, s, samples):
    flat(f)
    return descriptor(f, "d.vmdk", f'RW {1 << 40} FLAT "disk-flat.vmdk" 0'), "more than any VMware disk"


@case("grain-size-not-power-of-two")
def _(f, s, samples):
    (f / "d.vmdk").write_bytes(sparse_header(65536, grain=3) + bytes(1 << 16))
    return f / "d.vmdk", "impossible grain size"


@case("header-version-9")
def _(f, s, samples):
    (f / "d.vmdk").write_bytes(sparse_header(65536, version=9) + bytes(1 << 16))
    return f / "d.vmdk", "unknown VMDK sparse header version 9"


@case("unknown-compression")
def _(f, s, samples):
    (f / "d.vmdk").write_bytes(sparse_header(65536, compress=7) + bytes(1 << 16))
    return f / "d.vmdk", "unknown VMDK compression"


@case("unknown-createType")
def _(f, s, samples):
    flat(f)
    return descriptor(f, "d.vmdk", 'RW 2048 FLAT "disk-flat.vmdk" 0', ct="holographic"), "unknown createType"


@case("no-createType")
def _(f, s, samples):
    flat(f)
    path = f / "d.vmdk"
    path.write_text('# Disk DescriptorFile\nversion=1\nRW 2048 FLAT "disk-flat.vmdk" 0\n')
    return path, "has no createType"


@case("missing-extent")
def _(f, s, samples):
    return descriptor(f, "d.vmdk", 'RW 2048 FLAT "gone-flat.vmdk" 0'), "is missing"


@case("extent-is-directory")
def _(f, s, samples):
    (f / "dir-flat.vmdk").mkdir()
    return descriptor(f, "d.vmdk", 'RW 2048 FLAT "dir-flat.vmdk" 0'), "not a regular file"


@case("extent-is-fifo")
def _(f, s, samples):
    os.mkfifo(f / "fifo-flat.vmdk")
    return descriptor(f, "d.vmdk", 'RW 2048 FLAT "fifo-flat.vmdk" 0'), "not a regular file"


@case("extent-is-descriptor-itself")
def _(f, s, samples):
    return descriptor(f, "d.vmdk", 'RW 1 FLAT "d.vmdk" 0'), "points back at its own descriptor"


@case("sparse-extent-is-raw")
def _(f, s, samples):
    flat(f, "raw-s001.vmdk")
    return descriptor(f, "d.vmdk", 'RW 2048 SPARSE "raw-s001.vmdk"', ct="twoGbMaxExtentSparse"), \
        "not a VMDK sparse extent"


@case("same-sparse-extent-twice")
def _(f, s, samples):
    sample_copy(samples, f, "twoGbMaxExtentSparse")
    ext = 'RW 65536 SPARSE "twoGbMaxExtentSparse-s001.vmdk"'
    return descriptor(f, "d.vmdk", ext + "\n" + ext, ct="twoGbMaxExtentSparse"), "listed twice"


@case("zero-sector-extent")
def _(f, s, samples):
    flat(f)
    return descriptor(f, "d.vmdk", 'RW 0 FLAT "disk-flat.vmdk" 0'), "has zero sectors"


@case("malformed-extent-line")
def _(f, s, samples):
    flat(f)
    return descriptor(f, "d.vmdk", 'RW lots FLAT "disk-flat.vmdk" 0'), "malformed extent line"


@case("unknown-extent-type")
def _(f, s, samples):
    flat(f)
    return descriptor(f, "d.vmdk", 'RW 2048 WEIRD "disk-flat.vmdk" 0'), "unknown extent type WEIRD"


@case("extent-without-file")
def _(f, s, samples):
    return descriptor(f, "d.vmdk", "RW 2048 FLAT"), "names no file"


@case("extent-name-with-nul")
def _(f, s, samples):
    path = f / "d.vmdk"
    path.write_bytes(DESC.format(cid=1, parent="ffffffff", ct="monolithicFlat", extra="").encode()
                     + b'RW 8 FLAT "a\x01b" 0\n\x00\x00')
    return path, "is missing"


@case("device-map-createType")
def _(f, s, samples):
    return descriptor(f, "d.vmdk", 'RW 2048 VMFSRDM "disk-rdm.vmdk"', ct="vmfsRawDeviceMap"), \
        "maps a physical device"


@case("passthrough-rdm")
def _(f, s, samples):
    return descriptor(f, "d.vmdk", 'RW 2048 VMFSRDM "disk-rdmp.vmdk"', ct="vmfsPassthroughRawDeviceMap"), \
        "maps a physical device"


@case("fullDevice")
def _(f, s, samples):
    return descriptor(f, "d.vmdk", 'RW 2048 FLAT "/dev/sda" 0', ct="fullDevice"), "maps a physical device"


@case("partitionedDevice")
def _(f, s, samples):
    return descriptor(f, "d.vmdk", 'RW 2048 FLAT "/dev/sda1" 0', ct="partitionedDevice"), \
        "maps a physical device"


@case("missing-parent")
def _(f, s, samples):
    flat(f)
    return descriptor(f, "snap.vmdk", 'RW 2048 FLAT "disk-flat.vmdk" 0', parent="22222222",
                      extra='parentFileNameHint="base.vmdk"\n'), "parent disk 'base.vmdk' is missing"


@case("parent-without-hint")
def _(f, s, samples):
    flat(f)
    return descriptor(f, "snap.vmdk", 'RW 2048 FLAT "disk-flat.vmdk" 0', parent="22222222"), \
        "names no parentFileNameHint"


@case("parent-cid-mismatch")
def _(f, s, samples):
    flat(f)
    flat(f, "snap-flat.vmdk")
    descriptor(f, "base.vmdk", 'RW 2048 FLAT "disk-flat.vmdk" 0', cid="aaaaaaaa")
    return descriptor(f, "snap.vmdk", 'RW 2048 FLAT "snap-flat.vmdk" 0', cid="bbbbbbbb", parent="cccccccc",
                      extra='parentFileNameHint="base.vmdk"\n'), "does not match the CID aaaaaaaa"


@case("parent-loop")
def _(f, s, samples):
    flat(f)
    descriptor(f, "a.vmdk", 'RW 2048 FLAT "disk-flat.vmdk" 0', cid="aaaaaaaa", parent="bbbbbbbb",
               extra='parentFileNameHint="b.vmdk"\n')
    descriptor(f, "b.vmdk", 'RW 2048 FLAT "disk-flat.vmdk" 0', cid="bbbbbbbb", parent="aaaaaaaa",
               extra='parentFileNameHint="a.vmdk"\n')
    return f / "a.vmdk", "loops back"


@case("parent-is-self")
def _(f, s, samples):
    flat(f)
    return descriptor(f, "a.vmdk", 'RW 2048 FLAT "disk-flat.vmdk" 0', cid="aaaaaaaa", parent="aaaaaaaa",
                      extra='parentFileNameHint="a.vmdk"\n'), "loops back"


@case("parent-hint-leaves-folder")
def _(f, s, samples):
    flat(f)
    return descriptor(f, "a.vmdk", 'RW 2048 FLAT "disk-flat.vmdk" 0', parent="aaaaaaaa",
                      extra=f'parentFileNameHint="../{s.name}"\n'), "leaves the image folder"


@case("parent-hint-absolute")
def _(f, s, samples):
    flat(f)
    return descriptor(f, "a.vmdk", 'RW 2048 FLAT "disk-flat.vmdk" 0', parent="aaaaaaaa",
                      extra=f'parentFileNameHint="{s}"\n'), "parent path"


@case("delta-without-parent")
def _(f, s, samples):
    flat(f, "d-delta.vmdk")
    return descriptor(f, "d.vmdk", 'RW 2048 VMFSSPARSE "d-delta.vmdk"', ct="vmfsSparse"), "without a parent"


@case("cowd-extent-given-directly")
def _(f, s, samples):
    (f / "d-delta.vmdk").write_bytes(b"COWD" + bytes(2044))
    return f / "d-delta.vmdk", "snapshot delta extent"


@case("sesparse-extent-given-directly")
def _(f, s, samples):
    (f / "d-sesparse.vmdk").write_bytes(struct.pack("<Q", 0xCAFEBABE) + bytes(4088))
    return f / "d-sesparse.vmdk", "snapshot delta extent"


@case("binary-garbage")
def _(f, s, samples):
    (f / "d.vmdk").write_bytes(os.urandom(1 << 20))
    return f / "d.vmdk", "not a disk image"


@case("text-file")
def _(f, s, samples):
    (f / "d.vmdk").write_text("These are my notes about the web server.\n" * 30)
    return f / "d.vmdk", "not a disk image"


@case("odd-size-data")
def _(f, s, samples):
    (f / "d.vmdk").write_bytes(b"\x55" * 1000)
    return f / "d.vmdk", "not a whole number of 512-byte sectors"


@case("one-gib-descriptor")
def _(f, s, samples):
    path = f / "d.vmdk"
    with open(path, "wb") as handle:
        handle.write(b"# Disk DescriptorFile\n")
        handle.truncate(1 << 30)
    return path, "descriptors are a few KiB"


@case("utf16-descriptor")
def _(f, s, samples):
    path = f / "d.vmdk"
    path.write_bytes("# Disk DescriptorFile\ncreateType=\"vmfs\"\n".encode("utf-16"))
    return path, "not a disk image"


@case("descriptor-bad-bytes")
def _(f, s, samples):
    path = f / "d.vmdk"
    path.write_bytes(b'# Disk DescriptorFile\ncreateType="vmfs"\n\xff\xfe garbage\n')
    return path, "descriptor is not text"


@case("qcow2-with-backing-file")
def _(f, s, samples):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(s), "-F", "raw",
                    str(f / "d.qcow2")], check=True)
    return f / "d.qcow2", "backing file: refused"


@case("grain-table-past-end")
def _(f, s, samples):
    data = bytearray(sparse_header(65536, gd=2) + bytes(1024))
    struct.pack_into("<I", data, 1024, 10_000)  # the one grain table lies far past the end
    (f / "d.vmdk").write_bytes(bytes(data))
    return f / "d.vmdk", "past the end"


def run_case(name: str, tmp_path: Path, samples: Path) -> tuple[Path, str, Path]:
    folder = tmp_path / "vm"
    folder.mkdir()
    secret = tmp_path / "secret-flat.vmdk"
    secret.write_bytes(SECRET.ljust(4096, b"\0"))
    path, expected = CASES[name](folder, secret, samples)
    return path, expected, secret


def assert_no_secret_in(folder: Path) -> None:
    if not folder.exists():
        return
    for item in folder.rglob("*"):
        if item.is_file():
            assert SECRET[:30] not in item.read_bytes(), f"outside bytes leaked into {item}"


def test_corpus_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_clearly(name, tmp_path, samples, inproc: InProcessV2P):
    v2p = inproc  # the command's words and effects, in this process
    path, expected, secret = run_case(name, tmp_path, samples)
    before = {p: p.read_bytes() for p in path.parent.rglob("*") if p.is_file() and not p.is_symlink()
              and p.stat().st_size < (64 << 20) and not p.is_fifo()}
    proc = v2p("migrate", str(path), "--vmid", "150", timeout=30)  # the seconds: bench/speed_claims.py
    line = one_line_error(proc)
    assert expected in line, line
    assert not (v2p.target / "qemu-server").exists(), "a VM was created for a refused source"
    assert not (v2p.target / "images").exists()
    assert_no_secret_in(v2p.target)
    for p, data in before.items():
        assert p.read_bytes() == data, f"{p} was modified"
    # `inspect` says the same (a folder is inspected as a VM folder: here an empty one)
    seen = one_line_error(v2p("inspect", str(path), timeout=30))
    assert (expected if name != "directory" else "no disk images") in seen, seen


WARNINGS = {
    # name: (descriptor text around a 32 MiB flat copy of guest.raw, the warnings v2p must show: all of them)
    "rdonly-extent": ('RW 65536 FLAT', "RDONLY 65536 FLAT", ["d.vmdk has RDONLY extents; reading them like RW ones"]),
    "blank-line-before-extent": ('RW 65536 FLAT', "\nRW 65536 FLAT", []),
    "flat-without-offset": ('"disk-flat.vmdk" 0', '"disk-flat.vmdk"', []),
    "crlf-line-ends": ("\n", "\r\n", []),
    "encoding-before-version": ("version=1", 'encoding="UTF-8"\nversion=1', []),
}


def shown_warnings(stdout: str) -> list[str]:
    return [line.split("] warning: ", 1)[1] for line in stdout.splitlines() if "] warning: " in line]


@pytest.mark.parametrize("name", sorted(WARNINGS))
def test_quirks_qemu_gets_wrong_migrate_exactly(name, tmp_path, samples, inproc: InProcessV2P):
    old, new, warnings = WARNINGS[name]
    folder = tmp_path / "vm"
    folder.mkdir()
    secret = tmp_path / "secret-flat.vmdk"
    secret.write_bytes(SECRET)
    shutil.copy(samples / "guest.raw", folder / "disk-flat.vmdk")
    text = DESC.format(cid="12345678", parent="ffffffff", ct="monolithicFlat", extra="") + \
        'RW 65536 FLAT "disk-flat.vmdk" 0\n'
    quirky = text.replace(old, new)
    assert quirky != text, "the quirk is not in the descriptor"
    (folder / "d.vmdk").write_bytes(quirky.encode())
    v2p = inproc
    proc = v2p("migrate", str(folder / "d.vmdk"), "--vmid", "151", "--format", "raw", "--no-boot-check")
    assert proc.returncode == 0, proc.stderr
    assert shown_warnings(proc.stdout) == warnings, proc.stdout
    assert v2p.disk(151, "raw").read_bytes() == (samples / "guest.raw").read_bytes()
