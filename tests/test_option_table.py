"""The option table is the one declaration of every migration option: walk it and prove that the
library (``MigrationOptions``), the command line (``v2p migrate``'s flags) and plans (their keys)
have the same options, of the same type and range, and accept or refuse each value alike."""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, fields
from typing import Any

import pytest

from v2p import cli, cli_args, rules
from v2p.option_table import MAX_SECONDS, OPTION, OPTIONS, PLAN_WORDS, Option
from v2p.options import MigrationOptions, OptionError, check_option
from v2p.plan import KEYS, Plan, PlanError
from v2p.plan_schema import plan_words

# The Python type each kind of option has on MigrationOptions (optional: "| None" too).
ANNOTATIONS = {"choice": "str", "text": "str", "device": "str", "vm-name": "str", "bridge": "str",
               "bridges": "dict[str, str]", "rules": "tuple[str, ...]", "whole": "int", "seconds": "float",
               "bool": "bool", "extra": "dict[str, Any]"}
# Not options: what v2p migrate or a plan also takes.
CLI_ONLY = {"source", "vmid", "dry_run", "json", "progress", "help", "verbose", "target", "target_dir", "accel"}
PLAN_ONLY = {"source", "vmid", "target", "node"}
ERROR_RULE = next(rule_id for rule_id, rule in rules.RULES.items() if rule.severity == "error" and not rule.ignorable)


PARSER = cli.build_parser()  # parse_args leaves it as it was: one for every case


def migrate_parser() -> argparse.ArgumentParser:
    sub = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = sub.choices["migrate"]
    return parser


def samples(option: Option) -> list[Any]:
    """Values on both sides of what ``option`` takes, from its own declaration."""
    kind = option.kind
    if kind == "choice":
        return [*option.choices, "nope", option.choices[0].upper(), ""]
    if kind == "whole":
        low, high = option.bounds
        return [low - 1, low, low + 1, high, high + 1]
    if kind == "seconds":
        return [0, 0.5, 1, MAX_SECONDS, MAX_SECONDS + 1, -1, math.nan, math.inf]
    if kind == "bool":
        return [True, False]
    if kind == "bridge":
        return ["vmbr0", "vmbr 0", "0vm", "a" * 16, "a" * 17, "vm\nbr", ""]
    if kind == "bridges":
        return [{"LAN": "vmbr1"}, {"LAN": "vm br"}, {"LAN": "vmbr1", "DMZ": "vmbr2"}, {"LAN": ""}]
    if kind == "rules":
        return [[sorted(rules.IGNORABLE)[0]], ["no-such-rule"], [ERROR_RULE]]
    if kind == "vm-name":
        return ["web01", "web_01", "a", "a" * 63, "a" * 64, "-a", "a.b-c", "a\nb", ""]
    if kind == "device":
        return ["/dev/sdb", "sdb", "/dev/a\nb", "/dev/a\0b", ""]
    if kind == "text":
        # Absolute: a plan reads a relative path from its own folder.
        return ["/srv/iso/virtio-win.iso", "local:iso/virtio-win.iso", "/srv/a\nb", "/srv/a\0b", ""]
    return []


def library(keyword: str, value: Any) -> MigrationOptions | str:
    """What ``migrate(..., keyword=value)`` makes of it before it touches anything (its rule ids as
    ``inspect_vm`` and preflight check them), or its refusal."""
    try:
        options = MigrationOptions.of({keyword: value})
        rules.check_ignore(options.ignore_rules)
        return options
    except OptionError as exc:
        return str(exc)


def command_line(option: Option, value: Any) -> MigrationOptions | str | None:
    """What ``v2p migrate SOURCE --vmid 100 FLAG VALUE`` makes of it (as ``cli._migrate`` hands it to
    the library), or its refusal; None: the command line cannot say it."""
    flag = option.flag
    assert flag is not None
    if option.kind == "bool":
        words = [flag] if value else [f"--no-{flag[2:]}"] if option.negatable else []
    elif option.kind == "bridges":
        words = [f"{flag}={network}={bridge}" for network, bridge in value.items()]
    elif option.kind == "rules":
        words = [f"{flag}={rule_id}" for rule_id in value]
    elif "\0" in str(value):
        return None  # no argv word holds a NUL
    else:
        words = [f"{flag}={value:g}" if isinstance(value, float) else f"{flag}={value}"]
    try:
        args = PARSER.parse_args(["migrate", "x.vmdk", "--vmid", "100", *words])
    except OptionError as exc:
        return str(exc)
    except SystemExit:  # argparse's refusal (a choice that is not one), said on stderr
        return "refused by argparse"
    try:
        options = MigrationOptions.of(cli_args.given(args))
        rules.check_ignore(options.ignore_rules)
        return options
    except OptionError as exc:
        return str(exc)


def in_a_plan(option: Option, value: Any) -> MigrationOptions | str:
    """What a plan's VM with ``key: value`` gets (its options as the run hands them to the library),
    or the plan's problem."""
    assert option.plan_key is not None
    vm = {"source": "/srv/a.vmdk", "vmid": 120, option.plan_key: list(value) if isinstance(value, tuple) else value}
    try:
        read = Plan.from_dict({"vms": [vm]}, base="/srv")
    except PlanError as exc:
        assert len(exc.problems) == 1, exc.problems
        return exc.problems[0].message
    return MigrationOptions(**read.vms[0].options)


