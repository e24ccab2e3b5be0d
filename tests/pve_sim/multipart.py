"""An upload's multipart body read as pveproxy reads it, and its errors answered as pveproxy answers them.

pve-http-server ``src/PVE/APIServer/AnyEvent.pm``, ``file_upload_multipart``: no general multipart
parser, but anchored regexes run in a fixed order over the read buffer -- the form fields
``content``, then ``checksum-algorithm``, then ``checksum`` (each optional), then the file part,
which must be named ``filename`` and carry a ``filename="..."``. A field sent out of that order is
either skipped or, when a later field's regex reaches across it, a ``die`` (see ``UploadRefused``).
The file's bytes are spooled to ``/var/tmp/pveupload-<hex>`` on the node's root file system
(``get_upload_filename``), and only then does the API handler (pve-storage ``PVE/API2/Storage/Status.pm``,
``upload``) see the request, with that spool file as ``tmpfilename``.

pveproxy runs the regexes each time data arrives; the simulator has the whole body and runs them
once, which is what pveproxy does when the fields arrive in one read (any well-formed request's
first read holds them: they are a few hundred bytes). Not here: what the handler does with the
spool file (``cluster.upload``).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path

# Where PVE's line numbers of ``die`` without a newline point (pve-http-server, AnyEvent.pm); Perl
# appends " at FILE line N.\n" to such a message, and pveproxy sends it as it is.
_ANYEVENT = "/usr/share/perl5/PVE/APIServer/AnyEvent.pm"
_LINE_WRONG_FIELD = 1325
_LINE_UPLOAD_FAILED = 1370

_NEWLINE = rb"(?:\r?\n)"  # my $newline_re = qr/\015?\012/;


class UploadRefused(Exception):
    """A ``die`` inside ``file_upload_multipart``: pveproxy answers ``$self->error($reqstate, 500, $err)``."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.message, self.status = message, status

    def response(self) -> tuple[int, str, bytes]:
        """Status, reason and body as pveproxy sends them. ``AnyEvent.pm``, ``response``: the status
        line keeps only the message's first line (``m/^(.*)$/m``), and a first line that still holds a
        CR or LF turns the answer into ``400 Bad Request`` with no body ("avoid linefeeds in response
        status"); otherwise the body is the whole message (``error``: ``$content //= $msg``)."""
        first = re.match(r"^(.*)$", self.message, re.M)
        reason = first.group(1) if first else self.message
        if re.search(r"[\r\n]", reason):
            return 400, "Bad Request", b""
        return self.status, reason, self.message.encode("utf-8", "surrogateescape")


def _die(message: str, line: int | None = None) -> UploadRefused:
    """Perl's ``die``: a message without a trailing newline gets " at FILE line N.\\n"."""
    return UploadRefused(message if line is None else f"{message} at {_ANYEVENT} line {line}.\n")


def _assert_form_disposition(value: bytes) -> None:
    """``assert_form_disposition``: the disposition must be exactly ``form-data``."""
    if value != b"form-data":
        text = value.decode("utf-8", "surrogateescape")
        raise _die(f"wrong Content-Disposition '{text}' in multipart, expected 'form-data'\n")


def _trim(value: bytes) -> str:
    """PVE::Tools::trim: leading and trailing whitespace off."""
    return value.strip().decode("utf-8", "surrogateescape")


@dataclass
class Upload:
    params: dict[str, str]  # the query's parameters, then the form fields and ``filename``
    spool: Path  # /var/tmp/pveupload-<hex>: the file's bytes


def parse_content_type(content_type: str) -> tuple[str, str | None]:
    """``AnyEvent.pm``, ``parse_content_type``: the type and the ``boundary`` parameter (taken as it
    stands: no quotes removed, as ``(\\S+?)`` takes them)."""
    ct, *params = re.split(r"\s*[;,]\s*", content_type)
    for value in params:
        match = re.match(r"^\s*boundary\s*=\s*(\S+?)\s*$", value)
        if match:
            return ct, match.group(1)
    return ct, None


