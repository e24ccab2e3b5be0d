"""`v2p plan validate` and the plan model: every problem of a plan at once, each at its line and
column, touching nothing; a valid plan (and every example in pipelines/) validates."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pve_sim.fixture import pve_fixture  # noqa: F401
from test_dance import drivers_iso, standin  # noqa: F401 - drivers_iso is a fixture
from test_whole_vm import make_vm

from conftest import ROOT, V2P, snapshot
from v2p import Plan, PlanError
from v2p.targets.local import LocalTarget

FIXTURES = Path(__file__).parent / "fixtures"
PROBLEM = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<column>\d+): (?P<message>.*)$")


def problems_of(proc: subprocess.CompletedProcess[str], plan: Path) -> list[tuple[int, int, str]]:
    """(line, column, message) of each problem `plan validate` printed; every stderr line is one."""
    assert "Traceback" not in proc.stderr, proc.stderr
    found = []
    for line in proc.stderr.splitlines():
        match = PROBLEM.match(line)
        assert match, f"not FILE:LINE:COLUMN: message: {line!r}"
        assert match["file"] == str(plan)
        found.append((int(match["line"]), int(match["column"]), match["message"]))
    return found


def expect(found: list[tuple[int, int, str]], wanted: list[tuple[int, int, str]]) -> None:
    """Each wanted problem (a message fragment) at exactly its place, and no other problem."""
    left = list(found)
    for line, column, fragment in wanted:
        hits = [p for p in left if p[:2] == (line, column) and fragment in p[2]]
        assert hits, f"no problem {fragment!r} at {line}:{column}; found:\n" + "\n".join(map(str, found))
        left.remove(hits[0])
    assert not left, "unexpected problems:\n" + "\n".join(map(str, left))


@pytest.fixture
def folder(tmp_path: Path, samples: Path) -> Path:
    """A plan folder: web01/web01.vmx (two NICs on LAN and DMZ), disk/disk.vmdk, app01.ova."""
    where = tmp_path / "plans"
    make_vm(where / "web01", samples)
    (where / "disk").mkdir()
    shutil.copyfile(samples / "monolithicSparse" / "monolithicSparse.vmdk", where / "disk" / "disk.vmdk")
    shutil.copyfile(FIXTURES / "v2p-fixture.ova", where / "app01.ova")
    return where


BAD = """\
defaults:
  target: local
  storage: local
  bus: virtoi
  start: maybe
vms:
  - source: web01/web01.vmx
    vmid: 120
    name: web01
  - source: disk/disk.vmdk
    vmid: 120
    name: web01
    cores: two
  - source: missing/gone.vmdk
    vmid: 0121
    stroage: local
  - source: disk/disk.vmdk
    vmid: 122
    name: other
    storage: nowhere
    storage: local
  - source: disk/disk.vmdk
    vmid: 123
    name: secret-one
    target: pve://root@pam:hunter2@pve.example.com/pve1
    password: hunter2
  - source: disk/disk.vmdk
    vmid: 5
    name: low
    networks: vmbr0
    memory: 8
extra: 1
"""


def test_every_problem_is_reported_at_its_line_and_column_and_nothing_is_made(folder, tmp_path, v2p: V2P):
    plan = folder / "bad.yaml"
    plan.write_text(BAD)
    before = snapshot(folder)
    proc = v2p("plan", "validate", str(plan), XDG_DATA_HOME=str(tmp_path / "xdg"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    expect(problems_of(proc, plan), [
        (4, 8, "bus: unknown bus 'virtoi' (did you mean 'virtio'?)"),
        (5, 10, "start: expected true or false, found the text 'maybe'"),
        # The .vmx's NICs are on LAN and DMZ, which nothing maps: its preflight rule errors.
        (7, 13, "rule unmapped-network: net0 is on network 'LAN'"),
        (7, 13, "rule unmapped-network: net1 is on network 'DMZ'"),
        (11, 11, "vmid 120 is also VM web01's (line 7)"),
        (12, 11, "name 'web01' is also the name of the VM on line 7"),
        (13, 12, "cores: expected a whole number in the digits 0-9, found the text 'two'"),
        (14, 13, "missing/gone.vmdk: no such file or folder"),
        (15, 11, "vmid: expected a whole number in the digits 0-9 or auto, found the number 0121 (YAML reads a "
                 "leading 0 as octal)"),
        (16, 5, "unknown key 'stroage' (did you mean 'storage'?)"),
        (20, 14, "storage: no storage called 'nowhere' on the local target"),
        (21, 5, "key 'storage' appears twice (first on line 20)"),
        (25, 13, "target: the URL carries a password: refused"),
        (26, 5, "'password' looks like a secret: refused"),
        (28, 11, "vmid: VMID 5 is out of range"),
        (30, 15, "networks: expected a mapping (key: value lines), found the text 'vmbr0'"),
        (31, 13, "memory 8: must be a whole number from 16 to"),
        (32, 1, "unknown key 'extra'"),
    ])
    assert "hunter2" not in proc.stderr  # a secret is refused, never shown
    # Touching nothing: no target folder, no state, no lock, no default data folder; sources as they were.
    assert not v2p.target.exists()
    assert not (tmp_path / "xdg").exists()
    assert snapshot(folder) == before


def test_a_valid_plan_validates_touching_nothing(folder, tmp_path, v2p: V2P):
    plan = folder / "good.yaml"
    plan.write_text("""\