@pytest.mark.parametrize("keyword", [option.keyword for option in OPTIONS if samples(option)])
def test_each_surface_accepts_or_refuses_alike(keyword: str, capsys: pytest.CaptureFixture[str]) -> None:
    option = OPTION[keyword]
    for value in samples(option):
        verdicts = {"library": library(keyword, value)}
        if option.flag is not None:
            said = command_line(option, value)
            if said is not None:
                verdicts["command line"] = said
        if option.plan_key is not None:
            verdicts["plan"] = in_a_plan(option, value)
        capsys.readouterr()
        accepted = {surface: asdict(made) for surface, made in verdicts.items() if isinstance(made, MigrationOptions)}
        assert not accepted or len(accepted) == len(verdicts), (value, verdicts)
        # What is accepted is the same option value everywhere (a number of seconds a float, rules a tuple).
        assert all(made == accepted["library"] for made in accepted.values()), (value, accepted)
        if not accepted and option.kind not in ("choice", "bool", "rules"):
            same_check_in_its_words(option, value, verdicts)


def same_check_in_its_words(option: Option, value: Any, verdicts: dict[str, Any]) -> None:
    """A refusal: the library says the CLI flag, a plan its key; the check behind both is the table's
    (choices have their own words in each: argparse's, a plan's did-you-mean)."""
    with pytest.raises(OptionError) as own:
        check_option(option, value)
    assert verdicts["library"] == str(own.value)
    assert verdicts["library"].startswith((f"{option.flag} ", f"{option.flag}:"))
    written_out = option.kind in ("whole", "seconds") and not 0 <= value < math.inf  # a plan refuses how it is written
    if option.plan_key is not None and not written_out:
        with pytest.raises(OptionError) as worded:
            check_option(option, value, label=option.plan_key)
        assert verdicts["plan"] in (worded.value.message, f"{option.plan_key}: {worded.value.message}"), value


def test_the_table_is_migration_options() -> None:
    """Same fields in the same order, each default the table's, each type its kind's."""
    assert [field.name for field in fields(MigrationOptions)] == [option.keyword for option in OPTIONS]
    made = MigrationOptions()
    for field in fields(MigrationOptions):
        option = OPTION[field.name]
        assert getattr(made, field.name) == option.default, field.name
        assert field.default is not MISSING or field.default_factory is not MISSING
        wanted = ANNOTATIONS[option.kind] + (" | None" if option.optional else "")
        assert str(field.type) == wanted, field.name
    assert MigrationOptions().networks is not MigrationOptions().networks  # a fresh dict each


def test_the_table_is_v2p_migrate() -> None:
    """Every option with a flag is that flag, into the library keyword, of its kind; nothing else."""
    actions = {action.dest: action for action in migrate_parser()._actions}
    assert set(actions) - CLI_ONLY == {option.keyword for option in OPTIONS if option.flag}
    for option in OPTIONS:
        if option.flag is None:
            continue
        action = actions[option.keyword]
        flags = [option.flag] + ([f"--no-{option.flag[2:]}"] if option.kind == "bool" and option.negatable else [])
        assert action.option_strings == flags
        assert action.default is None  # not given: the library's default (or the target's: storage)
        assert tuple(action.choices or ()) == option.choices
        assert action.help == option.help
        assert (action.nargs == 0) == (option.kind == "bool")
        assert isinstance(action, argparse._AppendAction) == (option.kind in ("bridges", "rules"))


def test_the_table_is_the_plan_keys() -> None:
    """Every option with a plan key is that key, setting the library keyword, with the same choices."""
    options = {name: key for name, key in KEYS.items() if name not in PLAN_ONLY}
    assert set(options) == {option.plan_key for option in OPTIONS if option.plan_key}
    for option in OPTIONS:
        if option.plan_key is None:
            continue
        key = options[option.plan_key]
        assert key.option == option.keyword
        assert key.choices == option.choices
        assert key.place == ("vm" if option.per_vm else "both")
    assert all(KEYS[name].option is None for name in PLAN_ONLY)


def test_the_dance_and_inspect_share_the_declarations() -> None:
    sub = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction))
    for command, keywords in (("dance", ("drivers_iso", "net_drivers", "arch", "dance_wait", "shutdown_timeout",
                                         "start")),
                              ("inspect", ("networks", "bridge", "ignore_rules"))):
        actions = {action.dest: action for action in sub.choices[command]._actions}
        for keyword in keywords:
            option = OPTION[keyword]
            assert actions[keyword].option_strings[0] == option.flag
            assert tuple(actions[keyword].choices or ()) == option.choices
            if option.kind not in ("bridges", "rules"):
                assert actions[keyword].default == option.default


def test_flags_in_deeper_messages_are_said_in_plan_words() -> None:
    assert PLAN_WORDS == {option.flag: option.plan_key for option in OPTIONS if option.flag and option.plan_key}
    assert plan_words("--ignore-rule 'x': no such rule") == "ignore_rules 'x': no such rule"
    assert plan_words("--bwlimit does not apply to --copy-with dd") == "bwlimit does not apply to copy_with dd"
    assert plan_words("pass --force to overwrite it") == "pass --force to overwrite it"  # not in plans


def test_every_option_says_what_it_is() -> None:
    for option in OPTIONS:
        assert option.help and option.help[0].islower() or option.help.startswith(("MiB", "PVE", "Windows")), option
        assert (option.kind == "choice") == bool(option.choices), option.keyword
        assert (option.kind == "whole") == (option.bounds != (0, 0)), option.keyword


def test_arm64_is_refused_everywhere() -> None:
    """It was the library's alone: v2p's targets run x86 guests, and the hint named amd64 or x86."""
    assert library("arch", "ARM64") == "unknown --arch 'ARM64' (hint: use amd64 or x86)"
