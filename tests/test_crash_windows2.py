"""The last crash windows, with real processes and real signals: a signal while the command is still
importing the library, one right after the VM's config is written (before its record), one after
"finished" is recorded, temporaries left by SIGKILL (a VM config's, a plan's measure folder), and a kill
of the driver dance after the guest installed its driver but before boot 1 was recorded.

A window too short to hit from outside is hit exactly by a small wrapper the test runs instead of
``python -m v2p``: it replaces one collaborator (in the test, never in v2p) with one that sends the
process a real signal at that point, then runs the command as ``python -m v2p`` does."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from pve_sim.fixture import pve_fixture  # noqa: F401
from test_boot import qemu_pids, wait_until
from test_dance import (
    dance_args,
    drivers_iso,  # noqa: F401 - a fixture
    standin,
)
from test_migrate_pve import pve_url

from conftest import ROOT, V2P, assert_same_bytes, one_line_error
from test_resume import ARGS, wait_for
from v2p.errors import LockedError
from v2p.state import VmidLock

STOPPED = "v2p: interrupted; run the same command again to resume"


def wrapped(v2p: V2P, setup: str, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess[str]:
    """``v2p ARGS`` run as ``python -m v2p`` runs it, after ``setup`` (Python) patched the library."""
    code = textwrap.dedent(setup) + textwrap.dedent("""
        import runpy
        import sys

        sys.argv[0] = "v2p"
        runpy.run_module("v2p", run_name="__main__", alter_sys=True)
    """)
    argv = [sys.executable, "-c", code, *v2p.argv(*args)[3:]]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=v2p.env(**env), cwd=ROOT)


def signal_after(where: str, name: str, signum: int, *, before: bool = False) -> str:
    """Setup code: ``where.name`` (a module or class attribute) sends this process ``signum`` once,
    right after it returns (``before``: as it is called, so the signal lands in it)."""
    return f"""
        import importlib, os, signal
        _path = {where!r}.split(".")
        for _cut in range(len(_path), 0, -1):
            try:
                _owner = importlib.import_module(".".join(_path[:_cut]))
                break
            except ImportError:
                continue
        for _part in _path[_cut:]:
            _owner = getattr(_owner, _part)
        _real = getattr(_owner, {name!r})
        _sent = []

        def _patched(*args, **kwargs):
            if {before!r} and not _sent:
                _sent.append(True)
                os.kill(os.getpid(), {int(signum)})
            result = _real(*args, **kwargs)
            if not _sent:
                _sent.append(True)
                os.kill(os.getpid(), {int(signum)})
            return result

        setattr(_owner, {name!r}, _patched)
    """


def stderr_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


# -- a signal while the library is still being imported ---------------------------------------------

def _entry_points() -> dict[str, str]:
    """How each way of starting the command starts it: ``python -m v2p``, and the console script
    as pyproject.toml declares it (what pip writes into bin/v2p)."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["v2p"]
    module, _, func = declared.partition(":")
    return {"python -m v2p": "import runpy\nrunpy.run_module('v2p', run_name='__main__', alter_sys=True)\n",
            "console script": f"import sys\nfrom {module} import {func}\nsys.exit({func}())\n"}


