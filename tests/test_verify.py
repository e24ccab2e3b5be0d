"""Verification is a proof: one flipped byte anywhere in the first ``capacity`` bytes of a
target fails it (in the source's data, in its zeros, at either end, at a window boundary),
and so does a short target; written disks of every sample flavor pass. Real qemu-img,
real loop devices, real qcow2 and raw files."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from blockdev import loop_device
from conftest import FLAVORS
from v2p import convert, verify
from v2p.endpoint import DiskEndpoint
from v2p.errors import VerifyError
from v2p.inspect import inspect_disk
from v2p.inspect.qemu_input import qemu_source
from v2p.storage import Volume

KiB, MiB = 1 << 10, 1 << 20
CAPACITY = 8 * MiB
# (offset, length) of random data; the rest of the disk is zeros. The last island ends the disk.
ISLANDS = [(1 * MiB, 300 * KiB), (5 * MiB + 4 * KiB, 4 * KiB), (CAPACITY - 64 * KiB, 64 * KiB)]
IN_DATA = 1 * MiB + 1000
IN_ZEROS = 3 * MiB + 17
POSITIONS = {"first byte": 0, "in data": IN_DATA, "in zeros": IN_ZEROS,
             "at a window boundary": 64 * KiB * 20, "last byte": CAPACITY - 1}
# flat and sparse VMDK, qcow2: data mapped to file bytes; streamOptimized: compressed (qemu-img compare)
KINDS = {"flat": ("vmdk", ["-o", "subformat=monolithicFlat"]), "sparse": ("vmdk", []),
         "stream": ("vmdk", ["-o", "subformat=streamOptimized"]), "qcow2": ("qcow2", [])}


def qemu_img(*args: str, pass_fds: tuple[int, ...] = ()) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, pass_fds=pass_fds)


def raw_disk(path: Path) -> bytes:
    rng = random.Random(7)
    data = bytearray(CAPACITY)
    for offset, length in ISLANDS:
        data[offset:offset + length] = rng.randbytes(length)
    with open(path, "wb") as handle:  # sparse, so the zeros are holes the map leaves out
        handle.truncate(CAPACITY)
        for offset, length in ISLANDS:
            handle.seek(offset)
            handle.write(data[offset:offset + length])
    return bytes(data)


def source(tmp_path: Path, kind: str) -> DiskEndpoint:
    raw = tmp_path / "disk.raw"
    if not raw.exists():
        raw_disk(raw)
    fmt, options = KINDS[kind]
    out = tmp_path / f"source-{kind}.{fmt}"
    qemu_img("convert", "-f", "raw", "-O", fmt, *options, str(raw), str(out))
    return DiskEndpoint(fmt, str(out))


def flip(path: Path, offset: int) -> None:
    """Change one byte of a raw file or device, durably."""
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([old[0] ^ 0x5A]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def device_volume(dev: Path) -> Volume:
    return Volume("dev", dev, "raw", is_block=True)


def write_device(src: DiskEndpoint, dev: Path, filler: bytes = b"\xee") -> None:
    """The disk onto ``dev`` with qemu-img, like the convert stage; the device's tail keeps ``filler``."""
    fd = os.open(dev, os.O_RDONLY)
    size = os.lseek(fd, 0, os.SEEK_END)
    os.close(fd)
    with open(dev, "r+b") as handle:
        handle.write(filler * size)
    qemu_img("convert", "-n", "-f", src.fmt, "-O", "raw", src.filename, str(dev), pass_fds=src.fds)
    fd = os.open(dev, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def check(src: DiskEndpoint, volume: Volume, window: int | None) -> None:
    if window is None:
        convert.compare(src, volume, capacity=CAPACITY)
    else:
        verify.compare(src.fmt, src.filename, volume.path, volume.fmt, capacity=CAPACITY,
                       is_block=volume.is_block, window=window, pass_fds=src.fds)


@pytest.mark.parametrize("window", [None, 64 * KiB], ids=["default window", "64 KiB windows"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_one_flipped_byte_on_a_loop_device_fails(kind, window, tmp_path):
    src = source(tmp_path, kind)
    # one MiB larger than the disk (an LV rounded up): what lies beyond the disk is not compared
    with loop_device(tmp_path / "dev.img", CAPACITY + MiB) as dev:
        write_device(src, dev)
        check(src, device_volume(dev), window)
        for where, offset in POSITIONS.items():
            flip(dev, offset)
            with pytest.raises(VerifyError) as caught:
                check(src, device_volume(dev), window)
            assert "differs from the source" in caught.value.message, where
            if kind != "stream":  # qemu-img compare (compressed source) does not say where
                assert f"at byte {offset}" in caught.value.message, where
            flip(dev, offset)  # back as it was: the next position is the only difference
        check(src, device_volume(dev), window)


def test_a_device_shorter_than_the_disk_fails(tmp_path):
    src = source(tmp_path, "flat")
    with loop_device(tmp_path / "dev.img", CAPACITY - 4 * KiB) as dev:
        with pytest.raises(VerifyError, match=f"is {CAPACITY - 4 * KiB} bytes, the source is {CAPACITY}"):
            convert.compare(src, device_volume(dev), capacity=CAPACITY)


def test_the_device_is_read_not_its_page_cache(tmp_path):
    """A change on the device that its page cache still hides is found: the verify reads the device
    itself (qemu-img compare's buffered reads got the cached, expected bytes and passed)."""
    src = source(tmp_path, "sparse")
    backing = tmp_path / "dev.img"
    with loop_device(backing, CAPACITY) as dev:
        holder = os.open(dev, os.O_RDONLY)  # keeps the device open, so its page cache is kept
        try:
            write_device(src, dev, filler=b"\0")
            assert len(os.pread(holder, CAPACITY, 0)) == CAPACITY  # every page cached
            flip(backing, IN_DATA)  # under the loop device, past its page cache
            assert os.pread(holder, 1, IN_DATA) == raw_disk(tmp_path / "again.raw")[IN_DATA:IN_DATA + 1]
            with pytest.raises(VerifyError, match=f"differs from the source at byte {IN_DATA}"):
                convert.compare(src, device_volume(dev), capacity=CAPACITY)
        finally:
            os.close(holder)


@pytest.mark.parametrize("kind", ["flat", "stream"])
def test_raw_file_target(kind, tmp_path):
    src = source(tmp_path, kind)
    target = tmp_path / "target.raw"
    qemu_img("convert", "-f", src.fmt, "-O", "raw", src.filename, str(target))
    volume = Volume("file", target, "raw")
    convert.compare(src, volume, capacity=CAPACITY)
    for offset in POSITIONS.values():
        flip(target, offset)
        with pytest.raises(VerifyError, match="differs from the source"):
            convert.compare(src, volume, capacity=CAPACITY)
        flip(target, offset)
    os.truncate(target, CAPACITY + 512)  # a file must be exactly the disk, even with zeros past it
    with pytest.raises(VerifyError, match=f"is {CAPACITY + 512} bytes, the source is {CAPACITY}"):
        convert.compare(src, volume, capacity=CAPACITY)
    os.truncate(target, CAPACITY - 512)
    with pytest.raises(VerifyError, match=f"is {CAPACITY - 512} bytes, the source is {CAPACITY}"):
        convert.compare(src, volume, capacity=CAPACITY)


@pytest.mark.parametrize("kind", ["sparse", "stream"])
def test_qcow2_file_target(kind, tmp_path):
    src = source(tmp_path, kind)
    target = tmp_path / "target.qcow2"
    qemu_img("convert", "-f", src.fmt, "-O", "qcow2", src.filename, str(target))
    volume = Volume("file", target, "qcow2")
    convert.compare(src, volume, capacity=CAPACITY)
    expected = raw_disk(tmp_path / "again.raw")
    for offset in POSITIONS.values():
        # through qemu: the guest-visible byte changes, whether a cluster was allocated there or not
        changed = expected[offset] ^ 0x5A
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {changed} {offset} 1", str(target)],
                       check=True, capture_output=True)
        with pytest.raises(VerifyError, match="differs from the source"):
            convert.compare(src, volume, capacity=CAPACITY)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {expected[offset]} {offset} 1",
                        str(target)], check=True, capture_output=True)
    convert.compare(src, volume, capacity=CAPACITY)
    qemu_img("resize", "-f", "qcow2", str(target), str(CAPACITY + MiB))
    with pytest.raises(VerifyError, match=f"is {CAPACITY + MiB} bytes, the source is {CAPACITY}"):
        convert.compare(src, volume, capacity=CAPACITY)


