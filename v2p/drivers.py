"""The virtio-win drivers ISO: find it, read its tree without mounting, and
check it holds the drivers a Windows guest needs.

virtio-win lays drivers out as ``<driver>/<os>/<arch>/<name>.inf``
(``viostor/w7/amd64/viostor.inf``, ``NetKVM/2k19/amd64/netkvm.inf``). One PVE
ostype covers several Windows releases (``win10`` is also Server 2016/2019),
so each ostype maps to the folders any of which will do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DriversError

# PVE ostype -> virtio-win OS folders, the closest first.
WINDOWS_FOLDERS = {
    "win11": ("w11", "2k22", "2k25"),
    "win10": ("w10", "2k19", "2k16"),
    "win8": ("w8.1", "w8", "2k12R2", "2k12"),
    "win7": ("w7", "2k8R2"),
    "wvista": ("2k8",),
    "w2k8": ("2k8", "2k8R2"),
    "w2k3": ("2k3",),
    "wxp": ("xp",),
    "w2k": ("xp",),
}
# Driver folder on the ISO -> its .inf name.
INF_NAMES = {"viostor": "viostor.inf", "vioscsi": "vioscsi.inf", "NetKVM": "netkvm.inf"}
ISO_NAME = "virtio-win.iso"
ENV = "V2P_DRIVERS_ISO"
USUAL_PLACES = (Path("/usr/share/virtio-win") / ISO_NAME, Path("/var/lib/vz/template/iso") / ISO_NAME)


@dataclass(frozen=True)
class DriversIso:
    """A drivers ISO and the files on it (paths as on the ISO, e.g. ``viostor/w7/amd64/viostor.inf``)."""

    path: Path
    files: frozenset[str]

    def folder_for(self, driver: str, ostype: str, arch: str) -> str | None:
        """The folder holding ``driver`` for this Windows and architecture, or None."""
        inf = INF_NAMES[driver].lower()
        for os_folder in WINDOWS_FOLDERS.get(ostype, ()):
            folder = f"{driver}/{os_folder}/{arch}"
            if f"{folder}/{inf}".lower() in self.files:
                return folder
        return None

    def require(self, drivers: tuple[str, ...], ostype: str, arch: str) -> dict[str, str]:
        """{driver: folder} for every driver; a DriversError naming what is missing otherwise."""
        found = {driver: self.folder_for(driver, ostype, arch) for driver in drivers}
        missing = [driver for driver, folder in found.items() if folder is None]
        if missing:
            wanted = "/".join(WINDOWS_FOLDERS.get(ostype, ("?",)))
            raise DriversError(
                f"{self.path} has no {', '.join(missing)} driver for {ostype} ({wanted}, {arch})",
                hint="use a current virtio-win ISO (--drivers-iso)")
        return {driver: folder for driver, folder in found.items() if folder is not None}


def read_iso(path: Path) -> DriversIso:
    """List every file on the ISO (Rock Ridge, else Joliet, else plain ISO 9660 names)."""
    import pycdlib
    from pycdlib.pycdlibexception import PyCdlibException

    iso = pycdlib.PyCdlib()
    try:
        iso.open(str(path))
    except (PyCdlibException, OSError) as exc:
        raise DriversError(f"{path} is not a readable ISO image: {exc}") from None
    try:
        if iso.has_rock_ridge():
            walk = iso.walk(rr_path="/")
        elif iso.has_joliet():
            walk = iso.walk(joliet_path="/")
        else:
            walk = iso.walk(iso_path="/")
        files = set()
        for folder, _dirs, names in walk:
            for name in names:
                clean = name.split(";")[0].rstrip(".")
                files.add(f"{folder.strip('/')}/{clean}".strip("/").lower())
    finally:
        iso.close()
    return DriversIso(path, frozenset(files))


def locate(explicit: str | None, extra_places: tuple[Path, ...] = ()) -> Path:
    """The drivers ISO: ``--drivers-iso``, else ``$V2P_DRIVERS_ISO``, else the usual places."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise DriversError(f"drivers ISO {explicit}: no such file")
        return path
    if os.environ.get(ENV):
        return locate(os.environ[ENV])
    for candidate in (*extra_places, *USUAL_PLACES):
        if candidate.is_file():
            return candidate
    places = ", ".join(str(p) for p in (*extra_places, *USUAL_PLACES))
    raise DriversError("no virtio drivers ISO found (looked in " + places + ")",
                       hint="download virtio-win.iso and pass --drivers-iso PATH")
