"""A vSphere disk's files, downloaded from the datastore file service into the migration's workdir.

``https://HOST/folder/PATH?dcPath=DC&dsName=DATASTORE`` serves every file of a datastore to a logged-in
session (its cookie in a header: never a URL, an argv or a log). A disk is its descriptor and the extents
it names (``-flat.vmdk``, ``-delta.vmdk``, ``-sesparse.vmdk``), and, for a VM with snapshots, the same for
every link of its chain (the backing's ``parent``). Each file is downloaded once, as ``NAME.part``, and
renamed to ``NAME`` when whole: a run that was killed resumes each ``.part`` where it stopped (an HTTP
``Range`` request, ``If-Range`` the file's ETag or Last-Modified as the part began, so a file that
changed since is downloaded whole again), a file already whole is not asked for again. Blocks of zeros
are not written (the file is sparse where the disk is empty), so the room it takes is the disk's
allocated bytes.

Measured on vcsim over loopback, pinned TLS, 2 shared cores: a 1 GiB extent at 490 MiB/s (all data),
660 MiB/s (half zeros), 950 MiB/s (all zeros): more than the qemu-img convert after it.
Streaming through qemu's curl driver instead was set aside: QEMU 7.2's https driver has no CA file or
pin option (a self-signed vCenter would need ``insecure``), and verify would download every disk again.

Not here: which files a VM has (``vsphere.py`` reads the backings), the login (``vsphere_api``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import requests

from .. import credentials
from ..endpoint import DiskEndpoint
from ..errors import SourceError
from ..inspect.vmdk import looks_like_descriptor, parse_descriptor
from ..testhooks import hold_point
from .vsphere_api import VsphereUri

CHUNK = 1 << 20  # what one read of the response asks for
BLOCK = 64 << 10  # the sparse grain: a block of this many zero bytes is skipped, not written
DESCRIPTOR_LIMIT = 1 << 20  # a text descriptor is a few hundred bytes
PROGRESS_EVERY = 0.25  # seconds between two progress reports
_ZEROS = bytes(CHUNK)

RETRIES = 5  # a transfer that broke off is resumed this many times in the same run, after 1, 2, 4, ... s
# (bytes of the disk's files on disk now, of all of them) -> None
Progress = Callable[[int, int], None]


def unread_endpoint(capacity: int, flavor: str) -> DiskEndpoint:
    """A disk not downloaded yet, for measuring only: qemu-img measures it as ``capacity`` bytes all
    allocated (the most a thin disk can need: a ``quorum`` has no allocation map, so every block counts
    as data) and any read of it fails (``blkdebug`` injects EIO), so nothing can copy it by mistake."""
    never = {"driver": "blkdebug", "inject-error": [{"event": "none", "errno": 5}],
             "image": {"driver": "null-co", "size": capacity}}
    spec = {"driver": "raw", "file": {"driver": "quorum", "vote-threshold": 1, "children": [never]}}
    return DiskEndpoint("raw", "json:" + json.dumps(spec), capacity, flavor)


class Broken(SourceError):
    """A transfer that broke off (the connection, a timeout, a body cut short): worth resuming."""


@dataclass(frozen=True)
class DatastoreFile:
    """``[DATASTORE] FOLDER/NAME``, the way vSphere names a file."""

    datastore: str
    path: str

    @classmethod
    def parse(cls, text: str, where: str) -> DatastoreFile:
        datastore, sep, path = text.strip().partition("]")
        if not datastore.startswith("[") or not sep or not path.strip():
            raise SourceError(f"{where}: {text!r} is not a datastore path ([DATASTORE] FOLDER/FILE)")
        path = path.strip()
        if path.startswith("/") or ".." in PurePosixPath(path).parts:
            raise SourceError(f"{where}: {text!r} leaves its datastore: refused")
        return cls(datastore[1:], path)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    def sibling(self, name: str, where: str) -> DatastoreFile:
        """The file ``name`` (as a descriptor names an extent or a parent) beside this one."""
        if not name or "/" in name or name in (".", ".."):
            raise SourceError(f"{where}: {self} names {name!r}, not a file beside it: refused",
                              hint="v2p reads a disk whose files share one datastore folder")
        return DatastoreFile(self.datastore, str(PurePosixPath(self.path).parent / name))

    def __str__(self) -> str:
        return f"[{self.datastore}] {self.path}"


def datacenter_path(where: VsphereUri) -> str:
    """The datacenter's inventory path (``DC0``, ``Folder/DC0``): the names before the VM folder ``vm``."""
    path = list(where.path)
    return "/".join(path[:path.index("vm")] if "vm" in path[1:] else path[:1])


