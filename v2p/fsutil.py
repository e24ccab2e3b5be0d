"""v2p's own folders and the small files in them: never through a link, never another user's.

The target folder (state files, VM configs, storage.cfg, volumes, run and work
files) is v2p's own, but anyone who can plant a symlink, a FIFO or a folder
there must not get v2p to write, delete or read somewhere else, or to hang.
So every folder v2p writes, renames or deletes under is opened from the
operator's folder down without following links and must be ours and
writable by nobody else (``open_dir``); files are created under a fresh name
with ``O_CREAT | O_EXCL | O_NOFOLLOW``, fsynced and renamed over the final
name relative to the folder's descriptor (``write_atomic``); and every small
file read back is opened without following links or blocking and checked on
the open descriptor (``read_small``). Not for: the disks' bytes (storages and
qemu-img do that, inside folders opened here).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import TargetError, V2PError, shown_path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
# The files v2p reads back from its folders (state, configs, storage.cfg, pid files) are small;
# anything bigger is not one of them (a link to /dev/zero, a runaway log).
SMALL_FILE = 16 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def data_home() -> Path:
    """v2p's folder under ``$XDG_DATA_HOME`` (``~/.local/share/v2p``): where every target keeps its state
    unless told otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "v2p"


def open_dir(root: Path, *parts: str, create: bool = True, private: bool = True) -> int:
    """A descriptor of the folder ``root/parts...``, for ``dir_fd`` operations; the caller closes it.

    ``root`` is the operator's folder (it may be reached through a link the
    operator made); it must belong to this user or to root and not be writable
    by others (a sticky folder like /tmp is fine: nobody can swap our entries in it).
    Each of ``parts`` is v2p's own: opened from the one before without
    following links, created 0700 when missing (if ``create``, else
    FileNotFoundError), refused unless it is a folder of this user that nobody
    else can write to, and tightened to 0700 if ``private`` (a storage's folders
    may be shared with PVE, which reads them as root: their modes are left as
    they are). So no path component anybody else can change lies between
    ``root`` and what v2p writes, renames or deletes.
    """
    if create:
        with contextlib.suppress(FileExistsError):
            root.mkdir(mode=PRIVATE_DIR, parents=True)
    try:
        fd = os.open(root, _DIR_FLAGS)
    except NotADirectoryError:
        raise TargetError(f"{root} is not a folder", hint="point v2p at a folder") from None
    try:
        _check_dir(fd, root, operators=True, tighten=False)
        where = root
        for part in parts:
            where = where / part
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, PRIVATE_DIR, dir_fd=fd)
            try:
                child = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    info = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    raise TargetError(f"{where} is {describe_mode(info.st_mode)}, not a folder: refused",
                                      hint=f"remove it (rm {where}); v2p creates its own folders") from None
                raise
            os.close(fd)
            fd = child
            _check_dir(fd, where, operators=False, tighten=private)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def own_dir(root: Path, *parts: str, create: bool = True, private: bool = True) -> Iterator[int]:
    """``open_dir`` as a context: the folder's descriptor, closed on leaving."""
    fd = open_dir(root, *parts, create=create, private=private)
    try:
        yield fd
    finally:
        os.close(fd)


def _check_dir(fd: int, where: Path, *, operators: bool, tighten: bool) -> None:
    """The operator's folder may be root's, and sticky (nobody swaps our entries there); v2p's are ours."""
    info = os.fstat(fd)
    if info.st_uid not in ((os.geteuid(), 0) if operators else (os.geteuid(),)):
        raise TargetError(f"{where} belongs to uid {info.st_uid}, not to this user: refused",
                          hint=f"chown {os.geteuid()} {where}, or point v2p at a folder of your own")
    if info.st_mode & 0o022 and not (operators and info.st_mode & stat.S_ISVTX):
        raise TargetError(f"{where} can be written to by other users: refused",
                          hint=f"chmod go-w {where}")
    if tighten and info.st_mode & 0o077:
        os.fchmod(fd, PRIVATE_DIR)


def private_dir(folder: Path, *, root: Path | None = None) -> Path:
    """Create and check ``folder`` (see ``open_dir``): every component below ``root`` (by default the
    folder's parent) is v2p's own, private and no link."""
    base = root if root is not None else folder.parent
    os.close(open_dir(base, *folder.relative_to(base).parts))
    return folder


