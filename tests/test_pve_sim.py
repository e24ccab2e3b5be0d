"""The PVE API simulator: refuses what PVE refuses (checked against the real schema),
accepts what PVE accepts, and does the work for real (uploads, qemu-img imports)."""

from __future__ import annotations

import hashlib
import ssl
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import requests
from pve_sim.fixture import pve_fixture  # noqa: F401 - the `pve` fixture
from pve_sim.server import PVESim

# The simulator's certificate is self-signed; one test checks it by its file and fingerprint.
pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")


def token_header(sim: PVESim, token: str = "root@pam!v2p") -> dict[str, str]:
    return {"Authorization": f"PVEAPIToken={token}={sim.tokens[token]}"}


def api(sim: PVESim, method: str, path: str, data: Any = None, *, headers: dict[str, str] | None = None,
        **kwargs: Any) -> requests.Response:
    # PVE reads GET and DELETE parameters from the query string only.
    where = "params" if method in ("GET", "DELETE") else "data"
    return requests.request(method, sim.url + path, **{where: data}, verify=False, timeout=30,
                            headers=headers if headers is not None else token_header(sim), **kwargs)


def wait_task(sim: PVESim, upid: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    path = f"/nodes/pve1/tasks/{urllib.parse.quote(upid, safe='')}/status"
    for _ in range(600):
        status: dict[str, Any] = api(sim, "GET", path, headers=headers).json()["data"]
        if status["status"] == "stopped":
            return status
        time.sleep(0.05)
    raise AssertionError(f"task {upid} still running")


def refused(response: requests.Response, param: str) -> str:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["data"] is None and body["message"] == "Parameter verification failed.\n"
    assert param in body["errors"], body
    reason: str = body["errors"][param]
    return reason


CREATE = {"vmid": "100", "name": "web01", "cores": "2", "memory": "1024", "ostype": "l26",
          "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0", "boot": "order=ide0;net0"}


# -- refusing what PVE refuses ----------------------------------------------------------------

@pytest.mark.parametrize(("param", "value", "reason"), [
    ("frobnicate", "1", "property is not defined in schema"),
    ("ide4", "local:1", "property is not defined in schema"),
    ("virtio16", "local:1", "property is not defined in schema"),
    ("ostype", "win99", "does not have a value in the enumeration"),
    ("ide0", "local:0,import-from=local:import/a.qcow2,fromat=qcow2", "ide0.fromat: property is not defined"),
    ("ide0", "local:0,format=qcow3", "ide0.format: value 'qcow3' does not have a value"),
    ("start", "true", "type check ('boolean') failed - got 'true'"),
    ("cores", "two", "type check ('integer') failed"),
    ("memory", "8", "memory.current: value must have a minimum value of 16"),
    ("net0", "virtio=BC:24:11:00:00:01,model=e1000", "duplicate key"),
    ("net0", "virtio=01:24:11:00:00:01", "valid unicast MAC address"),
    ("name", "web_01", "invalid format"),
])
def test_refuses_what_pve_refuses(pve: PVESim, param: str, value: str, reason: str) -> None:
    response = api(pve, "POST", "/nodes/pve1/qemu", {**CREATE, param: value})
    assert reason in refused(response, param)
    assert pve.cluster.vms == {}


def test_missing_required_parameter(pve: PVESim) -> None:
    response = api(pve, "POST", "/nodes/pve1/qemu", {"name": "x"})
    assert "property is missing and it is not optional" in refused(response, "vmid")


def test_unencoded_semicolon_splits_the_body_as_on_pve(pve: PVESim) -> None:
    """PVE splits form bodies on `;` too: `boot=order=ide0;net0` sent raw is broken."""
    raw = "vmid=100&boot=order=ide0;net0"
    response = api(pve, "POST", "/nodes/pve1/qemu", raw,
                   headers={**token_header(pve), "Content-Type": "application/x-www-form-urlencoded"})
    refused(response, "boot")
    encoded = urllib.parse.urlencode({"vmid": "100", "boot": "order=ide0;net0"})
    response = api(pve, "POST", "/nodes/pve1/qemu", encoded,
                   headers={**token_header(pve), "Content-Type": "application/x-www-form-urlencoded"})
    assert wait_task(pve, response.json()["data"])["exitstatus"] == "OK"


def test_unencoded_equals_cuts_the_value_as_on_pve(pve: PVESim) -> None:
    """`net0=virtio=MAC,...` sent raw reaches PVE as `net0=virtio`: the MAC is silently lost."""
    raw = "vmid=100&net0=virtio=BC:24:11:00:00:01,bridge=vmbr0"
    response = api(pve, "POST", "/nodes/pve1/qemu", raw,
                   headers={**token_header(pve), "Content-Type": "application/x-www-form-urlencoded"})
    assert wait_task(pve, response.json()["data"])["exitstatus"] == "OK"
    assert api(pve, "GET", "/nodes/pve1/qemu/100/config").json()["data"]["net0"] == "virtio"


def test_unknown_path_is_501(pve: PVESim) -> None:
    response = api(pve, "GET", "/nodes/pve1/qemu/100/frobnicate")
    assert response.status_code == 501


def test_every_refusal_is_logged(pve: PVESim) -> None:
    api(pve, "POST", "/nodes/pve1/qemu", {**CREATE, "ide4": "local:1"})
    assert [entry.path for entry in pve.refused] == ["/nodes/pve1/qemu"]


# -- authentication -------------------------------------------------------------------------

def test_ticket_login_and_csrf(pve: PVESim) -> None:
    login = requests.post(pve.url + "/access/ticket", data={"username": "root@pam", "password": "rootpw"},
                          verify=False, timeout=30).json()["data"]
    cookies = {"PVEAuthCookie": login["ticket"]}
    assert requests.get(pve.url + "/version", cookies=cookies, verify=False, timeout=30).status_code == 200
    no_csrf = requests.post(pve.url + "/nodes/pve1/qemu", data={"vmid": "100"}, cookies=cookies,
                            verify=False, timeout=30)
    assert no_csrf.status_code == 401
    assert no_csrf.json()["message"] == "Permission denied - invalid csrf token\n"
    good = requests.post(pve.url + "/nodes/pve1/qemu", data={"vmid": "100"}, cookies=cookies, verify=False,
                         headers={"CSRFPreventionToken": login["CSRFPreventionToken"]}, timeout=30)
    assert good.status_code == 200 and good.json()["data"].startswith("UPID:pve1:")
    assert good.json()["data"].endswith(":qmcreate:100:root@pam:")


def test_wrong_password_is_401_with_empty_body_after_a_delay(pve: PVESim) -> None:
    started = time.monotonic()
    response = requests.post(pve.url + "/access/ticket", data={"username": "root@pam", "password": "nope"},
                             verify=False, timeout=30)
    assert response.status_code == 401 and response.content == b""
    assert response.reason == "authentication failure"
    assert time.monotonic() - started >= pve.login_delay


def test_no_credentials_and_bad_token_are_401(pve: PVESim) -> None:
    assert api(pve, "GET", "/version", headers={}).status_code == 401
    bad = {"Authorization": "PVEAPIToken=root@pam!v2p=00000000-0000-0000-0000-000000000000"}
    assert api(pve, "GET", "/version", headers=bad).status_code == 401
    assert api(pve, "GET", "/version").json()["data"]["release"] == "9.1"


def test_token_without_rights_is_403(pve: PVESim) -> None:
    pve.tokens["v2p@pve!ro"] = "secret"
    pve.privileges["v2p@pve!ro"] = {"VM.Audit"}
    response = api(pve, "POST", "/nodes/pve1/qemu", CREATE, headers=token_header(pve, "v2p@pve!ro"))
    assert response.status_code == 403
    assert response.json()["message"] == "Permission check failed (/vms/100, VM.Allocate)\n"
    with (Path(__file__).parent / "fixtures" / "v2p-fixture.yaml").open("rb") as handle:
        upload = api(pve, "POST", "/nodes/pve1/storage/local/upload", {"content": "import"},
                     files={"filename": ("x.qcow2", handle)}, headers=token_header(pve, "v2p@pve!ro"))
    assert upload.json()["message"] == "Permission check failed (/storage/local, Datastore.AllocateTemplate)\n"


def test_fingerprint_is_the_served_certificate(pve: PVESim) -> None:
    served = ssl.get_server_certificate(("127.0.0.1", pve.port))
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(served)).hexdigest().upper()
    assert pve.fingerprint.replace(":", "") == digest
    # A client that trusts the certificate file verifies the connection.
    response = requests.get(pve.url + "/version", headers=token_header(pve), verify=str(pve.cert_file),
                            timeout=30)
    assert response.status_code == 200