class Fetcher:
    """Downloads datastore files for one source (one session cookie, one TLS policy)."""

    def __init__(self, where: VsphereUri, cookie: str, vm: str) -> None:
        self.where = where
        self.vm = vm  # names the VM in messages
        host = f"[{where.host}]" if ":" in where.host else where.host
        self.base = f"https://{host}:{where.port}"
        self.http = credentials.pinned(requests.Session(), self.base + "/", where.fingerprint,
                                       insecure=where.insecure)
        # Per request: requests 2.32+ picks the connection's TLS check from the request's own ``verify``.
        self.verify = credentials.verifies(fingerprint=where.fingerprint, insecure=where.insecure)
        self.http.headers["Cookie"] = cookie  # the header, never the URL: nothing logs it
        self.datacenter = datacenter_path(where)
        self.downloaded = 0  # bytes this fetcher read from the network
        self.resumed = 0  # transfers that broke off and were resumed

    def url(self, file: DatastoreFile) -> str:
        return (f"{self.base}/folder/{quote(file.path)}?dcPath={quote(self.datacenter, safe='')}"
                f"&dsName={quote(file.datastore, safe='')}")

    def _failed(self, file: DatastoreFile, what: str, hint: str | None = None) -> SourceError:
        return SourceError(f"{self.vm}: downloading {file}: {what}", hint=hint)

    def _request(self, method: str, file: DatastoreFile, headers: dict[str, str] | None = None,
                 ok: tuple[int, ...] = (200, 206, 416)) -> Any:
        try:
            response = self.http.request(method, self.url(file), headers=headers or {}, stream=True, verify=self.verify,
                                         timeout=self.where.timeout, allow_redirects=False)
        except requests.exceptions.SSLError as exc:
            reason = credentials.tls_refusal(exc)
            what = "the certificate is not the pinned one" if reason == "pin" else \
                "its certificate is not trusted by this machine's CA store" if reason == "untrusted" else "TLS failed"
            raise self._failed(file, what + ": refused") from None
        except requests.RequestException as exc:
            raise Broken(f"{self.vm}: downloading {file}: {type(exc).__name__}") from None
        if response.status_code not in ok:
            response.close()
            hint = "the session was refused: check the user's Datastore.Browse privilege" \
                if response.status_code in (401, 403) else None
            raise self._failed(file, f"HTTP {response.status_code} {response.reason}", hint)
        return response

    def size(self, file: DatastoreFile) -> int:
        """The file's size, as the service says: a HEAD request, else the total of a one-byte range."""
        response = self._request("HEAD", file, ok=(200, 405, 501))  # a service may not do HEAD
        response.close()
        length = response.headers.get("Content-Length", "")
        if response.status_code == 200 and length.isdigit():
            return int(length)
        with self._request("GET", file, {"Range": "bytes=0-0"}) as response:
            total = _range_total(response.headers.get("Content-Range", ""))
            if response.status_code == 200 and response.headers.get("Content-Length", "").isdigit():
                total = int(response.headers["Content-Length"])
        if total < 0:
            raise self._failed(file, "the service gives no size")
        return total

    def fetch(self, file: DatastoreFile, dest: Path, progress: Callable[[int], None]) -> None:
        """``file`` into ``dest``: resumed from ``dest.part`` when one is there; nothing done when ``dest``
        is. ``progress(n)``: ``n`` more bytes of it are on disk. A transfer that breaks off is resumed
        (``RETRIES`` times) before it is an error."""
        for attempt in range(RETRIES + 1):
            try:
                return self._fetch(file, dest, progress)
            except Broken:
                if attempt == RETRIES:
                    raise
                self.resumed += 1
                time.sleep(min(2 ** attempt, 30))

    def _fetch(self, file: DatastoreFile, dest: Path, progress: Callable[[int], None]) -> None:
        if dest.is_file():
            return
        part = dest.with_name(dest.name + ".part")
        tag = dest.with_name(dest.name + ".part.tag")  # the file's ETag or Last-Modified when the part began
        start = part.stat().st_size if part.is_file() else 0
        headers = {"Range": f"bytes={start}-"} if start else {}
        if start and tag.is_file():  # the rest of that same file, or (it changed since) all of the new one
            headers["If-Range"] = tag.read_text()
        response = self._request("GET", file, headers)
        with response:
            if response.status_code == 416:  # nothing left after ``start``: the part is whole, or wrong
                total = _range_total(response.headers.get("Content-Range", ""))
                if total == start:
                    os.replace(part, dest)
                    tag.unlink(missing_ok=True)
                    return
                part.unlink()
                tag.unlink(missing_ok=True)
                return self._fetch(file, dest, progress)
            if response.status_code == 206:
                total = _range_total(response.headers.get("Content-Range", ""))
                if not response.headers.get("Content-Range", "").startswith(f"bytes {start}-"):
                    raise self._failed(file, "the service answered another range than the one asked for")
            else:  # 200: the whole file (a service that does not do ranges): start over
                start, total = 0, int(response.headers.get("Content-Length") or -1)
            if start:
                progress(start)
            else:
                validator = response.headers.get("ETag") or response.headers.get("Last-Modified") or ""
                tag.unlink(missing_ok=True)
                if validator.isprintable() and validator:
                    tag.write_text(validator)
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                offset = self._write(response, fd, start, total, file, progress)
                os.fsync(fd)
            except OSError as exc:
                raise self._failed(file, f"writing {part}: {exc.strerror}",
                                   "the state folder needs room for the disk's allocated bytes") from None
            finally:
                os.close(fd)
        if total >= 0 and offset != total:
            raise Broken(f"{self.vm}: downloading {file}: the transfer ended at byte {offset} of {total}")
        os.replace(part, dest)
        tag.unlink(missing_ok=True)

    def _write(self, response: Any, fd: int, start: int, total: int, file: DatastoreFile,
               progress: Callable[[int], None]) -> int:
        """The body into ``fd`` from ``start`` on, zero blocks skipped; the offset it ended at."""
        os.ftruncate(fd, start)
        offset, half = start, total // 2 if total > 2 * CHUNK else -1
        try:
            for chunk in response.iter_content(CHUNK):
                view = memoryview(chunk)
                for at in range(0, len(view), BLOCK):
                    block = view[at:at + BLOCK]
                    if _ZEROS.startswith(block):
                        os.ftruncate(fd, offset + at + len(block))  # the size says how far the part got
                    else:
                        os.pwrite(fd, block, offset + at)
                offset += len(chunk)
                self.downloaded += len(chunk)
                progress(len(chunk))
                if 0 <= half <= offset:
                    hold_point("fetch:half")
                    half = -1
        except requests.RequestException as exc:
            raise Broken(f"{self.vm}: downloading {file}: the transfer broke off at byte {offset} "
                         f"({type(exc).__name__})") from None
        return offset


