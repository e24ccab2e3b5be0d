"""A source file swapped while v2p migrates it is never what gets read (issue 15, "source swapped mid-run").

The adversary owns the VM folder. After v2p inspected a disk (and again between its copy and
its comparison) they replace one of its files -- an extent, a whole .vmdk, a snapshot delta,
the base under a delta, an OVA, a raw or qcow2 disk -- with a symbolic link to a host file, or
with another regular file of the same size and mtime. The seam is the library's own event
stream: the swap happens in the ``on_event`` handler when a stage is reported done, so the
pipeline runs exactly as it does for a panel.

Whatever the case: every volume v2p leaves holds the ORIGINAL source's bytes, or the run is
refused in one line naming the file; the host file's bytes are never anywhere in the target.
Real qemu-img, real files and links. Also: a rerun after a swap between runs inspects again.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import v2p
import vmdkgen
from conftest import SAMPLES
from v2p import Event, local_target
from v2p.errors import SourceError, V2PError, VMIDExistsError

pytestmark = pytest.mark.slow  # each case migrates a disk end to end

pytestmark = pytest.mark.usefixtures("manifest")  # the sample images, built once per session

MiB = 1 << 20
SECRET = b"HOST-SECRET-BYTES"  # what the host file holds: it must never reach the target


def host_file(tmp_path: Path, size: int) -> Path:
    """A file outside the VM folder (think /etc/shadow, another tenant's disk) of ``size`` bytes."""
    path = tmp_path / "host" / "secret.bin"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes((SECRET * (size // len(SECRET) + 1))[:size])
    return path


def swap_for_link(victim: Path, tmp_path: Path) -> None:
    """``victim`` becomes a symbolic link to a host file of the same size (renamed over it: atomic)."""
    host = host_file(tmp_path, victim.stat().st_size)
    link = victim.with_name(victim.name + ".swap")
    link.symlink_to(host)
    os.replace(link, victim)


def swap_for_file(victim: Path, tmp_path: Path) -> None:
    """``victim`` becomes another regular file with the same size and mtime (only its inode tells)."""
    st = victim.stat()
    other = victim.with_name(victim.name + ".swap")
    data = bytearray(victim.read_bytes())
    # The attacker's content where the disk has data, the rest as it was: a valid file of the same kind.
    for at in range(0, len(data), 4096):
        if any(data[at:at + 512]) and at >= 4096 * 4:
            data[at:at + len(SECRET)] = SECRET
    other.write_bytes(bytes(data))
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, victim)


SWAPS: dict[str, Callable[[Path, Path], None]] = {"link": swap_for_link, "file": swap_for_file}


def consolidated(fmt: str, path: Path, out: Path) -> bytes:
    """What the disk reads as, by qemu-img's own reading of the untouched source."""
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out)], check=True,
                   capture_output=True)
    return out.read_bytes()


class Swapper:
    """An ``on_event`` handler that swaps ``victim`` once ``stage`` is reported done."""

    def __init__(self, stage: str, victim: Path, swap: Callable[[Path, Path], None], tmp_path: Path) -> None:
        self.stage, self.victim, self.swap, self.tmp_path = stage, victim, swap, tmp_path
        self.done = False

    def __call__(self, event: Event) -> None:
        if event.kind == "stage-done" and event.stage == self.stage and not self.done:
            self.swap(self.victim, self.tmp_path)
            self.done = True


def migrate(source: Path, target_dir: Path, handler: Callable[[Event], None], **options: object) -> V2PError | None:
    try:
        v2p.migrate(str(source), 150, target=local_target(target_dir), on_event=handler, boot_check=False,
                    fmt="raw", **options)
    except V2PError as exc:
        return exc
    return None


