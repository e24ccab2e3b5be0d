"""What the PVE target's helper modules may ask of the target: its settings, its API, its storages.

``pve_import``, ``pve_node``, ``pve_privileges`` and ``pve_space`` are handed the
``ProxmoxTarget`` but know it only through this protocol, so none of them imports
``proxmox.py`` (which imports them): the dependency goes one way.
Not for: anything a stage needs (that is ``base.Target``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from .base import ByteProgress, VMConfig
from .pve_releases import PveRelease
from .pve_settings import PveSettings


class PveHost(Protocol):
    """One PVE node as ``ProxmoxTarget`` reaches it (see its methods for what each call does)."""

    settings: PveSettings

    def call(self, method: str, path: str, /, **values: Any) -> Any: ...

    def pve_release(self) -> PveRelease: ...

    def storage_status(self, name: str) -> dict[str, Any]: ...

    def content_hint(self, storage: str, content: str, found: list[dict[str, Any]] | None = None) -> str: ...

    def import_content(self, storage: str) -> list[dict[str, Any]]: ...

    def state_dir(self) -> Path: ...

    def staging_dir(self) -> Path: ...

    def upload(self, storage: str, content: str, path: Path, filename: str, *,
               progress: ByteProgress | None = None) -> None: ...

    def get_config(self, vmid: int) -> VMConfig: ...

    def delete_volume(self, volid: str) -> None: ...

    def discard_volume(self, volid: str, vmid: int) -> None: ...