def listdir_own(folder: Path) -> list[str]:
    """The names in ``folder``, one of v2p's own (checked as ``private_dir`` does, never through a
    link); none if it does not exist."""
    try:
        with own_dir(folder.parent, folder.name, create=False) as fd:
            return os.listdir(fd)
    except FileNotFoundError:
        return []


def read_small(path: Path, *, limit: int = SMALL_FILE) -> bytes:
    """The bytes of a small file of v2p's own (a state file, a config, a pid file).

    Opened without following a link and without blocking (a FIFO planted at the
    name neither hangs nor is read), checked on the open descriptor to be a
    regular file of at most ``limit`` bytes, then read. A missing file is
    FileNotFoundError; anything else at the name is a TargetError naming it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise unexpected_file(path, stat.S_IFLNK) from None
        if exc.errno == errno.ENOENT:
            raise
        raise TargetError(f"{path}: cannot read: {exc.strerror}", hint=_remove_hint(path)) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise unexpected_file(path, mode)
    return _read_checked(fd, limit, lambda why: TargetError(f"{path} {why}: refused", hint=_remove_hint(path)),
                         f"v2p ever writes there ({limit})")


def unexpected_file(path: Path, mode: int) -> TargetError:
    """The error for something that is not a plain file at the name of one of v2p's files."""
    return TargetError(f"{path} is {describe_mode(mode)}, not a file v2p wrote: refused",
                       hint=_remove_hint(path, folder=stat.S_ISDIR(mode)))


def _remove_hint(path: Path, *, folder: bool = False) -> str:
    return f"it is not v2p's: look at it, then remove it by hand ({'rm -r' if folder else 'rm'} {path})"


def remove_entry(folder_fd: int, name: str, where: Path) -> None:
    """Remove ``name`` from the folder open as ``folder_fd`` (``where`` names it in messages).

    A file, link, FIFO or device node is unlinked (which never opens or follows
    it); an empty folder is removed; a folder with something in it is left
    alone with a TargetError saying what to remove by hand.
    """
    try:
        os.unlink(name, dir_fd=folder_fd)
    except FileNotFoundError:
        return
    except IsADirectoryError:
        try:
            os.rmdir(name, dir_fd=folder_fd)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
            raise unexpected_file(where / name, stat.S_IFDIR) from None


def remove_tree_at(folder_fd: int, name: str) -> None:
    """Remove the folder ``name`` (and all in it) from the folder open as ``folder_fd``; never follows
    a link, at any depth (a link at ``name`` itself is unlinked)."""
    try:
        info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(name, dir_fd=folder_fd)
    else:
        os.unlink(name, dir_fd=folder_fd)


SCRATCH = "v2p-scratch"  # under $TMPDIR: one folder per user, one locked folder per use inside


@contextlib.contextmanager
def scratch_dir(kind: str) -> Iterator[Path]:
    """A private folder for one short job (inspecting a VM, reading a boot sector), removed on leaving.

    It lies in ``$TMPDIR/v2p-scratch-<uid>/`` (0700, ours, checked as every folder of v2p's is)
    and is flock'ed while in use; a folder there whose lock nobody holds (and older than a minute)
    was left by a process that was killed (SIGKILL runs no cleanup), and is swept by the next user of
    ``scratch_dir``. Never follows a link: a planted one is removed like any leftover.
    """
    base = Path(tempfile.gettempdir())
    with own_dir(base, f"{SCRATCH}-{os.getuid()}") as parent:
        _sweep_scratch(parent)
        name = f"{kind}-{secrets.token_hex(8)}"
        os.mkdir(name, PRIVATE_DIR, dir_fd=parent)
        fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new folder: nobody else holds it
            yield base / f"{SCRATCH}-{os.getuid()}" / name
        finally:
            try:
                remove_tree_at(parent, name)
            finally:
                os.close(fd)


SCRATCH_GRACE = 60.0  # seconds: a younger folder may be between its mkdir and its lock (another process's)


