"""Uploads as a real PVE node takes them: the multipart form in pveproxy's order (pve-http-server
AnyEvent.pm, ``file_upload_multipart``), read by the simulator exactly as that function reads it;
the checksum PVE checks; the drivers ISO under the name PVE stores it as; the upload's own progress
(step ``upload``, bytes); and hints for a storage without the content type that keep its types."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pycdlib
import pytest
import requests
from proxmoxer.backends.https import ProxmoxHttpSession
from pve_sim.fixture import pve_fixture  # noqa: F401
from pve_sim.multipart import UploadRefused, file_upload_multipart
from pve_sim.server import PVESim

from conftest import V2P, one_line_error
from v2p import pveconfig
from v2p.api import Migration
from v2p.endpoint import DiskEndpoint
from v2p.errors import TargetError
from v2p.events import Event
from v2p.targets.proxmox import ProxmoxTarget, RemoteImportSink, target_from_url

BOUNDARY = "b0und4ry"
DATA = b"\r\n--not-the-boundary--\r\n" + bytes(range(256)) * 16 + b"\r\n"  # ends like a delimiter would


def field(name: str, value: str) -> bytes:
    return f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()


def file_part(name: str = "filename", disposition: str = "form-data", headers: str = "") -> bytes:
    return (f'--{BOUNDARY}\r\n{headers}Content-Disposition: {disposition}; name="{name}"; filename="d.qcow2"\r\n'
            f'Content-Type: application/octet-stream\r\n\r\n').encode() + DATA + f"\r\n--{BOUNDARY}--\r\n".encode()


def refusal(body: bytes, tmp_path: Path) -> UploadRefused:
    with pytest.raises(UploadRefused) as info:
        file_upload_multipart(body, BOUNDARY, {}, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing spooled for a refused upload
    return info.value


# -- the parser, held to file_upload_multipart ------------------------------------------------------

def test_pveproxys_order_is_read_and_the_file_spooled_whole(tmp_path: Path) -> None:
    body = field("content", "import") + field("checksum-algorithm", "sha256") + field("checksum", "ab12") \
        + file_part()
    upload = file_upload_multipart(body, BOUNDARY, {"node": "pve1"}, tmp_path)
    assert upload.params == {"node": "pve1", "content": "import", "checksum-algorithm": "sha256",
                             "checksum": "ab12", "filename": "d.qcow2"}
    assert upload.spool.parent == tmp_path and upload.spool.name.startswith("pveupload-")
    assert upload.spool.read_bytes() == DATA  # the CRLF before the closing delimiter is not the file's


def test_fields_are_optional_but_not_their_order(tmp_path: Path) -> None:
    upload = file_upload_multipart(field("content", "iso") + file_part(), BOUNDARY, {}, tmp_path)
    assert upload.params == {"content": "iso", "filename": "d.qcow2"}


def test_the_order_v2p_sent_is_refused_as_pveproxy_refuses_it(tmp_path: Path) -> None:
    # checksum before checksum-algorithm: the regex for checksum-algorithm reaches across the checksum part
    body = field("content", "import") + field("checksum", "ab12") + field("checksum-algorithm", "sha256") \
        + file_part()
    refused = refusal(body, tmp_path)
    assert refused.message.startswith("wrong Content-Disposition 'form-data; name=\"checksum\"\r\n")
    assert refused.message.endswith("in multipart, expected 'form-data'\n")
    # AnyEvent.pm, response: a first line holding a CR is sent as a bare 400
    assert refused.response() == (400, "Bad Request", b"")


def test_fields_after_the_file_become_part_of_it(tmp_path: Path) -> None:
    # file_upload_multipart reads no field after the file part: it is file data up to the closing delimiter
    tail = field("content", "import")
    body = file_part()[:-len(f"\r\n--{BOUNDARY}--\r\n")] + b"\r\n" + tail + f"--{BOUNDARY}--\r\n".encode()
    upload = file_upload_multipart(body, BOUNDARY, {}, tmp_path)
    assert upload.params == {"filename": "d.qcow2"}  # no content: PVE's schema check refuses the call
    assert upload.spool.read_bytes() == DATA + b"\r\n" + tail[:-2]


def test_a_file_part_not_named_filename_is_a_500(tmp_path: Path) -> None:
    refused = refusal(field("content", "import") + file_part(name="file"), tmp_path)
    status, reason, text = refused.response()
    assert (status, reason) == (500, "wrong field name 'file' for file upload, expected 'filename' at "
                                     "/usr/share/perl5/PVE/APIServer/AnyEvent.pm line 1325.")
    assert text.decode() == reason + "\n"


def test_a_disposition_other_than_form_data_is_a_500(tmp_path: Path) -> None:
    refused = refusal(field("content", "import").replace(b"form-data", b"attachment") + file_part(), tmp_path)
    assert refused.response()[:2] == (500, "wrong Content-Disposition 'attachment' in multipart, expected 'form-data'")
    refused = refusal(field("content", "import") + file_part(disposition="inline"), tmp_path)
    assert refused.response()[:2] == (500, "wrong Content-Disposition 'inline' in multipart, expected 'form-data'")


def test_no_file_part_or_no_end_is_upload_failed(tmp_path: Path) -> None:
    failed = (500, "upload failed at /usr/share/perl5/PVE/APIServer/AnyEvent.pm line 1370.")
    only_fields = field("content", "import") + f"--{BOUNDARY}--\r\n".encode()
    assert refusal(only_fields, tmp_path).response()[:2] == failed
    no_end = field("content", "import") + file_part()[:-len(f"--{BOUNDARY}--\r\n")]
    assert refusal(no_end, tmp_path).response()[:2] == failed
    # the file part's Content-Disposition must follow its delimiter at once (no header before it)
    assert refusal(field("content", "import") + file_part(headers="Content-Type: x\r\n"), tmp_path).response()[:2] \
        == failed


# -- v2p's uploads against it ---------------------------------------------------------------------

@pytest.fixture
def sim(tmp_path: Path) -> Iterator[PVESim]:
    from pve_sim.fixture import start_or_skip

    with start_or_skip(tmp_path / "sim") as running:
        yield running


def target_of(sim: PVESim, tmp_path: Path, query: str = "") -> ProxmoxTarget:
    url = f"pve://root@pam!v2p@{sim.host}/{sim.cluster.node}?fingerprint={sim.fingerprint}{query}"
    return ProxmoxTarget(target_from_url(url, {"V2P_PVE_TOKEN": sim.tokens["root@pam!v2p"]}),
                         state_root=tmp_path / "state")


def test_the_simulator_answers_uploads_over_the_wire_as_pveproxy(sim: PVESim, tmp_path: Path) -> None:
    disk = random_raw(tmp_path / "d.raw", 1 << 20)
    auth = {"Authorization": f"PVEAPIToken=root@pam!v2p={sim.tokens['root@pam!v2p']}"}
    digest = hashlib.sha256(disk.read_bytes()).hexdigest()

    def post(path: str, data: dict[str, str], name: str = "filename") -> requests.Response:
        with disk.open("rb") as handle:
            return requests.post(f"{sim.url}{path}", data=data, files={name: ("d.raw", handle)}, headers=auth,
                                 verify=str(sim.cert_file), timeout=60)

    upload = "/nodes/pve1/storage/local/upload"
    wrong = post(upload, {"content": "import", "checksum": digest, "checksum-algorithm": "sha256"})
    assert (wrong.status_code, wrong.reason, wrong.content) == (400, "Bad Request", b"")
    named = post(upload, {"content": "import"}, name="file")
    assert named.status_code == 500 and named.reason.startswith("wrong field name 'file' for file upload")
    assert named.text.startswith(named.reason)
    assert post("/nodes/pve1/qemu", {"vmid": "100"}).status_code == 506
    assert pve_volumes_and_spool(sim) == ([], [])
    sim.slow_next_task("imgcopy", 1.5)
    right = post(upload, {"content": "import", "checksum-algorithm": "sha256", "checksum": digest})
    assert right.status_code == 200, right.text
    # spooled into the node's /var/tmp first, the storage's copy made by the task afterwards
    assert pve_volumes_and_spool(sim) == ([], [1 << 20])
    task = sim.cluster.tasks.by_upid[right.json()["data"]]
    assert task.done.wait(30) and task.exitstatus == "OK"
    assert pve_volumes_and_spool(sim) == (["local:import/d.raw"], [])


def pve_volumes_and_spool(sim: PVESim) -> tuple[list[str], list[int]]:
    spooled = [path.stat().st_size for path in sim.var_tmp.glob("pveupload-*")] if sim.var_tmp.exists() else []
    return sim.volumes(), spooled


def random_raw(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_a_disk_upload_is_taken_with_its_checksum(sim: PVESim, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # 12 MiB: above proxmoxer's 10 MiB, so streamed (requests-toolbelt), and many progress steps
    raw = random_raw(tmp_path / "disk.raw", 12 << 20)
    sent: list[dict[str, Any]] = []
    real = ProxmoxHttpSession.request

    def spy(self: ProxmoxHttpSession, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if url.endswith("/upload"):
            sent.append(dict(kwargs["data"]))
        return real(self, method, url, *args, **kwargs)

    monkeypatch.setattr(ProxmoxHttpSession, "request", spy)
    target = target_of(sim, tmp_path, "&storage=local")
    sink = target.disk_sink(150, 0, fmt=None, storage="local")
    assert isinstance(sink, RemoteImportSink)
    sink.write(DiskEndpoint("raw", str(raw)), capacity=raw.stat().st_size)
    staged = sink.staging.path
    seen: list[tuple[int, int]] = []
    assert sink.commit(progress=lambda done, total: seen.append((done, total))) == sink.volid
    # through proxmoxer's session, the fields in pveproxy's order, the file last
    assert [list(data) for data in sent] == [["content", "checksum-algorithm", "checksum", "filename"]]
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()
    assert sent[0]["checksum"] == digest and sent[0]["checksum-algorithm"] == "sha256"
    assert isinstance(sent[0]["filename"], io.IOBase)
    logged = [entry for entry in sim.log if entry.path.endswith("/upload")]
    assert [entry.status for entry in logged] == [200]
    assert logged[0].params["checksum"] == digest and logged[0].params["filename"] == "v2p-150-disk-0.qcow2"
    task = next(t for t in sim.cluster.tasks.by_upid.values() if t.type == "imgcopy")
    assert task.exitstatus == "OK" and "calculating checksum...OK, checksum verified" in task.lines
    stored = sim.cluster.volume_path("local:import/v2p-150-disk-0.qcow2")
    assert stored.read_bytes() == staged.read_bytes()
    assert not list(sim.var_tmp.iterdir())  # the spool file went once copied
    # progress: from 0 to the whole file, growing, in several steps
    total = staged.stat().st_size
    assert seen[0] == (0, total) and seen[-1] == (total, total) and len(seen) >= 5
    assert all(t == total for _d, t in seen) and [d for d, _t in seen] == sorted(d for d, _t in seen)


def make_iso(path: Path) -> Path:
    iso = pycdlib.PyCdlib()
    iso.new(joliet=3)
    text = b"virtio drivers\n"
    iso.add_fp(io.BytesIO(text), len(text), "/README.;1", joliet_path="/README")
    iso.write(str(path))
    iso.close()
    return path


@pytest.mark.parametrize(("local_name", "stored"), [
    ("virtio-win.iso", "virtio-win.iso"),
    ("virtio win (0.1.240).iso", "virtio_win__0.1.240_.iso"),  # PVE's normalize_content_filename
    ("virtio-win", "virtio-win.iso"),  # PVE takes ISOs by their extension only
])
def test_the_drivers_iso_is_uploaded_under_the_name_pve_gives_it(sim: PVESim, tmp_path: Path, local_name: str,
                                                                 stored: str) -> None:
    iso = make_iso(tmp_path / local_name)
    target = target_of(sim, tmp_path)
    seen: list[tuple[int, int]] = []
    path, volid = target.drivers_iso(str(iso), progress=lambda done, total: seen.append((done, total)))
    assert (path, volid) == (iso, f"local:iso/{stored}")
    assert sim.cluster.volume_path(volid).read_bytes() == iso.read_bytes()
    assert seen[0] == (0, iso.stat().st_size) and seen[-1] == (iso.stat().st_size,) * 2
    assert [entry.status for entry in sim.log if entry.path.endswith("/upload")] == [200]
    # a second time: the same file is there, nothing uploaded again
    assert target.drivers_iso(str(iso)) == (iso, volid)
    assert len([entry for entry in sim.log if entry.path.endswith("/upload")]) == 1


def test_a_migration_reports_its_upload_as_its_own_step(sim: PVESim, tmp_path: Path) -> None:
    raw = random_raw(tmp_path / "disk.raw", 3 << 20)
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", str(raw), str(vmdk)], check=True, timeout=60)
    events: list[Event] = []
    migration = Migration(vmdk, 160, target=target_of(sim, tmp_path, "&storage=local"), ostype="l26",
                          boot_check=False, on_event=events.append)
    migration.run()
    uploads = [e for e in events if e.step == "upload"]
    progress = [e for e in uploads if e.kind == "progress"]
    assert progress and all(e.stage == "verify" and e.disk == 0 for e in progress)
    staged_size = progress[-1].total
    assert progress[0].done == 0 and progress[-1].done == staged_size and staged_size
    assert progress[-1].data["bytes"] == staged_size and progress[-1].data["percent"] == 100.0
    lines = [e.message for e in uploads if e.kind == "info"]
    assert lines[0].startswith("upload: sending disk 0 to the target") and "sent" in lines[-1]
    # the upload's bytes are not counted as the disk's written bytes
    status = migration.status
    assert status.done == status.total == raw.stat().st_size


# -- a storage without the content type: the hint keeps what it has ----------------------------------

def test_content_added_keeps_every_type() -> None:
    assert pveconfig.content_added("local", ["iso", "vztmpl", "backup"], "import") == \
        "pvesm set local --content iso,vztmpl,backup,import"
    assert pveconfig.content_added("local", ["import", "iso"], "import") == "pvesm set local --content import,iso"


def pve_run(v2p: V2P, sim: PVESim, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    url = f"pve://root@pam!v2p@{sim.host}/{sim.cluster.node}?storage=local-lvm&fingerprint={sim.fingerprint}"
    return v2p("--target", url, *args, V2P_PVE_TOKEN=sim.tokens["root@pam!v2p"],
               XDG_DATA_HOME=str(tmp_path / "xdg"))


def test_a_local_without_import_is_refused_before_anything_is_made(pve: PVESim, tmp_path: Path, v2p: V2P,
                                                                    source_of: Any) -> None:
    pve.cluster.storages["local"].content = {"iso", "vztmpl", "backup"}  # a fresh 8.x node's local
    src = source_of("monolithicSparse")
    line = one_line_error(pve_run(v2p, pve, tmp_path, "migrate", str(src.descriptor), "--vmid", "150",
                                  "--no-boot-check"))
    assert "PVE storage local (dir) on node pve1 cannot take disk uploads" in line
    assert "pvesm set local --content backup,iso,vztmpl,import;" in line
    assert "images" not in line.partition("hint:")[2]
    assert "no storage on node pve1 has 'import' content yet" in line
    assert pve.cluster.vms == {} and pve.volumes() == []
    assert not [entry for entry in pve.log if entry.method != "GET"]
    assert not list((tmp_path / "xdg").rglob("*.qcow2"))
    # with a storage that has it, the hint names it
    pve.cluster.add_storage("imports", "dir", {"import"})
    line = one_line_error(pve_run(v2p, pve, tmp_path, "migrate", str(src.descriptor), "--vmid", "150",
                                  "--no-boot-check"))
    assert "storages on node pve1 with 'import' content: imports (choose one with import=imports" in line
    assert pve.cluster.vms == {} and pve.volumes() == []


def test_an_upload_refused_for_its_content_gets_the_same_hint(sim: PVESim, tmp_path: Path) -> None:
    raw = random_raw(tmp_path / "disk.raw", 1 << 20)
    sim.cluster.add_storage("imports", "dir", {"import", "iso"})
    target = target_of(sim, tmp_path)
    sim.cluster.storages["local"].content = {"iso", "vztmpl", "backup"}  # since the preflight
    with pytest.raises(TargetError) as info:
        target.upload("local", "import", raw, "v2p-170-disk-0.raw")
    assert info.value.message.endswith("500 storage 'local' does not support 'import' content")
    assert info.value.hint == ("add it: pvesm set local --content backup,iso,vztmpl,import; storages on node pve1 "
                               "with 'import' content: imports (choose one with import=imports in the target URL)")
    assert not list(sim.var_tmp.iterdir())


def test_no_iso_storage_hint_keeps_locals_types(sim: PVESim, tmp_path: Path) -> None:
    sim.cluster.storages["local"].content = {"import", "backup", "images"}
    iso = make_iso(tmp_path / "virtio-win.iso")
    with pytest.raises(TargetError, match="no storage on PVE node pve1 takes ISO images") as info:
        target_of(sim, tmp_path).drivers_iso(str(iso))
    assert info.value.hint == "add it: pvesm set local --content backup,images,import,iso; " \
                              "no storage on node pve1 has 'iso' content yet"
    assert not [entry for entry in sim.log if entry.method != "GET"]