def assert_safe(error: V2PError | None, target_dir: Path, expected: list[bytes], victim: Path) -> None:
    """The original bytes on every disk, or a one-line refusal naming the file; the host's bytes nowhere."""
    for path in target_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert SECRET not in path.read_bytes(), f"the host file's bytes reached {path}"
    if error is not None:
        text = str(error)
        assert isinstance(error, SourceError) and "\n" not in text, text
        assert str(victim) in text or victim.name in text, text
        return
    images = target_dir / "images" / "150"
    for index, want in enumerate(expected):
        got = (images / f"vm-150-disk-{index}.raw").read_bytes()
        assert got == want, f"disk {index} does not hold the original source's bytes"


# --- the disks: (builder, the file swapped) ----------------------------------------------------

def _sample(flavor: str, victim: str) -> Callable[[Path], tuple[Path, Path, str]]:
    def build(folder: Path) -> tuple[Path, Path, str]:
        entry = {"monolithicSparse": "monolithicSparse", "monolithicFlat": "monolithicFlat",
                 "twoGbMaxExtentSparse": "twoGbMaxExtentSparse", "twoGbMaxExtentFlat": "twoGbMaxExtentFlat",
                 "streamOptimized": "streamOptimized", "esxi": "esxi"}[flavor]
        shutil.copytree(SAMPLES / entry, folder, copy_function=shutil.copy2)
        return folder / f"{entry}.vmdk", folder / victim, "vmdk"
    return build


def _chain(kind: vmdkgen.Kind, victim: str) -> Callable[[Path], tuple[Path, Path, str]]:
    def build(folder: Path) -> tuple[Path, Path, str]:
        folder.mkdir(parents=True)
        base = (SAMPLES / "guest.raw").read_bytes()[:4 * MiB]
        top, _want = vmdkgen.make_chain(folder, base, kind, {MiB + 100: b"\x5a" * 9000, 3 * MiB: b"\xa5" * 4096})
        return top, folder / victim, "vmdk"
    return build


def _plain(fmt: str) -> Callable[[Path], tuple[Path, Path, str]]:
    def build(folder: Path) -> tuple[Path, Path, str]:
        folder.mkdir(parents=True)
        disk = folder / f"disk.{fmt}"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(SAMPLES / "guest.raw"), str(disk)],
                       check=True, capture_output=True)
        return disk, disk, fmt
    return build


DISKS = {
    "monolithicFlat extent": _sample("monolithicFlat", "monolithicFlat-flat.vmdk"),
    "monolithicSparse file": _sample("monolithicSparse", "monolithicSparse.vmdk"),
    "twoGbMaxExtentFlat extent": _sample("twoGbMaxExtentFlat", "twoGbMaxExtentFlat-f001.vmdk"),
    "twoGbMaxExtentSparse extent": _sample("twoGbMaxExtentSparse", "twoGbMaxExtentSparse-s001.vmdk"),
    "streamOptimized file": _sample("streamOptimized", "streamOptimized.vmdk"),
    "vmfs flat extent": _sample("esxi", "esxi-flat.vmdk"),
    "vmfsSparse delta": _chain("vmfsSparse", "disk-000001-delta.vmdk"),
    "seSparse delta": _chain("seSparse", "disk-000001-sesparse.vmdk"),
    "base under a delta": _chain("seSparse", "disk-flat.vmdk"),
    "raw disk": _plain("raw"),
    "qcow2 disk": _plain("qcow2"),
}


@pytest.mark.parametrize("moment", ["inspect", "convert"], ids=["after inspect", "between convert and verify"])
@pytest.mark.parametrize("disk", list(DISKS))
def test_a_file_swapped_for_a_link_to_a_host_file_is_not_read(tmp_path: Path, disk: str, moment: str) -> None:
    source, victim, fmt = DISKS[disk](tmp_path / "vm")
    expected = consolidated(fmt, source, tmp_path / "expected.raw")
    handler = Swapper(moment, victim, swap_for_link, tmp_path)
    error = migrate(source, tmp_path / "target", handler)
    assert handler.done, "the swap never happened"
    assert_safe(error, tmp_path / "target", [expected], victim)


@pytest.mark.parametrize("disk", ["monolithicFlat extent", "twoGbMaxExtentSparse extent", "vmfsSparse delta",
                                  "qcow2 disk"])
