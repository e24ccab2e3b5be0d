"""`v2p vm rm` removes only what v2p made: a VM whose description carries the tag of the migration
its record names. Any other VM (made by hand or another tool, a clone of a v2p VM, one that took the
VMID of a migration record) is removed only with `--force` and its name typed back; a migration onto a
taken VMID hints `--vmid auto`, never `vm rm`. On the PVE simulator (the foreign VM made through its
API) and on the local target (a hand-written config)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3
from pve_sim.fixture import TOKEN_USER, on_pve, pve_fixture, pve_url  # noqa: F401

import v2p as lib
from conftest import V2P, one_line_error

# -- the PVE simulator -------------------------------------------------------------------------------



def pve_api(sim: Any, method: str, path: str, **values: str) -> Any:
    """A call to the simulator's API as any other PVE client makes it (not through v2p)."""
    urllib3.disable_warnings()
    resp = requests.request(method, f"https://{sim.host}/api2/json/{path}", data=values or None,
                            headers={"Authorization": f"PVEAPIToken={TOKEN_USER}={sim.tokens[TOKEN_USER]}"},
                            verify=False, timeout=30)
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    if isinstance(data, str) and data.startswith("UPID:"):
        deadline = time.monotonic() + 30
        while True:
            status = requests.get(f"https://{sim.host}/api2/json/nodes/{sim.cluster.node}/tasks/"
                                  f"{data}/status", verify=False, timeout=30,
                                  headers={"Authorization": f"PVEAPIToken={TOKEN_USER}={sim.tokens[TOKEN_USER]}"})
            if status.json()["data"]["status"] == "stopped":
                assert status.json()["data"]["exitstatus"] == "OK", status.text
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
    return data


def make_foreign_vm(sim: Any, vmid: int, name: str = "production-db", **extra: str) -> str:
    """A VM made through PVE's API by someone else, with a disk of its own; its disk's volume id."""
    pve_api(sim, "POST", f"nodes/{sim.cluster.node}/qemu", vmid=str(vmid), name=name, memory="512",
            scsi0="local-lvm:1", **extra)
    volid: str = sim.cluster.vms[vmid].config["scsi0"].split(",")[0]
    assert sim.cluster.volume_path(volid).exists()
    return volid


def assert_untouched(sim: Any, vmid: int, volid: str, name: str = "production-db") -> None:
    assert vmid in sim.cluster.vms, "the foreign VM was removed"
    assert sim.cluster.vms[vmid].config["name"] == name
    assert sim.cluster.volume_path(volid).exists(), "the foreign VM's disk was removed"


def test_pve_foreign_vm_is_refused_unless_its_name_is_typed_back(pve: Any, tmp_path: Path, source_of: Any,
                                                                 v2p: V2P) -> None:
    volid = make_foreign_vm(pve, 150)
    src = source_of("monolithicSparse")
    line = one_line_error(on_pve(v2p, pve, tmp_path, "migrate", str(src.descriptor), "--vmid", "150",
                                 "--no-boot-check"))
    assert "VMID 150 already exists" in line and "--vmid auto" in line, line
    assert "vm rm" not in line, line  # the hint that destroyed production-db
    assert_untouched(pve, 150, volid)

    refused = on_pve(v2p, pve, tmp_path, "vm", "rm", "150")
    line = one_line_error(refused)
    assert refused.returncode == 4
    assert "VM 150 ('production-db' " not in line and "VM 150 (production-db) was not made by v2p" in line, line
    assert "not removed" in line and "--force --confirm-name production-db" in line, line
    assert_untouched(pve, 150, volid)

    for wrong in (["--force"], ["--force", "--confirm-name", "production"],
                  ["--force", "--confirm-name", "production-db "], ["--force", "--confirm-name", ""],
                  ["--confirm-name", "production-db"]):
        proc = on_pve(v2p, pve, tmp_path, "vm", "rm", "150", *wrong)
        line = one_line_error(proc)
        assert "removed" not in line.replace("not removed", "").replace("nothing removed", ""), (wrong, line)
        assert_untouched(pve, 150, volid)

    done = on_pve(v2p, pve, tmp_path, "vm", "rm", "150", "--force", "--confirm-name", "production-db")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "VM 150 removed" in done.stdout
    assert 150 not in pve.cluster.vms and not pve.cluster.volume_path(volid).exists()
    assert pve.refused == [] and pve.unsimulated == []


