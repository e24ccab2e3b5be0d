"""A state file that is valid JSON but not what v2p wrote: every run that reads it
(migrate, status, dance) says so in one line naming the file, with the hint to
discard it, and ``v2p vm rm`` discards it in every case."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from conftest import SAMPLES, V2P, assert_same_bytes, one_line_error
from test_resume import ARGS, kill_after

Damage = Callable[[dict[str, Any]], Any]


def _set(path: str, value: Any) -> Damage:
    def damage(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[key]
        node[last] = value
    return damage


def _drop(path: str) -> Damage:
    def damage(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[key]
        del node[last]
    return damage


# name -> (damage, words the error must contain)
CASES: dict[str, tuple[Damage, str]] = {
    "stages-list": (_set("stages", []), "stages is a list, expected an object"),
    "stages-null": (_set("stages", None), "stages is null, expected an object"),
    "request-string": (_set("request", "x"), "request is the string 'x', expected an object"),
    "request-without-source": (_drop("request.source"), "request.source is missing"),
    "stage-without-result": (_drop("stages.convert.result"), "stages.convert.result is missing"),
    "volid-not-string": (_set("stages.convert.result.volid", 5), "stages.convert.result.volid is a whole number"),
    "inspect-result-null": (_set("stages.inspect.result", None), "stages.inspect.result is null"),
    "version-string": (_set("version", "1"), "version is the string '1', expected a whole number"),
    "version-bool": (_set("version", True), "version is true, expected a whole number"),
    "no-migration-id": (_drop("migration_id"), "migration_id is missing"),
    "other-vmid": (_set("vmid", 121), "it is for VMID 121, not 120"),
    "unknown-stage": (_set("stages.teleport", {"finished_at": "x", "seconds": 1, "result": {}}),
                      "it records an unknown stage 'teleport'"),
    "seconds-string": (_set("stages.create.seconds", "fast"), "stages.create.seconds is the string 'fast'"),
    "finished-string": (_set("finished", "no"), "finished is the string 'no', expected true/false"),
    "top-level-list": (lambda doc: [doc], "expected a JSON object, found a list"),
    "stage-record-string": (_set("stages.create", "done"), "stages.create is the string 'done'"),
    "config-not-object": (_set("stages.create.result.config", []), "stages.create.result.config is a list"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_damaged_state_file_is_one_line_and_discardable(name, manifest, source_of, v2p: V2P):
    damage, words = CASES[name]
    src = source_of("monolithicSparse")
    kill_after(v2p, src.descriptor, "convert")
    path = v2p.target / "migrations" / "120.json"
    doc = json.loads(path.read_text())
    replaced = damage(doc)
    path.write_text(json.dumps(doc if replaced is None else replaced))

    line = one_line_error(v2p("migrate", str(src.descriptor), *ARGS))
    assert f"{path}: state file is damaged: {words}" in line, line
    assert "v2p vm rm 120" in line

    status = v2p("status")
    assert status.returncode == 5 and "Traceback" not in status.stderr, status.stderr
    assert f"VMID 120: unreadable record: {path}: state file is damaged" in status.stdout
    listed = v2p("status", "--json")
    assert listed.returncode == 5 and json.loads(listed.stdout)[0]["vmid"] == 120

    removed = v2p("vm", "rm", "120")
    assert removed.returncode == 0, removed.stderr
    assert not path.exists() and not v2p.disk(120).parent.exists()
    again = v2p("migrate", str(src.descriptor), *ARGS)
    assert again.returncode == 0, again.stderr
    assert_same_bytes(SAMPLES / "guest.raw", v2p.disk(120))  # SAMPLES is built by the manifest fixture


def test_newer_version_says_which_v2p(manifest, source_of, v2p: V2P):
    src = source_of("monolithicSparse")
    kill_after(v2p, src.descriptor, "create")
    path = v2p.target / "migrations" / "120.json"
    doc = json.loads(path.read_text())
    doc["version"] = 2
    path.write_text(json.dumps(doc))
    line = one_line_error(v2p("migrate", str(src.descriptor), *ARGS))
    assert f"{path}: state file version 2 is not 1" in line and "v2p vm rm 120" in line


@pytest.mark.parametrize("text", ["", "{", "NaN", '{"version": 1, "x": Infinity}', "\udcff"])
def test_unparsable_state_file_is_one_line_and_discardable(text, manifest, source_of, v2p: V2P):
    src = source_of("monolithicSparse")
    path = v2p.target / "migrations" / "120.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(text.encode(errors="surrogateescape"))
    line = one_line_error(v2p("migrate", str(src.descriptor), *ARGS))
    assert str(path) in line and "v2p vm rm 120" in line
    assert v2p("vm", "rm", "120").returncode == 0
    assert not path.exists()


def test_damaged_dance_record_is_one_line(manifest, v2p: V2P):
    folder = v2p.target / "migrations"
    folder.mkdir(parents=True)
    (folder / "120.dance.json").write_text(json.dumps({"version": 1, "vmid": 120, "stages": None}))
    conf = v2p.target / "qemu-server" / "120.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("name: w\nostype: win10\nide0: local:120/vm-120-disk-0.qcow2\n")
    line = one_line_error(v2p("dance", "120"))
    assert f"{folder / '120.dance.json'}: state file is damaged" in line
    # The VM is not v2p's (a hand-written config): the damaged record goes, the VM stays.
    kept = one_line_error(v2p("vm", "rm", "120"))
    assert "VM 120 (w) was not made by v2p" in kept and "discarded v2p's migration records" in kept, kept
    assert not (folder / "120.dance.json").exists()
    assert conf.read_text() == "name: w\nostype: win10\nide0: local:120/vm-120-disk-0.qcow2\n"


def test_vm_rm_of_nothing_says_so(v2p: V2P):
    line = one_line_error(v2p("vm", "rm", "120"))
    assert "VMID 120 does not exist on the local target and has no migration record" in line
