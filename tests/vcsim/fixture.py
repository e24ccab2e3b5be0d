"""The ``vcsim`` pytest fixture: VMware's vCenter simulator (govmomi's ``simulator`` package, which Debian
ships as Go source) run by our own launcher, ``main.go`` beside this file, on 127.0.0.1 over TLS.

Use it with ``from vcsim.fixture import vcsim_fixture  # noqa: F401``; requesting it marks a test
``vcsim`` and ``slow`` (conftest's ``_MARKING_FIXTURES``). The launcher is built once in GOPATH mode
against /usr/share/gocode (``GO111MODULE=off``: Debian's Go packages are a GOPATH, not modules) into
``~/.cache/v2p-tests/vcsim/`` under the hash of its source and Go's version; later starts take a
fraction of a second. The login travels in the launcher's environment, never its argv; it is stopped
by its PID.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

HERE = Path(__file__).resolve().parent
GOCODE = Path("/usr/share/gocode")
SIMULATOR = GOCODE / "src/github.com/vmware/govmomi/simulator"
PACKAGES = "golang-go golang-github-vmware-govmomi-dev"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "v2p-tests" / "vcsim"


def binary() -> Path:
    """The launcher, built if this source (and Go) have no binary in the cache yet."""
    go = shutil.which("go")
    if go is None or not SIMULATOR.is_dir():
        pytest.fail(f"vcsim needs Go and govmomi's simulator: apt-get install -y {PACKAGES} "
                    "(scripts/setup-system.sh installs them)")
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256((HERE / "main.go").read_bytes() + version.encode()).hexdigest()[:16]
    cache = cache_dir()
    built = cache / f"vcsim-{key}"
    if built.exists():
        return built
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "build.lock", "w") as lock:  # one build at a time (pytest-xdist, two sessions)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.exists():
            env = dict(os.environ, GO111MODULE="off", GOPATH=f"{GOCODE}:{cache / 'gopath'}",
                       GOCACHE=str(cache / "gocache"), CGO_ENABLED="0")
            partial = built.with_suffix(".part")
            result = subprocess.run([go, "build", "-o", str(partial), "."], cwd=HERE, env=env,
                                    capture_output=True, text=True)
            if result.returncode:
                pytest.fail(f"building the vcsim launcher failed:\n{result.stderr}")
            partial.rename(built)
            for old in cache.glob("vcsim-*"):  # builds of an earlier main.go or Go
                if old != built:
                    old.unlink(missing_ok=True)
    return built


@dataclass
class Vcsim:
    """A running simulator: where it is, who may log in, and its certificate."""

    url: str  # https://127.0.0.1:PORT/sdk
    user: str
    password: str = field(repr=False)
    fingerprint: str  # SHA-256 of its certificate, 64 hex digits
    cert: Path  # its certificate (self-signed, RSA-2048) as a PEM file: a CA file for it
    process: subprocess.Popen[str] = field(repr=False)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 443

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start(user: str = "v2p@vsphere.local", password: str | None = None) -> Vcsim:
    """A simulator accepting only ``user``/``password`` (a random password when None)."""
    password = password or "pw-" + secrets.token_urlsafe(12)
    env = dict(os.environ, VCSIM_USER=user, VCSIM_PASSWORD=password)
    process = subprocess.Popen([str(binary())], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait()
        pytest.fail(f"the vcsim launcher exited ({process.returncode}) without saying where it listens")
    info = json.loads(line)
    return Vcsim(info["url"], user, password, info["fingerprint"], Path(info["cert"]), process)


@pytest.fixture(name="vcsim")
def vcsim_fixture() -> Iterator[Vcsim]:
    sim = start()
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture(name="si")
def si_fixture(vcsim: Vcsim) -> Iterator[Any]:
    """A pyvmomi session of the test's own on ``vcsim``, to build VMs with and look at them."""
    from pyVim.connect import Disconnect, SmartConnect

    context = ssl.create_default_context(cafile=str(vcsim.cert))
    session = SmartConnect(host=vcsim.host, port=vcsim.port, user=vcsim.user, pwd=vcsim.password, sslContext=context)
    try:
        yield session
    finally:
        Disconnect(session)


def wait(task: Any) -> Any:
    """The result of a vSphere ``task`` once it succeeded (an AssertionError if it failed or hangs)."""
    from pyVmomi import vim

    for _ in range(600):
        if task.info.state == vim.TaskInfo.State.success:
            return task.info.result
        if task.info.state == vim.TaskInfo.State.error:
            raise AssertionError(task.info.error)
        time.sleep(0.05)
    raise AssertionError("task did not end")
