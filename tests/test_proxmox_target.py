"""The Proxmox target: its URL, its secrets, what goes over the wire, and TLS pinning.

The wire tests talk to a real HTTPS server on 127.0.0.1 with a self-signed certificate
made by openssl: it answers a few PVE API paths and records each request as received.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from v2p.errors import TargetError, VMIDExistsError
from v2p.options import OptionError
from v2p.targets.proxmox import ProxmoxTarget, PveSettings, form, target_from_url

TOKEN = "0b6ea3e8-5cd1-4bc4-9d4a-4b1f4d7b2c55"
PASSWORD = "pa;ss&wo=rd"
ENV = {"V2P_PVE_TOKEN": TOKEN, "HOME": "/nonexistent"}


# -- the URL ----------------------------------------------------------------------

def test_url_with_a_token() -> None:
    settings = target_from_url("pve://v2p@pve!migrate@pve1.example.com:8007/node1?storage=vmdata", ENV)
    assert (settings.user, settings.token_id, settings.host, settings.port, settings.node, settings.storage) == \
        ("v2p@pve", "migrate", "pve1.example.com", 8007, "node1", "vmdata")
    assert settings.secret == TOKEN and settings.fingerprint is None and not settings.insecure


def test_url_defaults_and_password() -> None:
    settings = target_from_url("pve://10.0.0.5/pve", {"V2P_PVE_PASSWORD": PASSWORD})
    assert (settings.user, settings.token_id, settings.port, settings.storage, settings.import_storage) == \
        ("root@pam", None, 8006, "local-lvm", "local")
    assert settings.secret == PASSWORD


def test_url_ipv6_fingerprint_insecure() -> None:
    fp = ":".join(["AB"] * 32)
    settings = target_from_url(f"pve://root@pam!t@[fd00::5]:443/pve?fingerprint={fp}&import=isos", ENV)
    assert settings.host == "[fd00::5]" and settings.port == 443
    assert settings.fingerprint == "ab" * 32 and settings.import_storage == "isos"
    assert target_from_url("pve://root@pam!t@h/pve?insecure=1", ENV).insecure


@pytest.mark.parametrize("url, message", [
    ("https://h/pve", "pve://"),
    ("pve://root@pam:secret@h/pve", "password: refused"),
    ("pve://root@pam!t@h/-x", "not a PVE node name"),
    ("pve://root@pam!t@h/pve?timeout=0", "not a number of seconds"),
    ("pve", "names no host"),
    ("pve://root@pam!t@h:99999/pve", "not a port"),
    ("pve://root@pam!t@h/pve?fingerprint=abc", "not a SHA-256"),
    ("pve://root@pam!t@h/pve?color=red", "unknown setting 'color'"),
    ("pve://root@pam!t@h/pve?insecure=maybe", "yes/no"),
    ("pve://root@pam!t@h/pve?storage=a;b", "storage id"),
    ("pve://root!t@h/pve", "user@realm"),
])
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(OptionError, match=message) as info:
        target_from_url(url, ENV)
    assert "secret" not in str(info.value)  # a password in the URL is never echoed back


# -- secrets ------------------------------------------------------------------------

def test_no_secret_anywhere_visible(tmp_path: Path) -> None:
    settings = target_from_url("pve://root@pam!v2p@h/pve", ENV)
    target = ProxmoxTarget(settings, state_root=tmp_path)
    shown = json.dumps(target.describe()) + repr(settings) + repr(target)
    assert TOKEN not in shown
    assert target.describe() == {"kind": "proxmox", "host": "h", "port": "8006", "node": "pve",
                                 "user": "root@pam!v2p"}


def test_missing_secret_names_where_to_put_it() -> None:
    with pytest.raises(OptionError, match="V2P_PVE_TOKEN") as info:
        target_from_url("pve://root@pam!v2p@h/pve", {"HOME": "/nonexistent"})
    assert "root@pam!v2p" in str(info.value)
    with pytest.raises(OptionError, match="V2P_PVE_PASSWORD"):
        target_from_url("pve://h/pve", {"HOME": "/nonexistent"})


def test_secrets_file(tmp_path: Path) -> None:
    path = tmp_path / "pve-secrets"
    path.write_text("# v2p\ntoken = from-the-file\npassword = pw\n")
    path.chmod(0o600)
    env = {"V2P_PVE_SECRETS": str(path)}
    assert target_from_url("pve://root@pam!v2p@h/pve", env).secret == "from-the-file"
    assert target_from_url("pve://h/pve", env).secret == "pw"
    assert target_from_url("pve://h/pve", {**env, "V2P_PVE_PASSWORD": "env"}).secret == "env"
    xdg = tmp_path / "xdg"
    (xdg / "v2p").mkdir(parents=True)
    (xdg / "v2p" / "pve-secrets").write_text("token=xdg\n")
    (xdg / "v2p" / "pve-secrets").chmod(0o600)
    assert target_from_url("pve://root@pam!v2p@h/pve", {"XDG_CONFIG_HOME": str(xdg)}).secret == "xdg"
    path.chmod(0o644)
    with pytest.raises(OptionError, match="readable by others"):
        target_from_url("pve://h/pve", env)
    path.chmod(0o600)
    path.write_text("secret: x\n")
    with pytest.raises(OptionError, match=r"pve-secrets:1"):
        target_from_url("pve://h/pve", env)


def test_form_values() -> None:
    assert form({"onboot": True, "agent": False, "memory": 2048, "x": None, "boot": "order=scsi0;net0"}) == \
        {"onboot": "1", "agent": "0", "memory": "2048", "boot": "order=scsi0;net0"}


# -- over the wire: a real HTTPS server --------------------------------------------

@dataclass
class FakePve:
    url: str
    port: int
    fingerprint: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    configs: dict[int, dict[str, str]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cert")
    key, crt = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(crt), "-days", "2", "-subj", "/CN=pve.test",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return key, crt


@pytest.fixture
def fake_pve(cert: tuple[Path, Path]) -> Iterator[FakePve]:
    key, crt = cert
    der = ssl.PEM_cert_to_DER_cert(crt.read_text())
    state = FakePve("", 0, hashlib.sha256(der).hexdigest())

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode(errors="replace")
            parts = urlsplit(self.path)
            record = {"method": method, "path": parts.path, "query": parse_qs(parts.query),
                      "form": {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()},
                      "headers": dict(self.headers), "body": body}
            state.requests.append(record)
            path = parts.path.removeprefix("/api2/json")
            data: Any = None
            status = 200
            if path == "/access/ticket" and method == "POST":
                if record["form"].get("password") == PASSWORD:
                    data = {"ticket": "PVE:root@pam:TICKET", "CSRFPreventionToken": "CSRF"}
                else:
                    status = 401
            elif path == "/cluster/resources":
                data = state.resources
            elif path == "/nodes/pve/qemu" and method == "POST":
                vmid = int(record["form"]["vmid"])
                state.configs[vmid] = {k: v for k, v in record["form"].items() if k != "vmid"}
                state.resources.append({"vmid": vmid, "type": "qemu", "node": "pve"})
                data = f"UPID:pve:00001234:00005678:65000000:qmcreate:{vmid}:root@pam:"
            elif path.startswith("/nodes/pve/tasks/"):
                data = {"status": "stopped", "exitstatus": "OK"} if path.endswith("/status") else []
            else:
                status = 501
            out = json.dumps({"data": data}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def do_GET(self) -> None:
            self._answer("GET")

        def do_POST(self) -> None:
            self._answer("POST")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(crt, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def _target(fake: FakePve, tmp_path: Path, query: str = "", user: str = "root@pam!v2p",
            env: dict[str, str] | None = None) -> ProxmoxTarget:
    url = f"pve://{user}@127.0.0.1:{fake.port}/pve" + (f"?{query}" if query else "")
    return ProxmoxTarget(target_from_url(url, ENV if env is None else env), state_root=tmp_path)


def test_a_self_signed_certificate_is_refused_by_default(fake_pve: FakePve, tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="not trusted") as info:
        _target(fake_pve, tmp_path).list_vms()
    assert "fingerprint=" in str(info.value)
    assert fake_pve.requests == []  # the token never left this machine


def test_a_pinned_fingerprint_is_accepted(fake_pve: FakePve, tmp_path: Path) -> None:
    target = _target(fake_pve, tmp_path, f"fingerprint={fake_pve.fingerprint.upper()}")
    assert target.list_vms() == []
    assert fake_pve.requests[0]["headers"]["Authorization"] == f"PVEAPIToken=root@pam!v2p={TOKEN}"


def test_a_wrong_fingerprint_is_refused(fake_pve: FakePve, tmp_path: Path) -> None:
    wrong = "%064x" % (int(fake_pve.fingerprint, 16) ^ 1)
    with pytest.raises(TargetError, match="pinned fingerprint"):
        _target(fake_pve, tmp_path, f"fingerprint={wrong}").list_vms()
    # password login too: the ticket request goes through the pinned session
    with pytest.raises(TargetError, match="pinned fingerprint"):
        _target(fake_pve, tmp_path, f"fingerprint={wrong}", user="root@pam",
                env={"V2P_PVE_PASSWORD": PASSWORD}).list_vms()
    assert fake_pve.requests == []


def test_insecure_only_when_asked(fake_pve: FakePve, tmp_path: Path) -> None:
    assert _target(fake_pve, tmp_path, "insecure=1").list_vms() == []


def test_password_login_and_form_encoding(fake_pve: FakePve, tmp_path: Path) -> None:
    target = _target(fake_pve, tmp_path, f"fingerprint={fake_pve.fingerprint}", user="root@pam",
                     env={"V2P_PVE_PASSWORD": PASSWORD})
    config = {"name": "web01", "boot": "order=scsi0;net0", "tags": "a;b",
              "description": "from a&b.vmx (x=1; y=2)", "scsi0": "local:0,import-from=local:import/a.qcow2"}
    target.create_vm(120, config)
    login, _resources, create = fake_pve.requests[:3]
    assert login["form"] == {"username": "root@pam", "password": PASSWORD}
    assert create["form"] == {"vmid": "120", **config}  # every ; & = arrived as sent
    assert create["headers"]["CSRFPreventionToken"] == "CSRF"
    assert "PVEAuthCookie=PVE:root@pam:TICKET" in create["headers"]["Cookie"]
    assert PASSWORD not in create["body"] and "%3B" in create["body"]
    with pytest.raises(VMIDExistsError, match="120"):
        target.create_vm(120, {"name": "again"})


def test_a_wrong_password_says_so_without_it(fake_pve: FakePve, tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="logging in as root@pam failed") as info:
        _target(fake_pve, tmp_path, "insecure=1", user="root@pam", env={"V2P_PVE_PASSWORD": "nope;x"}).list_vms()
    assert "nope" not in str(info.value)


def test_settings_repr_has_no_secret() -> None:
    assert TOKEN not in repr(PveSettings(host="h", node="n", secret=TOKEN))


# -- against the PVE simulator (tests/pve_sim) ----------------------------------------

@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Any]:
    from pve_sim.fixture import start_or_skip

    with start_or_skip(tmp_path / "sim") as running:
        yield running


def _sim_target(sim: Any, tmp_path: Path, *, user: str = "root@pam!v2p", env: dict[str, str] | None = None,
                storage: str = "local") -> ProxmoxTarget:
    url = f"pve://{user}@{sim.host}/{sim.cluster.node}?storage={storage}&fingerprint={sim.fingerprint}"
    env = {"V2P_PVE_TOKEN": sim.tokens["root@pam!v2p"]} if env is None else env
    return ProxmoxTarget(target_from_url(url, env), state_root=tmp_path / "state")


def test_sim_config_round_trip_with_password(sim: Any, tmp_path: Path) -> None:
    target = _sim_target(sim, tmp_path, user="root@pam", env={"V2P_PVE_PASSWORD": sim.users["root@pam"]})
    config = {"name": "round-trip", "memory": "2048", "cores": "2", "ostype": "l26",
              "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1", "tags": "a;b",
              "boot": "order=net0", "description": "imported from web 01.vmx (a=1; b&c)"}
    target.create_vm(121, config)
    assert target.get_config(121) == config
    target.set_config(121, {"cores": "4"}, delete=("tags", "nosuch"))
    expected = {**config, "cores": "4"}
    del expected["tags"]
    assert target.get_config(121) == expected
    assert 121 in target.list_vms() and target.status(121) == "stopped"


def test_sim_vmids_are_shared_with_containers(sim: Any, tmp_path: Path) -> None:
    sim.cluster.containers.add(200)
    target = _sim_target(sim, tmp_path)
    assert target.vm_exists(200) and 200 not in target.list_vms()
    with pytest.raises(VMIDExistsError, match="200.*lxc"):
        target.create_vm(200, {"name": "clash"})


def test_sim_a_failed_task_says_what_its_log_says(sim: Any, tmp_path: Path) -> None:
    target = _sim_target(sim, tmp_path)
    sim.fail_next_task("qmcreate", "storage full, simulated")
    with pytest.raises(TargetError, match="storage full, simulated"):
        target.create_vm(130, {"name": "x"})


@pytest.mark.slow
def test_sim_disk_through_upload_and_import_from(sim: Any, tmp_path: Path) -> None:
    from v2p.endpoint import DiskEndpoint

    raw = tmp_path / "disk.raw"
    raw.write_bytes((b"v2p" * 100000).ljust(4 << 20, b"\0"))
    capacity = raw.stat().st_size
    target = _sim_target(sim, tmp_path)
    sink = target.disk_sink(140, 0, fmt=None, storage="local-lvm")
    assert sink.fmt == "raw" and sink.volid == "local-lvm:0,import-from=local:import/v2p-140-disk-0.qcow2,format=raw"
    sink.write(DiskEndpoint("raw", str(raw)), capacity=capacity)
    sink.verify(DiskEndpoint("raw", str(raw)), capacity=capacity)
    assert sink.commit() == sink.volid and sink.exists()
    target.create_vm(140, {"name": "disk", "scsi0": sink.volid, "boot": "order=scsi0"})
    volume = target.get_config(140)["scsi0"].split(",")[0]
    assert volume == "local-lvm:vm-140-disk-0"
    assert sink.attached(target.get_config(140)["scsi0"]) and not sink.attached(sink.volid)
    assert not sink.attached("local:140/vm-140-disk-0.qcow2") and not sink.attached("local-lvm:vm-141-disk-0")
    proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw),
                           str(sim.cluster.volume_path(volume))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    upload = [entry for entry in sim.log if entry.path.endswith("/upload")][0]
    assert upload.params["content"] == "import" and upload.params["checksum-algorithm"] == "sha256"
    target.destroy_vm(140)  # the VM, its disk and v2p's upload and staging file
    assert not sim.cluster.volume_path(volume).exists()
    assert not sink.exists() and not sink.written() and sink.fingerprint() == {}


def test_sim_a_token_without_privileges(sim: Any, tmp_path: Path) -> None:
    sim.privileges["root@pam!v2p"] = set()
    with pytest.raises(TargetError, match="403") as info:
        _sim_target(sim, tmp_path).create_vm(150, {"name": "x"})
    assert "privileges" in str(info.value)


def test_sim_no_secret_in_any_log(sim: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    password, token = sim.users["root@pam"], sim.tokens["root@pam!v2p"]
    by_password = _sim_target(sim, tmp_path, user="root@pam", env={"V2P_PVE_PASSWORD": password})
    by_password.create_vm(160, {"name": "logged"})
    _sim_target(sim, tmp_path).set_config(160, {"cores": "2"})
    assert caplog.records  # proxmoxer and urllib3 did log the calls
    assert password not in caplog.text and token not in caplog.text


@pytest.mark.slow
def test_sim_stop_and_boot_check(sim: Any, tmp_path: Path) -> None:
    target = _sim_target(sim, tmp_path)
    target.create_vm(170, {"name": "runs", "memory": "64"})
    report = target.boot_check(170, timeout=2)
    assert report.outcome == "unconfirmed" and "no serial console" in report.notes[0]  # no disk, no agent
    assert target.status(170) == "running"
    with pytest.raises(TargetError, match="already running"):
        target.start(170)
    assert target.stop(170, timeout=5) is True  # the simulated guest obeys the power button
    sim.cluster.guest_shuts_down = False
    target.start(170)
    assert target.stop(170, timeout=1) is False and target.status(170) == "stopped"
    assert target.stop(170) is True  # nothing to do


def test_sim_a_failed_upload_is_committed_again(sim: Any, tmp_path: Path) -> None:
    from v2p.endpoint import DiskEndpoint

    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\x5a" * (2 << 20))
    target = _sim_target(sim, tmp_path)
    sink = target.disk_sink(180, 0, fmt=None, storage="local")
    sink.write(DiskEndpoint("raw", str(raw)), capacity=2 << 20)
    written = sink.fingerprint()
    sim.drop_next_request("POST", r"/upload$")
    with pytest.raises(TargetError, match="connection to PVE .* failed or broke off") as info:
        sink.commit()
    assert sim.tokens["root@pam!v2p"] not in str(info.value)
    sim.fail_next_task("imgcopy", "disk quota exceeded, simulated")
    with pytest.raises(TargetError, match="disk quota exceeded, simulated"):
        sink.commit()
    assert not sink.exists() and sink.written() and sink.fingerprint() == written
    assert sink.commit() == sink.volid and sink.exists()


def test_sim_an_import_storage_without_import_content(sim: Any, tmp_path: Path) -> None:
    from v2p.endpoint import DiskEndpoint

    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    url = f"pve://root@pam!v2p@{sim.host}/{sim.cluster.node}?import=local-lvm&fingerprint={sim.fingerprint}"
    target = ProxmoxTarget(target_from_url(url, {"V2P_PVE_TOKEN": sim.tokens["root@pam!v2p"]}),
                           state_root=tmp_path / "state")
    sink = target.disk_sink(181, 0, fmt=None, storage="local-lvm")
    sink.write(DiskEndpoint("raw", str(raw)), capacity=1 << 20)
    with pytest.raises(TargetError, match="can't upload to storage type 'lvmthin'.*import=local"):
        sink.commit()


def test_sim_a_vmid_taken_between_look_and_create(sim: Any, tmp_path: Path) -> None:
    sim.fail_next_request("POST", r"^/nodes/[^/]+/qemu$", 500, "VM 190 already exists on node 'pve1'")
    with pytest.raises(VMIDExistsError, match="190 already exists"):
        _sim_target(sim, tmp_path).create_vm(190, {"name": "late"})


def test_sim_an_expired_ticket_is_renewed(sim: Any, tmp_path: Path) -> None:
    target = _sim_target(sim, tmp_path, user="root@pam", env={"V2P_PVE_PASSWORD": sim.users["root@pam"]})
    assert target.list_vms() == []
    sim.tickets.clear()  # the node forgot the ticket (PVE's expire after two hours)
    target.session.auth.renew_age = 0.0
    target.create_vm(191, {"name": "renewed"})  # a POST: new ticket and its CSRF token
    assert target.list_vms() == [191]


# -- settings from the environment and the settings file ---------------------------------

def test_settings_from_the_environment_and_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "pve.conf"
    conf.write_text("# site defaults\nhost = pve.example.com\nuser = v2p@pve!migrate\nstorage = tank\n"
                    "node = n1\non-node = 1\n")
    env = {**ENV, "V2P_PVE_CONFIG": str(conf)}
    settings = target_from_url("pve", env)
    assert (settings.host, settings.user, settings.token_id, settings.storage, settings.node, settings.on_node) \
        == ("pve.example.com", "v2p@pve", "migrate", "tank", "n1", True)
    # the environment over the file, the URL over both
    settings = target_from_url("pve", {**env, "V2P_PVE_STORAGE": "fast", "V2P_PVE_NODE": "n2"})
    assert (settings.storage, settings.node) == ("fast", "n2")
    settings = target_from_url("pve://other/n3?storage=slow", {**env, "V2P_PVE_STORAGE": "fast"})
    assert (settings.host, settings.node, settings.storage, settings.user) == ("other", "n3", "slow", "v2p@pve")
    # $XDG_CONFIG_HOME/v2p/pve.conf is read without being named
    (tmp_path / "xdg" / "v2p").mkdir(parents=True)
    (tmp_path / "xdg" / "v2p" / "pve.conf").write_text("host = found.example.com\nuser = root@pam!t\n")
    assert target_from_url("pve", {**ENV, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}).host == "found.example.com"


@pytest.mark.parametrize("text, message", [
    ("token = abc\n", "does not belong in the settings file"),
    ("colour = red\n", "expected 'key = value'"),
    ("host\n", "expected 'key = value'"),
])
def test_bad_settings_file(tmp_path: Path, text: str, message: str) -> None:
    conf = tmp_path / "pve.conf"
    conf.write_text(text)
    with pytest.raises(OptionError, match=message) as info:
        target_from_url("pve://h/pve", {**ENV, "V2P_PVE_CONFIG": str(conf)})
    assert str(conf) in str(info.value) and "abc" not in str(info.value)