defaults:
  networks: {"VM Network": vmbr0}
vms:
  - source: web01/web01.vmx
    vmid: 120
    networks: {LAN: vmbr0, DMZ: vmbr1}
  - source: disk/disk.vmdk
    vmid: auto
    os: win10
    bus: ide
  - {source: app01.ova, vmid: 122, name: app01, start: true, bwlimit: 1024, boot_timeout: 90.5}
""")
    proc = v2p("plan", "validate", str(plan), XDG_DATA_HOME=str(tmp_path / "xdg"))
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert proc.stdout == f"{plan}: 3 VMs, OK\n"
    assert not v2p.target.exists()
    loaded = Plan.load(plan)
    assert [(vm.name, vm.vmid, vm.line) for vm in loaded.vms] == [("web01", 120, 4), ("disk", "auto", 7),
                                                                     ("app01", 122, 11)]
    assert loaded.vms[0].options["networks"] == {"LAN": "vmbr0", "DMZ": "vmbr1"}  # the VM's own, not merged
    assert loaded.vms[1].options == {"networks": {"VM Network": "vmbr0"}, "ostype": "win10", "bus": "ide"}
    assert loaded.vms[2].options["boot_timeout"] == 90.5 and loaded.vms[2].options["start"] is True
    assert loaded.vms[1].source == str(folder / "disk" / "disk.vmdk")


def test_a_vmid_another_vm_holds_is_a_problem(folder, v2p: V2P):
    target = LocalTarget(v2p.target)
    target.create_vm(130, {"name": "someone-else", "memory": "512"})
    before = snapshot(v2p.target)
    plan = folder / "taken.yaml"
    plan.write_text("vms:\n  - source: disk/disk.vmdk\n    vmid: 130\n")
    proc = v2p("plan", "validate", str(plan))
    expect(problems_of(proc, plan), [(3, 11, "vmid 130 is taken on the local target by a VM this plan's "
                                             "migration did not make")])
    assert snapshot(v2p.target) == before


# (plan text, (line, column or the text the problem points at), what it says)
@pytest.mark.parametrize(("text", "where", "fragment"), [
    ("vms:\n  - source: a.vmdk\n    vmid: [120\n", (4, 1), "not valid YAML"),  # where the input ended
    ("defaults: &d\n  storage: local\nvms:\n  - source: a.vmdk\n    vmid: 120\n", (1, "&d"), "anchor &d"),
    ("vms:\n  - source: !!binary aGk=\n    vmid: 120\n", (2, "!!binary"), "tag tag:yaml.org,2002:binary"),
    ("", (1, 1), "the plan is empty"),
    ("- source: a.vmdk\n", (1, "-"), "the plan: expected a mapping"),
    ("defaults: {}\n", (1, "defaults"), "the plan has no vms:"),
    ("vms: []\n", (1, "[]"), "vms: the list is empty"),
    ("vms:\n  - vmid: 120\n", (2, "vmid"), "vms[0]: no source:"),
    ("vms:\n  - source: a.vmdk\n", (2, "source"), "vms[0]: no vmid:"),
    ("defaults:\n  name: x\nvms:\n  - {source: a.vmdk, vmid: 120}\n", (2, "name"), "name is set per VM"),
    ("vms:\n  - {source: a.vmdk, vmid: 120, node: pve2}\n", (2, "pve2"), "node: applies to a pve:// target only"),
    ("vms:\n  - {source: a.vmdk, vmid: 120, target: {kind: lokal}}\n", (2, "lokal"), "did you mean 'local'"),
    ("vms:\n  - {source: a.vmdk, vmid: 120, target: 'pve://h/n?token=abc'}\n", (2, "'pve:"), "carries a secret"),
    ("vms:\n  - {source: a.vmdk, vmid: 120, ignore_rules: [rdm-disk]}\n", (2, "[rdm"), "cannot be ignored"),
    ("vms:\n  - {source: a.vmdk, vmid: 120, copy_with: dd, bwlimit: 10}\n", (2, "{"), "does not apply"),
    ("vms:\n  - {source: a.vmdk, vmid: 120, name: 'web_01'}\n", (2, "'web_01'"), "not a valid VM name"),
    ("vms:\n  - {source: a.vmdk, vmid: 120, bus: virtio, bus: ide}\n", (2, "bus: ide"), "key 'bus' appears twice"),
    ("vms:\n  - {source: a.vmdk, vmid: 120, target: {url: 'pve://h/n', pve_token: x}}\n", (2, "pve_token"),
     "'pve_token' looks like a secret"),
    ("vms:\n  - {source: a.vmdk, vmid: 120, passthrough: x}\n", (2, "passthrough"), "unknown key 'passthrough'"),
])
def test_each_kind_of_mistake_in_the_text(tmp_path, v2p: V2P, text, where, fragment):
    line, column = where
    if isinstance(column, str):
        column = text.splitlines()[line - 1].index(column) + 1
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    (tmp_path / "a.vmdk").write_bytes(b"")  # missing or not, it is not what these are about
    found = [p for p in problems_of(v2p("plan", "validate", str(plan)), plan) if "a.vmdk" not in p[2]]
    assert [(p[0], p[1]) for p in found if fragment in p[2]] == [(line, column)], found


def test_from_dict_names_the_place_and_strict_loads_raise_every_problem(tmp_path):
    data: dict[str, Any] = {"defaults": {"bus": "sata", "strat": True},
                            "vms": [{"source": "x.vmdk", "vmid": "121"}, {"source": "x.vmdk", "vmid": 130}]}
    plan = Plan.from_dict(data, base=tmp_path, strict=False)
    shown = [str(problem) for problem in plan.problems()]
    assert "<plan>: defaults.strat: defaults: unknown key 'strat' (did you mean 'start'?)" in shown
    assert "<plan>: vms[0].vmid: vmid: expected a whole number in the digits 0-9 or auto, found the text '121'" \
        in shown
    for where in ("vms[0]", "vms[1]"):  # the one left out for its vmid too
        assert f"<plan>: {where}.source: source {tmp_path / 'x.vmdk'}: no such file or folder" in shown
    with pytest.raises(PlanError) as raised:
        Plan.from_dict(data, base=tmp_path)
    assert len(raised.value.problems) == 2  # the text's own; the world's come from problems()
    assert [vm.source for vm in plan.vms] == [str(tmp_path / "x.vmdk")]  # a source string (a path, or a URI)
    assert plan.vms[0].options == {"bus": "sata"}
    # A VM's own wrong value is left out, not replaced by the default's (which it meant to override).
    plan = Plan.from_dict({"defaults": {"bus": "sata", "vmid": "auto"},
                           "vms": [{"source": "x.vmdk", "bus": "virtoi", "vmid": -1}]}, base=tmp_path, strict=False)
    assert [(vm.vmid, vm.options) for vm in plan.vms] == []
    plan = Plan.from_dict({"defaults": {"bus": "sata"}, "vms": [{"source": "x.vmdk", "bus": "virtoi", "vmid": 130}]},
                          base=tmp_path, strict=False)
    assert [(vm.vmid, vm.options) for vm in plan.vms] == [(130, {})]


def test_plan_run_and_status_refuse_a_broken_plan_in_one_line(tmp_path, v2p: V2P):
    plan = tmp_path / "plan.yaml"
    plan.write_text("vms:\n  - source: a.vmdk\n    vmid: 12x\n    cpus: 2\n")
    for command in ("run", "status"):
        proc = v2p("plan", command, str(plan))
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr == (f"v2p: error: {plan}:3:11: vmid: expected a whole number in the digits 0-9 or "
                               f"auto, found the text '12x' (and 1 more) (hint: see them all: v2p plan validate "
                               f"{plan})\n")
    assert not v2p.target.exists()


# -- Proxmox -------------------------------------------------------------------------------------------


def pve_url(sim: Any, **query: str) -> str:
    extra = "".join(f"&{key}={value}" for key, value in query.items())
    return f"pve://root@pam!v2p@{sim.host}/{sim.cluster.node}?fingerprint={sim.fingerprint}{extra}"


def test_pve_storages_and_bridges_are_asked_of_the_node(folder, tmp_path, pve, v2p: V2P):
    pve.cluster.add_storage("isos", "dir", {"iso"})
    pve.cluster.bridges = ["vmbr0", "vmbr1"]
    plan = folder / "pve.yaml"
    plan.write_text(f"""\
