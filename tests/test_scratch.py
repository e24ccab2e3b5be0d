"""Scratch folders (``fsutil.scratch_dir``): what a SIGKILLed ``inspect`` leaves in $TMPDIR is swept
by the next run, a live run's folder never is, and a planted link there is removed, not followed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from v2p.fsutil import SCRATCH, SCRATCH_GRACE, scratch_dir

CHILD = """
import sys, time
from v2p.fsutil import scratch_dir
with scratch_dir("inspect-vm") as folder:
    (folder / "work.vmdk").write_bytes(b"x" * 4096)
    print(folder, flush=True)
    time.sleep(600)
"""


def _age(*paths: Path) -> None:
    """As if SCRATCH_GRACE had passed since these were made (a young folder may be a live one's, made
    and not yet locked)."""
    old = time.time() - SCRATCH_GRACE - 5
    for path in paths:
        os.utime(path, (old, old), follow_symlinks=False)


def _wait_for_no_process_naming(path: Path, timeout: float = 30.0) -> None:
    """Until no process has ``path`` in its command line (the children of a killed run, ending)."""
    needle = str(path).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                    alive.append(pid)
            except OSError:
                continue
        if not alive:
            return
        time.sleep(0.01)
    raise AssertionError(f"processes naming {path} outlived the killed v2p: {alive}")


def _child(tmp: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


@pytest.mark.usefixtures("v2p_process")  # a process SIGKILLed mid-run is the subject
def test_a_killed_runs_scratch_folder_is_swept_and_a_live_ones_kept(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    live, live_folder = _child(tmp_path)
    dead, dead_folder = _child(tmp_path)
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(10)
        assert (dead_folder / "work.vmdk").exists()  # SIGKILL ran no cleanup
        victim = tmp_path / "victim"
        victim.mkdir()
        (victim / "keep").write_text("not v2p's")
        os.symlink(victim, live_folder.parent / "inspect-vm-planted")
        young = live_folder.parent / "inspect-vm-young"
        young.mkdir()  # another process's, between its mkdir and its lock: never swept
        _age(dead_folder, live_folder, live_folder.parent / "inspect-vm-planted")
        with scratch_dir("inspect-vm") as mine:
            assert mine.parent == live_folder.parent and mine.is_dir()
            assert not dead_folder.exists(), "the killed run's scratch folder was left"
            assert (live_folder / "work.vmdk").exists(), "a live run's scratch folder was swept"
            assert not os.path.lexists(live_folder.parent / "inspect-vm-planted")
            assert young.is_dir(), "a folder younger than the grace was swept (it may be about to be locked)"
            assert (victim / "keep").read_text() == "not v2p's"
        assert not mine.exists()
        assert oct(live_folder.parent.stat().st_mode & 0o777) == "0o700"
        assert live_folder.parent.name == f"{SCRATCH}-{os.getuid()}"
    finally:
        live.kill()
        live.wait(10)


@pytest.mark.usefixtures("v2p_process")  # a process SIGKILLed mid-run is the subject
def test_inspect_of_a_vm_leaves_nothing_in_tmpdir_after_a_kill(tmp_path: Path, samples: Path) -> None:
    """The CLI's inspect of a .vmx, SIGKILLed while it works, then run again: $TMPDIR ends empty of
    v2p's scratch (it was ``v2p-inspect-vm-*`` folders that nobody removed)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    vmx = tmp_path / "vm" / "vm.vmx"
    vmx.parent.mkdir()
    disk = samples / "monolithicSparse"
    for entry in disk.iterdir():
        (vmx.parent / entry.name).write_bytes(entry.read_bytes())
    descriptor = next(p.name for p in vmx.parent.iterdir() if p.suffix == ".vmdk")
    vmx.write_text(f'.encoding = "UTF-8"\nguestOS = "otherlinux-64"\nmemsize = "256"\n'
                   f'scsi0.present = "TRUE"\nscsi0:0.present = "TRUE"\nscsi0:0.fileName = "{descriptor}"\n')
    env = {**os.environ, "TMPDIR": str(tmp)}
    argv = [sys.executable, "-m", "v2p", "inspect", str(vmx)]
    for _ in range(3):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(tmp.glob(f"{SCRATCH}-*/inspect-vm-*")) \
                and not any(tmp.glob("v2p-inspect-vm-*")):  # where v2p kept it before scratch_dir
            time.sleep(0.005)
        assert proc.poll() is None, "inspect ended before its scratch folder was seen"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    # A qemu-img the killed v2p started dies with it (its parent-death signal), but not at once: one still
    # writing in its scratch folder would make the folder young again after ``_age``, and rightly kept.
    _wait_for_no_process_naming(tmp)
    _age(*tmp.glob(f"{SCRATCH}-*/*"))
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert list(tmp.glob(f"{SCRATCH}-*/*")) == []
    assert not any(tmp.glob("v2p-inspect*"))
