"""A damaged driver-dance record (``<vmid>.dance.json``): valid JSON of the right outline but
missing what a step, a rerun or the pipeline reads. ``v2p dance`` and the migration's drivers
stage (the same ``DriverDance.run``) say so in one line naming the file, before touching the VM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import V2P, one_line_error
from v2p.dance import DanceOptions, DriverDance
from v2p.errors import StateError
from v2p.targets.local import LocalTarget

CONF = "name: w\nostype: win10\nboot: order=ide0\nide0: local:120/vm-120-disk-0.qcow2,size=1G\n"
LAYOUT1 = {"system_key": "ide0", "system_value": "local:120/vm-120-disk-0.qcow2,size=1G", "temp_key": "virtio1",
           "temp_volid": "local:120/vm-120-disk-1.qcow2", "net0": "", "boot": "order=ide0",
           "moves": [["ide0", "local:120/vm-120-disk-0.qcow2,size=1G", "virtio0"]], "cd_key": "ide2",
           "cd_value": "", "scsihw": ""}


def record(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"version": 1, "vmid": 120, "started_at": "2026-01-01T00:00:00+0000", "finished": False,
                           "request": {"vmid": 120, "bus": "virtio", "iso_volid": "/x.iso", "net_drivers": True},
                           "stages": {}}
    doc.update(changes)
    return doc


def step(result: dict[str, Any]) -> dict[str, Any]:
    return {"finished_at": "2026-01-01T00:00:00+0000", "seconds": 0, "result": result}


def _without(data: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != key}


# the damage -> what the one line must say after "dance record is damaged: "
DAMAGED: dict[str, tuple[dict[str, Any], str]] = {
    "finished-without-result": (record(finished=True), "it is finished but has no result"),
    "empty-result": (record(finished=True, result={}), "result.bus is missing"),
    "result-system-disk-null": (record(finished=True, result={"bus": "virtio", "system_disk": None,
                                                              "confirmed": True}),
                                "result.system_disk is null, expected a string"),
    "layout2-without-system-disk": (record(stages={"layout1": step(LAYOUT1), "boot1": step({}),
                                                  "shutdown1": step({}), "layout2": step({"disks": {}})}),
                                    "stages.layout2.result.system_disk is missing"),
    "layout1-without-temp-key": (record(stages={"layout1": step(_without(LAYOUT1, "temp_key"))}),
                                 "stages.layout1.result.temp_key is missing"),
    "layout1-moves-not-triples": (record(stages={"layout1": step({**LAYOUT1, "moves": [["ide0", "virtio0"]]})}),
                                  "stages.layout1.result.moves holds"),
    "layout1-moves-empty": (record(stages={"layout1": step({**LAYOUT1, "moves": []})}),
                            "stages.layout1.result.moves is empty"),
    "boot2-without-layout1": (record(stages={"boot2": step({"confirmed_by": "guest"})}),
                              "step boot2 is recorded, but not layout1 before it"),
    "request-without-bus": (record(request={"vmid": 120, "iso_volid": "/x.iso", "net_drivers": True}),
                            "request.bus is missing"),
    "request-net-drivers-string": (record(request={"vmid": 120, "bus": "virtio", "iso_volid": "/x.iso",
                                                   "net_drivers": "yes"}),
                                   "request.net_drivers is the string 'yes', expected true/false"),
}


def setup(folder: Path, doc: dict[str, Any]) -> Path:
    (folder / "migrations").mkdir(parents=True)
    path = folder / "migrations" / "120.dance.json"
    path.write_text(json.dumps(doc))
    (folder / "qemu-server").mkdir()
    (folder / "qemu-server" / "120.conf").write_text(CONF)
    return path


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_dance_record_is_one_line_before_the_vm_is_touched(case: str, tmp_path: Path) -> None:
    doc, says = DAMAGED[case]
    target = LocalTarget(tmp_path / "target", accel="tcg")
    path = setup(tmp_path / "target", doc)
    before = path.read_bytes()
    # What the migration's drivers stage runs, and what `v2p dance` looks at first.
    with pytest.raises(StateError) as exc:
        DriverDance(target, 120, DanceOptions(iso_volid="/x.iso")).run()
    text = str(exc.value)
    assert "\n" not in text
    assert f"{path}: dance record is damaged: {says}" in text
    assert f"delete {path}" in text and "v2p vm rm" not in text
    with pytest.raises(StateError):
        DriverDance.pending(target, 120)
    assert path.read_bytes() == before
    assert (tmp_path / "target" / "qemu-server" / "120.conf").read_text() == CONF




@pytest.mark.parametrize("case", ["finished-without-result", "empty-result", "layout2-without-system-disk"])
def test_cli_dance_with_a_damaged_record_is_one_line(case: str, v2p: V2P) -> None:
    doc, says = DAMAGED[case]
    path = setup(v2p.target, doc)
    line = one_line_error(v2p("dance", "120"))
    assert f"{path}: dance record is damaged: {says}" in line
    assert (v2p.target / "qemu-server" / "120.conf").read_text() == CONF


def test_an_outline_damage_gets_the_dance_hint_too(tmp_path: Path) -> None:
    target = LocalTarget(tmp_path / "target", accel="tcg")
    path = setup(tmp_path / "target", {"version": 1, "vmid": 120, "stages": None})
    with pytest.raises(StateError) as exc:
        DriverDance(target, 120, DanceOptions()).run()
    assert f"{path}: state file is damaged" in str(exc.value) and f"delete {path}" in str(exc.value)


def test_a_sound_unfinished_record_still_resumes_its_settings(tmp_path: Path) -> None:
    target = LocalTarget(tmp_path / "target", accel="tcg")
    setup(tmp_path / "target", record(stages={"layout1": step(LAYOUT1)}))
    assert DriverDance.pending(target, 120) == {"vmid": 120, "bus": "virtio", "iso_volid": "/x.iso",
                                                "net_drivers": True}
