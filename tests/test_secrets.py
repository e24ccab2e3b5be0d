"""A PVE secret goes only where it was configured to go, and never into a message: the line end a
file leaves is stripped, any other control character refused unechoed, a token in the URL refused,
and a target built from a URL gets no secret from the environment unless the caller vouches for it."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import V2P, one_line_error
from v2p import Migration, migrate
from v2p.api import make_target
from v2p.options import OptionError
from v2p.targets.proxmox import target_from_url

SECRET = "5e3c7a1b-0d2f-4e6a-9b8c-7f1e2d3c4b5a"


class Listener:
    """A TCP port on 127.0.0.1 that records every connection made to it (and closes it)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self.stopped = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stopped = True
        self.thread.join()
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    made = Listener()
    yield made
    made.close()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No V2P_PVE_* of the machine's, no pve.conf or pve-secrets of the user's."""
    for name in list(os.environ):
        if name.startswith("V2P_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return monkeypatch


# -- the token's own characters ----------------------------------------------------------------

@pytest.mark.parametrize("given", [SECRET + "\n", SECRET + "\r\n", SECRET])
def test_the_line_end_a_file_leaves_is_stripped(given: str, tmp_path: Path) -> None:
    assert target_from_url("pve://root@pam!v2p@h/pve", {"V2P_PVE_TOKEN": given}).secret == SECRET
    assert target_from_url("pve://root@pam@h/pve", {"V2P_PVE_PASSWORD": given}).secret == SECRET
    assert target_from_url("pve://root@pam!v2p@h/pve", {}, secret=given).secret == SECRET


@pytest.mark.parametrize("given", ["5e3c7a1b\n0d2f", "5e3c7a1b\r0d2f", "5e3c7a1b\x000d2f", "5e3c7a1b\t0d2f",
                                   "5e3c7a1b\x1b[2J0d2f", "5e3c7a1b0d2f\n\n", "5e3c7a1b\u20280d2f",
                                   "5e3c7a1b\x7f0d2f", "\n5e3c7a1b0d2f"])
def test_a_secret_with_a_control_character_is_refused_unechoed(given: str, tmp_path: Path) -> None:
    tries = [lambda: target_from_url("pve://root@pam!v2p@h/pve", {"V2P_PVE_TOKEN": given}),
             lambda: target_from_url("pve://root@pam@h/pve", {"V2P_PVE_PASSWORD": given}),
             lambda: target_from_url("pve://root@pam!v2p@h/pve", {}, secret=given)]
    for attempt in tries:
        with pytest.raises(OptionError) as info:
            attempt()
        shown = str(info.value) + str(info.value.hint)
        assert "5e3c7a1b" not in shown and "0d2f" not in shown and "\n" not in shown, shown
        assert "secret" in info.value.message


def test_a_token_with_a_space_or_non_ascii_is_refused_unechoed() -> None:
    for given in ("5e3c7a1b 0d2f", "5e3c7a1b\u00e90d2f"):  # a token travels in an HTTP header
        with pytest.raises(OptionError) as info:
            target_from_url("pve://root@pam!v2p@h/pve", {"V2P_PVE_TOKEN": given})
        assert "5e3c7a1b" not in str(info.value) + str(info.value.hint)
    # A password goes in a form body: a space is a character like any other there.
    assert target_from_url("pve://root@pam@h/pve", {"V2P_PVE_PASSWORD": "correct horse"}).secret == "correct horse"


def test_the_secrets_file_is_held_to_the_same_rules(tmp_path: Path) -> None:
    path = tmp_path / "pve-secrets"
    path.write_bytes(f"token = {SECRET}\r\n".encode())
    path.chmod(0o600)
    assert target_from_url("pve://root@pam!v2p@h/pve", {"V2P_PVE_SECRETS": str(path)}).secret == SECRET
    path.write_bytes(b"token = 5e3c7a1b\x000d2f\n")
    with pytest.raises(OptionError, match=r"pve-secrets:1") as info:
        target_from_url("pve://root@pam!v2p@h/pve", {"V2P_PVE_SECRETS": str(path)})
    assert "5e3c7a1b" not in str(info.value)


def test_the_cli_refuses_a_token_with_a_line_break_in_one_line(tmp_path: Path, listener: Listener, inproc: V2P) -> None:
    url = f"pve://root@pam!v2p@127.0.0.1:{listener.port}/pve?insecure=1"
    proc = inproc.bare("--target", url, "status", V2P_PVE_TOKEN="5e3c7a1b\n0d2f", XDG_CONFIG_HOME=str(tmp_path),
                       XDG_DATA_HOME=str(tmp_path))
    line = one_line_error(proc)
    assert "V2P_PVE_TOKEN" in line and "5e3c7a1b" not in proc.stdout + proc.stderr and "0d2f" not in line
    assert listener.connections == 0


# -- a token in the URL -------------------------------------------------------------------------

@pytest.mark.parametrize("url", [f"pve://root@pam!v2p={SECRET}@h/pve", f"pve://root@pam!v2p%3D{SECRET}@h/pve",
                                 f"pve://root%40pam%3A{SECRET}@h/pve", f"pve://root@pam!v2p%3A{SECRET}@h/pve"])
def test_a_secret_in_the_url_is_refused_unechoed(url: str) -> None:
    with pytest.raises(OptionError, match="carries") as info:
        target_from_url(url, {"V2P_PVE_TOKEN": "other"})
    assert SECRET not in str(info.value) + str(info.value.hint)


def test_a_secret_in_the_user_setting_is_refused_unechoed() -> None:
    with pytest.raises(OptionError, match="carries") as info:
        target_from_url("pve://h/pve", {"V2P_PVE_USER": f"root@pam!v2p={SECRET}", "V2P_PVE_TOKEN": "x"})
    assert SECRET not in str(info.value)


def test_the_cli_refuses_a_token_in_the_url_in_one_line(tmp_path: Path, listener: Listener, inproc: V2P) -> None:
    url = f"pve://root@pam!v2p={SECRET}@127.0.0.1:{listener.port}/pve?insecure=1"
    proc = inproc.bare("--target", url, "status", V2P_PVE_TOKEN="x" * 8, XDG_CONFIG_HOME=str(tmp_path),
                       XDG_DATA_HOME=str(tmp_path))
    assert "token secret" in one_line_error(proc)
    assert SECRET not in proc.stdout + proc.stderr and listener.connections == 0


# -- whose secret goes where ---------------------------------------------------------------------

def test_a_target_from_a_url_does_not_inherit_the_environment_secret(clean_env, listener, source_of, tmp_path):
    """The panel attack as a library call: a URL from a request names the client's own server."""
    clean_env.setenv("V2P_PVE_TOKEN", SECRET)
    url = f"pve://root@pam!v2p@127.0.0.1:{listener.port}/pve1?insecure=1"
    disk = source_of("monolithicSparse").descriptor
    tries = [lambda: make_target(url), lambda: make_target({"kind": "proxmox", "url": url}),
             lambda: Migration(disk, 120, target=url), lambda: migrate(disk, 120, target=url, boot_check=False),
             lambda: make_target(f"pve://root@pam!v2p@127.0.0.1:{listener.port}/pve1?fingerprint={'ab' * 32}"),
             lambda: make_target(f"pve://root@pam!v2p@127.0.0.1:{listener.port}")]  # no node: would ask PVE
    for attempt in tries:
        with pytest.raises(OptionError, match="not the host this environment configures") as info:
            attempt()
        assert SECRET not in str(info.value) + str(info.value.hint) and "secret=" in str(info.value.hint)
    # The same from the secrets file alone.
    clean_env.delenv("V2P_PVE_TOKEN")
    secrets = tmp_path / "config" / "v2p" / "pve-secrets"
    secrets.parent.mkdir(parents=True)
    secrets.write_text(f"token = {SECRET}\n")
    secrets.chmod(0o600)
    with pytest.raises(OptionError, match="not the host this environment configures"):
        make_target(url)
    assert listener.connections == 0


