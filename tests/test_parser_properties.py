"""Property-based tests of the descriptor and header parsers and of the whole
of inspection. Each has an oracle: a well-formed descriptor or header parses
to exactly what was generated, and a malformed one is refused with a
SourceError; whatever inspection accepts holds together (capacity is the sum
of its extents, each extent names a file inside the folder that is big
enough, the extents are the descriptor's lines), and it refuses with a
V2PError only, never another exception."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from v2p.errors import SourceError, V2PError
from v2p.inspect import DiskImage, ExtentKind, Flavor, inspect_disk, vmdk

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
SECTOR = 512

settings.register_profile("v2p", deadline=None, max_examples=300,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile("v2p")


# -- the descriptor parser: generated lines with the meaning each must have -----------------------

# One line of text: nothing str.splitlines() breaks on, no NUL (the parser stops there), no quote.
LINE_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"),
                                           blacklist_characters='"'), max_size=20)
GAP = st.sampled_from([" ", "  ", "\t", " \t "])
KEY = st.one_of(st.sampled_from(["version", "CID", "parentCID", "createType", "parentFileNameHint",
                                 "encoding", "ddb.adapterType", "DDB.Geometry.Heads", "ddb.uuid"]),
                st.from_regex(r"[A-Za-z0-9_.]{1,12}", fullmatch=True))


def inspected(path: Path) -> DiskImage | None:
    """What inspection made of ``path``, or None when it refused it (a V2PError, nothing else);
    hypothesis is told which, so the statistics show both outcomes are reached."""
    try:
        image = inspect_disk(path, check_boot=False)
    except V2PError:
        event("refused")
        return None
    event("accepted")
    return image


@st.composite
def extent_line(draw) -> tuple[str, tuple]:
    access = draw(st.sampled_from(["RW", "RDONLY", "NOACCESS"]))
    sectors = draw(st.integers(0, 1 << 70))
    kind = draw(st.one_of(st.sampled_from([k.value for k in ExtentKind]), st.from_regex(r"[A-Z]{1,8}", fullmatch=True)))
    fname = draw(st.one_of(st.none(), LINE_TEXT))
    offset = draw(st.integers(0, 1 << 70)) if fname is not None and draw(st.booleans()) else None
    gap = draw(GAP)
    line = f"{access}{gap}{sectors}{draw(GAP)}{kind}"
    if fname is not None:
        line += f'{draw(GAP)}"{fname}"'
        if offset is not None:
            line += f"{draw(GAP)}{offset}"
    line = draw(st.sampled_from(["", " ", "\t"])) + line + draw(st.sampled_from(["", " ", "\t "]))
    return line, ("extent", (access, sectors, kind, fname, offset))


@st.composite
def keyval_line(draw) -> tuple[str, tuple]:
    key = draw(KEY)
    value = draw(st.one_of(LINE_TEXT, LINE_TEXT.map(lambda t: f"'{t}'")))
    if draw(st.booleans()):
        text = f'"{value}"'  # quoted: kept as written, inner spaces and all
    else:
        value = value.strip()
        text = value
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]  # single quotes are quotes too
    line = f"{key}{draw(st.sampled_from(['=', ' = ', '= ', '  =']))}{text}{draw(st.sampled_from(['', ' ']))}"
    return line, ("keyval", (key.lower(), value))


JUNK = st.one_of(
    st.from_regex(r"[a-z][a-z ]{0,20}", fullmatch=True),  # words with no '=': not a descriptor line
    st.builds(lambda a, w: f'{a} {w} FLAT "x.vmdk"', st.sampled_from(["RW", "RDONLY", "NOACCESS"]),
              st.sampled_from(["lots", "-1", "0x10", ""])),  # an extent line v2p cannot read
    st.builds(lambda k: f'RW 8 {k} "x.vmdk"', st.sampled_from(["flat", "Flat", "FL4T"])),
)
OTHER = st.one_of(st.tuples(st.just(""), st.just(("skip", None))),
                  st.tuples(st.builds(lambda t: "#" + t, LINE_TEXT), st.just(("skip", None))),
                  st.tuples(GAP, st.just(("skip", None))))


@given(st.lists(st.one_of(extent_line(), keyval_line(), OTHER), max_size=14),
       st.sampled_from(["createType", "createType", "createType", "junk", "none"]), st.integers(0, 14),
       JUNK, LINE_TEXT, EOL, st.booleans(), st.integers(0, 600))
def test_descriptor_parses_to_exactly_its_lines(lines, mode, at, junk, create_type, eol, bom, padding):
    if mode != "none":
        # a createType line anywhere (and still any others the list holds), or one junk line
        line = (junk, ("junk", None)) if mode == "junk" else \
            (f'createType="{create_type}"', ("keyval", ("createtype", create_type)))
        lines = lines[:at] + [line] + lines[at:]
    data = ("\ufeff" if bom else "") + eol.join(text for text, _ in lines) + eol
    raw = data.encode() + bytes(padding)  # NUL padding after the text, as in an embedded descriptor
    kinds = [meaning[0] for _, meaning in lines]
    event("junk" if "junk" in kinds else "createType" if any(
        kind == "keyval" and value[0] == "createtype" for _, (kind, value) in lines) else "no createType")
    if "junk" in kinds:
        with pytest.raises(SourceError, match=rf"^fuzz\.vmdk: line {kinds.index('junk') + 1}: "):
            vmdk.parse_descriptor(raw, "fuzz.vmdk")
        return
    fields: dict[str, str] = {}
    ddb: dict[str, str] = {}
    for _, (kind, value) in lines:
        if kind == "keyval":
            (ddb if value[0].startswith("ddb.") else fields)[value[0]] = value[1]
    if "createtype" not in fields:
        with pytest.raises(SourceError, match="has no createType"):
            vmdk.parse_descriptor(raw, "fuzz.vmdk")
        return
    desc = vmdk.parse_descriptor(raw, "fuzz.vmdk")
    assert desc.extents == [value for _, (kind, value) in lines if kind == "extent"]
    assert desc.fields == fields
    assert desc.ddb == ddb


@given(st.binary(max_size=4096))
def test_descriptor_parser_on_bytes(data):
    try:
        desc = vmdk.parse_descriptor(data, "fuzz.vmdk")
    except SourceError:
        return
    lines = data.split(b"\0", 1)[0].decode("utf-8-sig").splitlines()
    assert desc.create_type is not None
    assert any(re.match(r"\s*createtype\s*=", line, re.IGNORECASE) for line in lines)
    assert len(desc.extents) == sum(bool(re.match(r"\s*(RW|RDONLY|NOACCESS)\s", line)) for line in lines)


@given(LINES, EOL)
def test_descriptor_parser_on_descriptor_like_text(lines, eol):
    data = eol.join(lines).encode("utf-8", "surrogatepass")
    try:
        desc = vmdk.parse_descriptor(data, "fuzz.vmdk")
    except SourceError:
        return
    assert desc.create_type is not None
    # every extent it returns is one of the lines, in order, none dropped
    text = data.split(b"\0", 1)[0].decode("utf-8-sig")
    wanted = [line.split()[:3] for line in text.splitlines() if re.match(r"\s*(RW|RDONLY|NOACCESS)\s", line)]
    assert [(a, n, k) for a, n, k, _f, _o in desc.extents] == [(a, int(n), k) for a, n, k in wanted]


# -- the sparse header -------------------------------------------------------------------------

HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
MAX_CAPACITY = 64 << 40


def header_is_sane(version: int, capacity: int, grain: int, gtes: int, compress: int) -> bool:
    """The VMDK spec's limits, as v2p documents them."""
    return (version in (1, 2, 3) and 0 < grain <= 2048 and grain & (grain - 1) == 0 and 1 <= gtes <= 512
            and compress in (0, 1) and 0 < capacity * SECTOR <= MAX_CAPACITY)


