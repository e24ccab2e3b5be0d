"""Nothing outside the target is written, deleted or read (issue 15, section 2).

Every folder v2p writes, renames or deletes under is opened without following
links and must be this user's and writable by nobody else; every file v2p
reads back from its folders is opened without following links or blocking,
checked to be a plain file of bounded size, then read. An adversary with a
link, a FIFO, a folder of their own or a loose mode gets a one-line refusal
naming the thing and the fix, never a write, a delete or a hang elsewhere.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import SAMPLES, V2P, assert_same_bytes, one_line_error
from test_resume import ARGS
from v2p.errors import TargetError
from v2p.storage import DirStorage

PRECIOUS = b"precious bytes that are not v2p's\n"
QUICK = [*ARGS, "--no-boot-check"]
NOBODY = 65534
HANG = 30  # seconds: a run that hangs on a FIFO fails the test instead of hanging it


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """Another folder on the host, with a VM folder and a file v2p never made."""
    folder = tmp_path / "victim"
    (folder / "120").mkdir(parents=True)
    (folder / "120" / "theirs.txt").write_bytes(PRECIOUS)
    return folder


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside.txt"
    path.write_bytes(PRECIOUS)
    return path


def assert_victim_intact(victim: Path) -> None:
    assert sorted(p.name for p in victim.iterdir()) == ["120"]
    assert sorted(p.name for p in (victim / "120").iterdir()) == ["theirs.txt"]
    assert (victim / "120" / "theirs.txt").read_bytes() == PRECIOUS


def migrated(v2p: V2P, src: Path) -> None:
    proc = v2p("migrate", str(src), *QUICK, timeout=HANG * 4)
    assert proc.returncode == 0, proc.stderr


# -- folders that are links, not ours, or writable by others ---------------------------------

@pytest.mark.parametrize("linked", ["images", "images/120"])
def test_migrate_refuses_a_linked_volume_folder(linked, manifest, source_of, v2p: V2P, victim: Path):
    src = source_of("monolithicSparse")
    link = v2p.target / linked
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim if linked == "images" else victim / "120")
    line = one_line_error(v2p("migrate", str(src.descriptor), *QUICK))
    assert f"{v2p.target / linked} is a symbolic link, not a folder: refused" in line
    assert_victim_intact(victim)


@pytest.mark.parametrize("linked", ["images", "run"])
def test_vm_rm_never_deletes_through_a_linked_folder(linked, manifest, source_of, v2p: V2P, victim: Path):
    src = source_of("monolithicSparse")
    migrated(v2p, src.descriptor)
    folder = v2p.target / linked
    if folder.exists():  # images/: the VM's disks move aside, the name becomes a link
        folder.rename(folder.with_name(f"{linked}.real"))
    folder.symlink_to(victim)
    line = one_line_error(v2p("vm", "rm", "120"))
    assert f"{folder} is a symbolic link, not a folder: refused" in line
    assert_victim_intact(victim)


def test_target_folder_of_another_user_is_refused(manifest, source_of, v2p: V2P, victim: Path):
    """Their folder, with their ``images`` link in it: v2p writes nothing there."""
    src = source_of("monolithicSparse")
    v2p.target.mkdir()
    (v2p.target / "images").symlink_to(victim)
    os.chown(v2p.target, NOBODY, NOBODY)
    os.lchown(v2p.target / "images", NOBODY, NOBODY)
    line = one_line_error(v2p("migrate", str(src.descriptor), *QUICK))
    assert f"{v2p.target} belongs to uid {NOBODY}, not to this user: refused" in line
    assert f"chown {os.geteuid()} {v2p.target}" in line
    assert_victim_intact(victim)
    assert sorted(p.name for p in v2p.target.iterdir()) == ["images"]


@pytest.mark.parametrize("folder", ["", "images", "images/120", "qemu-server", "migrations"])
def test_folder_others_can_write_to_is_refused(folder, manifest, source_of, v2p: V2P):
    src = source_of("monolithicSparse")
    where = v2p.target / folder if folder else v2p.target
    where.mkdir(parents=True)
    os.chmod(where, 0o777 if folder else 0o757)  # o+w (the target root may keep its group/other read)
    line = one_line_error(v2p("migrate", str(src.descriptor), *QUICK))
    assert f"{where} can be written to by other users: refused" in line
    assert f"chmod go-w {where}" in line
    assert not v2p.disk(120).exists()


def test_folders_are_private_and_volumes_0600(manifest, source_of, v2p: V2P):
    src = source_of("monolithicSparse")
    proc = v2p("migrate", str(src.descriptor), *ARGS, "--no-start")
    assert proc.returncode == 0, proc.stderr
    for folder in ("images", "images/120", "run", "run/120", "migrations", "qemu-server"):
        assert stat.S_IMODE(os.lstat(v2p.target / folder).st_mode) == 0o700, folder
    assert stat.S_IMODE(os.lstat(v2p.disk(120)).st_mode) == 0o600


def test_link_at_the_partial_name_is_never_written_through(manifest, source_of, v2p: V2P, outside: Path):
    """What an attacker with write access to ``images/120`` plants: v2p refuses such a folder,
    and in its own folder a link at the temporary name is replaced by a new private file."""
    src = source_of("monolithicSparse")
    folder = v2p.target / "images" / "120"
    folder.mkdir(parents=True)
    partial = folder / ".vm-120-disk-0.qcow2.v2p-partial"
    partial.symlink_to(outside)
    os.chmod(folder, 0o777)
    line = one_line_error(v2p("migrate", str(src.descriptor), *QUICK))
    assert f"chmod go-w {folder}" in line
    assert outside.read_bytes() == PRECIOUS
    os.chmod(folder, 0o700)
    migrated(v2p, src.descriptor)
    assert outside.read_bytes() == PRECIOUS
    assert_same_bytes(SAMPLES / "guest.raw", v2p.disk(120))


def test_partial_volume_is_created_new_and_private(tmp_path: Path, outside: Path):
    storage = DirStorage("local", {"path": str(tmp_path / "store")})
    final = storage.volume(120, 0, "qcow2")
    final.path.parent.mkdir(parents=True)
    partial_path = storage.volume(120, 0, "qcow2", partial=True).path
    partial_path.symlink_to(outside)
    final.path.symlink_to(outside)
    assert not storage.exists(final)  # a link at a volume's name is not a volume
    partial = storage.allocate(120, 0, "qcow2", 1 << 20)
    info = os.lstat(partial.path)
    assert stat.S_ISREG(info.st_mode) and info.st_size == 0 and stat.S_IMODE(info.st_mode) == 0o600
    assert not os.path.lexists(final.path)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(partial.path), "1M"], check=True)
    storage.commit(partial, final)
    assert storage.exists(final) and not os.path.lexists(partial.path)
    assert outside.read_bytes() == PRECIOUS


# -- files at the names of v2p's records: FIFOs, folders, links to devices ---------------------

def record_paths(target: Path) -> dict[str, Path]:
    return {"state": target / "migrations" / "120.json", "storage.cfg": target / "storage.cfg",
            "config": target / "qemu-server" / "120.conf"}


def plant_fifo(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)


@pytest.mark.parametrize("which", ["state", "storage.cfg", "config"])
def test_fifo_at_a_record_name_never_hangs(which, manifest, source_of, v2p: V2P):
    src = source_of("monolithicSparse")
    path = record_paths(v2p.target)[which]
    plant_fifo(path)
    migrate = v2p("migrate", str(src.descriptor), *QUICK, timeout=HANG)
    if which == "config":  # something holds the VMID's config name: taken, said in one line
        assert "VMID 120 already exists" in one_line_error(migrate)
    else:
        assert f"{path} is a FIFO (named pipe), not a file v2p wrote: refused" in one_line_error(migrate)
    status = v2p("status", timeout=HANG)
    assert "Traceback" not in status.stderr
    if which == "state":
        assert status.returncode == 5 and f"{path} is a FIFO (named pipe)" in status.stdout
    removed = v2p("vm", "rm", "120", timeout=HANG)
    if which == "config":
        line = one_line_error(removed)
        assert f"{path} is a FIFO (named pipe), not a file v2p wrote: refused" in line
        assert f"remove it by hand (rm {path})" in line
    elif which == "state":  # v2p's own record name: removed without being opened
        assert removed.returncode == 0, removed.stderr
        assert not os.path.lexists(path)
    else:
        assert "does not exist on the local target and has no migration record" in one_line_error(removed)


@pytest.mark.parametrize("which", ["state", "storage.cfg", "config"])
def test_link_to_dev_zero_at_a_record_name_is_refused(which, manifest, source_of, v2p: V2P):
    src = source_of("monolithicSparse")
    path = record_paths(v2p.target)[which]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to("/dev/zero")
    if which == "config":
        line = one_line_error(v2p("vm", "show", "120", timeout=HANG))
    else:
        line = one_line_error(v2p("migrate", str(src.descriptor), *QUICK, timeout=HANG))
    assert f"{path} is a symbolic link, not a file v2p wrote: refused" in line
    assert "MemoryError" not in line


def test_state_file_too_big_is_refused(manifest, source_of, v2p: V2P):
    src = source_of("monolithicSparse")
    path = record_paths(v2p.target)["state"]
    path.parent.mkdir(parents=True)
    with open(path, "wb") as handle:
        handle.truncate(64 << 20)  # sparse: no room taken
    line = one_line_error(v2p("migrate", str(src.descriptor), *QUICK, timeout=HANG))
    assert f"{path} is {64 << 20} bytes, more than v2p ever writes there" in line
    removed = v2p("vm", "rm", "120")
    assert removed.returncode == 0, removed.stderr


def test_empty_folder_at_the_state_name_is_cleaned_up(manifest, source_of, v2p: V2P):
    src = source_of("monolithicSparse")
    path = record_paths(v2p.target)["state"]
    path.mkdir(parents=True)
    line = one_line_error(v2p("migrate", str(src.descriptor), *QUICK))
    assert f"{path} is a folder, not a file v2p wrote: refused" in line
    assert "v2p vm rm 120" in line
    removed = v2p("vm", "rm", "120")
    assert removed.returncode == 0, removed.stderr
    assert not os.path.lexists(path)
    migrated(v2p, src.descriptor)


def test_folder_with_things_at_the_state_name_is_left_and_named(manifest, source_of, v2p: V2P, victim: Path):
    """``vm rm`` removes what v2p made (the VM, its volumes) and names what it leaves to the user."""
    src = source_of("monolithicSparse")
    migrated(v2p, src.descriptor)
    dance = v2p.target / "migrations" / "120.dance.json"
    dance.mkdir()
    (dance / "theirs.txt").write_bytes(PRECIOUS)
    line = one_line_error(v2p("vm", "rm", "120"))
    assert f"{dance} is a folder, not a file v2p wrote: refused" in line
    assert f"remove it by hand (rm -r {dance})" in line
    assert (dance / "theirs.txt").read_bytes() == PRECIOUS
    assert not v2p.disk(120).exists() and not (v2p.target / "qemu-server" / "120.conf").exists()
    assert not (v2p.target / "migrations" / "120.json").exists()


def test_read_small_refuses_what_is_not_a_small_plain_file(tmp_path: Path):
    from v2p.fsutil import read_small  # the one reader of v2p's own small files

    plain = tmp_path / "plain"
    plain.write_bytes(b"x" * 10)
    assert read_small(plain) == b"x" * 10
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(plain)
    cases = {fifo: "is a FIFO (named pipe)", link: "is a symbolic link", tmp_path: "is a folder",
             plain: "is 10 bytes, more than"}
    for path, words in cases.items():
        with pytest.raises(TargetError, match=re.escape(f"{path} {words}")):
            read_small(path, limit=5)
    with pytest.raises(FileNotFoundError):
        read_small(tmp_path / "missing")


@pytest.mark.parametrize("linked", ["migrations", "qemu-server"])
def test_listing_never_reads_through_a_linked_folder(linked, manifest, source_of, v2p: V2P, tmp_path: Path):
    """``status`` and ``vm list`` list v2p's own folders only: another folder's records are not shown."""
    src = source_of("monolithicSparse")
    migrated(v2p, src.descriptor)
    folder = v2p.target / linked
    folder.rename(tmp_path / "elsewhere")
    folder.symlink_to(tmp_path / "elsewhere")
    command = ("status",) if linked == "migrations" else ("vm", "list")
    line = one_line_error(v2p(*command))
    assert f"{folder} is a symbolic link, not a folder: refused" in line


def test_storage_folders_keep_their_modes_and_a_sticky_root_is_accepted(tmp_path: Path):
    """A storage's existing folders may be PVE's (0755): v2p checks them but leaves their modes;
    a sticky shared folder (like /tmp) may hold the target, a plain world-writable one may not."""
    root = tmp_path / "vz"
    (root / "images" / "120").mkdir(parents=True)
    for folder in (root / "images", root / "images" / "120"):
        os.chmod(folder, 0o755)
    storage = DirStorage("local", {"path": str(root)})
    partial = storage.allocate(120, 0, "raw", 1 << 20)
    assert stat.S_IMODE(os.stat(root / "images").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(root / "images" / "120").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(partial.path).st_mode) == 0o600
    storage.allocate(121, 0, "raw", 1 << 20)
    assert stat.S_IMODE(os.stat(root / "images" / "121").st_mode) == 0o700  # what v2p makes is private
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    DirStorage("s", {"path": str(shared)}).allocate(120, 0, "raw", 1 << 20)
    os.chmod(shared, 0o777)
    with pytest.raises(TargetError, match=re.escape(f"chmod go-w {shared}")):
        DirStorage("s", {"path": str(shared)}).allocate(120, 0, "raw", 1 << 20)
