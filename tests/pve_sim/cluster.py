"""What the simulated PVE node holds and does: VM configs, storages, volumes.

Each API endpoint the simulator serves is one method here, called with
parameters already checked against the schema (``server.py`` does HTTP, auth
and that check). Disks are real files made with real ``qemu-img``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import releases
from .schema import parse_property_string
from .tasks import Task, Tasks, render_bytes

DISK_KEY = re.compile(r"^(ide|sata|scsi|virtio)\d+$|^(efidisk|tpmstate)0$")
NEW_VOLUME = re.compile(r"^([a-z][a-z0-9\-_.]*[a-z0-9]):(\d+(\.\d+)?)$", re.I)
IMAGE_NAME = re.compile(r"[^/]+\.(raw|qcow2|vmdk|subvol)")
# pve-storage Storage.pm: $SAFE_CHAR_CLASS_RE+ then $UPLOAD_IMPORT_EXT_RE_1, not anchored at the start
UPLOAD_IMPORT_NAME = re.compile(r"[a-zA-Z0-9\-.+=_]+\.(ova|qcow2|raw|vmdk)$")
# Storage types whose plugin has a path (Status.pm, upload: "can't upload to storage type ...")
_PATH_STORAGES = {"dir", "nfs", "cifs", "cephfs", "btrfs", "glusterfs"}


class PVEError(Exception):
    """An API answer other than 200: HTTP ``status`` with PVE's message and per-parameter errors."""

    def __init__(self, status: int, message: str, errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors


def fail(message: str) -> PVEError:
    """A handler's `die`: PVE answers 500 with the message."""
    return PVEError(500, message)


@dataclass
class Storage:
    name: str
    type: str  # "dir" keeps <path>/images/<vmid>/...; "lvmthin" keeps raw files named like LVs
    path: Path
    content: set[str]
    active: bool = True  # False: PVE could not activate it (an NFS export it cannot mount)
    on_rootfs: bool = False  # a folder on the node's root file system (a fresh install's local, /var/lib/vz)
    size: int | None = None  # its file system's size in bytes (Cluster.set_free); None: the real one's

    def volume_path(self, volname: str) -> Path:
        if self.type == "dir":
            if volname.startswith("import/") or volname.startswith("iso/"):
                return self.path / volname
            return self.path / "images" / volname
        return self.path / volname


@dataclass
class VM:
    vmid: int
    config: dict[str, str]
    pending: dict[str, str] = field(default_factory=dict)
    pending_delete: set[str] = field(default_factory=set)
    status: str = "stopped"
    lock: str | None = None
    started: float = 0.0  # time.monotonic() of the last start
    config_lock: threading.Lock = field(default_factory=threading.Lock)  # /var/lock/qemu-server/lock-N.conf


def _ova_member(path: Path) -> tuple[Path, str] | None:
    """``<storage>/import/x.ova/disk1.vmdk`` (PVE's volume of a disk inside an uploaded OVA):
    the OVA and the member's name, if the OVA holds it."""
    ova = path.parent
    if ova.suffix != ".ova" or not ova.is_file():
        return None
    with tarfile.open(ova) as tar:
        return (ova, path.name) if path.name in tar.getnames() else None


@contextlib.contextmanager
def _readable(src: Path) -> Iterator[Path]:
    """A file qemu-img can read for ``src``: itself, or an OVA member extracted beside the OVA
    for the time of the import (as PVE extracts into its import working storage)."""
    member = _ova_member(src) if not src.exists() else None
    if member is None:
        yield src
        return
    ova, name = member
    # Outside import/, so a content listing during the import does not show it.
    work = ova.parent.parent / ".import-work"
    work.mkdir(exist_ok=True)
    extracted = work / f"{ova.name}.{name}"
    with tarfile.open(ova) as tar:
        handle = tar.extractfile(name)
        if handle is None:
            raise fail(f"'{name}' in '{ova.name}' is not a file")
        with handle, extracted.open("wb") as out:
            shutil.copyfileobj(handle, out)
    try:
        yield extracted
    finally:
        extracted.unlink(missing_ok=True)


def _du(path: Path) -> int:
    """The bytes the files under ``path`` take on disk (``du``)."""
    if not path.exists():
        return 0
    return sum(f.lstat().st_blocks * 512 for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def normalize_content_filename(filename: str) -> str:
    """PVE::Storage::normalize_content_filename: chomp, the last path component, unsafe characters to ``_``."""
    filename = filename[:-1] if filename.endswith("\n") else filename
    filename = re.sub(r"^.*[/\\]", "", filename, flags=re.S)
    return re.sub(r"[^a-zA-Z0-9_.-]", "_", filename)


def _untrusted_image_info(path: Path, fmt: str | None) -> None:
    """PVE::Storage::Plugin::file_size_info with ``$untrusted``: qemu-img must read it (as ``fmt``, or
    its own guess for an ISO), and it may have no backing file."""
    args = ["info", "--output=json", *(["-f", fmt] if fmt else []), str(path)]
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise fail("failed to query file information with qemu-img")
    if json.loads(done.stdout).get("backing-filename"):
        raise fail(f"backing file not allowed for untrusted image '{path}'!")


def qemu_img(*args: str) -> str:
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise fail(f"qemu-img {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


QEMU_IMG_PERCENT = re.compile(r"\((\S+)/100%\)")


def convert_logged(task: Task, src: Path, dst: Path, fmt: str) -> None:
    """qemu-server PVE::QemuServer::QemuImage::convert: ``qemu-img convert -p`` run through
    PVE::Tools::run_command, whose outfunc gets qemu-img's output line by line (PVE::Cmd splits it at
    ``\n``, ``\r`` and backspaces) and, for each "(N/100%)", prints into the task log
    "transferred <render_bytes(int(size * N / 100), 1)> of <render_bytes(size, 1)> (N%)", ``size``
    the source's virtual size (clone_disk's volume_size_info; ImportDisk's file_size_info)."""
    size = int(json.loads(qemu_img("info", "--output=json", str(src)))["virtual-size"])
    proc = subprocess.Popen(["qemu-img", "convert", "-p", "-O", fmt, str(src), str(dst)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    buffer = b""
    while chunk := proc.stdout.read1(4096):
        buffer += chunk
        *lines, buffer = re.split(rb"\n|\x08+|\r\n?", buffer)
        for line in lines:
            match = QEMU_IMG_PERCENT.search(line.decode(errors="replace"))
            if match:
                percent = match.group(1)
                transferred = int(size * float(percent) / 100)
                task.log(f"transferred {render_bytes(transferred, 1)} of {render_bytes(size, 1)} ({percent}%)")
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.wait(timeout=600) != 0:
        raise fail(f"copy failed: command '/usr/bin/qemu-img convert -p' failed: {stderr.strip()}")


def format_size(size: int) -> str:
    """PVE::JSONSchema::format_size: the largest unit that divides the size."""
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size % factor == 0 and size >= factor:
            return f"{size // factor}{unit}"
    return str(size)


def parse_kib_size(value: str) -> int:
    """``pvesm alloc`` sizes: KiB unless suffixed M or G; bytes out."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", value)
    if not match:
        raise PVEError(400, "Parameter verification failed.", {"size": f"unable to parse size '{value}'"})
    factor = {"": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2)]
    return int(float(match.group(1)) * factor)


class Cluster:
    """One node (``node``) with its storages under ``root``."""

    def __init__(self, root: Path, node: str = "pve1", release: str | None = None) -> None:
        self.node = node
        self.release = releases.release(release)
        self.root = root
        self.lock = threading.RLock()
        self.vms: dict[int, VM] = {}
        self.containers: set[int] = set()
        self.tasks = Tasks(node)
        self.storages: dict[str, Storage] = {}
        # The node's root file system: /var/tmp, where pveproxy spools uploads (PVESim.var_tmp), and the
        # storages on it. rootfs_size None: the real file system's room, as df reports it.
        self.var_tmp = root.parent / "var-tmp"
        self.rootfs_size: int | None = None
        # A named release: a fresh LVM-thin install's storages (releases.SimRelease.local_content).
        self.add_storage("local", "dir", set(self.release.local_content) if release else
                         {"iso", "vztmpl", "backup", "import", "images"}).on_rootfs = True
        self.add_storage("local-lvm", "lvmthin", {"images", "rootdir"})
        self.bridges = ["vmbr0"]  # the node's Linux bridges (GET /nodes/{node}/network)
        self.guest_shuts_down = True
        # A guest agent answering after this many seconds of a VM's run (the sample guests carry none:
        # None means no agent ever answers); what get-osinfo says then.
        self.agent_after: float | None = None
        self.agent_os = {"id": "mswindows", "name": "Microsoft Windows", "pretty-name": "Windows 10 Pro",
                         "version": "Microsoft Windows 10", "kernel-release": "19045", "machine": "x86_64"}
        # Hooks that run VMs for real (``realvm.QemuRunner``); without them a VM is only a state.
        self.on_start: Callable[[VM], None] | None = None
        self.on_stop: Callable[[VM], None] | None = None
        self.on_powerdown: Callable[[VM, float], bool] | None = None
        self.is_running: Callable[[VM], bool] | None = None
        # A running VM's QEMU asked over QMP (the command's ``return``), and its NICs' byte counters
        # ((sent by the guest, sent to it) per config key): what a node's qemu-server reads.
        self.qmp: Callable[[VM, str], Any] | None = None
        self.nic_bytes: Callable[[VM, str], tuple[int, int]] | None = None
        # Where the node's files appear to be in API answers (storage and volume paths): None is
        # here, as when v2p runs on the node; another root plays a node that is another machine.
        self.reported_root: Path | None = None

    def node_path(self, path: Path) -> str:
        """``path`` (under ``root``) as the node reports it."""
        if self.reported_root is None:
            return str(path)
        return str(self.reported_root / path.relative_to(self.root))

    def add_storage(self, name: str, kind: str, content: set[str]) -> Storage:
        path = self.root / name
        (path / "images").mkdir(parents=True, exist_ok=True)
        (path / "import").mkdir(exist_ok=True)
        storage = Storage(name, kind, path, content)
        self.storages[name] = storage
        return storage

    # -- room ----------------------------------------------------------------
    # PVE reports a storage's room from its file system (Plugin.pm status: df of the path; LVM-thin its pool)
    # and the root file system's from df('/') (pve-manager PVE/API2/Nodes.pm, status: rootfs). A write past
    # the room fails as the kernel fails it: ENOSPC.

    def set_free(self, place: str, free: int) -> None:
        """Make ``place`` (a storage's name, or "/" for the root file system) have ``free`` bytes free now."""
        if place == "/":
            self.rootfs_size = self._rootfs_used() + free
        else:
            storage = self.storage(place)
            if storage.on_rootfs:
                raise ValueError(f"storage {place} is on the root file system: set the room of '/'")
            storage.size = _du(storage.path) + free

    def _rootfs_used(self) -> int:
        return _du(self.var_tmp) + sum(_du(s.path) for s in self.storages.values() if s.on_rootfs)

    def room(self, place: str) -> tuple[int, int, int]:
        """``place``'s (total, used, avail) in bytes."""
        storage = None if place == "/" else self.storage(place)
        if storage is None or storage.on_rootfs:
            if self.rootfs_size is None:
                usage = shutil.disk_usage(self.var_tmp if self.var_tmp.exists() else self.root)
                return usage.total, usage.used, usage.free
            used = self._rootfs_used()
            return self.rootfs_size, used, max(0, self.rootfs_size - used)
        if storage.size is None:
            usage = shutil.disk_usage(storage.path)
            return usage.total, usage.used, usage.free
        used = _du(storage.path)
        return storage.size, used, max(0, storage.size - used)

    def spool_room(self) -> int | None:
        """The bytes pveproxy can spool into /var/tmp now (None: as many as the real disk takes)."""
        return None if self.rootfs_size is None else self.room("/")[2]

    def node_status(self, p: dict[str, str], user: str) -> Any:
        """pve-manager ``PVE/API2/Nodes.pm``, ``status`` (the parts v2p reads): rootfs is ``df('/')``."""
        total, used, avail = self.room("/")
        return {"rootfs": {"total": total, "used": used, "free": total - used, "avail": avail},
                "pveversion": f"pve-manager/{releases.version_info(self.release)['version']}",
                "cpu": 0.01, "memory": {"total": 8 << 30, "used": 1 << 30, "free": 7 << 30}}

    # -- volumes -------------------------------------------------------------

    def storage(self, name: str) -> Storage:
        if name not in self.storages:
            raise fail(f"storage '{name}' does not exist")
        return self.storages[name]

    def volume_path(self, volid: str) -> Path:
        """The file behind ``volid`` (what `pvesm path` prints)."""
        name, _, volname = volid.partition(":")
        return self.storage(name).volume_path(volname)

    def _existing_volume(self, volid: str) -> Path:
        path = self.volume_path(volid)
        if path.exists() or _ova_member(path) is not None:
            return path
        raise fail(f"volume '{volid}' does not exist")

    def _next_disk_name(self, storage: Storage, vmid: int, fmt: str) -> str:
        """pve-storage Plugin.pm find_free_diskname -> get_next_vm_diskname: the lowest n no listed
        volume of the VM uses. A dir storage adds the format suffix (add_fmt_suffix=1) and matches
        it in $get_vm_disk_number's regex, so the numbers are counted *per extension*: with
        ``vm-N-disk-0.raw`` there, a qcow2 disk is ``vm-N-disk-0.qcow2``. Block storages match
        any ``(vm|base)-N-disk-(\\d+)``."""
        suffix = rf".{re.escape(fmt)}" if storage.type == "dir" else ""  # ".$fmt" unescaped, as there
        pattern = re.compile(rf"(vm|base)-{vmid}-disk-(\d+){suffix}")
        folder = storage.path / "images" / str(vmid) if storage.type == "dir" else storage.path
        names = [path.name for path in folder.iterdir()] if folder.is_dir() else []
        taken = {int(match.group(2)) for name in names if (match := pattern.search(name))}
        for n in range(1024):  # $MAX_VOLUMES_PER_GUEST
            if n not in taken:
                base = f"vm-{vmid}-disk-{n}"
                return f"{vmid}/{base}.{fmt}" if storage.type == "dir" else base
        raise fail(f"unable to allocate an image name for VM {vmid} in storage '{storage.name}'")

    def _create_file(self, storage: Storage, volname: str, fmt: str, size: int) -> str:
        path = storage.volume_path(volname)
        path.parent.mkdir(parents=True, exist_ok=True)
        qemu_img("create", "-f", fmt, str(path), str(size))
        return f"{storage.name}:{volname}"

    def volume_info(self, volid: str) -> dict[str, Any]:
        info = json.loads(qemu_img("info", "--output=json", str(self._existing_volume(volid))))
        return {"format": info["format"], "size": info["virtual-size"]}

    # -- endpoints: cluster and node ---------------------------------------------

    def version(self, p: dict[str, str], user: str) -> Any:
        return releases.version_info(self.release)

    def set_content(self, name: str, content: set[str]) -> None:
        """``pvesm set NAME --content ...`` (as an admin sets up an import storage)."""
        storage = self.storage(name)
        releases.check_storage_content(self.release, storage.type, content)
        storage.content = set(content)

    def nodes(self, p: dict[str, str], user: str) -> Any:
        return [{"node": self.node, "status": "online", "type": "node", "id": f"node/{self.node}",
                 "maxcpu": 2, "maxmem": 8 << 30, "ssl_fingerprint": ""}]

    def _taken(self, vmid: int) -> bool:
        return vmid in self.vms or vmid in self.containers

    def nextid(self, p: dict[str, str], user: str) -> Any:
        with self.lock:
            if "vmid" in p:
                if self._taken(int(p["vmid"])):
                    raise PVEError(400, "Parameter verification failed.",
                                   {"vmid": f"VM {p['vmid']} already exists"})
                return p["vmid"]
            return str(next(v for v in range(100, 1_000_000_000) if not self._taken(v)))

    def resources(self, p: dict[str, str], user: str) -> Any:
        with self.lock:
            vms = [{"id": f"qemu/{vm.vmid}", "type": "qemu", "vmid": vm.vmid, "node": self.node,
                    "name": vm.config.get("name", f"VM {vm.vmid}"), "status": vm.status}
                   for vm in self.vms.values()]
            cts = [{"id": f"lxc/{ct}", "type": "lxc", "vmid": ct, "node": self.node, "status": "stopped"}
                   for ct in self.containers]
        found = vms + cts
        if p.get("type") in ("node", "storage", "sdn", "pool"):
            return []
        return found

    def task_status(self, p: dict[str, str], user: str) -> Any:
        task = self.tasks.by_upid.get(p["upid"])
        if task is None:
            raise fail(f"no such task '{p['upid']}'")
        return task.status_data()

    def task_list(self, p: dict[str, str], user: str) -> Any:
        """The node's tasks (``source=active``: those running; ``vmid``: of that guest), newest first."""
        source = p.get("source", "archive")
        found = [task for task in self.tasks.by_upid.values()
                 if (source == "all" or (task.status == "running") == (source == "active"))
                 and ("vmid" not in p or task.id == p["vmid"])]
        found.sort(key=lambda task: task.starttime, reverse=True)
        start, limit = int(p.get("start", "0")), int(p.get("limit", "50"))
        # A finished task's status is its exit status; a running one has none yet.
        return [{key: value for key, value in task.status_data().items() if key not in ("exitstatus", "status")}
                | ({"status": task.exitstatus} if task.exitstatus is not None else {})
                for task in found][start:start + limit]

    def task_log(self, p: dict[str, str], user: str) -> Any:
        task = self.tasks.by_upid.get(p["upid"])
        if task is None:
            raise fail(f"no such task '{p['upid']}'")
        start, limit = int(p.get("start", "0")), int(p.get("limit", "50"))
        return [{"n": n + 1, "t": line} for n, line in enumerate(task.lines)][start:start + limit]

    # -- endpoints: storage ---------------------------------------------------------

    def storage_list(self, p: dict[str, str], user: str) -> Any:
        releases.check_content_param(self.release, p.get("content"))
        found = []
        for s in self.storages.values():
            if "content" in p and p["content"] not in s.content:
                continue
            total, used, avail = self.room(s.name)
            found.append({"storage": s.name, "type": s.type, "content": ",".join(sorted(s.content)),
                          "active": int(s.active), "enabled": 1, "shared": 0, "total": total,
                          "used": used, "avail": avail})
        return found

    def network_list(self, p: dict[str, str], user: str) -> Any:
        # Linux bridges only: type=bridge, any_bridge and any_local_bridge list them; the other kinds none.
        if p.get("type") not in (None, "bridge", "any_bridge", "any_local_bridge"):
            return []
        return [{"iface": name, "type": "bridge", "active": 1, "autostart": 1, "families": ["inet"],
                 "method": "manual", "method6": "manual", "priority": index, "bridge_ports": ""}
                for index, name in enumerate(self.bridges)]

    def storage_config(self, p: dict[str, str], user: str) -> Any:
        s = self.storage(p["storage"])
        data: dict[str, Any] = {"storage": s.name, "type": s.type, "content": ",".join(sorted(s.content)),
                                "digest": "0" * 40}
        if s.type == "dir":
            data["path"] = self.node_path(s.path)
        else:
            data.update({"vgname": "pve", "thinpool": "data"})
        return data

    def storage_configs(self, p: dict[str, str], user: str) -> Any:
        return [self.storage_config({"storage": name}, user) for name in self.storages]

    def content_list(self, p: dict[str, str], user: str) -> Any:
        releases.check_content_param(self.release, p.get("content"))
        s = self.storage(p["storage"])
        found = []
        if s.type == "dir":
            # PVE's list_images: only names ending in a disk format (so not v2p's .partial files).
            files = [(f"{v.parent.name}/{v.name}", v, "images") for v in s.path.glob("images/*/*")
                     if IMAGE_NAME.fullmatch(v.name)]
            files += [(f"import/{v.name}", v, "import") for v in s.path.glob("import/*")]
            files += [(f"iso/{v.name}", v, "iso") for v in s.path.glob("iso/*")]
        else:
            files = [(v.name, v, "images") for v in s.path.glob("vm-*")]
        for volname, path, content in sorted(files):
            if "content" in p and p["content"] != content:
                continue
            entry: dict[str, Any] = {"volid": f"{s.name}:{volname}", "content": content,
                                     "size": path.stat().st_size, "ctime": int(path.stat().st_mtime)}
            match = re.match(r"(?:\d+/)?vm-(\d+)-", volname)
            if match:
                entry["vmid"] = int(match.group(1))
                if "vmid" in p and p["vmid"] != match.group(1):
                    continue
            entry["format"] = path.suffix[1:] if s.type == "dir" else "raw"
            found.append(entry)
        return found

    def content_alloc(self, p: dict[str, str], user: str) -> Any:
        s = self.storage(p["storage"])
        if "images" not in s.content:
            raise fail(f"storage '{s.name}' does not support content-type 'images'")
        vmid, name = int(p["vmid"]), p["filename"]
        if not re.match(rf"vm-{vmid}-", name):
            raise fail(f"illegal name '{name}' - should be 'vm-{vmid}-*'")
        fmt = p.get("format", "raw" if s.type != "dir" else "raw")
        if s.type != "dir" and fmt != "raw":
            raise fail(f"unsupported format '{fmt}'")
        if s.type == "dir":
            if not name.endswith(f".{fmt}"):
                name = f"{name}.{fmt}"
            volname = f"{vmid}/{name}"
        else:
            volname = name
        with self.lock:
            if s.volume_path(volname).exists():
                raise fail(f"volume '{s.name}:{volname}' already exists")
            return self._create_file(s, volname, fmt, parse_kib_size(p["size"]))

    def content_get(self, p: dict[str, str], user: str) -> Any:
        """PVE::API2::Storage::Content's GET: where the volume is and what it holds."""
        volid = p["volume"]
        if ":" in volid:
            if "storage" in p and volid.partition(":")[0] != p["storage"]:
                raise PVEError(400, "Parameter verification failed.",
                               {"volume": f"storage ID mismatch ({volid.partition(':')[0]} != {p['storage']})"})
        else:
            volid = f"{p['storage']}:{volid}"
        path = self._existing_volume(volid)
        info = json.loads(qemu_img("info", "--output=json", str(path)))
        return {"path": self.node_path(path), "size": info["virtual-size"],
                "used": info.get("actual-size", 0), "format": info["format"]}

    def content_delete(self, p: dict[str, str], user: str) -> Any:
        volid = p["volume"] if ":" in p["volume"] else f"{p['storage']}:{p['volume']}"
        path = self._existing_volume(volid)

        def work(task: Task) -> None:
            path.unlink()
            task.log(f"Removed volume '{volid}'")
        return self.tasks.start("imgdel", volid, user, work).upid

    def upload(self, p: dict[str, str], user: str, data_file: Path) -> Any:
        """pve-storage ``PVE/API2/Storage/Status.pm``, ``upload``: ``data_file`` is pveproxy's spool file
        (``/var/tmp/pveupload-*``, its ``tmpfilename``). Checked in the handler's order; the task then
        verifies the checksum and the image, and *copies* the spool file into the storage (``cp``),
        removing the spool file only after: while it copies, the upload takes its size twice."""
        s = self.storage(p["storage"])
        if s.type not in _PATH_STORAGES:  # only storages with a path take uploads
            raise fail(f"can't upload to storage type '{s.type}'")
        content = p["content"]
        releases.check_upload(self.release, content, p["filename"])
        size = data_file.stat().st_size
        name = normalize_content_filename(p["filename"])
        image_format: str | None = None
        if content == "iso":
            if not re.search(r"[^/]+\.(?:iso|img)$", name, re.I):  # $ISO_EXT_RE_0
                raise PVEError(400, "Parameter verification failed.", {"filename": "wrong file extension"})
        elif content == "vztmpl":
            if not re.search(r"[^/]+\.(?:tar(?!\.)|tar\.(?:gz|xz|zst|bz2))$", name, re.I):  # $VZTMPL_EXT_RE_1
                raise PVEError(400, "Parameter verification failed.", {"filename": "wrong file extension"})
        elif content == "import":
            found = UPLOAD_IMPORT_NAME.search(name)
            if not found:
                raise PVEError(400, "Parameter verification failed.",
                               {"filename": "invalid filename or wrong extension"})
            image_format = None if found.group(1) == "ova" else found.group(1)
        else:
            raise PVEError(400, "Parameter verification failed.",
                           {"content": f"upload content type '{content}' not allowed"})
        if content not in s.content:
            raise fail(f"storage '{s.name}' does not support '{content}' content")
        target = s.path / content / name

        def work(task: Task) -> None:
            task.log(f"starting file import from: {data_file}")
            try:
                if "checksum-algorithm" in p:
                    got = hashlib.new(p["checksum-algorithm"], data_file.read_bytes()).hexdigest()
                    if got.lower() != p["checksum"].lower():
                        raise fail(f"checksum mismatch: got '{got}' != expect '{p['checksum']}'")
                    task.log("calculating checksum...OK, checksum verified")
                if content == "iso" or image_format is not None:
                    # PVE::Storage::file_size_info($tmpfilename, 10, $format, 1): an untrusted image
                    _untrusted_image_info(data_file, image_format)
            except BaseException:
                data_file.unlink(missing_ok=True)
                raise
            task.log(f"target node: {self.node}")
            task.log(f"target file: {target}")
            task.log(f"file size is: {size}")
            task.log(f"command: cp -- {data_file} {target}")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                if size > self.room(s.name)[2]:  # cp's write past the file system's room
                    raise OSError(f"cp: error writing '{target}': No space left on device")
                shutil.copyfile(data_file, target)  # NOTE: PVE overwrites an existing file
            except OSError as exc:
                target.unlink(missing_ok=True)
                raise fail(f"import failed: {exc}") from None
            finally:
                data_file.unlink(missing_ok=True)
            task.log("finished file import successfully")
        return self.tasks.start("imgcopy", "", user, work, lambda: data_file.unlink(missing_ok=True)).upid

    # -- endpoints: VMs ----------------------------------------------------------------

    def vm(self, p: dict[str, str]) -> VM:
        vm = self.vms.get(int(p["vmid"]))
        if vm is None:
            raise fail(f"Configuration file 'nodes/{self.node}/qemu-server/{p['vmid']}.conf' does not exist")
        return vm

    def _prepare_disks(self, vmid: int, p: dict[str, str], user: str) -> dict[str, Callable[[Task], None]]:
        """Check disk keys now (as the API call does before forking: qemu-server's
        ``check_drive_param`` and ``check_storage_access``) and return, by key, the work that
        allocates or imports their volumes, rewriting ``p`` to the new volume ids."""
        work: dict[str, Callable[[Task], None]] = {}
        for key in [k for k in p if DISK_KEY.match(k)]:
            opts, _ = parse_property_string({"file": {"default_key": 1}}, p[key])
            file = opts.get("file", "")
            rest = [item for item in p[key].split(",")[1:]
                    if item.partition("=")[0] not in ("import-from", "format", "file")]
            source = opts.get("import-from")
            match = NEW_VOLUME.match(file)
            # check_drive_param: import-from only with $NEW_DISK_RE and a size of 0 (STORAGE:0)
            if opts.get("media") == "cdrom" or not match or (source and float(match.group(2)) != 0):
                if source:
                    raise PVEError(400, "Parameter verification failed.",
                                   {key: "'import-from' requires special syntax - use <storage ID>:0,"
                                         "import-from=<source>"})
                if ":" in file and not file.startswith("/") and not file.startswith("none"):
                    self._existing_volume(file)
                continue
            storage = self.storage(match.group(1))
            if "images" not in storage.content:
                raise fail(f"storage '{storage.name}' does not support content-type 'images'")
            if source is not None:
                if source.startswith("/"):
                    if user != "root@pam":
                        raise fail("Only root can pass arbitrary filesystem paths.")
                    src = Path(source)
                    if not src.exists():
                        raise fail(f"could not find '{source}'")
                else:
                    # check_storage_access: a PVE volume is imported from images or import content only
                    vtype = self._vtype(source)
                    if vtype not in ("images", "import"):
                        raise PVEError(400, "Parameter verification failed.",
                                       {key: f"{source} has wrong type '{vtype}' - needs to be 'images' or "
                                             "'import'"})
                    releases.check_import_from(self.release, key, source)
                    src = self._existing_volume(source)
            fmt = opts.get("format")
            work[key] = self._disk_work(vmid, key, p, storage, fmt, float(match.group(2)),
                                        src if source is not None else None, rest)
        return work

    def _vtype(self, volid: str) -> str:
        """PVE::Storage::Plugin::parse_volname's content type of ``volid``: its folder on a dir storage
        (``import/``, ``iso/``, ``vztmpl/``, ``dump/`` as backup), images otherwise."""
        name, _, volname = volid.partition(":")
        storage = self.storage(name)
        if storage.type != "dir" or "/" not in volname or re.fullmatch(r"\d+/[^/]+", volname):
            return "images"
        folder = volname.split("/", 1)[0]
        return {"dump": "backup", "template": "vztmpl"}.get(folder, folder)

    def _disk_work(self, vmid: int, key: str, p: dict[str, str], storage: Storage, fmt: str | None,
                   size_gib: float, src: Path | None, rest: list[str]) -> Callable[[Task], None]:
        def run(task: Task) -> None:
            nonlocal fmt
            if fmt is None:
                # Without format= PVE keeps the source's format (a .vmdk import stays vmdk).
                fmt = "raw"
                if src is not None:
                    with _readable(src) as file:
                        fmt = json.loads(qemu_img("info", "--output=json", str(file)))["format"]
                if storage.type == "dir" and fmt not in ("raw", "qcow2", "vmdk"):
                    fmt = "raw"
            if storage.type != "dir":
                fmt = "raw"
            with self.lock:
                volname = self._next_disk_name(storage, vmid, fmt)
                path = storage.volume_path(volname)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            volid = f"{storage.name}:{volname}"
            if src is not None:
                task.log(f"importing disk '{src}' to VM {vmid} ...")
                path.unlink()
                with _readable(src) as file:
                    convert_logged(task, file, path, fmt)
                if self.room(storage.name)[2] <= 0:  # qemu-img convert's write past the room: ENOSPC
                    path.unlink(missing_ok=True)
                    raise fail(f"qemu-img: error while writing to '{path}': No space left on device")
                task.log(f"Successfully imported disk as '{key}:{volid}'")
            elif key == "efidisk0":
                ovmf = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
                if fmt == "raw" and ovmf.exists():
                    shutil.copyfile(ovmf, path)
                else:
                    path.unlink()
                    qemu_img("create", "-f", fmt, str(path), "540672")
            else:
                path.unlink()
                qemu_img("create", "-f", fmt, str(path), str(int(size_gib * (1 << 30))))
            size = json.loads(qemu_img("info", "--output=json", str(path)))["virtual-size"]
            # PVE keeps one size, the new volume's (the drive is a hash when it is printed again)
            kept = [item for item in rest if not item.startswith("size=")]
            p[key] = ",".join([volid, *kept, f"size={format_size(size)}"])
        return run

    def create_vm(self, p: dict[str, str], user: str) -> Any:
        vmid = int(p["vmid"])
        settings = {k: v for k, v in p.items() if k not in ("node", "vmid", "start")}
        with self.lock:
            if vmid in self.containers:
                raise fail(f"CT {vmid} already exists on node '{self.node}'")
            if vmid in self.vms:
                raise fail(f"VM {vmid} already exists on node '{self.node}'")
            disk_work = self._prepare_disks(vmid, settings, user)
            vm = VM(vmid, {}, lock="create")
            self.vms[vmid] = vm

        def work(task: Task) -> None:
            for step in disk_work.values():  # create_vm: all or nothing (its vollist freed on failure)
                step(task)
            with self.lock:
                vm.config = settings
                vm.lock = None

        def undo() -> None:
            with self.lock:
                self._destroy_volumes(settings)
                self.vms.pop(vmid, None)
        return self.tasks.start("qmcreate", str(vmid), user, work, undo).upid

    def _destroy_volumes(self, config: dict[str, str]) -> None:
        for key, value in config.items():
            if DISK_KEY.match(key) or key.startswith("unused"):
                volid = value.split(",")[0]
                if NEW_VOLUME.match(volid) or ":" not in volid or "media=cdrom" in value:
                    continue
                name = volid.partition(":")[0]
                if name in self.storages:
                    self.volume_path(volid).unlink(missing_ok=True)

    def get_config(self, p: dict[str, str], user: str) -> Any:
        vm = self.vm(p)
        with self.lock:
            config = dict(vm.config)
            if p.get("current") != "1":
                config.update(vm.pending)
                for key in vm.pending_delete:
                    config.pop(key, None)
            config["digest"] = "0" * 40
            if vm.lock:
                config["lock"] = vm.lock
            return config

    def pending(self, p: dict[str, str], user: str) -> Any:
        vm = self.vm(p)
        keys = set(vm.config) | set(vm.pending)
        found = []
        for key in sorted(keys):
            entry: dict[str, Any] = {"key": key}
            if key in vm.config:
                entry["value"] = vm.config[key]
            if key in vm.pending:
                entry["pending"] = vm.pending[key]
            if key in vm.pending_delete:
                entry["delete"] = 1
            found.append(entry)
        return found

    def _update(self, vm: VM, settings: dict[str, str], deletes: list[str]) -> None:
        """Apply now, or to pending while running; a replaced or removed disk becomes unusedN."""
        with self.lock:
            target = vm.pending if vm.status == "running" else vm.config
            for key in deletes:
                value = vm.config.get(key)
                if vm.status == "running":
                    vm.pending_delete.add(key)
                    continue
                vm.config.pop(key, None)
                if value is None:
                    continue
                if key.startswith("unused"):
                    self._destroy_volumes({key: value})
                elif DISK_KEY.match(key):
                    self._to_unused(vm, value)
            for key, value in settings.items():
                old = vm.config.get(key)
                target[key] = value
                if (old is not None and DISK_KEY.match(key) and vm.status != "running"
                        and old.split(",")[0] != value.split(",")[0]):
                    self._to_unused(vm, old)
            # qemu-server's write_vm_config: "remove 'unusedX' settings if we re-add a volume"
            used = {value.split(",")[0] for config in (vm.config, vm.pending)
                    for key, value in config.items() if DISK_KEY.match(key)}
            for key in [key for key, value in vm.config.items() if key.startswith("unused") and value in used]:
                del vm.config[key]

    def _to_unused(self, vm: VM, value: str) -> None:
        """qemu-server's ``vmconfig_register_unused_drive``: only a volume the VM owns
        (``vm_is_volid_owner``: named ``vm-<vmid>-...``/``base-<vmid>-...``) becomes ``unusedN``."""
        volid = value.split(",")[0]
        if "media=cdrom" in value or volid in ("none", "cdrom") or volid.startswith("/"):
            return
        owner = re.match(r"[^:]+:(?:\d+/)?(?:vm|base)-(\d+)-", volid)
        if owner is None or int(owner.group(1)) != vm.vmid:
            return
        n = next(i for i in range(256) if f"unused{i}" not in vm.config)
        vm.config[f"unused{n}"] = volid

    def _config_call(self, p: dict[str, str], user: str) -> tuple[VM, dict[str, str], list[str],
                                                                   dict[str, Callable[[Task], None]]]:
        vm = self.vm(p)
        settings = {k: v for k, v in p.items()
                    if k not in ("node", "vmid", "delete", "digest", "revert", "skiplock",
                                 "background_delay", "force")}
        deletes = [d for d in re.split(r"[,; ]+", p.get("delete", "")) if d]
        for key in deletes:
            if key in settings:
                raise PVEError(400, "Parameter verification failed.",
                               {"delete": f"cannot set and delete '{key}' at the same time"})
        if vm.lock and p.get("skiplock") != "1":
            raise fail(f"VM is locked ({vm.lock})")
        return vm, settings, deletes, self._prepare_disks(vm.vmid, settings, user)

    def _update_keys(self, vm: VM, task: Task, settings: dict[str, str], deletes: list[str],
                     disk_work: dict[str, Callable[[Task], None]]) -> None:
        """qemu-server's ``update_vm_api`` (its ``$updatefn``): the deletes, then key by key into
        ``[pending]`` (a disk key's volume made by ``create_disks`` first), each written as it is
        done, so a failure stops there and leaves the keys before it in ``[pending]``; at the end a
        stopped VM gets every pending change applied (``vmconfig_apply_pending``), earlier calls'
        leftovers included."""
        self._update(vm, {}, deletes)
        for key in list(settings):
            with self.lock:
                if vm.pending.get(key) == settings[key]:
                    continue  # "skip if nothing changed"
            if key in disk_work:
                disk_work[key](task)
            with self.lock:
                old = vm.pending.get(key)
                if old is not None and DISK_KEY.match(key) and old.split(",")[0] != settings[key].split(",")[0]:
                    self._to_unused(vm, old)  # vmconfig_register_unused_drive of the pending drive replaced
                vm.pending[key] = settings[key]
                vm.pending_delete.discard(key)
        with self.lock:
            if vm.status != "running":
                pending, vm.pending = vm.pending, {}
                self._update(vm, pending, [])

    def config_async(self, p: dict[str, str], user: str) -> Any:
        vm, settings, deletes, disk_work = self._config_call(p, user)

        def work(task: Task) -> None:
            self._update_keys(vm, task, settings, deletes, disk_work)
            task.log(f"update VM {vm.vmid}: {' '.join(f'-{k} {v}' for k, v in settings.items())}")
        # The worker holds the VM's config lock through every import (qemu-server's update_vm_api).
        return self.tasks.start("qmconfig", str(vm.vmid), user, work, hold=vm.config_lock,
                                hold_name=f"/var/lock/qemu-server/lock-{vm.vmid}.conf").upid

    def config_sync(self, p: dict[str, str], user: str) -> Any:
        vm, settings, deletes, disk_work = self._config_call(p, user)
        task = Task("", self.node, 0, 0, 0, "qmconfig", str(vm.vmid), user)
        self._update_keys(vm, task, settings, deletes, disk_work)
        return None

    def refresh(self, vm: VM) -> None:
        """A real guest may have powered itself off."""
        if vm.status == "running" and self.is_running is not None and not self.is_running(vm):
            vm.status = "stopped"

    def vm_list(self, p: dict[str, str], user: str) -> Any:
        with self.lock:
            vms = list(self.vms.values())
        for vm in vms:
            self.refresh(vm)
        return [{"vmid": vm.vmid, "name": vm.config.get("name", f"VM {vm.vmid}"), "status": vm.status}
                for vm in vms]

    def agent_ping(self, p: dict[str, str], user: str) -> Any:
        vm = self.vm(p)
        self.refresh(vm)
        if vm.status != "running":
            raise fail(f"VM {vm.vmid} is not running")
        enabled = vm.config.get("agent", "0").split(",")[0] in ("1", "enabled=1")
        if not enabled:
            raise fail("No QEMU guest agent configured")
        if self.agent_after is None or time.monotonic() - vm.started < self.agent_after:
            raise fail("QEMU guest agent is not running")
        return None

    def agent_osinfo(self, p: dict[str, str], user: str) -> Any:
        self.agent_ping(p, user)
        return {"result": dict(self.agent_os)}

    def status_current(self, p: dict[str, str], user: str) -> Any:
        """qemu-server's ``vmstatus($vmid, 1)`` (PVE/QemuServer.pm; API2/Qemu.pm ``vm_status`` asks
        it ``$full``), field by field as it fills them; of a VM the simulator runs for real, the
        QEMU-side ones from that QEMU over QMP (query-status, query-blockstats, query-version)."""
        vm = self.vm(p)
        self.refresh(vm)
        config = vm.config
        data: dict[str, Any] = {"vmid": vm.vmid, "status": vm.status,
                                "name": config.get("name", f"VM {vm.vmid}"),
                                "cpus": int(config.get("sockets", "1")) * int(config.get("cores", "1")),
                                "maxmem": int(config.get("memory", "512").removeprefix("current=")
                                              .split(",")[0]) << 20,
                                "disk": 0, "maxdisk": 0, "uptime": 0, "cpu": 0, "mem": 0, "memhost": 0,
                                "netin": 0, "netout": 0, "ha": {"managed": 0}}
        if any(re.fullmatch(r"serial\d", key) for key in config):  # conf_has_serial
            data["serial"] = 1
        if vm.lock:
            data["lock"] = vm.lock
        if config.get("agent", "0").split(",")[0] in ("1", "enabled=1"):
            data["agent"] = 1
        if vm.status != "running":
            return data
        data["uptime"] = int(time.monotonic() - vm.started)
        # The tap device of each NIC on a bridge, "tap${vmid}i$i" (print_netdev_full; one without a
        # bridge is QEMU's user network, no tap): netout is the tap's receive counter (what the guest
        # sent), netin its transmit counter (read_proc_net_dev).
        for key in sorted(key for key in config if re.fullmatch(r"net\d+", key)
                          and "bridge=" in config[key]):
            sent, received = self.nic_bytes(vm, key) if self.nic_bytes is not None else (0, 0)
            data["netout"] += sent
            data["netin"] += received
            data.setdefault("nics", {})[f"tap{vm.vmid}i{key[3:]}"] = {"netout": sent, "netin": received}
        if self.qmp is None:  # a VM that is only a state: no QEMU to ask
            data["qmpstatus"] = "running"
            return data
        status = self.qmp(vm, "query-status")
        if status is None:  # QEMU went away since: what the node then answers on its next look
            vm.status = "stopped"
            return self.status_current(p, user)
        data["qmpstatus"] = status["status"]  # $statuscb: query-status's status
        # $blockstatscb: each backend's stats under its drive ID, "drive-" stripped from the backend's
        # name ("device"), else from the qdev ID (qdev_id_to_drive_id; -blockdev, machine 10.0+); the
        # totals are diskread/diskwrite.
        blockstat: dict[str, Any] = {}
        for entry in self.qmp(vm, "query-blockstats") or []:
            if entry.get("device"):
                drive_id = entry["device"].replace("drive-", "", 1)
            elif entry.get("qdev"):
                drive_id = _qdev_id_to_drive_id(entry["qdev"])
            else:
                continue
            blockstat[drive_id] = entry["stats"]
        data["blockstat"] = blockstat
        data["diskread"] = sum(int(stats["rd_bytes"]) for stats in blockstat.values())
        data["diskwrite"] = sum(int(stats["wr_bytes"]) for stats in blockstat.values())
        version = (self.qmp(vm, "query-version") or {}).get("qemu")  # $versioncb
        data["running-qemu"] = f"{version['major']}.{version['minor']}.{version['micro']}" if version else "unknown"
        return data

    def start(self, p: dict[str, str], user: str) -> Any:
        vm = self.vm(p)

        def work(task: Task) -> None:
            self.refresh(vm)
            with self.lock:
                if vm.status == "running":
                    raise fail(f"VM {vm.vmid} already running")
                vm.config.update(vm.pending)
                for key in vm.pending_delete:
                    self._update(vm, {}, [key])
                vm.pending.clear()
                vm.pending_delete.clear()
            if self.on_start:
                self.on_start(vm)
            vm.status = "running"
            vm.started = time.monotonic()
        return self.tasks.start("qmstart", str(vm.vmid), user, work).upid

    def _halt(self, vm: VM) -> None:
        if self.on_stop:
            self.on_stop(vm)
        vm.status = "stopped"

    def stop(self, p: dict[str, str], user: str) -> Any:
        vm = self.vm(p)

        def work(task: Task) -> None:
            self._halt(vm)
        return self.tasks.start("qmstop", str(vm.vmid), user, work).upid

    def shutdown(self, p: dict[str, str], user: str) -> Any:
        vm = self.vm(p)
        timeout = int(p.get("timeout", "60"))

        def work(task: Task) -> None:
            self.refresh(vm)
            if vm.status != "running":
                raise fail(f"VM {vm.vmid} not running")
            if self.on_powerdown is not None:
                if self.on_powerdown(vm, timeout):
                    vm.status = "stopped"
                    return
            elif self.guest_shuts_down:
                self._halt(vm)
                return
            else:
                time.sleep(min(timeout, 5))
            if p.get("forceStop") == "1":
                self._halt(vm)
                return
            raise fail("VM quit/powerdown failed - got timeout")
        return self.tasks.start("qmshutdown", str(vm.vmid), user, work).upid

    def destroy(self, p: dict[str, str], user: str) -> Any:
        vm = self.vm(p)
        self.refresh(vm)
        if vm.status == "running":
            raise fail(f"VM {vm.vmid} is running - destroy failed")

        def work(task: Task) -> None:
            with self.lock:
                self._destroy_volumes(vm.config)
                self._destroy_volumes(vm.pending)
                if p.get("destroy-unreferenced-disks") == "1":  # every volume the VMID owns, anywhere
                    for name in self.storages:
                        for entry in self.content_list({"storage": name, "vmid": str(vm.vmid)}, user):
                            if entry["content"] == "images":
                                self.volume_path(entry["volid"]).unlink(missing_ok=True)
                del self.vms[vm.vmid]
        return self.tasks.start("qmdestroy", str(vm.vmid), user, work).upid


def _qdev_id_to_drive_id(qdev: str) -> str:
    """qemu-server PVE/QemuServer/Blockdev.pm ``qdev_id_to_drive_id``."""
    match = re.fullmatch(r"/machine/peripheral/(virtio\d+)/virtio-backend", qdev)
    if match:
        return match.group(1)
    if re.fullmatch(r"/machine/(?:system|virt)\.flash0", qdev):
        return "pflash0"
    if re.fullmatch(r"/machine/(?:system|virt)\.flash1", qdev):
        return "efidisk0"
    return qdev  # for SCSI/SATA/IDE it's the same
