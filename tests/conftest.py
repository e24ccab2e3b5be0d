"""Shared fixtures: the sample images (built once per session with the real
nasm and qemu-img), per-test copies of them, and a runner for the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
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


# The fixtures that start real processes: the v2p CLI, the PVE simulator (and the QEMU guests it
# runs), the example panel. A test using one is ``slow``; ``make test-fast`` runs the rest, the in-process logic.
_SLOW_FIXTURES = {"v2p", "pve", "pve_remote", "pve_node", "sim", "panel"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    global _may_use_samples
    _may_use_samples = "manifest" in getattr(item, "fixturenames", ())
    try:
        yield
    finally:
        _may_use_samples = True


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


class V2P:
    """Runs the real ``v2p`` command against one local target directory."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "v2p", "--accel", "tcg", "--target-dir", str(self.target), *args]

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("V2P_")}
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
def v2p(tmp_path: Path) -> V2P:
    return V2P(tmp_path / "target")


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


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The CLI failed the way a user should see it: non-zero, one line, no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
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