def test_a_file_swapped_for_another_of_the_same_size_and_mtime_is_not_read(tmp_path: Path, disk: str) -> None:
    source, victim, fmt = DISKS[disk](tmp_path / "vm")
    expected = consolidated(fmt, source, tmp_path / "expected.raw")
    handler = Swapper("inspect", victim, swap_for_file, tmp_path)
    error = migrate(source, tmp_path / "target", handler)
    assert handler.done
    assert_safe(error, tmp_path / "target", [expected], victim)


@pytest.mark.parametrize("moment", ["inspect", "convert"])
def test_dd_reads_the_inspected_file_or_refuses(tmp_path: Path, moment: str) -> None:
    source, victim, fmt = DISKS["monolithicFlat extent"](tmp_path / "vm")
    expected = consolidated(fmt, source, tmp_path / "expected.raw")
    handler = Swapper(moment, victim, swap_for_link, tmp_path)
    error = migrate(source, tmp_path / "target", handler, copy_with="dd")
    assert handler.done
    assert_safe(error, tmp_path / "target", [expected], victim)


VMX = """\
.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "14"
displayName = "swap"
guestOS = "debian11-64"
memsize = "256"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "esxi.vmdk"
scsi0:1.present = "TRUE"
scsi0:1.fileName = "data.vmdk"
scsi0:2.present = "TRUE"
scsi0:2.fileName = "logs.vmdk"
"""


@pytest.mark.parametrize("moment", ["convert", "convert:2"], ids=["after disk 0 converted",
                                                                  "between disk 2's convert and verify"])
def test_the_reported_case_disk_2s_flat_extent_swapped_after_disk_0(tmp_path: Path, moment: str) -> None:
    """A .vmx with three disks; disk 2 is a descriptor and a -flat extent, replaced by a link to a host file."""
    folder = tmp_path / "vm"
    shutil.copytree(SAMPLES / "esxi", folder, copy_function=shutil.copy2)
    raws = [(SAMPLES / "guest.raw").read_bytes()]
    for index, name in enumerate(("data", "logs"), 1):
        raw = tmp_path / f"{name}.raw"
        raw.write_bytes(bytes([index]) * MiB + bytes(2 * MiB) + bytes([index + 7]) * MiB)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat",
                        str(raw), str(folder / f"{name}.vmdk")], check=True, capture_output=True)
        raws.append(raw.read_bytes())
    (folder / "swap.vmx").write_text(VMX)
    victim = folder / "logs-flat.vmdk"
    handler = Swapper(moment, victim, swap_for_link, tmp_path)
    error = migrate(folder / "swap.vmx", tmp_path / "target", handler)
    assert handler.done
    assert_safe(error, tmp_path / "target", raws, victim)


def test_an_ova_swapped_after_inspect_is_not_read(tmp_path: Path) -> None:
    """An OVA's streamOptimized member is read in place: the archive itself is what gets swapped."""
    from test_source_ovf import FIXTURES, fixture_raw

    (tmp_path / "vm").mkdir()
    ova = tmp_path / "vm" / "v2p-fixture.ova"
    shutil.copyfile(FIXTURES / "v2p-fixture.ova", ova)
    handler = Swapper("inspect", ova, swap_for_link, tmp_path)
    error = migrate(ova, tmp_path / "target", handler, networks={"VM Network": "vmbr0"})
    assert handler.done
    assert_safe(error, tmp_path / "target", [fixture_raw()], ova)


# --- between runs: the state file's fingerprint names the inode -------------------------------

