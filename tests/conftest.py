"""Shared fixtures: the sample images (built once per session with the real
nasm and qemu-img), per-test copies of them, and a runner for the real CLI."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
_may_use_samples = True  # False while a test that did not request ``manifest`` runs


class _SampleFolder(type(Path())):  # type: ignore[misc]
    """The folder ``manifest`` builds. A test that looks inside it without requesting
    ``manifest`` (itself or through ``samples`` / ``source_of``) only passes when an
    earlier test happened to build the samples; it fails here instead, in any order."""

    def _check(self) -> None:
        if not _may_use_samples:
            pytest.fail("this test reads sample_images/out without requesting the `samples` (or "
                        "`manifest`) fixture that builds them: it fails on a fresh clone when run alone")

    def __truediv__(self, key: str) -> Path:
        self._check()
        return Path(str(self), key)

    def joinpath(self, *keys: str) -> Path:
        self._check()
        return Path(str(self), *keys)

    def __fspath__(self) -> str:
        self._check()
        return str(self)


SAMPLES = _SampleFolder(ROOT / "sample_images" / "out")
FLAVORS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
           "streamOptimized", "esxi"]
GUEST_LINE = re.compile(r"v2p-guest: boot controller=(\S+) pci=([0-9a-f]{4}:[0-9a-f]{4})")
MARKER_LINE = re.compile(r"v2p-guest: last-sector marker=(\S+)")
# One line per BIOS disk the sample guest sees: drive number, sectors, last-sector marker.
DISK_LINE = re.compile(r"(?m)^v2p-guest: disk 0x(8[0-7]) sectors=(\d+) marker=(\S+)\r?$")


@pytest.fixture(scope="session")
def manifest() -> dict[str, Any]:
    subprocess.run([sys.executable, str(ROOT / "sample_images" / "build.py"), str(SAMPLES), "-q"],
                   check=True)
    data: dict[str, Any] = json.loads((SAMPLES / "manifest.json").read_text())
    return data


@pytest.fixture(scope="session")
def samples(manifest: dict[str, Any]) -> Path:
    """The folder of built sample images (guest.raw, one folder per flavor)."""
    return Path(str(SAMPLES))


# The tiers. A test's markers come from the fixtures it requests (directly or through another fixture),
# never from a mark written on the test:
#   boots    it boots a guest under QEMU (the ``boots`` fixture says so)
#   pve_sim  it starts the PVE simulator (``pve``, a module's own ``sim``, or ``pve_start`` for several)
#   vcsim    it starts VMware's vCenter simulator (``vcsim``: tests/vcsim/fixture.py)
#   slow     either of those, or it runs the v2p command as a process (``v2p``, ``v2p_process``, the
#            example ``panel``); ``make test-fast`` runs the rest: ``-m "not slow"``
# A test that boots, starts the simulator or runs the command without requesting the fixture that
# says so fails (``_tier_is_declared``), slow or not: the fast tier cannot grow slow tests, nor a
# tier lose its tests, unnoticed.
_MARKING_FIXTURES = {
    "boots": {"boots"},
    "pve_sim": {"pve", "sim", "pve_start"},
    "vcsim": {"vcsim"},
    "slow": {"v2p", "v2p_process", "panel"},
}
_SLOW_MARKS = ("boots", "pve_sim", "vcsim")  # each implies slow


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        requested = set(getattr(item, "fixturenames", ()))
        for mark, fixtures in _MARKING_FIXTURES.items():
            if requested & fixtures:
                item.add_marker(mark)
        if any(item.get_closest_marker(mark) for mark in _SLOW_MARKS) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


_seen: list[tuple[str, str]] = []  # (marker it needs, what was started) since the current test began
_opened: list[str] | None = None  # the ``opened`` fixture's list, while a test that requested it runs


def _is_v2p_command(argv: list[str]) -> bool:
    """``python -m v2p ...``, the console script, or a ``python -c`` that runs the CLI."""
    for index, arg in enumerate(argv):
        if arg == "-m" and argv[index + 1:index + 2] == ["v2p"]:
            return True
        if arg == "-c" and "v2p" in "".join(argv[index + 1:index + 2]):
            return True
    return bool(argv) and Path(argv[0]).name == "v2p"


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """Notes what a test starts, in this process (its own threads included): a QEMU guest (a
    qemu-system with a QMP socket; a ``-version`` probe is not a boot), the PVE simulator, the v2p
    command. Children's children are not seen: a test running the command is slow already."""
    if event == "subprocess.Popen":
        argv = [os.fsdecode(arg) for arg in args[1]] if isinstance(args[1], (list, tuple)) else [str(args[1])]
        if any(Path(arg).name.startswith("qemu-system") for arg in argv) and "-qmp" in argv:
            _seen.append(("boots", "a QEMU guest"))
        elif "tests.pve_sim" in argv:  # python -m tests.pve_sim
            _seen.append(("pve_sim", "the PVE simulator as a process"))
        elif _is_v2p_command(argv):
            _seen.append(("slow", "the v2p command as a process"))
    elif event == "pve_sim.start":
        _seen.append(("pve_sim", "the PVE simulator"))
    elif event == "open" and _opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.path.abspath(os.fsdecode(args[0])))