defaults:
  target: {pve_url(pve)}
  storage: local-lvm
vms:
  - source: web01/web01.vmx
    vmid: 120
    networks: {{LAN: vmbr0, DMZ: vmbr7}}
  - source: disk/disk.vmdk
    vmid: 121
    storage: lcoal-lvm
    bridge: vmbr1
  - source: app01.ova
    vmid: 122
    storage: isos
    bridge: vmbr9
  - source: disk/disk.vmdk
    vmid: 123
    node: pve9
    name: elsewhere
""")
    before = snapshot(pve.root)
    proc = v2p("plan", "validate", str(plan), V2P_PVE_TOKEN=pve.tokens["root@pam!v2p"],
               XDG_DATA_HOME=str(tmp_path / "xdg"))
    expect(problems_of(proc, plan), [
        (7, 15, "networks: no bridge called 'vmbr7' on the PVE node pve1"),
        (10, 14, "storage: no storage called 'lcoal-lvm' on the PVE node pve1 (did you mean 'local-lvm'?)"),
        (14, 14, "storage: isos on the PVE node pve1 does not hold VM disks"),
        (15, 13, "bridge: no bridge called 'vmbr9' on the PVE node pve1 (did you mean 'vmbr1'?) (known: vmbr0, "
                 "vmbr1)"),
        (18, 11, "node: no node called 'pve9' in the PVE cluster (did you mean 'pve1'?) (known: pve1)"),
    ])
    assert not pve.cluster.vms and snapshot(pve.root) == before  # nothing made on the node
    assert not (tmp_path / "xdg").exists()
    assert pve.refused == [] and pve.unsimulated == []
    # the hint keeps the storage's content types (pvesm set --content replaces the list)
    assert "see: pvesm set isos --content iso,images)" in proc.stdout + proc.stderr


def test_an_unreachable_pve_is_one_problem(folder, tmp_path, v2p: V2P):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    plan = folder / "pve.yaml"
    plan.write_text(f"""\