def test_a_rerun_after_a_same_size_same_mtime_swap_inspects_again(tmp_path: Path) -> None:
    """Stopped after the copy; the extent is then replaced by another file of the same size and
    mtime. The rerun must not take the recorded inspection (and copy) for the new file."""
    source, victim, fmt = DISKS["monolithicFlat extent"](tmp_path / "vm")

    def stop(event: Event) -> None:
        if event.kind == "stage-done" and event.stage == "convert":
            raise KeyboardInterrupt  # the user's Ctrl-C: the run's records are kept for a resume

    target = tmp_path / "target"
    with pytest.raises(KeyboardInterrupt):
        v2p.migrate(str(source), 150, target=local_target(target), on_event=stop, boot_check=False, fmt="raw")
    swap_for_file(victim, tmp_path)
    now = consolidated(fmt, source, tmp_path / "now.raw")
    seen: list[Event] = []
    v2p.migrate(str(source), 150, target=local_target(target), on_event=seen.append, boot_check=False, fmt="raw")
    assert ("stage-start", "inspect") in [(e.kind, e.stage) for e in seen], "the recorded inspection was trusted"
    assert (target / "images" / "150" / "vm-150-disk-0.raw").read_bytes() == now


def test_a_finished_migration_whose_source_was_swapped_is_not_nothing_to_do(tmp_path: Path) -> None:
    source, victim, _fmt = DISKS["monolithicFlat extent"](tmp_path / "vm")
    target = tmp_path / "target"
    v2p.migrate(str(source), 150, target=local_target(target), boot_check=False, fmt="raw")
    swap_for_file(victim, tmp_path)
    with pytest.raises(VMIDExistsError, match="that source has changed since"):
        v2p.migrate(str(source), 150, target=local_target(target), boot_check=False, fmt="raw")


# --- nothing left open --------------------------------------------------------------------------

