"""Bad input and refused operations: one clear line, non-zero exit, no
traceback, nothing created, the source untouched."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import failing_after, one_line_error


def nothing_created(target: Path) -> bool:
    return not (target / "qemu-server").exists() and not (target / "images").exists()


def test_second_migrate_on_existing_vmid_is_refused(source_of, inproc):
    src = source_of("monolithicSparse")
    assert inproc("migrate", str(src.descriptor), "--vmid", "130", "--no-boot-check").returncode == 0
    config_before = inproc.config(130)
    # The same migration again is nothing to do (scripts and plans rerun what they asked for) ...
    again = inproc("migrate", str(src.descriptor), "--vmid", "130", "--no-boot-check")
    assert again.returncode == 0, again.stderr
    assert f"VM 130 was already migrated from {src.descriptor}" in again.stdout
    # ... other settings or another source onto that VMID are refused.
    changed = one_line_error(inproc("migrate", str(src.descriptor), "--vmid", "130", "--cores", "2"))
    assert "VMID 130 already exists" in changed and "--cores" in changed
    other = source_of("esxi")
    line = one_line_error(inproc("migrate", str(other.descriptor), "--vmid", "130"))
    assert "VMID 130 already exists" in line and "v2p vm rm 130" in line
    assert inproc.config(130) == config_before


def test_vmid_taken_by_a_vm_v2p_did_not_make_is_refused(source_of, inproc):
    (inproc.target / "qemu-server").mkdir(parents=True)
    (inproc.target / "qemu-server" / "131.conf").write_text("name: someone-else\nmemory: 1024\n")
    src = source_of("monolithicFlat")
    line = one_line_error(inproc("migrate", str(src.descriptor), "--vmid", "131"))
    assert "VMID 131 already exists" in line
    assert (inproc.target / "qemu-server" / "131.conf").read_text() == "name: someone-else\nmemory: 1024\n"


def test_missing_file(tmp_path, inproc):
    missing = tmp_path / "nope.vmdk"
    line = one_line_error(inproc("migrate", str(missing), "--vmid", "132"))
    assert f"{missing}: no such file" in line
    assert nothing_created(inproc.target)


def test_directory(tmp_path, inproc):
    folder = tmp_path / "vmfolder"
    folder.mkdir()
    line = one_line_error(inproc("migrate", str(folder), "--vmid", "133"))
    assert f"{folder}: a folder to migrate must hold exactly one .vmx (0 found)" in line
    assert nothing_created(inproc.target)


@pytest.mark.parametrize(("content", "what"), [
    (b"just some notes about the VM\n" * 40, "text"),
    (b"\x89PNG\r\n\x1a\n" + bytes(1016), "no boot sector, partition table or file system"),
    (bytes(4096), "no boot sector, partition table or file system"),
    (b"", "empty"),
    (b"\x00" * 700, "700 bytes"),
])
def test_non_disk_file(content, what, tmp_path, inproc):
    path = tmp_path / "notes.vmdk"
    path.write_bytes(content)
    line = one_line_error(inproc("migrate", str(path), "--vmid", "134"))
    assert str(path) in line and what in line and "not a disk image" in line
    assert nothing_created(inproc.target)
    assert path.read_bytes() == content


def test_unsafe_extent_path_is_refused_before_anything_is_created(tmp_path, inproc):
    folder = tmp_path / "vm"
    folder.mkdir()
    desc = folder / "evil.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\nRW 8 FLAT "../../../../etc/passwd" 0\n')
    line = one_line_error(inproc("migrate", str(desc), "--vmid", "135"))
    assert "leaves the image folder" in line
    assert nothing_created(inproc.target)


@pytest.mark.usefixtures("boots")
def test_disk_that_does_not_boot_fails_the_boot_check(tmp_path, inproc):
    # an ext2 file system on the bare disk: a data disk, no boot sector
    data = bytearray(1 << 20)
    data[1080:1082] = b"\x53\xef"
    blank = tmp_path / "data-flat.vmdk"
    blank.write_bytes(bytes(data))
    proc = inproc("migrate", str(blank), "--vmid", "136", "--boot-timeout", "20")
    line = one_line_error(proc)
    assert proc.returncode == 7
    assert "VM 136 did not boot: the firmware found nothing to boot" in line
    # the VM and its verified disk stay for inspection; the boot stage's record says it failed (a rerun
    # boots it again), the migration is unfinished
    state = inproc.state(136)
    assert state["stages"]["boot"]["result"]["outcome"] == "failed"
    assert state["failed"]["stage"] == "boot" and not state["finished"]


def test_verbose_shows_the_traceback(tmp_path, inproc):
    proc = inproc("-v", "migrate", str(tmp_path / "nope.vmdk"), "--vmid", "137")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "SourceError" in proc.stderr


def test_bad_option_values(source_of, inproc):
    src = source_of("monolithicSparse")
    line = one_line_error(inproc("migrate", str(src.descriptor), "--vmid", "138", "--memory", "1"))
    assert "--memory 1: must be a whole number from 16 to 4194304 MiB" in line


@pytest.mark.parametrize(("extra", "message"), [
    (["--name", "web\nvirtio5: /etc/shadow"], "is not a valid VM name"),
    (["--vmid", "-1"], "VMID -1 is out of range"),
    (["--vmid", "99"], "VMID 99 is out of range"),
    (["--copy-with", "dd", "--bwlimit", "100", "--format", "raw"], "--bwlimit does not apply to --copy-with dd"),
])
def test_bad_settings_are_refused_before_anything_is_made(extra, message, source_of, inproc):
    src = source_of("esxi")
    args = ["migrate", str(src.descriptor)] + ([] if "--vmid" in extra else ["--vmid", "139"]) + extra
    line = one_line_error(inproc(*args))
    assert message in line
    assert nothing_created(inproc.target)


def test_unusable_target_dir_is_one_line(tmp_path, source_of, inproc):
    afile = tmp_path / "afile"
    afile.write_text("x")
    src = source_of("esxi")
    inproc.target = afile
    line = one_line_error(inproc("migrate", str(src.descriptor), "--vmid", "140"))
    assert str(afile) in line


def test_a_resume_with_other_settings_names_the_real_flag_and_the_way_out(source_of, inproc, monkeypatch):
    """The hint of a failed Windows boot says "migrate it with its --os": the rerun with --os is a
    new migration, refused in the words the user typed (--os, not the keyword ostype) with the way out."""

    src = source_of("monolithicSparse")

    with failing_after("create"):
        failed = inproc("migrate", str(src.descriptor), "--vmid", "134", "--no-boot-check", "--keep-on-failure")
    assert failed.returncode != 0
    line = one_line_error(inproc("migrate", str(src.descriptor), "--vmid", "134", "--no-boot-check", "--os", "win7",
                                 "--cores", "2"))
    assert line == (f"v2p: error: VMID 134 has an unfinished migration of {src.descriptor} (it stopped in create) "
                    "with different settings: --cores not given then, 2 now; --os not given then, win7 now "
                    "(hint: to resume it, rerun it with the settings it started with; to start over with the new "
                    "ones, discard it (and the VM it made) first: v2p vm rm 134)")
    assert "ostype" not in line
    # The way out leads somewhere: after vm rm, the new settings migrate.
    assert inproc("vm", "rm", "134").returncode == 0
    again = inproc("migrate", str(src.descriptor), "--vmid", "134", "--no-boot-check", "--os", "win7")
    assert again.returncode == 0, again.stderr
    assert inproc.config(134)["ostype"] == "win7"