@pytest.mark.parametrize("entry", ["python -m v2p", "console script"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_the_library_loads_is_one_line(entry, signum, tmp_path, v2p):
    """The library takes most of a second to import on a busy machine. A stand-in for one of the
    modules it imports (``uuid``, which v2p.pipeline imports) makes that import wait until the test
    has signalled, so the signal lands in the middle of the imports every time."""
    shim, reached = tmp_path / "shim", tmp_path / "reached"
    shim.mkdir()
    (shim / "uuid.py").write_text(textwrap.dedent(f"""
        import time
        open({str(reached)!r}, "w").close()
        while True:
            time.sleep(0.05)
    """))
    code = _entry_points()[entry]
    proc = subprocess.Popen([sys.executable, "-c", code, "status"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=v2p.env(PYTHONPATH=str(shim), V2P_TARGET_DIR=str(v2p.target)))
    wait_until(lambda: reached.exists() or proc.poll() is not None, 60, "the command never imported uuid")
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum, (proc.returncode, err)
    assert [line for line in err.splitlines() if line.strip()] == [STOPPED], err
    assert out == ""


@pytest.mark.usefixtures("v2p_process")  # a fresh interpreter's imports are the subject
def test_the_package_loads_its_parts_when_used_and_keeps_its_names():
    """What lets the handlers go in first: ``import v2p`` no longer imports the library; every public
    name still resolves, and ``v2p.inspect`` / ``v2p.dance`` stay the functions once the submodules of
    those names are loaded."""
    script = textwrap.dedent("""
        import sys
        import v2p
        assert "v2p.api" not in sys.modules and "v2p.pipeline" not in sys.modules, sorted(sys.modules)
        import v2p.cli, v2p.dance, v2p.inspect
        from v2p import dance, inspect
        assert callable(dance) and callable(inspect) and v2p.dance is dance and v2p.inspect is inspect
        from v2p.dance import DriverDance
        from v2p.inspect import DiskImage
        assert DiskImage is v2p.DiskImage
        for name in v2p.__all__:
            getattr(v2p, name)
        assert set(v2p.__all__) <= set(dir(v2p))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


# -- a signal between the VM's config and its create record -------------------------------------------

def _description(config_path: Path) -> str:
    return next(line for line in config_path.read_text().splitlines() if line.startswith("description: "))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_right_after_the_config_is_written_resumes(signum, samples, source_of, v2p):
    src = source_of("monolithicSparse")
    stopped = wrapped(v2p, signal_after("v2p.targets.local.LocalTarget", "create_vm", signum),
                      "migrate", str(src.descriptor), *ARGS)
    assert stopped.returncode == 128 + signum, stopped.stderr
    assert stderr_lines(stopped) == [STOPPED], stopped.stderr
    conf = v2p.target / "qemu-server" / "120.conf"
    assert conf.exists(), "the config was not written before the signal"
    state = v2p.state(120)
    assert "create" not in state["stages"] and state["failed"]["stage"] == "create"
    assert f"v2p migration {state['migration_id']}" in _description(conf)
    again = v2p("migrate", str(src.descriptor), *ARGS)
    assert again.returncode == 0, again.stderr
    assert "[create] done in" in again.stdout
    assert_same_bytes(samples / "guest.raw", v2p.disk(120))
    assert v2p.state(120)["migration_id"] == state["migration_id"]


def test_the_rerun_adopts_its_own_vm_and_no_other(samples, source_of, v2p):
    """Kept by the interrupt, the record names the VM it made by its migration id: a VM at that VMID
    without that id (another migration's, one whose id merely starts with it) is not adopted."""
    src = source_of("monolithicSparse")
    stopped = wrapped(v2p, signal_after("v2p.targets.local.LocalTarget", "create_vm", signal.SIGINT),
                      "migrate", str(src.descriptor), *ARGS)
    assert stopped.returncode == 130, stopped.stderr
    migration_id = v2p.state(120)["migration_id"]
    for index, foreign in enumerate((f"production-db (v2p migration {migration_id}0)",
                                     "production-db (v2p migration 0123456789ab)", "production-db")):
        other = V2P(v2p.target.with_name(f"other{index}"))  # the same target, another VM at VMID 120
        shutil.copytree(v2p.target, other.target, symlinks=True)
        conf = other.target / "qemu-server" / "120.conf"
        conf.write_text(conf.read_text().replace(_description(conf), f"description: {foreign}"))
        before = conf.read_bytes()
        line = one_line_error(other("migrate", str(src.descriptor), *ARGS))
        assert "VMID 120 already exists" in line, line
        assert conf.read_bytes() == before, "a VM that is not this migration's was changed"
    again = v2p("migrate", str(src.descriptor), *ARGS)
    assert again.returncode == 0, again.stderr
    assert_same_bytes(samples / "guest.raw", v2p.disk(120))


def test_a_record_kept_by_a_kill_never_adopts_a_vm_with_a_longer_id(samples, source_of, v2p):
    """SIGKILL right after the state file appeared; meanwhile someone made VM 120 whose description
    carries a migration id that starts with this one's: the rerun refuses it and leaves it alone."""
    src = source_of("monolithicSparse")
    killed = wrapped(v2p, signal_after("v2p.state.MigrationState", "start", signal.SIGKILL),
                     "migrate", str(src.descriptor), *ARGS)
    assert killed.returncode == -signal.SIGKILL
    migration_id = v2p.state(120)["migration_id"]
    conf = v2p.target / "qemu-server" / "120.conf"
    conf.parent.mkdir(mode=0o700)
    conf.write_text(f"description: production-db (v2p migration {migration_id}7)\nmemory: 512\nname: db\n")
    before = conf.read_bytes()
    line = one_line_error(v2p("migrate", str(src.descriptor), *ARGS))
    assert "VMID 120 already exists" in line
    assert conf.read_bytes() == before


def test_plan_run_killed_right_after_a_config_is_written_resumes(samples, tmp_path, v2p):
    """SIGKILL of a ``plan run``'s process group: its child sees its stdin end and stops itself with
    SIGINT. Here that lands while the child's create stage has written the config and not yet its
    record (a ``sitecustomize`` of the test's, for the child only, holds it there until the signal)."""
    target = tmp_path / "target"
    shutil.copytree(samples / "monolithicSparse", tmp_path / "src")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"defaults: {{target: {{kind: local, dir: {target}, accel: tcg}}, boot_check: false}}\n"
                    f"vms:\n  - {{source: {tmp_path / 'src' / 'monolithicSparse.vmdk'}, vmid: 120, name: a}}\n")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(textwrap.dedent("""
        import os, signal, sys, time
        if "v2p.planrun" in sys.orig_argv or "v2p.planchild" in sys.orig_argv:
            from v2p.targets.local import LocalTarget
            _real = LocalTarget.create_vm

            def _create_vm(self, vmid, config):
                _real(self, vmid, config)
                os.killpg(os.getppid(), signal.SIGKILL)  # the plan run, as `kill -9 -PGID` does
                time.sleep(60)  # the child's own SIGINT (its stdin ended) lands here

            LocalTarget.create_vm = _create_vm
    """))
    proc = subprocess.Popen(v2p.argv("plan", "run", str(plan)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=v2p.env(PYTHONPATH=str(shim)), start_new_session=True)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    state = target / "migrations" / "120.json"

    def child_gone() -> bool:  # it holds the VMID lock until it ends
        try:
            with VmidLock(target / "migrations", 120):
                return True
        except LockedError:
            return False

    wait_until(child_gone, 60, "the plan's child never stopped")
    assert (target / "qemu-server" / "120.conf").exists()
    failed = json.loads(state.read_text())["failed"]
    assert (failed["stage"], failed["error"]) == ("create", "interrupted"), failed
    again = v2p("plan", "run", str(plan), timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 of 1 VMs migrated" in again.stdout, again.stdout
    assert_same_bytes(samples / "guest.raw", v2p.disk(120))


@pytest.mark.parametrize("when", ["after its task", "while its task runs"])
def test_interrupt_in_the_pve_create_resumes(when, pve, tmp_path, samples, source_of, v2p: V2P):
    src = source_of("monolithicSparse")
    env = {"V2P_PVE_TOKEN": pve.tokens["root@pam!v2p"], "XDG_DATA_HOME": str(tmp_path / "xdg")}
    args = ("--target", pve_url(pve), "migrate", str(src.descriptor), "--vmid", "150", "--no-boot-check")
    setup = signal_after("v2p.targets.proxmox.ProxmoxTarget", "create_vm", signal.SIGINT) if when == "after its task" \
        else signal_after("v2p.targets.proxmox.ProxmoxTarget", "wait_task", signal.SIGINT, before=True)
    stopped = wrapped(v2p, setup, *args, **env)
    assert stopped.returncode == 130, stopped.stderr
    assert stderr_lines(stopped) == [STOPPED], stopped.stderr
    wait_until(lambda: 150 in pve.cluster.vms, 30, "the simulator never created the VM")
    record = json.loads(next((tmp_path / "xdg" / "v2p" / "pve").glob("*/150.json")).read_text())
    assert "create" not in record["stages"] and record["failed"]["stage"] == "create", record
    again = v2p(*args, **env)
    assert again.returncode == 0, again.stdout + again.stderr
    volid = pve.cluster.vms[150].config["scsi0"].split(",")[0]
    assert_same_bytes(samples / "guest.raw", pve.cluster.volume_path(volid))


# -- a signal once "finished" is recorded ---------------------------------------------------------------

@pytest.mark.parametrize(("where", "name"), [
    ("v2p.pipeline", "remove_tree"),               # the work folder removed after the finished record
    ("v2p.pipeline.Pipeline", "_release"),         # the staging copies released after it
    ("v2p.api.Migration", "run"),                  # back in the CLI, the result in hand
])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_after_finished_is_recorded_exits_0(where, name, signum, samples, source_of, v2p):
    src = source_of("monolithicSparse")
    proc = wrapped(v2p, signal_after(where, name, signum), "migrate", str(src.descriptor), *ARGS,
                   "--no-boot-check")
    assert proc.returncode == 0, proc.stderr
    assert "interrupted" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "VM 120 migrated from" in proc.stdout
    assert v2p.state(120)["finished"] is True
    assert not (v2p.target / "migrations" / "120.work").exists(), "the finished run's tidy-up was cut short"


# -- temporaries left by SIGKILL ------------------------------------------------------------------------

KILL_IN_CONFIG_WRITE = """
    import os, signal
    _real_fsync = os.fsync

    def _fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".120.conf."):
            os.kill(os.getpid(), signal.SIGKILL)  # the temporary is written, not yet renamed
        return _real_fsync(fd)

    os.fsync = _fsync
"""


@pytest.mark.parametrize("then", ["rerun", "vm rm"])
def test_config_temporaries_left_by_sigkill_are_swept(then, samples, source_of, tmp_path, v2p):
    src = source_of("monolithicSparse")
    killed = wrapped(v2p, KILL_IN_CONFIG_WRITE, "migrate", str(src.descriptor), *ARGS)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    folder = v2p.target / "qemu-server"
    left = [path.name for path in folder.iterdir()]
    assert len(left) == 1 and re.fullmatch(r"\.120\.conf\..+\.tmp", left[0]), left
    victim = tmp_path / "victim"
    victim.write_text("not v2p's")
    (folder / ".120.conf.planted.tmp").symlink_to(victim)  # removed as a link, never followed
    others = [folder / ".121.conf.5.tmp", folder / ".1200.conf.5.tmp", folder / "120.conf.keep"]
    for path in others:
        path.write_text("another VM's")
    if then == "rerun":
        again = v2p("migrate", str(src.descriptor), *ARGS)
        assert again.returncode == 0, again.stderr
        assert_same_bytes(samples / "guest.raw", v2p.disk(120))
        expected = sorted(["120.conf", *(path.name for path in others)])
    else:
        removed = v2p("vm", "rm", "120")
        assert removed.returncode == 0, removed.stderr
        expected = sorted(path.name for path in others)
    assert sorted(path.name for path in folder.iterdir()) == expected
    assert victim.read_text() == "not v2p's"


def test_plan_run_killed_while_measuring_leaves_nothing_in_tmpdir(samples, tmp_path, v2p):
    target, tmpdir = tmp_path / "target", tmp_path / "tmp"
    tmpdir.mkdir()
    shutil.copytree(samples / "monolithicSparse", tmp_path / "src")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"defaults: {{target: {{kind: local, dir: {target}, accel: tcg}}, boot_check: false}}\n"
                    f"vms:\n  - {{source: {tmp_path / 'src' / 'monolithicSparse.vmdk'}, vmid: 120, name: a}}\n")
    kill = """
        import os, signal
        from v2p.targets.local import LocalTarget

        def _disk_sink(self, *args, **kwargs):  # the measure has staged what it needs by now
            os.kill(os.getpid(), signal.SIGKILL)

        LocalTarget.disk_sink = _disk_sink
    """
    killed = wrapped(v2p, kill, "plan", "run", str(plan), TMPDIR=str(tmpdir))
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    # Only fsutil.scratch_dir's folder may stay: what a killed run left in it the next run sweeps.
    scratch = f"v2p-scratch-{os.getuid()}"
    assert [name for name in os.listdir(tmpdir) if name != scratch] == [], \
        "the measure left its folder in $TMPDIR, where no run sweeps"
    measured = target / "migrations" / "120.work" / "plan-measure"
    assert measured.is_dir(), "the measure folder is not under the VM's work folder"
    (measured / "0").mkdir(exist_ok=True)
    (measured / "0" / "staged.vmdk").write_bytes(b"x" * 4096)  # as an OVA member staged for measuring
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("not v2p's")
    (measured / "0" / "planted").symlink_to(victim)  # removed as a link, never followed
    again = v2p("plan", "run", str(plan), TMPDIR=str(tmpdir), timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [name for name in os.listdir(tmpdir) if name != scratch] == []
    assert not (tmpdir / scratch).exists() or os.listdir(tmpdir / scratch) == [], "a killed run's scratch stayed"
    assert not (target / "migrations" / "120.work").exists()
    assert (victim / "keep").read_text() == "not v2p's"


# -- the driver dance: killed after the guest installed its driver, before boot 1 was recorded ------------

def test_dance_killed_after_the_driver_install_resumes_without_waiting(manifest, tmp_path, v2p,
                                                                       drivers_iso):  # noqa: F811
    disk = standin(manifest, tmp_path)
    args = dance_args(disk, drivers_iso, 300, "--dance-wait", "45")
    proc = v2p.popen(*args, V2P_TEST_HOLD_AFTER="dance:boot1-started")
    wait_for(proc.stderr, "holding after dance:boot1-started", proc, timeout=240)
    # v2p waits at that point without looking at the guest: it installs its driver meanwhile.
    wait_until(lambda: "v2p-guest: driver viostor installed" in v2p.serial(300), 120, "the guest never installed it")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_until(lambda: not qemu_pids(tmp_path), 10, "boot 1 outlived v2p")
    dance = json.loads((v2p.target / "migrations" / "300.dance.json").read_text())
    assert "boot1" not in dance["stages"]
    again = v2p(*args, timeout=400)
    assert again.returncode == 0, again.stdout + again.stderr  # not handed to the operator after 45 s
    boot1 = v2p.state(300)["stages"]["drivers"]["result"]["boot1"]
    assert boot1["signal"] == "temporary disk reads", boot1
    assert "v2p-guest: driver viostor installed" not in v2p.serial(300)  # the sign came from a later boot
    config = v2p.config(300)
    assert config["boot"] == "order=virtio0" and "ide0" not in config
