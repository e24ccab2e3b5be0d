"""Named preflight rules: each fires on the VM that has the problem, and stays quiet on a clean one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from v2p.errors import RuleError
from v2p.option_table import OPTION
from v2p.options import MigrationOptions, OptionError
from v2p.rules import IGNORABLE, RULES, Finding, check, check_ignore, enforce
from v2p.spec import DiskSpec, NicSpec, VMSpec

GIB = 1 << 30
BRIDGES = {"VM Network": "vmbr0", "Backup": "vmbr1"}


def clean() -> VMSpec:
    """A Linux BIOS VM no rule has anything to say about."""
    return VMSpec(name="web01", uuid="42 1a 2b 3c 4d 5e 6f 70-81 92 a3 b4 c5 d6 e7 f8", cores=2, memory_mib=2048,
                  guest_os="ubuntu-64",
                  disks=[DiskSpec("scsi", 0, 0, "web01.vmdk", 16 * GIB, "pvscsi"),
                         DiskSpec("scsi", 0, 1, "web01_1.vmdk", 8 * GIB, "pvscsi")],
                  nics=[NicSpec("vmxnet3", "00:50:56:01:02:03", "VM Network"),
                        NicSpec("e1000", "00:0c:29:aa:bb:cc", "Backup")])


def windows10_efi() -> VMSpec:
    """The issue's Windows 10: EFI + secure boot, 2x2, 2 disks on LSI SAS + 1 SATA, vmxnet3, vTPM."""
    return VMSpec(name="Win10 Desktop", firmware="efi", secure_boot=True, sockets=2, cores=2, memory_mib=8192,
                  guest_os="windows9-64", tpm=True,
                  disks=[DiskSpec("sata", 0, 0, "Win10-2.vmdk", 10 * GIB, "ahci"),
                         DiskSpec("scsi", 0, 0, "Win10.vmdk", 60 * GIB, "lsisas1068", boot=True),
                         DiskSpec("scsi", 0, 1, "Win10-1.vmdk", 20 * GIB, "lsisas1068")],
                  nics=[NicSpec("vmxnet3", "00:50:56:aa:bb:cc", "VM Network")])


def found(spec: VMSpec, options: MigrationOptions | None = None, **kwargs: Any) -> list[tuple[str, str, str]]:
    kwargs.setdefault("bridges", BRIDGES)
    return [(f.id, f.severity, f.message) for f in check(spec, options or MigrationOptions(), **kwargs)]


def test_clean_vm_has_no_findings() -> None:
    assert found(clean()) == []


def _disk(spec: VMSpec, **changes: Any) -> VMSpec:
    for key, value in changes.items():
        setattr(spec.disks[1], key, value)
    return spec


def _set(**changes: Any) -> Callable[[VMSpec], VMSpec]:
    def change(spec: VMSpec) -> VMSpec:
        for key, value in changes.items():
            setattr(spec, key, value)
        return spec
    return change