def test_pve_clone_of_a_v2p_vm_is_not_v2p_s(pve: Any, tmp_path: Path, source_of: Any, v2p: V2P) -> None:
    """A clone carries the description (so the tag) of the VM it was cloned from, but no record of
    v2p's names it; v2p's own VM is still removed without --force."""
    src = source_of("monolithicSparse")
    made = on_pve(v2p, pve, tmp_path, "migrate", str(src.descriptor), "--vmid", "151", "--no-boot-check")
    assert made.returncode == 0, made.stdout + made.stderr
    description = pve.cluster.vms[151].config["description"]
    assert "v2p migration " in description
    volid = make_foreign_vm(pve, 152, name="clone", description=description)
    line = one_line_error(on_pve(v2p, pve, tmp_path, "vm", "rm", "152"))
    assert "VM 152 (clone) was not made by v2p" in line, line
    assert_untouched(pve, 152, volid, "clone")
    removed = on_pve(v2p, pve, tmp_path, "vm", "rm", "151")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert 151 not in pve.cluster.vms and 152 in pve.cluster.vms


def test_pve_vm_that_took_a_recorded_vmid_is_kept_and_the_record_discarded(pve: Any, tmp_path: Path,
                                                                           source_of: Any, v2p: V2P) -> None:
    """v2p's VM removed behind its back and the VMID given to another VM: the record names a migration
    whose tag the new VM does not carry."""
    src = source_of("monolithicSparse")
    made = on_pve(v2p, pve, tmp_path, "migrate", str(src.descriptor), "--vmid", "153", "--no-boot-check",
                  "--keep-on-failure")
    assert made.returncode == 0, made.stdout + made.stderr
    record = tmp_path / "xdg" / "v2p" / "pve" / f"127.0.0.1-{pve.cluster.node}" / "153.json"
    data = json.loads(record.read_text())
    data["finished"] = False  # an unfinished record: it is not stale when its VM has gone
    record.write_text(json.dumps(data))
    pve_api(pve, "DELETE", f"nodes/{pve.cluster.node}/qemu/153")
    volid = make_foreign_vm(pve, 153)
    line = one_line_error(on_pve(v2p, pve, tmp_path, "vm", "rm", "153"))
    assert "VM 153 (production-db) was not made by v2p" in line, line
    assert "discarded v2p's migration records of that VMID" in line, line
    assert_untouched(pve, 153, volid)
    assert not record.exists()


# -- the local target ---------------------------------------------------------------------------------

HAND_WRITTEN = "name: precious\nmemory: 512\nscsi0: local:120/vm-120-disk-0.qcow2\n"


@pytest.fixture
def hand_made(v2p: V2P) -> tuple[Path, Path]:
    """A VM config v2p did not write, with a disk of its own on the local storage."""
    conf = v2p.target / "qemu-server" / "120.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(HAND_WRITTEN)
    disk = v2p.target / "images" / "120" / "vm-120-disk-0.qcow2"
    disk.parent.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    return conf, disk


def assert_kept(conf: Path, disk: Path) -> None:
    assert conf.read_text() == HAND_WRITTEN
    assert disk.exists()


def test_local_hand_written_config_is_refused_unless_named(hand_made: tuple[Path, Path], source_of: Any,
                                                           v2p: V2P) -> None:
    conf, disk = hand_made
    src = source_of("monolithicSparse")
    line = one_line_error(v2p("migrate", str(src.descriptor), "--vmid", "120", "--os", "l26", "--no-boot-check"))
    assert "VMID 120 already exists" in line and "--vmid auto" in line and "vm rm" not in line, line
    assert_kept(conf, disk)

    refused = v2p("vm", "rm", "120")
    line = one_line_error(refused)
    assert refused.returncode == 4
    assert "VM 120 (precious) was not made by v2p" in line and "--force --confirm-name precious" in line, line
    assert_kept(conf, disk)
    for wrong in (["--force"], ["--force", "--confirm-name", "Precious"], ["--confirm-name", "precious"]):
        one_line_error(v2p("vm", "rm", "120", *wrong))
        assert_kept(conf, disk)

    done = v2p("vm", "rm", "120", "--force", "--confirm-name", "precious")
    assert done.returncode == 0, done.stderr
    assert not conf.exists() and not disk.exists()


