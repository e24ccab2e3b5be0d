"""What each Proxmox VE release can do for v2p: the one table of version thresholds, and the
``PveRelease`` read from ``GET /version`` that preflight checks a migration's path against.

``GET /version`` answers pve-manager's own version (pve-manager ``PVE/pvecfg.pm.in``
``version_info``: ``version`` is the package's upstream version, ``release`` its first two
numbers, set in its ``Makefile`` as ``PVERELEASE``). What v2p depends on lives in other
packages (libpve-storage-perl, qemu-server), which the node does not report through the API.
So each threshold is kept as the package version that brought the behaviour (from that
package's ``debian/changelog`` and code) and as the first pve-manager version whose
``debian/control`` ``Depends:`` requires at least that package version: a node reporting that
pve-manager version (or later) is sure to have the behaviour. A node whose other packages were
upgraded without pve-manager may do more than this table says; never less.

Not here: making the calls (``proxmox``), the paths themselves (``pve_import``, ``pve_node``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import TargetError

Version = tuple[int, ...]


@dataclass(frozen=True)
class Capability:
    """One behaviour of PVE that v2p relies on, and the releases that have it."""

    what: str  # what the node must be able to do, in a sentence's middle ("upload ... into ...")
    release: str  # the first PVE release whose .0 has it (its ISO's pve-manager is past ``manager``)
    manager: Version  # the first pve-manager version sure to have it (its Depends:)
    package: str  # the package whose code decides it
    package_version: Version  # the first version of that package with it (its debian/changelog)
    source: str  # where in that package's source the decision is made


def _text(version: Version) -> str:
    return ".".join(str(part) for part in version)


# libpve-storage-perl 8.1.1 (changelog: "storage plugins: add 'import' content type"): before it
# PVE::Storage::Plugin::verify_content (format 'pve-storage-content' of the `content` parameter of
# GET /nodes/{node}/storage/{storage}/content, PVE::API2::Storage::Content index) dies
# "invalid content type 'import'", a 400. pve-manager 8.1.8 first Depends: libpve-storage-perl (>= 8.1.3).
LIST_IMPORT = Capability(
    "list a storage's 'import' content (GET .../content?content=import)", "8.2", (8, 1, 8),
    "libpve-storage-perl", (8, 1, 1), "PVE/Storage/Plugin.pm verify_content")

# libpve-storage-perl 8.2.8 (changelog: "directory backed storage: implement import content type to
# support uploading and importing OVA images"): PVE::Storage::DirPlugin::plugindata gains
# `import` among its content types, and PVE::API2::Storage::Status upload gains the `import`
# branch (before it: raise_param_exc "upload content type 'import' not allowed", a 400).
# pve-manager 8.2.9 first Depends: libpve-storage-perl (>= 8.2.8).
IMPORT_CONTENT = Capability(
    "keep and upload files in a directory storage's 'import' content", "8.3", (8, 2, 9),
    "libpve-storage-perl", (8, 2, 8), "PVE/Storage/DirPlugin.pm plugindata, PVE/API2/Storage/Status.pm upload")

# libpve-storage-perl 8.3.6 (changelog: "import: allow upload of guest images files into import
# storage"): PVE::Storage's $UPLOAD_IMPORT_EXT_RE_1 grows from qr/\.(ova)/ to
# qr/\.(ova|qcow2|raw|vmdk)/; before it the upload of a .qcow2 is raise_param_exc "invalid filename
# or wrong extension", a 400. pve-manager 8.3.6 first Depends: libpve-storage-perl (>= 8.3.6);
# PVE 8.4.0 is the first release with it.
UPLOAD_IMAGES = Capability(
    "upload a .qcow2/.raw/.vmdk disk image into 'import' content", "8.4", (8, 3, 6),
    "libpve-storage-perl", (8, 3, 6), "PVE/Storage.pm UPLOAD_IMPORT_EXT_RE_1, PVE/API2/Storage/Status.pm upload")

# qemu-server 8.2.7 (changelog: "api: check untrusted image files for the new import content
# type"): PVE::API2::Qemu check_storage_access accepts an `import-from` volume of type 'import'
# (before: raise_param_exc "... has wrong type 'import' - not an image", a 400).
# pve-manager 8.2.9 first Depends: qemu-server (>= 8.2.7).
IMPORT_FROM_IMPORT = Capability(
    "attach a disk with import-from=<an 'import' volume>", "8.3", (8, 2, 9),
    "qemu-server", (8, 2, 7), "PVE/API2/Qemu.pm check_storage_access")

CAPABILITIES = (LIST_IMPORT, IMPORT_CONTENT, UPLOAD_IMAGES, IMPORT_FROM_IMPORT)

# The remote path (pve_import.RemoteImportSink): a qcow2 uploaded into 'import' content, listed
# there, attached with import-from.
REMOTE_PATH = (LIST_IMPORT, IMPORT_CONTENT, UPLOAD_IMAGES, IMPORT_FROM_IMPORT)
REMOTE_INSTEAD = ("run v2p on the node with on-node=1 in the target URL (it writes disks straight into the "
                  "storage, on every PVE 8 and 9), or upgrade the node to PVE 8.4 or later")


@dataclass(frozen=True)
class PveRelease:
    """A node's release as ``GET /version`` tells it."""

    version: Version  # pve-manager's version, e.g. (8, 3, 0)
    text: str  # as the node said it, e.g. "8.3.0"

    @classmethod
    def from_answer(cls, answer: Any, where: str) -> PveRelease:
        """The release in ``GET /version``'s data (``{"version": "8.3.0", "release": "8.3", ...}``)."""
        given = str(answer.get("version", "")) if isinstance(answer, dict) else ""
        match = re.match(r"(\d+)\.(\d+)(?:[.-](\d+))?", given)
        if match is None:
            raise TargetError(f"PVE at {where}: GET /version answered no version v2p can read ({given[:40]!r})",
                              hint="v2p supports Proxmox VE 8.0 to 9.x")
        return cls(tuple(int(part or 0) for part in match.groups()), given)

    def has(self, capability: Capability) -> bool:
        return self.version >= capability.manager

    def lacks(self, needed: tuple[Capability, ...]) -> list[Capability]:
        return [capability for capability in needed if not self.has(capability)]

    def require(self, needed: tuple[Capability, ...], *, path: str, instead: str) -> None:
        """Raise one TargetError naming this release, the first thing it cannot do for ``path`` and
        what works instead, if it lacks any of ``needed``."""
        missing = self.lacks(needed)
        if missing:
            first = missing[0]
            raise TargetError(
                f"PVE {self.text} cannot take {path}: it cannot {first.what} (PVE {first.release} and later can: "
                f"pve-manager {_text(first.manager)}, {first.package} {_text(first.package_version)})", hint=instead)
