"""``v2p inspect`` tells every sample flavor apart (header reads only)."""

from __future__ import annotations

import json

import pytest
from conftest import FLAVORS, one_line_error


@pytest.mark.parametrize("flavor", FLAVORS)
def test_inspect_names_flavor_and_capacity(flavor, manifest, source_of, v2p):
    src = source_of(flavor)
    proc = v2p("inspect", str(src.descriptor), "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["flavor"] == manifest["flavors"][flavor]["flavor"]
    assert row["capacity"] == manifest["virtual_size"]
    assert row["format"] == "vmdk"
    extents = [e["path"] for e in row["extents"]]
    assert [p.split("/")[-1] for p in extents] == \
        [p.split("/")[-1] for p in manifest["flavors"][flavor]["extents"]] or flavor in (
            "monolithicSparse", "streamOptimized")


def test_inspect_text_output(source_of, v2p):
    src = source_of("esxi")
    proc = v2p("inspect", str(src.descriptor))
    assert proc.returncode == 0, proc.stderr
    assert "flavor:    vmfs" in proc.stdout
    assert "capacity:  33554432 bytes" in proc.stdout
    assert "extent:    VMFS 65536 sectors esxi-flat.vmdk" in proc.stdout
    assert "adapter:   lsilogic" in proc.stdout
    assert "boot:      mbr" in proc.stdout and "verdict:   warning" in proc.stdout


def test_flat_extent_alone_is_raw_with_a_warning(source_of, v2p):
    src = source_of("esxi")
    proc = v2p("inspect", str(src.folder / "esxi-flat.vmdk"))
    assert proc.returncode == 0, proc.stderr
    assert "flavor:    flat extent" in proc.stdout
    assert "no VMDK descriptor found" in proc.stdout and "esxi.vmdk is beside it" in proc.stdout


def test_qcow2_is_named_and_taken_as_qcow2(tmp_path, manifest, v2p):
    import subprocess

    from conftest import SAMPLES

    out = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(SAMPLES / "guest.raw"), str(out)],
                   check=True)
    (row,) = json.loads(v2p("inspect", str(out), "--json").stdout)
    assert (row["flavor"], row["format"], row["capacity"]) == ("qcow2", "qcow2", manifest["virtual_size"])


def test_absolute_extent_is_refused(tmp_path, v2p):
    desc = tmp_path / "abs.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\nRW 8 FLAT "/etc/passwd" 0\n')
    line = one_line_error(v2p("inspect", str(desc)))
    assert "'/etc/passwd' is absolute: refused" in line
