"""What v2p refuses up front because qemu-img could not take it, and how it names
files that are not what a disk is made of (issue 8, items 9 and 14).

* extents: at most ``MAX_EXTENTS`` a chain (qemu-img opens every one at once,
  in time growing with the square of their number), within ``ulimit -n``, each
  path at most 511 bytes, the descriptor v2p writes for qemu-img under 1 MiB;
  checking them is linear (each file resolved and stat'ed once);
* a file name with a line break, or a FIFO where a disk file should be, is
  refused at inspect in the user's words.

Each limit is checked against the real qemu-img too, so the number is not a guess.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
from pathlib import Path

import pytest

import vmdkgen
from conftest import ROOT, V2P, one_line_error
from v2p.errors import SourceError
from v2p.inspect import inspect_disk, vmdk


def descriptor(path: Path, create_type: str, lines: list[str], *, cid: str = "0badcafe",
               parent: str = "ffffffff", extra: str = "") -> Path:
    # No blank line: qemu's sscanf skips one and reads the next extent line twice.
    head = ["# Disk DescriptorFile", "version=1", f"CID={cid}", f"parentCID={parent}",
            f'createType="{create_type}"', *([extra] if extra else [])]
    path.write_text("\n".join(head + lines) + "\n")
    return path


def flat_split(folder: Path, data: bytes, pieces: int, name: str = "disk") -> Path:
    """A twoGbMaxExtentFlat disk of ``pieces`` extent files holding ``data``."""
    folder.mkdir(parents=True, exist_ok=True)
    size = len(data) // pieces
    lines = []
    for index in range(pieces):
        fname = f"{name}-f{index + 1:03d}.vmdk"
        (folder / fname).write_bytes(data[index * size:(index + 1) * size])
        lines.append(f'RW {size // 512} FLAT "{fname}" 0')
    return descriptor(folder / f"{name}.vmdk", "twoGbMaxExtentFlat", lines)


def qemu_img(*args: str, nofile: int | None = None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, preexec_fn=limit, timeout=120)


# --- item 9: many extents ---------------------------------------------------------------


def test_65000_one_sector_extents_are_refused_at_once_with_the_reason(tmp_path, v2p: V2P, opened):
    """At once: before any extent file is opened (bench/speed_claims.py times it)."""
    folder = tmp_path / "vm"
    folder.mkdir()
    (folder / "f").write_bytes(bytes(510) + b"\x55\xaa")
    path = descriptor(folder / "many.vmdk", "vmfs", ['RW 1 VMFS "f"'] * 65_000)
    assert 900_000 < path.stat().st_size < vmdk.MAX_DESCRIPTOR
    opened.clear()  # what the test itself wrote
    with pytest.raises(SourceError, match="the disk has 65000 extents"):
        inspect_disk(path)
    assert str(folder / "f") not in opened
    line = one_line_error(v2p("migrate", str(path), "--vmid", "181"))
    assert "many.vmdk" in line and "65000 extents" in line and f"at most {vmdk.MAX_EXTENTS}" in line
    assert "qemu-img opens every one at once" in line


def test_checking_extents_is_linear(tmp_path, opened):
    """The largest disk v2p takes is checked in well under a second (each file resolved once; the
    seconds are bench/speed_claims.py's): it opens no more files than a one-extent disk does."""
    folder = tmp_path / "vm"
    folder.mkdir()
    (folder / "f").write_bytes(bytes(vmdk.MAX_EXTENTS * 512))
    lines = [f'RW 1 FLAT "f" {i}' for i in range(vmdk.MAX_EXTENTS)]
    path = descriptor(folder / "max.vmdk", "monolithicFlat", lines)
    one = descriptor(folder / "one.vmdk", "monolithicFlat", lines[:1])
    opened.clear()
    inspect_disk(one, check_boot=False)
    for_one = [name for name in opened if name.startswith(f"{folder}/")]
    opened.clear()
    image = inspect_disk(path, check_boot=False)
    for_max = [name for name in opened if name.startswith(f"{folder}/")]
    assert len(for_max) == len(for_one) and str(folder / "f") not in for_max, for_max
    assert len(image.extents) == vmdk.MAX_EXTENTS
    too_many = descriptor(folder / "over.vmdk", "monolithicFlat", [*lines, lines[0]])
    with pytest.raises(SourceError, match=f"the disk has {vmdk.MAX_EXTENTS + 1} extents"):
        inspect_disk(too_many, check_boot=False)


def test_the_limit_counts_the_whole_snapshot_chain(tmp_path):
    """qemu-img opens the extents of every link at once: 1,100 above 1,100 is too many."""
    folder = tmp_path / "vm"
    folder.mkdir()
    (folder / "f").write_bytes(bytes(1100 * 512))
    lines = [f'RW 1 FLAT "f" {i}' for i in range(1100)]
    descriptor(folder / "base.vmdk", "twoGbMaxExtentFlat", lines, cid="0000000a")
    top = descriptor(folder / "top.vmdk", "twoGbMaxExtentFlat", lines, cid="0000000b", parent="0000000a",
                     extra='parentFileNameHint="base.vmdk"')
    inspect_disk(folder / "base.vmdk", check_boot=False)
    with pytest.raises(SourceError, match="the disk has 2200 extents \\(snapshot chain included\\)"):
        inspect_disk(top, check_boot=False)


@pytest.mark.usefixtures("v2p_process")  # its own ulimit -n
def test_a_disk_qemu_img_cannot_open_under_ulimit_n_is_refused_by_v2p(tmp_path):
    folder = tmp_path / "vm"
    data = random.Random(9).randbytes(300 * 4096)
    path = flat_split(folder, data, 300)
    # the contract: qemu-img holds a file open per extent, and fails past the limit
    proc = qemu_img("info", "-f", "vmdk", str(path), nofile=256)
    assert proc.returncode != 0 and "Too many open files" in proc.stderr
    assert qemu_img("info", "-f", "vmdk", str(path), nofile=512).returncode == 0
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)); "
            "from v2p.cli import main; sys.exit(main(['inspect', sys.argv[1]]))")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    # 300 extents and a descriptor, opened by qemu-img and handed to it pinned (see pinned.py)
    assert "qemu-img would hold 602 files open at once" in proc.stdout + proc.stderr
    assert "ulimit -n is 256" in proc.stdout + proc.stderr


