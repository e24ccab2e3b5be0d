"""The library refuses a wrong value of any keyword with a V2PError naming it, before anything is made:
no AttributeError, TypeError, ValueError or OSError of its own reaches a caller (a panel)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from v2p import api
from v2p.errors import SourceError, V2PError
from v2p.options import OptionError


@pytest.fixture
def disk(small_vmdk: Path) -> Path:
    return small_vmdk


def refused(call: Callable[[], Any], kind: type[V2PError], *fragments: str) -> str:
    """``call`` raises ``kind`` (nothing else) with one line holding every fragment."""
    with pytest.raises(V2PError) as caught:
        call()
    message = str(caught.value)
    assert isinstance(caught.value, kind), f"{type(caught.value).__name__}: {message}"
    assert "\n" not in message and message.isprintable(), message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("target", [123, [], b"local", 1.5, object(), {"kind": "local", "dir": 5},
                                    {"kind": "local", "dir": "/tmp/a\0b"}, {"kind": "local", "flavour": "x"},
                                    {"kind": "local", "accel": 5}, "pve://[::1", "pve://root@pam@[zz/pve1"])
def test_a_target_of_the_wrong_type_or_shape(tmp_path, disk, target) -> None:
    refused(lambda: api.Migration(disk, 101, target=target), OptionError, "target")
    refused(lambda: api.status(target), OptionError, "target")
    assert list(tmp_path.iterdir()) == [disk]


@pytest.mark.parametrize("folder", ["/proc/v2p-target", "/proc/self/v2p", "/sys/v2p"])
def test_a_target_under_a_kernel_file_system(disk, folder) -> None:
    refused(lambda: api.migrate(disk, 101, target={"kind": "local", "dir": folder}, boot_check=False),
            OptionError, folder, "kernel")


def test_an_os_error_of_the_run_is_a_v2p_error(tmp_path, disk) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for folder in (blocker, blocker / "sub"):
        message = refused(lambda: api.migrate(disk, 101, target={"kind": "local", "dir": str(folder)},  # noqa: B023
                                              boot_check=False), V2PError, str(folder))
        assert "not a folder" in message or "Not a directory" in message
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("source", ["/tmp/a\0b.vmdk", 5, None, ["x.vmdk"]])
def test_a_source_no_file_can_be(tmp_path, source) -> None:
    target = {"kind": "local", "dir": str(tmp_path / "t")}
    refused(lambda: api.Migration(source, 101, target=target), SourceError, "source")
    refused(lambda: api.Migration(source, "auto", target=target), SourceError, "source")
    refused(lambda: api.inspect(source), SourceError, "source")
    refused(lambda: api.inspect_vm(source), SourceError, "source")
    refused(lambda: api.inspect_all([source]), SourceError, "source")
    assert not (tmp_path / "t").exists()


BAD = [("start", "yes"), ("start", 1), ("verify", None), ("verify", "false"), ("boot_check", 0), ("force", "no"),
       ("net_drivers", None), ("keep_on_failure", []),
       ("name", 5), ("storage", 5), ("storage", None), ("bridge", 5), ("device", 5), ("drivers_iso", 5),
       ("ostype", []), ("bus", {}), ("fmt", 3), ("copy_with", None), ("scsihw", 1), ("arch", b"amd64"),
       ("networks", []), ("networks", {1: "vmbr0"}), ("networks", {"LAN": 5}), ("ignore_rules", "abc"),
       ("ignore_rules", 5), ("ignore_rules", [1]), ("extra", 5)]


@pytest.mark.parametrize(("keyword", "value"), BAD)
def test_every_keyword_is_type_checked_naming_it(tmp_path, disk, keyword, value) -> None:
    target = {"kind": "local", "dir": str(tmp_path / "t")}
    refused(lambda: api.Migration(disk, 101, target=target, **{keyword: value}), OptionError, f"{keyword}=")
    refused(lambda: api.inspect_vm(disk, **{keyword: value}), OptionError, f"{keyword}=")
    assert not (tmp_path / "t").exists()


def test_verify_none_would_have_skipped_the_byte_check(tmp_path, disk) -> None:
    target = {"kind": "local", "dir": str(tmp_path / "t")}
    refused(lambda: api.migrate(disk, 101, target=target, boot_check=False, verify=None), OptionError,
            "verify=None", "True or False")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(("keyword", "value", "flag"), [
    ("storage", "lo\0cal", "--storage"), ("storage", "lo\ncal", "--storage"), ("device", "/dev/sd\0a", "--to-device"),
    ("drivers_iso", "/x\0.iso", "--drivers-iso"), ("drivers_iso", "/x\n.iso", "--drivers-iso"),
    ("bridge", "vmbr0\nvmbr1", "--bridge"),
])
def test_a_control_character_in_a_path_or_name(tmp_path, disk, keyword, value, flag) -> None:
    target = {"kind": "local", "dir": str(tmp_path / "t")}
    message = refused(lambda: api.Migration(disk, 101, target=target, **{keyword: value}), OptionError, flag)
    assert repr(value)[1:-1] in message  # shown escaped
    assert not (tmp_path / "t").exists()


def test_unknown_keywords_and_handlers(tmp_path, disk) -> None:
    target = {"kind": "local", "dir": str(tmp_path / "t")}
    refused(lambda: api.Migration(disk, 101, target=target, strat=True), OptionError, "'strat'", "start")
    refused(lambda: api.inspect_vm(disk, brige="vmbr0"), OptionError, "'brige'", "bridge")
    refused(lambda: api.Migration(disk, 101, target=target, on_event=5), OptionError, "on_event=5")
    refused(lambda: api.inspect_all("disk.vmdk"), OptionError, "paths=")
    assert not (tmp_path / "t").exists()


def test_dance_remove_and_status_check_theirs_first(tmp_path) -> None:
    target = {"kind": "local", "dir": str(tmp_path / "t")}
    refused(lambda: api.dance(101, target=target, start="yes"), OptionError, "start='yes'")
    refused(lambda: api.dance(101, target=target, confirmed=1), OptionError, "confirmed=1")
    refused(lambda: api.status(target, "101"), OptionError, "VMID '101'")
    refused(lambda: api.local_target(5), OptionError, "--target-dir=5")
    refused(lambda: api.local_target(str(tmp_path), accel="kvmm"), OptionError, "--accel 'kvmm'")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("path", ["/tmp/a\0b.yaml", 5, None])
def test_a_plan_path_no_file_can_be(path) -> None:
    from v2p import Plan

    refused(lambda: Plan.load(path), OptionError, "plan")
