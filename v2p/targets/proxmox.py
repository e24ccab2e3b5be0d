"""A Proxmox VE node as the target: ``ProxmoxTarget``, every PVE API call v2p makes (through
``proxmoxer``: HTTPS with a token or a ticket, or pvesh on the node), tasks polled to their end, the
guest watched through its serial socket (on the node) or its guest agent.

Around it, one job each: ``pve_settings`` (where the node is, who v2p is there, the secret),
``pve_transport`` (forms, TLS pinning, the ticket login, uploads, pvesh), ``pve_import`` (the remote
path's disk sink: upload + ``import-from``), ``pve_node`` (the on-node disk sink: straight into the
storage), ``pve_files`` (the drivers ISO, the storage that takes ISOs, content-type hints).
PVE storages are not local ``Storage`` objects (it has no ``storage()``): ``disk_sink`` is the
only way bytes reach the node.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
from proxmoxer import ResourceException
from proxmoxer.backends.command_base import JsonSimpleSerializer
from proxmoxer.backends.https import JsonSerializer, ProxmoxHTTPApiTokenAuth, ProxmoxHttpSession
from proxmoxer.core import ProxmoxResource

from .. import credentials, pveconfig
from ..bootwatch import SETTLE, STOPPED, BootWatch, boot_devices
from ..errors import VMID_TAKEN_HINT, NoSuchVMError, TargetError, TaskStillRunning, VMIDExistsError
from ..fsutil import data_home, private_dir
from ..interrupts import check as check_interrupts
from ..options import OptionError
from ..state import Leftovers
from ..storage import Storage
from ..volumes import VolumeRef, drive_volume, import_index, parse_drive
from . import pve_files
from . import pve_privileges as privileges
from .base import (
    BOOT_FAILED,
    BootReport,
    ByteProgress,
    Capabilities,
    DiskSink,
    GuestIO,
    KeyProgress,
    Target,
    VMConfig,
)
from .pve_files import upload_name
from .pve_import import RemoteImportSink
from .pve_kinds import disk_format
from .pve_node import OnNodeSink, remove_temporaries
from .pve_releases import LIST_IMPORT, PveRelease
from .pve_settings import PveSettings, target_from_url
from .pve_tasklog import ImportProgress, TaskLog, import_follower
from .pve_transport import (
    UploadFile,
    _connection_error,
    _PveshSession,
    _TicketAuth,
    form,
)
from .serialtap import SerialTap

__all__ = ["ProxmoxTarget", "PveSettings", "RemoteImportSink", "target_from_url", "upload_name"]

QEMU_RUN_ENV = "V2P_PVE_QEMU_RUN_DIR"  # where the node's qemu-server keeps VM sockets (tests point it elsewhere)
POLL = 1.0  # seconds between looks at a booting VM (each is a QMP round trip on the node)
TASK_POLL = 0.5  # seconds between polls of a long task; short ones are polled sooner (TASK_FIRST_POLL, doubling)
TASK_FIRST_POLL = 0.05
TASK_TIMEOUT = 3600.0  # seconds a task is waited for, unless its work needs more (import_timeout)
IMPORT_FLOOR = TASK_TIMEOUT  # a disk import's wait: this, plus its size at IMPORT_RATE bytes a second
IMPORT_RATE = float(20 << 20)  # a slow storage's copy rate: 1 TiB is waited for about 16 hours


class ProxmoxTarget(Target):
    """VMs on one node of a PVE cluster."""

    kind = "proxmox"

    def efidisk(self, vmid: int, *, storage: str, secure: bool, index: int) -> str:
        """PVE allocates the variable store itself from ``STORAGE:1,...`` when the config is set."""
        return _pve_efidisk(storage, secure)

    def default_storage(self) -> str:
        return self.settings.storage

    def new_disk(self, vmid: int, config: VMConfig, *, storage: str, size: int) -> str:
        return f"{storage}:{max(1, size >> 30)}"  # PVE allocates a volume of that many GiB

    def remove_volume(self, vmid: int, volid: str) -> None:
        """A disk key deleted from a stopped VM's config became ``unusedN``: deleting that key
        destroys the volume (VM.Config.Disk, and Datastore.AllocateSpace on its storage:
        qemu-server's PVE::QemuServer::try_deallocate_drive)."""
        config = self.get_config(vmid)
        if any(drive_volume(value) == volid for key, value in config.items() if not key.startswith("unused")):
            raise TargetError(f"VM {vmid}: volume {volid} is still in use")
        unused = [key for key, value in config.items() if key.startswith("unused") and value == volid]
        if unused:
            self.set_config(vmid, {}, delete=tuple(unused))

    def check_access(self, vmid: int, create: VMConfig, update: VMConfig, *, storage: str, power: bool,
                     dance: bool = False, drivers_iso: str | None = None) -> None:
        """Every privilege this migration needs, per ACL path, checked against the caller's effective
        privileges before anything is made (``pve_privileges``)."""
        settings = self.settings
        update = dict(update)
        iso_upload = None
        if dance:  # dance.py: a temporary virtio disk, virtio-scsi, a second NIC on vmbr0, the ISO in a CD drive
            update.update({"virtio15": f"{storage}:1", "scsihw": "virtio-scsi-pci", "net1": "virtio,bridge=vmbr0"})
            if drivers_iso and VolumeRef.maybe(drivers_iso) and not drivers_iso.startswith("/"):
                update["ide3"] = pveconfig.cdrom_value(drivers_iso)
            else:
                iso_upload = self._iso_storage()
                update["ide3"] = pveconfig.cdrom_value(str(VolumeRef.iso(iso_upload, "virtio-win.iso")))
        agent = any(key == "agent" and pveconfig.agent_enabled(value) for key, value in {**create, **update}.items())
        agent_priv = None
        if power and agent:
            agent_priv = privileges.agent_privilege(self.pve_release().version)
        needs = privileges.migration_needs(
            vmid, create, update, upload_storage=None if settings.on_node else settings.import_storage,
            storage=storage, on_node=settings.on_node, power=power, agent_privilege=agent_priv,
            iso_upload=iso_upload, node=settings.node)
        who = f"{settings.user}!{settings.token_id}" if settings.token_id else (settings.user or "root@pam")
        privileges.check(self, needs, who=who)

    def drivers_iso(self, given: str | None, *, progress: ByteProgress | None = None) -> tuple[Path | None, str]:
        """A volid (``local:iso/virtio-win.iso``) must be on the node; a local file is checked here
        and uploaded (``pve_files.drivers_iso``)."""
        return pve_files.drivers_iso(self, given, progress=progress)

    def _iso_storage(self) -> str:
        return pve_files.iso_storage(self)

    def content_hint(self, storage: str, content: str, found: list[dict[str, Any]] | None = None) -> str:
        """What to do about ``storage`` lacking the ``content`` type (``pve_files.content_hint``)."""
        return pve_files.content_hint(self, storage, content, found)

    def upload(self, storage: str, content: str, path: Path, filename: str, *,
               progress: ByteProgress | None = None) -> None:
        """``path`` into ``storage``'s ``content`` (import, iso) as ``filename``, with its SHA-256, which
        PVE checks; through proxmoxer's session, the bytes sent reported to ``progress``; waits for the
        upload's task (PVE's checksum check and its copy into the storage)."""
        if self.settings.backend == "local":
            raise TargetError(f"{path}: backend=local cannot upload files (pvesh takes no file body)",
                              hint=f"put it on the node's storage and name its volume, e.g. {storage}:{content}/"
                                   f"{filename}")
        if progress is not None:  # the upload begins with a read of the whole file: its SHA-256
            progress(0, os.path.getsize(path))
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                check_interrupts()
                digest.update(chunk)
        if getattr(self, "_login", None) is not None and not self._login.ticket:
            self._login.login()
        url = f"{self.base_url}/nodes/{self.settings.node}/storage/{storage}/upload"
        try:
            with UploadFile(path, filename, progress) as body:
                # pveproxy reads an upload's form with anchored regexes in a fixed order: content, then
                # checksum-algorithm, then checksum, then the file part, which must be named "filename"
                # (pve-http-server src/PVE/APIServer/AnyEvent.pm, file_upload_multipart); another order is
                # refused before PVE's API sees the request. proxmoxer's session sends a dict's fields in
                # its order and the file (any io.IOBase value) last, streamed with requests-toolbelt.
                fields = {"content": content, "checksum-algorithm": "sha256", "checksum": digest.hexdigest(),
                          "filename": body}
                resp = self.session.request("POST", url, data=fields, timeout=max(self.settings.timeout, 600))
        except requests.RequestException as exc:
            raise _connection_error(self.base_url, exc) from None
        except OverflowError:  # proxmoxer without requests-toolbelt reads a file into memory, up to 2 GiB
            raise TargetError(f"PVE upload of {filename}: a file of this size needs the requests-toolbelt package",
                              hint="pip install requests-toolbelt (v2p depends on it)") from None
        if resp.status_code >= 400:
            try:  # PVE's API error body: {"data": null, "message": "...\n"}; pveproxy's own: the text
                detail = str(resp.json().get("message") or "").strip()
            except ValueError:
                detail = resp.text[:300].strip()
            raise TargetError(f"PVE upload of {filename} to {storage}: {resp.status_code} {detail or resp.reason}",
                              hint=self._upload_hint(storage, content, resp.status_code, detail))
        upid = resp.json().get("data")
        if isinstance(upid, str) and upid.startswith("UPID:"):
            # pve-storage API2/Storage/Status.pm upload: the task copies pveproxy's spool file into the
            # storage (or checks an ISO), so its time grows with the file's size
            self.wait_task(upid, what=f"upload {filename}", timeout=size_timeout(os.path.getsize(path)))

    def _upload_hint(self, storage: str, content: str, status: int, detail: str) -> str | None:
        if status in (401, 403):
            return f"the API token needs Datastore.AllocateTemplate on /storage/{storage}"
        if f"does not support '{content}' content" in detail or "can't upload to storage type" in detail:
            return self.content_hint(storage, content)
        if status == 400 and not detail:
            # pveproxy's own refusals (file_upload_multipart) whose message spans lines are sent as a bare
            # "400 Bad Request" (AnyEvent.pm, response); the whole message is in the node's log.
            return "pveproxy refused the upload's form; its reason is in the node's log (journalctl -u pveproxy)"
        return None

    def __init__(self, settings: PveSettings, *, state_root: Path | None = None) -> None:
        self.settings = settings
        # On the node v2p writes the storages itself (dd included); from elsewhere disks and ISOs are uploaded.
        self.capabilities = Capabilities(guest_io=True, copies_with_dd=settings.on_node, uploads=not settings.on_node,
                                         tasks=True)
        self._taps: dict[int, SerialTap] = {}
        self.base_url = f"https://{settings.host}:{settings.port}/api2/json"
        self._state_root = state_root
        self._waited: list[str] = []  # UPIDs of the tasks waited for: the state records them
        self._release: PveRelease | None = None  # GET /version's answer, asked once
        self._warnings: list[str] = []  # what the tasks that ended WARNINGS: n warned of, oldest first
        verify = credentials.verifies(fingerprint=settings.fingerprint, insecure=settings.insecure)
        self.verify = verify
        if settings.backend == "local":
            self.session = _PveshSession(timeout=max(settings.timeout, TASK_TIMEOUT))
            self.api = ProxmoxResource(base_url="", session=self.session, serializer=JsonSimpleSerializer())
            if not settings.node:
                settings.node = self._only_node()
            return
        session = self._pinned(ProxmoxHttpSession())
        session.headers["accept"] = JsonSerializer().get_accept_types()
        if settings.token_id:
            session.auth = ProxmoxHTTPApiTokenAuth(settings.user, settings.token_id, settings.secret,
                                                   verify_ssl=verify, timeout=settings.timeout, service="PVE")
        else:
            auth = _TicketAuth(self._pinned(requests.Session()), self.base_url, settings.user, settings.secret,
                               verify_ssl=verify, timeout=settings.timeout, service="PVE")
            session.auth = auth
            self._login = auth
        self.session = session
        self.api = ProxmoxResource(base_url=self.base_url, session=session, serializer=JsonSerializer())
        if not settings.node:
            settings.node = self._only_node()

    def _only_node(self) -> str:
        """The node when the settings name none: a cluster of one has no doubt about it."""
        nodes = sorted(str(entry.get("node")) for entry in self.call("GET", "nodes") or [])
        if len(nodes) != 1:
            raise OptionError(f"PVE at {self.settings.host} has the nodes {', '.join(nodes) or '(none)'}: "
                              "name the one VMs go to", hint=f"pve://{self.settings.host}/NODE, or set V2P_PVE_NODE")
        return nodes[0]

    def _pinned(self, session: Any) -> Any:
        """``session`` with the certificate pin, if one is set."""
        settings = self.settings
        return credentials.pinned(session, f"https://{settings.host}:{settings.port}/", settings.fingerprint,
                                  insecure=settings.insecure)

    def __repr__(self) -> str:
        return f"ProxmoxTarget({self.settings.host}:{self.settings.port}/{self.settings.node})"

    # -- the API -----------------------------------------------------------
    def call(self, method: str, path: str, /, **values: Any) -> Any:
        """One API call; failures become TargetError (the secret never appears in them)."""
        if getattr(self, "_login", None) is not None and not self._login.ticket:
            self._login.login()
        if self.settings.backend == "local":
            # pvesh takes a UPID's colons as they are (a slash inside a volume id stays escaped)
            path = path.replace("%3A", ":")
        resource = self.api(path.strip("/"))
        try:
            if method == "GET":
                return resource.get(**form(values))
            if method == "DELETE":
                return resource.delete(**form(values))
            return getattr(resource, method.lower())(**form(values))
        except ResourceException as exc:
            raise self._api_error(method, path, exc) from None
        except requests.RequestException as exc:
            raise _connection_error(self.base_url, exc) from None

    def pve_release(self) -> PveRelease:
        """The node's release (``GET /version``, asked once): what it can do (``pve_releases``)."""
        if self._release is None:
            self._release = PveRelease.from_answer(self.call("GET", "version"), self.settings.host)
        return self._release

    def import_content(self, storage: str) -> list[dict[str, Any]]:
        """Storage ``storage``'s ``import`` content; none on a release that has no such content type
        (it would answer the listing 400, and nothing can have been uploaded there)."""
        if not self.pve_release().has(LIST_IMPORT):
            return []
        found: list[dict[str, Any]] = self.call(
            "GET", f"nodes/{self.settings.node}/storage/{storage}/content", content="import") or []
        return found

    def _api_error(self, method: str, path: str, exc: ResourceException) -> TargetError:
        detail = str(getattr(exc, "content", "") or "")
        errors = getattr(exc, "errors", None)
        if errors:
            detail += " " + "; ".join(f"{key}: {value}" for key, value in dict(errors).items()) \
                if isinstance(errors, dict) else f" {errors}"
        status = getattr(exc, "status_code", 0)
        # pvesh's error is its stderr, lines as "<status> <reason>" then "<param>: <error>", which proxmoxer
        # keeps whole (command_base.py, CommandBaseSession.request): one line, the status said once
        detail = re.sub(rf"^{status} ", "", " ".join(detail.split()))
        hint = "the API token needs the privileges for this call (VM.Allocate, Datastore.AllocateSpace, ...)" \
            if status in (401, 403) else None
        return TargetError(f"PVE {method} {path}: {status} {detail.strip()}", hint=hint)

    def wait_task(self, upid: str, *, what: str, timeout: float = TASK_TIMEOUT,
                  on_lines: Callable[[list[str]], None] | None = None) -> None:
        """Poll a task until it stops; an exit status other than OK or ``WARNINGS: n`` is a
        TargetError with its log's tail. A task that warned succeeded (pve-common ``PVE::UPID``,
        ``status_is_error``: only OK and ``WARNINGS: n`` are not errors; ``RESTEnvironment::warn``,
        which ``log_warn`` calls in a worker, prints ``WARN: ...`` into the task log and counts it,
        and ``fork_worker`` ends such a task ``TASK WARNINGS: n``): its ``WARN:`` lines are kept
        (``task_warnings``) for the caller to show. ``on_lines``: given the log's new lines while the
        task runs, and its last ones once it stopped."""
        self._waited.append(upid)
        status = self._stopped(upid, what=what, timeout=timeout, on_lines=on_lines)
        exit_status = str(status.get("exitstatus", ""))
        if exit_status == "OK":
            return
        lines = [str(line.get("t", "")) for line in self._task_log(upid)]
        if re.fullmatch(r"WARNINGS: \d+", exit_status):
            said = [line[len("WARN:"):].strip() for line in lines if line.startswith("WARN:")]
            for text in said or [f"the task ended {exit_status} (its log shows none)"]:
                self._warnings.append(f"PVE task {what}: {text}")
            return
        tail = " | ".join(lines[-5:])
        raise TargetError(f"PVE task {what} failed: {exit_status}" + (f" ({tail})" if tail else ""),
                          hint="the node's task log has the whole story")

    def _task_log(self, upid: str) -> list[dict[str, Any]]:
        """The task's whole log (``GET .../tasks/{upid}/log``, pve-manager ``PVE::API2::Tasks``
        ``read_task_log``: 50 lines unless ``limit`` says more)."""
        path = f"nodes/{self.settings.node}/tasks/{quote(upid, safe='')}/log"
        found: list[dict[str, Any]] = self.call("GET", path, start=0, limit=5000) or []
        return found

    def _log_page(self, path: str, start: int, limit: int) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call("GET", path, start=start, limit=limit) or []
        return found

    def task_warnings(self) -> list[str]:
        return list(self._warnings)

    def settle(self, vmid: int) -> list[str]:
        """Wait for VM ``vmid``'s tasks still running on the node: PVE finishes a task (a disk import)
        whatever became of the run that started it, and the config it writes is what a rerun must
        read. How they ended is the config's to tell. Returns their UPIDs."""
        running = self.call("GET", f"nodes/{self.settings.node}/tasks", source="active", vmid=vmid) or []
        upids = [str(entry["upid"]) for entry in running if str(entry.get("upid", "")).startswith("UPID:")]
        for upid in upids:
            # Which disk it imports, and so how long it may take, no answer says: it is waited for as
            # long as its log grows (qemu-server's import logs "transferred ... (N%)" as it goes:
            # PVE::QemuServer::QemuImage convert), and given up on after TASK_TIMEOUT of silence.
            self._stopped(upid, what=f"{upid.split(':')[5]} of VM {vmid}, left running by an earlier run",
                          timeout=TASK_TIMEOUT, while_logging=True)
        return upids

    def _stopped(self, upid: str, *, what: str, timeout: float = TASK_TIMEOUT, while_logging: bool = False,
                 on_lines: Callable[[list[str]], None] | None = None) -> dict[str, Any]:
        """Poll a task until it stops; its status. ``while_logging``: ``timeout`` counts from the
        last time the task's log grew (a task of unknown size that still makes progress).
        ``on_lines``: the log's new lines at each poll (``pve_tasklog.TaskLog``), and its last ones."""
        node = self.settings.node
        deadline = time.monotonic() + timeout
        path = f"nodes/{node}/tasks/{quote(upid, safe='')}"
        pause = TASK_FIRST_POLL  # most tasks (config, start, stop) end within a fraction of a second
        logged = len(self._task_log(upid)) if while_logging else 0
        log = TaskLog(f"{path}/log")
        while True:
            check_interrupts()
            status = self.call("GET", f"{path}/status")
            if on_lines is not None:  # read after the status: a stopped task's log is then whole
                on_lines(log.read(self._log_page))
            if status.get("status") == "stopped":
                break
            if time.monotonic() > deadline and while_logging and len(self._task_log(upid)) > logged:
                logged = len(self._task_log(upid))
                deadline = time.monotonic() + timeout
            elif time.monotonic() > deadline:
                raise TaskStillRunning(f"PVE task {what} still running after {timeout:.0f} s ({upid}); it goes "
                                       "on on the node", hint="run the same command again: it waits for the "
                                       "task and resumes (its log is in the PVE web interface)")
            time.sleep(pause)
            pause = min(pause * 2, TASK_POLL)
        found: dict[str, Any] = status
        return found

    @contextlib.contextmanager
    def _call_timeout(self, seconds: float) -> Iterator[None]:
        """Calls inside may take ``seconds``: pvesh (backend=local) runs a call's task to its end
        before it returns, so its process is given the task's time (an HTTP call returns the UPID)."""
        if not isinstance(self.session, _PveshSession):
            yield
            return
        before = self.session.timeout
        self.session.timeout = max(before, seconds)
        try:
            yield
        finally:
            self.session.timeout = before

    def _task(self, result: Any, what: str, *, timeout: float = TASK_TIMEOUT,
              on_lines: Callable[[list[str]], None] | None = None) -> None:
        if isinstance(result, str) and result.startswith("UPID:"):
            self.wait_task(result, what=what, timeout=timeout, on_lines=on_lines)

    def _qemu(self, vmid: int) -> str:
        return f"nodes/{self.settings.node}/qemu/{vmid}"

    # -- layout ------------------------------------------------------------
    def describe(self) -> dict[str, str]:
        return self.settings.public()

    def state_dir(self) -> Path:
        if self._state_root is not None:
            return self._state_root
        return data_home() / "pve" / f"{self.settings.host}-{self.settings.node}"

    def staging_dir(self) -> Path:
        """Where disks are converted before their upload (ours alone)."""
        folder = self.state_dir() / "staging"
        folder.parent.mkdir(parents=True, exist_ok=True)
        return private_dir(folder)

    def device_storage(self, device: str) -> Storage:
        raise TargetError(f"--to-device {device}: a block device of the PVE node cannot be written from here",
                          hint="leave --to-device out: the disk is uploaded into a PVE storage")

    # -- what a plan is checked against --------------------------------------
    def place(self) -> str:
        return f"PVE node {self.settings.node}"

    def node(self) -> str | None:
        return self.settings.node

    def nodes(self) -> list[str]:
        return sorted(str(entry.get("node")) for entry in self.call("GET", "nodes") or [])

    def storage_contents(self) -> dict[str, frozenset[str] | None]:
        return {str(entry.get("storage")): frozenset(str(entry.get("content", "")).split(","))
                for entry in self.call("GET", f"nodes/{self.settings.node}/storage") or []}

    def bridges(self) -> frozenset[str] | None:
        return frozenset(str(entry.get("iface")) for entry in
                         self.call("GET", f"nodes/{self.settings.node}/network", type="any_bridge") or [])

    def storage_status(self, name: str) -> dict[str, Any]:
        """The node's view of storage ``name``: type, content, avail (``GET /nodes/{node}/storage``)."""
        found: list[dict[str, Any]] = self.call("GET", f"nodes/{self.settings.node}/storage") or []
        for entry in found:
            if entry.get("storage") == name:
                return entry
        raise TargetError(f"no storage called {name!r} on PVE node {self.settings.node}",
                          hint=f"known: {', '.join(str(e.get('storage')) for e in found)}; see: pvesm status")

    def disk_sink(self, vmid: int, index: int, *, fmt: str | None, storage: str, device: str | None = None,
                  force: bool = False) -> DiskSink:
        if device:
            self.device_storage(device)
        info = self.storage_status(storage)
        chosen = disk_format(storage, info, fmt, release=self.pve_release().version)
        if self.settings.on_node:
            # the storage is on this machine: no upload, no import-from
            return OnNodeSink(self, vmid, index, fmt=chosen, storage=storage, kind=str(info.get("type")))
        return RemoteImportSink(self, vmid, index, fmt=chosen, storage=storage)

    # -- VMs ---------------------------------------------------------------
    def _resources(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call("GET", "cluster/resources", type="vm") or []
        return found

    def vm_exists(self, vmid: int) -> bool:
        # Cluster-wide, containers included: they share one ID space with VMs.
        return any(int(entry.get("vmid", -1)) == vmid for entry in self._resources())

    def list_vms(self) -> list[int]:
        return sorted(int(entry["vmid"]) for entry in self._resources()
                      if entry.get("type") == "qemu" and entry.get("node") == self.settings.node)

    def next_vmid(self, above: int = 0) -> int:
        # PVE's own pick first; past ``above`` (found taken since, or held by a migration record)
        # the lowest one no guest of the cluster has.
        found = int(self.call("GET", "cluster/nextid"))
        if found > above:
            return found
        taken = {int(entry.get("vmid", -1)) for entry in self._resources()}
        return next(vmid for vmid in range(above + 1, 1_000_000_000) if vmid not in taken)

    def tasks_waited(self) -> list[str]:
        return list(self._waited)

    def _require(self, vmid: int) -> None:
        if not any(int(entry.get("vmid", -1)) == vmid and entry.get("type") == "qemu"
                   and entry.get("node") == self.settings.node for entry in self._resources()):
            raise NoSuchVMError(f"VMID {vmid} does not exist on PVE node {self.settings.node}",
                                hint="see: v2p vm list")

    def create_vm(self, vmid: int, config: VMConfig) -> None:
        taken = [entry for entry in self._resources() if int(entry.get("vmid", -1)) == vmid]
        if taken:
            what = taken[0].get("type", "guest")
            raise VMIDExistsError(f"VMID {vmid} already exists on the PVE cluster ({what} on "
                                  f"{taken[0].get('node', '?')})", hint=VMID_TAKEN_HINT)
        try:
            self._task(self.call("POST", f"nodes/{self.settings.node}/qemu", vmid=vmid, **config),
                       f"create VM {vmid}")
        except TargetError as exc:
            if re.search(rf"\b(?:VM|CT) {vmid} already exists", exc.message):  # taken since we looked
                raise VMIDExistsError(exc.message, hint=VMID_TAKEN_HINT) from None
            raise

    def get_config(self, vmid: int) -> VMConfig:
        self._require(vmid)
        found = self.call("GET", f"{self._qemu(vmid)}/config")
        return {key: str(value) for key, value in found.items() if key != "digest"}

    def set_config(self, vmid: int, updates: VMConfig, delete: tuple[str, ...] = (), *,
                   progress: KeyProgress | None = None) -> None:
        """``progress``: each disk import's progress as its task logs it (``pve_tasklog``), bytes of
        the disk's size (its ``size=``)."""
        self._require(vmid)
        values: dict[str, Any] = dict(updates)
        if delete:
            present = self.call("GET", f"{self._qemu(vmid)}/config")
            gone = [key for key in delete if key in present and key not in updates]
            if gone:  # PVE refuses to delete a key it does not have
                values["delete"] = ",".join(gone)
        if not values:
            return
        # POST runs as a task (an import-from or a new volume may take long); PUT would not wait.
        # One disk import per call: qemu-server's update_vm_api imports key by key (create_disks),
        # writes each into [pending] and applies them only at the end, so a call that stops part-way
        # (a kill, a failed second import) leaves the disks it imported in [pending], and re-sending
        # one makes the first copy unusedN (vmconfig_register_unused_drive). Alone, each import's
        # task is waited for as long as its disk's size needs; the other keys follow in one call.
        for key in [key for key, value in values.items() if "import-from=" in value]:
            value = values.pop(key)
            with self._call_timeout(import_timeout(value)):  # pvesh returns when the import has ended
                upid = self.call("POST", f"{self._qemu(vmid)}/config", **{key: value})
            follow = None
            if progress is not None:
                size = pveconfig.parse_pve_size(parse_drive(value).options.get("size", "0")) or None
                follow = import_follower(_for_key(progress, key), size)
            self._task(upid, f"import disk {key} of VM {vmid}", timeout=import_timeout(value), on_lines=follow)
        if values:
            self._task(self.call("POST", f"{self._qemu(vmid)}/config", **values), f"configure VM {vmid}")

    def delete_volume(self, volid: str) -> None:
        """Delete ``volid`` (``STORAGE:VOLNAME``) from its storage and wait for PVE's task."""
        storage = VolumeRef.parse(volid).storage
        self._task(self.call("DELETE", f"nodes/{self.settings.node}/storage/{storage}/content/"
                             f"{quote(volid, safe='')}"), f"delete {volid}")

    def discard_volume(self, volid: str, vmid: int) -> None:
        """Delete a volume v2p made for VM ``vmid`` and needs no more (an upload). If PVE refuses,
        it is recorded as left on the target, retried by every later run and ``v2p status``
        (``retry_leftovers``), and the TargetError says so."""
        try:
            self.delete_volume(volid)
        except TargetError as exc:
            Leftovers(self.state_dir()).add(volid, vmid, exc.message)
            exc.message = (f"{volid}: could not be deleted ({exc.message}); recorded, retried by the next run "
                           "and by v2p status")
            raise

    def retry_leftovers(self, *, holding: int | None = None) -> dict[str, dict[str, Any]]:
        return Leftovers(self.state_dir()).retry(self._delete_if_there, holding=holding)

    def _delete_if_there(self, volid: str) -> None:
        ref = VolumeRef.parse(volid)
        listed = self.import_content(ref.storage) if ref.content == "import" else \
            self.call("GET", f"nodes/{self.settings.node}/storage/{ref.storage}/content",
                      **({"content": "iso"} if ref.content == "iso" else {})) or []
        if any(entry.get("volid") == volid for entry in listed):
            self.delete_volume(volid)

    def destroy_vm(self, vmid: int) -> None:
        self._require(vmid)
        if self.status(vmid) == "running":
            self._task(self.call("POST", f"{self._qemu(vmid)}/status/stop"), f"stop VM {vmid}")
        self._task(self.call("DELETE", self._qemu(vmid), purge=True, **{"destroy-unreferenced-disks": True}),
                   f"destroy VM {vmid}")
        # Its disks' uploads and staging files are v2p's own copies of this VM's disks.
        where = self.settings.import_storage
        for entry in self.import_content(where):
            ref = VolumeRef.maybe(str(entry.get("volid", "")))
            if ref and ref.storage == where and ref.content == "import" \
                    and import_index(ref.filename, vmid) is not None:
                self.discard_volume(str(entry["volid"]), vmid)
        for path in self.staging_dir().glob(f"v2p-{vmid}-disk-*.qcow2"):
            path.unlink(missing_ok=True)
        if self.settings.on_node:
            remove_temporaries(self, vmid)  # PVE's listing, so its destroy, never sees them

    # -- running -------------------------------------------------------------
    def status(self, vmid: int) -> str:
        self._require(vmid)
        current = self.call("GET", f"{self._qemu(vmid)}/status/current")
        return "running" if current.get("status") == "running" else "stopped"

    def _serial_socket(self, vmid: int) -> Path:
        return Path(os.environ.get(QEMU_RUN_ENV) or "/var/run/qemu-server") / f"{vmid}.serial0"

    def start(self, vmid: int, *, hold: bool = False) -> None:
        # A PVE VM never dies with this process: ``hold`` cannot be honoured, and ``held`` says so.
        if self.status(vmid) == "running":
            raise TargetError(f"VM {vmid} is already running")
        if self.settings.on_node:
            # On the node the guest's serial port is read from its socket (what `qm terminal` uses);
            # the port stays in the config: a COM port is harmless and Windows' EMS talks there.
            if self.get_config(vmid).get("serial0") != "socket":
                self.set_config(vmid, {"serial0": "socket"})
            self._close_tap(vmid)
            self._taps[vmid] = SerialTap(self._serial_socket(vmid))  # connects as soon as QEMU listens
        try:
            self._task(self.call("POST", f"{self._qemu(vmid)}/status/start"), f"start VM {vmid}")
        except BaseException:
            self._close_tap(vmid)
            raise

    def _close_tap(self, vmid: int) -> None:
        tap = self._taps.pop(vmid, None)
        if tap is not None:
            tap.close()

    def stop(self, vmid: int, *, timeout: float = 60.0) -> bool:
        if self.status(vmid) != "running":
            self._close_tap(vmid)
            return True
        try:
            self._task(self.call("POST", f"{self._qemu(vmid)}/status/shutdown", timeout=int(max(timeout, 1)),
                                 forceStop=False), f"shut down VM {vmid}")
        except TargetError:
            pass  # the guest ignored the power button: stopped hard below
        clean = self.status(vmid) != "running"
        if not clean:
            self._task(self.call("POST", f"{self._qemu(vmid)}/status/stop"), f"stop VM {vmid}")
        self._close_tap(vmid)
        return clean

    def guest_output(self, vmid: int) -> str:
        """The serial port since the VM was started, on the node (read from its socket); elsewhere ''
        (PVE offers a remote serial console only over a websocket, which v2p does not read)."""
        tap = self._taps.get(vmid)
        return tap.text() if tap is not None else ""

    def _agent(self, vmid: int) -> str | None:
        """The guest's OS as its QEMU guest agent names it, once the agent answers; else None."""
        try:
            self.call("POST", f"{self._qemu(vmid)}/agent/ping")
        except TargetError:
            return None
        try:
            info = self.call("GET", f"{self._qemu(vmid)}/agent/get-osinfo") or {}
        except TargetError:
            return "the guest"
        found = info.get("result", info) if isinstance(info, dict) else {}
        return str(found.get("pretty-name") or found.get("name") or "the guest")

    def guest_io(self, vmid: int) -> GuestIO | None:
        """The running VM's counters from ``GET .../status/current`` (``status_io``); None if it
        does not run."""
        return status_io(vmid, self._current(vmid))

    def _current(self, vmid: int) -> dict[str, Any]:
        found: dict[str, Any] = self.call("GET", f"{self._qemu(vmid)}/status/current") or {}
        return found

    def boot_check(self, vmid: int, *, timeout: float, settle: float = SETTLE) -> BootReport:
        """Start the VM and watch it (``bootwatch``) through what PVE tells from anywhere: its
        status, each drive's reads and each NIC's bytes sent (``status/current``); the guest
        agent, where the config has one; on the node also its serial port, read as the local
        target reads it (login prompt, systemd target, Windows SAC, a STOP code...). PVE keeps no
        firmware log: reads count from the start. A VM that stops on its own is up only if a sign
        of an OS came first. A failed boot is stopped; any other is left running."""
        if self.status(vmid) == "running":
            self.stop(vmid, timeout=10)
        config = self.get_config(vmid)
        agent = pveconfig.agent_enabled(config.get("agent", "0"))
        boot_disk, boot_nics = boot_devices(config)
        started = time.monotonic()
        self.start(vmid)
        notes = []
        if not self.settings.on_node:
            notes.append("no serial console (v2p is not on the node): watched through PVE's status "
                         "(boot disk reads, NIC bytes sent)" + (" and the guest agent" if agent else ""))
        # PVE's API shows no guest resets (vmstatus has no such counter; QEMU's RESET events go to
        # qmeventd only for a shutdown): a boot loop must show in the reads levelling off or not.
        watch = BootWatch(vmid, timeout=timeout, settle=settle, started=started,
                          boot_disk=boot_disk, boot_nics=boot_nics, resets_seen=False,
                          serial_log=f"{self._serial_socket(vmid)} on node {self.settings.node}")
        try:
            while True:
                check_interrupts()
                now = time.monotonic()
                io = status_io(vmid, self._current(vmid))
                if io is None:
                    watch.event(now, STOPPED)
                elif io.reads or io.sent or io.panicked:  # none: qemu-server's QMP queries failed this time
                    watch.observe_io(now, io)
                if io is not None and agent:
                    name = self._agent(vmid)
                    if name:
                        watch.ready(now, "the guest agent answered", name)
                verdict = watch.look(self.guest_output(vmid), "", now)
                if verdict is not None:
                    if verdict.outcome == BOOT_FAILED:
                        self.stop(vmid, timeout=5)
                    return watch.report(time.monotonic(), serial=self.guest_output(vmid), notes=notes)
                # status/current is a QMP round trip on the node (vmstatus with $full): once a second
                time.sleep(max(0.0, now + POLL - time.monotonic()))
        except BaseException:
            self.stop(vmid, timeout=5)
            raise


def status_io(vmid: int, current: dict[str, Any]) -> GuestIO | None:
    """``GuestIO`` from VM ``vmid``'s ``GET /nodes/{node}/qemu/{vmid}/status/current``; None unless
    it runs. qemu-server's ``vmstatus($vmid, 1)`` (PVE/QemuServer.pm; API2/Qemu.pm ``vm_status``
    passes ``$full`` = 1) gives ``blockstat``: QMP query-blockstats' ``stats`` per drive, keyed by
    the config key (the backend's name with ``drive-`` stripped; since qemu-server 9.0.7, with
    -blockdev, the qdev id through ``qdev_id_to_drive_id``: commit bcaf38e5, "fix #6556", before
    PVE 9.0's release), and ``nics``: per tap device ``tap<vmid>i<n>`` (net<n>, print_netdev_full)
    ``netout``, the tap's receive counter in /proc/net/dev, so the bytes the guest sent (both there
    since qemu-server 4.0, commit 604ea644, 2015). ``qmpstatus`` is QMP query-status' ``status``
    (``guest-panicked``: a pvpanic device with QEMU's default panic action)."""
    if current.get("status") != "running":
        return None
    reads = {str(key): int(stats.get("rd_bytes") or 0) for key, stats in (current.get("blockstat") or {}).items()
             if key and isinstance(stats, dict)}
    sent = {}
    for device, counters in (current.get("nics") or {}).items():
        match = re.fullmatch(rf"tap{vmid}i(\d+)", str(device))
        if match and isinstance(counters, dict):
            sent[f"net{match.group(1)}"] = int(counters.get("netout") or 0)
    return GuestIO(reads=reads, sent=sent, panicked=current.get("qmpstatus") == "guest-panicked")


def _for_key(progress: KeyProgress, key: str) -> ImportProgress:
    """``progress`` of the disk key ``key``, as an import's log follower reports it."""
    def report(done: int, total: int, _percent: float) -> None:
        progress(key, done, total)
    return report


def import_timeout(value: str) -> float:
    """How long to wait for the import of the disk key ``value`` (``STORAGE:0,import-from=...,size=32G``):
    IMPORT_FLOOR, plus its size (``size=``, the disk's capacity) at IMPORT_RATE bytes a second
    (qemu-server's import reads the whole source and writes the whole volume: ``qemu-img convert``
    through ``clone_disk``, from ``create_disks``' ``$import_from_volid``)."""
    return size_timeout(pveconfig.parse_pve_size(parse_drive(value).options.get("size", "0")) or 0)


def size_timeout(size: int) -> float:
    """How long a task that reads or writes ``size`` bytes once (an import, an upload's copy out of
    pveproxy's spool) is waited for: IMPORT_FLOOR plus ``size`` at IMPORT_RATE bytes a second."""
    return IMPORT_FLOOR + size / IMPORT_RATE


def _pve_efidisk(storage: str, secure: bool) -> str:
    return pveconfig.efidisk(storage, secure_boot=secure)