def test_a_few_hundred_extents_migrate_byte_exact(tmp_path, v2p: V2P):
    data = random.Random(300).randbytes(300 * 16384)
    path = flat_split(tmp_path / "vm", data, 300)
    proc = v2p("migrate", str(path), "--vmid", "182", "--format", "raw", "--no-boot-check")
    assert proc.returncode == 0, proc.stderr
    assert v2p.disk(182, "raw").read_bytes() == data


def test_split_samples_still_inspect(manifest, samples):
    for flavor in ("twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        entry = manifest["flavors"][flavor]
        image = inspect_disk(samples / entry["dir"] / Path(entry["descriptor"]).name)
        assert image.flavor == flavor and image.boot_signature == "mbr"


def test_a_hundred_sparse_extents_migrate_byte_exact(tmp_path, v2p: V2P):
    """twoGbMaxExtentSparse as VMware splits it, in a hundred hosted-sparse extents qemu-img wrote."""
    folder = tmp_path / "vm"
    folder.mkdir()
    rng = random.Random(100)
    piece = 128 << 10
    data = b"".join(rng.randbytes(piece) if index % 3 else bytes(piece) for index in range(100))
    lines = []
    for index in range(100):
        raw = folder / "piece.raw"
        raw.write_bytes(data[index * piece:(index + 1) * piece])
        fname = f"disk-s{index + 1:03d}.vmdk"
        qemu_img("convert", "-f", "raw", "-O", "vmdk", str(raw), str(folder / fname)).check_returncode()
        lines.append(f'RW {piece // 512} SPARSE "{fname}"')
    (folder / "piece.raw").unlink()
    path = descriptor(folder / "disk.vmdk", "twoGbMaxExtentSparse", lines)
    assert len(inspect_disk(path, check_boot=False).extents) == 100
    proc = v2p("migrate", str(path), "--vmid", "188", "--format", "raw", "--no-boot-check")
    assert proc.returncode == 0, proc.stderr
    assert v2p.disk(188, "raw").read_bytes() == data


def test_an_extent_path_longer_than_qemu_reads_is_refused(tmp_path, v2p: V2P):
    folder = tmp_path / ("a" * 200) / ("b" * 200)
    folder.mkdir(parents=True)
    fname = "c" * (vmdk.QEMU_PATH_MAX - len(os.fsencode(folder)))  # one byte too long with the "/"
    (folder / fname).write_bytes(bytes(510) + b"\x55\xaa")
    path = descriptor(folder / "d.vmdk", "monolithicFlat", [f'RW 1 FLAT "{fname}" 0'])
    # the contract: qemu-img cuts an extent path at 511 bytes
    absolute = descriptor(tmp_path / "abs.vmdk", "monolithicFlat", [f'RW 1 FLAT "{folder / fname}" 0'])
    assert "Invalid extent line" in qemu_img("info", "-f", "vmdk", str(absolute)).stderr
    line = one_line_error(v2p("migrate", str(path), "--vmid", "183"))
    assert f"has a {vmdk.QEMU_PATH_MAX + 1}-byte path" in line and "at most 511" in line
    assert "move the VM folder to a shorter path" in line


def test_a_descriptor_qemu_img_would_read_only_in_part_is_refused(tmp_path):
    # the contract: qemu reads the first 1 MiB - 1 bytes of a descriptor, and silently drops the rest
    (tmp_path / "f").write_bytes(bytes(2 * 512))
    padded = descriptor(tmp_path / "padded.vmdk", "monolithicFlat",
                        ['RW 1 FLAT "f" 0', "#" * (1 << 20), 'RW 1 FLAT "f" 1'])
    info = json.loads(qemu_img("info", "--output=json", "-f", "vmdk", str(padded)).stdout)
    assert info["virtual-size"] == 512  # one extent of two
    # 2,000 extents whose absolute paths take 505 bytes each make v2p's own descriptor 1.06 MB
    folder = tmp_path / ("a" * 200) / ("b" * 200)
    folder.mkdir(parents=True)
    fname = "c" * (vmdk.QEMU_PATH_MAX - 7 - len(os.fsencode(folder)))
    (folder / fname).write_bytes(bytes(2000 * 512))
    path = descriptor(folder / "d.vmdk", "monolithicFlat", [f'RW 1 FLAT "{fname}" {i}' for i in range(2000)])
    with pytest.raises(SourceError, match=f"qemu-img reads at most {vmdk.QEMU_DESCRIPTOR_MAX}"):
        inspect_disk(path, check_boot=False)


# --- item 14: line breaks and FIFOs ---------------------------------------------------------


def test_a_source_name_with_a_line_break_is_refused_at_inspect(tmp_path, v2p: V2P):
    folder = tmp_path / "vm"
    path = flat_split(folder, random.Random(1).randbytes(8192), 1, name="web\nserver")
    line = one_line_error(v2p("migrate", str(path), "--vmid", "184", "--no-boot-check"))
    assert "'" + str(path).replace("\n", "\\n") + "'" in line
    assert "a file name with a line break cannot go into a VM config or a qemu-img descriptor" in line
    assert "rename it" in line
    assert not (v2p.target / "qemu-server" / "184.conf").exists()


def test_an_extent_reached_through_a_name_with_a_line_break_is_refused_at_inspect(tmp_path, v2p: V2P):
    folder = tmp_path / "vm"
    flat_split(folder, random.Random(2).randbytes(8192), 1)
    os.rename(folder / "disk-f001.vmdk", folder / "disk\n-f001.vmdk")
    (folder / "disk-f001.vmdk").symlink_to("disk\n-f001.vmdk")
    line = one_line_error(v2p("migrate", str(folder / "disk.vmdk"), "--vmid", "185", "--no-boot-check"))
    assert "disk.vmdk: extent 'disk-f001.vmdk' is" in line and "disk\\n-f001.vmdk" in line
    assert "a file name with a line break cannot go into a VM config" in line


def test_a_parent_reached_through_a_name_with_a_line_break_is_refused(tmp_path):
    top, _expected = vmdkgen.make_chain(tmp_path / "vm", bytes(1 << 20), "vmfsSparse", {0: b"x" * 512})
    os.rename(top.parent / "disk.vmdk", top.parent / "dis\nk.vmdk")
    (top.parent / "disk.vmdk").symlink_to("dis\nk.vmdk")
    with pytest.raises(SourceError, match="parent 'disk.vmdk' is '.*dis\\\\nk.vmdk': a file name with a line"):
        inspect_disk(top, check_boot=False)


def test_a_fifo_parent_is_named_as_a_fifo(tmp_path, v2p: V2P):
    top, _expected = vmdkgen.make_chain(tmp_path / "vm", bytes(1 << 20), "vmfsSparse", {0: b"x" * 512})
    (top.parent / "disk.vmdk").unlink()
    os.mkfifo(top.parent / "disk.vmdk")
    line = one_line_error(v2p("migrate", str(top), "--vmid", "186", "--no-boot-check"))
    assert "disk-000001.vmdk: parent disk 'disk.vmdk' is a FIFO (named pipe), not a regular file" in line
    assert "missing" not in line


@pytest.mark.parametrize("kind", ["FLAT", "VMFSSPARSE"])
def test_a_fifo_extent_is_named_as_a_fifo(tmp_path, kind):
    top, _expected = vmdkgen.make_chain(tmp_path / "vm", bytes(1 << 20), "vmfsSparse", {0: b"x" * 512})
    extent = "disk-flat.vmdk" if kind == "FLAT" else "disk-000001-delta.vmdk"
    (top.parent / extent).unlink()
    os.mkfifo(top.parent / extent)
    with pytest.raises(SourceError, match=f"extent file '{extent}' is a FIFO \\(named pipe\\), not a regular"):
        inspect_disk(top, check_boot=False)


def test_a_fifo_source_and_a_fifo_in_a_folder_are_named_as_fifos(tmp_path, v2p: V2P):
    folder = tmp_path / "vm"
    folder.mkdir()
    os.mkfifo(folder / "disk.vmdk")
    line = one_line_error(v2p("migrate", str(folder / "disk.vmdk"), "--vmid", "187"))
    assert "disk.vmdk is a FIFO (named pipe), not a regular file" in line
    proc = v2p("inspect", "--json", str(folder))
    (row,) = json.loads(proc.stdout)
    assert row["verdict"] == "refused" and "is a FIFO (named pipe)" in row["reason"]
