"""The README and docs/ against the code they describe: links that lead somewhere, a section for
every command, every option of every command named, the rule table equal to ``v2p.rules.RULES``,
every plan key listed, a row for every exit code. In-process and quick (no v2p process)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """The anchors GitHub makes of a Markdown file's headings (lower case, punctuation dropped,
    spaces to hyphens)."""
    found = set()
    for line in path.read_text().splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            text = heading.group(1).strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_link_leads_somewhere(doc: Path) -> None:
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        where = (doc.parent / file).resolve() if file else doc
        assert where.exists(), f"{doc.name}: link to {target}: no such file"
        if anchor:
            assert anchor in anchors(where), f"{doc.name}: link to {target}: no such heading"


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every command of ``v2p`` (``migrate``, ``plan run``, ...) and its parser."""
    from v2p.cli import build_parser

    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found[f"{prefix}{name}"] = sub
                    walk(sub, f"{prefix}{name} ")

    walk(build_parser(), "")
    return found


def test_every_command_has_its_section_and_every_option_is_named() -> None:
    cli = (ROOT / "docs" / "cli.md").read_text()
    plans = (ROOT / "docs" / "plans.md").read_text()
    for command, parser in commands().items():
        assert f"## `v2p {command.split()[0]}`" in cli, f"docs/cli.md has no section for v2p {command}"
        assert f"v2p {command}" in cli, f"docs/cli.md never shows v2p {command}"
        for action in parser._actions:
            for flag in action.option_strings:
                if flag in ("-h", "--help"):
                    continue
                assert flag in cli or (command.startswith("plan") and flag in plans), \
                    f"v2p {command} {flag}: not in docs/cli.md"
    from v2p.cli import build_parser

    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in cli, f"global option {flag}: not in docs/cli.md"


def test_the_rule_table_is_the_rules() -> None:
    from v2p.rules import RULES

    mapping = (ROOT / "docs" / "mapping.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| (error|warning|info) \| (yes|no|–) \|", mapping, re.MULTILINE)
    assert [row[0] for row in rows] == list(RULES), "docs/mapping.md's rule ids, in RULES order"
    for rule_id, severity, ignorable in rows:
        rule = RULES[rule_id]
        assert severity == rule.severity, rule_id
        assert ignorable == ("yes" if rule.ignorable else "no" if rule.severity == "error" else "–"), rule_id


def test_every_plan_key_is_listed() -> None:
    from v2p.plan import KEYS

    plans = (ROOT / "docs" / "plans.md").read_text()
    for key in KEYS:
        assert f"`{key}`" in plans, f"plan key {key}: not in docs/plans.md"


def test_every_exit_code_has_its_row() -> None:
    import v2p
    from v2p.errors import EXIT_BOOT_UNCONFIRMED

    cli = (ROOT / "docs" / "cli.md").read_text()
    codes = {getattr(v2p, name).exit_code for name in v2p.__all__
             if isinstance(getattr(v2p, name), type) and issubclass(getattr(v2p, name), v2p.V2PError)}
    for code in sorted(codes | {0, EXIT_BOOT_UNCONFIRMED}):
        if code == 130:
            assert "| 130, 143 |" in cli
        else:
            assert re.search(rf"^\| {code} \|", cli, re.MULTILINE), f"exit code {code}: no row in docs/cli.md"


def shell_lines(path: Path) -> list[tuple[int, str]]:
    """The README's command lines: its indented blocks and its sh/bash/console fences (not YAML)."""
    found, fence = [], None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            fence = None if fence is not None else (line[3:].strip() or "text")
            continue
        if fence in ("sh", "bash", "console", "shell") or (fence is None and line.startswith("    ")):
            found.append((number, line))
    return found


def history_expanded(line: str) -> bool:
    """Whether interactive bash would expand a ``!`` in ``line`` (history expansion): one outside single
    quotes and not escaped, followed by anything but a blank, ``=`` or ``(`` (bash's
    ``history_no_expand_chars``)."""
    quoted, escaped = False, False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and not quoted:
            escaped = True
        elif char == "'":
            quoted = not quoted
        elif char == "#" and not quoted and (index == 0 or line[index - 1] in " \t"):
            return False  # a comment
        elif char == "!" and not quoted and line[index + 1:index + 2] not in ("", " ", "\t", "=", "("):
            return True
    return False


def test_history_expansion_is_what_bash_does() -> None:
    assert history_expanded("v2p --target pve://v2p@pve!migrate@pve1/pve1 status")
    assert history_expanded('v2p --target "pve://v2p@pve!migrate@pve1/pve1" status')
    assert not history_expanded("v2p --target 'pve://v2p@pve!migrate@pve1/pve1' status")
    assert not history_expanded(r"echo a\!b; test 1 != 2; echo done   # a comment's !bang")


def test_every_readme_command_pastes_into_bash() -> None:
    lines = shell_lines(ROOT / "README.md")
    assert any("pve://" in line for _number, line in lines)  # the PVE examples are among them
    expanded = [f"README.md:{number}: {line.strip()}" for number, line in lines if history_expanded(line)]
    assert not expanded, "a '!' bash would take as history expansion (quote it in '...'):\n" + "\n".join(expanded)


PVE_USER = re.compile(r"pve://([^@/\s'\"]+@[^@/!\s'\"]+(?:![^@/\s'\"]+)?)@")


def test_the_readme_and_the_pipelines_name_the_same_token() -> None:
    readme = set(PVE_USER.findall((ROOT / "README.md").read_text()))
    pipelines = {user for path in (ROOT / "pipelines").glob("*.yaml") for user in PVE_USER.findall(path.read_text())}
    assert readme and pipelines, (readme, pipelines)
    assert readme == pipelines, f"README.md names {sorted(readme)}, pipelines/ {sorted(pipelines)}"
