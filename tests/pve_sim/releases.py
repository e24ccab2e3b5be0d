"""The PVE releases the simulator can play (``PVESim(root, release="8.3")``, ``--release 8.3``):
what ``GET /version`` answers, the package versions behind it, the storages a fresh install has,
and each decision that differs between releases, taken where the package's code takes it.

The package versions are those of each release's first ISO (the packages' ``debian/changelog``
dates next to pve-manager's bump to that version); the decisions below compare the package's
own version, not pve-manager's, as the real code does (v2p's ``pve_releases`` maps back from
pve-manager's version, which is all the API shows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cluster import PVEError

Version = tuple[int, ...]


@dataclass(frozen=True)
class SimRelease:
    name: str  # "8.3": GET /version's ``release``
    manager: str  # pve-manager's version: GET /version's ``version``
    storage: Version  # libpve-storage-perl
    qemu_server: Version
    local_content: frozenset[str]  # what a fresh install's `local` (dir, /var/lib/vz) holds


# pve-installer Proxmox/Install/StorageConfig.pm get_lvm_thin_config: `local` is
# "iso,vztmpl,backup" until commit ec1d5ee (2025-08-04, "install: pve storage config: enable
# import content type by default", the PVE 9.0 ISO), "iso,vztmpl,backup,import" since.
_LOCAL_8 = frozenset({"iso", "vztmpl", "backup"})
_LOCAL_9 = _LOCAL_8 | {"import"}

RELEASES = {
    "8.0": SimRelease("8.0", "8.0.3", (8, 0, 1), (8, 0, 6), _LOCAL_8),
    "8.2": SimRelease("8.2", "8.2.2", (8, 2, 1), (8, 2, 1), _LOCAL_8),
    "8.3": SimRelease("8.3", "8.3.0", (8, 2, 9), (8, 2, 8), _LOCAL_8),
    "8.4": SimRelease("8.4", "8.4.1", (8, 3, 6), (8, 3, 12), _LOCAL_8),
    "9.0": SimRelease("9.0", "9.0.3", (9, 0, 13), (9, 0, 16), _LOCAL_9),
    "9.1": SimRelease("9.1", "9.1.1", (9, 0, 18), (9, 1, 0), _LOCAL_9),
}
# Without a release the simulator is a 9.1 node whose storages suit the older tests
# (`local` takes images and import too).
DEFAULT = RELEASES["9.1"]


def release(name: str | None) -> SimRelease:
    if name is None:
        return DEFAULT
    if name not in RELEASES:
        raise ValueError(f"no simulated PVE release {name!r}: one of {', '.join(RELEASES)}")
    return RELEASES[name]


def version_info(rel: SimRelease) -> dict[str, str]:
    """pve-manager PVE/pvecfg.pm.in version_info (what GET /version answers)."""
    return {"version": rel.manager, "release": rel.name, "repoid": "simulated"}


def _bad_param(name: str, message: str) -> PVEError:
    """PVE::Exception raise_param_exc: a 400 with the parameter's error."""
    from .cluster import PVEError  # cluster imports this module

    return PVEError(400, "Parameter verification failed.", {name: message})


def check_content_param(rel: SimRelease, content: str | None) -> None:
    """A `content` parameter of format 'pve-storage-content' (GET .../storage?content=,
    GET .../content?content=, the upload's content): PVE::Storage::Plugin::verify_content knows
    'import' from libpve-storage-perl 8.1.1 on ("return $ct if $ct eq 'import'"); before, the
    schema check dies "invalid content type 'import'", a 400."""
    if content == "import" and rel.storage < (8, 1, 1):
        raise _bad_param("content", "invalid content type 'import'")


def check_storage_content(rel: SimRelease, kind: str, content: set[str]) -> None:
    """A storage's content list (``pvesm set --content``, PVE::API2::Storage::Config update through
    PVE::Storage::Plugin::check_config): a dir storage takes 'import' from libpve-storage-perl
    8.2.8 on (PVE::Storage::DirPlugin plugindata); before, "storage does not support content type"."""
    if "import" in content and kind == "dir" and rel.storage < (8, 2, 8):
        raise _bad_param("content", "storage does not support content type 'import'")


def check_upload(rel: SimRelease, content: str, filename: str) -> None:
    """PVE::API2::Storage::Status upload, before the storage's own content is looked at: the
    'import' branch exists from libpve-storage-perl 8.2.8 on (else raise_param_exc "upload content
    type 'import' not allowed"); it takes $UPLOAD_IMPORT_EXT_RE_1, qr/\\.(ova)/ until 8.3.6, where
    qcow2, raw and vmdk join it (else raise_param_exc "invalid filename or wrong extension")."""
    if content != "import":
        return
    check_content_param(rel, content)
    if rel.storage < (8, 2, 8):
        raise _bad_param("content", f"upload content type '{content}' not allowed")
    if rel.storage < (8, 3, 6) and not filename.endswith(".ova"):
        raise _bad_param("filename", "invalid filename or wrong extension")


def check_import_from(rel: SimRelease, key: str, source: str) -> None:
    """qemu-server PVE::API2::Qemu check_storage_access for ``import-from`` a PVE volume: its type
    must be 'images', or from qemu-server 8.2.7 on also 'import' (raise_param_exc otherwise)."""
    if source.partition(":")[2].startswith("import/") and rel.qemu_server < (8, 2, 7):
        raise _bad_param(key, f"{source} has wrong type 'import' - not an image")
