"""examples/panel.py under hostile requests, run for real: no token, a target of the client's, options
that write a device, sources outside the panel's folders (through links and descriptors too), and HTTP
that is too big, too deep, mistyped or malformed. Every answer is JSON, nothing is made, no secret
leaves, and the panel's log has no traceback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_panel_example import TOKEN, PanelClient, start_panel
from test_secrets import SECRET, Listener

from conftest import SAMPLES

MiB = 1 << 20


class Panel(PanelClient):
    def __init__(self, base: str, tmp_path: Path) -> None:
        super().__init__(base)
        self.port = int(base.rsplit(":", 1)[1])
        self.target = tmp_path / "target"
        self.root = tmp_path / "src"

    def refused(self, body: Any, status: int = 400) -> str:
        code, answer = self.call("POST", "/migrations", body)
        assert code == status and isinstance(answer, dict) and answer["error"], (body, code, answer)
        return str(answer["error"])

    def made_nothing(self) -> None:
        assert not list((self.target / "migrations").glob("*.json")) if (self.target / "migrations").exists() \
            else True
        assert not (self.target / "images").exists() or not list((self.target / "images").iterdir())
        assert self.call("GET", "/migrations") == (200, [])

    def raw(self, request: bytes, *, auth: bool = True) -> tuple[int, dict[str, str], Any]:
        """Send ``request`` (its head as written, Authorization added) and read the whole answer."""
        if auth:
            head, _, rest = request.partition(b"\r\n")
            request = head + f"\r\nAuthorization: Bearer {TOKEN}".encode() + b"\r\n" + rest
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            def send() -> None:
                try:
                    sock.sendall(request)
                    sock.shutdown(socket.SHUT_WR)  # all sent: a body shorter than it says ends here
                except OSError:
                    pass
            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            data = b""
            while chunk := sock.recv(1 << 16):
                data += chunk
        head_part, _, body = data.partition(b"\r\n\r\n")
        status_line, *lines = head_part.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        assert headers.get("content-type") == "application/json", data[:300]
        return int(status_line.split()[1]), headers, json.loads(body)


@pytest.fixture
def panel(tmp_path: Path) -> Iterator[Panel]:
    # The operator's environment holds a PVE token: no request may make the panel send it anywhere.
    proc = start_panel(tmp_path, V2P_PVE_TOKEN=SECRET, XDG_CONFIG_HOME=str(tmp_path / "config"))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line + (proc.stderr.read() if proc.stderr else "")
        yield Panel(line.split()[-1], tmp_path)
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    assert "Traceback" not in err and SECRET not in err, err


@pytest.fixture
def client_server() -> Iterator[Listener]:
    """A port of the client's own, where a panel that took the request's target would send its secret."""
    made = Listener()
    yield made
    made.close()


def post(path: str, body: bytes, *headers: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode() + body


# -- who may ask ------------------------------------------------------------------------------------

def test_the_panel_will_not_start_without_a_token(tmp_path: Path) -> None:
    for token in ("", "short", "sixteen chars no"):  # none, too short, a space in it
        proc = start_panel(tmp_path, V2P_PANEL_TOKEN=token)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode != 0 and "listening" not in out, out + err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "token" in err, err
    loose = tmp_path / "token"
    loose.write_text(TOKEN + "\n")
    loose.chmod(0o644)
    proc = start_panel(tmp_path, "--token-file", str(loose), V2P_PANEL_TOKEN="")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "chmod 600" in err and "Traceback" not in err, out + err


def test_a_token_file_with_its_line_end_works(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\r\n")
    path.chmod(0o600)
    proc = start_panel(tmp_path, "--token-file", str(path), V2P_PANEL_TOKEN="")
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().split()[-1]
        assert PanelClient(base).call("GET", "/migrations") == (200, [])
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_every_request_needs_the_token(panel: Panel, source_of: Any) -> None:
    job = {"source": str(source_of("monolithicSparse").descriptor), "vmid": 120}
    for token in ("", "wrong", TOKEN + "x", TOKEN[:-1], f"{TOKEN} "):
        client = PanelClient(panel.base, token)
        for method, path, body in (("POST", "/migrations", job), ("GET", "/migrations", None),
                                   ("GET", "/migrations/120", None), ("POST", "/migrations/120/cancel", None)):
            code, answer = client.call(method, path, body)
            assert code == 401 and "token" in answer["error"], (token, method, path, answer)
    status, headers, answer = panel.raw(post("/migrations", json.dumps(job).encode(),
                                             f"Content-Length: {len(json.dumps(job))}"), auth=False)
    assert status == 401 and headers["www-authenticate"] == "Bearer" and answer["error"]
    panel.made_nothing()


# -- what a request may not choose ----------------------------------------------------------------

def test_a_request_cannot_name_the_target(panel: Panel, source_of: Any, client_server: Listener) -> None:
    src = str(source_of("monolithicSparse").descriptor)
    url = f"pve://root@pam!v2p@127.0.0.1:{client_server.port}/pve1"
    for target in (url + "?insecure=1", f"{url}?fingerprint={'ab' * 32}", {"kind": "proxmox", "url": url},
                   {"kind": "local", "dir": str(panel.root)},
                   "local", 12, None, [], "pve"):
        error = panel.refused({"source": src, "vmid": 120, "target": target})
        assert "target" in error
    time.sleep(1)  # a worker that had taken the target would have called by now
    assert client_server.connections == 0
    panel.made_nothing()


@pytest.mark.parametrize("options", [
    {"device": "/dev/loop0", "force": True}, {"force": True}, {"storage": "local"},
    {"drivers_iso": "/etc/passwd"}, {"ignore_rules": ["rdm"]}, {"copy_with": "dd"}, {"keep_on_failure": True},
    {"verify": False}, {"extra": {}}, {"__class__": 1}, {"target": "pve"}, {"dance_wait": 1},
    # the allowed ones, of the wrong type or size
    {"start": "yes"}, {"boot_check": 0}, {"cores": True}, {"cores": "2"}, {"bwlimit": 1.5}, {"memory": None},
    {"networks": {"a": 1}}, {"networks": {"a": {"b": "c"}}}, {"networks": ["vmbr0"]}, {"name": 12},
    {"ostype": "l26\n"}, {"bridge": "v" * 65}, {"networks": {f"n{i}": "vmbr0" for i in range(33)}},
])
def test_options_outside_the_allow_list_or_of_the_wrong_type_are_refused(panel, source_of, options) -> None:
    src = str(source_of("monolithicSparse").descriptor)
    panel.refused({"source": src, "vmid": 120, "options": options})
    panel.made_nothing()


def test_fields_of_the_wrong_type_are_refused(panel: Panel, source_of: Any) -> None:
    src = str(source_of("monolithicSparse").descriptor)
    for body in ([], "x", 12, None, {"source": src}, {"source": src, "vmid": True}, {"source": src, "vmid": 99},
                 {"source": src, "vmid": 1_000_000_000}, {"source": src, "vmid": "120"}, {"source": src, "vmid": 120.0},
                 {"source": src, "vmid": 10 ** 30}, {"source": 12, "vmid": 120}, {"source": "", "vmid": 120},
                 {"source": [src], "vmid": 120}, {"source": src + "\x00x", "vmid": 120},
                 {"source": src + "\ud800", "vmid": 120}, {"source": src + "\u2028", "vmid": 120},
                 {"source": src, "vmid": 120, "options": []}, {"source": src, "vmid": 120, "user": "root"},
                 {"source": "/" + "a" * 5000, "vmid": 120}):
        panel.refused(body)
    panel.made_nothing()


def tenant_disk(tmp_path: Path) -> Path:
    """Another tenant's disk, in a folder only its owner reads: not in the panel's source folder."""
    other = tmp_path / "tenant-b"
    other.mkdir(mode=0o700)
    shutil.copytree(SAMPLES / "monolithicFlat", other / "vm")
    return other / "vm" / "monolithicFlat.vmdk"


def test_sources_outside_the_source_folders_are_refused(panel: Panel, samples: Path, tmp_path: Path) -> None:
    theirs = tenant_disk(tmp_path)
    root = panel.root
    (root / "link.vmdk").symlink_to(theirs)
    (root / "linkdir").symlink_to(theirs.parent)
    # A descriptor of the client's own whose extent is a link to the other tenant's data.
    mine = root / "mine"
    shutil.copytree(SAMPLES / "monolithicFlat", mine)
    (mine / "monolithicFlat-flat.vmdk").unlink()
    (mine / "monolithicFlat-flat.vmdk").symlink_to(theirs.parent / "monolithicFlat-flat.vmdk")
    # A .vmx of the client's own naming the other tenant's disk, by absolute and by relative path.
    vmx = ('.encoding = "UTF-8"\nconfig.version = "8"\nvirtualHW.version = "19"\nguestOS = "other26xlinux-64"\n'
           'memsize = "512"\nscsi0.present = "TRUE"\nscsi0.virtualDev = "lsilogic"\nscsi0:0.present = "TRUE"\n')
    (root / "abs").mkdir()
    (root / "abs" / "vm.vmx").write_text(vmx + f'scsi0:0.fileName = "{theirs}"\n')
    (root / "rel").mkdir()
    (root / "rel" / "vm.vmx").write_text(vmx + 'scsi0:0.fileName = "../../tenant-b/vm/monolithicFlat.vmdk"\n')
    os.mkfifo(root / "pipe.vmdk")  # inside, but no disk: refused at once, not read forever
    for source in (str(theirs), f"{root}/../tenant-b/vm/monolithicFlat.vmdk", "tenant-b/vm/monolithicFlat.vmdk",
                   str(root / "link.vmdk"), str(root / "linkdir" / "monolithicFlat.vmdk"),
                   str(mine / "monolithicFlat.vmdk"), str(root / "abs" / "vm.vmx"), str(root / "abs"),
                   str(root / "rel" / "vm.vmx"), "/etc/passwd", "/dev/zero", "/proc/self/environ",
                   str(root / "pipe.vmdk")):
        panel.refused({"source": source, "vmid": 120, "options": {"boot_check": False}})
    panel.made_nothing()


def test_a_link_inside_the_folder_is_followed_and_what_is_made_is_private(panel: Panel, source_of: Any) -> None:
    src = source_of("monolithicSparse")
    (panel.root / "alias.vmdk").symlink_to(src.descriptor)
    code, started = panel.call("POST", "/migrations", {"source": str(panel.root / "alias.vmdk"), "vmid": 120,
                                                       "options": {"boot_check": False, "ostype": "l26"}})
    assert code == 202, started
    done = panel.until(120, lambda s: s["state"] not in ("ready", "running"))
    assert done["state"] == "finished", done
    volume = panel.target / "images" / "120" / "vm-120-disk-0.qcow2"
    for path, mode in ((volume, 0o600), (volume.parent, 0o700), (panel.target / "migrations" / "120.json", 0o600)):
        assert stat.S_IMODE(os.stat(path).st_mode) == mode, (path, oct(os.stat(path).st_mode))


# -- HTTP that is too big, too deep or malformed -------------------------------------------------

def test_bodies_are_bounded_and_every_answer_is_json(panel: Panel, source_of: Any) -> None:
    src = str(source_of("monolithicSparse").descriptor)
    good = json.dumps({"source": src, "vmid": 120}).encode()
    cases: list[tuple[bytes, int]] = [
        (post("/migrations", good), 411),  # no Content-Length
        (post("/migrations", good, "Transfer-Encoding: chunked"), 411),
        (post("/migrations", good, "Content-Length: -1"), 400),
        (post("/migrations", good, "Content-Length: 1e3"), 400),
        (post("/migrations", b"", "Content-Length: 10000000000"), 413),
        (post("/migrations", good, f"Content-Length: {len(good) + 10}"), 400),  # shorter than it says: ends
    ]
    path = b'{"source": "/' + b"a" * (64 * MiB) + b'", "vmid": 120}'
    cases.append((post("/migrations", path, f"Content-Length: {len(path)}"), 413))
    for nested in (b"[" * 30000 + b"]" * 30000, b'{"a":' * 10000 + b"1" + b"}" * 10000,
                   json.dumps({"source": src, "vmid": 120, "options": {"networks": {"a": {"b": "c"}}}}).encode()):
        cases.append((post("/migrations", nested, f"Content-Length: {len(nested)}"), 400))
    for body in (b'{"source": "x", "vmid": ' + b"9" * 5001 + b"}", b'{"source": "x", "vmid": NaN}',
                 b'{"source": "\xff\xfe", "vmid": 120}', b"{", json.dumps({"source": src, "vmid": 120,
                                                                          "target": 12}).encode()):
        cases.append((post("/migrations", body, f"Content-Length: {len(body)}"), 400))
    for request, expected in cases:
        status, _headers, answer = panel.raw(request)
        assert status == expected and answer["error"], (request[:120], status, answer)
    panel.made_nothing()


def test_urls_and_methods_get_json_errors(panel: Panel) -> None:
    vmid = "9" * 5001
    for request, expected in ((f"GET /migrations/{vmid} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 404),
                              (f"POST /migrations/{vmid}/cancel HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 404),
                              ("GET /migrations/١٢٠ HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 404),  # Arabic digits
                              (b"GET /migrations/0000000120 HTTP/1.1\r\nHost: x\r\n\r\n", 404),
                              (b"GET /etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 404),
                              (b"PUT /migrations HTTP/1.1\r\nHost: x\r\n\r\n", 501),
                              (b"GET /" + b"a" * (64 * MiB) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
                              (b"GET /migrations HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431),
                              (b"GET /migrations HTTP/1.1\r\nX: " + b"y" * 70000 + b"\r\n\r\n", 431)):
        status, _headers, answer = panel.raw(request)
        assert status == expected and answer["error"], (request[:80], status, answer)
    assert panel.call("GET", "/migrations") == (200, [])  # still serving