def test_a_source_of_another_size_fails(tmp_path):
    src = source(tmp_path, "sparse")
    with loop_device(tmp_path / "dev.img", 2 * CAPACITY) as dev:
        write_device(src, dev, filler=b"\0")
        with pytest.raises(VerifyError, match=f"the source reads as {CAPACITY} bytes, not the {2 * CAPACITY}"):
            convert.compare(src, device_volume(dev), capacity=2 * CAPACITY)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_every_sample_flavor_verifies_on_a_loop_device(flavor, tmp_path, manifest, source_of):
    image = inspect_disk(source_of(flavor).descriptor)
    src = qemu_source(image, tmp_path / "work")
    with loop_device(tmp_path / "dev.img", image.capacity) as dev:
        write_device(src, dev)
        convert.compare(src, device_volume(dev), capacity=image.capacity)
        last = image.capacity - 1  # the guest's last-sector marker lies there
        flip(dev, last)
        with pytest.raises(VerifyError, match="differs from the source"):
            convert.compare(src, device_volume(dev), capacity=image.capacity)


@pytest.mark.slow
def test_memory_stays_bounded_on_a_large_disk(tmp_path):
    """4 GiB with data at both ends, verified in a child process onto a loop device (the windowed
    reader) and as a raw file (qemu-img compare): its peak RSS stays well under 150 MB."""
    size = 4 << 30
    raw = tmp_path / "big.raw"
    with open(raw, "wb") as handle:
        handle.truncate(size)
        handle.write(os.urandom(MiB))
        handle.seek(size - MiB)
        handle.write(os.urandom(MiB))
    vmdk = tmp_path / "big.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", str(raw), str(vmdk))
    script = ("import sys; from pathlib import Path; from v2p import verify; "
              "verify.compare('vmdk', sys.argv[1], Path(sys.argv[2]), 'raw', capacity=int(sys.argv[3]), "
              "is_block=sys.argv[4] == 'block'); "
              # VmHWM is this program's own peak: ru_maxrss would also count the pytest process it
              # was forked from (Linux carries the pre-exec peak across execve).
              "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0])")

    def peak_kib(target: Path, kind: str) -> int:
        proc = subprocess.run([sys.executable, "-c", script, str(vmdk), str(target), str(size), kind],
                              check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        return int(proc.stdout.split()[-1])

    assert peak_kib(raw, "file") < 150_000
    with loop_device(tmp_path / "dev.img", size) as dev:
        qemu_img("convert", "-n", "-f", "raw", "-O", "raw", str(raw), str(dev))
        assert peak_kib(dev, "block") < 150_000


def test_where_o_direct_is_refused_the_cache_is_read(tmp_path):
    """A read O_DIRECT refuses (here: a buffer that is not page aligned) is done through the page
    cache instead, and still returns every byte, up to an end that is not block aligned."""
    target = tmp_path / "target.raw"
    expected = raw_disk(target)
    os.truncate(target, CAPACITY - 100)
    reader = verify.RawReader(target)
    unaligned = memoryview(bytearray(CAPACITY + 1))[1:]
    try:
        assert reader.read(0, 4096, unaligned) == [verify.Segment(0, 4096, False)]
        assert reader.read(4096, CAPACITY - 4196, unaligned[4096:]) == [verify.Segment(0, CAPACITY - 4196, False)]
    finally:
        reader.close()
    assert bytes(unaligned[:CAPACITY - 100]) == expected[:CAPACITY - 100]


def test_a_device_end_that_is_not_block_aligned(tmp_path):
    """The last window of a disk whose size is not a multiple of 4 KiB is read whole (O_DIRECT asks
    for whole blocks; past the end the read is only short)."""
    capacity = CAPACITY - 512
    raw = tmp_path / "odd.raw"
    expected = raw_disk(raw)[:capacity]
    os.truncate(raw, capacity)
    vmdk = tmp_path / "odd.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", str(raw), str(vmdk))
    src = DiskEndpoint("vmdk", str(vmdk))
    with loop_device(tmp_path / "dev.img", capacity) as dev:
        write_device(src, dev)
        with open(dev, "rb") as handle:
            assert handle.read() == expected
        convert.compare(src, device_volume(dev), capacity=capacity)
        flip(dev, capacity - 1)
        with pytest.raises(VerifyError, match=f"at byte {capacity - 1}"):
            convert.compare(src, device_volume(dev), capacity=capacity)


