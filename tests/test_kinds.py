"""Kinds register themselves: a test-only target kind and source kind, added to the tables, are what
``make_target``, ``open_source`` and plan checks use, with nothing else told about them; plan.py and
stages.py name no concrete target class; a URI source survives plan loading."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from test_source_vmx import WINDOWS_VMX, make_disk, write_vmx

from v2p import Plan, sources
from v2p.api import inspect_vm, make_target
from v2p.options import OptionError
from v2p.sources import DiskSource, Source, SourceKind, open_source, sniff
from v2p.sources.vmx import VmxSource
from v2p.targets import factory as targets
from v2p.targets.factory import TargetKind, TargetOptions
from v2p.targets.local import LocalTarget

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


class FakeTarget(LocalTarget):
    """A target of a kind v2p does not ship: a local folder that answers a plan's questions itself."""

    kind = "fake"

    def __init__(self, directory: Path, node: str | None) -> None:
        super().__init__(directory)
        self._node = node

    def place(self) -> str:
        return "fake place"

    def node(self) -> str | None:
        return self._node

    def nodes(self) -> list[str]:
        return ["n1", "n2"]

    def storage_contents(self) -> dict[str, frozenset[str] | None]:
        return {"fast": frozenset({"images"}), "isos": frozenset({"iso"})}

    def bridges(self) -> frozenset[str] | None:
        return frozenset({"vmbr0", "vmbr1"})


@pytest.fixture
def fake_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, TargetOptions]]:
    """The ``fake`` target kind (``fake://HOST/NODE``) registered for one test; what it was asked to build."""
    built: list[tuple[str, TargetOptions]] = []

    def from_url(url: str, options: TargetOptions) -> FakeTarget:
        built.append((url, options))
        return FakeTarget(tmp_path / "fake-target", url.split("/", 3)[3] if url.count("/") >= 3 else None)

    def from_dict(settings: dict[str, Any], options: TargetOptions) -> FakeTarget:
        return from_url(settings.get("url", "fake://"), options)

    def with_node(url: str, node: str | None) -> tuple[str, str | None]:
        return (url, None) if node is None else (url.rstrip("/") + "/" + node, node)

    kind = TargetKind("fake", "fake://HOST", "fake://HOST (a test's)", '{"kind": "fake"}', from_url, from_dict,
                      schemes=("fake",), keys=("url",), with_node=with_node)
    monkeypatch.setitem(targets.KINDS, "fake", kind)
    return built


def test_a_registered_target_kind_is_built_by_make_target(fake_kind: list[tuple[str, TargetOptions]]) -> None:
    target = make_target("fake://h1/n1", accel="tcg", secret="s3")
    assert isinstance(target, FakeTarget) and target.node() == "n1"
    assert fake_kind[0][0] == "fake://h1/n1" and fake_kind[0][1].secret == "s3"
    assert isinstance(make_target({"kind": "fake", "url": "fake://h2/"}), FakeTarget)
    with pytest.raises(OptionError) as caught:
        make_target("nowhere://h")
    assert caught.value.hint == "use local or pve://HOST/NODE or fake://HOST"
    with pytest.raises(OptionError) as caught:
        make_target({"kind": "nothing"})
    assert caught.value.hint.endswith(' or {"kind": "fake"}')


def test_the_built_in_kinds_are_in_the_table() -> None:
    assert list(targets.KINDS)[:2] == ["local", "proxmox"]
    assert targets.kind_of("local") is targets.KINDS["local"]
    assert targets.kind_of("pve") is targets.kind_of("pve://h/n") is targets.KINDS["proxmox"]
    assert targets.kind_of("PVE://h/n") is None  # as before: the scheme is spelled pve
    assert targets.target_keys() == ("kind", "dir", "accel", "url")
    assert isinstance(make_target("local"), LocalTarget)


def test_plan_checks_ask_the_target_itself(fake_kind: list[tuple[str, TargetOptions]], tmp_path: Path) -> None:
    make_disk(tmp_path, "a.vmdk", MiB)
    # The storage it says it has, there for the run's own preflight (plan validate runs it too).
    (tmp_path / "fake-target").mkdir()
    (tmp_path / "fake-target" / "storage.cfg").write_text(f"dir: fast\n\tpath {tmp_path / 'fast'}\n\tcontent images\n")
    plan = Plan.from_dict({"defaults": {"target": "fake://h1"}, "vms": [
        {"source": "a.vmdk", "vmid": 120, "name": "one", "storage": "slow"},
        {"source": "a.vmdk", "vmid": 121, "name": "two", "storage": "isos", "bridge": "vmbr9"},
        {"source": "a.vmdk", "vmid": 122, "name": "three", "storage": "fast", "node": "n9"},
        {"source": "a.vmdk", "vmid": 123, "name": "four", "storage": "fast", "node": "n2"},
    ]}, base=tmp_path)
    said = [f"{problem.where}: {problem.message}" for problem in plan.problems()]
    assert said == [
        "vms[0].storage: storage: no storage called 'slow' on the fake place (known: fast, isos)",
        "vms[1].storage: storage: isos on the fake place does not hold VM disks (its content: iso; see: "
        "pvesm set isos --content iso,images)",
        "vms[1].bridge: bridge: no bridge called 'vmbr9' on the fake place (did you mean 'vmbr1'?) (known: vmbr0, "
        "vmbr1)",
        "vms[2].node: node: no node called 'n9' in the PVE cluster (known: n1, n2)",
    ], said
    assert plan.vms[3].target == "fake://h1/n2" and plan.vms[3].node == "n2"


