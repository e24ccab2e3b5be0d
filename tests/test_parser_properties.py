"""Property-based tests: whatever bytes the descriptor and header parsers, and
the whole of inspection, are given, the only exception is a V2PError."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from v2p.errors import V2PError
from v2p.inspect import inspect_disk, vmdk

ACCESS = st.sampled_from(["RW", "RDONLY", "NOACCESS", "rw", "XX"])
KIND = st.sampled_from(["FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "SESPARSE", "VMFSRDM", "?"])
NAME = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
EXTENT = st.builds(lambda a, n, k, f, o: f'{a} {n} {k} "{f}" {o}'.strip(),
                   ACCESS, st.integers(-5, 1 << 64), KIND, NAME,
                   st.one_of(st.just(""), st.integers(0, 1 << 40)))
KEYVAL = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
    ["version", "CID", "parentCID", "createType", "parentFileNameHint", "encoding", "ddb.adapterType",
     "ddb.geometry.heads", "x"]), st.one_of(NAME, NAME.map(lambda t: f'"{t}"')))
LINES = st.lists(st.one_of(EXTENT, KEYVAL, NAME, st.just(""), st.just("# Disk DescriptorFile")), max_size=12)
EOL = st.sampled_from(["\n", "\r\n", "\r"])

settings.register_profile("v2p", deadline=None, max_examples=300,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile("v2p")


@given(st.binary(max_size=4096))
def test_descriptor_parser_on_bytes(data):
    try:
        vmdk.parse_descriptor(data, "fuzz.vmdk")
    except V2PError:
        pass


@given(LINES, EOL)
def test_descriptor_parser_on_descriptor_like_text(lines, eol):
    try:
        desc = vmdk.parse_descriptor(eol.join(lines).encode("utf-8", "surrogatepass"), "fuzz.vmdk")
    except V2PError:
        return
    assert desc.create_type is not None


@given(st.binary(min_size=0, max_size=600))
def test_sparse_header_parser(data):
    try:
        vmdk.parse_sparse_header(b"KDMV" + data, "fuzz.vmdk")
    except V2PError:
        pass


HEADER_FIELDS = st.tuples(
    st.integers(0, 4), st.integers(0, 1 << 32 - 1), st.integers(0, 1 << 63), st.integers(0, 4096),
    st.integers(0, 64), st.integers(0, 64), st.integers(0, 1024), st.integers(0, 1 << 40),
    st.integers(0, 1 << 20), st.integers(0, 3))


def sparse_file(fields, tail: bytes) -> bytes:
    version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd, compress = fields
    head = struct.pack("<4sIIQQQQIQQQB4sH", b"KDMV", version, flags % (1 << 32), capacity, grain, desc_off,
                       desc_size, gtes, rgd, gd, 0, 0, b"\n \r\n", compress)
    return head.ljust(512, b"\0") + tail


@given(HEADER_FIELDS, st.binary(max_size=8192))
def test_inspect_of_any_sparse_file(fields, tail):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.vmdk"
        path.write_bytes(sparse_file(fields, tail))
        try:
            inspect_disk(path, check_boot=False)
        except V2PError:
            pass


@given(LINES, st.lists(st.tuples(st.sampled_from(["a-flat.vmdk", "b-s001.vmdk", "c.vmdk"]),
                                 st.binary(max_size=2048)), max_size=3))
def test_inspect_of_any_descriptor_folder(lines, files):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, data in files:
            (folder / name).write_bytes(data)
        path = folder / "d.vmdk"
        path.write_text("# Disk DescriptorFile\n" + "\n".join(lines), errors="surrogatepass")
        try:
            inspect_disk(path, check_boot=False)
        except V2PError:
            pass


CREATE_TYPES = st.sampled_from([
    "monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized",
    "vmfs", "vmfsThin", "vmfsEagerZeroedThick", "vmfsSparse", "seSparse", "vmfsRawDeviceMap",
    "vmfsPassthroughRawDeviceMap", "fullDevice", "partitionedDevice", "custom"])
FILES = st.sampled_from(["a-flat.vmdk", "b-s001.vmdk", "c.vmdk", "d.vmdk", "missing.vmdk", "../a-flat.vmdk"])
GOOD_EXTENT = st.builds(lambda a, n, k, f, o: f'{a} {n} {k} "{f}" {o}'.strip(),
                        st.sampled_from(["RW", "RDONLY"]), st.integers(0, 70), KIND, FILES,
                        st.one_of(st.just(""), st.integers(0, 8)))


@given(CREATE_TYPES, st.lists(GOOD_EXTENT, min_size=1, max_size=4),
       st.one_of(st.none(), st.sampled_from(["c.vmdk", "d.vmdk", "missing.vmdk"])),
       st.lists(st.tuples(st.sampled_from(["a-flat.vmdk", "b-s001.vmdk", "c.vmdk"]),
                          st.one_of(st.binary(max_size=4096),
                                    st.builds(lambda t: b"KDMV" + t, st.binary(max_size=2048)),
                                    st.just(bytes(32768)))), max_size=3))
def test_inspect_of_structured_descriptors(create_type, extents, parent, files):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, data in files:
            (folder / name).write_bytes(data)
        head = f'# Disk DescriptorFile\nversion=1\nCID=0000000d\ncreateType="{create_type}"\n'
        if parent:
            head += f'parentCID=0000000c\nparentFileNameHint="{parent}"\n'
        (folder / "d.vmdk").write_text(head + "\n".join(extents) + "\n")
        try:
            image = inspect_disk(folder / "d.vmdk", check_boot=False)
        except V2PError:
            return
        assert image.capacity == sum(e.size for e in image.extents)
        for path in image.files:
            assert folder.resolve() in path.resolve().parents