sys.addaudithook(_audit)

_WHICH_FIXTURE = {"boots": "`boots`", "pve_sim": "`pve` (or `pve_start`)", "slow": "`v2p` (or `v2p_process`)"}


@pytest.fixture(autouse=True)
def _tier_is_declared(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that started what its markers do not admit (see ``_MARKING_FIXTURES``) fails: a fast one
    would make the fast tier slow, a slow one would be missing from ``-m boots`` / ``-m pve_sim``. Only
    what this process starts is seen (``_audit``), while the test and its function-scoped fixtures run."""
    _seen.clear()
    yield
    undeclared = sorted({(mark, what) for mark, what in _seen if not request.node.get_closest_marker(mark)})
    _seen.clear()
    if undeclared:
        message = ("this test started " + ", ".join(what for _mark, what in undeclared) + " without requesting "
                   + " or ".join(_WHICH_FIXTURE[mark] for mark, _what in undeclared)
                   + ": its tier markers come from its fixtures (conftest's _MARKING_FIXTURES)")
        pytest.fail(message, pytrace=False)


@pytest.fixture
def opened() -> Iterator[list[str]]:
    """Every file this process opens while the test runs (absolute paths, in order): for asserting
    what was read, and how often, instead of how long it took."""
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


@pytest.fixture
def boots() -> None:
    """Requested by a test that boots a guest (in this process or through the command): marks it
    ``boots`` and ``slow``."""


@pytest.fixture
def pve_start() -> Callable[..., Any]:
    """``start_or_skip`` (pve_sim/fixture.py) for a test that starts simulators of its own (several,
    or of given releases): marks it ``pve_sim`` and ``slow``."""
    from pve_sim.fixture import start_or_skip

    return start_or_skip


@pytest.fixture
def v2p_process() -> list[str]:
    """The argv that starts the v2p command as its own process, for a test whose subject is the
    process (signals, a closed pipe, what its argv shows): marks it ``slow``."""
    return [sys.executable, "-m", "v2p"]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file below ``folder``."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            out[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out


@dataclass
class Source:
    """A private copy of one sample flavor; checks at teardown that v2p never changed it."""

    folder: Path
    descriptor: Path
    flavor: str
    before: dict[str, tuple[str, int]]

    def assert_unchanged(self) -> None:
        assert snapshot(self.folder) == self.before, "the source files were modified"


@pytest.fixture
def source_of(manifest: dict[str, Any], tmp_path: Path):  # type: ignore[no-untyped-def]
    made: list[Source] = []

    def make(flavor: str) -> Source:
        entry = manifest["flavors"][flavor]
        folder = tmp_path / "src" / f"{flavor}-{len(made)}"
        shutil.copytree(SAMPLES / entry["dir"], folder, copy_function=shutil.copy2)
        src = Source(folder, folder / Path(entry["descriptor"]).name, entry["flavor"], snapshot(folder))
        made.append(src)
        return src

    yield make
    for src in made:
        src.assert_unchanged()


# The boot check's settle in the command's processes (v2p/testhooks.py), for the driver-dance tests
# (``short_settle``): 20 s is for real guests; the stand-in guests reset (a blue screen's restart, ~2 s
# after its STOP) or fail within a few seconds of their sign, and most of a dance test was this wait.
# Every other test, in-process ones and the boot engine's, keeps 20 s.
SETTLE_ENV, PROCESS_SETTLE = "V2P_TEST_SETTLE", "10"


class V2P:
    """Runs the real ``v2p`` command against one local target directory."""

    settle = ""  # V2P_TEST_SETTLE for its processes when set (``short_settle``)

    def __init__(self, target: Path) -> None:
        self.target = target

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "v2p", "--accel", "tcg", "--target-dir", str(self.target), *args]

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("V2P_")}
        if self.settle:
            env[SETTLE_ENV] = self.settle
        env.update(extra)
        return env

    def __call__(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout,
                              env=self.env(**env), cwd=ROOT)

    def popen(self, *args: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=self.env(**env), cwd=ROOT)

    def serial(self, vmid: int) -> str:
        return (self.target / "run" / str(vmid) / "serial.log").read_text(errors="replace")

    def config(self, vmid: int) -> dict[str, str]:
        text = (self.target / "qemu-server" / f"{vmid}.conf").read_text()
        return dict(line.split(": ", 1) for line in text.splitlines())

    def state(self, vmid: int) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.target / "migrations" / f"{vmid}.json").read_text())
        return data

    def disk(self, vmid: int, fmt: str = "qcow2") -> Path:
        return self.target / "images" / str(vmid) / f"vm-{vmid}-disk-0.{fmt}"


@pytest.fixture
def short_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    """The v2p processes this test starts settle a boot in ``PROCESS_SETTLE`` seconds, not 20."""
    monkeypatch.setattr(V2P, "settle", PROCESS_SETTLE)


@pytest.fixture
def v2p(tmp_path: Path) -> V2P:
    return V2P(tmp_path / "target")


class InProcessV2P(V2P):
    """``V2P``, the command run by calling ``v2p.cli.main`` in this process: what a test of the
    command's words, exit codes and effects needs, without the second of a new interpreter. It starts
    as ``python -m v2p`` would: the same argv, cwd and environment (``V2P_*`` cleared, ``env`` added),
    no signal from an earlier test pending; it leaves the process as it found it (signal handlers, the
    ``v2p`` logger). ``popen`` still starts a process. Not for a test whose subject is the process
    (signals, a closed pipe or stream, its argv, the interpreter's exit): request ``v2p`` there."""

    def __init__(self, target: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(target)
        self._capfd = capfd
        self._monkeypatch = monkeypatch

    def __call__(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        return self.bare(*self.argv(*args)[3:], **env)  # after [python, -m, v2p]

    def bare(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """``v2p ARGS`` as given: without the ``--accel tcg --target-dir`` every other call adds."""
        import logging
        import signal

        from v2p import cli, interrupts

        argv = [sys.executable, "-m", "v2p", *args]
        logger = logging.getLogger("v2p")
        handlers, level = list(logger.handlers), logger.level
        signals = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        pending = list(interrupts._received), list(interrupts._settled)
        self._capfd.readouterr()  # what the test printed before is not the command's
        with self._monkeypatch.context() as patch:
            for key in [key for key in os.environ if key.startswith("V2P_")]:
                patch.delenv(key)
            for key, value in env.items():
                patch.setenv(key, value)
            patch.chdir(ROOT)
            interrupts._received.clear()
            interrupts._settled.clear()
            try:
                code: int | str | None = cli.main(list(args))
            except SystemExit as exc:  # argparse's refusals leave through sys.exit(2)
                code = exc.code
            finally:
                logger.handlers[:] = handlers
                logger.setLevel(level)
                for signum, handler in signals.items():
                    signal.signal(signum, handler)
                interrupts._received[:], interrupts._settled[:] = pending
        out, err = self._capfd.readouterr()
        if isinstance(code, str):  # sys.exit("text"): the interpreter prints it and exits 1
            code, err = 1, err + code + "\n"
        return subprocess.CompletedProcess(argv, code or 0, out, err)


@pytest.fixture
def inproc(tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> InProcessV2P:
    """The ``v2p`` fixture's command, run in this process (``InProcessV2P``): the same target folder."""
    return InProcessV2P(tmp_path / "target", capfd, monkeypatch)


@pytest.fixture(autouse=True)
def no_leftover_vms(tmp_path: Path):  # type: ignore[no-untyped-def]
    """VMs a test leaves running (v2p killed mid-boot on purpose, ...) are stopped after it."""
    yield
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and str(tmp_path).encode() in cmdline:
            os.kill(int(pid), 9)


def guest_report(serial: str) -> tuple[str, str, str]:
    """(controller, pci id, last-sector marker) as the guest printed them."""
    boot = GUEST_LINE.search(serial)
    marker = MARKER_LINE.search(serial)
    assert boot and marker, f"guest did not report its boot:\n{serial[-2000:]}"
    return boot.group(1), boot.group(2), marker.group(1)


def assert_same_bytes(raw: Path, disk: Path, fmt: str = "qcow2") -> None:
    """The converted disk holds exactly the sample's raw bytes (qemu-img compare, strict size)."""
    proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, str(raw), str(disk)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", fmt, str(disk)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == raw.stat().st_size


def cmdlines() -> list[bytes]:
    """Every process's command line now (``/proc/*/cmdline``): sampled while v2p runs, to prove a
    secret is on no argv."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:
            pass
    return out


@contextlib.contextmanager
def failing_after(stage: str) -> Iterator[None]:
    """Inside it, an in-process migration fails (a ``TargetError``, as a host going away) right after
    recording ``stage``: what a crash there leaves, without a process to kill."""
    import v2p.pipeline
    from v2p.errors import TargetError

    def fail_after(point: str) -> None:
        if point == stage:
            raise TargetError("the host went away")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(v2p.pipeline, "hold_point", fail_after)
        yield


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The CLI failed the way a user should see it: non-zero, one line, no traceback (and, for a run that got
    past its preflight, where its log is: a line of its own after the error, see docs/cli.md)."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if len(lines) == 2 and lines[1].startswith("v2p: the log of this run: "):
        lines.pop()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("v2p: error: ")
    return lines[0]


def data_disk(path: Path, mib: int, marker: str) -> None:
    """A blank raw disk of ``mib`` MiB whose last sector starts with ``marker`` (the guest prints it)."""
    with open(path, "wb") as handle:
        handle.truncate(mib << 20)
        handle.seek((mib << 20) - 512)
        handle.write(marker.encode())


def vm_with_disks(target: Any, samples: Path, vmid: int, boot_key: str, data_disks: dict[str, tuple[int, str]],
                  config: dict[str, str]) -> Any:
    """A local-target VM: the sample guest's raw disk at ``boot_key``, then ``data_disks`` (key -> (MiB,
    marker)) as raw volumes of the ``local`` storage; ``config`` adds the rest."""
    storage = target.storage("local")
    for index, key in enumerate([boot_key, *data_disks]):
        volume = storage.volume(vmid, index, "raw")
        volume.path.parent.mkdir(parents=True, exist_ok=True)
        if key == boot_key:
            shutil.copyfile(samples / "guest.raw", volume.path)
        else:
            data_disk(volume.path, *data_disks[key])
        config[key] = volume.volid
    target.create_vm(vmid, config)
    return target


@pytest.fixture
def restore_signal_handlers() -> Any:
    """For tests that call ``cli.main`` in-process: it installs v2p's SIGINT/SIGTERM handlers;
    pytest gets its own back afterwards."""
    import signal
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture
def small_vmdk(tmp_path: Path) -> Path:
    """A 16 MiB VMDK made by the real qemu-img, for tests that need any real disk to name."""
    path = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(path), "16M"], check=True)
    return path


@pytest.fixture
def stop_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, BaseException]]:
    """Point name -> what is raised when a run reaches it (once): the in-process form of
    ``V2P_TEST_HOLD_AFTER`` (testhooks.hold_point) and a kill there."""
    from v2p import pipeline, stages

    points: dict[str, BaseException] = {}

    def hold(name: str) -> None:
        if name in points:
            raise points.pop(name)

    monkeypatch.setattr(pipeline, "hold_point", hold)
    monkeypatch.setattr(stages, "hold_point", hold)
    yield points
