"""Links and odd names planted in the target folder: v2p never writes through a
link, keeps its own files private, and skips names that are not VMIDs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from conftest import SAMPLES, V2P, assert_same_bytes, one_line_error
from test_resume import ARGS

PRECIOUS = b"precious data outside the target folder\n"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside.txt"
    path.write_bytes(PRECIOUS)
    return path


def plant(link: Path, to: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(to)


def test_lock_file_link_is_refused_and_not_followed(manifest, source_of, v2p: V2P, outside: Path):
    src = source_of("monolithicSparse")
    lock = v2p.target / "migrations" / "120.lock"
    plant(lock, outside)
    line = one_line_error(v2p("migrate", str(src.descriptor), *ARGS))
    assert f"{lock} is a symbolic link: refused" in line
    line = one_line_error(v2p("vm", "rm", "120"))
    assert f"{lock} is a symbolic link: refused" in line
    assert outside.read_bytes() == PRECIOUS


def test_lock_file_fifo_is_refused_without_hanging(manifest, source_of, v2p: V2P):
    src = source_of("monolithicSparse")
    lock = v2p.target / "migrations" / "120.lock"
    lock.parent.mkdir(parents=True)
    os.mkfifo(lock)
    line = one_line_error(v2p("migrate", str(src.descriptor), *ARGS, timeout=20))
    assert f"{lock} is a FIFO (named pipe), not v2p's lock file: refused" in line


def test_hard_linked_lock_file_is_refused(manifest, source_of, v2p: V2P, outside: Path):
    src = source_of("monolithicSparse")
    lock = v2p.target / "migrations" / "120.lock"
    lock.parent.mkdir(parents=True)
    os.link(outside, lock)
    line = one_line_error(v2p("migrate", str(src.descriptor), *ARGS))
    assert "not v2p's lock file: refused" in line
    assert outside.read_bytes() == PRECIOUS


def test_fixed_temporary_names_are_never_written_through(manifest, source_of, v2p: V2P, outside: Path):
    """The names the old v2p wrote to: planted links there are left alone (v2p's temporaries are random)."""
    src = source_of("twoGbMaxExtentSparse")  # a descriptor: v2p writes its own into the work folder
    work = v2p.target / "migrations" / "120.work"
    for name in ("source.tmp", "source.vmdk", "zeros.raw"):
        plant(work / name, outside)
    plant(v2p.target / "qemu-server" / ".120.conf.tmp", outside)
    plant(v2p.target / ".storage.cfg.tmp", outside)
    plant(v2p.target / "migrations" / ".120.json.tmp", outside)
    proc = v2p("migrate", str(src.descriptor), *ARGS)
    assert proc.returncode == 0, proc.stderr
    assert_same_bytes(SAMPLES / "guest.raw", v2p.disk(120))
    added = v2p("storage", "add", "extra", "--type", "dir", "--path", str(v2p.target / "extra"))
    assert added.returncode == 0, added.stderr
    assert outside.read_bytes() == PRECIOUS
    assert "extra" in (v2p.target / "storage.cfg").read_text()
    assert not stat.S_ISLNK(os.lstat(v2p.target / "qemu-server" / "120.conf").st_mode)


def test_work_folder_link_is_refused(manifest, source_of, v2p: V2P, tmp_path: Path):
    src = source_of("twoGbMaxExtentSparse")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    plant(v2p.target / "migrations" / "120.work", elsewhere)
    line = one_line_error(v2p("migrate", str(src.descriptor), *ARGS))
    assert "120.work is a symbolic link, not a folder: refused" in line
    assert list(elsewhere.iterdir()) == []
    assert elsewhere.is_dir()


def test_target_folder_files_are_private(manifest, source_of, v2p: V2P):
    src = source_of("twoGbMaxExtentSparse")
    proc = v2p("migrate", str(src.descriptor), *ARGS, V2P_TEST_HOLD_AFTER="")
    assert proc.returncode == 0, proc.stderr
    for folder in ("migrations", "qemu-server"):
        assert stat.S_IMODE(os.stat(v2p.target / folder).st_mode) == 0o700, folder
    for path in ("migrations/120.json", "migrations/120.lock", "qemu-server/120.conf"):
        assert stat.S_IMODE(os.stat(v2p.target / path).st_mode) == 0o600, path


def test_names_that_are_not_vmids_are_skipped(manifest, source_of, v2p: V2P):
    src = source_of("monolithicSparse")
    assert v2p("migrate", str(src.descriptor), *ARGS).returncode == 0
    for name in ("²", "١٠٠", "0100", "99", "1_000", "+100"):
        (v2p.target / "migrations" / f"{name}.json").write_text("{}")
        (v2p.target / "qemu-server" / f"{name}.conf").write_text("name: x\n")
    status = v2p("status")
    assert status.returncode == 0, status.stderr
    shown = [line for line in status.stdout.splitlines() if line.startswith("VMID")]
    assert len(shown) == 1 and shown[0].startswith(f"VMID 120: {src.descriptor} — finished; boot: up ("), shown
    listed = v2p("vm", "list")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["VMID", "120"]


def test_run_folder_links_are_never_written_through(manifest, source_of, v2p: V2P, outside: Path):
    """QEMU and its logs open these by name: links planted there are replaced, not followed."""
    src = source_of("monolithicSparse")
    for name in ("serial.log", "firmware.log", "qemu.log", "qemu.pid"):
        plant(v2p.target / "run" / "120" / name, outside)
    proc = v2p("migrate", str(src.descriptor), *ARGS)
    assert proc.returncode == 0, proc.stderr
    assert outside.read_bytes() == PRECIOUS
    assert "v2p-guest: boot controller=virtio-scsi" in v2p.serial(120)
    assert stat.S_IMODE(os.stat(v2p.target / "run" / "120").st_mode) == 0o700
