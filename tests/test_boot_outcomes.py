"""A boot check's three outcomes, said plainly everywhere after it (issue 17): ``up``, ``failed`` and
``unconfirmed`` each reach the migration's final line and exit code, its state record, the library's
result, ``v2p status``, a plan's summary, report and status, and never as "up" unless it was.

The boot check itself is a target's (tests/test_boot.py and the targets' tests boot real guests into
each outcome); here a local target whose ``boot_check`` returns a given report stands for it, and
everything downstream is the real thing: the pipeline, the state file, the CLI in this process, and
for plans the real ``plan run`` with its child processes (which get the same ``boot_check`` through a
``sitecustomize`` on their PYTHONPATH). One test boots the real sample guest end to end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from v2p import cli
from v2p.api import Migration, migrate
from v2p.errors import EXIT_BOOT_UNCONFIRMED, BootCheckError
from v2p.plan import Plan
from v2p.targets.base import BOOT_FAILED, BOOT_UNCONFIRMED, BOOT_UP, BootReport
from v2p.targets.local import LocalTarget

pytestmark = pytest.mark.usefixtures("restore_signal_handlers")  # cli.main runs in this process

LOGIN = "login prompt on the serial console"
QUIET = "no sign of a running OS within 60s (boot disk reads 0.1 MiB, nothing sent on net0)"
NOTHING = "the firmware found nothing bootable (No bootable device)"
SIGNS = {"boot disk reads": {"at": 3.5, "value": 41943040}}


def report(outcome: str, signal: str) -> BootReport:
    return BootReport(outcome, 4.25, signal=signal, serial="Debian GNU/Linux 12 debian ttyS0\n", accel="tcg",
                      signs=dict(SIGNS) if outcome == BOOT_UP else {})


class ScriptedBoot(LocalTarget):
    """The local target, its boot check replaced by a given report (no guest is started)."""

    def __init__(self, directory: Path, seen: BootReport) -> None:
        super().__init__(directory, accel="tcg")
        self.seen = seen

    def boot_check(self, vmid: int, *, timeout: float, settle: float = 20.0) -> BootReport:
        return self.seen


def scripted(monkeypatch: pytest.MonkeyPatch, seen: BootReport) -> None:
    """Every LocalTarget of this process (the CLI's own) ends its boot check with ``seen``."""

    def boot_check(self: LocalTarget, vmid: int, *, timeout: float, settle: float = 20.0) -> BootReport:
        return seen

    monkeypatch.setattr(LocalTarget, "boot_check", boot_check)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def recorded(target: Path, vmid: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((target / "migrations" / f"{vmid}.json").read_text())
    return data


# -- the library ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("seen", "boot", "signal"), [
    (report(BOOT_UP, LOGIN), BOOT_UP, LOGIN),
    (report(BOOT_UNCONFIRMED, QUIET), BOOT_UNCONFIRMED, QUIET),
    # The targets' words before issue 17: a guest that powered itself off did so through ACPI (an OS
    # runs); one still running at the end showed no sign either way.
    (report("powered-off", "the guest powered off"), BOOT_UP, "the guest shut itself down"),
    (report("running", "the VM still runs after 20s"), BOOT_UNCONFIRMED, "the VM still runs after 20s"),
])
def test_the_library_result_and_the_state_record_say_how_the_boot_ended(tmp_path, small_vmdk, seen, boot, signal):
    target = ScriptedBoot(tmp_path / "target", seen)
    result = migrate(small_vmdk, 140, target=target)
    assert (result["boot"], result["boot_signal"]) == (boot, signal)
    record = recorded(tmp_path / "target", 140)
    assert record["finished"] is True  # an unconfirmed boot still finishes the migration, VM kept
    assert target.vm_exists(140) and target.status(140) == "stopped"
    stage = record["stages"]["boot"]["result"]
    assert (stage["outcome"], stage["signal"], stage["seconds"]) == (boot, signal, 4.25)
    assert stage["signs"] == (SIGNS if seen.outcome == BOOT_UP else {})


