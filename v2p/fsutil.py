"""Files v2p writes into its own folders: atomically, privately, never through a link.

The target folder (state files, VM configs, storage.cfg, work files) is v2p's
own, but anyone who can plant a symlink or a FIFO there must not get v2p to
write somewhere else. So every file is created under a fresh random name with
``O_CREAT | O_EXCL | O_NOFOLLOW`` (what ``mkstemp`` does), fsynced and renamed
over the final name; folders are created private (0700) and a folder that is a
link, or not ours, is refused. Not for: the disks themselves (storages do that).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

from .errors import TargetError, V2PError, shown_path

PRIVATE_DIR = 0o700


def data_home() -> Path:
    """v2p's folder under ``$XDG_DATA_HOME`` (``~/.local/share/v2p``): where every target keeps its state
    unless told otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "v2p"


def private_dir(folder: Path) -> Path:
    """Create ``folder`` (and its parents) 0700 if missing; refuse a link, a non-folder, or one not ours.

    A folder that exists with looser permissions (made by an older v2p, or by
    the user) is tightened rather than refused.
    """
    folder.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    info = os.lstat(folder)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise TargetError(f"{folder} is {describe_mode(info.st_mode)}, not a folder: refused",
                          hint="remove it; v2p creates its own folders")
    if info.st_uid != os.geteuid():
        raise TargetError(f"{folder} belongs to uid {info.st_uid}, not to this user: refused",
                          hint="remove it or point v2p at a folder of your own")
    if info.st_mode & 0o077:
        os.chmod(folder, PRIVATE_DIR, follow_symlinks=False)
    return folder


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace ``path`` with ``data``: a private temporary file beside it, fsynced, renamed over it.

    A kill at any moment leaves the old file or the new one, never a torn one,
    and a link planted at ``path`` is replaced, never followed.
    """
    private_dir(path.parent)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fresh_file(path: Path) -> None:
    """An empty private file at ``path``, replacing whatever was there (a planted link is removed, not followed)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))


def fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(folder: Path, name: str) -> None:
    """Remove the temporary files ``write_atomic`` left for ``name`` when a run was killed mid-write.

    Only call this while holding whatever lock keeps other writers of ``name`` away.
    """
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if entry.name.startswith(f".{name}.") and entry.name.endswith(".tmp") \
                    and not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def open_lock_file(path: Path) -> int:
    """Open (creating it 0600) a lock file, refusing a link, a FIFO or anything but a plain file of ours."""
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the name is a symlink
            raise TargetError(f"{path} is a symbolic link: refused",
                              hint="remove it; v2p creates its lock files itself") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_uid != os.geteuid():
        os.close(fd)
        what = describe_mode(info.st_mode) if not stat.S_ISREG(info.st_mode) else "a file with other links or owner"
        raise TargetError(f"{path} is {what}, not v2p's lock file: refused",
                          hint="remove it; v2p creates its lock files itself")
    return fd


def describe_mode(mode: int) -> str:
    """What kind of file ``mode`` is, in a user's words."""
    for test, words in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"),
                        (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISREG, "a regular file")):
        if test(mode):
            return words
    return "a special file"


def remove_tree(folder: Path) -> None:
    """Remove a folder of v2p's own and all in it; a link planted in its place is removed, never followed."""
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.is_dir():
        shutil.rmtree(folder)


def read_regular(path: str | os.PathLike[str], limit: int, *, what: str = "file",
                 error: type[V2PError] = TargetError) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` of them; ``error`` (one line naming
    ``path``) for anything else.

    The open never blocks (a FIFO with no writer would hang ``open``, one with a writer ``read``) and
    the kind of file is judged on the open descriptor, not on a name that may change in between;
    a device such as ``/dev/zero`` never ends, so the size is bounded whatever the file claims.
    """
    shown = shown_path(os.fspath(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise error(f"{shown}: cannot read the {what}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {shown} is {describe_mode(info.st_mode)}, not a regular file: refused")
        if info.st_size > limit:
            raise error(f"{what} {shown} is {info.st_size} bytes, more than the {limit} a {what} may be: refused")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:  # it grew while being read
            raise error(f"{what} {shown} is more than {limit} bytes: refused")
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"{shown}: cannot read the {what}: {exc.strerror}") from None
    finally:
        os.close(fd)
