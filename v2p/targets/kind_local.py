"""The ``local`` target kind: the embedded QEMU target, named ``local`` or ``{"kind": "local", "dir": ...,
"accel": ...}``; its folder and acceleration checked here, before anything is made.

Not here: the target itself (``local``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import shown, shown_path
from ..options import OptionError, check_text
from .kinds import TargetKind, TargetOptions, register

if TYPE_CHECKING:
    from .local import LocalTarget

ACCELS = ("auto", "kvm", "tcg")


def local_target(directory: str | os.PathLike[str] | None = None, *, accel: str = "auto") -> LocalTarget:
    """The embedded QEMU target (``V2P_TARGET_DIR`` or the XDG data dir by default)."""
    from .local import LocalTarget

    # An empty folder name (an unset shell variable, most likely) must not quietly mean the default one.
    if directory is not None and not isinstance(directory, (str, os.PathLike)):
        check_text("--target-dir", directory)
    if directory is not None and not os.fspath(directory):
        raise OptionError("--target-dir is empty", hint="give a directory, or leave the option out for "
                          "$V2P_TARGET_DIR or ~/.local/share/v2p/local")
    if directory is None and os.environ.get("V2P_TARGET_DIR") == "":
        raise OptionError("$V2P_TARGET_DIR is set but empty",
                          hint="set it to a directory, or unset it for ~/.local/share/v2p/local")
    if accel not in ACCELS:
        raise OptionError(f"--accel {shown(accel)}: must be one of " + ", ".join(ACCELS))
    folder = check_text("--target-dir", directory, optional=True)
    if folder is not None:
        # The kernel's own file systems take no folders of ours: say so now, not as an OSError mid-run.
        real = os.path.realpath(folder)
        for kernel in ("/proc", "/sys"):
            if real == kernel or real.startswith(kernel + "/"):
                raise OptionError(f"--target-dir {shown_path(folder)} is under {kernel}, the kernel's own file "
                                  "system: refused", hint="give a folder on a disk")
    return LocalTarget(Path(folder) if folder is not None else None, accel=accel)


def _from_url(url: str, options: TargetOptions) -> LocalTarget:
    return local_target(options.directory, accel=options.accel)


def _from_dict(settings: dict[str, Any], options: TargetOptions) -> LocalTarget:
    return local_target(settings.get("dir", options.directory), accel=settings.get("accel", options.accel))


KIND = register(TargetKind("local", "local", "local (default: the embedded QEMU target)", '{"kind": "local"}',
                           _from_url, _from_dict, words=("local",), keys=("dir", "accel"),
                           choices={"accel": ACCELS}))