def test_a_panels_status_carries_the_boot_outcome(tmp_path, small_vmdk):
    migration = Migration(small_vmdk, 145, target=ScriptedBoot(tmp_path / "target", report(BOOT_UNCONFIRMED, QUIET)))
    migration.run()
    shown = migration.status.to_dict()
    assert shown["state"] == "finished"
    assert (shown["result"]["boot"], shown["result"]["boot_signal"]) == (BOOT_UNCONFIRMED, QUIET)


def test_no_boot_check_is_skipped_not_up(tmp_path, small_vmdk):
    result = migrate(small_vmdk, 141, target=ScriptedBoot(tmp_path / "target", report(BOOT_UP, LOGIN)),
                     boot_check=False)
    assert (result["boot"], result["boot_signal"]) == ("skipped", "")


def test_a_failed_boot_raises_exit_7_and_is_recorded_for_status_and_checked_again(tmp_path, small_vmdk):
    target = ScriptedBoot(tmp_path / "target", report(BOOT_FAILED, NOTHING))
    with pytest.raises(BootCheckError) as raised:
        migrate(small_vmdk, 142, target=target)
    assert raised.value.exit_code == 7
    assert raised.value.message == f"VM 142 did not boot: {NOTHING}"
    assert raised.value.hint and "boot order" in raised.value.hint and "v2p inspect" in raised.value.hint \
        and "--bios" in raised.value.hint
    record = recorded(tmp_path / "target", 142)
    assert record["finished"] is False and record["failed"]["stage"] == "boot"
    assert (record["stages"]["boot"]["result"]["outcome"], record["stages"]["boot"]["result"]["signal"]) == \
        (BOOT_FAILED, NOTHING)
    assert target.vm_exists(142)  # kept for the user to look at

    # Fixed meanwhile (say, the boot order): the rerun boots it again instead of skipping a failed check.
    target.seen = report(BOOT_UP, LOGIN)
    again = migrate(small_vmdk, 142, target=target)
    assert (again["boot"], again["boot_signal"]) == (BOOT_UP, LOGIN)
    assert "failed" not in recorded(tmp_path / "target", 142)


def test_a_windows_stop_code_keeps_the_os_hint(tmp_path, small_vmdk):
    stop = "Windows stopped: *** STOP: 0x0000007B (0xF78D2524,0xC0000034,0x00000000,0x00000000)"
    with pytest.raises(BootCheckError) as raised:
        migrate(small_vmdk, 143, target=ScriptedBoot(tmp_path / "target", report(BOOT_FAILED, stop)))
    assert "0x0000007B" in raised.value.message and raised.value.hint and "--os" in raised.value.hint


# -- the command ---------------------------------------------------------------------------------------------

def test_migrate_up_exits_0_and_names_the_sign(tmp_path, small_vmdk, capsys, monkeypatch):
    scripted(monkeypatch, report(BOOT_UP, LOGIN))
    code, out, _err = run_cli(capsys, "--target-dir", str(tmp_path / "t"), "migrate", str(small_vmdk), "--vmid", "150")
    assert code == 0
    assert out.splitlines()[-1] == f"VM 150 migrated from {small_vmdk}; boot: up ({LOGIN})"
    assert "[boot] sign: boot disk reads at 3.5s (41943040)" in out


def test_migrate_unconfirmed_exits_12_and_never_says_up(tmp_path, small_vmdk, capsys, monkeypatch):
    scripted(monkeypatch, report(BOOT_UNCONFIRMED, QUIET))
    target = str(tmp_path / "t")
    code, out, _err = run_cli(capsys, "--target-dir", target, "migrate", str(small_vmdk), "--vmid", "151")
    assert code == EXIT_BOOT_UNCONFIRMED == 12
    assert out.splitlines()[-1] == f"VM 151 migrated from {small_vmdk}; boot not confirmed: {QUIET}"
    assert f"[boot] warning: boot not confirmed after 4.25s: {QUIET} (tcg)" in out
    assert "up" not in out.splitlines()[-1].split()

    # Asked again: nothing to do, and still not confirmed (the exit code too).
    code, out, _err = run_cli(capsys, "--target-dir", target, "migrate", str(small_vmdk), "--vmid", "151")
    assert code == 12 and out.splitlines()[-1] == f"VM 151: boot not confirmed: {QUIET}"

    code, out, _err = run_cli(capsys, "--target-dir", target, "status", "151")
    assert code == 0
    assert out.splitlines()[0] == f"VMID 151: {small_vmdk} — finished; boot not confirmed: {QUIET}"
    assert [line for line in out.splitlines() if line.startswith("  boot ")][0].endswith(
        f"s): boot not confirmed: {QUIET}")
    code, out, _err = run_cli(capsys, "--target-dir", target, "status", "151", "--json")
    assert [(row["boot"], row["boot_signal"]) for row in json.loads(out)] == [(BOOT_UNCONFIRMED, QUIET)]