@pytest.mark.parametrize("where", ["raw file", "qcow2 file", "loop device"])
def test_the_compare_says_how_far_it_is(where, tmp_path):
    """Verify is a long step too: it reports the bytes compared so far, rising to the whole disk
    (qemu-img compare's own percent for files, each window on a device), and still fails on a difference."""
    src = source(tmp_path, "sparse")
    seen: list[int] = []
    with contextlib.ExitStack() as stack:
        if where == "loop device":
            dev = stack.enter_context(loop_device(tmp_path / "dev.img", CAPACITY))
            write_device(src, dev)
            volume, offset = device_volume(dev), IN_DATA
        else:
            fmt = where.split()[0]
            target = tmp_path / f"target.{fmt}"
            qemu_img("convert", "-f", src.fmt, "-O", fmt, src.filename, str(target))
            volume, offset = Volume("file", target, fmt), IN_DATA
        verify.compare(src.fmt, src.filename, volume.path, volume.fmt, capacity=CAPACITY, is_block=volume.is_block,
                       window=256 * KiB, pass_fds=src.fds, on_progress=seen.append)
        assert seen[-1] == CAPACITY and len(seen) > 2 and seen == sorted(seen), seen
        if volume.fmt == "raw":
            flip(volume.path, offset)
            with pytest.raises(VerifyError, match="differs from the source"):
                convert.compare(src, volume, capacity=CAPACITY, on_progress=seen.append)


def test_a_compare_qemu_img_cannot_do_is_one_line(tmp_path):
    """qemu-img compare's own error (exit 2), not a difference: its last line, named as such."""
    src = source(tmp_path, "stream")
    target = tmp_path / "target.qcow2"
    qemu_img("convert", "-f", src.fmt, "-O", "qcow2", src.filename, str(target))
    volume = Volume("file", target, "qcow2")
    with open(target, "r+b") as handle:  # past the header: its L1 table
        handle.seek(0x30000)
        handle.write(b"\xff" * 4096)
    with pytest.raises(VerifyError) as caught:
        convert.compare(src, volume, capacity=CAPACITY)
    assert caught.value.message.startswith(f"qemu-img compare could not compare {target}: ")
    assert "\n" not in caught.value.message