# -- the import flow ---------------------------------------------------------------------

@pytest.fixture
def source_vmdk(tmp_path: Path) -> Path:
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"\0" * (1 << 20) + bytes(range(256)) * 4096 + b"\0" * (1 << 20))
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", str(raw), str(vmdk)], check=True, timeout=60)
    return vmdk


def upload(pve: PVESim, path: Path, headers: dict[str, str] | None = None) -> requests.Response:
    with path.open("rb") as handle:
        return api(pve, "POST", "/nodes/pve1/storage/local/upload", {"content": "import"},
                   files={"filename": (path.name, handle)}, headers=headers)


def same_content(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", str(a), str(b)], timeout=60).returncode == 0


def test_upload_then_create_with_import(pve: PVESim, source_vmdk: Path) -> None:
    assert wait_task(pve, upload(pve, source_vmdk).json()["data"])["exitstatus"] == "OK"
    content = api(pve, "GET", "/nodes/pve1/storage/local/content", {"content": "import"}).json()["data"]
    assert [c["volid"] for c in content] == ["local:import/disk.vmdk"]
    response = api(pve, "POST", "/nodes/pve1/qemu", {
        **CREATE, "ide0": "local:0,import-from=local:import/disk.vmdk,format=qcow2",
        "ide1": "local:0,import-from=local:import/disk.vmdk"})
    assert response.status_code == 200, response.text
    assert wait_task(pve, response.json()["data"])["exitstatus"] == "OK"
    config = api(pve, "GET", "/nodes/pve1/qemu/100/config").json()["data"]
    assert config["ide0"] == "local:100/vm-100-disk-0.qcow2,size=3M"
    # Without format= the import keeps the source's format, as PVE does.
    # numbered per extension as get_next_vm_diskname does: disk-0.qcow2 leaves disk-0.vmdk free
    assert config["ide1"] == "local:100/vm-100-disk-0.vmdk,size=3M"
    assert config["net0"] == CREATE["net0"] and config["boot"] == CREATE["boot"]
    disk = pve.cluster.volume_path("local:100/vm-100-disk-0.qcow2")
    assert disk.is_file() and same_content(disk, source_vmdk)
    resources = api(pve, "GET", "/cluster/resources", {"type": "vm"}).json()["data"]
    assert [r["vmid"] for r in resources] == [100]
    assert api(pve, "GET", "/cluster/nextid").json()["data"] == "101"
    assert pve.refused == []


def test_upload_checksum_is_verified(pve: PVESim, source_vmdk: Path) -> None:
    digest = hashlib.sha256(source_vmdk.read_bytes()).hexdigest()
    with source_vmdk.open("rb") as handle:
        alone = api(pve, "POST", "/nodes/pve1/storage/local/upload", {"content": "import", "checksum": digest},
                    files={"filename": (source_vmdk.name, handle)})
    assert "requires this property" in refused(alone, "checksum-algorithm")
    for checksum, status in (("0" * 64, "checksum mismatch"), (digest, "OK")):
        with source_vmdk.open("rb") as handle:
            response = api(pve, "POST", "/nodes/pve1/storage/local/upload",
                           {"content": "import", "checksum-algorithm": "sha256", "checksum": checksum},
                           files={"filename": (source_vmdk.name, handle)})
        assert wait_task(pve, response.json()["data"])["exitstatus"].startswith(status)
    assert pve.volumes() == ["local:import/disk.vmdk"]


def test_absolute_import_path_is_root_only(pve: PVESim, source_vmdk: Path) -> None:
    spec = {**CREATE, "scsi0": f"local-lvm:0,import-from={source_vmdk}", "scsihw": "virtio-scsi-pci"}
    response = api(pve, "POST", "/nodes/pve1/qemu", spec)
    assert response.status_code == 500
    assert response.json()["message"] == "Only root can pass arbitrary filesystem paths.\n"
    login = requests.post(pve.url + "/access/ticket", data={"username": "root@pam", "password": "rootpw"},
                          verify=False, timeout=30).json()["data"]
    as_root = {"Cookie": f"PVEAuthCookie={urllib.parse.quote(login['ticket'])}",
               "CSRFPreventionToken": login["CSRFPreventionToken"]}
    response = api(pve, "POST", "/nodes/pve1/qemu", spec, headers=as_root)
    assert wait_task(pve, response.json()["data"], as_root)["exitstatus"] == "OK"
    config = api(pve, "GET", "/nodes/pve1/qemu/100/config").json()["data"]
    assert config["scsi0"] == "local-lvm:vm-100-disk-0,size=3M"
    assert same_content(pve.cluster.volume_path("local-lvm:vm-100-disk-0"), source_vmdk)


def test_allocate_attach_detach_destroy(pve: PVESim) -> None:
    assert wait_task(pve, api(pve, "POST", "/nodes/pve1/qemu", CREATE).json()["data"])["exitstatus"] == "OK"
    volid = api(pve, "POST", "/nodes/pve1/storage/local-lvm/content",
                {"vmid": "100", "filename": "vm-100-disk-0", "size": "4M"}).json()["data"]
    assert volid == "local-lvm:vm-100-disk-0"
    assert pve.cluster.volume_path(volid).stat().st_size == 4 << 20
    assert api(pve, "PUT", "/nodes/pve1/qemu/100/config", {"ide0": volid}).status_code == 200
    missing = api(pve, "PUT", "/nodes/pve1/qemu/100/config", {"ide1": "local-lvm:vm-100-disk-9"})
    assert missing.status_code == 500
    assert api(pve, "PUT", "/nodes/pve1/qemu/100/config", {"delete": "ide0"}).status_code == 200
    config = api(pve, "GET", "/nodes/pve1/qemu/100/config").json()["data"]
    assert "ide0" not in config and config["unused0"] == volid
    taken = api(pve, "POST", "/nodes/pve1/qemu", CREATE)
    assert taken.status_code == 500 and "VM 100 already exists" in taken.json()["message"]
    assert wait_task(pve, api(pve, "POST", "/nodes/pve1/qemu/100/status/start").json()["data"])["exitstatus"] \
        == "OK"
    assert api(pve, "GET", "/nodes/pve1/qemu/100/status/current").json()["data"]["status"] == "running"
    refused_destroy = api(pve, "DELETE", "/nodes/pve1/qemu/100")
    assert refused_destroy.status_code == 500 and "is running" in refused_destroy.json()["message"]
    # A running VM's changes wait in pending.
    api(pve, "PUT", "/nodes/pve1/qemu/100/config", {"cores": "4"})
    current = api(pve, "GET", "/nodes/pve1/qemu/100/config", {"current": "1"}).json()["data"]
    assert current["cores"] == "2"
    shutdown = api(pve, "POST", "/nodes/pve1/qemu/100/status/shutdown", {"timeout": "5", "forceStop": "1"})
    assert wait_task(pve, shutdown.json()["data"])["exitstatus"] == "OK"
    assert wait_task(pve, api(pve, "DELETE", "/nodes/pve1/qemu/100").json()["data"])["exitstatus"] == "OK"
    assert not pve.cluster.volume_path(volid).exists()
    assert api(pve, "GET", "/cluster/resources", {"type": "vm"}).json()["data"] == []
    assert pve.refused == []


# -- faults -----------------------------------------------------------------------------------

def test_failed_task_carries_its_error_in_status_and_log(pve: PVESim) -> None:
    pve.fail_next_task("qmcreate", "unable to create VM 100 - storage full")
    upid = api(pve, "POST", "/nodes/pve1/qemu", CREATE).json()["data"]
    assert wait_task(pve, upid)["exitstatus"] == "unable to create VM 100 - storage full"
    log = api(pve, "GET", f"/nodes/pve1/tasks/{urllib.parse.quote(upid, safe='')}/log").json()["data"]
    assert log[-1] == {"n": len(log), "t": "TASK ERROR: unable to create VM 100 - storage full"}
    # As PVE's worker does, the failed creation leaves no VM behind.
    assert api(pve, "GET", "/cluster/resources", {"type": "vm"}).json()["data"] == []


def test_failed_import_leaves_no_vm_and_no_volume(pve: PVESim, source_vmdk: Path) -> None:
    assert wait_task(pve, upload(pve, source_vmdk).json()["data"])["exitstatus"] == "OK"
    spec = {**CREATE, "ide0": "local:0,import-from=local:import/disk.vmdk,format=qcow2",
            "ide1": "local:0,import-from=local:import/nothere.vmdk,format=qcow2"}
    missing = api(pve, "POST", "/nodes/pve1/qemu", spec)
    assert missing.status_code == 500
    assert missing.json()["message"] == "volume 'local:import/nothere.vmdk' does not exist\n"
    # A VMDK cut after its header: qemu-img refuses it, the import task fails.
    (pve.cluster.storages["local"].path / "import" / "bad.vmdk").write_bytes(source_vmdk.read_bytes()[:1024])
    spec["ide1"] = "local:0,import-from=local:import/bad.vmdk,format=qcow2"
    status = wait_task(pve, api(pve, "POST", "/nodes/pve1/qemu", spec).json()["data"])
    assert "File truncated" in status["exitstatus"]
    assert pve.volumes() == ["local:import/bad.vmdk", "local:import/disk.vmdk"]
    assert api(pve, "GET", "/cluster/nextid").json()["data"] == "100"


def test_vmid_of_a_container_is_taken(pve: PVESim) -> None:
    pve.cluster.containers.add(100)
    assert api(pve, "GET", "/cluster/nextid").json()["data"] == "101"
    taken = api(pve, "POST", "/nodes/pve1/qemu", CREATE)
    assert taken.status_code == 500 and "CT 100 already exists" in taken.json()["message"]
    assert "already exists" in api(pve, "GET", "/cluster/nextid", {"vmid": "100"}).json()["errors"]["vmid"]


def test_injected_500_and_dropped_connection(pve: PVESim, source_vmdk: Path) -> None:
    pve.fail_next_request("POST", r"^/nodes/[^/]+/qemu$", 500, "got lock timeout - aborting command")
    failed = api(pve, "POST", "/nodes/pve1/qemu", CREATE)
    assert failed.status_code == 500 and failed.reason == "got lock timeout - aborting command"
    pve.drop_next_request("POST", "/upload$")
    with pytest.raises(requests.ConnectionError):
        upload(pve, source_vmdk)
    assert list((pve.cluster.storages["local"].path / "import").iterdir()) == []
    assert wait_task(pve, upload(pve, source_vmdk).json()["data"])["exitstatus"] == "OK"


def test_slow_task_is_running_until_done(pve: PVESim) -> None:
    pve.slow_next_task("qmcreate", 1.0)
    upid = api(pve, "POST", "/nodes/pve1/qemu", CREATE).json()["data"]
    status = api(pve, "GET", f"/nodes/pve1/tasks/{urllib.parse.quote(upid, safe='')}/status").json()["data"]
    assert status["status"] == "running" and "exitstatus" not in status
    assert wait_task(pve, upid)["exitstatus"] == "OK"


# -- running VMs for real ------------------------------------------------------------------

@pytest.mark.usefixtures("boots")
def test_started_vm_runs_in_qemu_until_stopped(pve: PVESim) -> None:
    runner = pve.run_vms()
    spec = {**CREATE, "ide0": "local:0.01", "virtio0": "local-lvm:0.01", "scsi0": "local:0.01",
            "scsihw": "virtio-scsi-pci", "ide2": "none,media=cdrom"}
    assert wait_task(pve, api(pve, "POST", "/nodes/pve1/qemu", spec).json()["data"])["exitstatus"] == "OK"
    argv = " ".join(runner.argv(pve.cluster.vms[100]))
    assert "ide-hd,bus=ide.0,unit=0" in argv and "virtio-blk-pci" in argv and "virtio-scsi-pci" in argv
    assert "mac=BC:24:11:00:00:01" in argv and "-m 1024" in argv
    assert wait_task(pve, api(pve, "POST", "/nodes/pve1/qemu/100/status/start").json()["data"])["exitstatus"] \
        == "OK"
    process = runner.processes[100]
    try:
        assert process.running()
        # SeaBIOS with no OS ignores the power button: PVE's shutdown times out, the VM runs on.
        shutdown = api(pve, "POST", "/nodes/pve1/qemu/100/status/shutdown", {"timeout": "1"})
        assert wait_task(pve, shutdown.json()["data"])["exitstatus"] == "VM quit/powerdown failed - got timeout"
        assert api(pve, "GET", "/nodes/pve1/qemu/100/status/current").json()["data"]["status"] == "running"
        forced = api(pve, "POST", "/nodes/pve1/qemu/100/status/shutdown", {"timeout": "1", "forceStop": "1"})
        assert wait_task(pve, forced.json()["data"])["exitstatus"] == "OK"
        assert not process.running()
        assert api(pve, "GET", "/nodes/pve1/qemu/100/status/current").json()["data"]["status"] == "stopped"
    finally:
        process.kill()


def test_proxmoxer_token_and_password(pve: PVESim) -> None:
    """The client the Proxmox target uses talks to the simulator like to PVE."""
    from proxmoxer import AuthenticationError, ProxmoxAPI, ResourceException

    token = ProxmoxAPI("127.0.0.1", port=pve.port, user="root@pam", token_name="v2p",
                       token_value=pve.tokens["root@pam!v2p"], verify_ssl=False)
    upid = token.nodes("pve1").qemu.post(**CREATE)
    assert wait_task(pve, upid)["exitstatus"] == "OK"
    assert token.nodes("pve1").qemu(100).config.get()["boot"] == "order=ide0;net0"
    with pytest.raises(ResourceException, match="ide4"):
        token.nodes("pve1").qemu.post(vmid=101, ide4="local:1")
    password = ProxmoxAPI("127.0.0.1", port=pve.port, user="root@pam", password="rootpw", verify_ssl=False)
    assert [vm["vmid"] for vm in password.nodes("pve1").qemu.get()] == [100]
    assert wait_task(pve, password.nodes("pve1").qemu(100).status.start.post())["exitstatus"] == "OK"
    with pytest.raises(AuthenticationError):
        ProxmoxAPI("127.0.0.1", port=pve.port, user="root@pam", password="wrong", verify_ssl=False)


def test_every_simulated_endpoint_is_in_the_schema(pve: PVESim) -> None:
    from pve_sim.server import ROUTES

    templates = {(method, node["path"]) for _, node in pve.schema.nodes for method in node.get("info", {})}
    assert set(ROUTES) - templates == set()


@pytest.mark.usefixtures("boots")
def test_sample_guest_imported_and_booted_through_the_api(pve: PVESim, samples: Path,
                                                          manifest: dict[str, Any]) -> None:
    """The whole remote path by hand: upload the VMware disk, import it, start, the guest boots
    from its PVE disk, finds its last sector and powers off; the disk holds the source's bytes."""
    from conftest import assert_same_bytes

    runner = pve.run_vms()
    vmdk = samples / manifest["flavors"]["monolithicSparse"]["descriptor"]
    assert wait_task(pve, upload(pve, vmdk).json()["data"])["exitstatus"] == "OK"
    spec = {**CREATE, "ide0": f"local:0,import-from=local:import/{vmdk.name},format=qcow2"}
    assert wait_task(pve, api(pve, "POST", "/nodes/pve1/qemu", spec).json()["data"])["exitstatus"] == "OK"
    volid = api(pve, "GET", "/nodes/pve1/qemu/100/config").json()["data"]["ide0"].split(",")[0]
    assert_same_bytes(samples / "guest.raw", pve.cluster.volume_path(volid))
    assert wait_task(pve, api(pve, "POST", "/nodes/pve1/qemu/100/status/start").json()["data"])["exitstatus"] \
        == "OK"
    try:
        for _ in range(1200):
            if api(pve, "GET", "/nodes/pve1/qemu/100/status/current").json()["data"]["status"] == "stopped":
                break
            time.sleep(0.1)
        serial = (runner.run_dir(100) / "serial.log").read_text(errors="replace")
        assert manifest["expected_serial"]["marker"] in serial, serial
        assert manifest["expected_serial"]["poweroff"] in serial, serial
    finally:
        process = runner.processes.get(100)
        if process is not None:
            process.kill()
    assert pve.refused == [] and pve.unsimulated == []


def test_the_config_v2p_builds_is_one_pve_accepts(pve: PVESim) -> None:
    """What ``inspect_vm`` says migrate would create (with a real storage and bridge in place
    of its placeholders) passes PVE's schema for POST /nodes/{node}/qemu."""
    import v2p.api

    report = v2p.api.inspect_vm(Path(__file__).parent / "fixtures" / "v2p-fixture.ova", vmid=100)
    config = {key: value.replace("<storage>", "local-lvm").replace("<unmapped>", "vmbr0")
              .replace("<random>", "00:00:01") for key, value in report.config.items()}
    endpoint = pve.schema.resolve("POST", ["nodes", "pve1", "qemu"])
    assert endpoint is not None
    assert pve.schema.validate(endpoint, {"node": "pve1", "vmid": "100", **config}) == {}
    assert pve.schema.validate(endpoint, {"node": "pve1", "vmid": "100", **report.config}) != {}


def test_apidata_js_and_apidoc_json_are_read_alike() -> None:
    """PVE nodes ship the schema as api-viewer/apidata.js; the loader reads it as apidoc.json."""
    from pve_sim.schema import load_tree, schema_candidates

    js, doc = (next((p for p in schema_candidates() if p.name == name and p.is_file()), None)
               for name in ("apidata.js", "apidoc.json"))
    if js is None or doc is None:
        pytest.skip("needs both apidata.js and apidoc.json beside the checkout")
    assert load_tree(js) == load_tree(doc)


def test_import_from_a_disk_inside_an_uploaded_ova(pve: PVESim, source_vmdk: Path, tmp_path: Path) -> None:
    import tarfile

    ova = tmp_path / "appliance.ova"
    with tarfile.open(ova, "w") as tar:
        tar.add(source_vmdk, arcname="disk1.vmdk")
    assert wait_task(pve, upload(pve, ova).json()["data"])["exitstatus"] == "OK"
    spec = {**CREATE, "ide0": "local:0,import-from=local:import/appliance.ova/disk1.vmdk,format=qcow2"}
    assert wait_task(pve, api(pve, "POST", "/nodes/pve1/qemu", spec).json()["data"])["exitstatus"] == "OK"
    volid = api(pve, "GET", "/nodes/pve1/qemu/100/config").json()["data"]["ide0"].split(",")[0]
    assert same_content(pve.cluster.volume_path(volid), source_vmdk)
    missing = {**CREATE, "vmid": "101", "ide0": "local:0,import-from=local:import/appliance.ova/disk2.vmdk"}
    assert api(pve, "POST", "/nodes/pve1/qemu", missing).status_code == 500
    assert pve.volumes() == ["local:100/vm-100-disk-0.qcow2", "local:import/appliance.ova"]