def _sweep_scratch(parent: int) -> None:
    """Remove the scratch folders of processes that died without removing theirs (no lock held, and
    older than SCRATCH_GRACE: a folder is made, then locked, and another process may be in between)."""
    now = time.time()
    for entry in os.scandir(parent):
        with contextlib.suppress(OSError):
            if now - entry.stat(follow_symlinks=False).st_mtime < SCRATCH_GRACE:
                continue
        try:
            fd = os.open(entry.name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
        except OSError:  # a link, a file, gone meanwhile: not a live scratch folder
            with contextlib.suppress(OSError):
                remove_tree_at(parent, entry.name)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # in use by a live process
        finally:
            os.close(fd)  # our lock goes with it; the tree goes next
        with contextlib.suppress(OSError):
            remove_tree_at(parent, entry.name)


def write_atomic(path: Path, data: bytes | str, *, root: Path | None = None) -> None:
    """Replace ``path`` with ``data``: a private temporary file beside it, fsynced, renamed over it.

    A kill at any moment leaves the old file or the new one, never a torn one,
    and a link planted at ``path`` is replaced, never followed. The folder is
    checked as ``private_dir`` does (below ``root``, by default its parent).
    """
    raw = data.encode() if isinstance(data, str) else data
    base = root if root is not None else path.parent.parent
    with own_dir(base, *path.parent.relative_to(base).parts) as folder:
        tmp = create_exclusive(folder, f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            with os.fdopen(tmp[1], "wb") as handle:
                handle.write(raw)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp[0], path.name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp[0], dir_fd=folder)
            raise
        os.fsync(folder)


def create_exclusive(folder_fd: int, name: str) -> tuple[str, int]:
    """(name, fd) of a new private file ``name`` in the folder open as ``folder_fd``; never opens
    anything that was there (``O_EXCL | O_NOFOLLOW``): FileExistsError if the name is taken."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE,
                 dir_fd=folder_fd)
    return name, fd


def fresh_file(folder_fd: int, name: str) -> None:
    """An empty private file ``name`` in the folder open as ``folder_fd``, replacing whatever was
    there (a planted link is removed, not followed)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=folder_fd)
    os.close(create_exclusive(folder_fd, name)[1])


def remove_stale_temporaries(folder: Path, name: str) -> None:
    """Remove the temporary files ``write_atomic`` left for ``name`` when a run was killed mid-write.

    Only call this while holding whatever lock keeps other writers of ``name`` away.
    """
    try:
        with own_dir(folder.parent, folder.name, create=False) as fd:
            for entry in os.scandir(fd):
                if entry.name.startswith(f".{name}.") and entry.name.endswith(".tmp") \
                        and not entry.is_dir(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.name, dir_fd=fd)
    except FileNotFoundError:
        return


def open_lock_file(path: Path) -> int:
    """Open (creating it 0600) a lock file, refusing a link, a FIFO or anything but a plain file of ours."""
    with own_dir(path.parent.parent, path.parent.name) as folder:
        try:
            fd = os.open(path.name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         PRIVATE_FILE, dir_fd=folder)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # the name is a symlink
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
    try:
        with own_dir(folder.parent, create=False) as parent:
            remove_tree_at(parent, folder.name)
    except FileNotFoundError:
        return


def read_regular(path: str | os.PathLike[str], limit: int, *, what: str = "file",
                 error: type[V2PError] = TargetError) -> bytes:
    """The bytes of a regular file the user named (a plan: it may be a link), at most ``limit``;
    ``error`` (one line naming ``path``) for anything else. ``read_small`` is for v2p's own files.

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
        return _read_checked(fd, limit, lambda why: error(f"{what} {shown} {why}: refused"),
                             f"the {limit} bytes a {what} may be")
    except OSError as exc:
        raise error(f"{shown}: cannot read the {what}: {exc.strerror}") from None


def _read_checked(fd: int, limit: int, refuse: Callable[[str], V2PError], bound: str) -> bytes:
    """Read the open ``fd`` (closed here): a regular file of at most ``limit`` bytes (``bound`` says
    whose limit), else ``refuse(why)`` is raised; one that grows past ``limit`` while read too."""
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise refuse(f"is {describe_mode(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise refuse(f"is {info.st_size} bytes, more than {bound}")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise refuse(f"grew beyond {bound} while read")
    return data