def test_the_configured_host_gets_its_secret_and_no_other(clean_env, listener):
    clean_env.setenv("V2P_PVE_TOKEN", SECRET)
    clean_env.setenv("V2P_PVE_HOST", "pve1.example.com")
    clean_env.setenv("V2P_PVE_NODE", "pve1")
    clean_env.setenv("V2P_PVE_USER", "root@pam!v2p")
    for url in ("pve", "pve://root@pam!v2p@pve1.example.com/pve1", "pve://root@pam!v2p@PVE1.example.com:8006/pve2",
                "pve://root@pam!v2p@pve1.example.com/pve1?storage=fast"):
        assert make_target(url).settings.secret == SECRET  # type: ignore[attr-defined]
    for url in ("pve://root@pam!v2p@pve1.example.com:9006/pve1", "pve://root@pam!v2p@pve1.example.com/pve1?insecure=1",
                f"pve://root@pam!v2p@pve1.example.com/pve1?fingerprint={'ab' * 32}",
                f"pve://root@pam!v2p@127.0.0.1:{listener.port}/pve1"):
        with pytest.raises(OptionError, match="not the host this environment configures"):
            make_target(url)
    # As configured (a pinned certificate there), the URL may repeat it.
    clean_env.setenv("V2P_PVE_FINGERPRINT", "AB" * 32)
    assert make_target(f"pve://root@pam!v2p@pve1.example.com/pve1?fingerprint={'ab' * 32}") \
        .settings.secret == SECRET  # type: ignore[attr-defined]
    assert listener.connections == 0