def _range_total(content_range: str) -> int:
    """N of ``bytes A-B/N`` (or ``bytes */N``); -1 when it is not said."""
    total = content_range.rpartition("/")[2]
    return int(total) if total.isdigit() else -1


def fetch_disk(fetcher: Fetcher, chain: list[DatastoreFile], folder: Path, progress: Progress) -> Path:
    """Every file of the disk whose chain (current link first, base last) is ``chain`` into ``folder``
    (one folder, files by name, as the datastore folder holds them); the local current descriptor.
    Descriptors come first (small: they say which extents there are), then the extents with a progress
    over all of them."""
    names: dict[str, DatastoreFile] = {}
    extents: list[DatastoreFile] = []
    for descriptor in chain:
        _claim(names, descriptor, fetcher)
        local = folder / descriptor.name
        fetcher.fetch(descriptor, local, lambda _n: None)
        head = local.read_bytes()[:DESCRIPTOR_LIMIT] if local.stat().st_size <= DESCRIPTOR_LIMIT else b""
        if not looks_like_descriptor(head):
            continue  # one file with its data inside (a hosted sparse disk): it is its own extent
        parsed = parse_descriptor(head, f"{fetcher.vm}: {descriptor}")
        for _access, _size, _type, name, _offset in parsed.extents:
            if name:
                extent = descriptor.sibling(name, fetcher.vm)
                _claim(names, extent, fetcher)
                extents.append(extent)
    sizes = [fetcher.size(extent) for extent in extents]
    total = sum(sizes)
    # Whole files count as done; a part's bytes are counted by ``fetch`` as it resumes.
    done = sum(size for extent, size in zip(extents, sizes, strict=True) if (folder / extent.name).is_file())
    state = {"done": float(done), "said": 0.0}

    def step(n: int) -> None:
        state["done"] += n
        now = time.monotonic()
        if now - state["said"] >= PROGRESS_EVERY or state["done"] >= total:
            state["said"] = now
            progress(int(state["done"]), total)

    progress(done, total)
    for extent in extents:
        fetcher.fetch(extent, folder / extent.name, step)
    progress(total, total)
    return folder / chain[0].name


def _claim(names: dict[str, DatastoreFile], file: DatastoreFile, fetcher: Fetcher) -> None:
    """Two files of one disk under one name would overwrite each other in the local folder: refused."""
    if names.setdefault(file.name, file) != file:
        raise SourceError(f"{fetcher.vm}: {file} and {names[file.name]} have the same name: v2p cannot "
                          "stage them in one folder", hint="consolidate the VM's snapshots in vSphere first")
