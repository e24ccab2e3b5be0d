"""What an ``.ovf`` and an ``.ova`` share: the envelope read from the package, and its checks.

The ``.mf`` manifest (SHA1, SHA256, SHA512 lines) is parsed, and a file it lists
is checked against it before it is used; the files the envelope names are checked
to be there, whole and uncompressed; what the user should know (no manifest, a
signature not checked) collects in ``warnings``. Where the files lie (beside the
``.ovf``, inside the tar) is each source's to say (``ovf.py``). Not for: the XML
(``ovf_xml``, ``ovf_mapping``).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import SourceError
from ..inspect import vmdk
from ..spec import DiskSpec, VMSpec
from .base import LocalSource
from .ovf_mapping import Envelope, parse_envelope
from .ovf_xml import FileRef, check_href

# An envelope is a few KiB to a few hundred (EULAs); a manifest a line per file.
MAX_ENVELOPE = 32 << 20
MAX_MANIFEST = 1 << 20
CHUNK = 1 << 20
_HASHES = {"sha1": 40, "sha256": 64, "sha512": 128}
_MANIFEST_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9A-Fa-f]+)$", re.IGNORECASE)


@dataclass(frozen=True)
class Digest:
    algorithm: str  # hashlib's name: sha1, sha256, sha512
    hexdigest: str


def parse_manifest(data: bytes, name: str) -> dict[str, Digest]:
    """``SHA256(file)= hex`` lines (SHA1, SHA256, SHA512) by file name."""
    out: dict[str, Digest] = {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SourceError(f"{name}: the manifest is not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _MANIFEST_LINE.match(line.strip())
        if not match:
            raise SourceError(f"{name}: line {number} is not ALGORITHM(file)= digest",
                              hint="v2p reads SHA1, SHA256 and SHA512 manifests")
        algorithm, fname, digest = match.group(1).lower(), match.group(2), match.group(3).lower()
        check_href(fname, name, "manifest entry")
        if len(digest) != _HASHES[algorithm]:
            raise SourceError(f"{name}: line {number}: a {algorithm.upper()} digest has "
                              f"{_HASHES[algorithm]} hex digits, not {len(digest)}")
        if fname in out and out[fname] != Digest(algorithm, digest):
            raise SourceError(f"{name}: {fname} is listed twice with different digests")
        out[fname] = Digest(algorithm, digest)
    return out


def read_bounded(src: BinaryIO, size: int, limit: int, name: str, what: str) -> bytes:
    if size > limit:
        raise SourceError(f"{name}: the {what} is {size} bytes; more than the {limit} v2p reads: refused")
    return src.read(size)


class OvfPackage(LocalSource):
    """What ``.ovf`` and ``.ova`` share: the envelope, the manifest, verified files.

    ``warnings`` collects what the user should see (no manifest, a file the
    manifest does not cover, a signature not checked); it fills as ``spec()``
    and ``disk_input()`` run.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.given = str(path)
        # the real file: its folder is where the package's files are, and no link of ours moves it
        self.path = Path(os.path.realpath(path))
        vmdk.refuse_line_break(str(self.path))
        self.warnings: list[str] = []
        self._envelope: Envelope | None = None
        self._manifest: dict[str, Digest] | None = None
        self._manifest_name: str | None = None
        self._verified: set[str] = set()

    def describe(self) -> str:
        return self.given

    # what each kind of package provides
    def _open_package(self) -> None:
        """Check the container (the tar) before anything is read from it."""

    def _descriptor_name(self) -> str:
        raise NotImplementedError

    def _size(self, href: str) -> int | None:
        """Bytes of the package's file ``href``; None when it is missing."""
        raise NotImplementedError

    def _open(self, href: str) -> BinaryIO:
        """``href``'s bytes, position 0 at its start (a plain file, or a view into the tar)."""
        raise NotImplementedError

    def _where(self, href: str) -> str:
        """``href`` as messages name it."""
        raise NotImplementedError

    # shared
    def envelope(self) -> Envelope:
        if self._envelope is None:
            self._open_package()
            ovf = self._descriptor_name()
            size = self._size(ovf)
            if size is None:
                raise SourceError(f"{self._where(ovf)}: no such file")
            with self._open(ovf) as src:
                data = read_bounded(src, size, MAX_ENVELOPE, self._where(ovf), "OVF descriptor")
            envelope = parse_envelope(data, self._where(ovf))
            self._load_manifest(ovf)
            self._verify_bytes(ovf, data)
            self._check_files(envelope)
            self.warnings += envelope.warnings
            self._envelope = envelope
        return self._envelope

    def spec(self) -> VMSpec:
        return VMSpec.from_dict(self.envelope().spec.to_dict())

    def _load_manifest(self, ovf: str) -> None:
        mf = re.sub(r"\.ovf$", "", ovf, flags=re.IGNORECASE) + ".mf"
        size = self._size(mf)
        if size is None:
            self._manifest = None
            self.warnings.append(f"{self._where(ovf)}: no manifest ({Path(mf).name}); "
                                 "the files cannot be checked for damage")
            return
        with self._open(mf) as src:
            data = read_bounded(src, size, MAX_MANIFEST, self._where(mf), "manifest")
        self._manifest = parse_manifest(data, self._where(mf))
        self._manifest_name = mf
        for fname in self._manifest:
            if self._size(fname) is None:
                raise SourceError(f"{self._where(mf)}: lists {fname}, which is missing",
                                  hint="copy the whole package again")
        if self._size(re.sub(r"\.mf$", ".cert", mf)) is not None:
            self.warnings.append(f"{self._where(mf)}: the package is signed; v2p checks the manifest's "
                                 "digests but not the signature")

    def _check_files(self, envelope: Envelope) -> None:
        disk_files = {d.source for d in envelope.spec.disks}
        for ref in envelope.files.values():
            size = self._size(ref.href)
            if size is None:
                if ref.id in disk_files:
                    raise SourceError(f"{self._where(ref.href)}: the disk file is missing",
                                      hint="copy the whole package again")
                continue
            if ref.id not in disk_files:
                continue
            if ref.compression and ref.compression != "identity":
                raise SourceError(f"{self._where(ref.href)}: the file is {ref.compression}-compressed; "
                                  "v2p reads uncompressed packages", hint="re-export it with ovftool "
                                  "without --compress, or unpack the file first")
            if ref.chunked:
                raise SourceError(f"{self._where(ref.href)}: the file is split in chunks (ovf:chunkSize); "
                                  "not supported", hint="re-export it with ovftool without --chunkSize")
            if ref.size is not None and ref.size != size:
                raise SourceError(f"{self._where(ref.href)}: {size} bytes, the OVF says {ref.size} "
                                  "(an incomplete copy?)", hint="copy the package again")

    def _digest_for(self, href: str) -> Digest | None:
        if self._manifest is None:
            return None
        digest = self._manifest.get(href)
        if digest is None:
            self.warnings.append(f"{self._where(href)}: not listed in the manifest; not checked")
        return digest

    def _mismatch(self, href: str, digest: Digest) -> SourceError:
        return SourceError(f"{self._where(href)}: its {digest.algorithm.upper()} does not match the "
                           f"manifest {Path(self._manifest_name or '').name}: refused",
                           hint="the file is damaged or was changed; copy the package again")

    def _verify_bytes(self, href: str, data: bytes) -> None:
        digest = self._digest_for(href)
        if digest is not None:
            if hashlib.new(digest.algorithm, data).hexdigest() != digest.hexdigest:
                raise self._mismatch(href, digest)
            self._verified.add(href)

    def verify(self, href: str, *, through: str | None = None) -> None:
        """Check ``href`` against the manifest, reading it once in 1 MiB pieces; a file already checked
        is not read again. ``through``: the pinned file to read (``/dev/fd/N``), which is what the copy
        reads."""
        if href in self._verified:
            return
        digest = self._digest_for(href)
        if digest is None:
            return
        hasher = hashlib.new(digest.algorithm)
        with open(through, "rb") if through is not None else self._open(href) as src:
            while chunk := src.read(CHUNK):
                hasher.update(chunk)
        if hasher.hexdigest() != digest.hexdigest:
            raise self._mismatch(href, digest)
        self._verified.add(href)

    def _file_of(self, disk: DiskSpec) -> FileRef:
        return self.envelope().disk_file(disk, self._where(self._descriptor_name()))

    def notices(self) -> list[str]:
        return list(self.warnings)
