"""examples/panel.py, the panel example of docs/library.md, run for real: a web app on a free port whose
worker threads migrate sample disks onto the local target; progress, result, cancel, resume.
(Its refusals of hostile requests: test_panel_safety.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, SAMPLES, assert_same_bytes
from test_resume import qemu_img_writing

TOKEN = "test-panel-token-6f1c2a9e"  # what the operator gives the panel ($V2P_PANEL_TOKEN) and its clients


class PanelClient:
    def __init__(self, base: str, token: str = TOKEN) -> None:
        self.base, self.token = base, token

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def until(self, vmid: int, test: Any, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            code, status = self.call("GET", f"/migrations/{vmid}")
            assert code == 200, status
            seen.append(status)
            if test(status):
                return status
            time.sleep(0.1)
        raise AssertionError(f"VMID {vmid} never got there: {seen[-3:]}")


def start_panel(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    """The panel as an operator starts it: sources under tmp_path/src, the local target in tmp_path/target."""
    (tmp_path / "src").mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, str(ROOT / "examples" / "panel.py"), "--port", "0", "--target-dir",
                             str(tmp_path / "target"), "--accel", "tcg", "--source-root", str(tmp_path / "src"),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "V2P_PANEL_TOKEN": TOKEN, **env})


@pytest.fixture
def panel(tmp_path: Path) -> Iterator[PanelClient]:
    proc = start_panel(tmp_path)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line + (proc.stderr.read() if proc.stderr else "")
        yield PanelClient(line.split()[-1])
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err


@pytest.mark.slow
def test_panel_migrates_a_disk_and_reports_its_progress(panel, source_of, tmp_path):
    src = source_of("monolithicSparse")
    code, started = panel.call("POST", "/migrations", {"source": str(src.descriptor), "vmid": 120,
                                                       "options": {"ostype": "l26", "bwlimit": 512}})
    assert code == 202 and started["vmid"] == 120 and started["state"] in ("ready", "running"), started
    # Mid-copy, the progress JSON tells the stage and the bytes written.
    copying = panel.until(120, lambda s: s["stage"] == "convert" and s["done"] > 0 or s["state"] != "running")
    assert copying["state"] == "running" and 0 < copying["percent"] < 100, copying
    assert copying["total"] == 32 << 20
    done = panel.until(120, lambda s: s["state"] != "running")
    assert done["state"] == "finished", done
    assert (done["percent"], done["done"], done["stage"]) == (100.0, 32 << 20, "finish")
    assert done["result"]["nothing_to_do"] is False and done["result"]["config"]["scsi0"].startswith("local:120/")
    assert "error" not in done
    assert_same_bytes(SAMPLES / "guest.raw", tmp_path / "target" / "images" / "120" / "vm-120-disk-0.qcow2")
    code, listed = panel.call("GET", "/migrations")
    assert code == 200 and [m["vmid"] for m in listed] == [120]


def test_panel_cancels_a_migration_and_resumes_it(panel, source_of, tmp_path):
    src = source_of("monolithicFlat")
    job = {"source": str(src.descriptor), "vmid": 121, "options": {"ostype": "l26", "bwlimit": 64,
                                                                   "boot_check": False}}
    assert panel.call("POST", "/migrations", job)[0] == 202
    panel.until(121, lambda s: s["stage"] == "convert" and s["done"] > 0)
    again, refused = panel.call("POST", "/migrations", job)
    assert again == 409 and refused["hint"] == "cancel it first"
    code, _status = panel.call("POST", "/migrations/121/cancel")
    assert code == 202
    cancelled = panel.until(121, lambda s: s["state"] != "running", timeout=10)
    assert cancelled["state"] == "cancelled" and cancelled["type"] == "Cancelled", cancelled
    assert cancelled["error"] == "the migration was cancelled" and cancelled["hint"] == "run it again to resume"
    assert not qemu_img_writing(tmp_path / "target" / "images" / "121" / ".vm-121-disk-0.qcow2.v2p-partial")
    record = json.loads((tmp_path / "target" / "migrations" / "121.json").read_text())
    created = record["stages"]["create"]["finished_at"]
    assert "convert" not in record["stages"]

    job["options"] = {"ostype": "l26", "boot_check": False}  # at full speed now
    assert panel.call("POST", "/migrations", job)[0] == 202
    done = panel.until(121, lambda s: s["state"] not in ("ready", "running"))
    assert done["state"] == "finished" and done["result"]["nothing_to_do"] is False, done
    record = json.loads((tmp_path / "target" / "migrations" / "121.json").read_text())
    assert record["stages"]["create"]["finished_at"] == created, "the rerun started over instead of resuming"
    assert_same_bytes(SAMPLES / "guest.raw", tmp_path / "target" / "images" / "121" / "vm-121-disk-0.qcow2")
    # Asked once more: nothing to do.
    assert panel.call("POST", "/migrations", job)[0] == 202
    assert panel.until(121, lambda s: s["state"] == "finished")["result"]["nothing_to_do"] is True


def test_panel_says_what_is_wrong_with_a_request(panel, source_of, tmp_path):
    # Refused when asked, the message and the hint apart: an option the library refuses.
    src = source_of("monolithicSparse")
    code, body = panel.call("POST", "/migrations", {"source": str(src.descriptor), "vmid": 130,
                                                    "options": {"bus": "floppy"}})
    assert code == 400 and body["type"] == "OptionError" and "floppy" in body["error"], body
    assert body["hint"] and body["hint"] not in body["error"]
    assert panel.call("GET", "/migrations/130")[0] == 404
    assert panel.call("POST", "/migrations/130/cancel")[0] == 404
    assert panel.call("POST", "/migrations", {"vmid": 130})[0] == 400
    assert panel.call("POST", "/migrations", {"source": str(src.descriptor), "vmid": "next"})[0] == 400
    # The source is read when asked (every file it reads must be in a source folder): its error is the caller's.
    code, failed = panel.call("POST", "/migrations", {"source": str(tmp_path / "src" / "absent.vmdk"), "vmid": 131})
    assert code == 400 and failed["type"] == "SourceError" and "absent.vmdk" in failed["error"], failed
    assert failed["hint"] is None or failed["hint"] not in failed["error"]
    assert panel.call("GET", "/migrations/131")[0] == 404
    assert not (tmp_path / "target" / "migrations" / "131.json").exists()