defaults:
  target: pve://root@pam!v2p@127.0.0.1:{port}/pve1?timeout=5
vms:
  - {{source: disk/disk.vmdk, vmid: 120, name: a}}
  - {{source: disk/disk.vmdk, vmid: 121, name: b, bridge: vmbr0}}
  - {{source: disk/disk.vmdk, vmid: 122, name: c, node: pve2}}
""")
    proc = v2p("plan", "validate", str(plan), V2P_PVE_TOKEN="x", XDG_CONFIG_HOME=str(tmp_path / "config"))
    found = problems_of(proc, plan)
    assert len(found) == 1 and found[0][:2] == (2, 11), found
    assert "cannot reach" in found[0][2] or "connect" in found[0][2].lower(), found
    # No secret at all: also one problem, naming where the secret goes.
    proc = v2p("plan", "validate", str(plan), XDG_CONFIG_HOME=str(tmp_path / "config"))
    found = problems_of(proc, plan)
    assert [p[:2] for p in found] == [(2, 11)] and "V2P_PVE_TOKEN" in found[0][2], found


# -- the examples in pipelines/ -----------------------------------------------------------------------


EXAMPLES = sorted(path.name for path in (ROOT / "pipelines").glob("*.yaml"))


def test_the_examples_are_there():
    assert {"wave-local.yaml", "wave-pve.yaml", "overrides.yaml"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_has_no_problem_but_its_placeholder_files(name, tmp_path, pve, v2p: V2P):
    text = (ROOT / "pipelines" / name).read_text()
    # Onto the simulator instead of pve.example.com, its one node standing in for every node named.
    text = re.sub(r"pve://\S+", pve_url(pve, storage="local-lvm"), text)
    text = re.sub(r"\bpve2\b", pve.cluster.node, text)
    plan = tmp_path / name
    plan.write_text(text)
    yaml.safe_load(text)  # plain YAML for any other tool too
    v2p.target.mkdir()
    (v2p.target / "storage.cfg").write_text(f"dir: bulk\n\tpath {tmp_path / 'bulk'}\n")
    proc = v2p("plan", "validate", str(plan), V2P_PVE_TOKEN=pve.tokens["root@pam!v2p"],
               XDG_DATA_HOME=str(tmp_path / "xdg"))
    found = problems_of(proc, plan)
    assert found, "an example with every file in place?"
    for _line, _column, message in found:
        assert re.fullmatch(rf"(source|drivers_iso) {re.escape(str(tmp_path))}/\S+: no such file( or folder)?",
                            message), message
    assert len(Plan.load(plan).vms) >= 3
    assert pve.refused == [] and pve.unsimulated == []


def test_the_local_wave_validates_once_its_folder_is_filled(tmp_path, manifest, samples, drivers_iso,  # noqa: F811
                                                            v2p: V2P):
    plan = tmp_path / "wave" / "wave-local.yaml"
    plan.parent.mkdir()
    shutil.copyfile(ROOT / "pipelines" / "wave-local.yaml", plan)
    for vm in Plan.load(plan).vms:
        source = Path(vm.source)
        if vm.name in ("web01", "db01"):  # a .vmx, and a VM folder holding one
            make_vm(source if vm.name == "db01" else source.parent, samples)
            continue
        source.parent.mkdir(parents=True, exist_ok=True)
        if source.suffix == ".ova":
            shutil.copyfile(FIXTURES / "v2p-fixture.ova", source)
        else:
            windows = vm.options.get("ostype", "").startswith("win")
            shutil.copyfile(standin(manifest, tmp_path) if windows else
                            samples / "monolithicSparse" / "monolithicSparse.vmdk", source)
            shutil.rmtree(tmp_path / "src", ignore_errors=True)
    (plan.parent / "iso").mkdir()
    shutil.copyfile(drivers_iso, plan.parent / "iso" / "virtio-win.iso")
    proc = v2p("plan", "validate", str(plan), XDG_DATA_HOME=str(tmp_path / "xdg"))
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert proc.stdout == f"{plan}: 6 VMs, OK\n"
    assert not v2p.target.exists()


def test_a_plan_that_is_not_text_or_not_there(tmp_path, v2p: V2P):
    plan = tmp_path / "plan.yaml"
    plan.write_bytes(b"vms:\n  - source: caf\xe9.vmdk\n    vmid: 120\n")  # Latin-1, not UTF-8
    proc = v2p("plan", "validate", str(plan))
    assert proc.returncode == 2
    assert problems_of(proc, plan) == [(2, 16, "the plan is not UTF-8 text (byte 0xe9)")]
    proc = v2p("plan", "validate", str(tmp_path / "nope.yaml"))
    assert (proc.returncode, proc.stderr) == (1, f"v2p: error: {tmp_path / 'nope.yaml'}: cannot read the plan: "
                                                 "No such file or directory\n")
    proc = v2p("--target", "pve://h/n", "plan", "status", str(plan))
    assert proc.returncode == 1 and proc.stderr.startswith("v2p: error: --target does not apply to plans")


def test_vmids_are_unique_per_cluster_not_per_node(tmp_path):
    data = {"defaults": {"target": "pve://root@pam!v2p@pve-a.example.com/pve1?storage=local-lvm"},
            "vms": [{"source": "a.vmdk", "vmid": 120, "name": "one"},
                    {"source": "b.vmdk", "vmid": 120, "name": "two", "node": "pve2"},
                    {"source": "c.vmdk", "vmid": 120, "name": "three",
                     "target": "pve://root@pam!v2p@pve-b.example.com/pve1"},
                    {"source": "d.vmdk", "vmid": 120, "name": "four", "target": "local"}]}
    plan = Plan.from_dict(data, base=tmp_path, strict=False)
    assert [(vm.name, vm.target, vm.node) for vm in plan.vms] == [
        ("one", "pve://root@pam!v2p@pve-a.example.com/pve1?storage=local-lvm", "pve1"),
        ("two", "pve://root@pam!v2p@pve-a.example.com/pve2?storage=local-lvm", "pve2"),  # the node folded in
        ("three", "pve://root@pam!v2p@pve-b.example.com/pve1", "pve1"),
        ("four", "local", None)]
    with pytest.raises(PlanError) as raised:
        Plan.from_dict(data, base=tmp_path)
    assert [str(problem) for problem in raised.value.problems] == [
        "<plan>: vms[1].vmid: vmid 120 is also VM one's (vms[0]) on the same target"]
    # Two `vmid: auto` VMs of one source would both find (and resume) the same migration.
    twice = {"vms": [{"source": "a.vmdk", "vmid": "auto", "name": "x"}, {"source": "./a.vmdk", "vmid": "auto"}]}
    with pytest.raises(PlanError) as raised:
        Plan.from_dict(twice, base=tmp_path)
    assert [str(problem) for problem in raised.value.problems] == [
        "<plan>: vms[1].vmid: vmid auto: VM x (vms[0]) migrates the same source with vmid auto: both would resume "
        "one migration"]
