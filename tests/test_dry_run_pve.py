"""A dry run onto PVE (the simulator, every request schema-checked) is the real preflight with nothing
made: it reaches the node (its version, the rights checked), checks the bridges of --network against
the node's own (the real run too: today's PVE would take `--network DMZ=vmbr1` and make a VM whose NIC
sits on no bridge), finds the drivers ISO without uploading it, and makes no VM, volume or state file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from pve_sim.fixture import TOKEN_USER, pve_fixture, pve_url  # noqa: F401

from conftest import V2P, one_line_error

ROOT = Path(__file__).resolve().parents[1]


def on_pve(inproc: V2P, sim: Any, tmp_path: Path, *args: str) -> Any:
    return inproc("--target", pve_url(sim), *args, V2P_PVE_TOKEN=sim.tokens[TOKEN_USER],
                  XDG_DATA_HOME=str(tmp_path / "xdg"))


def made(sim: Any) -> tuple[Any, ...]:
    """What a run leaves on the node: VMs, volumes, and any request that is not a read."""
    return (sorted(sim.cluster.vms), sim.volumes(), [(e.method, e.path) for e in sim.log if e.method != "GET"])


def test_an_unknown_bridge_is_refused_by_the_dry_run_and_the_run_alike(pve: Any, tmp_path: Path, source_of: Any,
                                                                       inproc: V2P) -> None:
    src = source_of("monolithicSparse")
    args = ("migrate", str(src.descriptor), "--vmid", "150", "--no-boot-check", "--network", "DMZ=vmbr1")
    before = made(pve)
    dry = on_pve(inproc, pve, tmp_path, *args, "--dry-run")
    line = one_line_error(dry)
    assert line == (f"v2p: error: --network DMZ=vmbr1: no bridge called 'vmbr1' on the PVE node {pve.cluster.node} "
                    "(did you mean 'vmbr0'?) (known: vmbr0) (hint: map it to a bridge the node has (ip link show "
                    "type bridge on the node))"), line
    assert dry.returncode == 4 and made(pve) == before and not (tmp_path / "xdg").exists()
    real = on_pve(inproc, pve, tmp_path, *args)
    assert (real.returncode, one_line_error(real)) == (4, line)
    assert made(pve) == before, "the real run made something before refusing"
    # plan validate says the same of a plan
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"defaults: {{target: \"{pve_url(pve)}\"}}\n"
                    f"vms:\n  - {{source: {src.descriptor}, vmid: 150, networks: {{DMZ: vmbr1}}}}\n")
    checked = inproc.bare("plan", "validate", str(plan), V2P_PVE_TOKEN=pve.tokens[TOKEN_USER],
                          XDG_DATA_HOME=str(tmp_path / "xdg"))
    assert checked.returncode == 2 and "networks: no bridge called 'vmbr1'" in checked.stderr, checked.stderr


def test_the_dry_run_reaches_pve_and_makes_nothing(pve: Any, tmp_path: Path, source_of: Any, inproc: V2P) -> None:
    spec = importlib.util.spec_from_file_location("build_test_iso", ROOT / "drivers_iso" / "build_test_iso.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    iso = module.build(tmp_path / "virtio-win.iso")
    src = source_of("esxi")
    before = made(pve)
    dry = on_pve(inproc, pve, tmp_path, "migrate", str(src.descriptor), "--vmid", "160", "--os", "win7",
                 "--bus", "virtio", "--drivers-iso", str(iso), "--network", "LAN=vmbr0", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    out = dry.stdout
    assert f"on the proxmox target (PVE node {pve.cluster.node}, PVE " in out.splitlines()[0], out
    assert "  rights:    " in out and "/vms/160: VM.Allocate, " in out
    assert "/storage/local: Datastore.AllocateSpace" in out
    assert "  bridges:   vmbr0 (on the PVE node" in out
    assert "  drivers:   local:iso/virtio-win.iso (" in out and "    drivers    Windows onto virtio" in out
    assert "    ide0: local:160/" not in out  # the remote path: the volume is named by PVE's import
    assert made(pve) == before, "the dry run made something on the node (an upload, a VM, a volume)"
    assert not (tmp_path / "xdg").exists(), "the dry run made the state folder"


def test_the_dry_run_on_the_node_makes_nothing_in_its_storages(pve: Any, tmp_path: Path, source_of: Any,
                                                               inproc: V2P) -> None:
    """On the node (``on-node=1``) the disk sink is the node's own storage: its check writes nothing
    there, on a dir storage or an LVM-thin pool (whose volumes PVE allocates), and --copy-with dd is
    checked as the run checks it."""
    src = source_of("monolithicSparse")
    url = f"pve://root@pam!v2p@{pve.host}/{pve.cluster.node}?fingerprint={pve.fingerprint}&on-node=1"
    env = {"V2P_PVE_TOKEN": pve.tokens[TOKEN_USER], "XDG_DATA_HOME": str(tmp_path / "xdg")}
    before = made(pve), sorted(map(str, pve.cluster.root.rglob("*")))
    for storage in ("local", "local-lvm"):
        dry = inproc.bare("--target", url, "migrate", str(src.descriptor), "--vmid", "180", "--storage", storage,
                          "--no-boot-check", "--dry-run", **env)
        assert dry.returncode == 0, dry.stderr
        assert f"  storage:   PVE {pve.cluster.node}:{storage} (" in dry.stdout, dry.stdout
        dd = inproc.bare("--target", url, "migrate", str(src.descriptor), "--vmid", "180", "--storage", storage,
                         "--no-boot-check", "--copy-with", "dd", "--dry-run", **env)
        assert dd.returncode == 1 and "--copy-with dd: disk 0 is monolithicSparse" in one_line_error(dd)
    assert (made(pve), sorted(map(str, pve.cluster.root.rglob("*")))) == before
    assert not (tmp_path / "xdg").exists()