@st.composite
def header_fields(draw):
    """(version, flags, capacity, grain, descriptor offset, descriptor size, GTEs per GT, redundant GD, GD,
    compression): a sane header, or one with a field out of range."""
    fields = [draw(st.sampled_from([1, 2, 3])), draw(st.integers(0, (1 << 32) - 1)),
              draw(st.one_of(st.integers(1, 1 << 16), st.integers(1, MAX_CAPACITY // SECTOR))),
              draw(st.sampled_from([1 << n for n in range(12)])), draw(st.integers(0, 64)), draw(st.integers(0, 64)),
              draw(st.integers(1, 512)), draw(st.integers(0, (1 << 64) - 1)),
              draw(st.one_of(st.integers(0, 16), st.integers(0, 1 << 40))), draw(st.sampled_from([0, 1]))]
    bad = {  # field: (values just out of range, any out-of-range value)
        0: ([0, 4, 9], st.integers(4, (1 << 32) - 1)),
        2: ([0, MAX_CAPACITY // SECTOR + 1], st.integers(MAX_CAPACITY // SECTOR + 1, (1 << 64) - 1)),
        3: ([0, 3, 384, 4096, 1 << 63], st.integers(2049, (1 << 64) - 1)),
        6: ([0, 513, 1024], st.integers(513, (1 << 32) - 1)),
        9: ([2, 3], st.integers(2, (1 << 16) - 1))}
    for index in draw(st.lists(st.sampled_from([None, None, *bad]), min_size=1, max_size=2)):
        if index is not None:
            edges, anything = bad[index]
            fields[index] = draw(st.sampled_from(edges)) if draw(st.integers(0, 3)) else draw(anything)
    return tuple(fields)


HEADER_FIELDS = header_fields()


def sparse_file(fields, tail: bytes) -> bytes:
    version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd, compress = fields
    head = HEADER.pack(b"KDMV", version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd, 0, 0,
                       b"\n \r\n", compress)
    return head.ljust(SECTOR, b"\0") + tail


@given(HEADER_FIELDS)
@example((1, 3, 65536, 128, 1, 20, 512, 21, 26, 0))  # what qemu-img writes
@example((3, 0x30000, 1 << 37, 2048, 0, 0, 1, 0, 1, 1))  # 64 TiB, largest grain, fewest GTEs: accepted
@example((4, 3, 65536, 128, 1, 20, 512, 21, 26, 0))
@example((1, 3, 0, 128, 1, 20, 512, 21, 26, 0))
@example((1, 3, (1 << 37) + 1, 128, 1, 20, 512, 21, 26, 0))
@example((1, 3, 65536, 4096, 1, 20, 512, 21, 26, 0))
@example((1, 3, 65536, 3, 1, 20, 512, 21, 26, 0))
@example((1, 3, 65536, 128, 1, 20, 513, 21, 26, 0))
@example((1, 3, 65536, 128, 1, 20, 0, 21, 26, 0))
@example((1, 3, 65536, 128, 1, 20, 512, 21, 26, 2))
def test_sparse_header_parses_to_its_fields_or_is_refused(fields):
    version, flags, capacity, grain, desc_off, desc_size, gtes, _rgd, gd, compress = fields
    data = sparse_file(fields, b"")
    if not header_is_sane(version, capacity, grain, gtes, compress):
        event("refused")
        with pytest.raises(SourceError):
            vmdk.parse_sparse_header(data, "fuzz.vmdk")
        return
    event("accepted")
    header = vmdk.parse_sparse_header(data, "fuzz.vmdk")
    assert header == vmdk.SparseHeader(version, flags, capacity, grain, desc_off, desc_size, gtes, gd, compress)


@given(st.binary(min_size=0, max_size=600))
def test_sparse_header_parser(data):
    data = b"KDMV" + data
    if len(data) < HEADER.size:
        with pytest.raises(SourceError, match="truncated"):
            vmdk.parse_sparse_header(data, "fuzz.vmdk")
        return
    (_m, version, flags, capacity, grain, desc_off, desc_size, gtes, _rgd, gd, _o, _u, _e,
     compress) = HEADER.unpack_from(data)
    try:
        header = vmdk.parse_sparse_header(data, "fuzz.vmdk")
    except SourceError:
        assert not header_is_sane(version, capacity, grain, gtes, compress)
        event("refused")
        return
    event("accepted")
    assert header_is_sane(version, capacity, grain, gtes, compress)
    assert header == vmdk.SparseHeader(version, flags, capacity, grain, desc_off, desc_size, gtes, gd, compress)


def assert_kdmv_regions_inside(path: Path, header: vmdk.SparseHeader) -> None:
    """The grain directory, every grain table and every grain it points at lie inside the file."""
    data = path.read_bytes()
    gd_bytes = -(-header.capacity // (header.grain_size * header.gtes_per_gt)) * 4
    assert 0 < header.gd_offset and header.gd_offset * SECTOR + gd_bytes <= len(data)
    directory = struct.unpack_from(f"<{gd_bytes // 4}I", data, header.gd_offset * SECTOR)
    grain = 1 if header.stream_optimized else header.grain_size
    for table in filter(None, directory):
        assert (table * SECTOR + header.gtes_per_gt * 4) <= len(data)
        for entry in struct.unpack_from(f"<{header.gtes_per_gt}I", data, table * SECTOR):
            assert entry <= 1 or (entry + grain) * SECTOR <= len(data)


@given(HEADER_FIELDS, st.booleans(), st.one_of(st.binary(max_size=8192), st.integers(0, 8192).map(bytes)))
def test_inspect_of_any_sparse_file(fields, small, tail):
    if small:  # no embedded descriptor; a grain directory right after the header, for a capacity it can fit
        fields = fields[:2] + (fields[2] % (fields[3] * fields[6] * 16 or 1) + 1, fields[3], 0, 0) + \
            fields[6:8] + (1,) + fields[9:]
    version, flags, capacity, grain, desc_off, desc_size, gtes, _rgd, gd, compress = fields
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.vmdk"
        path.write_bytes(sparse_file(fields, tail))
        image = inspected(path)
        if image is None:
            return
        assert header_is_sane(version, capacity, grain, gtes, compress)
        assert image.capacity == capacity * SECTOR
        assert [(e.sectors, e.kind, e.path) for e in image.extents] == [(capacity, ExtentKind.SPARSE, path)]
        assert image.header == {"version": version, "flags": flags, "grain_sectors": grain,
                                "compress_algorithm": compress}
        header = vmdk.SparseHeader(version, flags, capacity, grain, desc_off, desc_size, gtes, gd, compress)
        assert_kdmv_regions_inside(path, header)
        if header.stream_optimized:
            assert image.flavor is Flavor.STREAM_OPTIMIZED
        else:
            # a descriptor is only taken from inside the file
            assert image.flavor in (Flavor.MONOLITHIC_SPARSE, Flavor.SPARSE_EXTENT)
            assert (image.flavor is Flavor.MONOLITHIC_SPARSE) == (image.create_type is not None)
            if image.create_type is not None:
                assert desc_off and desc_size and (desc_off + desc_size) * SECTOR <= path.stat().st_size


# -- whole descriptors on disk ----------------------------------------------------------------

def assert_holds_together(image: DiskImage, folder: Path) -> None:
    """What inspection accepted is self-consistent and all inside ``folder``."""
    real_folder = folder.resolve()
    assert image.capacity == sum(e.size for e in image.extents) > 0
    for path in image.files:
        assert real_folder in path.resolve().parents, f"{path} is outside {folder}"
        assert path.is_file()
    for extent in image.extents:
        if extent.kind is ExtentKind.ZERO:
            assert extent.path is None
        elif extent.kind.is_raw:
            assert (extent.offset + extent.sectors) * SECTOR <= extent.path.stat().st_size
        else:
            assert extent.offset == 0
    for link in image.chain:
        data = link.path.read_bytes()
        if not vmdk.looks_like_descriptor(data[:65536]):
            continue  # a hosted sparse file or raw data: one extent, the file itself
        desc = vmdk.parse_descriptor(data, link.path.name)
        assert all(access != "NOACCESS" for access, *_rest in desc.extents)
        # the extents are the descriptor's lines, none dropped, none invented
        assert [(e.sectors, e.kind.value) for e in link.extents] == [(n, k) for _a, n, k, _f, _o in desc.extents]
        for extent, (_a, _n, _k, fname, offset) in zip(link.extents, desc.extents, strict=True):
            if extent.path is not None:
                assert fname is not None and extent.path == Path(os.path.realpath(link.path.parent / fname))
                assert extent.offset == (offset or 0)
        assert (link.parent is not None) == (desc.parent_cid is not None)
    if image.parent is not None:
        assert image.parent.capacity == image.capacity and image.parent.cid == image.parent_cid


@given(LINES, st.lists(st.tuples(st.sampled_from(["a-flat.vmdk", "b-s001.vmdk", "c.vmdk"]),
                                 st.binary(max_size=2048)), max_size=3))
def test_inspect_of_any_descriptor_folder(lines, files):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, data in files:
            (folder / name).write_bytes(data)
        path = folder / "d.vmdk"
        path.write_text("# Disk DescriptorFile\n" + "\n".join(lines), errors="surrogatepass")
        image = inspected(path)
        if image is None:
            return
        assert_holds_together(image, folder)


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
        image = inspected(folder / "d.vmdk")
        if image is None:
            return
        assert_holds_together(image, folder)


# -- valid multi-extent descriptors: exactly what was written -----------------------------------

FLAT_TYPES = {"monolithicFlat": Flavor.MONOLITHIC_FLAT, "twoGbMaxExtentFlat": Flavor.TWO_GB_MAX_EXTENT_FLAT,
              "vmfs": Flavor.VMFS, "vmfsThin": Flavor.VMFS_THIN,
              "vmfsEagerZeroedThick": Flavor.VMFS_EAGER_ZEROED_THICK, "vmfsPreallocated": Flavor.VMFS}
SPARSE_TYPES = {"twoGbMaxExtentSparse": Flavor.TWO_GB_MAX_EXTENT_SPARSE,
                "monolithicSparse": Flavor.MONOLITHIC_SPARSE}
FILE_STEM = st.text(alphabet=st.characters(whitelist_categories=("Ll", "Lu", "Nd"), whitelist_characters=" -_"),
                    min_size=1, max_size=12)


@pytest.fixture(scope="session")
def sparse_pool(tmp_path_factory) -> dict[int, bytes]:
    """Hosted sparse extents made by qemu-img: {capacity in sectors: file bytes}."""
    folder = tmp_path_factory.mktemp("sparse-pool")
    pool = {}
    for sectors in (128, 2048, 4096):
        path = folder / f"{sectors}.vmdk"
        subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(path), str(sectors * SECTOR)], check=True)
        subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 0 4k", "-c",
                        f"write -P 0xa5 {(sectors - 8) * SECTOR} 4k", str(path)], check=True, capture_output=True)
        pool[sectors] = path.read_bytes()
    return pool


HEADER_OFFSETS = [4, 8, 12, 20, 28, 36, 44, 48, 56, 64, 72, 73, 77]  # where each header field starts


FIELD_VALUES = [b"\0" * 8, b"\xff" * 8] + [n.to_bytes(8, "little") for n in (1, 3, 1 << 20)]


@given(st.lists(st.one_of(
    st.tuples(st.just("bytes"), st.one_of(st.integers(0, 600), st.integers(0, 1 << 18)),
              st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("field"), st.sampled_from(HEADER_OFFSETS), st.sampled_from(FIELD_VALUES)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 18), st.just(b""))), min_size=1, max_size=3))
def test_mutated_sparse_file_is_refused_or_holds_together(sparse_pool, mutations):
    data = bytearray(sparse_pool[4096])
    for how, at, what in mutations:
        if how == "truncate":
            del data[at % (len(data) + 1):]
        else:
            at %= len(data) + 1
            data[at: at + len(what)] = what
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.vmdk"
        path.write_bytes(bytes(data))
        image = inspected(path)
        if image is None:
            return
        if data[:4] != b"KDMV":  # no longer a sparse file: what v2p took it for must still hold together
            assert_holds_together(image, Path(tmp))
            return
        (_m, version, flags, capacity, grain, desc_off, desc_size, gtes, _rgd, gd, _o, _u, _e,
         compress) = HEADER.unpack_from(data)
        assert header_is_sane(version, capacity, grain, gtes, compress)
        assert [(e.sectors, e.kind, e.path) for e in image.extents] == [(capacity, ExtentKind.SPARSE, path)]
        assert image.capacity == capacity * SECTOR
        header = vmdk.SparseHeader(version, flags, capacity, grain, desc_off, desc_size, gtes, gd, compress)
        assert_kdmv_regions_inside(path, header)
        if image.create_type is not None:  # its embedded descriptor agrees with the header
            desc = vmdk.parse_descriptor(bytes(data[desc_off * SECTOR:(desc_off + desc_size) * SECTOR]), "d")
            assert sum(n for _a, n, *_rest in desc.extents) in (0, capacity)


@st.composite
def valid_disk(draw):
    """(createType, [(access, sectors, kind, file name or None, offset, slack sectors)], eol, sub folder)"""
    create_type = draw(st.sampled_from(sorted(FLAT_TYPES) + sorted(SPARSE_TYPES)))
    kinds = ["FLAT", "VMFS", "ZERO"] if create_type in FLAT_TYPES else ["SPARSE", "ZERO"]
    count = draw(st.integers(1, 5))
    stems = draw(st.lists(FILE_STEM, min_size=count, max_size=count, unique_by=str.lower))
    sub = draw(st.sampled_from(["", "sub/"]))
    extents = []
    for index, stem in enumerate(stems):
        kind = draw(st.sampled_from(kinds))
        access = draw(st.sampled_from(["RW", "RDONLY"]))
        if kind == "ZERO":
            extents.append((access, draw(st.integers(1, 1 << 30)), kind, None, None, 0))
        elif kind == "SPARSE":
            extents.append((access, draw(st.sampled_from([128, 2048, 4096])), kind,
                            f"{sub}{stem}-s{index:03d}.vmdk", None, 0))
        else:
            offset = draw(st.one_of(st.none(), st.integers(0, 16)))
            extents.append((access, draw(st.integers(1, 64)), kind, f"{sub}{stem}-f{index:03d}.vmdk", offset,
                            draw(st.integers(0, 3))))
    assume(any(kind != "ZERO" for _a, _n, kind, *_rest in extents))
    return create_type, extents, draw(EOL)


def write_disk(folder: Path, create_type: str, extents, eol: str, pool: dict[int, bytes]) -> Path:
    lines = ["# Disk DescriptorFile", "version=1", "CID=fffffffe", "parentCID=ffffffff",
             f'createType="{create_type}"', "", "# Extent description"]
    for access, sectors, kind, fname, offset, slack in extents:
        if fname is None:
            lines.append(f"{access} {sectors} {kind}")
            continue
        (folder / fname).parent.mkdir(exist_ok=True)
        if kind == "SPARSE":
            (folder / fname).write_bytes(pool[sectors])
            lines.append(f'{access} {sectors} {kind} "{fname}"')
        else:
            start = offset or 0
            (folder / fname).write_bytes(os.urandom(SECTOR) * (start + sectors + slack))
            lines.append(f'{access} {sectors} {kind} "{fname}"' + ("" if offset is None else f" {offset}"))
    lines += ["", '# The Disk Data Base', 'ddb.adapterType = "lsilogic"', 'ddb.virtualHWVersion = "14"']
    path = folder / "disk.vmdk"
    path.write_bytes(eol.join(lines).encode() + eol.encode())
    return path


@given(valid_disk())
def test_valid_descriptor_inspects_to_exactly_its_extents(sparse_pool, disk):
    create_type, extents, eol = disk
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = write_disk(folder, create_type, extents, eol, sparse_pool)
        image = inspect_disk(path, check_boot=False)
        assert image.flavor is {**FLAT_TYPES, **SPARSE_TYPES}[create_type]
        assert image.create_type == create_type and image.adapter_type == "lsilogic"
        assert [(e.sectors, e.kind.value, e.path, e.offset) for e in image.extents] == [
            (sectors, kind, None if fname is None else (folder / fname).resolve(), offset or 0)
            for _a, sectors, kind, fname, offset, _s in extents]
        assert image.capacity == sum(sectors for _a, sectors, *_rest in extents) * SECTOR
        assert image.parent is None and image.path == path
        rdonly = any(access == "RDONLY" for access, *_rest in extents)
        assert any("has RDONLY extents" in w for w in image.warnings) == rdonly
        assert_holds_together(image, folder)


WORDS = ["RW", "RDONLY", "NOACCESS", "FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "SESPARSE", "createType",
         "parentCID", "parentFileNameHint", "vmfs", "monolithicFlat", "twoGbMaxExtentSparse", "seSparse", "sub"]
MUTATION = st.one_of(
    # another number where a number was (sector counts, offsets, CIDs)
    st.tuples(st.just("number"), st.integers(0, 63), st.one_of(st.integers(0, 80), st.integers(0, 1 << 45))),
    st.tuples(st.just("word"), st.integers(0, 63), st.sampled_from(WORDS)),  # another keyword
    # another access mode or extent type on an extent line
    st.tuples(st.just("access"), st.integers(0, 7), st.sampled_from(["RW", "RDONLY", "NOACCESS"])),
    st.tuples(st.just("kind"), st.integers(0, 7), st.sampled_from([k.value for k in ExtentKind])),
    st.tuples(st.just("line"), st.integers(0, 63), st.sampled_from(["delete", "repeat"])),
    st.tuples(st.just("bytes"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=3)))


def mutate(data: bytes, how: str, at: int, what) -> bytes:  # type: ignore[no-untyped-def]
    if how in ("number", "word", "access", "kind"):
        pattern = {"number": rb"(\d+)", "word": rb"([A-Za-z]+)", "access": rb"(?m)^(RW|RDONLY|NOACCESS) \d",
                   "kind": rb"(?m)^(?:RW|RDONLY|NOACCESS) \d+ ([A-Z]+)"}[how]
        runs = list(re.finditer(pattern, data))
        if not runs:
            return data
        start, end = runs[at % len(runs)].span(1)
        return data[:start] + str(what).encode() + data[end:]
    if how == "line":
        lines = data.splitlines(keepends=True)
        at %= len(lines)
        return b"".join(lines[:at] + ([lines[at]] * 2 if what == "repeat" else []) + lines[at + 1:])
    at %= len(data) + 1
    return data[:at] + what + data[at + len(what):]


@given(valid_disk(), st.lists(MUTATION, min_size=1, max_size=3))
def test_mutated_descriptor_is_refused_or_holds_together(sparse_pool, disk, mutations):
    create_type, extents, eol = disk
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = write_disk(folder, create_type, extents, eol, sparse_pool)
        data = path.read_bytes()
        for how, at, what in mutations:
            data = mutate(data, how, at, what)
        path.write_bytes(data)
        image = inspected(path)
        if image is None:
            return
        assert_holds_together(image, folder)