def test_migrate_with_the_old_running_outcome_is_not_confirmed(tmp_path, small_vmdk, capsys, monkeypatch):
    scripted(monkeypatch, report("running", "no sign of readiness within 60s"))
    code, out, _err = run_cli(capsys, "--target-dir", str(tmp_path / "t"), "migrate", str(small_vmdk), "--vmid", "152")
    assert code == 12 and out.splitlines()[-1].endswith("; boot not confirmed: no sign of readiness within 60s")


def test_migrate_failed_exits_7_and_status_says_failed(tmp_path, small_vmdk, capsys, monkeypatch):
    scripted(monkeypatch, report(BOOT_FAILED, NOTHING))
    target = str(tmp_path / "t")
    code, out, err = run_cli(capsys, "--target-dir", target, "migrate", str(small_vmdk), "--vmid", "153")
    assert code == 7
    assert err.startswith(f"v2p: error: VM 153 did not boot: {NOTHING} (hint: ") and "boot order" in err
    assert "migrated from" not in out
    code, out, _err = run_cli(capsys, "--target-dir", target, "status", "153")
    assert out.splitlines()[0] == f"VMID 153: {small_vmdk} — boot failed: {NOTHING} (to check the boot again: " \
                                  f"v2p --target-dir {target} migrate {small_vmdk} --vmid 153)"
    assert [line for line in out.splitlines() if line.startswith("  boot ")][0].startswith("  boot       failed ")


def test_migrate_without_a_boot_check_exits_0_and_says_so(tmp_path, small_vmdk, capsys, monkeypatch):
    scripted(monkeypatch, report(BOOT_FAILED, NOTHING))  # never asked
    code, out, _err = run_cli(capsys, "--target-dir", str(tmp_path / "t"), "migrate", str(small_vmdk), "--vmid",
                              "154", "--no-boot-check")
    assert code == 0 and out.splitlines()[-1] == f"VM 154 migrated from {small_vmdk}; boot not checked"


# -- plans ---------------------------------------------------------------------------------------------------

SITECUSTOMIZE = '''\
"""Test seam for tests/test_boot_outcomes.py: plan run's children end their boot check as told."""
import json
import os

_TOLD = os.environ.get("V2P_TEST_BOOT_OUTCOMES")
if _TOLD:
    from v2p.targets.base import BootReport
    from v2p.targets.local import LocalTarget

    def _boot_check(self, vmid, *, timeout, settle=20.0):
        outcome, signal = json.loads(_TOLD)[str(vmid)]
        return BootReport(outcome, 4.25, signal=signal, accel="tcg")

    LocalTarget.boot_check = _boot_check
'''