# The modules that run a migration or a plan whatever its kinds: none may name a concrete source or
# target (class or module), nor call a PVE API itself.
KIND_BLIND = ["plan*.py", "stages.py", "stage_*.py", "boot_outcomes.py", "pipeline.py", "dance.py", "verify.py",
              "sizing.py", "targets/sink.py"]
CONCRETE = ["ProxmoxTarget", "LocalTarget", "targets.proxmox", "targets.local", "pve_", "kind_pve", "kind_local",
            "VmxSource", "OvfSource", "OvaSource", "OvfPackage", "DiskSource", "sources.vmx", "sources.ovf",
            "sources.disk", "import vmx", "import ovf", "import disk", '.call("GET"']


def _names(text: str, word: str) -> bool:
    return re.search(re.escape(word) + (r"\b" if word[-1].isalnum() else ""), text) is not None


def test_plan_stages_sinks_and_verify_name_no_concrete_kind() -> None:
    files = sorted({path for pattern in KIND_BLIND for path in (ROOT / "v2p").glob(pattern)})
    assert len(files) >= 12, files  # plan.py and its parts, planrun, planchild, planschedule, planview, ...
    for path in files:
        text = path.read_text()
        for word in CONCRETE:
            assert not _names(text, word), f"{path.relative_to(ROOT)} names {word}"


# -- sources ----------------------------------------------------------------------------------------

@pytest.fixture
def windows_vm(tmp_path: Path) -> Path:
    folder = tmp_path / "Win10 Desktop"
    folder.mkdir()
    for name, size in (("win10.vmdk", 4), ("win10_1.vmdk", 2), ("win10_2.vmdk", 3)):
        make_disk(folder, name, size * MiB)
    return write_vmx(folder, WINDOWS_VMX, "Win10 Desktop.vmx")


class RemoteVM(VmxSource):
    """A VM named by a URI (as a vCenter's would be), read here from a local .vmx."""

    def __init__(self, uri: str, vmx: Path) -> None:
        super().__init__(vmx)
        self.uri = uri

    def describe(self) -> str:
        return self.uri


@pytest.fixture
def remote_kind(windows_vm: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ``testvm`` source kind (``testvm://HOST/PATH``) for one test; the URIs it opened."""
    opened: list[str] = []

    def open_uri(uri: str) -> Source:
        opened.append(uri)
        return RemoteVM(uri, windows_vm)

    monkeypatch.setitem(sources.KINDS, "testvm", SourceKind("testvm", open_uri, schemes=("testvm",)))
    return opened


def test_a_registered_source_kind_is_opened_by_open_source(remote_kind: list[str], tmp_path: Path) -> None:
    source = open_source("testvm://vc.example.com/dc1/vm/Win10")
    assert isinstance(source, RemoteVM) and remote_kind == ["testvm://vc.example.com/dc1/vm/Win10"]
    assert sources.is_uri("testvm://x") and not sources.is_uri("elsewhere://x") and not sources.is_uri(tmp_path)
    # A scheme no kind registered is a path, as it always was.
    assert isinstance(open_source("elsewhere://x"), DiskSource)
    report = inspect_vm("testvm://vc.example.com/dc1/vm/Win10")
    assert report.path == "testvm://vc.example.com/dc1/vm/Win10" and report.kind == "vmx"


def test_local_files_are_still_sniffed_in_order(windows_vm: Path, tmp_path: Path) -> None:
    assert sniff(windows_vm) == "vmx"
    assert sniff(ROOT / "tests" / "fixtures" / "v2p-fixture.ova") == "ova"
    assert sniff(make_disk(tmp_path, "d.vmdk", MiB)) == "disk"
    assert isinstance(open_source(windows_vm.parent), VmxSource)  # a folder holding one .vmx


def test_a_uri_source_survives_plan_loading(remote_kind: list[str], tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text("defaults: {target: {kind: local, dir: target}, networks: {LAN: vmbr0, DMZ: vmbr1}}\n"
                         "vms:\n  - {source: testvm://vc.example.com/dc1/vm/Win10, vmid: 130}\n"
                         "  - {source: disks/../a.vmdk, vmid: 131}\n")
    plan = Plan.load(plan_file)
    uri, local = plan.vms
    assert uri.source == "testvm://vc.example.com/dc1/vm/Win10" and uri.name == "Win10"
    assert local.source == str(tmp_path / "a.vmdk")  # a path still resolves against the plan's folder
    messages = [problem.message for problem in plan.problems()]
    assert not any("testvm:" in message and "no such file" in message for message in messages), messages
    assert any(re.match(rf"source {re.escape(str(tmp_path / 'a.vmdk'))}: no such file", m) for m in messages)
    assert "testvm://vc.example.com/dc1/vm/Win10" in remote_kind
    assert [status.state for status in plan.status()] == ["not started", "not started"]