def test_a_secret_passed_or_vouched_for_goes_to_the_url(clean_env, listener):
    clean_env.setenv("V2P_PVE_TOKEN", "the-environment-s")
    url = f"pve://root@pam!v2p@127.0.0.1:{listener.port}/pve1"
    assert make_target(url, secret=SECRET).settings.secret == SECRET  # type: ignore[attr-defined]
    assert make_target(url, env=os.environ).settings.secret == "the-environment-s"  # type: ignore[attr-defined]
    with pytest.raises(OptionError, match="secret given") as info:
        make_target(url, secret="5e3c7a1b\n0d2f")
    assert "5e3c7a1b" not in str(info.value)
    with pytest.raises(OptionError, match="empty"):
        make_target(url, secret="")
    assert listener.connections == 0  # made, not used: a node named, nothing asked yet


@pytest.mark.parametrize("which", ["settings", "secrets"])
def test_a_fifo_or_device_at_the_operators_pve_file_is_refused_not_waited_on(tmp_path: Path, which: str) -> None:
    """pve.conf / pve-secrets were read with read_text(): a FIFO there hung every command."""
    from v2p.targets.pve_settings import read_config_file, read_secrets_file

    read = read_config_file if which == "settings" else read_secrets_file
    fifo = tmp_path / "pve-file"
    os.mkfifo(fifo, 0o600)
    zero = tmp_path / "zero-link"
    zero.symlink_to("/dev/zero")
    for path, kind in ((fifo, "FIFO"), (zero, "character device")):
        outcome: list[BaseException] = []
        worker = threading.Thread(target=lambda p=path, out=outcome: out.append(_raised(read, p)), daemon=True)
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), f"reading {path} hung"
        assert isinstance(outcome[0], OptionError), outcome
        assert str(path) in str(outcome[0]) and kind in str(outcome[0]) and "\n" not in str(outcome[0])


def _raised(call: Callable[..., object], *args: object) -> BaseException:
    try:
        call(*args)
    except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
        return exc
    raise AssertionError(f"{call}{args} did not refuse")