def test_the_pinned_files_are_let_go_after_the_migration(tmp_path: Path) -> None:
    source, _victim, _fmt = DISKS["twoGbMaxExtentSparse extent"](tmp_path / "vm")
    before = set(os.listdir("/proc/self/fd"))
    v2p.migrate(str(source), 150, target=local_target(tmp_path / "target"), boot_check=False, fmt="raw")
    time.sleep(0.1)
    leaked = [os.readlink(f"/proc/self/fd/{fd}") for fd in set(os.listdir("/proc/self/fd")) - before
              if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [p for p in leaked if str(tmp_path / "vm") in p], leaked


def test_a_split_disk_of_300_extents_under_a_low_soft_ulimit_is_pinned_whole(tmp_path: Path) -> None:
    """Every extent is held open (and handed to qemu-img besides the ones it opens): v2p makes room
    up to the hard limit, and the one extent swapped mid-run is still read as it was."""
    from test_inspect_limits import flat_split

    data = random.Random(15).randbytes(300 * 16384)
    source = flat_split(tmp_path / "vm", data, 300)
    victim = tmp_path / "vm" / "disk-f150.vmdk"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard ulimit -n ({hard}) leaves no room to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        handler = Swapper("inspect", victim, swap_for_link, tmp_path)
        error = migrate(source, tmp_path / "target", handler)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert error is None, error
    assert handler.done
    assert_safe(error, tmp_path / "target", [data], victim)


# --- the top file of a disk: a link only where the user named one -------------------------------

def test_a_vmx_disk_swapped_for_a_link_while_inspection_ran_is_refused(tmp_path: Path) -> None:
    """A .vmx's disk path is one v2p resolved (inside the folder, no link): a link found there by the
    inspection's own open (planted between the resolve and the open) is not followed into the copy."""
    from v2p.inspect import inspect_disk

    folder = tmp_path / "vm"
    folder.mkdir()
    disk = folder / "disk.raw"
    shutil.copyfile(SAMPLES / "guest.raw", disk)
    host = tmp_path / "host.raw"
    shutil.copyfile(SAMPLES / "guest.raw", host)  # a disk-like host file: inspection alone cannot tell
    swap = folder / "disk.swap"
    swap.symlink_to(host)
    os.replace(swap, disk)  # the race lost: the inspection below opens the link
    with pytest.raises(SourceError, match="disk.raw was replaced by a symbolic link after inspection") as info:
        inspect_disk(disk, link_ok=False)
    assert "\n" not in str(info.value)


def test_a_disk_the_user_names_through_a_link_still_migrates(tmp_path: Path) -> None:
    (tmp_path / "disks").mkdir()
    real = tmp_path / "disks" / "guest.raw"
    shutil.copyfile(SAMPLES / "guest.raw", real)
    named = tmp_path / "my-disk.raw"
    named.symlink_to(real)
    assert migrate(named, tmp_path / "target", lambda event: None) is None
    assert (tmp_path / "target" / "images" / "150" / "vm-150-disk-0.raw").read_bytes() == real.read_bytes()


def test_a_record_from_before_device_and_inode_were_kept_is_compared_on_what_it_holds(tmp_path: Path) -> None:
    """A finished migration recorded by an older v2p (size and mtime only): its rerun is still nothing to do."""
    import json

    source, _victim, _fmt = DISKS["monolithicFlat extent"](tmp_path / "vm")
    target = tmp_path / "target"
    v2p.migrate(str(source), 150, target=local_target(target), boot_check=False, fmt="raw")
    state = target / "migrations" / "150.json"
    data = json.loads(state.read_text())
    files = data["stages"]["inspect"]["result"]["files"]
    assert all({"device", "inode"} <= entry.keys() for entry in files)
    for entry in files:
        del entry["device"], entry["inode"]
    state.write_text(json.dumps(data))
    result = v2p.migrate(str(source), 150, target=local_target(target), boot_check=False, fmt="raw")
    assert "nothing to do" in result["nothing_to_do"]


def test_an_ovf_whose_disks_are_descriptors_reads_each_disk_from_its_own_pinned_files(tmp_path: Path) -> None:
    """Each disk's descriptor (naming its own pinned extents) has its own folder: the second disk's
    must not overwrite the first's (which would name files the first disk's reader does not hold)."""
    from test_source_ovf import make_ovf

    from v2p.sources.ovf import OvfSource

    made, folder = tmp_path / "made", tmp_path / "pkg"
    made.mkdir()
    folder.mkdir()
    disks, raws = {}, []
    for number in (1, 2):
        raw = tmp_path / f"raw{number}.raw"
        raw.write_bytes(bytes([number]) * MiB + bytes(MiB) + bytes([number + 5]) * MiB)
        raws.append(raw.read_bytes())
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat",
                        str(raw), str(made / f"linux-disk{number}.vmdk")], check=True, capture_output=True)
        shutil.copyfile(made / f"linux-disk{number}-flat.vmdk", folder / f"linux-disk{number}-flat.vmdk")
        disks[f"vmdk{number}"] = made / f"linux-disk{number}.vmdk"
    source = OvfSource(make_ovf(folder, disks, version=2, manifest=None))
    given = [source.disk_input(disk, tmp_path / "work") for disk in source.spec().ordered_disks()]
    for index, disk in enumerate(given):
        out = tmp_path / f"out{index}.raw"
        subprocess.run(["qemu-img", "convert", "-f", disk.endpoint.fmt, "-O", "raw", disk.endpoint.filename, str(out)],
                       check=True, capture_output=True, pass_fds=disk.endpoint.fds)
        assert out.read_bytes() == raws[index], f"disk {index} reads another disk's bytes"
        disk.close()


def test_600_extent_lines_over_one_file_under_a_low_soft_ulimit_migrate(tmp_path: Path) -> None:
    """Two pinned files, but qemu-img opens one per extent line: the room made counts those too."""
    from test_inspect_limits import descriptor

    folder = tmp_path / "vm"
    folder.mkdir()
    data = random.Random(600).randbytes(600 * 4096)
    (folder / "f").write_bytes(data)
    source = descriptor(folder / "one.vmdk", "twoGbMaxExtentFlat", [f'RW 8 FLAT "f" {8 * i}' for i in range(600)])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard ulimit -n ({hard}) leaves no room to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        error = migrate(source, tmp_path / "target", lambda event: None)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert error is None, error
    assert (tmp_path / "target" / "images" / "150" / "vm-150-disk-0.raw").read_bytes() == data