def _before_close(buf: bytes, start: int, close_delim: bytes) -> memoryview | None:
    r"""Phase 2's ``s/^(.*?)${newline_re}?+${close_delim_re}.*$//s`` (``$close_delim_re``:
    ``--\Q$boundary\E--``) on ``buf`` from ``start``: the file's bytes before the first close
    delimiter, one CRLF or LF before it dropped (the possessive ``?+``), None without one. A lazy
    regex over a whole disk image takes Python's ``re`` seconds per hundred MiB where pveproxy, reading
    as the body arrives, is done with its last read; a search for the delimiter takes the same bytes."""
    at = buf.find(close_delim, start)
    if at < 0:
        return None
    end = at
    if buf[max(at - 2, start):at] == b"\r\n":
        end = at - 2
    elif buf[max(at - 1, start):at] == b"\n":
        end = at - 1
    return memoryview(buf)[start:end]


def file_upload_multipart(body: bytes, boundary: str, params: dict[str, str], spool_dir: Path, *,
                          room: int | None = None) -> Upload:
    """The body of an upload whose ``Content-Type`` gave ``boundary``, read as ``file_upload_multipart``
    reads it; ``params`` are the query's (``decode_urlencoded($request->url->query())``). Raises
    ``UploadRefused`` where pveproxy dies. ``room``: the bytes ``spool_dir``'s file system has free
    (None: as many as the real one takes)."""
    params = dict(params)
    bound = re.escape(boundary.encode())
    delim = rb"--" + bound + _NEWLINE  # my $delim_re = qr/--\Q$boundary\E${newline_re}/;
    # pveproxy cuts what it has parsed off the front of its read buffer (``$hdl->{rbuf} =~ s/^...//``);
    # here the buffer stays whole and ``pos`` is where its front is (no copy of a disk image per cut).
    buf, pos = body, 0
    phase = 0

    # Phase 0 - preserve boundary, but remove everything before
    found = re.compile(rb"(?s).*?(" + delim + rb")").match(buf)
    if found:
        pos, phase = found.start(1), 1

    until_data = re.compile(rb"(?s).*?" + _NEWLINE + rb"{2}")

    def remove_until_data(at: int) -> int:
        # $hdl->{rbuf} =~ s/^.*?${newline_re}{2}//s;
        cut = until_data.match(buf, at)
        return cut.end() if cut else at

    def extract_form_disposition(at: int, name: str) -> int:
        # s/^${delim_re}.*?Content-Disposition: (.*?); name="$name"(.*?${delim_re})/$2/s
        match = re.compile(rb"(?s)" + delim + rb".*?Content-Disposition: (.*?); name=\"" + name.encode()
                           + rb"\"(.*?" + delim + rb")").match(buf, at)
        if not match:
            return at
        _assert_form_disposition(match.group(1))
        at = remove_until_data(match.start(2))  # what is left: $2 and all after it
        # s/^(.*?)(${delim_re})/$2/s
        value = re.compile(rb"(?s)(.*?)(" + delim + rb")").match(buf, at)
        if value:
            params[name] = _trim(value.group(1))
            at = value.start(2)
        return at

    spool: Path | None = None
    if phase == 1:  # Phase 1 - parse payload without file data
        for name in ("content", "checksum-algorithm", "checksum"):
            pos = extract_form_disposition(pos, name)
        match = re.compile(rb"(?s)" + delim + rb"Content-Disposition: (.*?); name=\"(.*?)\"; "
                           rb"filename=\"([^\"]+)\"").match(buf, pos)
        if match:
            _assert_form_disposition(match.group(1))
            if match.group(2) != b"filename":
                raise _die(f"wrong field name '{match.group(2).decode('utf-8', 'surrogateescape')}' for file "
                           "upload, expected 'filename'", _LINE_WRONG_FIELD)
            phase = 2
            params["filename"] = _trim(match.group(3))
            pos = remove_until_data(match.end())
            # get_upload_filename: an unpredictable name in /var/tmp, created O_EXCL before the body is read
            spool = spool_dir / f"pveupload-{secrets.token_hex(16)}"

    if phase == 2:  # Phase 2 - dump content into file
        assert spool is not None
        data = _before_close(buf, pos, b"--" + boundary.encode() + b"--")
        if data is not None:
            if room is not None and len(data) > room:
                # syswrite($rstate->{outfh}, $data) == $write_length or die "write to temporary file failed - $!\n"
                raise _die("write to temporary file failed - No space left on device\n")
            spool.write_bytes(data)
            phase = 100

    if phase != 100:  # the whole body read and no end found: "upload failed"
        raise _die("upload failed", _LINE_UPLOAD_FAILED)
    assert spool is not None
    return Upload(params, spool)
