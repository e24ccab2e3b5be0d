"""The man page and the bash completion ``make install`` generates from v2p's parser: installed under
PREFIX where man and bash-completion look, a page groff renders without a warning that names every
command and action, and a completion that completes ``v2p mig`` to ``migrate``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from v2p.cli_args import build_parser

ROOT = Path(__file__).resolve().parent.parent


def commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command and action of the parser, as words after ``v2p``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from commands(sub, (*prefix, name))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prefix = tmp_path_factory.mktemp("prefix")
    built = tmp_path_factory.mktemp("built")
    # -o: the venv this test runs in is taken as it is (make would otherwise reinstall an older one)
    done = subprocess.run(["make", "-s", "-C", str(ROOT), "install", f"PREFIX={prefix}", f"CLI_DOCS={built}",
                           f"BIN={Path(sys.executable).parent}", "-o", ".venv/.installed"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return prefix


def test_the_man_page_renders_without_warnings_and_names_every_command(installed: Path) -> None:
    page = installed / "share" / "man" / "man1" / "v2p.1"
    # man's own warnings (man --warnings: -wmac) and undefined characters, as groff reports them
    done = subprocess.run(["groff", "-man", "-Tutf8", "-wmac", "-wchar", str(page)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    text = done.stdout.replace("\u2010", "-").replace("\u2212", "-")
    assert "v2p - move VMware virtual machines onto KVM" in " ".join(text.split())
    names = list(commands(build_parser()))
    assert {"migrate", "status", "plan run", "vm start"} <= {" ".join(words) for words in names}
    missing = [" ".join(words) for words in names if f"v2p {' '.join(words)}" not in " ".join(text.split())]
    assert not missing, missing


def complete(installed: Path, line: str) -> list[str]:
    """What bash completes the last word of ``line`` to, with the installed completion sourced."""
    words = line.split(" ")
    script = (f"source {installed / 'share' / 'bash-completion' / 'completions' / 'v2p'}\n"
              f"COMP_WORDS=({' '.join(repr(word) for word in words)}); COMP_CWORD={len(words) - 1}\n"
              f"COMP_LINE={line!r}; COMP_POINT={len(line)}\n"
              "_shtab_v2p v2p \"${COMP_WORDS[COMP_CWORD]}\" \"${COMP_WORDS[COMP_CWORD-1]}\"\n"
              "printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    file = installed / "complete.sh"  # a file, not bash -c: the line is not the v2p command (conftest's audit)
    file.write_text(script)
    done = subprocess.run(["bash", "--norc", "--noprofile", str(file)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [word for word in done.stdout.split("\n") if word]


def test_bash_completes_commands_and_options(installed: Path) -> None:
    assert complete(installed, "v2p mig") == ["migrate"]
    assert complete(installed, "v2p plan ru") == ["run"]
    assert "--vmid" in complete(installed, "v2p migrate disk.vmdk --vm")