def test_local_forged_tag_without_record_is_refused(v2p: V2P) -> None:
    conf = v2p.target / "qemu-server" / "121.conf"
    conf.parent.mkdir(parents=True)
    text = "name: tagged\nmemory: 512\ndescription: imported from x (v2p migration 0123456789ab)\n"
    conf.write_text(text)
    line = one_line_error(v2p("vm", "rm", "121"))
    assert "VM 121 (tagged) was not made by v2p" in line, line
    assert conf.read_text() == text


def test_local_name_typed_at_the_prompt(hand_made: tuple[Path, Path], v2p: V2P) -> None:
    """--force on a terminal asks for the name; a wrong answer removes nothing."""
    conf, disk = hand_made
    for answer, code in (("nope\n", 4), ("precious\n", 0)):
        main, sub = pty.openpty()
        proc = subprocess.Popen(v2p.argv("vm", "rm", "120", "--force"), stdin=sub, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=v2p.env())
        os.close(sub)
        os.write(main, answer.encode())
        out, err = proc.communicate(timeout=60)
        os.close(main)
        assert proc.returncode == code, out + err
        assert "type its name to remove it" in out
        if code:
            assert "is called precious, not nope: nothing removed" in err, err
            assert_kept(conf, disk)
    assert not conf.exists() and not disk.exists()


def test_library_remove_refuses_a_foreign_vm(hand_made: tuple[Path, Path], v2p: V2P) -> None:
    conf, disk = hand_made
    target = lib.local_target(v2p.target)
    with pytest.raises(lib.ForeignVMError) as refused:
        lib.remove(120, target)
    assert "VM 120 (precious) was not made by v2p" in refused.value.message
    with pytest.raises(lib.ForeignVMError):
        lib.remove(120, target, confirm_name="other")
    with pytest.raises(lib.OptionError):
        lib.remove(120, target, confirm_name=True)  # type: ignore[arg-type]
    assert_kept(conf, disk)
    lib.remove(120, target, confirm_name="precious")
    assert not conf.exists() and not disk.exists()


@pytest.mark.parametrize("planted", ["fifo", "link-to-dev-zero"])
def test_local_record_that_is_not_a_file_does_not_make_a_vm_v2p_s(planted: str, hand_made: tuple[Path, Path],
                                                                   v2p: V2P) -> None:
    """vm rm reads the record to tell whose the VM is: a FIFO or a link there neither hangs it nor
    makes the hand-written VM v2p's."""
    conf, disk = hand_made
    record = v2p.target / "migrations" / "120.json"
    record.parent.mkdir(parents=True)
    if planted == "fifo":
        os.mkfifo(record)
    else:
        record.symlink_to("/dev/zero")
    line = one_line_error(v2p("vm", "rm", "120", timeout=30))
    assert "VM 120 (precious) was not made by v2p" in line, line
    assert_kept(conf, disk)


def test_local_vm_whose_description_holds_another_tag_is_still_v2p_s(source_of: Any, v2p: V2P) -> None:
    """Words like a tag added to the description (a user's note, a source VM's name) before v2p's own
    tag do not make v2p disown its VM."""
    src = source_of("monolithicSparse")
    made = v2p("migrate", str(src.descriptor), "--vmid", "122", "--os", "l26", "--no-boot-check")
    assert made.returncode == 0, made.stderr
    conf = v2p.target / "qemu-server" / "122.conf"
    text = conf.read_text().replace("description: ", "description: copied from (v2p migration 0123456789ab); ")
    conf.write_text(text)
    removed = v2p("vm", "rm", "122")
    assert removed.returncode == 0, removed.stderr
    assert not conf.exists()