# rule id -> (what makes a clean VM trip it, the findings it then has)
FIRING: dict[str, tuple[Callable[[VMSpec], VMSpec], list[tuple[str, str, str]]]] = {
    "encrypted-vm": (_set(encrypted=True), [
        ("encrypted-vm", "error", "the VM is encrypted (VM Encryption): decrypt it in VMware first")]),
    "rdm-disk": (lambda s: _disk(s, rdm=True), [
        ("rdm-disk", "error", "disk scsi0:1 (web01_1.vmdk) is a raw device mapping")]),
    "shared-disk": (lambda s: _disk(s, shared=True), [
        ("shared-disk", "error", "disk scsi0:1 (web01_1.vmdk) is shared (multi-writer): shut down every VM "
                                 "that uses it before migrating")]),
    "zero-capacity-disk": (lambda s: _disk(s, capacity=0), [
        ("zero-capacity-disk", "error", "disk scsi0:1 (web01_1.vmdk) has a capacity of 0 bytes")]),
    "too-many-disks": (_set(disks=[DiskSpec("scsi", u // 15, u % 15, f"d{u}.vmdk", GIB) for u in range(32)]), [
        ("too-many-disks", "error", "32 disks, but the first boot's scsi (31) holds 31")]),
    "too-many-nics": (_set(nics=[NicSpec("vmxnet3", f"00:50:56:01:02:{n:02x}", "VM Network") for n in range(33)]), [
        ("too-many-nics", "error", "33 NICs, but PVE has net0..net31: remove NICs in VMware first")]),
    "unmapped-network": (_set(nics=[NicSpec("vmxnet3", "00:50:56:01:02:03", "DMZ")]), [
        ("unmapped-network", "error", "net0 is on network 'DMZ', which has no bridge")]),
    "independent-disk": (lambda s: _disk(s, mode="independent-persistent"), [
        ("independent-disk", "warning", "disk scsi0:1 is independent-persistent: migrated as a normal disk")]),
    "nvme-controller": (lambda s: _disk(s, controller="nvme", unit=0, controller_model=None), [
        ("nvme-controller", "warning", "disk nvme0:0 is on an NVMe controller: attached as scsi1")]),
    "firmware-mismatch": (_set(firmware="efi"), [  # the boot disk's layout comes from inspection: CHECK_ARGS
        ("firmware-mismatch", "warning", "the source says EFI, but boot disk scsi0:0 (web01.vmdk): MBR, boot code: "
                                         "OVMF will most likely find no boot loader on it; kept (--bios seabios "
                                         "to change)")]),
    "efi-lsi": (lambda s: _disk(_set(firmware="efi")(s), controller_model="lsilogic"), [
        ("efi-lsi", "warning", "disk scsi0:1 on an LSI/BusLogic controller: OVMF has no driver for it, "
                               "attached on scsi instead")]),
    "vtpm": (_set(tpm=True), [
        ("vtpm", "warning", "the VM has a vTPM: its state does not move (have the BitLocker recovery key at "
                            "hand)")]),
    "passthrough-device": (_set(passthrough=["usb0 (SafeNet dongle)", "pciPassthru0 (0000:3b:00.0)"]), [
        ("passthrough-device", "warning", "usb0 (SafeNet dongle) is passed through from the ESXi host: dropped"),
        ("passthrough-device", "warning", "pciPassthru0 (0000:3b:00.0) is passed through from the ESXi host: "
                                          "dropped")]),
    "unknown-guest-os": (_set(guest_os="netware6"), [
        ("unknown-guest-os", "warning", "guest OS 'netware6': mapped to 'other' (give --os to choose)")]),
    "snapshot-chain": (lambda s: s, [  # the chain comes from inspection: see CHECK_ARGS
        ("snapshot-chain", "info", "disk scsi0:1 has 2 snapshots: the consolidated disk is migrated")]),
    "secure-boot": (_set(firmware="efi", secure_boot=True), [
        ("secure-boot", "info", "EFI secure boot: kept on, with pre-enrolled keys")]),
    "uefi-disk": (_set(firmware="efi", firmware_from="disk"), [
        ("uefi-disk", "info", "boot disk scsi0:0 (web01.vmdk): GPT, an EFI system partition, no BIOS boot code: "
                              "only UEFI can boot it, so the VM gets OVMF (bios: ovmf, machine: q35, an efidisk); "
                              "--bios seabios keeps SeaBIOS")]),
    "vm-name": (_set(name="Web Server #1"), [
        ("vm-name", "info", "VM name 'Web Server #1' is not a DNS name: cleaned to 'Web-Server-1'")]),
    "generated-mac": (_set(nics=[NicSpec("e1000", None, "VM Network"), NicSpec("e1000", "00:50:56", "Backup")]), [
        ("generated-mac", "info", "net0 has no usable MAC: it gets a new one"),
        ("generated-mac", "info", "net1 has no usable MAC (its MAC '00:50:56' is not one): it gets a new one")]),
    "unmapped-device": (_set(unmapped=["sound card (hdaudio)"]), [
        ("unmapped-device", "info", "sound card (hdaudio): dropped")]),
    # What only a running hypervisor knows (vSphere's VMs; a file's spec leaves them unset).
    "powered-on": (_set(power_state="poweredOn", tools_running=True), [
        ("powered-on", "error", "the VM is powered on: its disks change while it runs")]),
    "vsan-vvol-datastore": (lambda s: _disk(s, datastore_type="vsan"), [
        ("vsan-vvol-datastore", "warning", "disk scsi0:1 (web01_1.vmdk) is on a vsan datastore")]),
    "vm-snapshots": (_set(snapshots=["before-upgrade", "patched"]), [
        ("vm-snapshots", "info", "the VM has 2 snapshots (before-upgrade, patched): its current state is migrated, "
                                 "the snapshots are not kept")]),
    "changed-block-tracking": (_set(cbt=True), [
        ("changed-block-tracking", "info", "changed-block tracking is on: every disk is copied whole")]),
    # Running (so powered-on says what --shutdown does) without Tools: a hard power-off.
    "tools-not-running": (_set(power_state="poweredOn", tools_running=False), [
        ("powered-on", "info", "the VM is powered on: before its disks are read, it is powered off (--shutdown)"),
        ("tools-not-running", "info", "VMware Tools are not running in the guest: no guest shutdown is possible, "
                                      "--shutdown powers the VM off")]),
}
CHECK_ARGS: dict[str, dict[str, Any]] = {"snapshot-chain": {"chains": {"scsi0:0": 1, "scsi0:1": 3}},
                                         "firmware-mismatch": {"boots": {"scsi0:0": ("bios", "MBR, boot code")}},
                                         "uefi-disk": {"boots": {"scsi0:0": ("efi", "GPT, an EFI system partition, "
                                                                                    "no BIOS boot code")}},
                                         "tools-not-running": {"options": MigrationOptions(shutdown=True)}}


def test_every_rule_has_a_firing_case() -> None:
    assert set(FIRING) == set(RULES)


@pytest.mark.parametrize("rule_id", sorted(FIRING))
def test_rule_fires(rule_id: str) -> None:
    change, expected = FIRING[rule_id]
    assert found(change(clean()), **CHECK_ARGS.get(rule_id, {})) == expected
    assert all(severity == RULES[rule_id].severity for found_id, severity, _ in expected if found_id == rule_id)


# rule id -> a VM close to tripping it that must not (the clean VM is the other case)
QUIET: dict[str, tuple[Callable[[VMSpec], VMSpec], dict[str, Any]]] = {
    # a vTPM needs the VM's home files encrypted; with plain disks the VM migrates
    "encrypted-vm": (_set(home_encrypted=True), {}),
    "rdm-disk": (lambda s: _disk(s, source="lun.vmdk"), {}),
    "shared-disk": (lambda s: _disk(s, shared=False, source="quorum.vmdk"), {}),
    # capacity 0 in a .vmx spec means "not known yet": inspection's capacity counts
    "zero-capacity-disk": (lambda s: _disk(s, capacity=0), {"capacities": {"scsi0:1": GIB}}),
    "too-many-disks": (_set(disks=[DiskSpec("scsi", u // 15, u % 15, f"d{u}.vmdk", GIB) for u in range(31)]), {}),
    "too-many-nics": (_set(nics=[NicSpec("vmxnet3", f"00:50:56:01:02:{n:02x}", "VM Network") for n in range(32)]),
                      {}),
    "unmapped-network": (_set(nics=[NicSpec("vmxnet3", "00:50:56:01:02:03", None)]), {}),
    "independent-disk": (lambda s: _disk(s, mode="persistent"), {}),
    "nvme-controller": (lambda s: _disk(s, controller="sata", unit=0, controller_model="ahci"), {}),
    # a disk that boots both ways suits either firmware
    "firmware-mismatch": (_set(firmware="efi"), {"boots": {"scsi0:0": ("both", "GPT, ...")}}),
    "efi-lsi": (lambda s: _disk(_set(firmware="bios")(s), controller_model="lsilogic"), {}),
    "vtpm": (_set(tpm=False, firmware="efi"), {}),
    "passthrough-device": (_set(passthrough=[]), {}),
    "unknown-guest-os": (_set(guest_os="netware6"), {"ostype": "other"}),  # the user chose
    "snapshot-chain": (lambda s: s, {"chains": {"scsi0:0": 1, "scsi0:1": 1}}),
    "secure-boot": (_set(firmware="efi", secure_boot=False), {}),
    "uefi-disk": (_set(firmware_from="disk"), {"boots": {"scsi0:0": ("bios", "MBR, boot code")}}),
    "vm-name": (_set(name="web01.example.com"), {}),
    "generated-mac": (_set(nics=[NicSpec("e1000", "00:50:56:AA:BB:CC", "VM Network")]), {}),
    "unmapped-device": (_set(unmapped=[]), {}),
    "powered-on": (_set(power_state="poweredOff", tools_running=False), {}),
    "vsan-vvol-datastore": (lambda s: _disk(s, datastore_type="VMFS"), {}),
    "vm-snapshots": (_set(snapshots=[]), {}),
    "changed-block-tracking": (_set(cbt=False), {}),
    "tools-not-running": (_set(power_state="poweredOff", tools_running=False), {}),  # nothing to shut down
}


def test_a_running_vm_with_shutdown_is_a_note_of_what_happens_first() -> None:
    running = _set(power_state="poweredOn", tools_running=True)(clean())
    assert found(running, MigrationOptions(shutdown=True, shutdown_wait=90)) == [
        ("powered-on", "info", "the VM is powered on: before its disks are read, its guest is shut down through "
                               "VMware Tools, the VM powered off if it has not stopped after 90s (--shutdown)")]
    with pytest.raises(RuleError) as refused:
        enforce(running, check(running, MigrationOptions(), bridges=BRIDGES))
    assert "powered-on" in refused.value.message and "--shutdown" in (refused.value.hint or "")
    with pytest.raises(OptionError, match="cannot be ignored"):
        check_ignore(["powered-on"])


def test_every_rule_has_a_quiet_case() -> None:
    assert set(QUIET) == set(RULES)


@pytest.mark.parametrize("rule_id", sorted(QUIET))
def test_rule_stays_quiet(rule_id: str) -> None:
    change, args = QUIET[rule_id]
    assert found(change(clean()), **args) == []


def test_windows10_efi_findings() -> None:
    assert found(windows10_efi()) == [
        ("efi-lsi", "warning", "disks scsi0:0, scsi0:1 on an LSI/BusLogic controller: OVMF has no driver for "
                               "it, attached on ide / sata instead"),
        ("vtpm", "warning", "the VM has a vTPM: its state does not move (have the BitLocker recovery key at "
                            "hand)"),
        ("secure-boot", "info", "EFI secure boot: kept on, with pre-enrolled keys"),
        ("vm-name", "info", "VM name 'Win10 Desktop' is not a DNS name: cleaned to 'Win10-Desktop'"),
    ]
    assert found(windows10_efi(), MigrationOptions(name="win10")) == found(windows10_efi())[:3]


def test_too_many_disks_follows_the_first_boot_bus() -> None:
    spec = windows10_efi()
    spec.disks = [DiskSpec("scsi", 0, u, f"d{u}.vmdk", GIB, "lsisas1068") for u in range(10)]
    assert ("too-many-disks", "error", "10 disks, but the first boot's ide (3) and sata (6) hold 9") in found(spec)
    spec.disks = spec.disks[:9]
    assert "too-many-disks" not in [rule for rule, _, _ in found(spec)]
    # a Linux VM forced onto IDE has three slots beside the CD-ROM
    linux = clean()
    linux.disks = [DiskSpec("scsi", 0, u, f"d{u}.vmdk", GIB) for u in range(4)]
    assert found(linux, MigrationOptions(bus="ide"))[0][:2] == ("too-many-disks", "error")
    assert found(linux, MigrationOptions(bus="sata")) == []


def test_nvme_on_windows_is_attached_on_ide() -> None:
    spec = windows10_efi()
    spec.disks = [DiskSpec("nvme", 0, 0, "w.vmdk", GIB)]
    assert ("nvme-controller", "warning", "disk nvme0:0 is on an NVMe controller: attached as ide0") in found(spec)


def test_efi_with_forced_lsi_scsihw() -> None:
    spec = clean()
    spec.firmware = "efi"
    assert found(spec, MigrationOptions(scsihw="megasas")) == [
        ("efi-lsi", "warning", "--scsihw megasas: OVMF has no driver for it, virtio-scsi-pci is used instead")]


def test_unmapped_network_with_default_bridge_is_a_note() -> None:
    spec = clean()
    spec.nics[1].network = "DMZ"
    assert found(spec, default_bridge="vmbr9") == [
        ("unmapped-network", "info", "net1 (network 'DMZ') has no --network mapping: it goes to the default "
                                     "bridge vmbr9")]


def test_ignore_downgrades_only_ignorable_errors() -> None:
    assert IGNORABLE == {"shared-disk"}
    spec = _disk(clean(), shared=True)
    findings = check(spec, MigrationOptions(), bridges=BRIDGES, ignore={"shared-disk"})
    assert findings == [Finding("shared-disk", "warning", "disk scsi0:1 (web01_1.vmdk) is shared (multi-writer): "
                                "shut down every VM that uses it before migrating", ignored=True)]
    enforce(spec, findings)  # a warning passes
    for rule_id in ("encrypted-vm", "rdm-disk", "zero-capacity-disk", "too-many-disks", "unmapped-network"):
        with pytest.raises(OptionError, match=f"--ignore-rule {rule_id}: this rule cannot be ignored"):
            check(spec, MigrationOptions(), bridges=BRIDGES, ignore={rule_id})
    with pytest.raises(OptionError, match="--ignore-rule 'no-such-rule': no such rule"):
        check_ignore(["no-such-rule"])
    # ignoring a warning or a note is allowed and changes nothing
    assert check(_disk(clean(), mode="independent-persistent"), MigrationOptions(), bridges=BRIDGES,
                 ignore={"independent-disk", "vm-name"})[0].severity == "warning"


def test_enforce_stops_on_errors_with_a_hint_where_ignorable() -> None:
    spec = _disk(clean(), shared=True, rdm=True)
    with pytest.raises(RuleError) as error:
        enforce(spec, check(spec, MigrationOptions(), bridges=BRIDGES))
    # Every error, not the first and a count: the message says what the VM has, the hint each way out.
    assert error.value.message == "VM web01: 2 rule errors: rdm-disk: disk scsi0:1 (web01_1.vmdk) is a raw " \
                                  "device mapping; shared-disk: disk scsi0:1 (web01_1.vmdk) is shared " \
                                  "(multi-writer): shut down every VM that uses it before migrating"
    assert error.value.hint == "copy the LUN into a virtual disk in VMware first; " \
                               "if that is safe here: --ignore-rule shared-disk"
    assert [(f.id, f.options) for f in error.value.findings] == [("rdm-disk", ()),
                                                                 ("shared-disk", ("ignore_rules",))]
    spec = _disk(clean(), shared=True)
    with pytest.raises(RuleError) as error:
        enforce(spec, check(spec, MigrationOptions(), bridges=BRIDGES))
    assert error.value.hint == "if that is safe here: --ignore-rule shared-disk"
    enforce(clean(), check(clean(), MigrationOptions(), bridges=BRIDGES))


def test_rules_table_is_complete() -> None:
    for rule_id, rule in RULES.items():
        assert rule.severity in ("error", "warning", "info"), rule_id
        assert "\n" not in rule.reason and rule.reason, rule_id
        assert not rule.ignorable or rule.severity == "error", rule_id


def test_encrypted_disks_are_named_and_not_called_empty() -> None:
    """Only ciphertext disks stop the VM; their size is unread (0), which is no zero-capacity disk."""
    spec = windows10_efi()
    spec.home_encrypted = True
    spec.encrypted = True
    for disk in spec.disks[1:]:
        disk.encrypted, disk.capacity = True, 0
    findings = found(spec)
    assert findings[0] == ("encrypted-vm", "error", "disks scsi0:0 (Win10.vmdk), scsi0:1 (Win10-1.vmdk) are "
                                                    "encrypted (VM Encryption): decrypt in VMware first")
    assert [rule for rule, _, _ in findings].count("encrypted-vm") == 1
    assert "zero-capacity-disk" not in [rule for rule, _, _ in findings]


def test_vtpm_with_an_encrypted_home_migrates_with_a_warning() -> None:
    spec = windows10_efi()
    spec.home_encrypted = True
    findings = found(spec)
    assert ("vtpm", "warning", "the VM has a vTPM: its state, in the encrypted NVRAM, does not move (have the "
                               "BitLocker recovery key at hand)") in findings
    assert all(severity != "error" for _, severity, _ in findings)
    enforce(spec, check(spec, MigrationOptions(), bridges=BRIDGES))


@pytest.mark.parametrize("rule_id", sorted(rule_id for rule_id, rule in RULES.items() if rule.severity == "error"))
def test_a_rule_error_has_a_hint_and_its_message_no_flag(rule_id: str) -> None:
    """What the VM has is the message, in no surface's words; the way out is the hint, as the CLI says
    it; the library keywords it names are the finding's ``options`` (each a real option)."""
    if rule_id not in FIRING:
        pytest.skip("fires only on what a source finds (tests/test_source_*.py)")
    change, _expected = FIRING[rule_id]
    spec = change(clean())
    with pytest.raises(RuleError) as error:
        enforce(spec, check(spec, MigrationOptions(), **{"bridges": BRIDGES, **CHECK_ARGS.get(rule_id, {})}))
    assert "--" not in error.value.message, error.value.message
    assert error.value.hint, rule_id
    for finding in error.value.findings:
        assert set(finding.options) <= set(OPTION), finding
        for keyword in finding.options:
            assert OPTION[keyword].flag in (finding.hint or ""), finding


def test_every_unmapped_network_is_said_with_its_way_out() -> None:
    spec = _set(nics=[NicSpec("vmxnet3", "00:50:56:01:02:03", "DMZ"),
                      NicSpec("vmxnet3", "00:50:56:01:02:04", "Backup")])(clean())
    with pytest.raises(RuleError) as error:
        enforce(spec, check(spec, MigrationOptions(), bridges={}))
    assert error.value.message == "VM web01: 2 rule errors: unmapped-network: net0 is on network 'DMZ', which " \
                                  "has no bridge; unmapped-network: net1 is on network 'Backup', which has no bridge"
    assert error.value.hint == "add --network 'DMZ=BRIDGE'; add --network 'Backup=BRIDGE'"
    assert error.value.findings[0].options == ("networks",)