def plan_of(tmp_path: Path, disk: Path, boots: dict[int, tuple[str, str]],
            monkeypatch: pytest.MonkeyPatch) -> Path:
    seam = tmp_path / "seam"
    seam.mkdir()
    (seam / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", str(seam))
    monkeypatch.setenv("V2P_TEST_BOOT_OUTCOMES", json.dumps({str(vmid): list(seen) for vmid, seen in boots.items()}))
    plan = tmp_path / "plan.yaml"
    vms = "".join(f"  - {{source: {disk}, vmid: {vmid}, name: vm{vmid}}}\n" for vmid in boots)
    plan.write_text(f"defaults: {{target: {{dir: {tmp_path / 'target'}, accel: tcg}}}}\nvms:\n{vms}")
    return plan


@pytest.mark.slow
def test_plan_counts_up_unconfirmed_and_failed_apart(tmp_path, small_vmdk, capsys, monkeypatch):
    plan = plan_of(tmp_path, small_vmdk, {160: (BOOT_UP, LOGIN), 161: (BOOT_UNCONFIRMED, QUIET),
                                          162: (BOOT_FAILED, NOTHING)}, monkeypatch)
    code, out, _err = run_cli(capsys, "plan", "run", str(plan))
    assert code == 1  # a failed VM: as any failure
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("vm16")}
    assert rows["vm160"][2:4] == ["migrated", "up"]
    assert rows["vm161"][2:5] == ["migrated", "not", "confirmed"]
    assert rows["vm162"][2:4] == ["failed", "failed"]
    assert f"vm161: boot not confirmed: {QUIET}" in out.splitlines()
    assert "2 of 3 VMs migrated; boot: 1 up, 1 not confirmed, 1 failed" in out.splitlines()

    found = {status.name: status for status in Plan.load(plan).status()}
    assert (found["vm160"].state, found["vm160"].boot, found["vm160"].boot_signal) == ("finished", BOOT_UP, LOGIN)
    assert (found["vm161"].state, found["vm161"].boot) == ("finished", BOOT_UNCONFIRMED)
    assert found["vm161"].detail.endswith(f"; boot not confirmed: {QUIET}")
    assert (found["vm162"].state, found["vm162"].stage, found["vm162"].boot) == ("failed", "boot", BOOT_FAILED)
    code, out, _err = run_cli(capsys, "plan", "status", str(plan))
    assert code == 0
    assert [line for line in out.splitlines() if line.startswith("vm161")][0].endswith(f"boot not confirmed: {QUIET}")
    code, out, _err = run_cli(capsys, "plan", "status", str(plan), "--json")
    assert {row["name"]: row["boot"] for row in json.loads(out)} == {
        "vm160": BOOT_UP, "vm161": BOOT_UNCONFIRMED, "vm162": BOOT_FAILED}


@pytest.mark.slow
def test_plan_exits_12_when_some_boots_are_only_unconfirmed_and_0_when_all_are_up(tmp_path, small_vmdk, capsys,
                                                                                  monkeypatch):
    plan = plan_of(tmp_path, small_vmdk, {170: (BOOT_UP, LOGIN), 171: (BOOT_UNCONFIRMED, QUIET)}, monkeypatch)
    code, out, _err = run_cli(capsys, "plan", "run", str(plan), "--json")
    report = json.loads(out)
    assert code == report["exit_code"] == 12 and report["ok"] is False
    assert report["boot"] == {BOOT_UP: 1, BOOT_UNCONFIRMED: 1}
    assert [(vm["result"], vm["boot"], vm["boot_signal"]) for vm in report["vms"]] == [
        ("migrated", BOOT_UP, LOGIN), ("migrated", BOOT_UNCONFIRMED, QUIET)]
    # Run again: nothing to do for either, and the boot that was not confirmed still is not.
    code, out, _err = run_cli(capsys, "plan", "run", str(plan))
    assert code == 12 and "2 of 2 VMs migrated or already done; boot: 1 up, 1 not confirmed" in out

    (tmp_path / "second").mkdir()
    plan = plan_of(tmp_path / "second", small_vmdk, {172: (BOOT_UP, LOGIN), 173: ("powered-off", "")}, monkeypatch)
    code, out, _err = run_cli(capsys, "plan", "run", str(plan), "--json")
    report = json.loads(out)
    assert code == report["exit_code"] == 0 and report["ok"] is True and report["boot"] == {BOOT_UP: 2}


# -- a real guest --------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("boots")
def test_the_sample_guest_ends_up_with_its_sign_named(tmp_path, source_of, capsys):
    """The real boot check of the real sample guest, through the CLI: up, exit 0, the sign in the last line
    (it powers itself off once it has reported: ACPI, which only a running OS does)."""
    src = source_of("monolithicSparse")
    code, out, _err = run_cli(capsys, "--accel", "tcg", "--target-dir", str(tmp_path / "t"), "migrate",
                              str(src.descriptor), "--vmid", "180", "--boot-timeout", "90")
    assert code == 0, out
    last = out.splitlines()[-1]
    assert last.startswith(f"VM 180 migrated from {src.descriptor}; boot: up (") and last.endswith(")"), last
    stage = recorded(tmp_path / "t", 180)["stages"]["boot"]["result"]
    assert stage["outcome"] == BOOT_UP and stage["signal"] and stage["signal"] in last
